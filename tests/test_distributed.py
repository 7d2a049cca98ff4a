"""Several processes on the CPU (gloo): gradients averaged across ranks, one run directory."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import DDP_COMMON, ROOT, run_launch
from safetensors.torch import load_file

from sd_lora.distributed import strip_local_rank_argument

COMMON = DDP_COMMON


def lora(run_dir):
    return load_file(run_dir / "lora" / "pytorch_lora_weights.safetensors")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_path):
    base = tmp_path_factory.mktemp("dist")
    two = run_launch(*COMMON, "device.num_processes=2", "trainer.train_batch_size=2", f"hydra.run.dir={base / 'two'}")
    assert two.returncode == 0, two.stdout + two.stderr
    one = run_launch(*COMMON, "trainer.train_batch_size=4", f"hydra.run.dir={base / 'one'}")
    assert one.returncode == 0, one.stdout + one.stderr
    return base


def test_two_processes_average_gradients_like_one_process_with_twice_the_batch(runs):
    two, one = lora(runs / "two"), lora(runs / "one")
    assert two.keys() == one.keys()
    moved = 0
    for key in one:
        # fp32 reduction order differs between one batch of 4 and an all-reduce of two batches of 2;
        # Adam's g / sqrt(v) magnifies that in near-zero gradients, hence 1e-4 (the steps move weights by ~1e-2)
        torch.testing.assert_close(two[key], one[key], atol=1e-4, rtol=1e-3, msg=key)
        moved += int(key.endswith("lora.up.weight") and one[key].abs().max() > 0)
    assert moved > 0  # the weights trained, so equality is not two untouched initialisations


def test_compiled_u_net_under_ddp_still_averages_gradients(runs, compiled_ddp_run):
    """trainer.compile under DDP compiles the U-Net as one graph (trainer.compile_ddp_split=false, which torch's
    DDPOptimizer would otherwise split): DDP's hooks must still all-reduce the gradients after the compiled
    backward. Without the all-reduce each rank would train on its own 2 samples and the LoRA would not match
    the 1-process run with batch 4. reduce-overhead on the CPU, where there are no CUDA graphs, also shows
    that the report counts graphs run without the CUDA graphs their mode asked for. (The run is
    conftest.compiled_ddp_run: tests/test_compile_cache.py reads its compile-cache file.)"""
    run_dir = compiled_ddp_run[0] / "first"
    report = json.loads((run_dir / "report.json").read_text())
    assert report["world_size"] == 2
    assert report["compiled_graphs"] > 0 and report["cudagraph_skips"] > 0
    assert report["switches"]["compile_ddp_split"] is False  # as torch's dynamo config held it in the run
    two, one = lora(run_dir), lora(runs / "one")
    for key in one:  # compiled kernels sum in another order than eager ones: the tolerance of the eager pair
        torch.testing.assert_close(two[key], one[key], atol=1e-4, rtol=1e-3, msg=key)


def test_multi_process_run_writes_one_of_each(runs):
    assert sorted(p.name for p in runs.iterdir()) == ["one", "two"]
    two = runs / "two"
    report = json.loads((two / "report.json").read_text())
    assert report["world_size"] == 2 and report["dist_backend"] == "gloo"
    assert report["global_batch_size"] == 4 and report["global_step"] == 3
    assert len(list(two.rglob("report.json"))) == 1
    assert len(list(two.rglob("pytorch_lora_weights.safetensors"))) == 1
    events = list(two.rglob("events.out.tfevents.*"))
    assert events and all((two / "tensorboard" / "train") in p.parents for p in events)
    assert len({p.name.split(".")[-2] for p in events}) == 1  # written by one process (the pid in the name)


def test_torchrun_ranks_agree_on_one_run_directory(tmp_path, tiny_model_path):
    """`torchrun --nproc_per_node 2 launch.py` starts two Hydra apps; they must share one run directory."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "launch.py"), *COMMON, "trainer.train_batch_size=2", "trainer.max_train_steps=2"]
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_dirs = [p for p in (tmp_path / "outputs").glob("*/*") if p.is_dir()]
    assert len(run_dirs) == 1, run_dirs
    report = json.loads((run_dirs[0] / "report.json").read_text())
    assert report["world_size"] == 2 and report["global_step"] == 2


def test_local_rank_argument_of_torch_distributed_launch_is_taken_out(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "")  # so that monkeypatch restores the variable's absence afterwards
    monkeypatch.delenv("LOCAL_RANK")
    assert strip_local_rank_argument(["launch.py", "--local_rank=1", "device=cpu"]) == ["launch.py", "device=cpu"]
    assert os.environ["LOCAL_RANK"] == "1"
    assert strip_local_rank_argument(["launch.py", "--local-rank", "3", "x=1"]) == ["launch.py", "x=1"]


def test_processes_must_divide_over_machines(tmp_path):
    result = run_launch("device=cpu", "device.num_processes=3", "device.num_machines=2",
                        "device.main_process_ip=127.0.0.1", f"hydra.run.dir={tmp_path / 'r'}")
    assert result.returncode == 2
    assert "device.num_processes=3 is not a multiple of device.num_machines=2" in result.stdout + result.stderr


def test_step_count_is_what_the_user_asked_for_across_epochs(tmp_path, tiny_model_path):
    """10 samples, 2 processes x batch 2, drop_last: 2 steps per epoch; 5 steps take 3 epochs."""
    out = tmp_path / "run"
    result = run_launch(*COMMON, "device.num_processes=2", "trainer.train_batch_size=2", "dataset.max_train_samples=10",
                        "dataset.drop_last=true", "trainer.max_train_steps=5", f"hydra.run.dir={out}")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["global_step"] == 5 and report["max_train_steps"] == 5 and report["global_batch_size"] == 4
