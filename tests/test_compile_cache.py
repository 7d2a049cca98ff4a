"""trainer.compile_cache: torch's portable compile-cache artifacts in one file that a fresh node starts from, and
the compile time in the report. A real compiled run of the tiny model on the CPU (two processes, shared with
tests/test_distributed.py: conftest.compiled_ddp_run) finds a damaged file, warns, compiles and rewrites it; two
processes compiling a small model, each with its own, empty TORCHINDUCTOR_CACHE_DIR, show that the second finds
its graphs only through the file the first wrote (no timing is asserted: the cache counters say it)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest
import torch
from conftest import FAST_BUILD

from sd_lora.compile_cache import CompileCache, read_cache_file, write_cache_file


def test_a_damaged_or_foreign_file_is_one_warning_and_no_load(tmp_path, caplog):
    path = tmp_path / "cc.bin"
    write_cache_file(path, b"payload")
    assert read_cache_file(path) == (b"payload", "")
    whole = path.read_bytes()
    problems = {
        "damaged": whole[:-1] + b"X",
        "cut short": whole[:40],
        "not ours": b"\x00" * 64,
        "another torch": whole.replace(torch.__version__.encode(), b"1.0.0"),
    }
    for name, data in problems.items():
        path.write_bytes(data)
        assert read_cache_file(path)[0] is None, name
    assert "written by torch 1.0.0" in read_cache_file(path)[1]
    write_cache_file(path, b"not torch's artifacts")  # a whole file whose payload torch cannot read
    problems["torch refuses"] = path.read_bytes()
    for name, data in problems.items():
        path.write_bytes(data)
        caplog.clear()
        cache = CompileCache(path, is_main_process=True)
        with caplog.at_level(logging.INFO):
            cache.load()
        warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warnings) == 1, (name, [r.getMessage() for r in caplog.records])
        message = warnings[0].getMessage()
        assert str(path) in message and "compiled and the file rewritten" in message, (name, message)
        assert not cache.loaded and cache.report()["loaded"] is False


def test_a_damaged_file_warns_and_the_run_trains_and_rewrites_it(compiled_ddp_run):
    root, output = compiled_ddp_run
    path = root / "cc" / "unet.bin"  # the relative path, read from the directory the run started in
    assert f"trainer.compile_cache: {path} is not a compile cache" in output
    assert "the graphs will be compiled and the file rewritten" in output
    report = json.loads((root / "first" / "report.json").read_text())
    assert report["global_step"] == 3
    cache = report["compile_cache"]
    assert cache["path"] == str(path) and cache["loaded"] is False and cache["saved"] is True
    assert cache["inductor_misses"] > 0 and cache["inductor_hits"] == 0  # compiled cold
    assert report["compile_s"] > 0
    assert "compiled in" in output and "(cache: miss" in output
    assert read_cache_file(path)[0]  # rewritten whole, from this torch


# a process that compiles a small model's forward and backward the way a run does: the file loaded before, the
# step, then the run's after-step write; prints its report. (The trainer's own use of the file, a damaged one
# found and rewritten, is the shared two-process run above; a second run of it would compile minutes again.)
COMPILING_PROCESS = """
import json, sys, torch
from peft import LoraConfig, inject_adapter_in_model
from sd_lora.compile_cache import compile_cache_scope
from sd_lora.fused_lora import fuse_lora_layers
from sd_lora.speed import custom_functions_cached
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))
# a LoRA on the first layer, fused as perf=throughput fuses the U-Net's: the graph holds its autograd.Function
inject_adapter_in_model(LoraConfig(r=4, target_modules=["0"], init_lora_weights="gaussian"), model)
for name, p in model.named_parameters():
    p.requires_grad_("lora_" in name)
assert fuse_lora_layers(model) == (1, 1)
with custom_functions_cached(), compile_cache_scope(sys.argv[1], is_main_process=True) as cache:
    cache.load()
    torch.compile(model)(torch.randn(8, 16)).pow(2).mean().backward()
    cache.after_step()
    cache.save()
    print(json.dumps({**cache.report(), "grad": model[0].lora_B["default"].weight.grad.abs().sum().item()}))
"""


def test_a_fresh_node_starts_from_the_file(tmp_path):
    """Two processes with empty Inductor caches of their own: the second's graphs (forward and backward) come
    from the file the first wrote, and it leaves the file as it was. The model holds a fused LoRA layer (an
    autograd.Function, which AOTAutograd's cache passes by unless custom_functions_cached() is on)."""
    path = tmp_path / "cc.bin"

    def process(cache_dir: str) -> dict:
        env = {**os.environ, **FAST_BUILD, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / cache_dir)}
        done = subprocess.run([sys.executable, "-c", COMPILING_PROCESS, str(path)], env=env, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, done.stdout + done.stderr
        return json.loads(done.stdout.strip().splitlines()[-1])

    first = process("inductor-first")
    assert first["saved"] and not first["loaded"] and first["inductor_misses"] > 0 and first["inductor_hits"] == 0
    written = path.read_bytes()
    second = process("inductor-second")
    assert second["loaded"] is True and second["saved"] is False  # nothing new compiled: the file is left as it was
    assert second["inductor_hits"] > 0 and second["inductor_misses"] == 0
    assert second["autograd_hits"] > 0 and second["autograd_misses"] == 0  # the backward came from the file too
    assert path.read_bytes() == written
    # the same compiled kernels compute the same gradient (lora_B's: lora_A's is zero while B starts at zero)
    assert second["grad"] == first["grad"] > 0


def test_a_torch_without_the_artifacts_api_is_refused_before_any_work(monkeypatch):
    from sd_lora.config import Config, DatasetConfig, ModelConfig, TrainerConfig
    from sd_lora.devices import build_backend
    from sd_lora.errors import UserError
    from sd_lora.speed import check_speed_switches

    cfg = Config(model=ModelConfig(pretrained_model_name_or_path="m"), dataset=DatasetConfig(path="d"),
                 trainer=TrainerConfig(compile=True, compile_cache="cc.bin"))
    check_speed_switches(cfg, build_backend("cpu"))
    monkeypatch.delattr(torch.compiler, "save_cache_artifacts")  # torch 2.4 to 2.6
    with pytest.raises(UserError, match=r"trainer.compile_cache needs torch 2.7 or later.*trainer.compile_cache=null"):
        check_speed_switches(cfg, build_backend("cpu"))


def test_a_bypass_torch_is_known_to_make_is_named(monkeypatch):
    """perf=memory on CUDA under torch 2.11 (an H200): every start compiled again, because Inductor's cache passed
    by the graphs holding graphsafe_run_with_rng_state (gradient checkpointing replays the attention's RNG state).
    This torch caches that operator, so there is nothing to name; a torch that does not is made here by clearing
    the operator's flag (torch 2.11 cannot be installed beside this one)."""
    from sd_lora.compile_cache import _known_bypass

    op = torch.ops.higher_order.graphsafe_run_with_rng_state
    assert op.cacheable() and _known_bypass() == ""
    monkeypatch.setattr(op, "_cacheable", False)
    assert "pytorch/pytorch#185562" in _known_bypass() and torch.__version__ in _known_bypass()
