"""The benchmark scripts still run (on the CPU, with the tiny model): they drive the real trainer."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT


def test_train_speed_runs_the_reference_loop_and_the_trainer(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "train_speed.py"), "--work", str(tmp_path / "work"),
                             "--out", str(out), "--tiny", "--device", "cpu", "--variants", "reference,eager",
                             "--steps", "4", "--skip", "1", "--workers", "0"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| reference") or line.startswith("| eager")]
    assert len(rows) == 2 and "failed" not in "".join(rows)
    results = json.loads((out / "results.json").read_text())["results"]
    assert results["eager"]["timed_steps"] == 3 and results["eager"]["seconds_per_step_median"] > 0
    reference = results["reference"]
    assert reference["step_only_median_s"] > 0 and f"{reference['step_only_median_s']:.4f} s/step median" in result.stdout


def test_gpu_runs_scaling_runs_one_and_two_processes(tmp_path):
    """bench/gpu_runs.py on the CPU (gloo, tiny model): the precompile (of the 2-process run only, to keep the
    suite short), a 1- and a 2-process run of the real trainer and the efficiency table."""
    out = tmp_path / "out"
    common = [sys.executable, str(ROOT / "bench" / "gpu_runs.py"), "--work", str(tmp_path / "work"), "--out", str(out),
              "--tiny", "--device", "cpu", "--steps", "4", "--skip", "1", "--workers", "0"]
    result = subprocess.run([*common, "--scaling", "1,2", "--precompile", "2"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "precompiled precompile2 in" in result.stdout
    rows = [line for line in result.stdout.splitlines() if line.startswith("| 1 |") or line.startswith("| 2 |")]
    assert len(rows) == 2 and "failed" not in "".join(rows)
    reports = json.loads((out / "gpu_runs.json").read_text())
    assert (reports["gpus1"]["world_size"], reports["gpus2"]["world_size"]) == (1, 2)
    assert reports["gpus2"]["global_step"] == 4 and (out / "gpus2.log").is_file()
    # the precompile ran the timed runs' model and data: they found the embedding cache it built
    assert (out / "precompile2.log").is_file() and not (out / "precompile1.log").exists()
    assert "using cached latents and text embeddings" in (out / "gpus1.log").read_text()
    assert reports["gpus1"]["model_path"] == json.loads(
        (tmp_path / "work" / "runs" / "precompile2" / "report.json").read_text())["model_path"]


def gone(pid: int) -> bool:
    """The process has ended (a zombie no one has reaped yet counts as ended)."""
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0] in ("Z", "X")
    except (FileNotFoundError, IndexError):
        return True


def test_a_run_past_its_timeout_is_stopped_with_the_processes_it_started(tmp_path):
    """bench/common.py's --run-timeout path: a trainer's worker processes (here a sleeping grandchild) are
    killed with it, so a hung multi-GPU run frees the GPUs for the rest of the device call."""
    sys.path.insert(0, str(ROOT / "bench"))
    import common as bench_common

    pid_file = tmp_path / "worker.pid"
    parent = ("import subprocess, sys, time; "
              "worker = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
              f"open({str(pid_file)!r}, 'w').write(str(worker.pid)); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 30
    while not (pid_file.is_file() and pid_file.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    worker = int(pid_file.read_text())
    (tmp_path / "launch.log").write_text("the last line of the run's log\n")
    _, stderr = bench_common.communicate(proc, 1, tmp_path)
    assert proc.returncode == -9
    assert "stopped after 1 s; launch.log ends:\nthe last line of the run's log" in stderr
    deadline = time.monotonic() + 10
    while not gone(worker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gone(worker)


def test_saved_activations_count_each_storage_once_and_leave_out_what_is_held_anyway():
    """bench/lora_memory.py's counter: parameters and inputs are not counted, a tensor several ops save counts once,
    views of one storage count once, and nothing is counted before `counting` is on."""
    import torch

    sys.path.insert(0, str(ROOT / "bench"))
    from lora_memory import SavedActivations

    layer = torch.nn.Linear(8, 16)
    x = torch.randn(4, 8)
    saved = SavedActivations((*layer.parameters(), x))
    with saved.hooks():
        layer(x).relu().exp().sum().backward()
    assert saved.storages == {}  # not counting yet
    saved.counting = True
    with saved.hooks():
        h = layer(x).relu()  # linear saves x and the weight (left out); relu saves its output h
        e = h.exp()  # exp saves its output e
        product = h * h  # h twice more: counted once
        view = e[:2] * 2.0  # mul by a Python scalar saves nothing
        (product.sum() + e.sum() + view.sum()).backward()
    assert saved.bytes == 2 * 4 * 16 * 4 and len(saved.storages) == 2


def test_lora_memory_measures_each_path_with_and_without_checkpointing(tmp_path):
    """bench/lora_memory.py on the CPU with the tiny U-Net: four processes, one per configuration, each with the
    asked batch and latent; the fused rows fused every layer and their forward saved other tensors than peft's (the
    fused forward ran, not peft's); checkpointing keeps fewer activations for the backward on either path."""
    out = tmp_path / "rows.json"
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "lora_memory.py"), "--device", "cpu", "--tiny",
                             "--latent", "8", "--batch", "2", "--out", str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {(r["fused"], r["checkpointing"]): r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {(False, False), (False, True), (True, False), (True, True)}
    assert all((r["batch"], r["latent"], r["compile"], r["tiny"]) == (2, 8, None, True) for r in rows.values())
    assert all(rows[True, c]["fused_layers"] == rows[True, c]["lora_layers"] > 0 for c in (False, True))
    assert rows[True, False]["saved_storages"] != rows[False, False]["saved_storages"]
    for fused in (False, True):
        assert 0 < rows[fused, True]["saved_bytes"] < rows[fused, False]["saved_bytes"] / 2
    assert result.stdout.count("| fused (") == 2 and result.stdout.count("| peft |") == 2


def test_lora_memory_reports_a_stopped_configuration_and_goes_on(tmp_path):
    """A configuration past --timeout is a failed row (its process group stopped), the others still run, the JSON is
    written and the exit status is 1."""
    out = tmp_path / "rows.json"
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "lora_memory.py"), "--device", "cpu", "--tiny",
                             "--latent", "8", "--timeout", "0.5", "--out", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 4 and all(r["error"] == "stopped after 0.5 s" for r in rows), rows
    assert result.stdout.count("failed: stopped after") == 4


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_lora_memory_reports_configurations_that_fail_with_their_error(tmp_path):
    """--device cuda where there is none: each configuration's process fails; its row holds the exit status and the
    end of its stderr, the JSON is still written and the exit status is 1."""
    out = tmp_path / "rows.json"
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "lora_memory.py"), "--device", "cuda", "--tiny",
                             "--latent", "8", "--out", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 4 and all(r["error"] == "exit 1" and "CUDA" in r["stderr"] for r in rows), rows
    assert result.stdout.count("| failed: exit 1: ") == 4
