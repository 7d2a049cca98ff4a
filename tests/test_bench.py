"""The benchmark scripts still run (on the CPU, with the tiny model): they drive the real trainer."""

import json
import subprocess
import sys

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


def test_gpu_runs_scaling_runs_one_and_two_processes_and_stops_a_run_past_its_timeout(tmp_path):
    """bench/gpu_runs.py on the CPU (gloo, tiny model): the precompile, a 1- and a 2-process run of the real
    trainer and the efficiency table; then a run stopped by --run-timeout is reported failed, not waited for."""
    out = tmp_path / "out"
    common = [sys.executable, str(ROOT / "bench" / "gpu_runs.py"), "--work", str(tmp_path / "work"), "--out", str(out),
              "--tiny", "--device", "cpu", "--steps", "4", "--skip", "1", "--workers", "0"]
    result = subprocess.run([*common, "--scaling", "1,2", "--precompile"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "precompiled precompile1, precompile2" in result.stdout
    rows = [line for line in result.stdout.splitlines() if line.startswith("| 1 |") or line.startswith("| 2 |")]
    assert len(rows) == 2 and "failed" not in "".join(rows)
    reports = json.loads((out / "gpu_runs.json").read_text())
    assert (reports["gpus1"]["world_size"], reports["gpus2"]["world_size"]) == (1, 2)
    assert reports["gpus2"]["global_step"] == 4 and (out / "gpus2.log").is_file()

    stopped = subprocess.run([*common, "--scaling", "1", "--run-timeout", "1"], capture_output=True, text=True,
                             timeout=120)
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    assert "gpus1: failed" in stopped.stdout and "stopped after 1 s" in stopped.stdout
    assert "| 1 | failed |" in stopped.stdout
