"""One study, many workers: the learner chapter's trainings are jobs of the run's study database; workers on SQLite and
on PostgreSQL complete each job once; a worker killed mid-job loses only the epoch it was in, and another resumes
the job from its checkpoint; a job's result is that of the single-process training."""
import os, signal, subprocess, sys, textwrap, time
from concurrent.futures import ThreadPoolExecutor

import pytest
import safetensors.torch as st
import torch

from mura_study.core import run_dir
from mura_study.data import protocol, read_mura, shared_test
from mura_study.learner import job_result, job_table, run_jobs, seed_jobs, submit_jobs, train_seeds, work
from mura_study.synth import make_mura
from test_tuning import postgres_url  # noqa: F401  (the fixture: a throwaway PostgreSQL cluster, skipped without one)

torch.set_num_threads(1)
ENV = dict(os.environ, OMP_NUM_THREADS='1', PYTHONHASHSEED='0')
TINY = dict(size=32, epochs=2, bs=8, lr=1e-2, n_boot=20)

WORKER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    from fastcore.basics import defaults
    from fastai.callback.core import Callback
    from mura_study.learner import work

    class SlowSecondEpoch(Callback):
        "Gives the test time to stop the worker inside epoch 1; draws no random numbers."
        def after_batch(self):
            if self.epoch == 1 and os.environ.get('SLOW_SECOND_EPOCH'): time.sleep(1.5)

    defaults.callbacks.append(SlowSecondEpoch)  # every learner of this process gets it
    rd, storage, ready = sys.argv[1], sys.argv[2] or None, Path(sys.argv[3])
    (ready/str(os.getpid())).touch()
    while len(list(ready.iterdir())) < int(sys.argv[4]): time.sleep(0.05)  # all workers start working together
    print('trained', work(rd, storage, device='cpu', progress=False), flush=True)
""")


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    "A tiny synthetic MURA: its folder, its images, and two protocols' cuts."
    root = make_mura(tmp_path_factory.mktemp('mura'), n_patients=12, size=48, seed=0, n_workers=0, progress=False)
    images = read_mura(root, progress=False)
    return root, images, {p: protocol(images, p, seed=0, n_images=40) for p in ('official', 'paper_clean')}


def grid(rd, tiny, seeds=range(2), protocols=('official', 'paper_clean')):
    "The jobs of mobilenetv2 under each protocol once per seed."
    root, _, cuts = tiny
    return [j for p in protocols for j in seed_jobs(cuts[p], 'mobilenetv2', seeds, rd, data=root, protocol_name=p,
                                                  split_seed=0, n_images=40, tag=f'mnv2-{p}', **TINY)]


def start_workers(rd, storage, n, tmp, **env):
    "`n` worker processes, one thread each, that start working together once all are ready."
    ready = tmp/f'ready-{time.time_ns()}'; ready.mkdir()
    script = tmp/'worker.py'; script.write_text(WORKER)
    return [subprocess.Popen([sys.executable, str(script), str(rd), storage or '', str(ready), str(n)],
                             env=dict(ENV, **env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for _ in range(n)]


def finish(p, timeout=120):
    out, _ = p.communicate(timeout=timeout)
    assert p.returncode == 0, out[-3000:]
    return int(out.split()[-1])


def check_two_workers_complete_each_job_once(rd, storage, tiny, tmp):
    jobs = grid(rd, tiny)
    submit_jobs(rd, jobs, storage, heartbeat=2)
    trained = [finish(w) for w in start_workers(rd, storage, 2, tmp)]
    t = job_table(rd, storage)
    assert sorted(t.tag[t.state == 'COMPLETE']) == sorted(j.tag for j in jobs), t  # each job completed, once
    assert (t.state == 'COMPLETE').all() and (t.epochs_trained == TINY['epochs']).all(), t  # none trained twice
    assert sum(trained) == len(jobs) and min(trained) >= 1, trained                   # both workers trained
    assert t.worker.nunique() == 2
    assert all((rd/'models'/j.tag/'final'/'model.safetensors').is_file() for j in jobs)
    assert work(rd, storage, progress=False) == 0                                     # nothing left


def test_two_workers_on_sqlite_complete_each_job_of_a_grid_once(tiny, tmp_path):
    check_two_workers_complete_each_job_once(run_dir('w', tmp_path/'runs'), None, tiny, tmp_path)


def test_two_workers_on_postgresql_complete_each_job_of_a_grid_once(postgres_url, tiny, tmp_path):  # noqa: F811
    check_two_workers_complete_each_job_once(run_dir('w', tmp_path/'runs'), postgres_url, tiny, tmp_path)


def wait_for(what, timeout=90):
    deadline = time.time() + timeout
    while (found := what()) is None:
        assert time.time() < deadline, "timed out"
        time.sleep(0.1)
    return found


def test_a_worker_lost_mid_job_loses_only_its_epoch_and_another_resumes_the_job(tiny, tmp_path):
    """Frozen in its job's second epoch (SIGSTOP), a worker's heartbeat stops: the job is failed and queued again;
    another worker (this process) takes it, waits on the folder's lock while the frozen one holds it, and resumes the
    job from its checkpoint once the frozen one is killed (SIGKILL)."""
    rd = run_dir('k', tmp_path/'runs')
    job, = grid(rd, tiny, seeds=[0], protocols=['official'])
    submit_jobs(rd, [job], heartbeat=1)
    first, = start_workers(rd, None, 1, tmp_path, SLOW_SECOND_EPOCH='1')
    ckpts = rd/'models'/job.tag/'checkpoints'
    wait_for(lambda: (ckpts/'epoch000').exists() or None)
    time.sleep(1.0)  # inside epoch 1, which the callback slows to 1.5 s for each of its two batches
    first.send_signal(signal.SIGSTOP)
    second = ThreadPoolExecutor(1).submit(work, rd, progress=False)  # the second worker: this process
    claimed = lambda t: t.state.tolist() == ['FAIL', 'RUNNING'] and t.start_epoch.isna()[1]  # retried, claimed
    t = wait_for(lambda: t if claimed(t := job_table(rd)) else None)
    assert t.retry_of[1] == 0 and t.epochs_trained.tolist() == [1, 0]  # failed by its heartbeat, waits on the lock
    first.send_signal(signal.SIGKILL); first.wait()
    assert second.result(timeout=120) == 1
    assert [p.name for p in ckpts.glob('epoch*')] == ['epoch001']
    t = job_table(rd)
    assert t.state.tolist() == ['FAIL', 'COMPLETE'] and t.start_epoch.tolist() == [0, 1]  # resumed after epoch 0
    assert t.epochs_trained.sum() == job.epochs                                          # the epochs add up
    assert (rd/'models'/job.tag/'final'/'model.safetensors').is_file()


def test_a_job_gives_the_weights_and_scores_of_the_single_process_training(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv('MURA_STUDY_RUNS', str(tmp_path/'runs'))
    root, images, cuts = tiny
    shared = shared_test(images)
    alone, = train_seeds(cuts['paper_clean'], 'mobilenetv2', [0], shared, tag='m', name='alone', **TINY)
    rd = run_dir('jobs')
    jobs = seed_jobs(cuts['paper_clean'], 'mobilenetv2', [0], rd, data=root, protocol_name='paper_clean',
                     split_seed=0, n_images=40, tag='m', **TINY)
    run_jobs(rd, jobs, heartbeat=1, progress=False)
    job = job_result(jobs[0], rd, cuts['paper_clean'], shared)
    for f in ('final/model.safetensors', 'best/model.safetensors', 'checkpoints/epoch001/optimizer.safetensors'):
        a, b = (st.load_file(str(run_dir(r)/'models'/'m'/f)) for r in ('alone', 'jobs'))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f
    for k in ('own', 'shared', 'valid'):
        assert alone[k]['images'].prob.tolist() == job[k]['images'].prob.tolist(), k
        assert alone[k]['study_metrics'].equals(job[k]['study_metrics']), k
    assert (run_dir('alone')/'models'/'m'/'final'/'config.json').read_text() == \
        (rd/'models'/'m'/'final'/'config.json').read_text()


def test_a_worker_refuses_bad_input_before_it_takes_a_job(tiny, tmp_path):
    rd = run_dir('bad', tmp_path/'runs')
    with pytest.raises(ValueError, match='No jobs in'): work(rd)
    submit_jobs(rd, grid(rd, tiny, seeds=[0], protocols=['official']), heartbeat=1)
    with pytest.raises(ValueError, match='is not a torch device'): work(rd, device='gpu')
    with pytest.raises(ValueError, match='max_jobs=-1'): work(rd, max_jobs=-1)
    with pytest.raises(FileNotFoundError, match='no such run folder'): work(tmp_path/'nowhere')
    assert work(rd, max_jobs=0) == 0 and job_table(rd).state.tolist() == ['WAITING']
