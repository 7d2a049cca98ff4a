"""What the bench scripts share: running the real trainer (`python launch.py`) and reading back its report,
filling Inductor's cache side by side, and the facts (card, versions) every table is printed under."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def base_overrides(device: str, model, data, resolution: int, workers: int, batch: int, work, steps: int,
                   skip: int) -> list[str]:
    """What every bench run of the trainer sets: model, data at `resolution` (centre crop, random flip), loader,
    batch, fp16 on CUDA (fp32 on the CPU), `steps` steps of which `skip` untimed, the embedding cache under
    <work>/cache, no validation images, no checkpoints but the last."""
    return [f"device={device}", f"precision={'fp16' if device == 'cuda' else 'fp32'}",
            f"trainer.max_train_steps={steps}", f"trainer.skip_steps={skip}",
            f"model.pretrained_model_name_or_path={model}", f"dataset.path={data}",
            f"dataset.resolution={resolution}", "dataset.center_crop=true", "dataset.random_flip=true",
            f"dataset.num_workers={workers}", f"trainer.train_batch_size={batch}", "trainer.validation_prompts=[]",
            "trainer.checkpointing_steps=null", f"dataset.cache_dir={Path(work) / 'cache'}"]


def trainer_command(run_dir: Path, overrides: list[str]) -> list[str]:
    """`python launch.py OVERRIDES hydra.run.dir=RUN_DIR`: the loop users run, never a bench-only path."""
    return [sys.executable, str(ROOT / "launch.py"), *overrides, f"hydra.run.dir={run_dir}"]


def run_trainer(name: str, overrides: list[str], run_dir: Path, out: Path, timeout: float | None = None,
                env: dict | None = None) -> dict:
    """Run the trainer; its output goes to <out>/<name>.log, rank 0's profile table and busy-time summary (with
    trainer.profile_steps) to <out>/<name>-profile.txt and .summary.txt. Returns report.json plus
    `process_wall_s`, or {"error": ...}. A run past `timeout` seconds is stopped with its worker processes
    (it runs in its own process group): one hung run must not take the rest of a device call."""
    start = time.perf_counter()
    proc = subprocess.Popen(trainer_command(run_dir, overrides), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    stdout, stderr = communicate(proc, timeout, run_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.log").write_text(stdout[-20000:] + stderr[-20000:])
    finished = "done: LoRA" in stdout + stderr and (run_dir / "report.json").is_file()
    if proc.returncode != 0 and not finished:
        print(f"{name}: failed (exit {proc.returncode}):\n{stderr[-3000:]}", flush=True)
        return {"error": stderr[-500:]}
    if proc.returncode != 0:  # stopped at its deadline after its last step: the report it wrote is whole
        print(f"{name}: stopped (exit {proc.returncode}) after it had written its report", flush=True)
    for kind in ("txt", "summary.txt"):
        table = run_dir / "profile" / f"rank0.{kind}"
        if table.is_file():
            (out / f"{name}-profile.{kind}").write_text(table.read_text())
    report = json.loads((run_dir / "report.json").read_text())
    report["process_wall_s"] = time.perf_counter() - start
    return report


def communicate(proc: subprocess.Popen, timeout: float | None, run_dir: Path) -> tuple[str, str]:
    """(stdout, stderr) of a trainer started in its own process group; past `timeout` seconds the whole group
    (its worker processes too) is killed and stderr ends with the note and the tail of its launch.log."""
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
        return stdout or "", stderr or ""  # "" for an output sent to a file
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:  # it ended in between
            pass
        stdout, stderr = proc.communicate()
        log_file = run_dir / "launch.log"
        return stdout or "", (stderr or "") + (f"\nstopped after {timeout:g} s; launch.log ends:\n"
                                               + (log_file.read_text()[-3000:] if log_file.is_file() else ""))


def precompile(jobs: list[tuple[str, list[str], Path, dict | None]], timeout: float | None = None,
               out: Path | None = None) -> None:
    """Run the trainer jobs (name, overrides, run dir, extra environment) at once for 2 steps each, so that
    each fills Inductor's on-disk cache with its graphs while the others compile too; the timed runs after
    it find their graphs there. A cold compile of the SD 2.1 U-Net takes minutes: in a row, several would
    not fit one device call. With trainer.compile off this only builds the embedding cache. A job still
    running `timeout` seconds after the start is stopped (with its worker processes) and reported failed. Each
    job's output ends up in <out>/<name>.log too."""
    started, procs = time.perf_counter(), []
    for name, overrides, run_dir, env in jobs:
        cmd = trainer_command(run_dir, [*overrides, "trainer.max_train_steps=2", "trainer.skip_steps=0",
                                        "trainer.profile_steps=0"])
        run_dir.mkdir(parents=True, exist_ok=True)
        # output to a file, not a pipe read one job after another: a job that fills its pipe would stop compiling
        output = open(run_dir / "precompile.out", "w")
        procs.append((name, run_dir, output, subprocess.Popen(cmd, stdout=output, stderr=subprocess.STDOUT,
                                                              start_new_session=True, env={**os.environ, **(env or {})})))
    for name, run_dir, output, proc in procs:
        left = None if timeout is None else max(timeout - (time.perf_counter() - started), 0.1)
        _, note = communicate(proc, left, run_dir)
        output.close()
        text = (run_dir / "precompile.out").read_text(errors="replace")
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            (out / f"{name}.log").write_text(text[-40000:] + (note or ""))
        if proc.returncode != 0:
            print(f"precompile {name} failed (exit {proc.returncode}):\n{text[-1500:]}{note or ''}", flush=True)
    print(f"precompiled {', '.join(name for name, *_ in procs)} in {time.perf_counter() - started:.0f} s", flush=True)


def facts(device: str) -> dict:
    """The card and the versions a number needs beside it."""
    import accelerate
    import diffusers
    import peft
    import torch
    import transformers

    found = {"torch": torch.__version__, "device": device, "diffusers": diffusers.__version__,
             "transformers": transformers.__version__, "peft": peft.__version__, "accelerate": accelerate.__version__}
    if device == "cuda":
        found["card"] = torch.cuda.get_device_name()
        found["gpus"] = torch.cuda.device_count()
    return found
