"""Checkpoints: whole or absent, resumable exactly, refused when they do not fit the run.

A checkpoint holds the LoRA weights (not the frozen U-Net), the optimizer, lr schedule and RNG states
(accelerate's save_state), and `sd_lora_checkpoint.json`: the run's fingerprint, which resume checks, and
the counters a report covers the whole run with. `RunState` is where the loop is; `resume` rebuilds it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from sd_lora.config import Config, global_batch_size
from sd_lora.errors import UserError
from sd_lora.files import save_safetensors, writing
from sd_lora.model import LORA_WEIGHT_NAME, lora_state_dict, peft_state_dict

log = logging.getLogger(__name__)

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
CHECKPOINT_META = "sd_lora_checkpoint.json"  # in each checkpoint: what it fits (run_fingerprint), the run's counters


@dataclass
class RunState:
    global_step: int = 0
    first_epoch: int = 0
    resume_batches: int = 0  # batches of first_epoch already consumed before the resume
    last_loss: float | None = None
    validation_loss: float | None = None
    validation_loss_step: int | None = None
    # kept in each checkpoint, so that a resumed run reports them for the whole run
    nonfinite_skipped_steps: int = 0  # steps left out for a NaN/Inf loss (trainer.on_nonfinite_loss=skip)
    grad_scaler_skipped_steps: int = 0  # fp16: steps the grad scaler skipped on an overflow (normal, not an error)
    skipped_image_rows: set = field(default_factory=set)  # rows whose image cannot be decoded (dataset.on_bad_image=skip)
    long_captions: int = 0  # training rows with a caption the tokenizer cuts (data.long_captions), counted at the start
    resumed_from: str | None = None
    start_step: int = 0  # the step this process started from (a resumed checkpoint's)
    max_train_steps: int | None = None  # the run's length, kept in each checkpoint (finished_run reads it)
    fingerprint: dict = field(default_factory=dict)  # what a checkpoint of this run fits (see run_fingerprint)
    guard: object = None  # the run's guard.NonFiniteGuard
    losses: object = None  # [sum, count] of the finite losses since the last log, on the device (in checkpoints)
    stopped_by: str | None = None  # the signal that stopped the run before its end (signals.StopRequest)
    saved_step: int | None = None  # the step of the checkpoint this process saved last


def checkpoint_lora_file(prefix: str) -> str:
    """The file in a checkpoint that holds the LoRA of the module the LoRA file prefixes with `prefix`."""
    return "lora.safetensors" if prefix == "unet" else f"lora_{prefix}.safetensors"


def register_checkpoint_hooks(accelerator, modules: dict) -> None:
    """Checkpoints hold the LoRA weights only (not the frozen 3 GB U-Net), plus optimizer/scheduler/RNG.

    `modules`: the prepared trained modules under the LoRA file's prefixes (`{"unet": ..., "text_encoder": ...}`);
    each one's LoRA goes into its own file (checkpoint_lora_file).
    """
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    def base(model):
        return accelerator.unwrap_model(model, keep_torch_compile=False)

    prefixes = {id(base(model)): prefix for prefix, model in modules.items()}

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            for model in models:
                module = base(model)
                save_safetensors(lora_state_dict(module), Path(output_dir) / checkpoint_lora_file(prefixes[id(module)]))
        while weights:
            weights.pop()

    def load_hook(models, input_dir):
        while models:
            module = base(models.pop())
            file = Path(input_dir) / checkpoint_lora_file(prefixes[id(module)])
            if not file.is_file():
                raise UserError(f"checkpoint {input_dir} holds no {file.name}: it was made without the "
                                f"{prefixes[id(module)]} LoRA this run trains (model.lora.train_text_encoder); resume "
                                "with the settings it was made with, or start a new run")
            result = set_peft_model_state_dict(module, peft_state_dict(module, load_file(str(file))),
                                               adapter_name="default")
            unexpected = getattr(result, "unexpected_keys", None)
            if unexpected:
                raise UserError(f"checkpoint {input_dir} does not fit this model: unexpected keys {unexpected[:3]}")

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[Path]:
    found = [p for p in checkpoint_dir(run_dir).glob("checkpoint-*") if CHECKPOINT_RE.match(p.name) and p.is_dir()]
    return sorted(found, key=lambda p: int(CHECKPOINT_RE.match(p.name).group(1)))


def last_good_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint that is complete and intact (its manifest verified); its weights were checked finite
    before it was written."""
    for path in reversed(list_checkpoints(run_dir)):
        if (path / CHECKPOINT_META).is_file() and damage(path) is None:
            return path
    return None


def _remove(path: Path) -> None:
    """Delete a checkpoint folder so that a kill midway leaves no partial checkpoint-<step> behind."""
    doomed = path.with_name(f".old-{path.name}")
    path.rename(doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _fsync(path: Path) -> None:
    """Flush a file or folder to disk: best effort, some file systems refuse it for folders."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(accelerator, cfg: Config, run_dir: Path, state: RunState) -> Path:
    """Save a resumable checkpoint whole or not at all; then keep at most `checkpoints_total_limit`.

    Everything goes into checkpoints/.tmp-checkpoint-<step>, which is renamed to checkpoint-<step>
    once complete and flushed (a rename inside one folder is atomic): a kill at any moment leaves the
    new checkpoint whole or absent, and `latest` (the highest checkpoint-<step>) is always whole.
    Its sd_lora_checkpoint.json lists every file's size and sha256, so that a resume notices a file
    damaged since. Older checkpoints are removed only after that rename; a write that fails (a full
    disk) leaves them too, and says so in one message. Called by every process (collective).
    """
    from accelerate.utils import gather_object

    state.guard.check(state.global_step)  # never save weights that a NaN/Inf has reached
    root = checkpoint_dir(run_dir)
    target, tmp = root / f"checkpoint-{state.global_step}", root / f".tmp-checkpoint-{state.global_step}"
    earlier = list_checkpoints(run_dir)
    kept = f"The previous checkpoint {earlier[-1]} is kept" if earlier else "No earlier checkpoint was saved"
    try:
        with writing(tmp, "the checkpoint", kept):
            if accelerator.is_main_process:
                for stale in [*root.glob(".tmp-checkpoint-*"), *root.glob(".old-checkpoint-*")]:  # from a killed run
                    shutil.rmtree(stale, ignore_errors=True)
                tmp.mkdir(parents=True)
            accelerator.wait_for_everyone()
            accelerator.save_state(str(tmp))
            state.skipped_image_rows = set().union(*gather_object([sorted(state.skipped_image_rows)]))
            state.grad_scaler_skipped_steps += state.guard.take_scaler_skips()
            losses = (None if state.losses is None  # all processes' sums; a sync, where the save waits anyway
                      else accelerator.reduce(state.losses.clone(), reduction="sum").tolist())
            accelerator.wait_for_everyone()  # every process has written its part (random_states_<rank>.pkl)
            if accelerator.is_main_process:
                # Test hook: tests/test_checkpoints.py kills the run here, with the checkpoint half written.
                if os.environ.get("SD_LORA_TEST_PAUSE_IN_CHECKPOINT") == str(state.global_step):
                    time.sleep(600)
                meta = {"format": 2, "step": state.global_step, "fingerprint": state.fingerprint,
                        "max_train_steps": state.max_train_steps,
                        "trainer.max_train_steps": cfg.trainer.max_train_steps,
                        "trainer.num_train_epochs": cfg.trainer.num_train_epochs,
                        "dataset.drop_last": cfg.dataset.drop_last,
                        "nonfinite_skipped_steps": state.nonfinite_skipped_steps,
                        "grad_scaler_skipped_steps": state.grad_scaler_skipped_steps,
                        "skipped_image_rows": sorted(state.skipped_image_rows),
                        "last_loss": state.last_loss, "validation_loss": state.validation_loss,
                        "validation_loss_step": state.validation_loss_step,
                        "losses_since_last_log": losses,  # [sum, count]: the next logged loss covers them too
                        "settings": result_settings(cfg),
                        "manifest": manifest(tmp)}
                (tmp / CHECKPOINT_META).write_text(json.dumps(meta, indent=2) + "\n")
                for file in tmp.rglob("*"):  # on disk before the rename, so that it also survives a power cut
                    if file.is_file():
                        _fsync(file)
                if target.exists():  # saved again, by a run resumed from an earlier checkpoint: the new one wins
                    _remove(target)
                tmp.rename(target)
                _fsync(root)
    except UserError:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if accelerator.is_main_process:
        if cfg.trainer.checkpoints_total_limit is not None:
            for old in list_checkpoints(run_dir)[: -cfg.trainer.checkpoints_total_limit]:
                _remove(old)
        log.info("checkpoint saved: %s", target)
    accelerator.wait_for_everyone()
    state.saved_step = state.global_step
    return target


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def manifest(folder: Path) -> dict:
    """Every file of a checkpoint folder (but its sd_lora_checkpoint.json): size in bytes and sha256."""
    return {str(f.relative_to(folder)): {"size": f.stat().st_size, "sha256": _sha256(f)}
            for f in sorted(folder.rglob("*")) if f.is_file() and f.name != CHECKPOINT_META}


def read_meta(path: Path) -> dict:
    """A checkpoint's sd_lora_checkpoint.json ({} for one made before sd_lora wrote it)."""
    file = path / CHECKPOINT_META
    return json.loads(file.read_text()) if file.is_file() else {}


def damage(path: Path) -> str | None:
    """What is wrong with checkpoint folder `path` against its manifest, or None when it is intact.
    (A checkpoint made before manifests were written is taken as intact.)"""
    try:
        meta = read_meta(path)
    except (OSError, ValueError) as exc:
        return f"{path / CHECKPOINT_META} cannot be read ({type(exc).__name__}: {exc})"
    for name, want in meta.get("manifest", {}).items():
        file = path / name
        if not file.is_file():
            return f"{file} is missing"
        size = file.stat().st_size
        if size != want["size"]:
            return f"{file} is {size} bytes, {want['size']} when it was saved (cut short or overwritten)"
        if _sha256(file) != want["sha256"]:
            return f"{file} differs from what was saved (its sha256 does not match: damaged on disk or overwritten)"
    return None


# Settings that change the trained result, kept in each checkpoint. A resume with another value either applies
# it on purpose (and logs it) or refuses it naming the key; none is dropped silently.
APPLIED_ON_RESUME = ("optimizer.lr", "optimizer.text_encoder_lr", "optimizer.scale_lr", "optimizer.betas", "optimizer.weight_decay",
                     "optimizer.eps", "optimizer.max_grad_norm", "trainer.snr_gamma", "trainer.noise_offset",
                     "trainer.train_batch_size", "trainer.gradient_accumulation_steps",
                     # the same parameters and function computed another way (its rounding differs): logged if changed
                     "model.lora.fused_matmul")
REFUSED_ON_RESUME = {  # key -> why it cannot change inside a run
    "trainer.seed": "every random draw of the run (noise, timesteps, crops, the data order) derives from it",
    "precision.mixed_precision": "the checkpoint's optimizer and grad-scaler state belong to its precision",
    "model.base_precision": "the checkpoint's LoRA was trained against the frozen weights in that precision",
    "optimizer.lr_scheduler": "the checkpoint's schedule is half run",
    "optimizer.lr_warmup_steps": "the checkpoint's schedule is half run",
    "optimizer.lr_warmup_fraction": "the checkpoint's schedule is half run",
    "optimizer.lr_num_cycles": "the checkpoint's schedule is half run",
    "optimizer.lr_power": "the checkpoint's schedule is half run",
    "optimizer.name": "the checkpoint's optimizer state belongs to its optimizer",
    "trainer.ema_decay": "the checkpoint's moving average keeps its own decay",
    "trainer.ema_start_step": "the checkpoint's moving average keeps its own start step",
    "dataset.buckets": "the batches, and so the position inside the epoch, are another set with buckets",
}


def result_settings(cfg: Config) -> dict:
    """The values of APPLIED_ON_RESUME and REFUSED_ON_RESUME in `cfg`, by dotted key, as JSON would hold them."""
    from enum import Enum

    def value(key):
        node = cfg
        for part in key.split("."):
            node = getattr(node, part)
        return node.value if isinstance(node, Enum) else list(node) if isinstance(node, (list, tuple)) else node

    return {key: value(key) for key in (*APPLIED_ON_RESUME, *REFUSED_ON_RESUME)}


# Settings added after checkpoints recorded settings: a checkpoint without one was trained with this value
BEFORE_THE_KEY = {"model.base_precision": None, "model.lora.fused_matmul": False}


def changed_settings(cfg: Config, meta: dict) -> dict:
    """key -> (value in the checkpoint, value now), for the result settings that differ."""
    saved, now = meta.get("settings", {}), result_settings(cfg)
    if saved:
        saved = {**BEFORE_THE_KEY, **saved}
    return {key: (saved[key], now[key]) for key in now if key in saved and saved[key] != now[key]}


# Fingerprint keys a checkpoint must match to be resumed, with what the message calls them. The model is
# identified by content (U-Net config and the start of its weights), so a moved model folder still fits.
FINGERPRINT_KEYS = {
    "model": "the model (U-Net config and weights)",
    "model.lora.rank": "model.lora.rank",
    "model.lora.alpha": "model.lora.alpha",
    "model.lora.target_modules": "model.lora.target_modules",
    "model.lora.text_encoder": "the text encoder LoRA (model.lora.train_text_encoder, text_encoder_rank, "
                               "text_encoder_alpha, text_encoder_target_modules)",
    "model.lora.use_dora": "model.lora.use_dora",
    "model.lora.init_lora_weights": "model.lora.init_lora_weights",
    "trainer.ema": "trainer.ema (the checkpoint holds the moving average only with it)",
    "training_samples": "the number of training samples (dataset.path, dataset.max_train_samples, "
                        "dataset.validation_split)",
}


def model_identity(model_path: Path, variant: str | None) -> str:
    """A short hash of the U-Net: its config and the first MiB of its weights file, wherever the folder lies."""
    unet = Path(model_path) / "unet"
    config = json.loads((unet / "config.json").read_text())
    digest = hashlib.sha256(json.dumps({k: v for k, v in config.items() if not k.startswith("_")},
                                       sort_keys=True).encode())
    stem = "diffusion_pytorch_model" + (f".{variant}" if variant else "")
    for name in (f"{stem}.safetensors", f"{stem}.bin", f"{stem}.safetensors.index.json", f"{stem}.bin.index.json"):
        if (unet / name).is_file():
            with open(unet / name, "rb") as f:
                digest.update(f.read(1 << 20))  # a safetensors header and the first tensors: cheap, and distinctive
            break
    return digest.hexdigest()[:16]


def run_fingerprint(cfg: Config, model_path: Path, table, num_processes: int) -> dict:
    """What a checkpoint of this run fits (FINGERPRINT_KEYS), and facts that are only warned about."""
    lora = cfg.model.lora
    return {
        "model": model_identity(model_path, cfg.model.variant),
        "model.lora.rank": lora.rank,
        "model.lora.alpha": lora.lora_alpha,
        "model.lora.target_modules": sorted(lora.target_modules),
        "model.lora.text_encoder": ({"rank": lora.text_rank, "alpha": lora.text_lora_alpha,
                                     "target_modules": sorted(lora.text_encoder_target_modules)}
                                    if lora.train_text_encoder else None),
        "model.lora.use_dora": lora.use_dora,
        "model.lora.init_lora_weights": lora.init_lora_weights.value,
        "trainer.ema": cfg.trainer.ema,
        "training_samples": len(table),
        # warned about only: a moved folder, or another batch layout (which shifts the position inside the epoch)
        "model_path": str(Path(model_path).resolve()),
        "global_batch_size": global_batch_size(cfg, num_processes),
    }


def find_resume_checkpoint(cfg: Config, run_dir: Path) -> Path | None:
    """The checkpoint `trainer.resume_from_checkpoint` names, checked against its manifest; None to start fresh.

    `latest` is the highest checkpoint-<step>; a damaged one is refused, naming the file and the newest intact one.
    `latest_valid` takes the newest intact one, saying which damaged ones it passed over."""
    value = cfg.trainer.resume_from_checkpoint
    if not value:
        return None
    if value in ("latest", "latest_valid"):
        found = list_checkpoints(Path(run_dir))
        if not found:
            log.warning("trainer.resume_from_checkpoint=%s: no checkpoint in %s; starting fresh", value,
                        checkpoint_dir(Path(run_dir)))
            return None
        for path in reversed(found):
            wrong = damage(path)
            if wrong is None:
                return path
            if value == "latest":
                good = last_good_checkpoint(Path(run_dir))
                offer = (f"the newest intact checkpoint is {good}: resume from it with "
                         f"trainer.resume_from_checkpoint=latest_valid" if good else
                         "no intact checkpoint is left: start afresh in a new run directory (hydra.run.dir)")
                raise UserError(f"trainer.resume_from_checkpoint=latest: checkpoint {path} is damaged: {wrong}; "
                                f"{offer}")
            log.warning("trainer.resume_from_checkpoint=latest_valid: passing over checkpoint %s: %s", path, wrong)
        log.warning("trainer.resume_from_checkpoint=latest_valid: no intact checkpoint in %s; starting fresh",
                    checkpoint_dir(Path(run_dir)))
        return None
    path = Path(value)
    if not path.is_dir() or not CHECKPOINT_RE.match(path.name):
        raise UserError(f"trainer.resume_from_checkpoint={value!r}: no checkpoint folder checkpoint-<step> at "
                        f"{path.resolve()}; give such a folder, 'latest' or 'latest_valid'")
    wrong = damage(path)
    if wrong is not None:
        raise UserError(f"trainer.resume_from_checkpoint={value!r}: checkpoint {path} is damaged: {wrong}; give an "
                        f"earlier one, or trainer.resume_from_checkpoint=latest_valid for the newest intact one")
    return path


def check_resume(cfg: Config, run_dir: Path, fingerprint: dict) -> Path | None:
    """The checkpoint to resume from, refused (UserError naming each key) if it does not fit this run."""
    path = find_resume_checkpoint(cfg, run_dir)
    if path is None:
        return None
    meta_file = path / CHECKPOINT_META
    if not meta_file.is_file():
        log.warning("checkpoint %s has no %s (made by an older sd_lora): not checked against this run",
                    path, CHECKPOINT_META)
        return path
    saved = read_meta(path).get("fingerprint", {})
    differ = [key for key in FINGERPRINT_KEYS if key in saved and saved[key] != fingerprint[key]]
    if differ:
        def shown(fp: dict, key: str):  # the model's fingerprint is a hash: show its folder instead
            return fp.get("model_path") if key == "model" else fp[key]

        parts = [f"{FINGERPRINT_KEYS[key]}: {shown(saved, key)!r} in the checkpoint, {shown(fingerprint, key)!r} now"
                 for key in differ]
        raise UserError(f"trainer.resume_from_checkpoint: {path} does not fit this run; " + "; ".join(parts)
                        + ". Resume with the settings the checkpoint was made with, or start a new run in another "
                          "run directory (hydra.run.dir)")
    refused = {key: was for key, was in changed_settings(cfg, read_meta(path)).items() if key in REFUSED_ON_RESUME}
    if refused:
        raise UserError(f"trainer.resume_from_checkpoint: {path} was made with other settings; " + "; ".join(
            f"{key}: {old!r} in the checkpoint, {new!r} now ({REFUSED_ON_RESUME[key]})"
            for key, (old, new) in refused.items()) + ". Resume with the checkpoint's values, or start a new run in "
            "another run directory (hydra.run.dir)")
    for key, why in (("model_path", "the model folder moved; its content is the same"),
                     ("global_batch_size", "the position inside the epoch is taken from the step count, so some "
                                           "samples of this epoch are seen twice or not at all")):
        if key in saved and saved[key] != fingerprint[key]:
            log.warning("resuming %s: %s was %r and is %r now (%s)", path, key, saved[key], fingerprint[key], why)
    return path


def outputs_written(run_dir: Path) -> bool:
    """Whether the run directory holds its LoRA file and report (what a finished run leaves)."""
    return (run_dir / "report.json").is_file() and (run_dir / "lora" / LORA_WEIGHT_NAME).is_file()


def finished_run(cfg: Config, path: Path, fingerprint: dict) -> bool:
    """Whether checkpoint `path` is already the end of the run `cfg` asks for and that run's LoRA and report are
    written, so that resuming it has nothing to do. Known before any weights load: from trainer.max_train_steps,
    or, for a run counted in epochs, from the run length the checkpoint recorded under the same epochs, samples,
    global batch and drop_last (anything else may give another length: the run then goes the normal way)."""
    if not outputs_written(path.parent.parent):
        return False  # the run stopped before writing them: resuming writes them
    step = int(CHECKPOINT_RE.match(path.name).group(1))
    if cfg.trainer.max_train_steps:
        return step >= cfg.trainer.max_train_steps
    meta = read_meta(path)
    recorded, saved = meta.get("max_train_steps"), meta.get("fingerprint", {})
    same_length = (meta.get("trainer.max_train_steps") is None
                   and meta.get("trainer.num_train_epochs") == cfg.trainer.num_train_epochs
                   and meta.get("dataset.drop_last") == cfg.dataset.drop_last
                   and all(saved.get(k) == fingerprint[k] for k in ("training_samples", "global_batch_size")))
    return recorded is not None and step >= recorded and same_length


def resume(accelerator, cfg: Config, path: Path, steps_per_epoch: int, optimizer=None, lr_scheduler=None) -> RunState:
    """Load a checkpoint (LoRA, optimizer, lr schedule, RNG, accumulation counter) and where the run was; apply
    the result settings that changed since (logged, one line each)."""
    import torch

    try:
        accelerator.load_state(str(path))
    except (OSError, EOFError, RuntimeError, ValueError) as exc:  # an older checkpoint without a manifest
        if isinstance(exc, UserError):
            raise
        raise UserError(f"checkpoint {path} cannot be loaded ({type(exc).__name__}: {exc}); resume from an earlier "
                        f"one (trainer.resume_from_checkpoint=<its folder>) or start afresh") from None
    step = int(CHECKPOINT_RE.match(path.name).group(1))
    meta = read_meta(path)
    log.info("resumed from %s at step %d", path, step)
    if optimizer is not None:
        apply_changed_settings(cfg, meta, optimizer, lr_scheduler, accelerator.num_processes)
    consumed = step * cfg.trainer.gradient_accumulation_steps
    batches_per_epoch = steps_per_epoch * cfg.trainer.gradient_accumulation_steps
    losses = torch.zeros(2, device=accelerator.device)
    if meta.get("losses_since_last_log") and accelerator.is_main_process:  # the sums of all processes, held once
        losses += torch.tensor(meta["losses_since_last_log"], device=accelerator.device)
    return RunState(global_step=step, start_step=step, first_epoch=step // steps_per_epoch, resume_batches=consumed % batches_per_epoch,
                    resumed_from=str(path), nonfinite_skipped_steps=meta.get("nonfinite_skipped_steps", 0),
                    grad_scaler_skipped_steps=meta.get("grad_scaler_skipped_steps", 0),
                    skipped_image_rows=set(meta.get("skipped_image_rows", [])), last_loss=meta.get("last_loss"),
                    validation_loss=meta.get("validation_loss"), validation_loss_step=meta.get("validation_loss_step"),
                    losses=losses)


def apply_changed_settings(cfg: Config, meta: dict, optimizer, lr_scheduler, num_processes: int) -> None:
    """The optimizer settings that differ from the checkpoint's, put into the optimizer and the schedule that
    load_state has just brought back with the old ones (the rest are read from the config at each step)."""
    from sd_lora.config import OptimizerName
    from sd_lora.optim import param_groups

    changed = changed_settings(cfg, meta)
    o = cfg.optimizer
    # Adafactor's relative step: its AdafactorSchedule has base_lrs 0 and no group lr is used; nothing to rescale
    relative = o.name is OptimizerName.adafactor and o.adafactor.relative_step
    scale = global_batch_size(cfg, num_processes) if o.scale_lr else 1  # as optim.build_optimizer has it
    # each group's peak as optim.param_groups makes them: the U-Net's first, then the text encoders'
    peaks = [g["lr"] for g in param_groups(cfg, {"unet": [], **{f"text_{i}": [] for i in
                                                                 range(len(optimizer.param_groups) - 1)}}, scale)]
    schedule = getattr(lr_scheduler, "scheduler", lr_scheduler)  # accelerate wraps it
    if not relative and any(old != base for old, base in zip(schedule.base_lrs, peaks)):  # a new lr, or scale_lr with a new layout
        if not {"optimizer.lr", "optimizer.text_encoder_lr", "optimizer.scale_lr"} & set(changed):
            log.warning("resumed with the peak learning rate changed %s -> %s (optimizer.scale_lr=true with another "
                        "batch layout)", schedule.base_lrs[0], peaks[0])
        for i, (group, base) in enumerate(zip(optimizer.param_groups, peaks)):
            group["lr"] = group["lr"] * base / schedule.base_lrs[i]  # the schedule's factor at this step, new peak
            group["initial_lr"] = schedule.base_lrs[i] = base
        schedule._last_lr = [group["lr"] for group in optimizer.param_groups]
    for key, name, value in (("optimizer.betas", "betas", tuple(o.betas)),
                             ("optimizer.weight_decay", "weight_decay", o.weight_decay), ("optimizer.eps", "eps", o.eps)):
        if key in changed:  # only where the optimizer has the setting, in this form
            for group in optimizer.param_groups:
                if name in group and type(group[name]) is type(value):
                    group[name] = value
    for key, (old, new) in changed.items():
        log.warning("resumed with %s changed %s -> %s", key, old, new)
