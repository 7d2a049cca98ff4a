"""The optimizer and its learning-rate schedule from the `optimizer` group, the run's length in optimizer
steps, and gradient clipping. Adding an optimizer or a schedule is a change here (and in config.py's
OptimizerConfig) only."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sd_lora.config import Config, global_batch_size


@dataclass(frozen=True)
class RunLength:
    max_train_steps: int  # optimizer steps of the whole run
    num_epochs: int
    steps_per_epoch: int  # optimizer steps per epoch and process


def run_length(cfg: Config, per_process_batches: int) -> RunLength:
    """Optimizer steps, epochs and steps per epoch, from the sharded loader's length.

    Resume places itself in the epoch with the same steps per epoch, so it is computed here only.
    """
    t = cfg.trainer
    steps_per_epoch = math.ceil(per_process_batches / t.gradient_accumulation_steps)
    max_train_steps = t.max_train_steps or t.num_train_epochs * steps_per_epoch
    return RunLength(max_train_steps, math.ceil(max_train_steps / steps_per_epoch), steps_per_epoch)


def param_groups(cfg: Config, params: dict[str, list[torch.nn.Parameter]], scale: float = 1.0) -> list[dict]:
    """One parameter group per trained module (`params` under the LoRA file's prefixes): the U-Net's at
    optimizer.lr, the text encoders' at optimizer.text_encoder_lr (null: optimizer.lr), each times `scale`."""
    o = cfg.optimizer
    return [{"params": group, "lr": (o.lr if prefix == "unet" else o.text_encoder_lr or o.lr) * scale}
            for prefix, group in params.items()]


def build_optimizer(cfg: Config, params: dict[str, list[torch.nn.Parameter]], num_processes: int,
                    fused_by_default: bool) -> torch.optim.Optimizer:
    """The optimizer over the LoRA parameters (see param_groups). `optimizer.fused=null` takes the device's
    default (`fused_by_default`, devices.Capabilities.fused_optimizer)."""
    o = cfg.optimizer
    scale = global_batch_size(cfg, num_processes) if o.scale_lr else 1
    fused = fused_by_default if o.fused is None else o.fused
    return torch.optim.AdamW(param_groups(cfg, params, scale), lr=o.lr * scale, betas=tuple(o.betas),
                             weight_decay=o.weight_decay, eps=o.eps, **({"fused": True} if fused else {}))


def build_lr_scheduler(cfg: Config, optimizer: torch.optim.Optimizer, max_train_steps: int, num_processes: int):
    from diffusers.optimization import get_scheduler

    # a prepared scheduler steps once per process per optimizer step, hence the factor (as in diffusers)
    return get_scheduler(cfg.optimizer.lr_scheduler.value, optimizer=optimizer,
                         num_warmup_steps=cfg.optimizer.lr_warmup_steps * num_processes,
                         num_training_steps=max_train_steps * num_processes)


def clip_gradients(accelerator, params: list[torch.nn.Parameter], max_norm: float | None) -> torch.Tensor | None:
    """Clip the LoRA gradients' global norm; return the norm before clipping.

    `params` must be a list: one reference script passes a generator it has already exhausted,
    so its clipping silently does nothing.
    """
    if max_norm is None:
        return None
    return accelerator.clip_grad_norm_(params, max_norm)
