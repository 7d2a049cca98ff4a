"""GPU runs of the real trainer (`python launch.py`) on the SD 2.1 architecture with random weights.

    python bench/gpu_runs.py --work /tmp/gpu --attention      # fp16/bf16 x sdp/eager, 20 steps each
    python bench/gpu_runs.py --work /tmp/gpu --scaling 1,2,4  # samples/s on 1, 2, 4 GPUs, one Hydra job each
    python bench/gpu_runs.py --work /tmp/gpu --scaling 1,2 --tiny --device cpu --steps 4  # try it out on a CPU (gloo)

--attention: 768 px, batch 4, no speed levers (perf=none), 20 steps (5 untimed): both attention
backends under both precisions must finish with a finite loss; prints s/step and peak memory.
--scaling: 768 px, batch 4 per GPU, fp16, sdp, cached latents and text embeddings, channels_last, no
compile; device.num_processes=N from one Hydra job. Efficiency = N-GPU samples/s / (N x 1-GPU samples/s),
from the mean step time and from the median of per-step times. --extra adds overrides (e.g. perf=throughput;
trainer.profile_steps=5 also copies rank 0's operator table and busy-time summary of each run to
<out>/<run>-profile.txt and .summary.txt).
--concurrent N: N unrelated 1-GPU jobs at once, one per GPU: what sharing the host costs without all-reduce.
--precompile [COUNTS] (with --extra perf=throughput): compile every process count's graphs (or those of COUNTS)
side by side first.
--run-timeout S: stop a run (its worker processes too) after S seconds and report it failed; the precompile
as a whole gets the same limit.
Every run's report.json goes into <out>/gpu_runs.json, its output into <out>/<run>.log.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import common  # noqa: E402  (bench/common.py, importable once bench/ is on the path)


ALL: dict[str, dict] = {}  # every run's report, rewritten to <out>/gpu_runs.json after each run
LOCK = threading.Lock()


def common_overrides(args) -> list[str]:
    """Model, data, loader, batch 4, precision, steps and cache of every run, the precompile's too."""
    return common.base_overrides(args.device, args.model, args.data, args.resolution, args.workers, 4, args.work,
                                 args.steps, args.skip)


def launch(name: str, overrides: list[str], args, env: dict | None = None) -> dict:
    report = common.run_trainer(name, [*common_overrides(args), *overrides], Path(args.work) / "runs" / name,
                                Path(args.out), timeout=args.run_timeout, env=env)
    if "error" in report:
        return report
    with LOCK:  # --concurrent runs finish in threads of their own
        ALL[name] = report
        (Path(args.out) / "gpu_runs.json").write_text(json.dumps(ALL, indent=2))

    def s(key):  # a per-step time is None on a device without timing events
        return "n/a" if report.get(key) is None else f"{report[key]:.4f}"

    print(f"{name}: {report['seconds_per_step']:.4f} s/step (median {s('seconds_per_step_median')}, "
          f"p90 {s('seconds_per_step_p90')}, max {s('seconds_per_step_max')}), "
          f"{report['samples_per_second']:.1f} samples/s, "
          f"peak {report['peak_memory_gib']:.2f} GiB, loss {report['final_loss']:.4f}, "
          f"{report['compiled_graphs']} graphs compiled ({report['cudagraph_skips']} without CUDA graphs), "
          f"{report['process_wall_s']:.0f} s", flush=True)
    return report


def visible(n: int, args) -> dict:
    """The environment that gives a job GPUs 0..n-1 (on the CPU, nothing)."""
    return {"CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in range(n))} if args.device == "cuda" else {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/sd_lora_gpu")
    parser.add_argument("--out", default=None)
    parser.add_argument("--attention", action="store_true")
    parser.add_argument("--scaling", default="")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--skip", type=int, default=10, help="untimed steps at the start of each scaling run")
    parser.add_argument("--concurrent", type=int, default=0,
                        help="also run this many independent 1-GPU jobs at once, one per GPU, no DDP")
    parser.add_argument("--precompile", nargs="?", const="all", default="",
                        help="fill Inductor's cache side by side before timing: for every --scaling count, or for "
                             "the comma-separated counts given (a 1-process job for the 1-GPU run, one multi-process "
                             "job: on 2026-11-28 a 2-GPU run found a 4-process job's graph in the cache)")
    parser.add_argument("--run-timeout", type=float, default=None,
                        help="seconds after which a run is stopped and reported failed (default: none)")
    parser.add_argument("--extra", default="", help="more overrides for the scaling runs, comma-separated")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--tiny", action="store_true",
                        help="the tiny demo model at 64 px instead of SD 2.1 at 768 (try this script out on a CPU)")
    parser.add_argument("--workers", type=int, default=4)
    args = parser.parse_args()
    work = Path(args.work)
    args.out = Path(args.out or work)
    args.out.mkdir(parents=True, exist_ok=True)

    from sd_lora.demo import ensure_tiny_model, write_shapes

    args.resolution = 64 if args.tiny else 768
    args.model = ensure_tiny_model(work / "models") if args.tiny else __import__("sd21").build_sd21(work / "sd21")
    args.data = work / f"shapes{args.resolution}"
    if not (args.data / "metadata.jsonl").is_file():
        write_shapes(args.data, size=args.resolution)
    print(json.dumps(common.facts(args.device)), flush=True)

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

    # --extra comes last: Hydra takes the last value given for a key
    scaling = ["model.attention=sdp", "perf=none", "dataset.cache=true", "dataset.drop_last=true",
               "trainer.channels_last=true", "trainer.log_every_n_steps=10", *[x for x in args.extra.split(",") if x]]
    counts = [int(x) for x in args.scaling.split(",") if x]
    precompiled = counts if args.precompile == "all" else [int(x) for x in args.precompile.split(",") if x]
    if precompiled:
        # one job per process count, side by side on GPUs 0..N-1 (they share the GPUs: compiling is the host's
        # work, and the step of this model needs under 10 GiB). The graph under DDP is not the one process's
        # (on the CPU, torch 2.13, a 2-process run compiled again after a 1-process one), so each count its own job
        common.precompile([(f"precompile{n}", [*common_overrides(args), *scaling, f"device.num_processes={n}"],
                            Path(args.work) / "runs" / f"precompile{n}", visible(n, args)) for n in precompiled],
                          timeout=args.run_timeout, out=Path(args.out))
    results = {}
    for n in counts:
        results[n] = launch(f"gpus{n}", [*scaling, f"device.num_processes={n}"], args)
    if args.concurrent:  # N unrelated 1-GPU jobs at once: what sharing the machine costs without any all-reduce
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(args.concurrent) as pool:
            list(pool.map(lambda i: launch(f"solo{i}", [*scaling, "device.num_processes=1"], args,
                                           env={"CUDA_VISIBLE_DEVICES": str(i)} if args.device == "cuda" else {}),
                          range(args.concurrent)))
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
