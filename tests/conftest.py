"""Fixtures shared by the end-to-end and fault tests."""
import os, subprocess, sys
from pathlib import Path

import pytest

CLI = str(Path(sys.executable).parent / "mura-study")


def pytest_collection_modifyitems(items):
    """Under `pytest -n 2 --dist loadgroup` (`make pytest`): a file's tests on one worker, so that its module fixtures
    are built once, and every test of the end-to-end run on one worker too (`ci_run` is built once per worker)."""
    for item in items:
        group = "ci_run" if "ci_run" in getattr(item, "fixturenames", ()) else item.module.__name__
        item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture(scope="session")
def ci_run(tmp_path_factory):
    "One uninterrupted `reproduce --profile ci` run: its folder and what it printed."
    runs = tmp_path_factory.mktemp("runs")
    env = {**os.environ, "MURA_STUDY_RUNS": str(runs)}
    out = subprocess.run([CLI, "reproduce", "--profile", "ci", "--name", "ci"], env=env, capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return runs / "ci", out.stdout
