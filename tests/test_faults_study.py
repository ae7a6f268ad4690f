"""Faults at the command line and in a run: two writers, bad values, a read-only disk, a run killed at every stage."""
import contextlib, os, signal, sqlite3, subprocess, sys, time
from pathlib import Path

import pandas as pd
import pytest

from mura_study import core, study
from mura_study.learner import JOBS_STUDY

CLI = str(Path(sys.executable).parent / "mura-study")


def _cli(tmp_path, *args, timeout=120, **popen):
    env = {**os.environ, "MURA_STUDY_RUNS": str(tmp_path / "runs"), "OMP_NUM_THREADS": "1"}
    return subprocess.run([CLI, *map(str, args)], env=env, capture_output=True, text=True, timeout=timeout, **popen)


def _hold(rd: Path, command: str) -> subprocess.Popen:
    "A process that holds run `rd`'s writer lock until killed."
    code = (f"import time; from mura_study.core import run_lock; run_lock({str(rd)!r}, {command!r}); "
            "print('held', flush=True); time.sleep(600)")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


# --- two writers -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args", [["train", "--profile", "ci", "--name", "busy"],
                                  ["reproduce", "--profile", "ci", "--name", "busy", "--no-html"]])
def test_a_second_writer_fails_at_once_naming_the_holder(tmp_path, args):
    holder = _hold(core.run_dir("busy", root=tmp_path / "runs"), "train --name busy --lr 0.1")
    try:
        t0 = time.perf_counter(); out = _cli(tmp_path, *args); secs = time.perf_counter() - t0
    finally: holder.kill(); holder.wait()
    assert out.returncode == 2, out.stderr[-2000:]
    assert f"being written by process {holder.pid} (train --name busy --lr 0.1)" in out.stderr
    assert secs < 30 and "Traceback" not in out.stderr
    assert not (tmp_path / "runs" / "busy" / "data").exists(), "the second writer generated data"


def test_a_lock_left_by_a_killed_writer_does_not_block_the_next(tmp_path):
    rd = core.run_dir("killed", root=tmp_path / "runs")
    holder = _hold(rd, "reproduce")
    holder.send_signal(signal.SIGKILL); holder.wait()
    code = f"from mura_study.core import run_lock; run_lock({str(rd)!r}); print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "ok", out.stderr


def test_two_workers_starting_a_new_run_share_one_synthetic_set(tmp_path):
    code = ("import sys; from mura_study import core; "
            f"print(core.run_data(core.run_dir('shared', root={str(tmp_path)!r}), core.profile('ci')))")
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-1500:] for o in outs]
    assert outs[0][0] == outs[1][0]
    mura = Path(outs[0][0].strip())
    listed = sum(len((mura / f"{s}_image_paths.csv").read_text().split()) for s in ("train", "valid"))
    assert listed > 0 and len(list(mura.glob("*/XR_*/*/*/*.png"))) == listed  # radiographs, not label maps
    assert len(list((mura / "anatomy").rglob("*.png"))) == listed  # and one label map each


def test_tune_workers_draw_their_own_sampler_seed_unless_given():
    assert study._parser().parse_args(["tune"]).seed is None
    assert study._parser().parse_args(["tune", "--seed", "3"]).seed == 3
    assert study._parser().parse_args(["train"]).seed == 0


# --- values checked before any work ------------------------------------------------------------------------------

BAD_VALUES = [
    (["train", "--epochs", "0"], "--epochs"), (["train", "--epochs", "-1"], "--epochs"),
    (["train", "--bs", "0"], "--bs"), (["train", "--size", "0"], "--size"),
    (["train", "--lr", "nan"], "--lr"), (["train", "--lr", "inf"], "--lr"),
    (["train", "--lr", "-0.1"], "--lr"), (["train", "--lr", "0"], "--lr"),
    (["synth", "x", "--patients", "0"], "--patients"), (["synth", "x", "--size", "-5"], "--size"),
    (["explain", "m", "i.png", "--lime-samples", "0"], "--lime-samples"),
    (["bench", "--only", "nothing"], "--only"), (["bench", "--size", "0"], "--size"),
    (["tune", "--n-trials", "0"], "--n-trials"), (["tune", "--heartbeat", "0"], "--heartbeat"),
    (["train", "--profile", "huge"], "--profile"),
]


def _main(tmp_path, monkeypatch, *args) -> int:
    "`study.main`, the console script's entry point, in this process: its exit status (argparse exits with 2)."
    monkeypatch.setenv("MURA_STUDY_RUNS", str(tmp_path / "runs"))
    try: return study.main(list(args))
    except SystemExit as e: return e.code


@pytest.mark.parametrize("args,names", BAD_VALUES)
def test_a_bad_value_is_one_line_and_status_2_before_any_work(tmp_path, monkeypatch, capsys, args, names):
    """In this process: the values are checked before anything runs. The console script's own status and stream are
    checked by `test_a_bad_value_through_the_console_script`."""
    status = _main(tmp_path, monkeypatch, *args, *(["--name", "bad"] if args[0] in ("train", "tune") else []))
    err = capsys.readouterr().err
    assert status == 2, (args, err[-1500:])
    lines = err.strip().splitlines()
    assert len(lines) == 1 and names in lines[0] and "Traceback" not in err, err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.png")), "data was generated"


def test_a_bad_value_through_the_console_script(tmp_path):
    out = _cli(tmp_path, "train", "--lr", "nan", "--name", "bad")
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        "mura-study train: argument --lr: 'nan' is not a finite number above 0. See 'mura-study train --help'."], out


@pytest.mark.parametrize("args,says", [
    (["train", "--arch", "resnet50", "--name", "bad"], "unknown architecture 'resnet50'"),
    (["evaluate", "no/such/model"], "no/such/model"),
    (["check-data", "no/such/folder"], "No MURA-v1.1/train_image_paths.csv"),
    (["reproduce", "--profile", "paper", "--name", "bad"], "needs real data"),
    (["results", "--name", "never-run"], "is not finished"),
])
def test_a_user_error_is_one_line_and_status_2(tmp_path, monkeypatch, capsys, args, says):
    status = _main(tmp_path, monkeypatch, *args)
    out = capsys.readouterr()
    assert status == 2, (args, out.out[-1000:], out.err[-1500:])
    assert says in out.err and "Traceback" not in out.err, out.err
    assert not any((tmp_path / "runs").rglob("*.png")), "data was generated"


def test_a_read_only_run_root_stops_the_run_before_it_starts(tmp_path):
    ro = tmp_path / "ro"; ro.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], capture_output=True).returncode:
        pytest.skip("mounting a read-only tmpfs needs root and a mount namespace that allows it")
    try:
        env = {**os.environ, "MURA_STUDY_RUNS": str(ro / "runs")}
        out = subprocess.run([CLI, "reproduce", "--profile", "ci"], env=env, capture_output=True, text=True,
                             timeout=120)
    finally: subprocess.run(["umount", str(ro)])
    assert out.returncode == 2, out.stderr
    assert "cannot create the run folder" in out.stderr and "Traceback" not in out.stderr, out.stderr


# --- a run killed at every stage, then finished: the same tables as a run never killed ------------------------------

def _search_trial_running(rd: Path) -> bool:
    "A trial of the search other than its baseline (trial 0) is running, as the run's database records it."
    try:
        with contextlib.closing(sqlite3.connect(f"file:{rd / 'tuning.db'}?mode=ro", uri=True, timeout=0.1)) as db:
            return db.execute("SELECT count(*) FROM trials JOIN studies USING (study_id) WHERE study_name != ? "
                              "AND number > 0 AND state = 'RUNNING'", (JOBS_STUDY,)).fetchone()[0] > 0
    except sqlite3.Error: return False  # not made yet, or busy: look again at the next poll


STAGES = [  # (stage, the condition on which reproduce is killed)
    ("data generation", lambda rd, log: len(list((rd / "data").rglob("*.png"))) >= 20),
    ("cache build", lambda rd, log: "02_data: running" in log and any((rd / "cache").glob("*"))),
    ("training", lambda rd, log: "04_learner: running" in log and any((rd / "models").rglob("*.safetensors"))),
    # tuning.db holds the learner's jobs too: the kill waits for a trial of the search to be training
    ("tuning", lambda rd, log: "05_tuning: running" in log and _search_trial_running(rd)),
    # the chapter's first table of the run: its maps, cascade and faithfulness scores are still to come
    ("explanation", lambda rd, log: "06_interpret: running" in log
     and (rd / "tables" / "gradcam_layer_valid.csv").is_file()),
]
def _timing(col: str) -> bool:
    "Columns that measure time (or are chosen by timing: the fastest batch size), not results."
    if "latency" in col or "datetime" in col: return True
    return col in ("duration", "seconds", "best_bs") or col.endswith(("_ms", "_s"))


def _kill_when(rd: Path, env: dict, when) -> str:
    "Start `reproduce --profile ci` on `rd`, SIGKILL its whole process group once `when(rd, stdout)` holds."
    log = rd.parent / f"{rd.name}.log"
    with open(log, "w") as fh:
        p = subprocess.Popen([CLI, "reproduce", "--profile", "ci", "--name", rd.name, "--no-html"], env=env, stdout=fh,
                             stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 600
        while p.poll() is None and time.time() < deadline and not when(rd, log.read_text()): time.sleep(0.2)
        killed = p.poll() is None
        if killed: os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    return "killed" if killed else f"ended by itself ({p.returncode})"


def _tables(rd: Path) -> dict:
    out = {}
    for f in sorted((rd / "tables").glob("*.csv")):
        if f.stem == "chapter_times": continue  # timings, not results
        df = pd.read_csv(f)
        if f.stem in ("tuning_trials", "tuning_cost"):
            # a killed trial stays behind as FAIL, and the trials after it are renumbered (their model folders too)
            df = df[df.state.isin(["COMPLETE", "PRUNED"])].reset_index(drop=True)
            df = df.drop(columns=[c for c in df.columns if c == "number" or "model" in c])
            # a trial stopped unrun while the killed baseline ran again is marked `surplus`: a mark of FAIL rows only
            df = df.drop(columns=[c for c in df.columns if c == "user_attrs_surplus"])
            df = df.convert_dtypes()  # a column that held NaN for a FAIL row is float: its kept rows' own dtype
        if f.stem == "tuning_gain": df = df.drop(columns="winner_trial")  # a trial number, renumbered likewise
        out[f.stem] = df[[c for c in df.columns if not _timing(c)]]
    return out


@pytest.mark.timeout(1500)
def test_a_run_killed_at_every_stage_ends_as_one_never_killed(ci_run_when_needed, tmp_path):
    rd = tmp_path / "runs" / "ci"; rd.parent.mkdir()
    env = {**os.environ, "MURA_STUDY_RUNS": str(rd.parent)}
    what = {stage: _kill_when(rd, env, when) for stage, when in STAGES}
    assert all(v == "killed" for v in what.values()), what
    out = subprocess.run([CLI, "reproduce", "--profile", "ci", "--name", "ci", "--no-html"], env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert study.missing_outputs(rd) == []
    assert not list(rd.rglob("*.partial*")), "a partial file survived"
    ref, got = _tables(ci_run_when_needed()[0]), _tables(rd)  # the reference run, made meanwhile on another worker
    assert ref.keys() == got.keys()
    for stem in ref: pd.testing.assert_frame_equal(got[stem], ref[stem], obj=stem)
