"""Measuring the training step, and keeping it steady: per-step times, a profiler, scheduled garbage collection."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from sd_lora.devices import Backend

log = logging.getLogger(__name__)


@contextlib.contextmanager
def scheduled_gc(every_n_steps: int | None):
    """trainer.gc_every_n_steps: no automatic garbage collection inside the loop; yields a per-step callback.

    Python collects when allocation counts cross its thresholds, at a moment no one picks: a pause of
    milliseconds in the thread that feeds the accelerator, in a different step on each process, and a
    synchronised step waits for the slowest process. Here the objects that live through the run are
    frozen out of the collector's view, and a collection of the young generations runs at the same
    optimizer step on every process (the scheme of torchtitan's `training.gc_freq`). The first step of
    this process (torch.compile's compilation, when it is on) leaves a great many objects behind: they are
    collected and frozen right after it, so that with trainer.skip_steps >= 1 that long collection falls in
    an untimed step (it still counts in the report's mean, which is wall time; not in any step's own time,
    since it follows the step's mark).
    """
    if every_n_steps is None:
        yield lambda step: None
        return
    import gc

    was_enabled = gc.isenabled()
    gc.collect()
    gc.freeze()
    gc.disable()
    first = True

    def after_step(step: int) -> None:
        nonlocal first
        if first:
            first = False
            gc.collect()
            gc.freeze()
        elif step % every_n_steps == 0:
            gc.collect(1)

    try:
        yield after_step
    finally:
        gc.unfreeze()
        if was_enabled:
            gc.enable()


DEVICE_EVENTS = ("kernel", "gpu_memcpy", "gpu_memset")


def kernel_category(name: str) -> str:
    """What a device kernel does, from its name (cuDNN, cuBLAS, Inductor and NCCL name theirs recognisably)."""
    n = name.lower()
    if n.startswith("triton"):  # Inductor names its kernels after the ops they fuse: "convolution", "convert", ...
        return "fused (Inductor)"
    if "nccl" in n:
        return "communication"
    # cuDNN's attention backward runs two helpers beside its main kernel (0.9 ms a step of SD 2.1 at 768 px on an
    # H200, docs/performance.md 2026-12-02 evening): cudnn::fusion::compute_dot_do_o_*, convert_dq_to_16bits
    if any(k in n for k in ("fmha", "flash", "attention", "sdpa", "mha_", "dot_do_o", "convert_dq")):
        return "attention"
    if any(k in n for k in ("fprop", "dgrad", "wgrad", "convolution", "implicit_gemm", "winograd", "conv2d")):
        return "convolution"
    if any(k in n for k in ("gemm", "nvjet", "cutlass", "xmma", "cublas", "splitk")):
        return "matmul"
    if any(k in n for k in ("adam", "foreach", "multi_tensor", "amp_")):
        return "optimizer, grad scaler"
    return "other"


def _union_length(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, -math.inf
    for start, stop in sorted(intervals):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def trace_summary(trace: dict) -> dict:
    """Per profiled step, from a torch.profiler chrome trace: host time, and on a GPU the device's busy time
    (union of its kernels, copies and fills) against the span from its first to its last, by kernel kind.

    A busy fraction well below 1 means the device waits for the host (launches, syncs, the data loader);
    near 1, only faster kernels or fewer FLOPs make the step faster.
    """
    events = trace.get("traceEvents", [])
    # the host's step annotations; the trace repeats each on the device's timeline ("gpu_user_annotation")
    steps = [e for e in events if e.get("cat") == "user_annotation" and str(e.get("name", "")).startswith("ProfilerStep#")
             and "dur" in e]
    n = max(len(steps), 1)
    device = [e for e in events if e.get("cat") in DEVICE_EVENTS and "dur" in e]
    summary: dict = {"steps": len(steps), "host_ms_per_step": sum(e["dur"] for e in steps) / 1000 / n,
                     "device_busy_fraction": None}
    if not device:
        return summary
    spans = [(float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in device]
    span = max(b for _, b in spans) - min(a for a, _ in spans)
    busy = _union_length(spans)
    by_kind: dict[str, list] = {}
    for e in device:
        kind = kernel_category(e["name"]) if e["cat"] == "kernel" else "copy, fill"
        entry = by_kind.setdefault(kind, [0.0, 0])
        entry[0] += float(e["dur"])
        entry[1] += 1
    summary.update(device_span_ms_per_step=span / 1000 / n, device_busy_ms_per_step=busy / 1000 / n,
                   device_busy_fraction=busy / span if span else None,
                   device_events_per_step=len(device) / n,
                   by_kind={k: {"ms_per_step": v[0] / 1000 / n, "events_per_step": v[1] / n}
                            for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1][0])})
    return summary


def format_trace_summary(s: dict) -> str:
    lines = [f"profiled steps: {s['steps']}", f"host time per step: {s['host_ms_per_step']:.2f} ms"]
    if s.get("device_busy_fraction") is not None:
        lines += [f"device span per step (first to last kernel): {s['device_span_ms_per_step']:.2f} ms",
                  f"device busy per step: {s['device_busy_ms_per_step']:.2f} ms "
                  f"({100 * s['device_busy_fraction']:.1f}% of the span)",
                  f"kernels, copies and fills per step: {s['device_events_per_step']:.0f}",
                  "", "| kind | ms per step (summed, overlaps counted twice) | events per step |", "|---|---|---|"]
        lines += [f"| {k} | {v['ms_per_step']:.2f} | {v['events_per_step']:.0f} |" for k, v in s["by_kind"].items()]
    return "\n".join(lines) + "\n"


class StepProfiler:
    """trainer.profile_steps=N: torch.profiler over N optimizer steps that follow skip_steps (and one warm-up step).

    Each process writes <run dir>/profile/rank<R>.trace.json (chrome://tracing, Perfetto) and rank<R>.txt,
    its operators by self device time (CPU time on the CPU), and rank<R>.summary.txt (`trace_summary`): how
    much of each step the device was busy, and with what kinds of kernel. The profiled steps run slower: read the speed
    from a run without profiling.
    """

    def __init__(self, steps: int, skip_steps: int, backend: Backend, run_dir: Path, rank: int):
        self.profiler = None
        if steps <= 0:
            return
        from torch.profiler import ProfilerActivity, profile, schedule

        self.out, self.rank, self.written = run_dir / "profile", rank, False
        self.last_step = max(skip_steps, 1) + steps  # the last optimizer step it covers
        self.device_time = backend.name == "cuda"
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device_time else [])
        self.profiler = profile(activities=activities, on_trace_ready=self._write,
                                schedule=schedule(skip_first=max(skip_steps - 1, 0), wait=0, warmup=1, active=steps,
                                                  repeat=1))
        self.profiler.start()

    def _write(self, prof) -> None:
        self.written = True
        self.out.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(self.out / f"rank{self.rank}.trace.json"))
        sort = "self_cuda_time_total" if self.device_time else "self_cpu_time_total"
        (self.out / f"rank{self.rank}.txt").write_text(prof.key_averages().table(sort_by=sort, row_limit=50) + "\n")
        try:  # a diagnostic: a trace it cannot read must not stop the training run
            summary = trace_summary(json.loads((self.out / f"rank{self.rank}.trace.json").read_text()))
            (self.out / f"rank{self.rank}.summary.txt").write_text(format_trace_summary(summary))
        except Exception as exc:  # noqa: BLE001
            log.warning("trainer.profile_steps: no busy-time summary (%s: %s); the trace and the table are written",
                        type(exc).__name__, exc)
            summary = {}
        if summary.get("device_busy_fraction") is not None:
            log.info("profile written to %s: the device was busy %.0f%% of the profiled steps (%.1f of %.1f ms a step)",
                     self.out, 100 * summary["device_busy_fraction"], summary["device_busy_ms_per_step"],
                     summary["device_span_ms_per_step"])
        else:
            log.info("profile written to %s", self.out)

    def step(self) -> None:
        if self.profiler is not None:
            self.profiler.step()

    def stop(self) -> None:
        if self.profiler is not None:
            self.profiler.stop()
            self.profiler = None
            if not self.written:
                log.warning("trainer.profile_steps: the run ended before optimizer step %d, the last one to profile; "
                            "nothing was written (lower trainer.profile_steps or trainer.skip_steps)", self.last_step)


@dataclass
class Timer:
    """Time of the optimizer steps after the first `skip_steps` of this process.

    Two measures: the mean, wall time over the timed steps with a device sync at both ends; and each step's
    own time, from a mark the backend puts between steps (a timing event on a GPU, so no host sync per step),
    read where the loop syncs anyway. The median of those is robust to the few slow steps (an epoch's
    first batch, a logging step) that the mean carries. Also the time to the first optimizer step, which
    holds torch.compile's compilation when it is on.
    """

    skip_steps: int
    backend: Backend
    steps: int = 0  # optimizer steps this process has done
    start: float | None = None
    end: float | None = None
    loop_start: float = field(default_factory=time.perf_counter)
    first_step_s: float | None = None
    marks: list = field(default_factory=list)  # step marks not yet read
    step_seconds: list = field(default_factory=list)  # each timed step's own time

    def __post_init__(self):
        if self.skip_steps == 0:
            self.start = self.loop_start
            self._mark()

    def _mark(self) -> None:
        mark = self.backend.step_mark()
        if mark is not None:
            self.marks.append(mark)

    def step(self) -> None:
        self.steps += 1
        if self.steps == 1:
            self.backend.synchronize()
            self.first_step_s = time.perf_counter() - self.loop_start
        if self.steps == self.skip_steps:
            self.backend.synchronize()
            self.start = time.perf_counter()
        if self.steps >= self.skip_steps:
            self._mark()

    def read_marks(self) -> None:
        """Turn the marks into step times; call where the device has been synchronised anyway."""
        if len(self.marks) > 1:
            self.step_seconds += [b.seconds_since(a) for a, b in zip(self.marks, self.marks[1:])]
            del self.marks[:-1]

    def stop(self) -> None:
        self.backend.synchronize()
        self.end = time.perf_counter()
        self.read_marks()

    @property
    def timed_steps(self) -> int:
        return max(0, self.steps - self.skip_steps) if self.start is not None else 0

    def seconds_per_step(self) -> float | None:
        if self.end is None or self.timed_steps == 0:
            return None
        return (self.end - self.start) / self.timed_steps

    def step_stats(self) -> dict:
        """Median, 90th percentile and max of the per-step times (None where not measured)."""
        times = sorted(self.step_seconds)
        if not times:
            return {"median": None, "p90": None, "max": None}
        # p90 by nearest rank: the smallest time that at least 90% of the steps do not exceed
        return {"median": statistics.median(times), "p90": times[math.ceil(0.9 * len(times)) - 1], "max": times[-1]}
