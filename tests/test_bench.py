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
