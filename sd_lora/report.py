"""What a run writes about itself: report.json (the Enflame tutorial's fields and what was measured),
the config as JSON (the LoRA file's metadata) and as tensorboard hparams, and which experiment trackers
(`trainer.report_to`) get them. provenance.py says how the run was made (versions, commit, overrides)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from sd_lora.checkpoints import RunState
from sd_lora.compile_cache import CompileCache
from sd_lora.config import Config, Tracker, global_batch_size
from sd_lora.devices import Backend
from sd_lora.errors import UserError
from sd_lora.model import sdp_priority_order
from sd_lora.speed import SpeedPlan
from sd_lora.timing import Timer


def config_dict(cfg: Config) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True, enum_to_str=True)


# how a run was started, not what it trained: left out of the config a LoRA file carries, so that the same
# training gives the same file (provenance.json keeps them)
VOLATILE_KEYS = (("trainer", "resume_from_checkpoint"),)


def config_json(cfg: Config) -> str:
    """The config as a LoRA file's metadata: sorted keys, without VOLATILE_KEYS."""
    config = config_dict(cfg)
    for section, key in VOLATILE_KEYS:
        config[section].pop(key, None)
    return json.dumps(config, sort_keys=True)


# a tracker from an optional package -> (its module, the pyproject extra that installs it)
TRACKER_EXTRAS = {Tracker.wandb: ("wandb", "wandb"), Tracker.mlflow: ("mlflow", "mlflow"), Tracker.aim: ("aim", "aim"),
                  Tracker.comet_ml: ("comet_ml", "comet")}


def check_trackers(cfg: Config) -> None:
    """UserError, before any work, naming the install line of a tracker in trainer.report_to that is not installed
    (accelerate would only leave it out, with a debug message)."""
    import importlib.util

    missing = [(t, *TRACKER_EXTRAS[t]) for t in cfg.trainer.report_to
               if t in TRACKER_EXTRAS and importlib.util.find_spec(TRACKER_EXTRAS[t][0]) is None]
    if missing:
        extras = ",".join(extra for _, _, extra in missing)
        raise UserError(f"trainer.report_to={[t.value for t in cfg.trainer.report_to]}: "
                        + ", ".join(f"{t.value} needs the {module} package" for t, module, _ in missing)
                        + f", which {'is' if len(missing) == 1 else 'are'} not installed; install "
                        f"{'it' if len(missing) == 1 else 'them'} with: pip install -e \".[{extras}]\"")


def tensorboard_hparams(cfg: Config) -> dict:
    """Flat scalar hparams for tensorboard (it accepts no lists or None)."""
    flat = {}

    def walk(prefix, node):
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict):
                walk(name + ".", value)
            elif isinstance(value, (int, float, str, bool)):
                flat[name] = value
            else:
                flat[name] = str(value)

    walk("", config_dict(cfg))
    return flat


def _dist_backend() -> str | None:
    import torch.distributed as dist

    return dist.get_backend() if dist.is_available() and dist.is_initialized() else None


def build_report(cfg: Config, accelerator, backend: Backend, model_path: Path, state: RunState, timer: Timer,
                 max_train_steps: int, lora_file: Path | None, wall_time: float, speed: SpeedPlan,
                 compiled: CompileCache | None = None) -> dict:
    """report.json: the Enflame tutorial's fields, what was measured, the switches as applied, how the run went."""
    applied, graphs = speed.applied, speed.graphs_compiled()
    seconds_per_step = timer.seconds_per_step()
    stats = timer.step_stats()
    global_batch = global_batch_size(cfg, accelerator.num_processes)
    peak = backend.max_memory_allocated()
    compile_s = None if compiled is None else compiled.compile_s()
    if compile_s is None and graphs[0] and timer.first_step_s is not None and stats["median"] is not None:
        compile_s = max(timer.first_step_s - stats["median"], 0.0)  # a torch without compile_times()' timers
    return {
        # the fields of the Enflame tutorial's report
        "model": "sd_lora",
        "pretrained_model_name_or_path": cfg.model.pretrained_model_name_or_path,
        "resolution": cfg.dataset.resolution,
        "local_rank": accelerator.local_process_index,
        "batch_size": cfg.trainer.train_batch_size,
        "precision": cfg.precision.mixed_precision.value,
        "max_train_steps": max_train_steps,
        "device": backend.name.upper(),
        "skip_steps": cfg.trainer.skip_steps,
        # measured
        "samples_per_second": None if seconds_per_step is None else global_batch / seconds_per_step,
        "seconds_per_step": seconds_per_step,  # mean: wall time of the timed steps / their number
        "seconds_per_step_median": stats["median"],  # each step's own time (device events on a GPU)
        "seconds_per_step_p90": stats["p90"],
        "seconds_per_step_max": stats["max"],
        "samples_per_second_median": None if stats["median"] is None else global_batch / stats["median"],
        "timed_steps": timer.timed_steps,
        "first_step_s": timer.first_step_s,
        "compile_s": compile_s,  # compiling during this run (torch's compile_times(), main process), later recompiles too
        # trainer.compile_cache: path, loaded, saved; and the hits and misses of Inductor's and AOTAutograd's caches
        "compile_cache": None if compiled is None else compiled.report(),
        "peak_memory_bytes": peak,
        "peak_memory_gib": peak / 2**30,
        "peak_memory_kind": "process peak RSS" if backend.name == "cpu" else f"{backend.name} max_memory_allocated",
        "final_loss": state.last_loss,
        "validation_loss": state.validation_loss,
        "wall_time_s": wall_time,
        "world_size": accelerator.num_processes,
        "dist_backend": _dist_backend(),
        "global_batch_size": global_batch,
        "global_step": state.global_step,
        "device_name": backend.device_name(),
        "model_path": str(model_path.resolve()),
        "attention": cfg.model.attention.value,
        "sdp_kernel": cfg.model.sdp_kernel.value,
        "sdp_priority_order": sdp_priority_order(),  # as torch held it at the end of training
        # the speed switches: as configured, and as applied where the device or the data can refuse them
        "switches": {"compile": cfg.trainer.compile, "compile_mode": applied["compile_mode"],
                     "compile_encoders": applied["compile_encoders"],
                     "channels_last": cfg.trainer.channels_last, "kernel_autotune": applied["kernel_autotune"],
                     "gc_every_n_steps": cfg.trainer.gc_every_n_steps, "allow_tf32": cfg.trainer.allow_tf32,
                     "gradient_checkpointing": cfg.trainer.gradient_checkpointing,
                     "profile_steps": cfg.trainer.profile_steps,
                     "base_precision": cfg.model.base_precision and cfg.model.base_precision.value,
                     "fp8_layers": applied["fp8_layers"],  # the U-Net's Linear layers in float8
                     # model.lora.fused_matmul, and the U-Net LoRA layers it fused of all of them (None: not counted)
                     "fused_matmul": cfg.model.lora.fused_matmul, "fused_lora_layers": applied["fused_lora_layers"],
                     "lora_layers": applied["lora_layers"],
                     # read from torch (None: nothing compiled under DDP): True = split at DDP's buckets
                     "compile_ddp_split": (torch._dynamo.config.optimize_ddp in (True, "ddp_optimizer")
                                           if cfg.trainer.compile and accelerator.num_processes > 1 else None)},
        "compiled_graphs": graphs[0],  # by torch.compile during this run
        "cudagraph_skips": graphs[1],  # Inductor graphs (forward and backward apart) run without the CUDA graphs the mode asked for
        "lora_rank": cfg.model.lora.rank,
        "lora_alpha": cfg.model.lora.lora_alpha,
        "lora_path": None if lora_file is None else str(lora_file),  # None: stopped before the end
        "cache": cfg.dataset.cache,
        "seed": cfg.trainer.seed,
        # how the run went (kept across a resume); provenance.json says how it was made
        "resumed_from": state.resumed_from,
        "stopped_by_signal": state.stopped_by,  # e.g. SIGTERM: pre-empted at global_step, resume to finish
        "nonfinite_skipped_steps": state.nonfinite_skipped_steps,
        "grad_scaler_skipped_steps": state.grad_scaler_skipped_steps,
        "skipped_images": len(state.skipped_image_rows),
        "skipped_image_rows": sorted(state.skipped_image_rows)[:100],
        "long_captions": state.long_captions,  # training rows whose caption is cut to the tokenizer's limit
    }


def write_report(run_dir: Path, report: dict) -> Path:
    path = Path(run_dir) / "report.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path
