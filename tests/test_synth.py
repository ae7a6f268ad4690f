"Synthetic MURA: determinism, the real MURA-v1.1 CSV rules, boxes, splits and image properties."
import hashlib, re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from mura_study.synth import BODY_PARTS, make_mura, plan_mura

N, SIZE = 60, 96


def digest(root: Path) -> dict:
    files = (p for p in sorted(root.rglob('*')) if p.is_file())
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture(scope='module')
def mura(tmp_path_factory) -> Path:
    return make_mura(tmp_path_factory.mktemp('a'), N, SIZE, seed=0, progress=False)


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
    on_disk = {str(p.relative_to(mura.parent)) for p in mura.rglob('*.png')}
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
    for p in mura.rglob('*.png'):
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
