"""trainer.compile_cache: torch's portable compile-cache artifacts in one file that a fresh node starts from, and
the compile time in the report. Two real compiled runs of the tiny model on the CPU (two processes each, the
first one shared with tests/test_distributed.py: conftest.compiled_ddp_run), each with its own, empty
TORCHINDUCTOR_CACHE_DIR: the second finds its graphs only through the file the first wrote, so its cache hits
are the file's doing (no timing is asserted: the counters say it)."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from conftest import COMPILED_DDP, FAST_BUILD, run_launch

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


def test_a_fresh_node_starts_from_the_file(compiled_ddp_run):
    """The same two-process run again, with an empty Inductor cache of its own: the graphs come from the file
    (every rank loads it; the main process wrote it)."""
    root, _ = compiled_ddp_run
    path = root / "cc" / "unet.bin"
    written = path.read_bytes()
    inductor = root / "inductor-second"
    assert not inductor.exists()
    result = run_launch(*COMPILED_DDP, f"hydra.run.dir={root / 'second'}", cwd=root,
                        env={**FAST_BUILD, "TORCHINDUCTOR_CACHE_DIR": str(inductor)}, timeout=1200)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert f"trainer.compile_cache: loaded {path}" in output and "(cache: hit" in output
    report = json.loads((root / "second" / "report.json").read_text())
    cache = report["compile_cache"]
    assert cache["loaded"] is True and cache["saved"] is False  # nothing new compiled: the file is left as it was
    assert cache["inductor_hits"] > 0 and cache["inductor_misses"] == 0
    assert cache["autograd_hits"] > 0 and cache["autograd_misses"] == 0  # the backward came from the file too
    assert report["compile_s"] is not None
    assert path.read_bytes() == written
    # the same compiled graphs train the same LoRA
    from safetensors.torch import load_file

    name = "lora/pytorch_lora_weights.safetensors"
    first, second = load_file(root / "first" / name), load_file(root / "second" / name)
    assert first.keys() == second.keys()
    for key in first:
        torch.testing.assert_close(second[key], first[key], rtol=0, atol=0)


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
