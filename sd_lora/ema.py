"""An exponential moving average of the LoRA weights (`trainer.ema`), with diffusers' `EMAModel`.

The EMA follows the LoRA weights after every optimizer step that is taken (a step the guard withholds is not
followed). Its weights are what is validated (validation loss and images) and what the LoRA file holds; the
weights as trained keep training. A checkpoint holds both: the trained ones in its lora.safetensors, the EMA's
state in accelerate's custom_checkpoint_0.pkl, so that a resumed run continues both exactly. The decay ramps
up as (1 + n) / (10 + n) after `trainer.ema_start_step` (EMAModel's rule) until it reaches `trainer.ema_decay`.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable

import torch

from sd_lora.config import TrainerConfig


class LoraEma:
    def __init__(self, params: list[torch.nn.Parameter], t: TrainerConfig):
        from diffusers.training_utils import EMAModel

        self.params = params
        self.model = EMAModel(params, decay=t.ema_decay, update_after_step=t.ema_start_step)

    def step(self) -> None:
        self.model.step(self.params)

    @contextlib.contextmanager
    def applied(self):
        """The EMA's weights in the LoRA parameters for the duration; the trained ones back afterwards, bit for bit."""
        self.model.store(self.params)
        self.model.copy_to(self.params)
        try:
            yield
        finally:
            self.model.restore(self.params)

    def under_ema(self, fn: Callable | None) -> Callable | None:
        """`fn` (validation loss, validation images) run with the EMA's weights."""
        if fn is None:
            return None

        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            with self.applied():
                return fn(*args, **kwargs)

        return wrapped

    # accelerate's register_for_checkpointing saves and loads these with every checkpoint
    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)
        self.model.to(device=self.params[0].device)  # accelerate loads it onto the CPU
