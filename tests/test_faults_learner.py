"""Fault injection for the synthetic set and the learner: kills at several moments, nonsense settings, diverging
training, hostile and damaged model files. Each test is named after what it proves."""
import hashlib, json, os, re, signal, subprocess, sys, textwrap, time
from pathlib import Path

import pandas as pd
import pytest
import safetensors.torch as st
import torch
from fastai.callback.core import Callback
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from PIL import Image

from mura_study import learner
from mura_study.core import seed_everything
from mura_study.learner import load_model, mura_learner, mura_model, save_model, train
from mura_study.synth import make_mura

torch.set_num_threads(1)
ENV = dict(os.environ, OMP_NUM_THREADS='1', PYTHONHASHSEED='0')
N, SIZE = 40, 128  # about 130 images: a second or two of rendering, long enough to kill in the middle


def digest(root: Path) -> dict:
    "sha256 of every file under `root`, hidden ones included."
    files = [p for p in sorted(root.rglob('*')) if p.is_file()]
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture(scope='module')
def reference(tmp_path_factory) -> dict:
    "The files of an uninterrupted run: what every interrupted and resumed run must end with."
    return digest(make_mura(tmp_path_factory.mktemp('ref'), N, SIZE, seed=0, n_workers=2, progress=False))


# ---------------------------------------------------------------- killing make_mura

MAKE = ("import sys; from mura_study.synth import make_mura; "
        "make_mura(sys.argv[1], {n}, {size}, seed=0, n_workers={w}, progress=False)")


def children(pid: int) -> set:
    "Processes whose parent is `pid`, from /proc."
    out = set()
    for p in Path('/proc').iterdir():
        if not p.name.isdigit(): continue
        try: stat = (p/'stat').read_text()
        except OSError: continue
        if int(stat.rsplit(')', 1)[1].split()[1]) == pid: out.add(int(p.name))
    return out


def running(pid: int) -> bool:
    "Whether `pid` exists and is not a zombie."
    try: return (Path('/proc')/str(pid)/'stat').read_text().rsplit(')', 1)[1].split()[0] != 'Z'
    except OSError: return False


def pngs(root: Path) -> int:
    return sum(1 for _ in root.rglob('*.png')) if root.is_dir() else 0


class Maker:
    "`make_mura` in a subprocess; remembers its workers so that none is left behind, whatever the code under test does."
    def __init__(self, dest: Path, workers: int = 2, script: str | None = None):
        self.dest, self.root = dest, dest/'MURA-v1.1'
        code = script or MAKE.format(n=N, size=SIZE, w=workers)
        self.proc = subprocess.Popen([sys.executable, '-c', code, str(dest)], env=ENV, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        self.workers = set()

    def wait_until(self, cond, timeout: float = 60) -> bool:
        deadline = time.time() + timeout
        while time.time() < deadline and self.proc.poll() is None:
            self.workers |= children(self.proc.pid)
            if cond(): return True
            time.sleep(0.002)
        return False

    def kill(self, sig=signal.SIGKILL):
        assert self.proc.poll() is None, "make_mura finished before the test could interrupt it"
        self.workers |= children(self.proc.pid)
        self.proc.send_signal(sig); self.proc.wait(30)

    def survivors(self, within: float = 5) -> set:
        "Workers still running `within` seconds after the parent ended (then killed, so no test leaves orphans)."
        deadline = time.time() + within
        while time.time() < deadline and any(map(running, self.workers)): time.sleep(0.05)
        alive = {w for w in self.workers if running(w)}
        for w in alive: os.kill(w, signal.SIGKILL)
        return alive


@pytest.mark.parametrize('sig', [signal.SIGKILL, signal.SIGTERM], ids=['SIGKILL', 'SIGTERM'])
def test_killing_make_mura_leaves_no_worker_running(tmp_path, sig):
    m = Maker(tmp_path/'d')
    assert m.wait_until(lambda: pngs(m.root) >= 2 and len(m.workers) >= 2)
    m.kill(sig)
    assert m.workers and m.survivors() == set()


@pytest.mark.parametrize('sig', [signal.SIGKILL, signal.SIGTERM], ids=['SIGKILL', 'SIGTERM'])
def test_rerun_after_a_kill_once_images_exist_ends_byte_identical_to_an_uninterrupted_run(tmp_path, reference, sig):
    m = Maker(tmp_path/'d')
    assert m.wait_until(lambda: pngs(m.root) >= 10)
    m.kill(sig); m.survivors()
    assert 10 <= pngs(m.root) < sum(k.endswith('.png') for k in reference)
    assert digest(make_mura(tmp_path/'d', N, SIZE, seed=0, progress=False)) == reference


def test_rerun_after_a_kill_as_soon_as_the_folder_appears_ends_byte_identical(tmp_path, reference):
    m = Maker(tmp_path/'d')
    assert m.wait_until(lambda: m.root.is_dir(), timeout=60)
    m.kill(); m.survivors()
    assert digest(make_mura(tmp_path/'d', N, SIZE, seed=0, progress=False)) == reference


def test_rerun_after_two_kills_in_a_row_ends_byte_identical(tmp_path, reference):
    for at_least in (5, 40):
        m = Maker(tmp_path/'d')
        assert m.wait_until(lambda: pngs(m.root) >= at_least)
        m.kill(); m.survivors()
    assert digest(make_mura(tmp_path/'d', N, SIZE, seed=0, n_workers=0, progress=False)) == reference


HALF_PNG = textwrap.dedent("""
    import io, os, signal, sys
    from PIL import Image
    save, count = Image.Image.save, [0]
    def half_then_kill(self, fp, *args, **kwargs):
        count[0] += 1
        if count[0] < 4: return save(self, fp, *args, **kwargs)
        buf = io.BytesIO(); save(self, buf, *args, **kwargs)
        with open(fp, 'wb') as f: f.write(buf.getvalue()[:len(buf.getvalue())//2])
        if os.getppid() != PARENT: os.kill(os.getppid(), signal.SIGKILL)  # in a worker: the whole run dies
        os.kill(os.getpid(), signal.SIGKILL)
    Image.Image.save = half_then_kill
    PARENT = os.getppid()
    from mura_study.synth import make_mura
    make_mura(sys.argv[1], {n}, {size}, seed=0, n_workers={w}, progress=False)
""")


@pytest.mark.parametrize('workers', [0, 2], ids=['in-process', 'in-a-worker'])
def test_a_kill_in_the_middle_of_writing_a_png_leaves_no_partial_png_and_the_rerun_completes(tmp_path, reference,
                                                                                             workers):
    m = Maker(tmp_path/'d', script=HALF_PNG.format(n=N, size=SIZE, w=workers))
    m.wait_until(lambda: False, timeout=60)
    assert m.proc.returncode == -signal.SIGKILL
    m.survivors()
    for p in m.root.rglob('*.png'):
        with Image.open(p) as im: im.load()  # a half-written PNG raises here
    assert digest(make_mura(tmp_path/'d', N, SIZE, seed=0, progress=False)) == reference


def test_rerun_replaces_a_damaged_png_and_removes_leftover_temporary_files(tmp_path, reference):
    m = Maker(tmp_path/'d')
    assert m.wait_until(lambda: pngs(m.root) >= 10)
    m.kill(); m.survivors()
    first, second = sorted(m.root.rglob('*.png'))[:2]
    first.write_bytes(first.read_bytes()[:100])                          # as a power cut could leave them
    second.write_bytes(second.read_bytes()[:-1])
    (first.parent/'.image9.png.123-abcdef.tmp').write_bytes(b'\x89PNG half')
    assert digest(make_mura(tmp_path/'d', N, SIZE, seed=0, progress=False)) == reference


def test_a_folder_holding_only_a_half_written_settings_file_is_resumed(tmp_path, reference):
    "A kill while `make_mura` records its settings, its very first write, leaves only a temporary file."
    root = tmp_path/'d'/'MURA-v1.1'
    root.mkdir(parents=True)
    (root/'.synth.json.4242-0a1b2c.tmp').write_text('{"format": "mura_st')
    assert digest(make_mura(tmp_path/'d', N, SIZE, seed=0, progress=False)) == reference


def test_rerun_with_other_settings_is_refused_naming_the_settings_of_the_folder(tmp_path):
    m = Maker(tmp_path/'d')
    assert m.wait_until(lambda: pngs(m.root) >= 5)
    m.kill(); m.survivors()
    before = digest(m.root)
    for other in (dict(seed=1), dict(size=SIZE + 32), dict(n_patients=N + 1)):
        kw = dict(dict(n_patients=N, size=SIZE, seed=0), **other)
        with pytest.raises(FileExistsError, match=f'not empty.*n_patients={N}, size={SIZE}, seed=0'):
            make_mura(tmp_path/'d', progress=False, **kw)
    assert digest(m.root) == before


def test_a_finished_folder_is_refused_for_other_settings_and_kept_for_the_same(tmp_path, reference):
    root = make_mura(tmp_path/'d', N, SIZE, seed=0, progress=False)
    with pytest.raises(FileExistsError, match='seed=0'): make_mura(tmp_path/'d', N, SIZE, seed=3, progress=False)
    assert make_mura(tmp_path/'d', N, SIZE, seed=0, progress=False) == root and digest(root) == reference


@pytest.mark.parametrize('bad', [dict(n_patients=0), dict(n_patients=-5), dict(n_patients=1), dict(n_patients=2.5),
                                 dict(size=8), dict(size=-64), dict(seed=-1), dict(rgb_rate=2.0), dict(n_workers=-1)],
                         ids=lambda d: '-'.join(f'{k}={v}' for k, v in d.items()))
def test_nonsense_settings_raise_a_value_error_naming_them_before_anything_is_written(tmp_path, bad):
    kw = dict(dict(n_patients=N, size=SIZE, seed=0), **bad)
    name, value = next(iter(bad.items()))
    with pytest.raises(ValueError, match=f'make_mura: {name}={value}'):
        make_mura(tmp_path/'d', progress=False, **kw)
    assert not (tmp_path/'d').exists()


# ---------------------------------------------------------------- training settings and divergence

def toy_dls(n=32, size=32, bs=8, seed=0):
    "Random grey tensors, the abnormal ones brighter: a learner without images."
    g = torch.Generator().manual_seed(seed)
    ys = torch.arange(n) % 2
    xs = torch.randn(n, 1, size, size, generator=g) + ys.view(-1, 1, 1, 1).float()
    items = list(zip(xs, ys))
    cut = n*3//4
    return DataLoaders(DataLoader(items[:cut], bs=bs, shuffle=True, drop_last=True), DataLoader(items[cut:], bs=bs))


def toy_learner(seed=0):
    seed_everything(seed)  # the loaders' shuffling generators are drawn from Python's at creation
    return mura_learner(toy_dls(), 'mobilenetv2')


@pytest.fixture
def no_data(monkeypatch):
    "Any attempt to read images or build loaders fails the test."
    def read(*a, **k): raise AssertionError('data was read before the settings were checked')
    monkeypatch.setattr(learner, 'mura_dataloaders', read)


NONSENSE = [('lr', float('nan')), ('lr', float('inf')), ('lr', -1e-3), ('lr', 0.0), ('epochs', 0), ('epochs', 2.5),
            ('bs', 0), ('size', 16), ('size', '224')]


@pytest.mark.parametrize('name,value', NONSENSE, ids=[f'{k}={v}' for k, v in NONSENSE])
def test_fit_evaluate_refuses_nonsense_settings_before_reading_any_data(no_data, name, value):
    kw = dict(dict(arch='mobilenetv2', size=64, epochs=1, bs=8, lr=1e-2), **{name: value})
    cut = pd.DataFrame(dict(path=['x.png'], set=['train'], study=['s'], body_part=['HAND'], label=[0]))
    with pytest.raises(ValueError, match=re.escape(f'{name}={value!r}')):
        learner.fit_evaluate(cut, **kw)


@pytest.mark.parametrize('lr', [float('nan'), float('inf'), -1e-2], ids=['nan', 'inf', 'negative'])
def test_train_refuses_a_learning_rate_that_is_not_finite_and_positive_before_training(tmp_path, lr):
    with pytest.raises(ValueError, match='need a finite learning rate'):
        train(toy_learner(), 1, lr=lr, folder=tmp_path/'t')
    assert not (tmp_path/'t'/'best').exists()


@pytest.mark.parametrize('bad', [dict(size=16), dict(dropout=1.5), dict(l2=-1e-4), dict(l2=float('nan'))],
                         ids=lambda d: '-'.join(f'{k}={v}' for k, v in d.items()))
def test_mura_learner_refuses_nonsense_settings_naming_them(bad):
    name, value = next(iter(bad.items()))
    with pytest.raises(ValueError, match=f'{name}={value}'): mura_learner(toy_dls(), 'mobilenetv2', **bad)


def test_a_loss_that_turns_nan_stops_training_naming_epoch_and_batch_and_saves_nothing(tmp_path):
    with pytest.raises(FloatingPointError, match=r'epoch 0, batch 1 .*smaller learning rate'):
        train(toy_learner(), 2, lr=1e20, folder=tmp_path/'t')
    assert not (tmp_path/'t'/'best').exists() and not list((tmp_path/'t').glob('checkpoints/epoch*'))


class Poison(Callback):
    "Puts an infinity into one head weight after the training step `(epoch, iter)`."
    order = 90
    def __init__(self, epoch, it): self.at = (epoch, it)
    def after_step(self):
        it = self.iter if self.at[1] >= 0 else self.iter - self.n_iter
        if (self.epoch, it) == self.at:
            with torch.no_grad(): self.model.net[1][3].weight[0, 0] = float('inf')


def test_weights_poisoned_mid_epoch_stop_training_at_the_next_batch_and_keep_the_last_good_best(tmp_path):
    with pytest.raises(FloatingPointError, match='epoch 1, batch 1'):
        train(toy_learner(), 3, lr=1e-2, folder=tmp_path/'t', cbs=[Poison(1, 0)])
    best = load_model(tmp_path/'t'/'best')
    assert json.loads((tmp_path/'t'/'best'/'config.json').read_text())['metrics']['epoch'] == 0
    assert learner.nonfinite_weights(best) == []


def test_weights_poisoned_by_the_last_step_of_an_epoch_are_never_saved_as_best_or_checkpoint(tmp_path):
    with pytest.raises(FloatingPointError, match='after epoch 0 the weights hold NaN or infinity'):
        train(toy_learner(), 2, lr=1e-2, folder=tmp_path/'t', cbs=[Poison(0, -1)])
    assert not (tmp_path/'t'/'best').exists() and not list((tmp_path/'t').glob('checkpoints/epoch*'))


# ---------------------------------------------------------------- model files

@pytest.fixture(scope='module')
def saved(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return save_model(mura_model('mobilenetv2', 32), tmp_path_factory.mktemp('m')/'model', metrics=dict(kappa=0.5))


def copy_of(saved: Path, dest: Path, config: dict | None = None, tensors: dict | None = None,
            raw: bytes | None = None) -> Path:
    "A copy of the model folder `saved` with its config, its tensors or its weights file's bytes replaced."
    dest.mkdir(parents=True)
    text = (saved/'config.json').read_text() if config is None else json.dumps(config, indent=1)
    (dest/'config.json').write_text(text)
    meta = {k: hashlib.sha256((dest/'config.json').read_bytes()).hexdigest() for k in ['mura_study.config_sha256']}
    if tensors is not None: st.save_file(tensors, str(dest/'model.safetensors'), metadata=meta)
    elif raw is not None: (dest/'model.safetensors').write_bytes(raw)
    elif config is None: (dest/'model.safetensors').write_bytes((saved/'model.safetensors').read_bytes())
    else: st.save_file(st.load_file(str(saved/'model.safetensors')), str(dest/'model.safetensors'), metadata=meta)
    return dest


def test_save_model_refuses_a_model_whose_weights_hold_inf_and_writes_nothing(tmp_path):
    m = mura_model('mobilenetv2', 32)
    with torch.no_grad(): m.net[0].model.conv_stem.weight[0, 0, 0, 0] = float('inf')
    with pytest.raises(ValueError, match='not finite.*conv_stem.weight'): save_model(m, tmp_path/'m')
    assert not (tmp_path/'m').exists()


def test_load_model_refuses_config_keys_it_does_not_know(saved, tmp_path):
    cfg = json.loads((saved/'config.json').read_text()) | dict(extra_layer='dense', pretrained_url='http://x')
    with pytest.raises(ValueError, match=r"config.json: unknown keys \['extra_layer', 'pretrained_url'\]"):
        load_model(copy_of(saved, tmp_path/'m', config=cfg))


TIMM_FILE_OPTIONS = [dict(checkpoint_path='weights.pth'), dict(pretrained_cfg_overlay=dict(file='w.pth')),
                     dict(pretrained_cfg=dict(file='w.bin')), dict(features_only=True)]


@pytest.mark.parametrize('option', TIMM_FILE_OPTIONS, ids=lambda d: next(iter(d)))
def test_load_model_never_opens_a_file_named_by_timm_options_in_the_config(saved, tmp_path, monkeypatch, option):
    torch.save(mura_model('mobilenetv2', 32).net[0].model.state_dict(), tmp_path/'weights.pth')
    option = {k: (str(tmp_path/v) if isinstance(v, str) else v) for k, v in option.items()}
    cfg = json.loads((saved/'config.json').read_text())
    cfg['timm_kwargs'] = dict(cfg['timm_kwargs'], **option)
    folder = copy_of(saved, tmp_path/'m', config=cfg)
    def no_load(*a, **k): raise AssertionError('torch.load was called on a path from config.json')
    monkeypatch.setattr(torch, 'load', no_load)
    with pytest.raises(ValueError, match=f"timm_kwargs \\['{next(iter(option))}'\\].*never files"): load_model(folder)


@pytest.mark.parametrize('size', ['224', -1, 0, 2.5, True, 16, None], ids=repr)
def test_load_model_refuses_a_size_that_is_not_a_whole_number_of_pixels_from_32(saved, tmp_path, size):
    cfg = json.loads((saved/'config.json').read_text()) | dict(size=size)
    with pytest.raises(ValueError, match=f"config.json: size {size!r} is not a whole number"):
        load_model(copy_of(saved, tmp_path/'m', config=cfg))


@pytest.mark.parametrize('dtype', [torch.int32, torch.int64, torch.float16], ids=str)
def test_load_model_refuses_weights_of_another_dtype(saved, tmp_path, dtype):
    t = st.load_file(str(saved/'model.safetensors'))
    t['net.1.3.weight'] = t['net.1.3.weight'].to(dtype)
    with pytest.raises(ValueError, match=f'model.safetensors: .*net.1.3.weight is {dtype}'):
        load_model(copy_of(saved, tmp_path/'m', tensors=t))


def test_load_model_refuses_weights_holding_inf_or_nan(saved, tmp_path):
    t = st.load_file(str(saved/'model.safetensors'))
    t['net.1.3.weight'][0, 0], t['net.1.3.bias'][0] = float('inf'), float('nan')
    with pytest.raises(ValueError, match='model.safetensors: .*holds NaN or infinity') as e:
        load_model(copy_of(saved, tmp_path/'m', tensors=t))
    assert all(f'net.1.3.{k} holds NaN or infinity' in str(e.value) for k in ('weight', 'bias'))


@pytest.mark.parametrize('keep', [0.5, 0.01], ids=['half', 'header-only'])
def test_load_model_names_a_truncated_weights_file(saved, tmp_path, keep):
    raw = (saved/'model.safetensors').read_bytes()
    folder = copy_of(saved, tmp_path/'m', raw=raw[:int(len(raw)*keep)])
    with pytest.raises(ValueError, match=re.escape(f'{folder/"model.safetensors"}: not a whole safetensors file')):
        load_model(folder)


def test_load_model_refuses_weights_and_config_of_two_different_saves(saved, tmp_path):
    other = save_model(mura_model('mobilenetv2', 32, dropout=0.3), tmp_path/'other')
    folder = copy_of(saved, tmp_path/'m')
    (folder/'config.json').write_bytes((other/'config.json').read_bytes())
    with pytest.raises(ValueError, match='two different saves'): load_model(folder)


SAVE_KILLED = textwrap.dedent("""
    import os, pathlib, signal, sys, torch
    import safetensors.torch as st
    from mura_study.learner import load_model, mura_model, save_model
    dest, target = sys.argv[1], sys.argv[2]
    def half_then_kill(write):
        def cut(self_or_data, *args, **kwargs):
            name = str(self_or_data if write == 'text' else args[0])
            if target not in name: return orig[write](self_or_data, *args, **kwargs)
            data = args[0] if write == 'text' else b'x' * 10_000
            open(name, 'w' if write == 'text' else 'wb').write(data[:len(data)//2])
            os.kill(os.getpid(), signal.SIGKILL)
        return cut
    orig = dict(text=pathlib.Path.write_text, tensors=st.save_file)
    pathlib.Path.write_text, st.save_file = half_then_kill('text'), half_then_kill('tensors')
    torch.manual_seed(1)
    save_model(mura_model('mobilenetv2', 32, dropout=0.2), dest)
""")


@pytest.mark.parametrize('target', ['model.safetensors', 'config.json'])
def test_a_kill_while_save_model_overwrites_a_model_leaves_the_old_model_loadable(saved, tmp_path, target):
    folder = copy_of(saved, tmp_path/'m')
    out = subprocess.run([sys.executable, '-c', SAVE_KILLED, str(folder), target], env=ENV, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == -signal.SIGKILL, out.stderr[-2000:]
    back, old = load_model(folder), load_model(saved)
    assert back.config == old.config
    assert all(torch.equal(v, old.state_dict()[k]) for k, v in back.state_dict().items())


# ---------------------------------------------------------------- checkpoints

TRAIN = textwrap.dedent("""
    import json, os, signal, sys, torch
    import safetensors.torch as st
    torch.set_num_threads(1)
    sys.path.insert(0, os.path.dirname(sys.argv[2]))
    from test_faults_learner import toy_learner
    from mura_study.learner import train
    folder, kill_at = sys.argv[1], int(os.environ.get('KILL_AT_OPTIMIZER_SAVE', 0))
    orig, count = st.save_file, [0]
    def save_file(tensors, filename, *a, **k):
        if 'optimizer' in str(filename):
            count[0] += 1
            if count[0] == kill_at:
                open(filename, 'wb').write(b'half'); os.kill(os.getpid(), signal.SIGKILL)
        return orig(tensors, filename, *a, **k)
    st.save_file = save_file
    learn = toy_learner()
    with learn.no_bar(), learn.no_logging(): train(learn, 3, lr=1e-2, folder=folder, resume=True)
    head = learn.model.net[1][3].weight.sum().item()
    print(json.dumps(dict(history=learn.history.round(6).values.tolist(), head=head)))
""")


def test_a_kill_while_a_checkpoint_is_written_resumes_to_the_uninterrupted_result(tmp_path):
    "Epoch checkpoints were already written to a scratch folder and renamed: this guards that."
    script = tmp_path/'train.py'; script.write_text(TRAIN)
    run = lambda folder, **env: subprocess.run([sys.executable, str(script), str(folder), __file__],
                                               env=dict(ENV, **env), capture_output=True, text=True, timeout=300)
    straight = run(tmp_path/'a')
    assert straight.returncode == 0, straight.stderr[-2000:]
    killed = run(tmp_path/'b', KILL_AT_OPTIMIZER_SAVE='2')
    assert killed.returncode == -signal.SIGKILL
    assert [p.name for p in (tmp_path/'b'/'checkpoints').glob('epoch*')] == ['epoch000']
    resumed = run(tmp_path/'b')
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads(resumed.stdout) == json.loads(straight.stdout)


def test_resuming_from_a_damaged_checkpoint_names_it_and_the_fix(tmp_path):
    folder = tmp_path/'t'
    train(toy_learner(), 1, lr=1e-2, folder=folder)
    w = folder/'checkpoints'/'epoch000'/'model.safetensors'
    w.write_bytes(w.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r'epoch000: unreadable checkpoint .*resume=False'):
        train(toy_learner(), 1, lr=1e-2, folder=folder, resume=True)
