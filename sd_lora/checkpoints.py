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
from sd_lora.files import save_safetensors
from sd_lora.model import LORA_WEIGHT_NAME, lora_state_dict

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
    resumed_from: str | None = None
    start_step: int = 0  # the step this process started from (a resumed checkpoint's)
    max_train_steps: int | None = None  # the run's length, kept in each checkpoint (finished_run reads it)
    fingerprint: dict = field(default_factory=dict)  # what a checkpoint of this run fits (see run_fingerprint)
    guard: object = None  # the run's guard.NonFiniteGuard


def register_checkpoint_hooks(accelerator, unet) -> None:
    """Checkpoints hold the LoRA weights only (not the frozen 3 GB U-Net), plus optimizer/scheduler/RNG."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            for model in models:
                base = accelerator.unwrap_model(model, keep_torch_compile=False)
                save_safetensors(lora_state_dict(base), Path(output_dir) / "lora.safetensors")
        while weights:
            weights.pop()

    def load_hook(models, input_dir):
        while models:
            model = accelerator.unwrap_model(models.pop(), keep_torch_compile=False)
            state = convert_unet_state_dict_to_peft(load_file(str(Path(input_dir) / "lora.safetensors")))
            result = set_peft_model_state_dict(model, state, adapter_name="default")
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
    Older checkpoints are removed only after that rename. Called by every process (collective).
    """
    from accelerate.utils import gather_object

    state.guard.check()  # never save weights that a NaN/Inf has reached
    root = checkpoint_dir(run_dir)
    target, tmp = root / f"checkpoint-{state.global_step}", root / f".tmp-checkpoint-{state.global_step}"
    if accelerator.is_main_process:
        for stale in [*root.glob(".tmp-checkpoint-*"), *root.glob(".old-checkpoint-*")]:  # from a killed run
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    state.skipped_image_rows = set().union(*gather_object([sorted(state.skipped_image_rows)]))
    state.grad_scaler_skipped_steps += state.guard.take_scaler_skips()
    accelerator.wait_for_everyone()  # every process has written its part (random_states_<rank>.pkl)
    if accelerator.is_main_process:
        # Test hook: tests/test_checkpoints.py kills the run here, with the checkpoint half written.
        if os.environ.get("SD_LORA_TEST_PAUSE_IN_CHECKPOINT") == str(state.global_step):
            time.sleep(600)
        meta = {"format": 1, "step": state.global_step, "fingerprint": state.fingerprint,
                "max_train_steps": state.max_train_steps, "trainer.max_train_steps": cfg.trainer.max_train_steps,
                "trainer.num_train_epochs": cfg.trainer.num_train_epochs, "dataset.drop_last": cfg.dataset.drop_last,
                "nonfinite_skipped_steps": state.nonfinite_skipped_steps,
                "grad_scaler_skipped_steps": state.grad_scaler_skipped_steps,
                "skipped_image_rows": sorted(state.skipped_image_rows)}
        (tmp / CHECKPOINT_META).write_text(json.dumps(meta, indent=2) + "\n")
        for file in tmp.rglob("*"):  # on disk before the rename, so that it also survives a power cut
            if file.is_file():
                _fsync(file)
        if target.exists():  # saved again, by a run resumed from an earlier checkpoint: the new one wins
            _remove(target)
        tmp.rename(target)
        _fsync(root)
        if cfg.trainer.checkpoints_total_limit is not None:
            for old in list_checkpoints(run_dir)[: -cfg.trainer.checkpoints_total_limit]:
                _remove(old)
        log.info("checkpoint saved: %s", target)
    accelerator.wait_for_everyone()
    return target


# Fingerprint keys a checkpoint must match to be resumed, with what the message calls them. The model is
# identified by content (U-Net config and the start of its weights), so a moved model folder still fits.
FINGERPRINT_KEYS = {
    "model": "the model (U-Net config and weights)",
    "model.lora.rank": "model.lora.rank",
    "model.lora.alpha": "model.lora.alpha",
    "model.lora.target_modules": "model.lora.target_modules",
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
        "model.lora.use_dora": lora.use_dora,
        "model.lora.init_lora_weights": lora.init_lora_weights.value,
        "trainer.ema": cfg.trainer.ema,
        "training_samples": len(table),
        # warned about only: a moved folder, or another batch layout (which shifts the position inside the epoch)
        "model_path": str(Path(model_path).resolve()),
        "global_batch_size": global_batch_size(cfg, num_processes),
    }


def find_resume_checkpoint(cfg: Config, run_dir: Path) -> Path | None:
    """The checkpoint `trainer.resume_from_checkpoint` names, or None to start fresh."""
    value = cfg.trainer.resume_from_checkpoint
    if not value:
        return None
    if value == "latest":
        found = list_checkpoints(Path(run_dir))
        if not found:
            log.warning("trainer.resume_from_checkpoint=latest: no checkpoint in %s; starting fresh",
                        checkpoint_dir(Path(run_dir)))
            return None
        return found[-1]
    path = Path(value)
    if not path.is_dir() or not CHECKPOINT_RE.match(path.name):
        raise UserError(f"trainer.resume_from_checkpoint={value!r}: no checkpoint folder checkpoint-<step> at "
                        f"{path.resolve()}; give such a folder or 'latest'")
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
    saved = json.loads(meta_file.read_text()).get("fingerprint", {})
    differ = [key for key in FINGERPRINT_KEYS if key in saved and saved[key] != fingerprint[key]]
    if differ:
        def shown(fp: dict, key: str):  # the model's fingerprint is a hash: show its folder instead
            return fp.get("model_path") if key == "model" else fp[key]

        parts = [f"{FINGERPRINT_KEYS[key]}: {shown(saved, key)!r} in the checkpoint, {shown(fingerprint, key)!r} now"
                 for key in differ]
        raise UserError(f"trainer.resume_from_checkpoint: {path} does not fit this run; " + "; ".join(parts)
                        + ". Resume with the settings the checkpoint was made with, or start a new run in another "
                          "run directory (hydra.run.dir)")
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
    meta = json.loads((path / CHECKPOINT_META).read_text()) if (path / CHECKPOINT_META).is_file() else {}
    recorded, saved = meta.get("max_train_steps"), meta.get("fingerprint", {})
    same_length = (meta.get("trainer.max_train_steps") is None
                   and meta.get("trainer.num_train_epochs") == cfg.trainer.num_train_epochs
                   and meta.get("dataset.drop_last") == cfg.dataset.drop_last
                   and all(saved.get(k) == fingerprint[k] for k in ("training_samples", "global_batch_size")))
    return recorded is not None and step >= recorded and same_length


def resume(accelerator, cfg: Config, path: Path, steps_per_epoch: int) -> RunState:
    """Load a checkpoint (LoRA, optimizer, lr schedule, RNG, accumulation counter) and where the run was."""
    accelerator.load_state(str(path))
    step = int(CHECKPOINT_RE.match(path.name).group(1))
    meta = json.loads((path / CHECKPOINT_META).read_text()) if (path / CHECKPOINT_META).is_file() else {}
    log.info("resumed from %s at step %d", path, step)
    consumed = step * cfg.trainer.gradient_accumulation_steps
    batches_per_epoch = steps_per_epoch * cfg.trainer.gradient_accumulation_steps
    return RunState(global_step=step, start_step=step, first_epoch=step // steps_per_epoch, resume_batches=consumed % batches_per_epoch,
                    resumed_from=str(path), nonfinite_skipped_steps=meta.get("nonfinite_skipped_steps", 0),
                    grad_scaler_skipped_steps=meta.get("grad_scaler_skipped_steps", 0),
                    skipped_image_rows=set(meta.get("skipped_image_rows", [])))
