"""GPU runs of the real trainer (`python launch.py`) on the SD 2.1 architecture with random weights.

    python bench/gpu_runs.py --work /tmp/gpu --attention      # fp16/bf16 x sdp/eager, 20 steps each
    python bench/gpu_runs.py --work /tmp/gpu --scaling 1,2,4  # samples/s on 1, 2, 4 GPUs, one Hydra job each

--attention: 768 px, batch 4, no speed levers (perf=none), 20 steps (5 untimed): both attention
backends under both precisions must finish with a finite loss; prints s/step and peak memory.
--scaling: 768 px, batch 4 per GPU, fp16, sdp, cached latents and text embeddings, channels_last, no
compile; device.num_processes=N from one Hydra job. Efficiency = N-GPU samples/s / (N x 1-GPU samples/s),
from the mean step time and from the median of per-step times. --extra adds overrides (e.g. perf=throughput;
trainer.profile_steps=5 also copies rank 0's operator table and busy-time summary of each run to
<out>/<run>-profile.txt and .summary.txt).
--concurrent N: N unrelated 1-GPU jobs at once, one per GPU: what sharing the host costs without all-reduce.
--precompile (with --extra perf=throughput): compile every process count's graphs side by side first.
--run-timeout S: stop a run (its worker processes too) after S seconds and report it failed.
Every run's report.json goes into <out>/gpu_runs.json; logs stay in <work>.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


ALL: dict[str, dict] = {}  # every run's report, rewritten to <out>/gpu_runs.json after each run


def command(name: str, overrides: list[str], args) -> tuple[list[str], Path]:
    run_dir = Path(args.work) / "runs" / name
    return [sys.executable, str(ROOT / "launch.py"), "device=cuda", f"model.pretrained_model_name_or_path={args.model}",
           f"dataset.path={args.data}", "dataset.resolution=768", "dataset.center_crop=true",
           "dataset.random_flip=true", "dataset.num_workers=4", "trainer.train_batch_size=4",
           "trainer.validation_prompts=[]", "trainer.checkpointing_steps=null",
           f"dataset.cache_dir={Path(args.work) / 'cache'}", f"hydra.run.dir={run_dir}", *overrides], run_dir


def launch(name: str, overrides: list[str], args) -> dict:
    cmd, run_dir = command(name, overrides, args)
    start = time.perf_counter()
    # its own process group, so that a run stopped at --run-timeout takes its worker processes with it:
    # one hung run must not take the rest of a device call
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=args.run_timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        log_file = run_dir / "launch.log"
        err += (f"\nstopped after --run-timeout={args.run_timeout:g} s; launch.log ends:\n"
                + (log_file.read_text()[-3000:] if log_file.is_file() else ""))
    return finish(name, subprocess.CompletedProcess(cmd, proc.returncode, out, err), run_dir, start, args)


def finish(name: str, result, run_dir: Path, start: float, args) -> dict:
    (Path(args.work) / f"{name}.log").write_text(result.stdout[-20000:] + result.stderr[-20000:])
    if result.returncode != 0:
        print(f"{name}: failed (exit {result.returncode})\n{result.stderr[-2000:]}", flush=True)
        return {"error": result.stderr[-300:]}
    report = json.loads((run_dir / "report.json").read_text())
    report["process_wall_s"] = time.perf_counter() - start
    for kind in ("txt", "summary.txt"):  # with --extra trainer.profile_steps=N
        table = run_dir / "profile" / f"rank0.{kind}"
        if table.is_file():
            (Path(args.out) / f"{name}-profile.{kind}").write_text(table.read_text())
    ALL[name] = report
    (Path(args.out) / "gpu_runs.json").write_text(json.dumps(ALL, indent=2))
    def s(key):  # a per-step time is None on a device without timing events
        return "n/a" if report.get(key) is None else f"{report[key]:.4f}"

    print(f"{name}: {report['seconds_per_step']:.4f} s/step (median {s('seconds_per_step_median')}, "
          f"p90 {s('seconds_per_step_p90')}, max {s('seconds_per_step_max')}), "
          f"{report['samples_per_second']:.1f} samples/s, "
          f"peak {report['peak_memory_gib']:.2f} GiB, loss {report['final_loss']:.4f}, "
          f"{report['process_wall_s']:.0f} s", flush=True)
    return report


def overridden(base: list[str], extra: list[str]) -> list[str]:
    """`base` with every key that `extra` sets taken out, then `extra`."""
    keys = {x.split("=")[0] for x in extra}
    return [x for x in base if x.split("=")[0] not in keys] + extra


def precompile(counts: list[int], scaling: list[str], args) -> None:
    """Fill Inductor's on-disk cache before any timed run, side by side: one job per process count, 2 steps
    each, on GPUs 0..N-1 (they share the GPUs: compiling is the host's work, and the step of this model
    needs under 10 GiB). Every count gets its own job: a 4-GPU run with only the 2-GPU job's graphs in the
    cache did not reach its 30th step within 100 s on 2026-11-28. With trainer.compile off this only
    builds the embedding cache."""
    started, jobs = time.perf_counter(), []
    plan = [(n, ",".join(str(i) for i in range(n))) for n in counts]
    for n, gpus in plan:
        cmd, _ = command(f"precompile{n}", overridden(scaling, [f"device.num_processes={n}", "trainer.max_train_steps=2",
                                                                "trainer.skip_steps=0", "trainer.profile_steps=0"]), args)
        jobs.append((n, subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                         env={**os.environ, "CUDA_VISIBLE_DEVICES": gpus})))
    for n, proc in jobs:
        _, err = proc.communicate()
        if proc.returncode != 0:
            print(f"precompile with {n} GPU(s) failed (exit {proc.returncode}):\n{err[-1500:]}", flush=True)
    print(f"precompiled for {[n for n, _ in plan]} GPU(s) in {time.perf_counter() - started:.0f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/sd_lora_gpu")
    parser.add_argument("--out", default=None)
    parser.add_argument("--attention", action="store_true")
    parser.add_argument("--scaling", default="")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--concurrent", type=int, default=0,
                        help="also run this many independent 1-GPU jobs at once, one per GPU, no DDP")
    parser.add_argument("--precompile", action="store_true",
                        help="fill Inductor's cache for the scaling runs side by side before timing them")
    parser.add_argument("--run-timeout", type=float, default=None,
                        help="seconds after which a run is stopped and reported failed (default: none)")
    parser.add_argument("--extra", default="", help="more overrides for the scaling runs, comma-separated")
    args = parser.parse_args()
    work = Path(args.work)
    args.out = Path(args.out or work)
    args.out.mkdir(parents=True, exist_ok=True)

    from sd21 import build_sd21

    from sd_lora.demo import write_shapes

    args.model = build_sd21(work / "sd21")
    args.data = work / "shapes768"
    if not (args.data / "metadata.jsonl").is_file():
        write_shapes(args.data, size=768)

    rows = []
    if args.attention:
        for precision in ("fp16", "bf16"):
            for attention in ("sdp", "eager"):
                r = launch(f"{precision}-{attention}", [f"precision={precision}", f"model.attention={attention}",
                                                         "perf=none", "trainer.max_train_steps=20",
                                                         "trainer.skip_steps=5"], args)
                rows.append((f"{precision}, {attention}", r))
        print("\n| run | s/step | samples/s | peak allocated | final loss |\n|---|---|---|---|---|")
        for name, r in rows:
            if "error" in r:
                print(f"| {name} | failed | | | |")
                continue
            print(f"| {name} | {r['seconds_per_step']:.4f} | {r['samples_per_second']:.1f} | "
                  f"{r['peak_memory_gib']:.2f} GiB | {r['final_loss']:.4f} (finite: {math.isfinite(r['final_loss'])}) |")

    scaling = overridden(["precision=fp16", "model.attention=sdp", "perf=none", "dataset.cache=true",
                          "dataset.drop_last=true", "trainer.channels_last=true", "trainer.log_every_n_steps=10",
                          f"trainer.max_train_steps={args.steps}", "trainer.skip_steps=10"],
                         [x for x in args.extra.split(",") if x])
    counts = [int(x) for x in args.scaling.split(",") if x]
    if args.precompile and counts:
        precompile(counts, scaling, args)
    results = {}
    for n in counts:
        results[n] = launch(f"gpus{n}", [*scaling, f"device.num_processes={n}"], args)
    if args.concurrent:  # N unrelated 1-GPU jobs at once: what sharing the machine costs without any all-reduce
        started = time.perf_counter()
        jobs = []
        for i in range(args.concurrent):
            cmd, run_dir = command(f"solo{i}", [*scaling, "device.num_processes=1"], args)
            jobs.append((f"solo{i}", run_dir, subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                env={**os.environ, "CUDA_VISIBLE_DEVICES": str(i)})))
        for name, run_dir, proc in jobs:
            out, err = proc.communicate()
            finish(name, subprocess.CompletedProcess(proc.args, proc.returncode, out, err), run_dir, started, args)
    base = results.get(1, {}).get("samples_per_second")
    base_median = results.get(1, {}).get("samples_per_second_median")
    if results:
        print("\n| GPUs | world size | s/step mean (median, p90, max) | samples/s (all GPUs, mean) | efficiency (mean) "
              "| efficiency (median) | peak allocated (rank 0) |")
        print("|---|---|---|---|---|---|---|")
    for n, r in results.items():
        if "error" in r:
            print(f"| {n} | failed | | | | | |")
            continue
        eff = r["samples_per_second"] / (n * base) if base else float("nan")
        eff_median = r["samples_per_second_median"] / (n * base_median) if base_median else float("nan")
        print(f"| {n} | {r['world_size']} | {r['seconds_per_step']:.4f} ({r['seconds_per_step_median']:.4f}, "
              f"{r['seconds_per_step_p90']:.4f}, {r['seconds_per_step_max']:.4f}) | {r['samples_per_second']:.1f} | "
              f"{eff:.3f} | {eff_median:.3f} | {r['peak_memory_gib']:.2f} GiB |")

if __name__ == "__main__":
    main()
