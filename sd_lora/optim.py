"""The optimizer and its learning-rate schedule from the `optimizer` group, the run's length in optimizer
steps, and gradient clipping. Adding an optimizer or a schedule is a change here (and in config.py's
OptimizerConfig) only.

The optimizer is picked by name (`optimizer=adamw|adamw8bit|prodigy|adafactor|lion`, an Enum checked at
compose time) rather than by a Hydra `_target_`: each class takes other keyword names for the same idea,
and a typed config with one builder per name keeps every key documented and checked, and lets the
preflight name the package an option needs before any weights load. Every optimizer steps the fp32 LoRA
weights as they are (none keeps a copy in another dtype), and its state is a plain `state_dict`, which
accelerate's checkpoints save and restore bit for bit.
"""

from __future__ import annotations

import importlib.util
import logging
import math
from dataclasses import dataclass

import torch

from sd_lora.config import Config, OptimizerConfig, OptimizerName, global_batch_size
from sd_lora.errors import UserError

log = logging.getLogger(__name__)

# an optimizer from an optional package -> (its module, the pyproject extra that installs it)
EXTRAS = {OptimizerName.adamw8bit: ("bitsandbytes", "adamw8bit"), OptimizerName.prodigy: ("prodigyopt", "prodigy"),
          OptimizerName.lion: ("lion_pytorch", "lion")}


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


def check_optimizer(cfg: Config, backend_name: str | None) -> None:
    """UserError, before any weights load, for an optimizer whose package is not installed or that cannot run on
    this device (`backend_name`; None: not known yet, a sweep varies the device)."""
    name = cfg.optimizer.name
    if name is OptimizerName.adamw8bit and backend_name not in ("cuda", None):
        raise UserError(f"optimizer=adamw8bit runs on CUDA only (bitsandbytes' 8-bit kernels), and this run is on "
                        f"{backend_name}: use optimizer=adamw (or adafactor, whose factored state is smaller still), or device=cuda")
    if name in EXTRAS:
        module, extra = EXTRAS[name]
        if importlib.util.find_spec(module) is None:
            raise UserError(f"optimizer={name.value} needs the {module} package, which is not installed; install it "
                            f"with: pip install -e \".[{extra}]\"")


def param_groups(cfg: Config, params: dict[str, list[torch.nn.Parameter]], scale: float = 1.0) -> list[dict]:
    """One parameter group per trained module (`params` under the LoRA file's prefixes): the U-Net's at
    optimizer.lr, the text encoders' at optimizer.text_encoder_lr (null: optimizer.lr), each times `scale`."""
    o = cfg.optimizer
    return [{"params": group, "lr": (o.lr if prefix == "unet" else o.text_encoder_lr or o.lr) * scale}
            for prefix, group in params.items()]


def build_optimizer(cfg: Config, params: dict[str, list[torch.nn.Parameter]] | list, num_processes: int,
                    fused_by_default: bool) -> torch.optim.Optimizer:
    """The optimizer over the LoRA parameters: the trained modules' under the LoRA file's prefixes (one group each,
    see param_groups), or a list of tensors or param-group dicts. `optimizer.fused=null` takes the device's default
    (`fused_by_default`, devices.Capabilities.fused_optimizer) for adamw."""
    o = cfg.optimizer
    scale = global_batch_size(cfg, num_processes) if o.scale_lr else 1
    lr = o.lr * scale
    if o.name is OptimizerName.prodigy and not 0.1 <= lr <= 10:
        log.warning("optimizer=prodigy with optimizer.lr=%g: Prodigy's lr multiplies the step size it estimates "
                    "itself, so 1.0 is its usual value (an AdamW-sized lr makes it barely move)", lr)
    groups = param_groups(cfg, params, scale) if isinstance(params, dict) else params
    return OPTIMIZERS[o.name](o, groups, lr, fused_by_default if o.fused is None else o.fused)


def _adamw(o: OptimizerConfig, params, lr: float, fused: bool):
    return torch.optim.AdamW(params, lr=lr, betas=tuple(o.betas), weight_decay=o.weight_decay, eps=o.eps,
                             **({"fused": True} if fused else {}))


def _adamw8bit(o: OptimizerConfig, params, lr: float, fused: bool):
    # bitsandbytes keeps 8-bit moments only for tensors of 4096 elements or more (its min_8bit_size); smaller LoRA
    # matrices keep 32-bit moments. The parameters themselves stay fp32 either way.
    from bitsandbytes.optim import AdamW8bit

    return AdamW8bit(params, lr=lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)


def _prodigy(o: OptimizerConfig, params, lr: float, fused: bool):
    from prodigyopt import Prodigy

    p = o.prodigy
    return Prodigy(params, lr=lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay, decouple=p.decouple,
                   use_bias_correction=p.use_bias_correction, safeguard_warmup=p.safeguard_warmup, d_coef=p.d_coef)


def _adafactor(o: OptimizerConfig, params, lr: float, fused: bool):
    from transformers.optimization import Adafactor

    a = o.adafactor
    return Adafactor(params, lr=None if a.relative_step else lr, clip_threshold=a.clip_threshold,
                     decay_rate=a.decay_rate, beta1=a.beta1, weight_decay=o.weight_decay,
                     scale_parameter=a.scale_parameter, relative_step=a.relative_step, warmup_init=a.warmup_init)


def _lion(o: OptimizerConfig, params, lr: float, fused: bool):
    from lion_pytorch import Lion

    return Lion(params, lr=lr, betas=tuple(o.betas), weight_decay=o.weight_decay)


OPTIMIZERS = {OptimizerName.adamw: _adamw, OptimizerName.adamw8bit: _adamw8bit, OptimizerName.prodigy: _prodigy,
              OptimizerName.adafactor: _adafactor, OptimizerName.lion: _lion}


def warmup_steps(cfg: Config, max_train_steps: int) -> int:
    """Optimizer steps of warm-up: optimizer.lr_warmup_steps, or optimizer.lr_warmup_fraction of the run."""
    o = cfg.optimizer
    return round(o.lr_warmup_fraction * max_train_steps) if o.lr_warmup_fraction else o.lr_warmup_steps


def build_lr_scheduler(cfg: Config, optimizer: torch.optim.Optimizer, max_train_steps: int, num_processes: int):
    """diffusers' schedule of that name; Adafactor's own (which reports the step size it chose) with
    optimizer.adafactor.relative_step."""
    o = cfg.optimizer
    if o.name is OptimizerName.adafactor and o.adafactor.relative_step:
        from transformers.optimization import AdafactorSchedule

        return AdafactorSchedule(optimizer)
    from diffusers.optimization import get_scheduler

    # a prepared scheduler steps once per process per optimizer step, hence the factor (as in diffusers)
    return get_scheduler(o.lr_scheduler.value, optimizer=optimizer,
                         num_warmup_steps=warmup_steps(cfg, max_train_steps) * num_processes,
                         num_training_steps=max_train_steps * num_processes, num_cycles=o.lr_num_cycles,
                         power=o.lr_power)


def clip_gradients(accelerator, params: list[torch.nn.Parameter], max_norm: float | None) -> torch.Tensor | None:
    """Clip the LoRA gradients' global norm; return the norm before clipping.

    `params` must be a list: one reference script passes a generator it has already exhausted,
    so its clipping silently does nothing.
    """
    if max_norm is None:
        return None
    return accelerator.clip_grad_norm_(params, max_norm)
