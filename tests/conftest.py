"""Fixtures shared by the end-to-end and fault tests."""
import os, subprocess, sys
from pathlib import Path

import pytest

CLI = str(Path(sys.executable).parent / "mura-study")


@pytest.fixture(scope="session")
def ci_run(tmp_path_factory):
    "One uninterrupted `reproduce --profile ci` run: its folder and what it printed."
    runs = tmp_path_factory.mktemp("runs")
    env = {**os.environ, "MURA_STUDY_RUNS": str(runs)}
    out = subprocess.run([CLI, "reproduce", "--profile", "ci", "--name", "ci"], env=env, capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return runs / "ci", out.stdout
