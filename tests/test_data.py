import os, warnings
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from mura_study import data
from mura_study.data import (MuraError, LeakageError, read_mura, read_boxes, protocol, patient_split, check_leakage,
                             leakage_report, load_grey, to_batch, grey_cache, mura_dataloaders, offline_copy, summary,
                             problems)
from mura_study.synth import make_mura

# A tiny hand-made MURA-v1.1 tree: (split, body part, patient, study number, label, views)
STUDIES = [('train', 'WRIST', 'patient00001', 1, 1, 2), ('train', 'ELBOW', 'patient00002', 1, 0, 2),
           ('train', 'HAND', 'patient00003', 1, 0, 1), ('valid', 'FINGER', 'patient11185', 1, 1, 2)]


def study_rel(split, part, patient, n, label):
    return f"MURA-v1.1/{split}/XR_{part}/{patient}/study{n}_{'positive' if label else 'negative'}"


def write_mura(dest: Path, studies=STUDIES) -> Path:
    "Write PNGs and the four CSVs in MURA's format (no header, trailing slash on studies)."
    rng = np.random.default_rng(0)
    lines = {f'{s}_{k}': [] for s in ('train', 'valid') for k in ('image_paths', 'labeled_studies')}
    for split, part, patient, n, label, views in studies:
        rel = study_rel(split, part, patient, n, label)
        lines[f'{split}_labeled_studies'].append(f'{rel}/,{label}')
        for v in range(1, views + 1):
            f = dest/rel/f'image{v}.png'
            f.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (24, 18), dtype=np.uint8)).save(f)
            lines[f'{split}_image_paths'].append(f'{rel}/image{v}.png')
    for k, ls in lines.items(): (dest/'MURA-v1.1'/f'{k}.csv').write_text('\n'.join(ls) + '\n')
    return dest/'MURA-v1.1'


@pytest.fixture
def mura(tmp_path):
    return write_mura(tmp_path)


def csv_lines(mura, name):
    return (mura/name).read_text().splitlines()


def set_csv(mura, name, lines):
    (mura/name).write_text('\n'.join(lines) + '\n')


def first_image(mura):
    return mura.parent/csv_lines(mura, 'train_image_paths.csv')[0]


def read_both(mura):
    "The error of on_error='raise' and the problems of on_error='skip'."
    with pytest.raises(MuraError) as e: read_mura(mura, progress=False)
    df = read_mura(mura, on_error='skip', progress=False)
    return str(e.value), df, problems(df)


def n_image_lines(mura):
    return sum(len(csv_lines(mura, f'{s}_image_paths.csv')) for s in ('train', 'valid'))


@pytest.fixture(scope='module')
def synth(tmp_path_factory):
    return make_mura(tmp_path_factory.mktemp('synth'), n_patients=40, size=96, seed=0, progress=False)


@pytest.fixture(scope='module')
def synth_df(synth):
    return read_mura(synth, progress=False)


# ---- the reader on good data

def test_clean_tree_reads_every_image_with_the_contract_columns(mura):
    df = read_mura(mura, progress=False)
    assert len(df) == 7 and df.attrs['problems'] == [] and len(problems(df)) == 0
    assert list(df.columns[:7]) == ['path', 'split', 'body_part', 'patient', 'study', 'view', 'label']
    assert df.path.map(lambda p: Path(p).is_absolute()).all()
    assert df.study.nunique() == 4 and df.study[0] == 'train/XR_WRIST/patient00001/study1_positive'
    assert df.groupby('study').label.first().to_dict()['train/XR_ELBOW/patient00002/study1_negative'] == 0
    assert len(read_mura(mura.parent, progress=False)) == 7  # the folder containing MURA-v1.1 works too


def test_summary_counts_images_by_split_body_part_and_label(mura):
    s = summary(read_mura(mura, progress=False))
    assert s.loc[('train', 'ALL'), 'images'] == 5 and s.loc[('valid', 'FINGER'), 'abnormal'] == 2
    assert s.loc[('train', 'ALL'), 'patients'] == 3


# ---- the bad-input battery: one case per check, both modes

def test_missing_csv_names_the_file(mura):
    (mura/'valid_labeled_studies.csv').unlink()
    msg, df, probs = read_both(mura)
    assert 'valid_labeled_studies.csv: file not found' in msg and 'restore it from the MURA-v1.1 archive' in msg
    assert probs.kind.tolist() == ['missing_csv', 'no_label', 'no_label', 'empty_split']  # valid: no image left
    assert probs.line.isna().tolist() == [True, False, False, True] and len(df) == 5


def test_not_a_mura_folder_says_what_to_pass(tmp_path):
    with pytest.raises(FileNotFoundError, match='pass the MURA-v1.1 folder'): read_mura(tmp_path, progress=False)


def test_missing_image_names_csv_line_and_fix(mura):
    first_image(mura).unlink()
    msg, df, probs = read_both(mura)
    assert 'train_image_paths.csv line 1: file not found' in msg and 'restore the file' in msg
    assert probs.kind.tolist() == ['missing'] and probs.path[0].endswith('patient00001/study1_positive/image1.png')
    assert len(df) == n_image_lines(mura) - 1


def test_zero_byte_image(mura):
    first_image(mura).write_bytes(b'')
    msg, df, probs = read_both(mura)
    assert 'line 1: empty file (0 bytes)' in msg and 're-extract' in msg
    assert probs.kind.tolist() == ['undecodable'] and len(df) == 6


def test_truncated_image(mura):
    f = first_image(mura); b = f.read_bytes(); f.write_bytes(b[:len(b) // 2])
    msg, df, probs = read_both(mura)
    assert 'line 1: not a decodable image' in msg
    assert probs.kind.tolist() == ['undecodable'] and len(df) == 6


def test_appledouble_file_listed_in_csv(mura):
    f = first_image(mura)
    (f.parent/'._image1.png').write_bytes(b'\x00\x05\x16\x07' + b'\x00' * 60)  # AppleDouble magic
    listed = csv_lines(mura, 'train_image_paths.csv')
    set_csv(mura, 'train_image_paths.csv', listed + [str(Path(listed[0]).parent/'._image1.png')])
    msg, df, probs = read_both(mura)
    assert 'line 6: a macOS AppleDouble resource fork' in msg and "find MURA-v1.1 -name '._*' -delete" in msg
    assert probs.kind.tolist() == ['undecodable'] and len(df) == 7


@pytest.mark.parametrize('bad', ['MURA-v1.1/train/XR_WRIST/../../../secret.png', '/etc/passwd'])
def test_path_escaping_the_root_is_refused_and_never_opened(mura, bad, monkeypatch):
    secret = mura.parent.parent/'secret.png'
    Image.new('L', (8, 8)).save(secret)
    opened = []
    real_open = data.Image.open
    monkeypatch.setattr(data.Image, 'open', lambda fp, *a, **k: (opened.append(str(fp)), real_open(fp, *a, **k))[1])
    set_csv(mura, 'train_image_paths.csv', csv_lines(mura, 'train_image_paths.csv') + [bad])
    msg, df, probs = read_both(mura)
    assert 'line 6: path' in msg and 'leaves the MURA-v1.1 folder; refused, not opened' in msg
    assert probs.kind.tolist() == ['escapes_root'] and probs.path[0] == bad and len(df) == 7
    assert not any('secret' in p or 'passwd' in p for p in opened)


def test_label_disagreeing_with_folder_name(mura):
    lines = csv_lines(mura, 'train_labeled_studies.csv')
    lines[0] = lines[0][:-1] + '0'  # study1_positive labelled 0
    set_csv(mura, 'train_labeled_studies.csv', lines)
    msg, df, probs = read_both(mura)
    assert 'train_labeled_studies.csv line 1: label 0 disagrees with the folder name study1_positive' in msg
    assert 'positive = 1, negative = 0' in msg
    # the study line and its two images are listed; the images are left out
    assert probs.kind.tolist() == ['label_mismatch'] * 3 and len(df) == 5
    assert 'its study is unusable' in probs.problem[1]


def test_unknown_body_part(tmp_path):
    mura = write_mura(tmp_path, STUDIES + [('train', 'KNEE', 'patient00004', 1, 0, 1)])
    msg, df, probs = read_both(mura)
    assert 'unknown body part XR_KNEE' in msg and 'XR_ELBOW, XR_FINGER' in msg
    assert set(probs.kind) == {'unknown_body_part'} and len(df) == 7


@pytest.mark.parametrize('csv_name,line,expect', [
    ('train_image_paths.csv', 'hello world', "'hello world' is not a MURA-v1.1 path"),
    ('train_image_paths.csv', 'MURA-v1.1/train/XR_WRIST/patient00001/study1_positive/image1.png,1',
     'expected one path, got 2 fields'),
    ('train_image_paths.csv', 'MURA-v1.1/valid/XR_FINGER/patient11185/study1_positive/image1.png',
     'lies under valid/ but is listed for train'),
    ('train_labeled_studies.csv', 'MURA-v1.1/train/XR_HAND/patient00003/study1_negative/,yes',
     "expected '<study folder>/,<0 or 1>'"),
])
def test_malformed_csv_lines(mura, csv_name, line, expect):
    set_csv(mura, csv_name, csv_lines(mura, csv_name) + [line])
    msg, df, probs = read_both(mura)
    assert expect in msg and 'Fix:' in msg
    assert 'malformed' in set(probs.kind)


def test_duplicate_image_line(mura):
    lines = csv_lines(mura, 'train_image_paths.csv')
    set_csv(mura, 'train_image_paths.csv', lines + [lines[0]])
    msg, df, probs = read_both(mura)
    assert 'line 6: image listed again (first at train_image_paths.csv line 1)' in msg
    assert 'delete the repeated line' in msg
    assert probs.kind.tolist() == ['duplicate'] and len(df) == 7


def test_duplicate_study_line(mura):
    lines = csv_lines(mura, 'train_labeled_studies.csv')
    set_csv(mura, 'train_labeled_studies.csv', lines + [lines[1]])
    msg, df, probs = read_both(mura)
    assert 'line 4: study listed again (first at line 2)' in msg
    assert probs.kind.tolist() == ['duplicate'] and len(df) == 7


def test_image_whose_study_has_no_label(mura):
    set_csv(mura, 'train_labeled_studies.csv', csv_lines(mura, 'train_labeled_studies.csv')[1:])
    msg, df, probs = read_both(mura)
    assert 'its study is not in train_labeled_studies.csv' in msg
    assert probs.kind.tolist() == ['no_label'] * 2 and len(df) == 5


def test_skip_mode_lists_every_dropped_image(mura):
    imgs = csv_lines(mura, 'train_image_paths.csv')
    first_image(mura).unlink()
    set_csv(mura, 'train_image_paths.csv', imgs + [imgs[1], 'garbage', '/abs/x.png'])
    df = read_mura(mura, on_error='skip', progress=False)
    probs = problems(df)
    assert len(df) + len(probs) == n_image_lines(mura)
    assert sorted(probs.kind) == ['duplicate', 'escapes_root', 'malformed', 'missing']


def test_blank_lines_and_windows_line_endings_are_fine(mura):
    f = mura/'train_image_paths.csv'
    f.write_bytes(f.read_bytes().replace(b'\n', b'\r\n') + b'\r\n\r\n')
    assert len(read_mura(mura, progress=False)) == 7


# ---- image modes

@pytest.mark.parametrize('mode', ['L', 'LA', 'RGB', 'RGBA', 'P', 'I;16'])
def test_image_modes_load_as_grey(mura, mode):
    grey = (np.arange(24 * 18) % 200 + 20).astype(np.uint8).reshape(24, 18)
    im = Image.fromarray(grey.astype(np.uint16) * 257) if mode == 'I;16' else Image.fromarray(grey).convert(mode)
    f = first_image(mura); im.save(f)
    assert Image.open(f).mode == mode
    df = read_mura(mura, check_images='decode', progress=False)
    assert len(df) == 7
    out = np.asarray(load_grey(f, 24), dtype=float)
    ref = np.asarray(load_grey_from(Image.fromarray(grey), f.parent/'ref.png'), dtype=float)
    assert np.abs(out - ref).mean() < 2


def load_grey_from(im, f):
    im.save(f)
    return load_grey(f, 24)


def interlaced_png(f, a):
    "An Adam7-interlaced 8-bit grey PNG of `a` (PIL cannot write one), built pass by pass."
    import struct, zlib
    passes = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
    raw = b''.join(b'\x00' + row.tobytes() for x, y, dx, dy in passes for row in a[y::dy, x::dx] if row.size)
    chunk = lambda c, d: struct.pack('>I', len(d)) + c + d + struct.pack('>I', zlib.crc32(c + d))
    ihdr = struct.pack('>IIBBBBB', a.shape[1], a.shape[0], 8, 0, 0, 0, 1)
    f.write_bytes(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', ihdr) + chunk(b'IDAT', zlib.compress(raw))
                  + chunk(b'IEND', b''))


@pytest.mark.parametrize('mode', ['1', 'L', 'LA', 'RGB', 'RGBA', 'P', 'P4', 'I;16', 'interlaced'])
def test_the_full_decode_check_passes_every_valid_png(tmp_path, mode):
    a = (np.arange(37 * 23) * 7 % 256).astype(np.uint8).reshape(23, 37)  # odd sizes: partial bytes and passes
    f = tmp_path/'x.png'
    if mode == 'interlaced': interlaced_png(f, a); assert np.array_equal(np.asarray(Image.open(f)), a)
    elif mode == 'P4': Image.fromarray(a // 16).convert('P').save(f, bits=4)
    elif mode == 'I;16': Image.fromarray(a.astype(np.uint16) * 257).save(f)
    else: Image.fromarray(a).convert(mode).save(f)
    assert data._probe(str(f), 'decode') == (37, 23, None)


def test_32_bit_grey_loads(tmp_path):
    f = tmp_path/'i.tif'
    Image.fromarray((np.arange(100) * 600).reshape(10, 10).astype(np.int32)).save(f)
    a = np.asarray(load_grey(f, 10))
    assert a.dtype == np.uint8 and a.max() == round(59400 / 257) and a.min() == 0  # scaled from 16 bits


def test_load_grey_names_the_unreadable_file(tmp_path):
    f = tmp_path/'broken.png'; f.write_bytes(b'not a png')
    with pytest.raises(OSError, match='broken.png'): load_grey(f, 32)


# ---- splits, protocols and leakage

def test_two_patient_leak_raises(synth_df):
    sp = patient_split(synth_df, 0.2, seed=0)
    two = sp.patient[sp.set == 'train'].unique()[:2]
    leak = sp.copy()
    for p in two: leak.loc[leak.index[leak.patient == p][0], 'set'] = 'valid'
    with pytest.raises(LeakageError, match=r'2 patient\(s\) in more than one set'): check_leakage(leak)
    assert check_leakage(sp).patients.sum() == 0


def test_patient_split_is_disjoint_stratified_and_seeded(synth_df):
    sp = patient_split(synth_df, 0.2, seed=3, test_pct=0.1)
    assert (sp.groupby('patient').set.nunique() == 1).all()
    assert set(sp.set) == {'train', 'valid', 'test'}
    assert sp.set.tolist() == patient_split(synth_df, 0.2, seed=3, test_pct=0.1).set.tolist()
    assert sp.set.tolist() != patient_split(synth_df, 0.2, seed=4, test_pct=0.1).set.tolist()


def test_protocols_official_and_clean_pass_paper_leaks(synth_df):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        cuts = {p: protocol(synth_df, p, seed=0) for p in ('official', 'paper', 'paper_clean')}
    assert any('capped' in str(x.message) for x in w)
    check_leakage(cuts['official']); check_leakage(cuts['paper_clean'])
    with pytest.raises(LeakageError): check_leakage(cuts['paper'])
    rep = leakage_report(cuts['paper'])
    assert rep.patients.sum() > 0 and rep.source_images.sum() > 0
    off = cuts['official']
    assert set(off.set) == {'train', 'valid', 'test'} and (off[off.set == 'test'].split == 'valid').all()
    clean = cuts['paper_clean']
    assert set(clean[clean.set != 'train'].aug) == {0} and set(clean[clean.set == 'train'].aug) == {0, 1, 2, 3}
    assert len(cuts['paper']) == 4 * (synth_df.split == 'train').sum() and 'capped' in cuts['paper'].attrs['note']
    assert set(cuts['paper'].split) == set(cuts['paper_clean'].split) == {'train'}  # valid: the shared test set


def test_paper_subset_takes_5107_in_proportion_when_there_are_more(synth_df):
    df = synth_df
    copies = [df.assign(path=df.path + f'#{k}', patient=df.patient + f'_{k}') for k in range(6000 // len(df) + 1)]
    big = pd.concat(copies, ignore_index=True)
    sub = data.paper_subset(big, seed=0)
    assert len(sub) == 5107
    share = lambda d: d.groupby(['body_part', 'label']).size() / len(d)
    assert (share(sub) - share(big)).abs().max() < 0.005


def test_protocols_survive_a_frame_with_problems_attr(synth_df):
    df = synth_df.copy(); df.attrs['problems'] = [dict(path='x', problem='y', kind='missing', file='f.csv', line=1)]
    out = protocol(df, 'paper_clean', seed=0, n_images=50)
    assert 'problems' not in out.attrs and out.merge(out[['path']].drop_duplicates()).shape[0] == len(out)


# ---- offline copies, cache, loaders

def test_offline_copies_are_deterministic_and_distinct(synth_df):
    im = load_grey(synth_df.path[0], 48)
    a, b = offline_copy(im, synth_df.path[0], 1), offline_copy(im, synth_df.path[0], 1)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(offline_copy(im, synth_df.path[0], 2)))


def test_cache_detects_a_stale_file_and_rebuilds(mura, tmp_path):
    df = read_mura(mura, progress=False)
    c = grey_cache(df.path, 16, tmp_path/'cache', progress=False)
    assert c.status == 'built' and c.array.shape == (7, 16, 16)
    assert grey_cache(df.path, 16, tmp_path/'cache', progress=False).status == 'reused'
    Image.new('L', (24, 18), 255).save(df.path[0])  # a replaced image
    os.utime(df.path[0], ns=(0, os.stat(df.path[0]).st_mtime_ns + 10**9))
    c2 = grey_cache(df.path, 16, tmp_path/'cache', progress=False)
    assert c2.status == "rebuilt" and c2.get(df.path[0])[8, 8] == 255  # white now, not the old noise
    assert np.array_equal(c2.get(df.path[0]), np.asarray(load_grey(df.path[0], 16)))


def test_a_partial_cache_of_a_build_still_running_is_left_alone(mura, tmp_path):
    import fcntl
    df = read_mura(mura, progress=False)
    c = grey_cache(df.path, 16, tmp_path/'cache', progress=False)
    live, dead = (c.file.with_name(f'{c.file.stem}.{k}.partial.npy') for k in ('live', 'dead'))
    live.write_bytes(b'x'); dead.write_bytes(b'x')
    with open(live, 'r+b') as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # what a running build holds
        assert grey_cache(df.path, 16, tmp_path/'cache', progress=False).status == 'reused'
        assert live.exists() and not dead.exists()


def test_cache_build_checks_free_space_first(mura, tmp_path, monkeypatch):
    df = read_mura(mura, progress=False)
    usage = data.shutil.disk_usage(tmp_path)
    monkeypatch.setattr(data.shutil, 'disk_usage', lambda p: usage._replace(free=data.CACHE_MARGIN))
    with pytest.raises(OSError, match=f'No room for the grey cache in {tmp_path/"cache"}: it needs 16.0 MiB'):
        grey_cache(df.path, 16, tmp_path/'cache', progress=False)
    assert list((tmp_path/'cache').iterdir()) == []


def test_default_image_check_follows_on_error(mura, monkeypatch):
    seen = []
    real = data._probe
    monkeypatch.setattr(data, '_probe', lambda p, check: (seen.append(check), real(p, check))[1])
    read_mura(mura, progress=False); read_mura(mura, on_error='skip', progress=False)
    read_mura(mura, on_error='skip', check_images='exists', progress=False)
    assert seen == ['verify'] * 7 + ['decode'] * 7 + ['exists'] * 7
    with pytest.raises(ValueError, match="use one of decode, verify, exists"): read_mura(mura, check_images='load')


def test_problems_are_plain_records_and_a_table(mura):
    first_image(mura).unlink()
    df = read_mura(mura, on_error='skip', progress=False)
    rec = df.attrs['problems']
    assert isinstance(rec, list) and rec[0]['kind'] == 'missing' and rec[0]['line'] == 1
    t = problems(df)
    assert list(t.columns) == ['path', 'problem', 'kind', 'file', 'line'] and str(t.line.dtype) == 'Int64'
    assert t.file[0] == 'train_image_paths.csv' and len(problems(pd.DataFrame())) == 0


def test_dataloaders_give_grey_float_batches_and_int_labels(synth_df, tmp_path):
    off = protocol(synth_df, 'official', seed=0)
    dls = mura_dataloaders(off, size=32, bs=8, cache_dir=tmp_path, device='cpu', progress=False)
    x, y = dls.one_batch()
    assert x.shape == (8, 1, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert list(dls.vocab) == ['normal', 'abnormal']
    test = off[off.set == 'test']
    tx, ty = dls.test_dl(test, with_labels=True).one_batch()
    assert tx.shape[1:] == (1, 32, 32) and ty.tolist() == test.label.tolist()[:len(ty)]
    vx, _ = dls.valid.one_batch()
    ref = to_batch([load_grey(p, 32) for p in off[off.set == 'valid'].path[:len(vx)]])
    assert torch.allclose(vx, ref, atol=1e-5)


def test_test_dl_takes_a_frame_rows_or_image_files(synth_df, tmp_path):
    "fastai's learn.predict('x.png') calls dls.test_dl(['x.png']): a file name must not be read as a row."
    off = protocol(synth_df, 'official', seed=0)
    dls = mura_dataloaders(off, size=32, bs=8, augment=False, cache_dir=tmp_path, device='cpu', progress=False)
    test = off[off.set == 'test']
    assert len(dls.test_dl(test).dataset) == len(test)  # a frame: its rows, not its column names
    f = test.path.iloc[0]
    ref = to_batch([load_grey(f, 32)])
    for items in ([f], [Path(f)], [test.iloc[0]]):
        (x,) = dls.test_dl(items).one_batch()
        assert x.shape == (1, 1, 32, 32) and torch.allclose(x, ref, atol=1e-5)


def test_show_batch_and_show_results_draw_grey_on_a_fixed_scale(synth_df):
    off = protocol(synth_df, 'official', seed=0)
    dls = mura_dataloaders(off, size=24, bs=4, device='cpu', progress=False)
    try:
        dls.show_batch(max_n=2)
        im = plt.gcf().axes[0].images[0]
        assert im.get_cmap().name == 'gray' and im.get_clim() == (0, 255)
        dls.show_batch(max_n=2, cmap='bone')
        assert plt.gcf().axes[0].images[0].get_cmap().name == 'bone'  # the caller's choice wins
        b = dls.valid.one_batch()
        dls.valid.show_results(b, b[1], max_n=2)
        assert plt.gcf().axes[0].images[0].get_cmap().name == 'gray'
    finally: plt.close('all')


def test_dataloaders_are_deterministic_for_a_seed(synth_df):
    off = protocol(synth_df, 'official', seed=0)
    batch = lambda s: mura_dataloaders(off, size=24, bs=4, seed=s, device='cpu').one_batch()
    (a, ya), (b, yb), (c, _) = batch(5), batch(5), batch(6)
    assert torch.equal(a, b) and torch.equal(ya, yb) and not torch.equal(a, c)


def test_dataloaders_need_train_and_valid(synth_df):
    with pytest.raises(ValueError, match='no `set` column'): mura_dataloaders(synth_df)
    with pytest.raises(ValueError, match="0 'valid' rows"): mura_dataloaders(synth_df.assign(set='train'))


def test_augmentations_leave_validation_batches_alone():
    x = data.TensorImage(torch.rand(4, 1, 32, 32))
    for t in data.augment_tfms():
        assert torch.equal(t(x, split_idx=1), x)
        y = t(x, split_idx=0)
        assert y.shape == x.shape and not torch.equal(y, x)


def test_read_boxes_absolute_paths_or_empty(synth, mura):
    b = read_boxes(synth)
    assert list(b.columns) == ['path', 'x0', 'y0', 'x1', 'y1', 'kind'] and len(b)
    assert b.path.map(lambda p: Path(p).exists()).all()
    assert len(read_boxes(mura)) == 0


@pytest.mark.parametrize('name', ['official', 'paper_clean'])
def test_batched_cache_reads_give_the_same_batches_as_item_by_item(synth_df, tmp_path, name):
    "GreyDL reads cached rows in one indexing operation; copies and augmentation come out as on fastai's per-item path."
    from fastai.data.core import TfmdDL
    cut = protocol(synth_df, name, seed=0, n_images=120)  # below the set's size: no capping warning
    kw = dict(size=48, bs=8, cache_dir=tmp_path/'cache', seed=5, device='cpu', progress=False)
    def batches(**extra):  # each loader seeds the augmentation afresh, so build and read one at a time
        dls = data.mura_dataloaders(cut, **kw, **extra)
        return type(dls.train), data._batch_plan(dls.train.dataset), list(dls.train) + list(dls.valid)
    dl_type, plan, got = batches()
    assert dl_type is data.GreyDL and plan is not None
    _, _, want = batches(dl_type=TfmdDL)
    assert len(got) == len(want) > 0
    for (x, y), (x0, y0) in zip(got, want):
        assert type(x) is type(x0) and type(y) is type(y0)
        assert torch.equal(x, x0) and torch.equal(y, y0)


# ---- label maps in the model's square
def test_label_maps_map_through_load_greys_geometry_as_the_boxes_do(synth):
    from mura_study.interpret import boxes_to_model, box_mask
    from mura_study.synth import TISSUES
    boxes = read_boxes(synth)
    paths = list(boxes.path.drop_duplicates()[:12])
    for size in (64, 128, 224):
        masks = data.anatomy_masks(paths, size)
        assert masks.shape == (len(paths), size, size) and masks.dtype == np.uint8
        model_boxes = boxes_to_model(boxes[boxes.path.isin(paths)], size)
        for m, p in zip(masks, paths):
            shown = np.isin(m, [TISSUES.index('finding'), TISSUES.index('hardware')])
            assert shown.any() and not (shown & ~box_mask(model_boxes[model_boxes.path == p], size)).any(), (p, size)
            grey = np.asarray(load_grey(p, size))
            rows, cols = np.nonzero(grey.max(1))[0], np.nonzero(grey.max(0))[0]  # the image's part of the square
            outside = np.ones((size, size), bool); outside[rows.min():rows.max() + 1, cols.min():cols.max() + 1] = False
            assert (m[outside] == 0).all()  # the padding is background


def test_label_maps_keep_codes_by_nearest_neighbour(synth):
    from mura_study.synth import anatomy_path
    p = read_mura(synth, progress=False).path[0]
    stored = set(np.unique(np.asarray(Image.open(anatomy_path(p)))).tolist())
    assert set(np.unique(data.anatomy_masks([p], 37)).tolist()) <= stored  # no code blended from two neighbours


def test_rgb_images_get_one_channel_label_maps(synth):
    df = read_mura(synth, progress=False)
    rgb = [p for p in df.path if Image.open(p).mode == 'RGB']
    assert rgb and data.anatomy_masks(rgb, 48).shape == (len(rgb), 48, 48)


def test_a_real_mura_has_no_label_maps_and_says_so(mura, synth):
    paths = list(read_mura(mura, progress=False).path)
    assert not data.has_anatomy(paths) and data.has_anatomy(read_mura(synth, progress=False).path)
    with pytest.raises(FileNotFoundError, match='real MURA has none') as e: data.anatomy_masks(paths, 32)
    assert 'anatomy' in str(e.value) and paths[0] in str(e.value)


def test_a_label_map_that_does_not_fit_its_image_is_refused(synth, tmp_path):
    import shutil
    from mura_study.synth import anatomy_path
    root = tmp_path/'copy'; shutil.copytree(synth.parent, root)
    p = read_mura(root, progress=False).path[0]
    Image.new('L', (5, 5)).save(anatomy_path(p))
    with pytest.raises(ValueError, match='does not fit its image'): data.anatomy_masks([p], 32)
    Image.new('L', Image.open(p).size, 200).save(anatomy_path(p))
    with pytest.raises(ValueError, match='not one of synth.TISSUES'): data.anatomy_masks([p], 32)
