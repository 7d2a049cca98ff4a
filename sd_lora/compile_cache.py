"""What compiling cost a run, and trainer.compile_cache: torch's portable compile-cache artifacts (its
"mega-cache": Inductor's compiled graphs, AOTAutograd's forward/backward pairs, automatic-dynamic profiles,
autotuning results) kept in one file that a cluster ships to fresh nodes.

torch.compiler.save_cache_artifacts() serialises what this process compiled or found in its caches;
load_cache_artifacts() writes such a blob into this machine's on-disk caches (TORCHINDUCTOR_CACHE_DIR), where
the next compilation finds it. The file is that blob behind a short header (torch version, checksum), so that
a file from another torch version, or a damaged one, is one warning and a recompile, never a crash or a
blob torch half-reads. Only the main process writes it: every process compiles the same graphs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

log = logging.getLogger(__name__)

MAGIC = b"sd_lora compile cache\n"  # then one JSON line (format, torch version, sha256 of the payload), then torch's blob
FORMAT = 1
# torch._dynamo.utils.counters entries: Inductor's compiled-graph cache and AOTAutograd's forward/backward cache
COUNTERS = {"inductor_hits": ("inductor", "fxgraph_cache_hit"), "inductor_misses": ("inductor", "fxgraph_cache_miss"),
            "inductor_bypasses": ("inductor", "fxgraph_cache_bypass"),
            "autograd_hits": ("aot_autograd", "autograd_cache_hit"),
            "autograd_misses": ("aot_autograd", "autograd_cache_miss")}
# compile_times()' entries that hold compile time: a frame's whole compilation (Dynamo, AOTAutograd, Inductor,
# the C++ / Triton kernels), and the backward that AOTAutograd compiles lazily at the first backward pass
COMPILE_TIMERS = ("_compile.compile_inner", "backward._backward_impl")


def cache_counts() -> dict[str, int]:
    from torch._dynamo.utils import counters

    return {name: int(counters[group][key]) for name, (group, key) in COUNTERS.items()}


def compile_seconds() -> float | None:
    """Seconds this process has spent compiling so far, as torch's compile_times() sums them; None where this
    torch does not record the timers above."""
    from torch._dynamo.utils import compile_times

    names, values = compile_times(repr="csv", aggregate=True)
    times = dict(zip(names, values))
    if not any(name in times for name in COMPILE_TIMERS):
        return None if names else 0.0  # nothing timed at all: nothing compiled
    return sum(float(times.get(name, 0.0)) for name in COMPILE_TIMERS)


def resolve(path: str) -> Path:
    """trainer.compile_cache as a file: `~` expanded, a relative path from the directory the run was started in
    (Hydra 1.3 leaves the working directory as it is, as every other path of the config is read)."""
    return Path(path).expanduser().absolute()


@contextlib.contextmanager
def _quiet(logger_name: str):
    """torch logs a failed load with a traceback; the run says it in one line of its own."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def read_cache_file(path: Path) -> tuple[bytes | None, str]:
    """The payload of a compile-cache file and '' if it is whole and from this torch; else None and why not."""
    data = path.read_bytes()
    if not data.startswith(MAGIC):
        return None, "is not a compile cache this trainer wrote (or its start is damaged)"
    header, sep, payload = data[len(MAGIC):].partition(b"\n")
    try:
        meta = json.loads(header) if sep else None
    except ValueError:
        meta = None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        return None, "has a damaged or unknown header"
    if meta.get("torch") != torch.__version__:
        return None, f"was written by torch {meta.get('torch')}, this is torch {torch.__version__}"
    if meta.get("sha256") != hashlib.sha256(payload).hexdigest():
        return None, "is damaged (its checksum does not match)"
    return payload, ""


def write_cache_file(path: Path, payload: bytes) -> None:
    """Header and payload through a temporary file renamed into place: a node that reads it while another writes
    sees the old file or the new one. Plain file modes under the umask, so a team's shared copy is readable."""
    header = json.dumps({"format": FORMAT, "torch": torch.__version__, "sha256": hashlib.sha256(payload).hexdigest(),
                         "bytes": len(payload)}).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(MAGIC + header + b"\n" + payload)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _entries(info) -> str:
    """'3 inductor, 1 aot_autograd' from torch's CacheInfo."""
    artifacts = getattr(info, "artifacts", None) or {}
    return ", ".join(f"{len(keys)} {kind}" for kind, keys in artifacts.items()) or "no entries"


@dataclass
class CompileCache:
    """This run's compilation: the counters and timers at its start, the file loaded and saved."""

    path: Path | None  # trainer.compile_cache resolved, or None
    is_main_process: bool
    loaded: bool = False
    saved: bool = False
    counts_before: dict = field(default_factory=cache_counts)
    seconds_before: float | None = field(default_factory=compile_seconds)
    first_step_logged: bool = False
    saved_misses: int = -1  # misses counted when the file was last written

    def counts(self) -> dict[str, int]:
        """cache_counts() since the run started."""
        return {k: v - self.counts_before[k] for k, v in cache_counts().items()}

    def compile_s(self) -> float | None:
        now = compile_seconds()
        if now is None or self.seconds_before is None:
            return None
        return now - self.seconds_before

    def load(self) -> None:
        """Before the first compiled step: the file's artifacts into this machine's caches, or one warning."""
        if self.path is None:
            return
        if not self.path.is_file():
            if self.is_main_process:
                log.info("trainer.compile_cache: %s does not exist yet; it is written after the first step",
                         self.path)
            return
        start = time.perf_counter()
        try:
            payload, problem = read_cache_file(self.path)
            info = None
            if payload is not None:
                with _quiet("torch.compiler._cache"):
                    info = torch.compiler.load_cache_artifacts(payload)
                problem = "" if info is not None else "could not be read by torch"
        except Exception as exc:  # an unreadable file or one torch chokes on: a recompile, not a failed run
            problem = f"could not be loaded ({type(exc).__name__}: {exc})"
        if problem:
            if self.is_main_process:
                log.warning("trainer.compile_cache: %s %s: the graphs will be compiled and the file rewritten",
                            self.path, problem)
            return
        self.loaded = True
        if self.is_main_process:
            log.info("trainer.compile_cache: loaded %s (%s; %.1f MB) in %.2f s", self.path, _entries(info),
                     len(payload) / 1e6, time.perf_counter() - start)

    def after_step(self) -> None:
        """After each optimizer step; acts after the first: the compile log line, then the file written, so that
        a run pre-empted later still leaves it."""
        if self.first_step_logged:
            return
        self.first_step_logged = True
        counts, seconds = self.counts(), self.compile_s()
        if self.is_main_process and (seconds or counts["inductor_hits"] or counts["inductor_misses"]):
            log.info("compiled in %s (cache: %s)", "?" if seconds is None else f"{seconds:.1f} s", _hit_or_miss(counts))
            if counts["inductor_bypasses"]:
                log.warning("Inductor's cache passed by %d graph(s), so every start compiles them again%s; "
                            "TORCH_LOGS=inductor prints torch's reason", counts["inductor_bypasses"], _known_bypass())
            if self.loaded and counts["inductor_misses"]:
                log.info("trainer.compile_cache: %d graph(s) were not in %s (another device, model or config): "
                         "compiled, and the file is rewritten", counts["inductor_misses"], self.path)
        self.save()

    def save(self) -> None:
        """Write the file (main process) when this run compiled something the file did not hold: a graph missed by
        the caches, or no file loaded (absent, damaged, another torch). Called after the first step and at the end
        (a validation pass or a recompile may have added graphs since)."""
        if self.path is None or not self.is_main_process:
            return
        counts = self.counts()
        misses = counts["inductor_misses"] + counts["autograd_misses"]
        if self.saved_misses == misses or (self.loaded and not misses):
            return  # nothing new since the last write, or everything came from the file
        result = torch.compiler.save_cache_artifacts()
        if result is None:
            log.info("trainer.compile_cache: torch recorded no compile-cache artifacts (nothing compiled through "
                     "Inductor's caches); %s not written", self.path)
            return
        payload, info = result
        try:
            write_cache_file(self.path, payload)
        except OSError as exc:  # a cache that cannot be written slows the next start; it does not stop this run
            log.warning("trainer.compile_cache: could not write %s (%s); training goes on", self.path,
                        exc.strerror or exc)
            return
        self.saved, self.saved_misses = True, misses
        log.info("trainer.compile_cache: wrote %s (%s; %.1f MB)", self.path, _entries(info), len(payload) / 1e6)

    def report(self) -> dict:
        """report.json's compile_cache: the file, and the cache hits and misses of this run's compilations."""
        return {"path": None if self.path is None else str(self.path), "loaded": self.loaded, "saved": self.saved,
                **self.counts()}


def _known_bypass() -> str:
    """Why Inductor's cache passes graphs by, where this torch is known to: with gradient checkpointing on CUDA the
    recomputed attention replays its RNG state through the graphsafe_run_with_rng_state operator, which torch 2.11
    (seen on an H200, perf=memory) does not cache and later torch does (pytorch/pytorch#185562; 2.13 has it)."""
    try:
        import torch

        cacheable = torch.ops.higher_order.graphsafe_run_with_rng_state.cacheable()
    except (AttributeError, RuntimeError):  # a torch without the operator
        return ""
    return "" if cacheable else (
        f"; with gradient checkpointing on CUDA that is torch {torch.__version__}, which cannot cache the "
        "graphsafe_run_with_rng_state operator checkpointing puts in the graph (torch 2.13 can, "
        "pytorch/pytorch#185562)")


def _hit_or_miss(counts: dict[str, int]) -> str:
    hits, misses = counts["inductor_hits"], counts["inductor_misses"]
    if hits and not misses:
        return f"hit, {hits} graph(s)"
    if misses and not hits:
        return f"miss, {misses} graph(s) compiled"
    if hits or misses:
        return f"partial, {hits} of {hits + misses} graph(s) found"
    return "not used" + (f": {counts['inductor_bypasses']} graph(s) bypassed it" if counts["inductor_bypasses"] else "")


@contextlib.contextmanager
def compile_cache_scope(path: str | None, is_main_process: bool):
    """A CompileCache for the run, with torch's artifact recorder fresh for it: the file a run writes holds what
    it compiled or used, not what an earlier job of an in-process sweep did."""
    fresh = contextlib.nullcontext()
    try:
        from torch.compiler._cache import CacheArtifactManager

        fresh = CacheArtifactManager.with_fresh_cache()
    except (ImportError, AttributeError):  # another torch: the recorder is shared with earlier jobs, a superset
        pass
    with fresh:
        yield CompileCache(None if path is None else resolve(path), is_main_process)
