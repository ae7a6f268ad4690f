"Synthetic MURA: determinism, the real MURA-v1.1 CSV rules, boxes, label maps, splits and image properties."
import hashlib, re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from mura_study.synth import BODY_PARTS, TISSUES, anatomy_path, make_mura, plan_mura, render_view, study_findings

N, SIZE = 60, 96


def digest(root: Path) -> dict:
    files = (p for p in sorted(root.rglob('*')) if p.is_file())
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture(scope='module')
def mura(tmp_path_factory) -> Path:
    return make_mura(tmp_path_factory.mktemp('a'), N, SIZE, seed=0, progress=False)


def images(root: Path) -> list:
    "The radiographs of a set, without its label maps."
    return sorted(root.glob('*/XR_*/*/*/*.png'))


def lines(root: Path, name: str) -> list:
    text = (root/name).read_text()
    assert text.endswith('\n') and '\r' not in text
    return text.splitlines()


def test_make_mura_returns_the_mura_folder(mura):
    assert mura.name == 'MURA-v1.1' and mura.is_dir()


def test_same_seed_gives_identical_bytes_with_any_worker_count(mura, tmp_path):
    again = make_mura(tmp_path, N, SIZE, seed=0, n_workers=0, progress=False)
    assert digest(again) == digest(mura)


def test_different_seed_gives_different_files(mura, tmp_path):
    other = make_mura(tmp_path, N, SIZE, seed=1, progress=False)
    a, b = digest(mura), digest(other)
    assert a != b
    assert sum(a[k] == b.get(k) for k in a if k.endswith('.png')) < len(a)//10


IMG = re.compile(r'^MURA-v1\.1/(train|valid)/XR_([A-Z]+)/(patient\d{5})/study(\d+)_(positive|negative)'
                 r'/image(\d+)\.png$')
STUDY = re.compile(r'^(MURA-v1\.1/(train|valid)/XR_[A-Z]+/patient\d{5}/study\d+_(positive|negative)/),([01])$')


@pytest.mark.parametrize('split', ['train', 'valid'])
def test_image_csv_follows_mura_rules(mura, split):
    rows = lines(mura, f'{split}_image_paths.csv')
    assert rows and not rows[0].startswith('path')                     # no header
    for r in rows:
        m = IMG.match(r)
        assert m, r
        assert m.group(1) == split and m.group(2) in BODY_PARTS
        assert (mura.parent/r).is_file(), r
    assert len(set(rows)) == len(rows)


@pytest.mark.parametrize('split', ['train', 'valid'])
def test_study_csv_follows_mura_rules(mura, split):
    images = lines(mura, f'{split}_image_paths.csv')
    studies = lines(mura, f'{split}_labeled_studies.csv')
    seen = set()
    for r in studies:
        m = STUDY.match(r)
        assert m, r                                                    # prefix, trailing slash, ,0|1
        assert m.group(2) == split and int(m.group(4)) == (m.group(3) == 'positive')
        assert (mura.parent/m.group(1)).is_dir()
        seen.add(m.group(1))
    assert len(seen) == len(studies)
    assert {i.rsplit('/', 1)[0] + '/' for i in images} == seen


def test_every_image_file_is_listed(mura):
    listed = set(lines(mura, 'train_image_paths.csv') + lines(mura, 'valid_image_paths.csv'))
    on_disk = {str(p.relative_to(mura.parent)) for p in images(mura)}
    assert on_disk == listed


def test_views_are_numbered_one_to_four(mura):
    paths = pd.Series(lines(mura, 'train_image_paths.csv') + lines(mura, 'valid_image_paths.csv'))
    views = paths.str.extract(r'/(.*)/image(\d+)\.png$').astype({1: int}).groupby(0)[1].agg(['min', 'max', 'size'])
    assert (views['min'] == 1).all() and (views['max'] == views['size']).all() and views['max'].max() <= 4


def test_boxes_lie_inside_their_images_and_only_in_abnormal_studies(mura):
    boxes = pd.read_csv(mura/'lesion_boxes.csv')
    assert list(boxes.columns) == ['path', 'x0', 'y0', 'x1', 'y1', 'kind']
    assert len(boxes) > 0 and set(boxes.kind) <= {'fracture', 'hardware', 'lesion'}
    for b in boxes.itertuples():
        assert '_positive/' in b.path and IMG.match(b.path)
        w, h = Image.open(mura.parent/b.path).size
        assert 0 <= b.x0 < b.x1 <= w and 0 <= b.y0 < b.y1 <= h, b


def test_most_abnormal_images_carry_a_box(mura):
    boxes = set(pd.read_csv(mura/'lesion_boxes.csv').path)
    pos = [p for p in lines(mura, 'train_image_paths.csv') if '_positive/' in p]
    assert sum(p in boxes for p in pos) > .8*len(pos)


def test_images_are_at_most_size_mostly_grey_some_rgb(mura):
    modes = []
    for p in images(mura):
        im = Image.open(p)
        assert max(im.size) <= SIZE and min(im.size) >= SIZE//3
        modes.append(im.mode)
    modes = pd.Series(modes).value_counts()
    assert set(modes.index) == {'L', 'RGB'} and modes['L'] > 10*modes['RGB']


def test_make_mura_refuses_a_non_empty_folder(mura):
    with pytest.raises(FileExistsError, match='not empty'):
        make_mura(mura.parent, 4, SIZE, progress=False)


@pytest.fixture(scope='module')
def plan() -> pd.DataFrame:
    return plan_mura(300, seed=0)


def test_every_body_part_is_in_both_splits(plan):
    for split in ('train', 'valid'):
        assert set(plan[plan.split == split].body_part) == set(BODY_PARTS)
    assert set(plan_mura(N, 0).query("split == 'valid'").body_part) == set(BODY_PARTS)


def test_no_patient_is_in_both_splits(plan):
    assert plan.groupby('patient').split.nunique().max() == 1


def test_some_patient_has_several_body_parts_and_several_studies(plan):
    assert plan.groupby('patient').body_part.nunique().max() > 1
    assert plan.study.max() > 1


def test_body_parts_and_labels_roughly_follow_mura(plan):
    big = plan_mura(2000, seed=0)
    share = big.body_part.value_counts(normalize=True)
    assert share['WRIST'] > share['HUMERUS'] and share['SHOULDER'] > share['FOREARM']
    studies = big.drop_duplicates(['patient', 'body_part', 'study'])
    assert .33 < studies.label.mean() < .5
    assert 1.5 < len(big)/len(studies) < 3.5


@pytest.mark.parametrize('kind', ['fracture', 'lesion', 'hardware'])
def test_each_finding_visibly_changes_its_box_at_128_px(kind):
    from mura_study.synth import render_view, study_findings
    k = 128/320
    for part in BODY_PARTS:
        for pid in (3, 4, 5):
            found = study_findings(seed=0, pid=pid, part=part, study=1, findings=kind, n_views=1)
            fs = [f | dict(views=(1,)) for f in found]
            im, boxes = render_view(part, fs, size=320, seed=0, pid=pid)
            plain, none = render_view(part, [], size=320, seed=0, pid=pid)       # same view, same noise, no finding
            assert none == [] and [b[-1] for b in boxes] == [kind]
            small = [np.asarray(i.resize((round(i.width*k), round(i.height*k)), Image.BILINEAR), float)
                     for i in (im, plain)]
            x0, y0, x1, y1, _ = (np.array(boxes[0][:4])*k).round().astype(int).tolist() + [kind]
            changed = np.abs(small[0] - small[1])[y0:y1, x0:x1] > 30
            assert changed.sum() >= 10, (part, pid, changed.sum())


# ---------------------------------------------------------------- label maps

def test_every_file_is_an_image_a_label_map_or_a_csv(mura):
    others = [p for p in mura.rglob('*') if p.is_file() and p.suffix != '.csv' and p.name != '.synth.json']
    assert sorted(others) == sorted(images(mura) + [anatomy_path(p) for p in images(mura)])


def test_label_maps_leave_the_images_byte_for_byte_as_without_them(mura, tmp_path):
    plain = make_mura(tmp_path, N, SIZE, seed=0, anatomy=False, progress=False)
    assert not (plain/'anatomy').exists()
    assert {k: v for k, v in digest(mura).items() if not k.startswith('anatomy/')} == digest(plain)
    fs = study_findings(seed=0, pid=5, part='WRIST', study=1, findings='fracture+hardware', n_views=1)
    with_map = render_view('WRIST', fs, size=200, pid=5, anatomy=True)
    without = render_view('WRIST', fs, size=200, pid=5)
    assert with_map[0].tobytes() == without[0].tobytes() and with_map[1] == without[1] and len(with_map) == 3


def test_each_image_has_a_one_channel_label_map_of_its_size_with_known_codes(mura):
    modes = set()
    for p in images(mura):
        im, lab = Image.open(p), Image.open(anatomy_path(p))
        modes.add(im.mode)
        assert lab.mode == 'L' and lab.size == im.size, p
        codes = np.unique(np.asarray(lab))
        assert codes.max() < len(TISSUES) and {0, 1, 2} <= set(codes.tolist()), (p, codes)
    assert modes == {'L', 'RGB'}  # RGB images too get one channel of codes


def box_check(lab: np.ndarray, boxes: list) -> tuple:
    "Finding and hardware pixels outside their kind's boxes, and the boxes that hold neither."
    inside = {k: np.zeros(lab.shape, bool) for k in ('finding', 'hardware')}
    for x0, y0, x1, y1, kind in boxes: inside['hardware' if kind == 'hardware' else 'finding'][y0:y1, x0:x1] = True
    code = {k: lab == TISSUES.index(k) for k in inside}
    stray = sum(int((code[k] & ~inside[k]).sum()) for k in inside)
    empty = [b for b in boxes if not (code['finding'] | code['hardware'])[b[1]:b[3], b[0]:b[2]].any()]
    return stray, empty


def test_finding_pixels_lie_in_their_boxes_and_every_box_holds_some(mura):
    "The rule: every finding (hardware) pixel is inside a fracture or lesion (hardware) box; no box is without one."
    table = pd.read_csv(mura/'lesion_boxes.csv')
    assert len(table)
    for p in images(mura):
        rel = str(p.relative_to(mura.parent))
        boxes = [(b.x0, b.y0, b.x1, b.y1, b.kind) for b in table[table.path == rel].itertuples()]
        lab = np.asarray(Image.open(anatomy_path(p)))
        assert box_check(lab, boxes) == (0, []), rel
        if not boxes: assert not np.isin(lab, [TISSUES.index('finding'), TISSUES.index('hardware')]).any(), rel


@pytest.mark.parametrize('size', [64, 512])
@pytest.mark.parametrize('kind', ['fracture', 'lesion', 'hardware'])
def test_finding_pixels_lie_in_their_boxes_at_any_size(kind, size):
    for part in BODY_PARTS:
        for pid in range(1, 6):
            fs = [f | dict(views=(1, 2)) for f in study_findings(seed=0, pid=pid, part=part, study=1, findings=kind,
                                                                 n_views=2)]
            im, boxes, lab = render_view(part, fs, size=size, pid=pid, view=1 + pid % 2, anatomy=True)
            assert lab.shape == im.size[::-1] and lab.dtype == np.uint8
            assert boxes and box_check(lab, boxes) == (0, []), (part, pid)


def test_incidental_details_get_their_own_classes():
    from mura_study.synth import patient_traits
    young = next(p for p in range(1, 500) if patient_traits(0, p)['young'])
    ringed = next(p for p in range(1, 500) if patient_traits(0, p)['ring'])
    codes = lambda part, pid: set(np.unique(render_view(part, size=256, pid=pid, anatomy=True)[2]).tolist())
    assert TISSUES.index('growth_plate') in codes('FOREARM', young)
    assert TISSUES.index('ring') in codes('FINGER', ringed)
    seen = set().union(*(codes(part, 1) for part in BODY_PARTS))
    assert {TISSUES.index(k) for k in ('background', 'soft_tissue', 'bone', 'joint', 'marker')} <= seen


def test_a_rerun_adds_missing_label_maps_and_leaves_the_images_untouched(mura, tmp_path):
    plain = make_mura(tmp_path, N, SIZE, seed=0, anatomy=False, progress=False)
    stamps = {p: p.stat().st_mtime_ns for p in images(plain)}
    again = make_mura(tmp_path, N, SIZE, seed=0, progress=False)
    assert digest(again) == digest(mura)
    assert {p: p.stat().st_mtime_ns for p in images(plain)} == stamps  # only the label maps were written
    first = anatomy_path(images(again)[0])
    first.write_bytes(first.read_bytes()[:-1])                            # a label map cut short
    assert digest(make_mura(tmp_path, N, SIZE, seed=0, progress=False)) == digest(mura)


def test_anatomy_path_mirrors_the_image_tree_and_refuses_other_paths():
    p = 'MURA-v1.1/valid/XR_ELBOW/patient11190/study1_positive/image3.png'
    assert anatomy_path(p) == Path('MURA-v1.1/anatomy/valid/XR_ELBOW/patient11190/study1_positive/image3.png')
    for bad in ('image1.png', 'MURA-v1.1/train_image_paths.csv', 'a/b/c/d/e/f.png'):
        with pytest.raises(ValueError, match='not an image path'): anatomy_path(bad)


# ---------------------------------------------------------------- a set of MURA's size

@pytest.fixture(scope='module')
def like_plan() -> pd.DataFrame:
    from mura_study.synth import plan_like
    return plan_like('mura-v1.1', seed=0)


def test_the_mura_plan_has_the_published_counts_exactly(like_plan):
    from mura_study.synth import LIKE
    studies = like_plan.drop_duplicates(['split', 'pid', 'body_part', 'study'])
    got = {s: (d.pid.nunique(), int((studies.split == s).sum()), len(d)) for s, d in like_plan.groupby('split')}
    assert got == dict(train=(11184, 13457, 36808), valid=(783, 1199, 3197))
    train = like_plan[like_plan.split == 'train'].groupby(['body_part', 'label']).size()
    assert {p: (int(train[p, 1]), int(train[p, 0])) for p in BODY_PARTS} == LIKE['mura-v1.1']['train']['images']
    valid = like_plan[like_plan.split == 'valid']
    assert valid.body_part.value_counts().to_dict() == LIKE['mura-v1.1']['valid']['images']
    assert int(valid.label.sum()) == 1530 and int((valid.label == 0).sum()) == 1667


def test_the_mura_plan_follows_the_layout_rules(like_plan):
    assert like_plan.path.is_unique and like_plan.groupby('patient').split.nunique().max() == 1
    assert like_plan.pid[like_plan.split == 'valid'].min() == 11185  # MURA's valid patients follow its train ones
    views = like_plan.groupby(['pid', 'body_part', 'study']).view.agg(['min', 'max', 'size'])
    assert (views['min'] == 1).all() and (views['max'] == views['size']).all() and views['max'].max() <= 4
    st = like_plan.drop_duplicates(['pid', 'body_part', 'study'])
    assert ((st.findings != '') == (st.label == 1)).all()
    assert like_plan.path.str.contains('_positive/').eq(like_plan.label == 1).all()


def test_the_mura_plan_is_seeded(like_plan):
    from mura_study.synth import plan_like
    with pytest.raises(ValueError, match='choose one of mura-v1.1'): plan_like('mura-v2')
    assert not plan_like('mura-v1.1', seed=1).findings.equals(like_plan.findings)


def test_a_slice_of_the_mura_sized_set_renders_at_mura_sizes(like_plan):
    for r in like_plan[like_plan.label == 1].groupby('body_part').head(1).itertuples():
        fs = study_findings(seed=0, pid=r.pid, part=r.body_part, study=r.study, findings=r.findings, n_views=r.n_views)
        im, boxes, lab = render_view(r.body_part, fs, size=512, seed=0, pid=r.pid, study=r.study, view=r.view,
                                     anatomy=True)
        assert 360 <= max(im.size) <= 512 and min(im.size) >= 150 and lab.shape == im.size[::-1], (r.path, im.size)
        assert all(0 <= b[0] < b[2] <= im.size[0] and 0 <= b[1] < b[3] <= im.size[1] for b in boxes)


def test_a_mura_sized_set_is_not_mixed_into_another_sets_folder(mura):
    with pytest.raises(FileExistsError, match='like=mura-v1.1'):
        make_mura(mura.parent, like='mura-v1.1', progress=False)
    with pytest.raises(ValueError, match="like='MURA'"): make_mura(mura.parent, like='MURA', progress=False)
