"""End to end: `mura-study reproduce --profile ci` executes every chapter and writes what the study promises; and the
commands around it: their options, and the benchmark table `bench` writes."""
import json, os, re, subprocess, sys, time
from pathlib import Path

import pandas as pd

from mura_study import core, study

CLI = str(Path(sys.executable).parent / "mura-study")


def test_every_chapter_finished(ci_run):
    rd, _ = ci_run
    names = [nb.name for nb in study.chapters()]
    assert names and all(study.finished(rd / "notebooks" / n) for n in names)
    assert {p.stem for p in (rd / "html").glob("*.html")} == {Path(n).stem for n in names}


def test_every_promised_table_and_figure_exists_and_is_not_empty(ci_run):
    rd, _ = ci_run
    for _, stem, _ in study.REPORT_SECTIONS:
        df = pd.read_csv(rd / "tables" / f"{stem}.csv")
        assert len(df) > 0, stem
    figs = list((rd / "figures").glob("*.png"))
    assert len(figs) >= len(study.REPORT_SECTIONS)
    assert all(f.stat().st_size > 1000 for f in figs)


def test_report_cites_the_numbers_of_the_tables(ci_run):
    rd, _ = ci_run
    report = (rd / "report.md").read_text()
    assert "is missing" not in report
    for _, stem, _ in study.REPORT_SECTIONS:
        df = pd.read_csv(rd / "tables" / f"{stem}.csv")
        for v in df.select_dtypes("number").to_numpy().ravel():
            if pd.notna(v) and not float(v).is_integer():
                assert f"{v:.3f}" in report, (stem, v)


def _table_numbers(tables: Path) -> set:
    "Every numeric cell of every table of a run, written as the Findings write numbers: 3 decimals, signed or not."
    return {f"{v:{sign}.3f}" for csv in tables.glob("*.csv") for v in pd.read_csv(csv).select_dtypes("number").stack()
            for sign in ("", "+")}


def test_findings_quote_only_numbers_of_the_run_tables(ci_run):
    rd, _ = ci_run
    report = (rd / "report.md").read_text()
    found = report.split("## Findings\n", 1)[1].split("\n## ", 1)[0]
    assert "not measured in this run" not in found, found
    labels = [label for label, _, _ in study.FINDINGS]
    assert [line.split("**")[1] for line in found.strip().splitlines()] == labels, found
    quoted = re.findall(r"(?<![\w.])[-+]?\d+\.\d+", found)
    assert len(quoted) >= 3 * len(labels), found
    assert all(len(q.split(".")[1]) == 3 for q in quoted), [q for q in quoted if len(q.split(".")[1]) != 3]
    cells = _table_numbers(rd / "tables")
    assert [q for q in quoted if q not in cells] == [], found


def test_report_opens_with_findings_and_planned_epochs_and_ends_with_the_checklist(ci_run):
    rd, _ = ci_run
    heads = [line for line in (rd / "report.md").read_text().splitlines() if line.startswith("## ")]
    assert heads[:2] == ["## Findings", "## Planned epochs"] and heads[-1] == "## Reporting checklist (CLAIM)"
    claim = (rd / "report.md").read_text().split("## Reporting checklist (CLAIM)\n", 1)[1]
    assert claim.count("\n- **") == len(study.CLAIM) and "not in this run" not in claim
    assert "mura-study reproduce --profile ci --name ci`" in claim and "ATEN_CPU_CAPABILITY=avx2" in claim


def test_the_plan_counts_what_the_chapters_then_trained(ci_run):
    "plan.csv, written before the first chapter, names every model the chapters trained, with its epochs and images."
    rd, out = ci_run
    assert "plan: " in out and (rd / "plan.md").is_file()
    plan = pd.read_csv(rd / "plan.csv")
    trained = plan[plan.what == "training"]
    learned = trained[trained.chapter == "learner"]
    made = {p.parent.parent.name: json.loads(p.read_text()) for p in (rd / "models").glob("*/final/config.json")}
    assert set(made) == set(learned.tag)
    assert {t: made[t]["epochs"] for t in learned.tag} == dict(zip(learned.tag, learned.epochs))
    sets = pd.read_csv(rd / "tables" / "official_sets.csv").query("body_part == 'ALL'").set_index("set").images
    official = learned[learned.tag == "mobilenetv2-official"].iloc[0]
    assert official.images == sets["train"] * official.epochs
    cost = pd.read_csv(rd / "tables" / "tuning_cost.csv")
    searched, planned = cost[~cost.baseline.astype(bool)], trained[trained.chapter == "tuning"]
    assert len(searched) == len(planned) > 0
    assert sorted(searched.epochs_trained) == sorted(planned.epochs)  # one epoch per trial: no rung to prune at
    assert sorted(searched.model) == sorted(planned.tag)


def test_report_shows_each_chapter_estimate_beside_its_time(ci_run):
    rd, _ = ci_run
    times = pd.read_csv(rd / "tables" / "chapter_times.csv")
    assert list(times.columns) == ["chapter", "seconds", "estimated_s"]
    assert times.estimated_s.notna().all() and (times.estimated_s > 0).all()
    section = (rd / "report.md").read_text().split("## Chapter wall times\n", 1)[1]
    assert "estimated_s" in section.split("\n## ", 1)[0]


def test_rerun_keeps_finished_chapters(ci_run, tmp_path):
    rd, _ = ci_run
    env = {**os.environ, "MURA_STUDY_RUNS": str(rd.parent)}
    out = subprocess.run([CLI, "reproduce", "--profile", "ci", "--name", "ci", "--no-html"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count("finished earlier, kept") == len(study.chapters())


def _reproduce(tmp_path, env_extra, *args):
    env = {**os.environ, "MURA_STUDY_RUNS": str(tmp_path / "runs"), **env_extra}
    t0 = time.perf_counter()
    out = subprocess.run([CLI, "reproduce", "--profile", "ci", "--name", "pf", *args], env=env, capture_output=True,
                         text=True, timeout=300)
    return out, time.perf_counter() - t0


def test_reproduce_stops_in_seconds_when_a_chapter_import_fails(tmp_path):
    shadow = tmp_path / "shadow" / "captum"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('captum is absent in this test')\n")
    out, secs = _reproduce(tmp_path, {"PYTHONPATH": str(tmp_path / "shadow")})
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert "cannot start" in out.stderr and "cannot import captum.attr" in out.stderr and "Fix:" in out.stderr
    assert "Traceback" not in out.stderr
    assert secs < 60, secs
    assert not (tmp_path / "runs" / "pf" / "data").exists(), "data was generated before the check"


def test_reproduce_stops_when_the_run_folder_cannot_be_made(tmp_path):
    (tmp_path / "runs").write_text("a file where the runs folder should be")
    out, _ = _reproduce(tmp_path, {})
    assert out.returncode == 2 and "cannot create the run folder" in out.stderr and "MURA_STUDY_RUNS" in out.stderr


def test_reproduce_names_a_folder_that_is_not_mura(tmp_path):
    out, _ = _reproduce(tmp_path, {}, "--data", str(tmp_path))
    assert out.returncode == 2 and "No MURA-v1.1/train_image_paths.csv" in out.stderr


def _help(command: str) -> str:
    out = subprocess.run([CLI, command, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_bench_help_lists_where_the_table_goes_and_the_device():
    text = _help("bench")
    assert "--out" in text and "--device" in text and "results/bench.csv" in text


def test_tune_help_lists_the_stand_in_fit_and_the_heartbeat():
    text = _help("tune")
    assert "--fit" in text and "--heartbeat" in text


def test_bench_writes_its_table_where_out_says(tmp_path):
    "The data chapter's benchmarks (at 64 px, on one thread), written with their targets and the machine that ran them."
    out = tmp_path / "b.csv"
    cols = ["chapter", "benchmark", "measured", "target", "unit", "size", "meets_target", "machine"]
    kept = ["synth", "a row of an earlier run", 2.0, "> 1", "x faster", 320, True, "elsewhere"]
    pd.DataFrame([kept, ["data", "an old data row", 1.0, "> 1", "x", 64, False, "elsewhere"]],
                 columns=cols).to_csv(out, index=False)
    with core.torch_threads(1): assert study.main(["bench", "--only", "data", "--size", "64", "--out", str(out)]) == 0
    df = pd.read_csv(out)
    assert list(df.columns) == cols
    assert df.iloc[0].tolist() == kept  # the chapters not benchmarked keep their rows, first in the chapters' order
    df = df[df.chapter != "synth"].reset_index(drop=True)
    assert df.meets_target.dtype == bool
    assert set(df.chapter) == {"data"} and len(df) >= 2 and df.benchmark.is_unique
    assert "an old data row" not in set(df.benchmark)
    assert df.measured.notna().all() and (df.target != "").all()
    assert "1 torch threads" in df.machine[0] and set(df["size"]) == {64}
