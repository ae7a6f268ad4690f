"""Tuning: the baseline as trial 0, pruning at the same epoch, trials that keep their models, a search blind to the test
set, the learner chapter's model reused and never overwritten, workers sharing one study through SQLite and
PostgreSQL, exact totals, recovery from a killed worker, bad input."""
import json, os, shutil, signal, socket, subprocess, sys, tempfile, time
from pathlib import Path

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

from mura_study.core import DEFAULT_DROPOUT, DEFAULT_L2, DEFAULT_LR
from mura_study.learner import open_storage
from mura_study.tuning import *

ROOT = Path(__file__).resolve().parents[1]
PG_BIN = Path('/usr/lib/postgresql/15/bin')
optuna.logging.set_verbosity(optuna.logging.WARNING)


def slow_fit(params, report, trial):
    "A stand-in for training: two epochs of `TUNING_TEST_SECONDS` each; records which process ran it."
    seconds = float(os.environ.get('TUNING_TEST_SECONDS', '0.3'))
    if log := os.environ.get('TUNING_TEST_LOG'):
        with open(log, 'a') as f: f.write(f"{os.getpid()}\n")
    score = 1 - (params['dropout'] - 0.3)**2 - 0.01*abs(params['lr'] - 1e-3)
    for epoch in (1, 2):
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


def baselines(trials):
    return [(t.number, t.state) for t in trials if t.user_attrs.get('baseline')]


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
    assert [b for b in baselines(trials) if b[1] != TrialState.FAIL] == [(0, TrialState.COMPLETE)]  # one baseline
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
        done = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
        if done >= 2 and any(t.state == TrialState.RUNNING for t in trials): break
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
    assert baselines(after.values()) == [(0, TrialState.COMPLETE)]           # the resumed study kept its one baseline


def never_fit(params, report, trial): raise AssertionError("training started despite bad input")


def test_bad_input_fails_before_any_training(tmp_path):
    url = f"sqlite:///{tmp_path/'tuning.db'}"
    with pytest.raises(ValueError, match='Unknown hyperparameter'):
        tune(None, 'toy', 2, url, fit=never_fit, space={'momentum': (0.8, 0.99)})
    with pytest.raises(ValueError, match='Unknown metric'):
        tune(None, 'toy', 2, url, fit=never_fit, metric='auc')
    with pytest.raises(ValueError, match='not a point of the search space'):
        tune(None, 'toy', 2, url, fit=never_fit, space={'lr': (1e-4, 1e-3)})    # the baseline's 1e-2 left out
    with pytest.raises(ValueError, match='or a custom fit'):
        tune(None, 'toy', 2, url)
    t0 = time.time()
    with pytest.raises(ConnectionError, match='Cannot open the study database'):
        tune(None, 'toy', 2, f"postgresql://nobody@127.0.0.1:{free_port()}/none", fit=never_fit)
    assert time.time() - t0 < 30
    tune(None, 'toy', 1, url, study_name='s', fit=lambda p, r, t: 0.5)
    with pytest.raises(ValueError, match="arch: 'toy' in the study, 'vgg19' asked"):
        tune(None, 'vgg19', 2, url, study_name='s', fit=never_fit)
    with pytest.raises(ValueError, match="metric: 'f1' in the study, 'kappa' asked"):
        tune(None, 'toy', 2, url, study_name='s', metric='kappa', fit=never_fit)
    with pytest.raises(ValueError, match="space"):
        tune(None, 'toy', 2, url, study_name='s', space={'dropout': 0.5}, fit=never_fit)


def test_rerun_of_a_finished_study_adds_no_trial(tmp_path):
    url = f"sqlite:///{tmp_path/'tuning.db'}"
    s = tune(None, 'toy', 3, url, fit=lambda p, r, t: p['dropout'])
    assert len(s.trials) == 3
    assert len(tune(None, 'toy', 3, url, fit=never_fit).trials) == 3
    more = tune(None, 'toy', 5, url, fit=lambda p, r, t: p['dropout'])
    assert sum(t.state == TrialState.COMPLETE for t in more.trials) == 5


def test_the_baseline_is_trial_0_and_can_win(tmp_path):
    url = f"sqlite:///{tmp_path/'tuning.db'}"
    def near_baseline(p, report, trial):  # best exactly at the untuned setting
        decades = abs(np.log10(p['lr']/DEFAULT_LR)) + abs(np.log10(p['l2']/DEFAULT_L2))
        return -decades - abs(p['dropout'] - DEFAULT_DROPOUT)
    s = tune(None, 'toy', 4, url, fit=near_baseline)
    assert s.trials[0].user_attrs['baseline'] and s.trials[0].params == BASELINE
    assert BASELINE == dict(lr=DEFAULT_LR, dropout=DEFAULT_DROPOUT, l2=DEFAULT_L2)
    assert not any(t.user_attrs.get('baseline') for t in s.trials[1:])
    base, winner = baseline_and_winner(s)
    assert base.number == winner.number == 0 and trial_config(s) == BASELINE
    flat = optuna.create_study(direction='maximize')
    flat.optimize(lambda t: 0.5 + 0*t.suggest_float('x', 0, 2), n_trials=1)
    enqueue_baseline(flat, {'x': 1.0})                                        # a baseline put back after trial 0
    flat.optimize(lambda t: 0.5 + 0*t.suggest_float('x', 0, 2), n_trials=1)
    assert baseline_and_winner(flat)[1].number == 1 != flat.best_trial.number  # a tie keeps the baseline
    pinned = tune(None, 'toy', 1, url, study_name='pinned', space={'dropout': 0.3}, fit=lambda p, r, t: 0.5)
    assert pinned.trials[0].params == {'lr': DEFAULT_LR, 'l2': DEFAULT_L2}    # pinned values are not enqueued
    assert trial_config(pinned, pinned.trials[0]) == {'lr': DEFAULT_LR, 'dropout': 0.3, 'l2': DEFAULT_L2}


def test_a_resumed_study_does_not_enqueue_the_baseline_twice(tmp_path):
    url = f"sqlite:///{tmp_path/'tuning.db'}"
    fit = lambda p, r, t: p['dropout']
    tune(None, 'toy', 2, url, fit=fit)
    s = tune(None, 'toy', 4, url, fit=fit)
    assert len(s.trials) == 4 and baselines(s.trials) == [(0, TrialState.COMPLETE)]
    def lost_first(p, report, trial):  # the first baseline's worker dies
        if trial.number == 0: raise RuntimeError("worker lost")
        return p['dropout']
    with pytest.raises(RuntimeError, match='worker lost'):
        tune(None, 'toy', 3, url, study_name='lost', fit=lost_first)
    s = tune(None, 'toy', 3, url, study_name='lost', fit=lost_first)
    assert baselines(s.trials) == [(0, TrialState.FAIL), (1, TrialState.COMPLETE)]  # put back once, as the next trial
    assert s.trials[1].params == BASELINE and sum(t.state == TrialState.COMPLETE for t in s.trials) == 3


CURVES = {0.5: [0.2, 0.5, 0.9], 0.1: [0.3, 0.4, 0.45], 0.2: [0.1, 0.6, 0.95]}  # dropout -> value after epochs 1, 2, 3


def curve_fit(params, report, trial):
    for epoch, value in enumerate(CURVES[params['dropout']], 1): report(value, epoch)
    return CURVES[params['dropout']][-1]


def test_pruning_compares_trials_at_the_same_epoch(tmp_path):
    url = f"sqlite:///{tmp_path/'tuning.db'}"
    study = open_study(open_storage(url), 'race', {'arch': 'toy', 'metric': 'f1', 'space': space_attr(search_space())})
    enqueue_baseline(study, baseline_params(search_space()))
    for d in (0.1, 0.2): study.enqueue_trial(BASELINE | {'dropout': d})
    s = tune(None, 'toy', 3, url, study_name='race', fit=curve_fit)           # the default pruner
    assert [t.state for t in s.trials] == [TrialState.COMPLETE, TrialState.PRUNED, TrialState.PRUNED]
    # trial 1 is ahead of the baseline's epoch 1, though behind its final value: it goes on to the next rung, epoch 3
    assert list(s.trials[1].intermediate_values) == [1, 2, 3]
    # trial 2 is behind at epoch 1 and stops there, although it would have finished best
    assert list(s.trials[2].intermediate_values) == [1]
    cost = tuning_cost(s)
    assert cost.epochs_trained.tolist() == [3, 3, 1] and cost.baseline.tolist() == [True, False, False]
    assert list(cost.columns) == ['number', 'state', 'baseline', 'lr', 'dropout', 'l2', 'epochs_trained', 'seconds',
                                  'value', 'model'] and (cost.seconds >= 0).all()
    assert cost_summary(cost, 3) == dict(trials=3, epochs_trained=7, epochs_in_full=9, share=0.778,
                                         baseline_epochs_trained=3)


@pytest.fixture(scope='module')
def tiny_images(tmp_path_factory):
    from mura_study.synth import make_mura
    from mura_study.data import read_mura, protocol
    root = make_mura(tmp_path_factory.mktemp('synth'), n_patients=12, size=48, seed=0, n_workers=0, progress=False)
    return protocol(read_mura(root, progress=False), 'official', seed=0)


TINY = dict(size=32, bs=8)


def test_learner_trials_train_the_full_schedule_and_keep_their_models(tiny_images, tmp_path, monkeypatch):
    monkeypatch.setenv('MURA_STUDY_RUNS', str(tmp_path))
    url = f"sqlite:///{tmp_path/'tuning.db'}"
    s = tune(tiny_images, 'mobilenetv2', 2, url, study_name='kept', metric='kappa', name='t', epochs=2, **TINY,
             pruner=optuna.pruners.ThresholdPruner(lower=2.0))                # every value is below 2: prune at once
    base, pruned = s.trials
    assert (base.state, pruned.state) == (TrialState.COMPLETE, TrialState.PRUNED)  # the baseline is never pruned
    assert list(base.intermediate_values) == [1, 2] and list(pruned.intermediate_values) == [1]
    assert (base.user_attrs['epochs_trained'], pruned.user_attrs['epochs_trained']) == (2, 1)
    models = tmp_path/'t'/'models'
    assert (models/'kept-trial000'/'best').is_dir() and not (models/'kept-trial000'/'checkpoints').exists()
    assert not (models/'kept-trial001').exists()                              # a pruned trial keeps nothing
    kept = json.loads((models/'kept-trial000'/'best'/'config.json').read_text())['metrics']
    assert base.value == float(np.nan_to_num(kept['valid_kappa']))           # the kept model's validation kappa
    assert base.intermediate_values[kept['epoch'] + 1] == base.value and base.user_attrs['best_epoch'] == kept['epoch']
    assert 1e-5 <= pruned.params['lr'] <= 1e-1 and 0 <= pruned.params['dropout'] <= 0.7
    assert s.user_attrs['training'] == dict(epochs=2, size=32, bs=8, seed=0, pretrained=False)
    with pytest.raises(ValueError, match="training: .* in the study"):         # another schedule is another study
        tune(tiny_images, 'mobilenetv2', 3, url, study_name='kept', metric='kappa', name='t', epochs=3, **TINY)


def test_the_search_never_reads_the_test_rows(tiny_images, tmp_path, monkeypatch):
    monkeypatch.setenv('MURA_STUDY_RUNS', str(tmp_path))
    test = (tiny_images.set == 'test').to_numpy()
    blind = tiny_images.copy()
    absent = [str(tmp_path/'absent'/f'{i}.png') for i in range(test.sum())]
    blind.loc[test, 'path'], blind.loc[test, 'source'] = absent, absent  # `source`: the file an image is read from
    blind.loc[test, 'label'] = np.random.default_rng(1).permutation(blind.label[test].to_numpy())
    assert (blind.label[test] != tiny_images.label[test]).any()
    runs = [tune(df, 'mobilenetv2', 2, f"sqlite:///{tmp_path/f'{k}.db'}", study_name='blind', name=k, epochs=2,
                 cache_dir=tmp_path/'cache', pruner=optuna.pruners.NopPruner(), **TINY)
            for k, df in (('real', tiny_images), ('blind', blind))]
    seen = [[(t.params, t.value, t.intermediate_values) for t in s.trials] for s in runs]
    assert seen[0] == seen[1] and len(seen[0]) == 2
    res = compare_tuned(tiny_images, runs[0], name='real', n_boot=100)
    g = res['gain'].set_index('metric')
    assert g.loc['f1', 'valid_tuned'] >= g.loc['f1', 'valid_baseline']     # the winner is the best on validation


def test_compare_tuned_scores_the_kept_models_on_the_same_test_studies(tiny_images, tmp_path, monkeypatch):
    monkeypatch.setenv('MURA_STUDY_RUNS', str(tmp_path))
    url = f"sqlite:///{tmp_path/'tuning.db'}"
    alone = tune(tiny_images, 'mobilenetv2', 1, url, study_name='alone', name='c', epochs=1, **TINY)
    res = compare_tuned(tiny_images, alone, name='c', n_boot=100)
    g = res['gain']
    assert (g[['gain', 'gain_lo', 'gain_hi']].to_numpy() == 0).all() and (g.p_no_gain == 1).all()
    assert g.winner_is_baseline.all() and (g.winner_trial == 0).all() and (g.valid_tuned == g.valid_baseline).all()
    assert (tuning_table(g, 'mobilenetv2').verdict == 'search kept the baseline').all()
    learner_trials = learner_fit(tiny_images, 'mobilenetv2', epochs=1, name='c', **TINY)
    def rigged(p, report, trial):  # the other trial wins, whatever it scored
        value = learner_trials(p, report, trial)
        return value if trial.user_attrs.get('baseline') else value + 1
    s = tune(tiny_images, 'mobilenetv2', 2, url, study_name='rigged', name='c', fit=rigged,
             pruner=optuna.pruners.NopPruner())
    res = compare_tuned(tiny_images, s, name='c', n_boot=100)
    g = res['gain'].set_index('metric')
    test_studies = tiny_images[tiny_images.set == 'test'].study.nunique()
    assert len(res['baseline']['studies']) == len(res['tuned']['studies']) == test_studies
    assert list(res['baseline']['studies'].study) == list(res['tuned']['studies'].study)
    assert (g.winner_trial == 1).all() and not g.winner_is_baseline.any()
    assert (res['baseline']['trial'], res['tuned']['trial']) == (0, 1) and res['tuned']['params'] == s.trials[1].params
    assert abs(g.loc['f1', 'gain'] - (g.loc['f1', 'tuned'] - g.loc['f1', 'baseline'])) < 1e-12
    assert g.loc['kappa', 'valid_tuned'] == s.trials[1].user_attrs['valid_kappa']
    table = tuning_table(res['gain'], 'mobilenetv2')
    assert list(table.columns) == ['validation', 'baseline', 'tuned', 'gain', 'P(gain <= 0)', 'verdict']
    assert table.loc[('MobileNetV2', 'f1'), 'verdict'] in ('real gain', 'real loss', 'no clear difference')


def test_the_baseline_reuses_the_learner_chapters_model_and_never_overwrites_it(tiny_images, tmp_path, monkeypatch):
    from fastai.learner import Learner
    import torch
    from mura_study.learner import fit_evaluate, load_model
    monkeypatch.setenv('MURA_STUDY_RUNS', str(tmp_path))
    url = f"sqlite:///{tmp_path/'tuning.db'}"
    learn, _ = fit_evaluate(tiny_images, 'mobilenetv2', epochs=2, lr=DEFAULT_LR, seed=0, name='r',
                            tag='mobilenetv2-official', n_boot=20, **TINY)
    official = tmp_path/'r'/'models'/'mobilenetv2-official'
    files = lambda: {p: p.read_bytes() for p in sorted(official.rglob('*')) if p.is_file()}
    before = files()
    fits, fit = [], Learner.fit
    def counting_fit(self, *a, **k):
        fits.append(self.model.config['dropout']); return fit(self, *a, **k)
    monkeypatch.setattr(Learner, 'fit', counting_fit)
    s = tune(tiny_images, 'mobilenetv2', 2, url, name='r', epochs=2, baseline_tag='mobilenetv2-official',
             pruner=optuna.pruners.NopPruner(), **TINY)
    base, other = s.trials
    assert fits == [other.params['dropout']]                                  # only the other trial trained
    assert base.user_attrs['model'] == 'mobilenetv2-official' and base.user_attrs['epochs_trained'] == 0
    assert list(base.intermediate_values.values()) == learn.history.f1.fillna(0).tolist()
    assert base.value == base.user_attrs['valid_f1']
    assert base.user_attrs['best_epoch'] == learn.model.config['best_epoch']
    assert (tmp_path/'r'/'models'/trial_tag('mobilenetv2-f1', 1)/'best').is_dir()
    assert tuning_cost(s).epochs_trained.tolist() == [0, 2]
    assert cost_summary(tuning_cost(s), 2)['baseline_epochs_trained'] == 0
    with pytest.raises(ValueError, match='other settings'):                   # another schedule: train starts afresh
        tune(tiny_images, 'mobilenetv2', 1, url, study_name='other', name='r', epochs=1,
             baseline_tag='mobilenetv2-official', **TINY)
    with pytest.raises(ValueError, match='is not the baseline'):              # a pinned value: not the same setting
        tune(tiny_images, 'mobilenetv2', 1, url, study_name='pinned', name='r', epochs=2, space={'dropout': 0.3},
             baseline_tag='mobilenetv2-official', **TINY)
    assert fits == [other.params['dropout']] and files() == before            # nothing trained, the model untouched
    # trained in a search of its own, the baseline is the learner chapter's model to the bit: same weights, same batches
    tune(tiny_images, 'mobilenetv2', 1, url, study_name='own', name='r', epochs=2, **TINY)
    theirs, ours = (load_model(tmp_path/'r'/'models'/tag/'best').state_dict() for tag in ('mobilenetv2-official',
                                                                                          'own-trial000'))
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in theirs)
