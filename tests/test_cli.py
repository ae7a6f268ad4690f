"""The commands that start work elsewhere, parsed but not run: `worker` (the learner's jobs) and `plan`."""
import pytest

from mura_study import study


def test_worker_takes_a_run_a_storage_and_a_device():
    a = study._parser().parse_args(["worker", "--run", "paper", "--storage", "postgresql://db/mura",
                                    "--device", "cuda:1", "--max-jobs", "2"])
    assert (a.cmd, a.run, a.storage, a.device, a.max_jobs) == ("worker", "paper", "postgresql://db/mura", "cuda:1", 2)


def test_worker_needs_a_run(capsys):
    with pytest.raises(SystemExit) as e: study._parser().parse_args(["worker"])
    assert e.value.code == 2 and "--run" in capsys.readouterr().err


def test_plan_defaults_to_the_paper_profile_and_refuses_a_bad_step_count(capsys):
    a = study._parser().parse_args(["plan"])
    assert (a.profile, a.data, a.device, a.out) == ("paper", None, None, None)
    with pytest.raises(SystemExit): study._parser().parse_args(["plan", "--steps", "0"])
    assert "is not a positive whole number" in capsys.readouterr().err


def test_plan_of_a_folder_that_is_not_mura_is_one_line_naming_the_fix(tmp_path, capsys):
    assert study.main(["plan", "--profile", "paper", "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "No MURA-v1.1/train_image_paths.csv" in err and len(err.strip().splitlines()) == 1


def test_synth_like_names_the_published_counts():
    a = study._parser().parse_args(["synth", "out", "--like", "mura-v1.1"])
    assert (a.dest, a.like, a.patients) == ("out", "mura-v1.1", 200)


def test_synth_of_an_unknown_dataset_is_one_line(tmp_path, capsys):
    assert study.main(["synth", str(tmp_path / "s"), "--like", "chexpert"]) == 2
    assert "choose one of mura-v1.1" in capsys.readouterr().err
