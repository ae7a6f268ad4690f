import subprocess, sys
from pathlib import Path

import pytest
import torch

from mura_study import core


def test_run_dir_creates_the_four_folders_and_refuses_escapes(tmp_path):
    d = core.run_dir("smoke", root=tmp_path)
    assert sorted(p.name for p in d.iterdir()) == sorted(core.RUN_SUBDIRS)
    with pytest.raises(ValueError, match="plain folder name"):
        core.run_dir("../outside", root=tmp_path)


def test_same_seed_same_weights_different_seed_different():
    def init():
        core.seed_everything(3)
        return torch.nn.Linear(8, 2).weight.detach().clone()
    assert torch.equal(init(), init())
    core.seed_everything(4)
    assert not torch.equal(init(), torch.nn.Linear(8, 2).weight.detach())


def test_unknown_profile_lists_valid_ones():
    with pytest.raises(ValueError, match="valid profiles: ci, demo, paper"):
        core.profile("huge")


def test_profiles_grow_from_ci_to_paper():
    ci, demo, paper = (core.profile(n) for n in ("ci", "demo", "paper"))
    assert ci.size < demo.size < paper.size
    assert ci.epochs <= demo.epochs <= paper.epochs
    assert set(paper.archs) == {"vgg19", "xception", "mobilenetv2", "convnext_base", "densenet169"}


def test_console_script_prints_help():
    out = subprocess.run([str(Path(sys.executable).parent / "mura-study"), "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "reproduce" in out.stdout


def test_torch_threads_gives_the_count_back_when_the_block_fails():
    before = torch.get_num_threads()
    with pytest.raises(RuntimeError, match="a benchmark that failed"):
        with core.torch_threads(before + 1):
            assert torch.get_num_threads() == before + 1
            raise RuntimeError("a benchmark that failed")
    assert torch.get_num_threads() == before


def test_a_synthetic_set_made_before_label_maps_gets_them_on_its_next_run_with_its_images_untouched(tmp_path):
    import dataclasses, hashlib, json, shutil
    from mura_study.core import profile, run_data
    prof = dataclasses.replace(profile('ci'), n_patients=4)
    mura = run_data(tmp_path, prof)
    done = tmp_path/'data'/'.complete'
    images = sorted(mura.glob('*/XR_*/*/*/*.png'))
    digest = lambda: [hashlib.sha256(p.read_bytes()).hexdigest() for p in images]
    before = digest()
    shutil.rmtree(mura/'anatomy')  # the set as an older version left it
    done.write_text(json.dumps({k: v for k, v in json.loads(done.read_text()).items() if k != 'anatomy'}))
    assert run_data(tmp_path, prof) == mura
    assert digest() == before and len(list((mura/'anatomy').rglob('*.png'))) == len(images) > 0
    assert json.loads(done.read_text())['anatomy'] is True
