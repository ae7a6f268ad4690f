"""Tuning: workers sharing one study through SQLite and PostgreSQL, exact totals, recovery from a killed worker,
bad input."""
import json, os, shutil, signal, socket, subprocess, sys, tempfile, time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from mura_study.tuning import *

ROOT = Path(__file__).resolve().parents[1]
PG_BIN = Path('/usr/lib/postgresql/15/bin')
optuna.logging.set_verbosity(optuna.logging.WARNING)


def slow_fit(params, report):
    "A stand-in for training: two epochs of `TUNING_TEST_SECONDS` each; records which process ran it."
    seconds = float(os.environ.get('TUNING_TEST_SECONDS', '0.3'))
    if log := os.environ.get('TUNING_TEST_LOG'):
        with open(log, 'a') as f: f.write(f"{os.getpid()}\n")
    score = 1 - (params['dropout'] - 0.3)**2 - 0.01*abs(params['lr'] - 1e-3)
    for epoch in range(2):
        time.sleep(seconds); report(score, epoch)
    return score


def start_worker(url, study, n_trials, seed, tmp, seconds=0.3, heartbeat=1):
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(ROOT/'tests'), os.environ.get('PYTHONPATH', '')]),
           'TUNING_TEST_SECONDS': str(seconds), 'TUNING_TEST_LOG': str(tmp/'pids.log'),
           'MURA_STUDY_RUNS': str(tmp/'runs')}
    cmd = [str(Path(sys.executable).parent/'mura-study'), 'tune', '--storage', url, '--study', study,
           '--n-trials', str(n_trials), '--arch', 'toy', '--seed', str(seed),
           '--fit', 'test_tuning:slow_fit', '--heartbeat', str(heartbeat)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(p, timeout=150):
    out, _ = p.communicate(timeout=timeout)
    assert p.returncode == 0, out
    return out


def trials_of(url, study):
    return optuna.load_study(study_name=study, storage=open_storage(url)).get_trials(deepcopy=False)


def check_two_workers_share(url, tmp, n=8):
    workers = [start_worker(url, 'shared', n, seed, tmp) for seed in (1, 2)]
    outs = [finish(w) for w in workers]
    trials = trials_of(url, 'shared')
    counted = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(counted) == n, [(t.number, t.state) for t in trials]
    numbers = [t.number for t in trials]
    assert sorted(numbers) == list(range(len(trials)))                       # one number per trial, none twice
    assert all(t.user_attrs.get('surplus') for t in trials if t.state == TrialState.FAIL)
    assert not any(t.state == TrialState.RUNNING for t in trials)
    ran = (tmp/'pids.log').read_text().split()
    assert len(ran) == n and len(set(ran)) == 2, ran                         # both workers trained, n trials in all
    for out in outs: assert json.loads(out.strip().splitlines()[-1])['study'] == 'shared'


def test_two_workers_on_sqlite_finish_exactly_n_trials(tmp_path):
    check_two_workers_share(f"sqlite:///{tmp_path/'tuning.db'}", tmp_path)


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


@pytest.fixture
def postgres_url():
    if not (PG_BIN/'initdb').exists():
        pytest.skip(f"PostgreSQL binaries not found in {PG_BIN} (Debian package postgresql-15)")
    as_pg = ['runuser', '-u', 'postgres', '--'] if os.geteuid() == 0 else []  # initdb refuses to run as root
    d = Path(tempfile.mkdtemp(prefix='mura_pg_'))
    if as_pg: shutil.chown(d, 'postgres', 'postgres')
    port = free_port()
    run = lambda *a: subprocess.run(as_pg + [str(PG_BIN/a[0]), *a[1:]], check=True, capture_output=True, text=True)
    run('initdb', '-D', str(d/'data'), '-A', 'trust', '-U', 'postgres')
    run('pg_ctl', '-D', str(d/'data'), '-l', str(d/'log'), '-w',
        '-o', f"-p {port} -k {d} -c listen_addresses=127.0.0.1", 'start')
    try: yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        run('pg_ctl', '-D', str(d/'data'), '-m', 'immediate', 'stop')
        shutil.rmtree(d, ignore_errors=True)


def test_two_workers_on_postgresql_finish_exactly_n_trials(postgres_url, tmp_path):
    check_two_workers_share(postgres_url, tmp_path)


def test_killed_worker_loses_only_its_trial_and_rerun_completes(tmp_path):
    url, n = f"sqlite:///{tmp_path/'tuning.db'}", 5
    w = start_worker(url, 'killed', n, 1, tmp_path, seconds=1.0)
    deadline = time.time() + 90
    while time.time() < deadline:
        try: trials = trials_of(url, 'killed')
        except KeyError: trials = []                                          # study not created yet
        complete = sum(t.state == TrialState.COMPLETE for t in trials)
        if complete >= 2 and any(t.state == TrialState.RUNNING for t in trials): break
        time.sleep(0.2)
    w.send_signal(signal.SIGKILL); w.wait()
    before = trials_of(url, 'killed')
    killed = [t.number for t in before if t.state == TrialState.RUNNING]
    done = {t.number: (t.state, t.value) for t in before if t.state in (TrialState.COMPLETE, TrialState.PRUNED)}
    assert len(killed) == 1 and len(done) >= 2
    finish(start_worker(url, 'killed', n, 2, tmp_path, seconds=0.3))
    after = {t.number: t for t in trials_of(url, 'killed')}
    assert after[killed[0]].state == TrialState.FAIL                          # marked failed, not running forever
    assert all((after[k].state, after[k].value) == v for k, v in done.items())  # nothing finished was lost
    assert sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in after.values()) == n


def never_fit(params, report): raise AssertionError("training started despite bad input")


def test_bad_input_fails_before_any_training(tmp_path):
    url = f"sqlite:///{tmp_path/'tuning.db'}"
    with pytest.raises(ValueError, match='Unknown hyperparameter'):
        tune(None, 'toy', 2, url, fit=never_fit, space={'momentum': (0.8, 0.99)})
    with pytest.raises(ValueError, match='Unknown metric'):
        tune(None, 'toy', 2, url, fit=never_fit, metric='auc')
    t0 = time.time()
    with pytest.raises(ConnectionError, match='Cannot open the tuning database'):
        tune(None, 'toy', 2, f"postgresql://nobody@127.0.0.1:{free_port()}/none", fit=never_fit)
    assert time.time() - t0 < 30
    tune(None, 'toy', 1, url, study_name='s', fit=lambda p, r: 0.5)
    with pytest.raises(ValueError, match="arch: 'toy' in the study, 'vgg19' asked"):
        tune(None, 'vgg19', 2, url, study_name='s', fit=never_fit)
    with pytest.raises(ValueError, match="metric: 'f1' in the study, 'kappa' asked"):
        tune(None, 'toy', 2, url, study_name='s', metric='kappa', fit=never_fit)
    with pytest.raises(ValueError, match="space"):
        tune(None, 'toy', 2, url, study_name='s', space={'dropout': 0.5}, fit=never_fit)


def test_rerun_of_a_finished_study_adds_no_trial(tmp_path):
    url = f"sqlite:///{tmp_path/'tuning.db'}"
    s = tune(None, 'toy', 3, url, fit=lambda p, r: p['dropout'])
    assert len(s.trials) == 3
    assert len(tune(None, 'toy', 3, url, fit=never_fit).trials) == 3
    more = tune(None, 'toy', 5, url, fit=lambda p, r: p['dropout'])
    assert sum(t.state == TrialState.COMPLETE for t in more.trials) == 5


@pytest.fixture(scope='module')
def tiny_images(tmp_path_factory):
    from mura_study.synth import make_mura
    from mura_study.data import read_mura, protocol
    root = make_mura(tmp_path_factory.mktemp('synth'), n_patients=12, size=48, seed=0, n_workers=0, progress=False)
    return protocol(read_mura(root, progress=False), 'official', seed=0)


def test_learner_trials_report_each_epoch_and_get_pruned(tiny_images, tmp_path):
    url = f"sqlite:///{tmp_path/'tuning.db'}"
    s = tune(tiny_images, 'mobilenetv2', 2, url, study_name='pruned', seed=0, epochs=2, size=32, bs=8,
             pruner=optuna.pruners.ThresholdPruner(lower=2.0))               # every value is below 2: prune at once
    assert [t.state for t in s.trials] == [TrialState.PRUNED]*2
    assert all(list(t.intermediate_values) == [0] for t in s.trials)         # stopped after the first epoch
    s = tune(tiny_images, 'mobilenetv2', 1, url, study_name='kept', metric='kappa', seed=0, epochs=1, size=32, bs=8)
    t = s.trials[0]
    assert t.state == TrialState.COMPLETE and 0 <= t.value <= 1 and list(t.intermediate_values) == [0]
    assert 1e-5 <= t.params['lr'] <= 1e-1 and 0 <= t.params['dropout'] <= 0.7 and 1e-6 <= t.params['l2'] <= 1e-1


def test_tuned_and_baseline_are_retrained_alike_and_compared_on_the_same_test_studies(tiny_images, tmp_path,
                                                                                       monkeypatch):
    monkeypatch.setenv('MURA_STUDY_RUNS', str(tmp_path))
    res = compare_tuned(tiny_images, 'mobilenetv2', dict(lr=1e-3, dropout=0.2, l2=1e-4), epochs=1, size=32, bs=8,
                        name='t', n_boot=200)
    test_studies = tiny_images[tiny_images.set == 'test'].study.nunique()
    assert len(res['baseline']['studies']) == len(res['tuned']['studies']) == test_studies
    assert res['tuned']['params'] == dict(lr=1e-3, dropout=0.2, l2=1e-4) and res['baseline']['params']['lr'] > 0
    models = tmp_path/'t'/'models'
    assert (models/'mobilenetv2-tuned').is_dir() and (models/'mobilenetv2-baseline').is_dir()
    g = res['gain'].set_index('metric')
    assert abs(g.loc['f1', 'gain'] - (g.loc['f1', 'tuned'] - g.loc['f1', 'baseline'])) < 1e-12
    table = tuning_table(res['gain'], 'mobilenetv2')
    assert table.loc[('MobileNetV2', 'f1'), 'verdict'] in ('real gain', 'real loss', 'no clear difference')


def test_baseline_reuses_the_learner_chapters_model_instead_of_training_it_again(tiny_images, tmp_path, monkeypatch):
    from fastai.learner import Learner
    from mura_study.learner import fit_evaluate
    monkeypatch.setenv('MURA_STUDY_RUNS', str(tmp_path))
    fit_evaluate(tiny_images, 'mobilenetv2', size=32, epochs=1, bs=8, lr=1e-2, seed=0, name='r',
                 tag='mobilenetv2-official', n_boot=20)
    fits, fit = [], Learner.fit
    def counting_fit(self, *a, **k):
        fits.append(self.model.config['dropout']); return fit(self, *a, **k)
    monkeypatch.setattr(Learner, 'fit', counting_fit)
    res = compare_tuned(tiny_images, 'mobilenetv2', dict(lr=1e-3, dropout=0.2, l2=1e-4), epochs=1, size=32, bs=8,
                        name='r', n_boot=20, baseline_tag='mobilenetv2-official')
    assert fits == [0.2]                                                      # only the tuned model trained
    assert res['baseline']['params'] == dict(lr=1e-2, dropout=0.5, l2=0.0)
    assert not (tmp_path/'r'/'models'/'mobilenetv2-baseline').exists()
