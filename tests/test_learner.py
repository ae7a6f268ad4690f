"""The learner chapter's promises: five architectures that train, pretrained weights that never wait for a network,
model files that round-trip and never unpickle, and training that resumes after kill -9."""
import json, os, pickle, signal, subprocess, sys, textwrap, time

import matplotlib.pyplot as plt
import numpy as np
import pytest
import safetensors.torch as st
import timm
import torch
from fastai.interpret import ClassificationInterpretation

from mura_study.data import mura_dataloaders, protocol, read_mura, shared_test
from mura_study.data import load_grey, to_batch
from mura_study.learner import (ARCHS, fingerprint, gradcam_layer, inference_model, load_model, mura_learner,
                                mura_model, nearest_neighbour, predict, save_model, train, train_seeds)
from mura_study.metrics import compare_models, leak_bootstrap, study_frame
from mura_study.synth import make_mura

torch.set_num_threads(1)  # the test machine has 2 cores shared with other jobs; one thread each is fastest there
ENV = dict(os.environ, OMP_NUM_THREADS='1', PYTHONHASHSEED='0')


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    "A tiny synthetic MURA cut by the official protocol."
    root = make_mura(tmp_path_factory.mktemp('mura'), n_patients=16, size=96, seed=0, n_workers=0, progress=False)
    return root, protocol(read_mura(root, progress=False), 'official', seed=0)


@pytest.mark.parametrize('key', list(ARCHS))
def test_each_architecture_runs_forward_and_backward_at_64px_with_two_gradcam_layers(key):
    torch.manual_seed(0)
    model = mura_model(key, size=64)
    feats = {}
    for which in ('last', 'fine'):
        gradcam_layer(model, which).register_forward_hook(lambda m, i, o, w=which: feats.setdefault(w, o))
    logits = model(torch.randn(2, 1, 64, 64))
    assert logits.shape == (2, 2)
    for which in ('last', 'fine'):
        grad, = torch.autograd.grad(logits[:, 1].sum(), feats[which], retain_graph=True)
        assert grad.dim() == 4 and grad.abs().sum() > 0
    assert feats['fine'].shape[-1] == 2*feats['last'].shape[-1]  # the candidate is one stride finer
    logits.sum().backward()
    first = next(p for p in model.parameters() if p.dim() == 4)
    assert first.shape[1] == 1 and first.grad is not None and first.grad.abs().sum() > 0


def test_unknown_architecture_error_lists_the_known_ones():
    with pytest.raises(ValueError, match='known: vgg19, xception, mobilenetv2, convnext_base, densenet169'):
        mura_model('resnet50')


@pytest.mark.parametrize('key', ['mobilenetv2', 'xception'])
def test_pretrained_without_weights_offline_fails_within_5_seconds_saying_what_to_do(tmp_path, key):
    script = textwrap.dedent(f"""
        from mura_study.core import Timer
        from mura_study.learner import mura_model
        try:
            with Timer() as t: mura_model({key!r}, 64, pretrained=True)
        except FileNotFoundError as e: print(round(t.seconds, 2)); print(e)
        else: print('loaded')
    """)
    env = dict(ENV, HF_HOME=str(tmp_path/'hf'), HF_HUB_CACHE=str(tmp_path/'hf'/'hub'), TORCH_HOME=str(tmp_path/'torch'),
               HF_HUB_OFFLINE='1')
    out = subprocess.run([sys.executable, '-c', script], env=env, capture_output=True, text=True, timeout=120)
    secs, message = out.stdout.split('\n', 1)
    assert float(secs) < 5, out.stdout
    assert 'pretrained=False' in message and 'timm.create_model' in message
    assert "weights='path/to/model.safetensors'" in message


def test_local_safetensors_weights_are_loaded_and_summed_to_one_channel(tmp_path):
    torch.manual_seed(0)
    rgb = timm.create_model('mobilenetv2_100', pretrained=False)
    st.save_file({k: v.contiguous() for k, v in rgb.state_dict().items()}, str(tmp_path/'w.safetensors'))
    model = mura_model('mobilenetv2', 64, pretrained=True, weights=tmp_path/'w.safetensors')
    grey = model.net[0].model.conv_stem.weight
    assert torch.allclose(grey, rgb.conv_stem.weight.sum(1, keepdim=True))
    assert torch.equal(model.net[0].model.blocks[3][0].conv_pw.weight, rgb.blocks[3][0].conv_pw.weight)
    with pytest.raises(ValueError, match='must be a .safetensors file'):
        mura_model('mobilenetv2', 64, pretrained=True, weights=tmp_path/'w.pth')


def test_save_load_predict_round_trip_gives_identical_probabilities(tiny, tmp_path):
    root, cut = tiny
    torch.manual_seed(0)
    learn = mura_learner(mura_dataloaders(cut, size=32, bs=8, device='cpu', progress=False), 'mobilenetv2', dropout=0.3)
    train(learn, 1, lr=1e-3, folder=tmp_path/'train')
    rows = cut[cut.set == 'test']
    before = predict(learn, rows)
    back = load_model(save_model(learn, tmp_path/'model'))
    after = predict(back, rows)
    assert np.array_equal(before.prob.to_numpy(), after.prob.to_numpy()) and before.prob.notna().all()
    assert (back.arch.key, back.size, back.config['dropout'], back.config['epochs']) == ('mobilenetv2', 32, 0.3, 1)
    eps = lambda m: {x.eps for x in m.modules() if isinstance(x, torch.nn.BatchNorm2d)}
    assert eps(learn.model) == eps(back) == {1e-3}  # from scratch: Keras's batch-norm epsilon, kept on reload


def test_fastai_learn_predict_on_an_image_file_gives_the_probability_of_predict(tiny):
    "fastai's one-image `learn.predict(path)` and the study's batched `predict` agree on the study's grey learners."
    root, cut = tiny
    torch.manual_seed(0)
    learn = mura_learner(mura_dataloaders(cut, size=32, bs=8, device='cpu', progress=False), 'mobilenetv2')
    path = cut[cut.set == 'test'].path.iloc[0]
    label, idx, probs = learn.predict(path)
    assert label == ['normal', 'abnormal'][int(idx)]
    assert abs(probs[1].item() - predict(learn, [path]).prob.item()) < 1e-5


def test_fastai_classification_interpretation_shows_a_grey_learners_confusion_matrix_and_top_losses(tiny):
    "fastai's `ClassificationInterpretation`, which reads items back through `dls.test_dl`, works on our learners."
    root, cut = tiny
    torch.manual_seed(0)
    dls = mura_dataloaders(cut, size=32, bs=8, augment=False, device='cpu', progress=False)
    learn = mura_learner(dls, 'mobilenetv2')
    interp = ClassificationInterpretation.from_learner(learn)
    assert interp.confusion_matrix().sum() == len(learn.dls.valid_ds)
    interp.plot_top_losses(2, nrows=1, cmap='gray')
    learn.show_results(max_n=2, cmap='gray')
    plt.close('all')


def test_predict_on_the_folded_model_gives_the_trained_models_probabilities(tiny, tmp_path):
    "`predict` runs `inference_model` (batch norms folded): the model's own probabilities, the model left as it was."
    root, cut = tiny
    torch.manual_seed(0)
    learn = mura_learner(mura_dataloaders(cut, size=32, bs=8, device='cpu', progress=False), 'densenet169')
    train(learn, 1, lr=1e-3, folder=tmp_path/'train')  # batch-norm statistics that are not the defaults
    m, rows = learn.model.train(), cut[cut.set == 'test'].head(12)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    probs = predict(learn, rows, bs=5).prob.to_numpy()
    assert m.training and all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())
    n_bn = lambda net: sum(isinstance(x, torch.nn.BatchNorm2d) for x in net.modules())
    assert n_bn(inference_model(m)) < n_bn(m)
    m.eval()
    with torch.inference_mode(): own = m(to_batch([load_grey(p, 32) for p in rows.path])).softmax(-1)[:, 1].numpy()
    assert np.abs(probs - own).max() < 1e-4


def test_inference_model_folds_any_module_whole_and_leaves_unfoldable_ones_alone():
    "A plain module is folded whole (an attribute named `model` is not taken for a learner's); nothing to fold: itself."
    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
        def forward(self, x): return self.model(x) * 2 + 1
    torch.manual_seed(0)
    w = Wrapper().eval()
    bn = w.model[1]; bn.running_mean.uniform_(-1, 1); bn.running_var.uniform_(.5, 2); bn.weight.data.uniform_(.5, 2)
    x = torch.randn(3, 1, 8, 8)
    inf = inference_model(w)
    assert isinstance(inf, Wrapper) and inf is not w
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in inf.modules())
    with torch.inference_mode(): assert torch.allclose(inf(x), w(x), atol=1e-5)
    plain = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU())
    assert inference_model(plain) is plain


def test_pretrained_networks_keep_their_batchnorm_epsilon_and_the_head_starts_near_zero(tmp_path):
    rgb = timm.create_model('mobilenetv2_100', pretrained=False)
    st.save_file({k: v.contiguous() for k, v in rgb.state_dict().items()}, str(tmp_path/'w.safetensors'))
    pre = mura_model('mobilenetv2', 64, pretrained=True, weights=tmp_path/'w.safetensors')
    assert {m.eps for m in pre.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {1e-5}
    torch.manual_seed(0)
    head = mura_model('mobilenetv2', 64).net[1]  # the paper's head: pool, dropout, one linear layer
    assert [type(m).__name__ for m in head] == ['AdaptiveAvgPool2d', 'Flatten', 'Dropout', 'Linear']
    assert abs(head[-1].weight.std().item() - 0.01) < 0.001 and not head[-1].bias.any()


def test_predict_reports_unreadable_images_per_row(tiny, tmp_path):
    root, cut = tiny
    bad = tmp_path/'bad.png'
    bad.write_bytes(b'\x89PNG truncated')
    out = predict(mura_model('mobilenetv2', 32), [cut.path.iloc[0], bad, cut.path.iloc[1]], bs=2)
    assert out.prob.isna().tolist() == [False, True, False]
    assert out.error[1] is not None and 'bad.png' in out.error[1] and out.error[0] is None


class Payload:
    "Unpickling this creates a marker file: proof that the pickle ran."
    def __init__(self, marker): self.marker = str(marker)
    def __reduce__(self): return (os.makedirs, (self.marker,))


def test_malicious_pickle_is_refused_without_running_its_payload(tmp_path):
    marker = tmp_path/'payload_ran'
    evil = pickle.dumps(Payload(marker))
    for name in ('model.pkl', 'model.pth', 'model.pt', 'weights.bin'):
        (tmp_path/name).write_bytes(evil)
        with pytest.raises(ValueError, match='refusing to load a pickle'): load_model(tmp_path/name)
    folder = tmp_path/'export'; folder.mkdir()
    (folder/'export.pkl').write_bytes(evil)
    with pytest.raises(FileNotFoundError, match='not a mura_study model folder'): load_model(folder)
    disguised = tmp_path/'disguised'; disguised.mkdir()
    (disguised/'model.safetensors').write_bytes(evil)
    (disguised/'config.json').write_text(json.dumps(dict(arch='mobilenetv2', size=32)))
    with pytest.raises(Exception): load_model(disguised)
    assert not marker.exists()
    pickle.loads(evil)  # the payload is real: unpickling it does create the marker
    assert marker.exists()


RUN = textwrap.dedent("""
    import json, os, sys, time
    from pathlib import Path
    from fastai.callback.core import Callback
    from mura_study.core import seed_everything
    from mura_study.data import mura_dataloaders, protocol, read_mura, shared_test
    from mura_study.learner import evaluate, mura_learner, train
    root, folder = sys.argv[1], Path(sys.argv[2])

    class SlowSecondEpoch(Callback):
        "Gives the test time to kill the run in the middle of epoch 1; draws no random numbers."
        def after_batch(self):
            if self.epoch == 1 and os.environ.get('SLOW_SECOND_EPOCH'): time.sleep(0.4)

    seed_everything(0)
    cut = protocol(read_mura(root, progress=False), 'official', seed=0)
    learn = mura_learner(mura_dataloaders(cut, size=32, bs=8, seed=0, device='cpu', progress=False), 'mobilenetv2')
    with learn.no_bar(), learn.no_logging():
        train(learn, 3, lr=3e-3, folder=folder, resume=True, cbs=[SlowSecondEpoch()])
    res = evaluate(learn, cut[cut.set == 'test'], n_boot=200)
    print(json.dumps(dict(metrics=res['study_metrics'].value.round(3).tolist(),
                          probs=res['images'].prob.round(6).tolist(),
                          history=learn.history.drop(columns='epoch').round(6).values.tolist())))
""")


def _run(script, root, folder, **env):
    return subprocess.run([sys.executable, str(script), str(root), str(folder)], env=dict(ENV, **env),
                          capture_output=True, text=True, timeout=300)


def test_same_seed_twice_and_resume_after_sigkill_give_the_same_final_metrics(tiny, tmp_path):
    root, _ = tiny
    script = tmp_path/'run.py'
    script.write_text(RUN)
    first = _run(script, root, tmp_path/'a')
    assert first.returncode == 0, first.stderr[-2000:]
    again = _run(script, root, tmp_path/'b')
    assert json.loads(again.stdout) == json.loads(first.stdout)

    folder = tmp_path/'killed'
    proc = subprocess.Popen([sys.executable, str(script), str(root), str(folder)], env=dict(ENV, SLOW_SECOND_EPOCH='1'),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (folder/'checkpoints'/'epoch000').exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)  # inside epoch 1, which the callback slows to 0.4 s per batch
    proc.send_signal(signal.SIGKILL); proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert [p.name for p in (folder/'checkpoints').glob('epoch*')] == ['epoch000']  # killed mid-epoch 1

    resumed = _run(script, root, folder)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads(resumed.stdout) == json.loads(first.stdout)


def test_a_checkpoint_of_another_head_or_timm_options_is_not_resumed(tiny):
    root, cut = tiny
    learn = mura_learner(mura_dataloaders(cut, size=32, bs=8, device='cpu', progress=False), 'mobilenetv2')
    key = fingerprint(learn, 1, 1e-2)
    learn.model.config['head'] = 'fastai'
    assert fingerprint(learn, 1, 1e-2) != key
    learn.model.config.update(head='paper', timm_kwargs={})
    assert fingerprint(learn, 1, 1e-2) != key
    learn.model.config['timm_kwargs'] = {'bn_eps': 1e-3}
    assert fingerprint(learn, 1, 1e-2) == key


def test_the_memoriser_shows_a_large_inflation_under_paper_and_none_under_paper_clean(tmp_path):
    "The leak measure's positive control: a predictor that memorises is flattered by the leaky split only."
    root = make_mura(tmp_path/'mura', n_patients=200, size=96, seed=0, n_workers=0, progress=False)
    df = read_mura(root, progress=False)
    shared = shared_test(df)
    cuts = {p: protocol(df, p, seed=0) for p in ('paper', 'paper_clean')}
    own = {p: study_frame(nearest_neighbour(c[c.set == 'train'], c[c.set == 'test'])) for p, c in cuts.items()}
    on_shared = {p: study_frame(nearest_neighbour(c[c.set == 'train'], shared)) for p, c in cuts.items()}
    leak = leak_bootstrap(own, on_shared, metrics=('kappa',), n_boot=500).set_index('protocol')
    assert leak.own['paper'] > 0.9 and leak.inflation_lo['paper'] > 0.3 and leak.vs_ref_lo['paper'] > 0.3
    assert leak.inflation_lo['paper_clean'] < 0 < leak.inflation_hi['paper_clean']


def test_train_seeds_scores_each_seed_on_its_own_the_shared_and_the_valid_rows(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv('MURA_STUDY_RUNS', str(tmp_path))
    root, cut = tiny
    shared = shared_test(read_mura(root, progress=False))
    runs = train_seeds(cut, 'mobilenetv2', range(2), shared, tag='m', name='seeds', n_boot=20, size=32, epochs=1, bs=8,
                       lr=1e-3)
    assert [r['tag'] for r in runs] == ['m', 'm-seed1']
    assert all((tmp_path/'seeds'/'models'/r['tag']/'final'/'model.safetensors').is_file() for r in runs)
    assert all(r['shared'] is r['own'] for r in runs)  # the official protocol's test rows are the shared set
    assert set(runs[0]['valid']['images'].path) == set(cut.path[cut.set == 'valid'])
    rows = compare_models({'m': [r['shared']['studies'] for r in runs]}, n_boot=20)
    assert rows.n_seeds.unique().tolist() == [2] and rows.n_studies.unique().tolist() == [shared.study.nunique()]


def test_the_explanation_settings_travel_with_the_model_file_and_only_known_layers_are_read(tmp_path):
    model = mura_model('mobilenetv2', size=64)
    model.config['explain'] = dict(gradcam_layer='fine')
    loaded = load_model(save_model(model, tmp_path/'m'))
    assert gradcam_layer(loaded) is loaded.net[0].model.get_submodule(ARCHS['mobilenetv2'].gradcam_fine)
    assert gradcam_layer(loaded, 'last') is loaded.net[0].model.get_submodule('bn2')
    model.config['explain'] = dict(gradcam_layer='conv_stem')  # a layer is named by the registry, never by the file
    with pytest.raises(ValueError, match="explain .* is not"):
        load_model(save_model(model, tmp_path/'bad'))
