"""The CPU pin of the ci and demo profiles makes a training bitwise repeatable: two pinned trainings give the same
weights, and an unpinned one on a CPU with AVX-512 kernels does not. Both at the ci profile's own thread count: with
one thread (`make pytest` sets MURA_STUDY_THREADS=1) an AMD EPYC's AVX-512 and AVX2 kernels gave the same weights, so a
single thread cannot show what the pin does."""
import contextlib, json, os, subprocess, sys

import pytest

from mura_study import core, study

# A few steps of the study's reference architecture on fixed random tensors, in a fresh process: torch, oneDNN and
# MKL read the pin when they load.
TRAIN = """
import hashlib, json, torch, timm
torch.manual_seed(0)
model = timm.create_model('mobilenetv2_100', in_chans=1, num_classes=2)
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
g = torch.Generator().manual_seed(0)
x, y = torch.randn(8, 1, 64, 64, generator=g), torch.randint(0, 2, (8,), generator=g)
for _ in range(3):
    opt.zero_grad(); torch.nn.functional.cross_entropy(model(x), y).backward(); opt.step()
h = hashlib.sha256()
for k, v in sorted(model.state_dict().items()): h.update(k.encode()); h.update(v.contiguous().numpy().tobytes())
print(json.dumps(dict(capability=torch.backends.cpu.get_cpu_capability(), threads=torch.get_num_threads(),
                      sha256=h.hexdigest())))
"""


@contextlib.contextmanager
def _profile_threads():
    "Inside the block, `core.cpu_env` gives the profile's own thread count (MURA_STUDY_THREADS left out)."
    before = os.environ.pop(core.THREADS_ENV, None)
    try: yield
    finally:
        if before is not None: os.environ[core.THREADS_ENV] = before


with _profile_threads(): PIN = core.cpu_env(core.profile("ci"))
THREADS = {k: PIN[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}


def _train(env: dict | None = None) -> dict:
    "Run TRAIN in a child process with `env` (None: this process's environment); its kernels, threads and weights."
    out = subprocess.run([sys.executable, "-c", TRAIN], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _unpinned() -> dict:
    "This process's environment without the pin's instruction-set variables, with the pin's thread count."
    return {**{k: v for k, v in os.environ.items() if k not in PIN}, **THREADS}


@pytest.fixture(scope="module")
def pinned():
    "Two pinned trainings: one started inside `study.pinned_cpu` (as `reproduce` starts chapters), one given the env."
    with _profile_threads(), study.pinned_cpu(core.profile("ci")): a = _train()
    return a, _train({**_unpinned(), **PIN})


def test_pinned_trainings_give_bitwise_identical_weights(pinned):
    a, b = pinned
    assert a["capability"] == b["capability"] == "AVX2", f"pinned processes ran {a['capability']} kernels: the pin " \
        "needs an x86-64 CPU with AVX2"
    assert a["threads"] == b["threads"] == int(PIN["OMP_NUM_THREADS"])
    assert a["sha256"] == b["sha256"], "two pinned trainings of the same seed gave different weights"


def test_unpinned_training_differs_where_the_cpu_has_wider_kernels(pinned):
    a, _ = pinned
    c = _train(_unpinned())
    assert c["threads"] == a["threads"]
    wider = c["capability"] == "AVX512"
    assert (c["sha256"] != a["sha256"]) == wider, (
        f"unpinned, this CPU runs {c['capability']} kernels: with AVX512 the unpinned weights must differ from the "
        "pinned ones (else the pin is not what makes runs agree); with AVX2 kernels at most they must be equal")
