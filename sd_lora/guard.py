"""The non-finite guard: NaN/Inf in a step's loss or LoRA gradients, in the LoRA weights before anything is
written from them, and the fp16 grad scaler's skipped steps."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from sd_lora.checkpoints import RunState, last_good_checkpoint
from sd_lora.config import Config, MixedPrecision, OnFailure
from sd_lora.errors import UserError

log = logging.getLogger(__name__)


class NonFiniteGuard:
    """NaN/Inf in a step's loss or LoRA gradient norm, handled as `trainer.on_nonfinite_loss` says.

    error: every micro-batch ORs a flag on the device, and the first bad optimizer step is kept there
    too, so the loop never waits for the accelerator because of this guard. `check` reads them where
    the loop syncs anyway (a logging step) and before every checkpoint, so a checkpoint never holds
    weights a NaN has reached, and the message names the step where it happened, not where it was seen.
    skip: whether to apply a step must be known before optimizer.step(), so that costs one host sync
    (and one all-gather, so that every process decides alike) per optimizer step.
    Under fp16 the grad scaler owns non-finite gradients (it skips the step and lowers its scale, which
    is normal), so there only the loss counts; the steps the scaler skips are counted, on the device too.
    The loss and gradients can be finite while the update overflows (a huge lr or weight decay), so `check`,
    which runs before every checkpoint and before the LoRA file, also checks the LoRA weights themselves,
    under both policies: nothing with a NaN/Inf in it is ever written.
    """

    def __init__(self, cfg: Config, accelerator, run_dir: Path, params: list[torch.nn.Parameter] = ()):
        self.cfg, self.accelerator, self.run_dir, self.params = cfg, accelerator, run_dir, list(params)
        self.skip = cfg.trainer.on_nonfinite_loss is OnFailure.skip
        self.bad = torch.zeros((), dtype=torch.bool, device=accelerator.device)  # in the current optimizer step
        self.first_bad_step = torch.full((), -1, dtype=torch.long, device=accelerator.device)
        self.scaler_skips = torch.zeros((), dtype=torch.long, device=accelerator.device)  # since the last take

    def scale_before_step(self) -> torch.Tensor | None:
        """fp16: the grad scaler's scale before optimizer.step(), to tell afterwards whether it skipped the step."""
        scale = getattr(self.accelerator.scaler, "_scale", None)
        return None if scale is None else scale.clone()

    def count_scaler_skip(self, scale_before: torch.Tensor | None) -> None:
        # The scaler lowers its scale exactly when it skips a step for inf/NaN gradients. accelerate's
        # optimizer_step_was_skipped misses the skips a fused AdamW (the default on CUDA) makes inside its
        # kernel, and the scaler's get_scale() waits for the device; this comparison stays on the device.
        if scale_before is not None:
            self.scaler_skips += self.accelerator.scaler._scale < scale_before

    def take_scaler_skips(self) -> int:
        """The grad scaler's skipped steps since the last call (a host sync)."""
        count = int(self.scaler_skips)
        self.scaler_skips.zero_()
        return count

    def add_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """Note a micro-batch's loss; return whether it is finite (on the device)."""
        finite = torch.isfinite(loss.detach())
        self.bad |= ~finite
        return finite

    def skip_step(self, state: RunState, grad_norm: torch.Tensor | None) -> bool:
        """At the end of optimizer step state.global_step + 1: whether to leave its update out."""
        step = state.global_step + 1
        if grad_norm is not None and self.accelerator.scaler is None:
            self.bad |= ~torch.isfinite(grad_norm)
        if not self.skip:
            self.first_bad_step.masked_fill_((self.first_bad_step < 0) & self.bad, step)
            self.bad.zero_()
            return False
        bad = bool(self.accelerator.gather(self.bad.reshape(1)).any())
        self.bad.zero_()
        if bad and self.accelerator.scaler is None:  # with a scaler the step is the scaler's skip, counted there
            state.nonfinite_skipped_steps += 1
            log.warning("step %d: NaN/Inf loss or gradient norm; its update is skipped (trainer.on_nonfinite_loss=skip)",
                        step)
        # with a grad scaler, optimizer.step() must run: the scaler itself leaves out a step whose gradients
        # are not finite, and skipping the call would leave its unscale_ bookkeeping half done
        return bad and self.accelerator.scaler is None

    def weights_finite(self) -> bool:
        """Whether every LoRA weight is finite, on every process (a host sync, and a collective call)."""
        if not self.params:
            return True
        finite = torch.stack([torch.isfinite(p.detach()).all() for p in self.params]).all()
        return bool(self.accelerator.gather(finite.reshape(1)).all())

    def cause(self) -> str:
        lr = self.cfg.optimizer.lr
        if self.cfg.precision.mixed_precision is MixedPrecision.fp16:
            return f"fp16 overflow is the likely cause: use precision=bf16, or a lower optimizer.lr (now {lr})"
        return f"a learning rate too high for this model is the likely cause: lower optimizer.lr (now {lr})"

    def kept(self) -> str:
        found = last_good_checkpoint(self.run_dir)
        return (f"the last good checkpoint is {found} (trainer.resume_from_checkpoint=latest resumes from it)"
                if found else "no checkpoint had been saved")

    def check(self, step: int | None = None) -> None:
        """Raise if an optimizer step had a NaN/Inf (error policy) or, under either policy, if a LoRA weight
        is not finite after optimizer step `step` (given before anything is written from the weights). A host
        sync, and a collective call."""
        if not self.skip:
            steps = [s for s in self.accelerator.gather(self.first_bad_step.reshape(1)).tolist() if s >= 0]
            if steps:
                raise UserError(f"the training loss or the LoRA gradient norm became NaN/Inf at optimizer step "
                                f"{min(steps)}; {self.cause()}; or set trainer.on_nonfinite_loss=skip to skip such "
                                f"steps. The run stopped without saving: {self.kept()}")
        if step is not None and not self.weights_finite():
            o = self.cfg.optimizer
            raise UserError(f"the LoRA weights hold NaN/Inf after optimizer step {step} (the update overflowed "
                            f"although the loss and gradients were finite); {self.cause()}, or "
                            f"optimizer.weight_decay (now {o.weight_decay}). Nothing was written from these "
                            f"weights: {self.kept()}")
