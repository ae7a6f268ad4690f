"Interpretation maps on tiny models: shapes and ranges, determinism, hand-computed scores, anatomy, the sanity checks."
import time
import numpy as np, pandas as pd, pytest, torch
from PIL import Image
from torch import nn
import torch.nn.functional as F

import json
from mura_study.data import GREY_MEAN, GREY_STD, anatomy_masks, has_anatomy, load_grey, read_boxes, read_mura, to_batch
from mura_study.learner import ARCHS, gradcam_layer, mura_model, save_model
from mura_study.synth import TISSUES, make_mura
from mura_study.interpret import (ANATOMY_COLUMNS, anatomy_energy, anatomy_summary, box_mask, boxes_to_model,
    cascade_blocks, cascade_curve, cascade_verdict, curve_auc, edge_maps, energy_pointing_game, explain,
    explain_to_files, faithfulness_table, finding_masks, gradcam, gradcam_saliency, gradient_maps, image_scores,
    layer_pointing, lime, overlay_grid, pick_cases, pick_gradcam_layer, plot_cascade, pointing_game, randomized_copy,
    rank_correlation, record_gradcam_layer, rise_curves, saliency, score_maps, target_layer, unit_maps)

SIZE = 32

class TinyCNN(nn.Module):
    "Two convolutions, global pooling, two logits."
    def __init__(self, size=SIZE):
        super().__init__(); self.size = size
        self.c1, self.c2 = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 8, 3, stride=2, padding=1)
        self.head = nn.Linear(8, 2)
    def forward(self, x): return self.head(F.relu(self.c2(F.relu(self.c1(x)))).mean((2, 3)))

class MeanModel(nn.Module):
    "P(abnormal) = mean brightness of the raw image in [0, 1]: deletion curves can be worked out by hand."
    def __init__(self, size): super().__init__(); self.size, self.dummy = size, nn.Parameter(torch.zeros(1))
    def forward(self, x):
        p = (x*GREY_STD + GREY_MEAN).mean((1, 2, 3)).clamp(1e-7, 1 - 1e-7)
        return torch.stack([torch.log1p(-p), torch.log(p)], 1)

@pytest.fixture(scope='module')
def model():
    torch.manual_seed(0); return TinyCNN().eval()

@pytest.fixture(scope='module')
def images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (4, 4), dtype=np.uint8)).resize((SIZE, SIZE), Image.BILINEAR)
            for _ in range(3)]

def check_maps(maps, n):
    assert maps.shape == (n, SIZE, SIZE) and maps.dtype == np.float32
    assert maps.min() >= 0 and maps.max() <= 1 and maps.max() == 1

def test_each_method_returns_unit_maps_in_image_coordinates(model, images):
    check_maps(gradcam(model, images), 3)
    check_maps(saliency(model, images), 3)
    check_maps(saliency(model, images, smooth=0.15, n_samples=4), 3)
    check_maps(lime(model, images[0], num_samples=40)[None], 1)
    check_maps(lime(model, images[0], num_samples=40, segmentation='slic')[None], 1)

def test_paths_go_through_load_grey(model, images, tmp_path):
    p = tmp_path/'wide.png'; Image.fromarray(np.full((20, 50), 200, np.uint8)).save(p)
    np.testing.assert_array_equal(gradcam(model, [p]), gradcam(model, [load_grey(p, SIZE)]))

def test_wrong_size_image_is_refused_with_the_fix(model):
    with pytest.raises(ValueError, match='load_grey'): gradcam(model, [Image.new('L', (SIZE+1, SIZE))])

def test_one_pass_maps_equal_captum_maps(model, images):
    cam, sal = gradcam_saliency(model, images)
    np.testing.assert_allclose(cam, gradcam(model, images), atol=1e-5)
    np.testing.assert_allclose(sal, saliency(model, images), atol=1e-5)

def test_gradient_maps_work_under_no_grad(model, images):
    with torch.no_grad(): check_maps(gradcam(model, images), 3); check_maps(saliency(model, images), 3)

def test_lime_same_seed_same_map(model, images):
    a, b = lime(model, images[1], num_samples=60, seed=3), lime(model, images[1], num_samples=60, seed=3)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, lime(model, images[1], num_samples=60, seed=4))

def test_explain_gives_every_method_and_the_images(model, images):
    out = explain(model, images, lime_samples=30, progress=False)
    assert set(out) == {'image', 'gradcam', 'saliency', 'lime'} and out['image'].dtype == np.uint8
    for m in ('gradcam', 'saliency', 'lime'): check_maps(out[m], 3)
    with pytest.raises(ValueError, match='shap'): explain(model, images, methods=('shap',))

def test_unit_maps_scale_each_map_and_zero_constant_ones():
    m = unit_maps(np.stack([np.arange(4.).reshape(2, 2), np.full((2, 2), 7.)]))
    np.testing.assert_allclose(m, [[[0, 1/3], [2/3, 1]], [[0, 0], [0, 0]]])

def test_box_mask_takes_pixels_whose_centre_is_inside():
    m = box_mask(np.array([[1, 1, 3, 3]]), 4)
    assert m.sum() == 4 and m[1:3, 1:3].all()

def test_pointing_game_hand_values():
    mask = box_mask(np.array([[1, 1, 3, 3]]), 4)[None].repeat(3, 0)
    maps = np.zeros((3, 4, 4)); maps[0, 1, 2] = 1; maps[1, 0, 0] = 1; maps[2, 0, 0] = maps[2, 2, 2] = 1
    np.testing.assert_allclose(pointing_game(maps, mask), [1, 0, 0.5])
    np.testing.assert_allclose(pointing_game(maps, mask, ties='hit'), [1, 0, 0])  # first maximum in raster order
    with pytest.raises(ValueError, match="'share' or 'hit'"): pointing_game(maps, mask, ties='max')

def test_pointing_games_score_the_finding_itself_one_and_a_flat_map_chance():
    mask = box_mask(np.array([[1, 1, 3, 3]]), 4)[None]
    for ties in ('share', 'hit'): np.testing.assert_allclose(pointing_game(mask.astype(float), mask, ties=ties), [1])
    flat = np.full((1, 4, 4), .3)
    np.testing.assert_allclose(pointing_game(flat, mask), [4/16])  # chance: the finding's share of the image
    np.testing.assert_allclose(pointing_game(flat, mask, ties='hit'), [0])  # the top-left pixel, off the box
    corner = box_mask(np.array([[0, 0, 1, 1]]), 4)[None]
    np.testing.assert_allclose(pointing_game(flat, corner, ties='hit'), [1])

def test_energy_pointing_game_hand_values():
    mask = box_mask(np.array([[0, 0, 2, 2]]), 4)[None].repeat(2, 0)
    maps = np.zeros((2, 4, 4)); maps[0, 0, 0], maps[0, 3, 3] = 3, 1
    np.testing.assert_allclose(energy_pointing_game(maps, mask), [0.75, 4/16])

def test_boxes_land_on_the_same_pixels_as_load_grey(tmp_path):
    a = np.zeros((120, 200), np.uint8); a[30:90, 120:160] = 255
    p = tmp_path/'box.png'; Image.fromarray(a).save(p)
    b = boxes_to_model(pd.DataFrame(dict(path=[str(p)], x0=[120], y0=[30], x1=[160], y1=[90])), 100)
    bright, mask = np.asarray(load_grey(p, 100)) > 127, box_mask(b, 100)
    assert (bright & mask).sum()/(bright | mask).sum() > 0.9
    assert b.content.iloc[0] == 100*60

def test_boxes_of_exif_turned_images_are_refused(tmp_path):
    exif = Image.Exif(); exif[0x0112] = 6
    p = tmp_path/'turned.png'; Image.new('L', (40, 20)).save(p, exif=exif)
    with pytest.raises(ValueError, match='EXIF orientation 6'):
        boxes_to_model(pd.DataFrame(dict(path=[str(p)], x0=[1], y0=[1], x1=[5], y1=[5])), 32)

def test_deletion_auc_hand_values():
    model, img = MeanModel(2), Image.fromarray(np.array([[255, 255], [0, 0]], np.uint8))
    good, bad = np.array([[2., 1.], [0., -1.]]), np.array([[-1., 0.], [1., 2.]])
    dgood, _ = rise_curves(model, img, good, steps=4, bs=8)
    np.testing.assert_allclose(dgood, [0.5, 0.25, 0, 0, 0], atol=1e-5)
    aucs = curve_auc(dgood), curve_auc(rise_curves(model, img, bad, steps=4, bs=8)[0])
    np.testing.assert_allclose(aucs, [0.125, 0.375], atol=1e-5)

def test_curve_auc_is_the_trapezoid_over_unit_interval():
    assert curve_auc(np.array([1., 0.])) == 0.5 and curve_auc(np.array([0., 1., 1.])) == 0.75

def test_randomisation_check_separates_a_real_map_from_a_model_free_one(images):
    torch.manual_seed(0)
    w = torch.zeros(2, SIZE*SIZE); w[1].view(SIZE, SIZE)[:SIZE//2, :SIZE//2] = torch.rand(SIZE//2, SIZE//2) + 1
    trained = nn.Sequential(nn.Flatten(), nn.Linear(SIZE*SIZE, 2)); trained[1].weight.data, trained.size = w, SIZE
    rnd = randomized_copy(trained, seed=1)
    assert not torch.equal(rnd[1].weight, trained[1].weight)
    real = rank_correlation(saliency(trained, images), saliency(rnd, images))
    model_free = rank_correlation(*[np.stack([np.asarray(i, np.float32) for i in images])]*2)
    assert np.abs(real).max() < 0.3 and (model_free == 1).all()
    assert rank_correlation(np.ones((1, 4, 4)), np.arange(16.).reshape(1, 4, 4))[0] == 0

def test_score_maps_table_with_boxes_chance_and_verdicts(model, tmp_path):
    rng, paths = np.random.default_rng(1), []
    for i in range(3):
        p = tmp_path/f'im{i}.png'; paths.append(str(p))
        Image.fromarray(rng.integers(0, 256, (40, 60), dtype=np.uint8)).save(p)
    boxes = pd.DataFrame(dict(path=paths[:2], x0=[0, 30], y0=[0, 10], x1=[30, 60], y1=[20, 40], kind='x'))
    s = score_maps({'tiny': model}, paths, boxes, n_boot=50, lime_samples=20, steps=8, progress=False)
    per = s.attrs['per_image']
    assert len(per) == 9 and per.pointing.notna().sum() == 6 and per.pointing_hit.notna().sum() == 6
    np.testing.assert_allclose(per.chance.dropna().unique(), [0.25, 0.375], atol=0.02)
    assert set(s.sanity) <= {'pass', 'fail'}
    assert set(s.score) >= {'pointing', 'pointing_hit', 'chance', 'deletion', 'rank_corr'}
    assert faithfulness_table(s).shape == (3, 10)

def test_image_scores_compare_every_method_with_one_random_baseline(model, tmp_path):
    p, rng = tmp_path/'im.png', np.random.default_rng(2)
    Image.fromarray(rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8)).save(p)
    s = image_scores(model, [p], lime_samples=20, steps=8, progress=False)
    assert list(s.method) == ['gradcam', 'saliency', 'lime'] and s.deletion_random.nunique() == 1
    assert s.pointing.isna().all() and s.chance.isna().all()  # no boxes: nothing to point at

def test_pick_cases_one_of_each_across_body_parts():
    preds = pd.DataFrame(dict(path=list('abcdefghi'), label=[1, 1, 0, 0, 1, 0, 1, 0, 0],
                              prob=[.9, .8, .7, .2, .1, .3, .95, .6, .1],
                              body_part=['WRIST', 'HAND', 'WRIST', 'HAND', 'ELBOW', 'ELBOW', 'WRIST', 'FINGER',
                                         'SHOULDER']))
    c = pick_cases(preds)
    assert list(c.case) == ['TP', 'FP', 'FN', 'TN'] and c.body_part.nunique() == 4

def test_overlay_grid_draws_cases_by_methods(model, tmp_path):
    p = tmp_path/'a.png'; Image.fromarray(np.full((SIZE, SIZE), 90, np.uint8)).save(p)
    cases = pd.DataFrame(dict(path=[str(p)]*2, case=['TP', 'FN'], body_part=['WRIST', 'HAND'], prob=[.9, .1]))
    fig = overlay_grid(model, cases, lime_samples=20, out=tmp_path/'grid.png', progress=False)
    assert len(fig.axes) == 8 + 1  # 2 cases x 4 columns, and the colour bar
    assert (tmp_path/"grid.png").stat().st_size > 0

class CostModel(nn.Module):
    "A model whose call costs `per_call` seconds plus `per_image` seconds for each image beyond `cheap` in the batch."
    def __init__(self, size, per_call, per_image, cheap=0):
        super().__init__(); self.size, self.dummy = size, nn.Parameter(torch.zeros(1))
        self.cost = per_call, per_image, cheap
    def forward(self, x):
        c, i, cheap = self.cost; time.sleep(c + i*max(0, len(x) - cheap)); return torch.zeros(len(x), 2)

def test_best_batch_size_takes_the_fastest_per_image_and_the_larger_of_near_ties():
    from mura_study.interpret import best_batch_size
    # up to 4 images ride free on a 4 ms call, beyond that each costs 4 ms: 4 is clearly fastest per image
    assert best_batch_size(CostModel(8, .004, .004, cheap=4), candidates=(1, 2, 4, 8, 16)) == 4
    # a fixed cost per call only: per-image time keeps falling, the largest batch wins
    assert best_batch_size(CostModel(9, .004, 0.), candidates=(1, 2, 4, 8)) == 8


class BlockCNN(nn.Module):
    "A network built of blocks, as timm's are: `blocks`, then a 1x1 convolution, a linear head."
    def __init__(self, size=SIZE):
        super().__init__(); self.size = size
        self.blocks = nn.Sequential(nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU()),
                                    nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()))
        self.conv_head, self.head = nn.Conv2d(8, 8, 1), nn.Linear(8, 2)
    def forward(self, x): return self.head(F.relu(self.conv_head(self.blocks(x))).mean((2, 3)))

def test_cascade_blocks_go_from_the_top_and_refuse_other_networks():
    net = BlockCNN()
    assert [n for n, _ in cascade_blocks(net)] == ['head', 'conv_head', 'blocks.1', 'blocks.0']
    assert cascade_blocks(net)[0][1] is net.head
    with pytest.raises(ValueError, match='built of blocks'): cascade_blocks(TinyCNN())

def test_cascade_fails_the_edge_control_and_moves_the_gradient_maps(images):
    torch.manual_seed(0); net = BlockCNN().eval(); before = {k: v.clone() for k, v in net.state_dict().items()}
    c = cascade_curve(net, images, seed=1)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())  # the model itself is left alone
    assert list(c.step.unique()) == [0, 1, 2, 3, 4] and set(c.method) == {'gradcam', 'saliency', 'edges'}
    np.testing.assert_allclose(c[c.step == 0][['spearman', 'ssim']], 1, atol=1e-6)
    np.testing.assert_allclose(c[c.method == 'edges'][['spearman', 'ssim']], 1, atol=1e-6)
    grad = c[(c.method != 'edges') & (c.step == c.step.max())]
    assert (grad.spearman < 0.9).all() and (grad.ssim < 0.9).all()
    v = cascade_verdict(c)
    assert v['edges'] == 'fail (1 draw)' and v['saliency'] == 'pass (1 draw)'
    assert len(plot_cascade(c.assign(arch='block')).axes) == 2

def test_edge_maps_ignore_the_model_and_find_edges():
    img = np.zeros((1, 8, 8), np.uint8); img[0, :, 4:] = 255
    e = edge_maps(img)
    assert e.max() == 1 and e[0, :, 3:5].min() > 0.5 and e[0, :, :2].max() == 0 and e[0, :, 6:].max() == 0


# ---- the anatomy as ground truth

def labelled_image():
    "A 4x4 label map: background on top, bone below, a 2x2 finding inside the bone, a marker pixel in the corner."
    lab = np.zeros((4, 4), np.uint8); lab[1:] = TISSUES.index('bone'); lab[1:3, 1:3] = TISSUES.index('finding')
    lab[0, 3] = TISSUES.index('marker')
    return lab

def test_anatomy_energy_of_the_finding_mask_is_one_and_of_a_constant_map_chance():
    lab = labelled_image()[None]
    own = anatomy_energy((lab == TISSUES.index('finding')).astype(np.float32), lab).set_index('tissue')
    assert own.loc['finding', 'energy'] == 1 and own.energy.sum() == pytest.approx(1)
    assert list(own.index) == list(TISSUES) and own.loc['finding', 'chance'] == 4/16
    for flat in (np.full((1, 4, 4), .4), np.zeros((1, 4, 4))):  # an all-zero map counts as uniform
        e = anatomy_energy(flat, lab)
        np.testing.assert_allclose(e.energy, e.chance, atol=1e-12)
    assert dict(zip(e.tissue, e.chance))['bone'] == 8/16 and dict(zip(e.tissue, e.chance))['marker'] == 1/16

def test_anatomy_energy_refuses_label_maps_that_do_not_fit():
    lab = labelled_image()[None]
    with pytest.raises(ValueError, match=r'data.anatomy_masks\(paths, size\)'): anatomy_energy(np.ones((1, 4, 5)), lab)
    with pytest.raises(ValueError, match='classes=TISSUES'): anatomy_energy(np.ones((1, 4, 4)), lab, classes=('a', 'b'))

def test_anatomy_summary_adds_the_distractors_and_intervals():
    lab = labelled_image(); lab[3, 0], lab[3, 3] = TISSUES.index('ring'), TISSUES.index('growth_plate')
    maps = np.zeros((3, 4, 4)); maps[0, 3, 0] = 1; maps[1, 3, 3] = 1; maps[2, 1, 1] = 1
    rows = anatomy_energy(maps, np.stack([lab]*3)).assign(arch='a', method='m')
    s = anatomy_summary(rows, n_boot=200, seed=0).set_index('tissue')
    assert s.loc['distractors', ['energy', 'chance']].tolist() == pytest.approx([2/3, 2/16])
    assert s.loc['finding', 'energy'] == pytest.approx(1/3) and s.loc['finding', 'energy_high'] == pytest.approx(1)
    assert s.loc['ring', 'energy_low'] <= s.loc['ring', 'energy'] <= s.loc['ring', 'energy_high']
    assert (s.n == 3).all() and not s.loc['bone', 'above_chance']

def test_scores_carry_the_energy_per_tissue_of_the_maps_they_scored(model, tmp_path):
    rng, paths = np.random.default_rng(3), []
    for i in range(2):
        p = tmp_path/f'im{i}.png'; paths.append(str(p))
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8)).save(p)
    lab = np.stack([np.kron(labelled_image(), np.ones((8, 8), np.uint8))]*2)
    boxes = pd.DataFrame(dict(path=paths, x0=[8, 8], y0=[8, 8], x1=[24, 24], y1=[24, 24], kind='x'))
    s = score_maps({'tiny': model}, paths, boxes, methods=('gradcam', 'saliency'), anatomy=lab, n_boot=50, steps=4,
                   progress=False)
    e = s.attrs['anatomy']
    assert len(e) == 2*2*len(TISSUES) and set(e.arch) == {'tiny'} and set(e.image) == set(paths)
    maps = explain(model, paths, methods=('saliency',), progress=False)['saliency']
    expected = anatomy_energy(maps, lab).energy.to_numpy()
    np.testing.assert_allclose(e[e.method == 'saliency'].energy.to_numpy(), expected, atol=1e-6)
    table = faithfulness_table(s, anatomy_summary(e, n_boot=50))
    assert [c for c in table.columns if c.startswith('energy_')] == [f'energy_{k}' for k in ANATOMY_COLUMNS]
    assert table.energy_finding.str.contains(' vs ').all()


# ---- Grad-CAM at the registry's two layers

@pytest.fixture(scope='module')
def study_net():
    torch.manual_seed(0); return mura_model('mobilenetv2', size=64).eval()

def test_target_layer_names_a_study_models_two_layers_and_refuses_fine_elsewhere(study_net, model):
    body = study_net.net[0].model
    assert target_layer(study_net) is target_layer(study_net, 'last') is body.get_submodule('bn2')
    assert target_layer(study_net, 'fine') is body.get_submodule(ARCHS['mobilenetv2'].gradcam_fine)
    assert target_layer(model, 'last') is model.c2
    with pytest.raises(ValueError, match='pass layer='): target_layer(model, 'fine')

def test_gradient_maps_at_both_layers_equal_the_single_maps(study_net, tmp_path):
    p = tmp_path/'a.png'; Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 80), np.uint8)).save(p)
    ims = [load_grey(p, 64)]*2
    g = gradient_maps(study_net, ims, methods=('gradcam_fine', 'saliency', 'gradcam_last'))
    assert list(g) == ['gradcam_fine', 'saliency', 'gradcam_last']
    for m, k in (('gradcam_fine', 'fine'), ('gradcam_last', 'last')):
        np.testing.assert_allclose(g[m], gradcam(study_net, ims, layer=k), atol=1e-5)
    np.testing.assert_allclose(g['saliency'], saliency(study_net, ims), atol=1e-5)
    assert set(explain(study_net, ims, methods=('gradcam_last', 'gradcam_fine'), progress=False)) == {
        'image', 'gradcam_last', 'gradcam_fine'}

def test_the_layer_is_picked_by_validation_hits_and_ties_keep_the_last_stage():
    rows = lambda last, fine: pd.DataFrame(dict(layer=['last']*2 + ['fine']*2, pointing_hit=[*last, *fine]))
    assert pick_gradcam_layer(rows([1, 0], [1, 1])) == 'fine'
    assert pick_gradcam_layer(rows([1, 0], [0, 1])) == 'last'
    assert pick_gradcam_layer(rows([1, 1], [0, 1])) == 'last'
    assert pick_gradcam_layer(pd.DataFrame(columns=['layer', 'pointing_hit'])) == 'last'

def test_layer_pointing_scores_both_layers_on_the_images_with_a_finding(study_net, tmp_path):
    paths = []
    for i in range(3):
        p = tmp_path/f'v{i}.png'; paths.append(str(p)); Image.fromarray(np.full((64, 64), 40*i, np.uint8)).save(p)
    boxes = pd.DataFrame(dict(path=paths[:2], x0=[0, 32], y0=[0, 32], x1=[32, 64], y1=[32, 64], kind='x'))
    masks = finding_masks(paths, boxes, 64)
    assert masks.shape == (3, 64, 64) and masks[:2].sum((1, 2)).tolist() == [32*32]*2 and not masks[2].any()
    lp = layer_pointing(study_net, paths, boxes)
    assert len(lp) == 4 and set(lp.path) == set(paths[:2]) and set(lp.layer) == {'last', 'fine'}
    assert lp.pointing.between(0, 1).all() and set(lp.pointing_hit) <= {0., 1.}

def test_the_chosen_layer_is_written_into_the_model_and_explain_reads_it(study_net, tmp_path):
    d = save_model(study_net, tmp_path/'m', metrics=dict(kappa=.5))
    before = json.loads((d/'config.json').read_text())
    m = record_gradcam_layer(d, 'fine')
    after = json.loads((d/'config.json').read_text())
    assert after.pop('explain') == dict(gradcam_layer='fine') and after == before and after['metrics'] == dict(kappa=.5)
    assert gradcam_layer(m) is m.net[0].model.get_submodule(ARCHS['mobilenetv2'].gradcam_fine)
    p = tmp_path/'x.png'; Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64), np.uint8)).save(p)
    np.testing.assert_allclose(explain(m, [p], methods=('gradcam',), progress=False)['gradcam'],
                               gradcam(m, [p], layer='fine'), atol=1e-6)
    js = explain_to_files(d, [p], tmp_path/'out', methods=('gradcam',), steps=4, progress=False)
    res = json.loads(js.read_text())
    assert res['model']['explain'] == dict(gradcam_layer='fine')
    assert record_gradcam_layer(d, 'last').config['explain'] == dict(gradcam_layer='last')
    with pytest.raises(ValueError, match="'last' or 'fine'"): record_gradcam_layer(d, 'blocks.4')


# ---- the cascading check on a trained model

def disk_films(n, rng, size=64):
    "Grey noise films; every other one (label 1) carries a bright disk at a random place: a task a model learns fast."
    yy, xx = np.mgrid[:size, :size]; ims = []
    for label in np.arange(n) % 2:
        a = rng.normal(90, 20, (size, size))
        if label:
            cy, cx = rng.integers(size//6, size - size//6, 2); a[(yy - cy)**2 + (xx - cx)**2 < (size//10)**2] = 230
        ims.append(Image.fromarray(a.clip(0, 255).astype(np.uint8)))
    return ims, torch.tensor(np.arange(n) % 2)

@pytest.fixture(scope='module')
def trained_disk_model():
    "A study MobileNetV2 (64 px, from scratch) trained until it finds the disk, and held-out films with a disk."
    ims, y = disk_films(256, np.random.default_rng(0)); x = to_batch(ims)
    torch.manual_seed(0); m = mura_model('mobilenetv2', size=64); opt = torch.optim.Adam(m.parameters(), 2e-3)
    m.train()
    for _ in range(60):
        i = torch.randint(0, len(x), (32,)); loss = F.cross_entropy(m(x[i]), y[i])
        opt.zero_grad(); loss.backward(); opt.step()
    held, hy = disk_films(32, np.random.default_rng(1))
    with torch.no_grad(): acc = (m.eval()(to_batch(held)).argmax(1) == hy).float().mean().item()
    return m, [im for im, label in zip(held, hy) if label][:8], acc

def test_the_chapters_rule_on_the_mean_of_four_draws_passes_gradcam_of_a_trained_model_and_fails_edges(
        trained_disk_model):
    model, films, acc = trained_disk_model
    assert acc >= 0.9  # the model has learned the task: its maps are worth checking
    g = gradient_maps(model, films, methods=('gradcam_last', 'gradcam_fine'))
    assert all(m.max() > m.min() for v in g.values() for m in v)  # no flat map: a pass would not be degenerate
    c = cascade_curve(model, films, methods=('gradcam_last', 'gradcam_fine', 'saliency', 'edges'), seed=0, draws=4)
    np.testing.assert_allclose(c[c.method == 'edges'][['spearman', 'ssim']], 1, atol=1e-6)
    v = cascade_verdict(c, max_rho=0.5, after=2)  # the chapter's rule: head and the next block random, below 0.5
    assert v.to_dict() == dict(gradcam_last='pass (mean of 4 draws)', gradcam_fine='pass (mean of 4 draws)',
                               saliency='pass (mean of 4 draws)', edges='fail (mean of 4 draws)')
    grad = c[c.method.str.startswith('gradcam') & (c.step > 0)]
    assert (grad.spearman < 0.9).all() and (grad.spearman_sd > 0).all()  # every step moves, and the draws differ


@pytest.fixture(scope='module')
def labelled_set(tmp_path_factory):
    "A tiny synthetic MURA with its label maps, and its findings' boxes."
    root = make_mura(tmp_path_factory.mktemp('mura'), n_patients=8, size=96, seed=0, n_workers=0, progress=False)
    return read_mura(root, progress=False), read_boxes(root)

def test_on_a_synthetic_set_the_finding_itself_points_at_its_box_and_holds_all_energy(labelled_set):
    df, boxes = labelled_set
    paths = list(dict.fromkeys(boxes[boxes.kind != 'hardware'].path))[:6]
    assert has_anatomy(paths) and len(paths) >= 3
    labels = anatomy_masks(paths, 64)
    finding = (labels == TISSUES.index('finding')).astype(np.float32)
    keep = finding.any((1, 2)); assert keep.sum() >= 3
    e = anatomy_energy(finding[keep], labels[keep])
    np.testing.assert_allclose(e[e.tissue == 'finding'].energy, 1)
    np.testing.assert_allclose(pointing_game(finding[keep], finding_masks(paths, boxes, 64)[keep]), 1)
    flat = anatomy_energy(np.ones_like(finding), labels)
    np.testing.assert_allclose(flat.energy, flat.chance, atol=1e-12)

def test_cascade_draws_average_independent_randomisations(images):
    torch.manual_seed(0); net = BlockCNN().eval()
    both = cascade_curve(net, images, methods=('gradcam', 'edges'), seed=1, draws=2)
    one, other = (cascade_curve(net, images, methods=('gradcam', 'edges'), seed=s) for s in (1, 1001))
    np.testing.assert_allclose(both.spearman, (one.spearman + other.spearman)/2, atol=1e-12)
    np.testing.assert_allclose(both.spearman_sd.fillna(0), np.abs(one.spearman - other.spearman)/np.sqrt(2), atol=1e-12)
    np.testing.assert_allclose(both.ssim_sd.fillna(0), np.abs(one.ssim - other.ssim)/np.sqrt(2), atol=1e-12)
    assert set(both.draws) == {2} and set(one.draws) == {1} and one.spearman_sd.isna().all()
    assert cascade_verdict(both).str.endswith(' (mean of 2 draws)').all()
    assert cascade_verdict(one.drop(columns='draws')).isin(['pass', 'fail']).all()
    with pytest.raises(ValueError, match='pass draws=1 or more'): cascade_curve(net, images, draws=0)
