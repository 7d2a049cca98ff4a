"""The epoch and step loop: micro-batches through `loss.train_step`, the optimizer step the guard allows,
logging every `trainer.log_every_n_steps`, checkpoints, the validation loss and validation images at their
cadence. Every piece it calls is built elsewhere (train.py) and handed over in one `Training`."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from sd_lora.checkpoints import RunState, save_checkpoint
from sd_lora.config import Config, global_batch_size
from sd_lora.loss import StepModels, sample_generators, train_step
from sd_lora.optim import RunLength, clip_gradients
from sd_lora.timing import Timer

log = logging.getLogger(__name__)


@dataclass
class Training:
    cfg: Config
    accelerator: object
    models: StepModels
    lora_params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    dataloader: object  # prepared (sharded) by accelerate
    shuffle: object  # data.EpochShuffle: the loop tells it the epoch
    state: RunState
    timer: Timer
    length: RunLength
    run_dir: Path
    evaluate: Callable | None = None  # (unet, state) -> validation loss; main process only
    render: Callable | None = None  # (epoch, step) -> validation images; main process only
    after_step: Callable[[int], None] = lambda step: None  # scheduled garbage collection, profiler
    stop: object = None  # signals.StopRequest: a pre-emption signal ends the run after the current step
    ema: object = None  # ema.LoraEma (trainer.ema): follows every optimizer step taken


def run_loop(tr: Training) -> None:
    from tqdm.auto import tqdm

    cfg, accelerator, state, models = tr.cfg, tr.accelerator, tr.state, tr.models
    t, max_train_steps = cfg.trainer, tr.length.max_train_steps
    total_batch = global_batch_size(cfg, accelerator.num_processes)
    progress = tqdm(total=max_train_steps, initial=state.global_step, desc="steps",
                    disable=not accelerator.is_local_main_process)
    if state.losses is None:  # [sum, count] of the finite losses since the last log (a resume brings them back)
        state.losses = torch.zeros(2, device=accelerator.device)
    last_log = (time.perf_counter(), state.global_step)
    if state.global_step >= max_train_steps:  # resumed from the final checkpoint: nothing left to train
        log.info("the checkpoint is at step %d of the run's %d: nothing left to train", state.global_step,
                 max_train_steps)
        epochs = range(0)
    else:
        epochs = range(state.first_epoch, tr.length.num_epochs)
    for epoch in epochs:
        for module in models.trained:
            module.train()
        tr.shuffle.epoch = epoch  # this epoch's order, also in a process resumed inside it (see data.EpochShuffle)
        loader = tr.dataloader
        if epoch == state.first_epoch and state.resume_batches:
            loader = accelerator.skip_first_batches(tr.dataloader, state.resume_batches)
        for batch in loader:
            with accelerator.accumulate(*models.trained):
                gens = sample_generators(batch["index"], t.seed, epoch, accelerator.device)
                loss = train_step(models, batch, t.noise_offset, t.snr_gamma, gens)
                accelerator.backward(loss)
                finite = state.guard.add_loss(loss)
                withhold = False
                if accelerator.sync_gradients:
                    grad_norm = clip_gradients(accelerator, tr.lora_params, cfg.optimizer.max_grad_norm)
                    withhold = state.guard.skip_step(state, grad_norm)
                if not withhold:
                    scale = state.guard.scale_before_step() if accelerator.sync_gradients else None
                    tr.optimizer.step()
                    state.guard.count_scaler_skip(scale)
                    if tr.ema is not None and accelerator.sync_gradients:
                        tr.ema.step()
                tr.lr_scheduler.step()  # also after a withheld step: the schedule follows the step count
                tr.optimizer.zero_grad(set_to_none=True)
            state.skipped_image_rows.update(batch.get("skipped_rows", ()))
            state.losses += torch.stack([torch.where(finite, loss.detach(), 0.0), finite.to(state.losses.dtype)])
            if not accelerator.sync_gradients:
                continue
            state.global_step += 1
            progress.update(1)
            tr.timer.step()
            tr.after_step(state.global_step)
            logged = state.global_step % t.log_every_n_steps == 0 or state.global_step == max_train_steps
            if logged:
                state.guard.check()  # this reads the device anyway: stop here, naming the step, on a NaN/Inf
                total, count = accelerator.reduce(state.losses.clone(), reduction="sum").tolist()
                tr.timer.read_marks()  # the line above waited for the device
                state.losses.zero_()
                now = time.perf_counter()
                samples_per_s = (state.global_step - last_log[1]) * total_batch / max(now - last_log[0], 1e-9)
                last_log = (now, state.global_step)
                lr, *text_lrs = tr.lr_scheduler.get_last_lr()  # the U-Net's group first (optim.param_groups)
                scalars = {"train/lr": lr, "train/samples_per_s": samples_per_s}
                if text_lrs:
                    scalars["train/lr_text_encoder"] = text_lrs[0]
                if count:  # else every step since the last log was skipped for a NaN/Inf loss
                    state.last_loss = scalars["train/loss"] = total / count
                accelerator.log(scalars, step=state.global_step)
                progress.set_postfix(loss=f"{state.last_loss:.4f}" if count else "nan", lr=f"{lr:.2e}")
            if t.checkpointing_steps and state.global_step % t.checkpointing_steps == 0 \
                    and state.global_step < max_train_steps:
                save_checkpoint(accelerator, cfg, tr.run_dir, state)
            if tr.evaluate is not None and t.validation_loss_steps and state.global_step % t.validation_loss_steps == 0:
                tr.evaluate(models.unet, state)
            if state.global_step >= max_train_steps:
                break
            if tr.stop is not None and tr.stop.agreed(accelerator, logged):
                state.stopped_by = tr.stop.signame  # train.finish saves the checkpoint and the report so far
                break
        if state.stopped_by:
            break
        last_epoch = epoch == tr.length.num_epochs - 1 or state.global_step >= max_train_steps
        if tr.render is not None and ((epoch + 1) % t.validation_epochs == 0 or last_epoch):
            tr.render(epoch, state.global_step)
        if state.global_step >= max_train_steps:
            break
    progress.close()
