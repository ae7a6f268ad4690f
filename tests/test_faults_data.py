"""Fault injection on the data side: damaged CSVs, images that pass a header check and do not decode, a disk that
fills up or a build that is killed while the grey cache is written, deep grey images, and read_mura frames in joins."""
import io, os, signal, struct, subprocess, sys, time, zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from mura_study import data
from mura_study.data import MuraError, grey_cache, load_grey, read_mura

# (split, body part, patient, study number, label, views): 5 train and 2 valid images
STUDIES = [('train', 'WRIST', 'patient00001', 1, 1, 2), ('train', 'ELBOW', 'patient00002', 1, 0, 2),
           ('train', 'HAND', 'patient00003', 1, 0, 1), ('valid', 'FINGER', 'patient11185', 1, 1, 2)]
N_IMAGES = 7


def write_mura(dest: Path, studies=STUDIES, side=24) -> Path:
    "PNGs and the four CSVs in MURA's format (no header, trailing slash on studies)."
    rng = np.random.default_rng(0)
    lines = {f'{s}_{k}': [] for s in ('train', 'valid') for k in ('image_paths', 'labeled_studies')}
    for split, part, patient, n, label, views in studies:
        rel = f"MURA-v1.1/{split}/XR_{part}/{patient}/study{n}_{'positive' if label else 'negative'}"
        lines[f'{split}_labeled_studies'].append(f'{rel}/,{label}')
        for v in range(1, views + 1):
            f = dest/rel/f'image{v}.png'
            f.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (side, side * 3 // 4), dtype=np.uint8)).save(f)
            lines[f'{split}_image_paths'].append(f'{rel}/image{v}.png')
    for k, ls in lines.items(): (dest/'MURA-v1.1'/f'{k}.csv').write_text('\n'.join(ls) + '\n')
    return dest/'MURA-v1.1'


@pytest.fixture
def mura(tmp_path):
    return write_mura(tmp_path/'data')


def lines_of(mura, name):
    return (mura/name).read_text().splitlines()


def set_lines(mura, name, lines):
    (mura/name).write_text('\n'.join(lines) + '\n')


def image(mura, k=0, split='train'):
    return mura.parent/lines_of(mura, f'{split}_image_paths.csv')[k]


def check_data(mura):
    "What `mura-study check-data` reads: every problem, every image decoded."
    df = read_mura(mura, on_error='skip', progress=False)
    return df, data.problems(df)


def raised(mura, **kw):
    with pytest.raises(MuraError) as e: read_mura(mura, progress=False, **kw)
    return str(e.value)


# ---- PNGs built chunk by chunk: every CRC valid, the pixel data damaged

def png_chunks(b: bytes) -> list:
    out, i = [], 8
    while i < len(b):
        n, cid = struct.unpack('>I4s', b[i:i + 8]); out.append((cid, b[i + 8:i + 8 + n])); i += 12 + n
    return out


def png_bytes(chunks) -> bytes:
    return b'\x89PNG\r\n\x1a\n' + b''.join(struct.pack('>I', len(d)) + c + d + struct.pack('>I', zlib.crc32(c + d))
                                           for c, d in chunks)


def damaged_png(f: Path, how: str):
    "Rewrite the PNG `f` with intact chunks (valid CRCs) and damaged pixel data."
    chunks = png_chunks(f.read_bytes())
    ihdr, idat = chunks[0][1], b''.join(d for c, d in chunks if c == b'IDAT')
    if how == 'truncated_stream': idat = idat[:len(idat) // 2]
    if how == 'zero_idat': idat = bytes(len(idat))
    if how == 'ihdr_too_tall': ihdr = ihdr[:4] + struct.pack('>I', 4 * struct.unpack('>I', ihdr[4:8])[0]) + ihdr[8:]
    f.write_bytes(png_bytes([(b'IHDR', ihdr), (b'IDAT', idat), (b'IEND', b'')]))


def passes_verify(f: Path) -> bool:
    with Image.open(f) as im: im.verify()
    return True


# ---- CSVs: missing, empty or unreadable data is a problem, never a pass

def test_empty_image_csv_is_a_problem_not_a_pass(mura):
    (mura/'train_image_paths.csv').write_bytes(b'')
    df, probs = check_data(mura)
    assert 'train_image_paths.csv: empty file (0 bytes)' in probs.problem.tolist()
    assert 'train_image_paths.csv: the train split has no usable image' in probs.problem.tolist()
    assert set(df.split) == {'valid'}
    assert 'train_image_paths.csv: empty file (0 bytes)' in raised(mura)


def test_all_four_empty_csvs_are_each_reported(mura):
    for n in data.MURA_CSVS: (mura/n).write_bytes(b'')
    df, probs = check_data(mura)
    assert len(df) == 0
    assert sorted(probs.kind) == ['empty_csv'] * 4 + ['empty_split'] * 2
    assert set(probs.file) == set(data.MURA_CSVS)


def test_csv_of_blank_lines_counts_as_empty(mura):
    (mura/'valid_labeled_studies.csv').write_text('\n  \n\t\n')
    df, probs = check_data(mura)
    assert 'valid_labeled_studies.csv: empty file' in probs.problem.tolist() and set(df.split) == {'train'}


def test_missing_csv_is_listed_when_skipping(mura):
    (mura/'valid_image_paths.csv').unlink()
    df, probs = check_data(mura)
    assert 'valid_image_paths.csv: file not found' in probs.problem.tolist() and len(df) == 5
    assert 'valid_image_paths.csv: file not found' in raised(mura)


def test_csv_that_is_a_folder_is_a_problem_not_a_traceback(mura):
    (mura/'valid_labeled_studies.csv').unlink(); (mura/'valid_labeled_studies.csv').mkdir()
    df, probs = check_data(mura)
    assert 'missing_csv' in set(probs.kind) and 'valid_labeled_studies.csv: cannot be read' in probs.problem[0]


def test_labelled_study_without_images_is_reported_at_its_line(mura):
    kept = [line for line in lines_of(mura, 'train_image_paths.csv') if 'patient00002' not in line]
    set_lines(mura, 'train_image_paths.csv', kept)
    df, probs = check_data(mura)
    assert probs.kind.tolist() == ['no_images']
    assert probs.problem[0] == ('train_labeled_studies.csv line 2: no image of the study is listed in '
                                'train_image_paths.csv')
    msg = raised(mura)
    assert msg.startswith('train_labeled_studies.csv line 2: no image of the study') and 'Fix:' in msg


def test_study_whose_images_are_listed_under_the_other_split_is_reported(mura):
    tr = lines_of(mura, 'train_image_paths.csv')
    moved = [line for line in tr if 'patient00003' in line]
    set_lines(mura, 'train_image_paths.csv', [line for line in tr if line not in moved])
    set_lines(mura, 'valid_image_paths.csv', lines_of(mura, 'valid_image_paths.csv') + moved)
    df, probs = check_data(mura)
    want = 'train_labeled_studies.csv line 3: no image of the study is listed in train_image_paths.csv'
    assert want in list(probs.problem)
    assert 'malformed' in set(probs.kind) and len(df) == N_IMAGES - 1


def test_split_whose_images_are_all_gone_is_reported(mura):
    for k in range(2): image(mura, k, 'valid').unlink()
    df, probs = check_data(mura)
    assert 'valid_image_paths.csv: the valid split has no usable image' in list(probs.problem)
    assert set(df.split) == {'train'}


def test_stray_quote_does_not_swallow_the_following_lines(mura):
    ls = lines_of(mura, 'train_image_paths.csv')
    ls[1] = '"' + ls[1]  # a CSV parser opens a quoted field here that runs to the end of the file
    set_lines(mura, 'train_image_paths.csv', ls)
    df, probs = check_data(mura)
    assert len(probs) == 1 and probs.problem[0].startswith('train_image_paths.csv line 2:')
    assert len(df) == N_IMAGES - 1 and not df.path.str.contains('"').any()
    assert raised(mura).startswith('train_image_paths.csv line 2:')


def test_stray_quote_in_the_study_labels_is_reported_at_its_line(mura):
    ls = lines_of(mura, 'train_labeled_studies.csv')
    ls[0] = ls[0].replace(',1', ',"1')
    set_lines(mura, 'train_labeled_studies.csv', ls)
    df, probs = check_data(mura)
    assert probs.problem[0].startswith('train_labeled_studies.csv line 1:')
    assert set(probs.kind) == {'malformed'} and len(df) == N_IMAGES - 2  # the study's two images depend on it


def test_stray_quote_in_a_crlf_file_with_a_bom_keeps_every_line_number(mura):
    ls = lines_of(mura, 'train_image_paths.csv')
    ls[3] = '"' + ls[3]
    text = '\r\n'.join(ls[:2] + ['   '] + ls[2:]) + '\r\n'  # a line of spaces as line 3
    (mura/'train_image_paths.csv').write_bytes(b'\xef\xbb\xbf' + text.encode())
    df, probs = check_data(mura)
    assert len(probs) == 1 and probs.problem[0].startswith('train_image_paths.csv line 5:')
    assert len(df) == N_IMAGES - 1


def test_byte_that_is_not_utf8_names_file_and_line(mura):
    f = mura/'train_image_paths.csv'
    ls = f.read_bytes().splitlines()
    ls[2] = ls[2].replace(b'image1', b'imag\xe9')  # Latin-1 'é'
    f.write_bytes(b'\n'.join(ls) + b'\n')
    df, probs = check_data(mura)
    assert probs.kind.tolist() == ['encoding']
    assert probs.problem[0].startswith('train_image_paths.csv line 3: byte 0xe9')
    assert len(df) == N_IMAGES - 1
    msg = raised(mura)
    assert msg.startswith('train_image_paths.csv line 3:') and 'UTF-8' in msg


def test_utf16_csv_is_named_not_a_traceback(mura):
    f = mura/'valid_labeled_studies.csv'
    f.write_bytes(f.read_text().encode('utf-16'))
    df, probs = check_data(mura)
    assert 'valid_labeled_studies.csv line 1: UTF-16 text, not UTF-8' in list(probs.problem)
    assert 'UTF-16' in raised(mura)


def test_header_line_is_named_as_a_header(mura):
    set_lines(mura, 'train_labeled_studies.csv', ['path,label'] + lines_of(mura, 'train_labeled_studies.csv'))
    df, probs = check_data(mura)
    assert probs.problem.tolist() == ["train_labeled_studies.csv line 1: 'path,label' looks like a header line"]
    assert len(df) == N_IMAGES and "have no header line; delete it" in raised(mura)


def test_zero_filled_tail_of_a_crashed_write_is_reported_per_line(mura):
    f = mura/'train_image_paths.csv'
    f.write_bytes(f.read_bytes() + b'\x00' * 40 + b'\n' + b'\x00' * 40)
    df, probs = check_data(mura)
    assert probs.problem.tolist() == [f'train_image_paths.csv line {k}: NUL bytes (a damaged file)' for k in (6, 7)]
    assert len(df) == N_IMAGES


# ---- images that pass a header check and do not decode

@pytest.mark.parametrize('how', ['truncated_stream', 'zero_idat', 'ihdr_too_tall'])
def test_png_with_intact_chunks_and_bad_pixels_is_caught_by_the_data_check(mura, how):
    f = image(mura)
    damaged_png(f, how)
    assert passes_verify(f)
    df, probs = check_data(mura)
    assert probs.kind.tolist() == ['undecodable'] and probs.path[0] == str(f)
    assert probs.problem[0].startswith('train_image_paths.csv line 1:') and len(df) == N_IMAGES - 1


def test_truncated_jpeg_with_a_png_name_is_caught_by_the_data_check(mura):
    f = image(mura)
    buf = io.BytesIO(); Image.open(f).resize((240, 180)).save(buf, 'JPEG')
    f.write_bytes(buf.getvalue()[:len(buf.getvalue()) * 3 // 4])  # past the header, into the entropy-coded data
    assert passes_verify(f)
    df, probs = check_data(mura)
    assert probs.kind.tolist() == ['undecodable'] and 'truncated' in probs.problem[0] and len(df) == N_IMAGES - 1


def test_cache_build_on_an_undecodable_image_names_it_and_leaves_nothing(mura, tmp_path):
    df = read_mura(mura, on_error='raise', check_images='verify', progress=False)  # the study's own, cheaper read
    damaged_png(image(mura), 'truncated_stream')
    with pytest.raises(OSError) as e: grey_cache(df.path, 16, tmp_path/'cache', progress=False)
    assert str(image(mura)) in str(e.value) and 'mura-study check-data' in str(e.value)
    assert list((tmp_path/'cache').iterdir()) == []


# ---- a full disk and a killed build while the grey cache is written

def many_images(dest: Path, n: int, side=32) -> list:
    dest.mkdir(parents=True, exist_ok=True)
    rng, out = np.random.default_rng(1), []
    for i in range(n):
        out.append(str(dest/f'{i}.png')); Image.fromarray(rng.integers(0, 255, (side, side), np.uint8)).save(out[-1])
    return out


@pytest.fixture
def small_disk(tmp_path):
    "A 2 MiB tmpfs, unmounted afterwards."
    d = tmp_path/'small'; d.mkdir()
    if os.geteuid() != 0: pytest.skip('mounting a tmpfs needs root')
    r = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=2m', 'tmpfs', str(d)], capture_output=True, text=True)
    if r.returncode: pytest.skip(f'mount -t tmpfs is not permitted here: {r.stderr.strip()}')
    try: yield d
    finally: subprocess.run(['umount', '-l', str(d)], check=False)


def build_in_child(paths, size, cache_dir, pre='', timeout=120):
    "Build a grey cache in a fresh Python process (a SIGBUS there cannot take pytest down)."
    code = (f"import sys\nfrom mura_study import data\n{pre}\n"
            f"try: data.grey_cache({paths!r}, {size}, {str(cache_dir)!r}, progress=False)\n"
            "except OSError as e: print(e, file=sys.stderr); sys.exit(1)\n")
    return subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, 'OMP_NUM_THREADS': '1'})


def test_cache_that_does_not_fit_fails_with_a_message_not_sigbus(small_disk, tmp_path):
    paths = many_images(tmp_path/'imgs', 40)  # 40 x 320 x 320 bytes = 3.9 MiB, on a 2 MiB disk
    r = build_in_child(paths, 320, small_disk)
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])  # a signal would be negative (SIGBUS: -7)
    assert f'No room for the grey cache in {small_disk}' in r.stderr and 'MiB' in r.stderr
    assert list(small_disk.iterdir()) == []


def test_disk_filled_after_the_space_check_is_an_error_not_sigbus(small_disk, tmp_path):
    "Another writer takes the space between the check and the writes: the reservation fails, cleanly."
    paths = many_images(tmp_path/'imgs', 40)
    lie = "import shutil; real = shutil.disk_usage; shutil.disk_usage = lambda p: real(p)._replace(free=1 << 40)"
    r = build_in_child(paths, 320, small_disk, pre=lie)
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    assert f'No room for the grey cache in {small_disk}' in r.stderr
    assert list(small_disk.iterdir()) == []


def test_rerun_after_a_killed_build_leaves_no_orphan(tmp_path):
    paths, cache = many_images(tmp_path/'imgs', 60, side=16), tmp_path/'cache'
    slow = "import time\n_load = data.load_grey\ndata.load_grey = lambda p, s: (time.sleep(0.05), _load(p, s))[1]"
    code = (f"from mura_study import data\n{slow}\n"
            f"data.grey_cache({paths!r}, 16, {str(cache)!r}, workers=1, progress=False)\n")
    p = subprocess.Popen([sys.executable, '-c', code], env={**os.environ, 'OMP_NUM_THREADS': '1'})
    try:
        t = time.time()
        while not list(cache.glob('*.partial.npy')) and time.time() - t < 60 and p.poll() is None: time.sleep(0.05)
        assert list(cache.glob('*.partial.npy')), 'the child never started its build'
        p.send_signal(signal.SIGKILL); p.wait(10)
    finally:
        if p.poll() is None: p.kill()
    c = grey_cache(paths, 16, cache, progress=False)
    assert c.status == 'built' and {f.name for f in cache.iterdir()} == {c.file.name, c.file.stem + '.json'}


# ---- deep grey: one scale, the declared bit depth

def grey16(f: Path, a: np.ndarray, sbit: int | None = None) -> Path:
    Image.fromarray(a.astype(np.uint16)).save(f)
    if sbit:
        ch = png_chunks(f.read_bytes())
        f.write_bytes(png_bytes(ch[:1] + [(b'sBIT', bytes([sbit]))] + ch[1:]))
    assert Image.open(f).mode == 'I;16'
    return f


def test_16bit_image_is_scaled_by_its_bit_depth_not_by_its_values(tmp_path):
    dim = np.full((16, 16), 200); bright = dim.copy(); bright[0, 0] = 256
    a = np.asarray(load_grey(grey16(tmp_path/'dim.png', dim), 16)).astype(int)
    b = np.asarray(load_grey(grey16(tmp_path/'bright.png', bright), 16)).astype(int)
    assert a.max() == round(200 * 255 / 65535)  # 200 of 65535 is nearly black
    assert np.array_equal(a[2:], b[2:])  # one brighter pixel changes nothing else


def test_sbit_chunk_declares_the_scale(tmp_path):
    a = np.full((16, 16), 1000)  # a 12-bit detector's value, saved in 16 bits
    out = np.asarray(load_grey(grey16(tmp_path/'s12.png', a, sbit=12), 16))
    assert out.max() == round(1000 * 255 / 4095)
    full = np.asarray(load_grey(grey16(tmp_path/'s16.png', a), 16))
    assert full.max() == round(1000 * 255 / 65535)


def test_32bit_grey_below_256_is_read_on_the_16bit_scale(tmp_path):
    f = tmp_path/'i.tif'
    Image.fromarray(np.full((16, 16), 200, np.int32)).save(f)
    assert np.asarray(load_grey(f, 16)).max() == round(200 * 255 / 65535)


# ---- read_mura frames in pandas joins

def test_concat_of_two_read_mura_frames_with_problems_works(tmp_path):
    a, b = write_mura(tmp_path/'a'), write_mura(tmp_path/'b')
    image(a).unlink(); image(b, 1).unlink()
    fa, fb = (read_mura(m, on_error='skip', progress=False) for m in (a, b))
    both = pd.concat([fa, fb], ignore_index=True)
    assert len(both) == 2 * (N_IMAGES - 1)
    assert len(data.problems(fa)) == 1 and data.problems(fa).kind[0] == 'missing'


def test_problems_survive_filtering_and_merging(mura):
    image(mura).unlink()
    df = read_mura(mura, on_error='skip', progress=False)
    train = df[df.split == 'train']
    assert len(data.problems(train)) == 1
    m = train.merge(df[['path', 'split']], on=['path', 'split'])
    assert len(m) == len(train) and data.problems(m).kind.tolist() == ['missing']
