"""Fixtures shared by the end-to-end and fault tests."""
import os, subprocess, sys
from pathlib import Path

import filelock
import pytest

CLI = str(Path(sys.executable).parent / "mura-study")


def _shared_root(tmp_path_factory) -> Path:
    "A folder every worker of this pytest session sees: the parent of the workers' own temporary roots under xdist."
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def ci_run_when_needed(tmp_path_factory):
    """A function that gives one uninterrupted `reproduce --profile ci` run, its folder and what it printed, built once
    for the whole session: the first worker to call it runs it, a worker that calls it meanwhile waits on the lock.
    Under `make pytest` (`--dist loadfile`) the end-to-end tests and the killed-run test are in different files, so
    the killed runs go on on one worker while the reference run is made on the other."""
    root = _shared_root(tmp_path_factory)
    def ci_run() -> tuple[Path, str]:
        runs, log = root / "ci_run" / "runs", root / "ci_run" / "stdout.txt"
        with filelock.FileLock(str(root / "ci_run.lock")):
            if not log.is_file():  # written only once the run has succeeded
                runs.mkdir(parents=True, exist_ok=True)
                env = {**os.environ, "MURA_STUDY_RUNS": str(runs)}
                out = subprocess.run([CLI, "reproduce", "--profile", "ci", "--name", "ci"], env=env,
                                     capture_output=True, text=True, timeout=900)
                assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
                log.write_text(out.stdout)
        return runs / "ci", log.read_text()
    return ci_run


@pytest.fixture(scope="session")
def ci_run(ci_run_when_needed):
    "One uninterrupted `reproduce --profile ci` run: its folder and what it printed."
    return ci_run_when_needed()
