"""Validation: a deterministic validation loss (the number a sweep compares runs by) and the validation
images rendered with the current LoRA.

Training loss of a diffusion model is too noisy to rank runs (each step draws its own timesteps and
noise). The validation loss here is the diffusion loss of the U-Net on held-out samples at fixed
timesteps spread over the schedule, with fixed noise from a fixed seed (`trainer.validation_loss_seed`,
independent of the training seed) and the posterior mean as the latent: two runs of a sweep that see
the same held-out samples differ only by what was trained. The target follows the scheduler's
prediction type; there is no Min-SNR weighting, so runs with different `snr_gamma` stay comparable.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from sd_lora.checkpoints import RunState
from sd_lora.config import Config, Tracker
from sd_lora.data import decode_or_skip, pick_caption, train_transform
from sd_lora.errors import UserError
from sd_lora.families import Components, ModelFamily
from sd_lora.loss import training_target

log = logging.getLogger(__name__)


@dataclass
class ValidationSet:
    """Encoded held-out samples with their fixed timesteps and noise, ready on the device."""

    latents: torch.Tensor  # (N*K, 4, h, w): each sample repeated for each timestep
    text: dict[str, torch.Tensor]  # the family's text conditioning (or its tokens where the text encoders train), sizes
    timesteps: torch.Tensor  # (N*K,)
    noise: torch.Tensor  # (N*K, 4, h, w)
    num_samples: int


@torch.no_grad()
def build_validation_set(table, cfg_dataset, encode_captions, vae, noise_scheduler, device,
                         dtype: torch.dtype, num_timesteps: int, seed: int, batch_size: int = 8) -> ValidationSet:
    """`encode_captions`: captions -> the family's conditioning tensors (families.ModelFamily.encode_captions), or
    its token tensors where the text encoders train (encoded with their current LoRA at each evaluation)."""
    pixels, captions, latents, texts, skipped = [], [], [], {}, []
    sizes: dict[str, list[torch.Tensor]] = {}  # each sample's sizes (SDXL's size conditioning)

    def encode() -> None:  # a few at a time, like the embedding cache; no more images than that held at once
        latents.append(vae.encode(torch.stack(pixels).to(device, dtype=vae.dtype)).latent_dist.mean.float()
                       * vae.config.scaling_factor)
        for key, value in encode_captions(captions).items():
            texts.setdefault(key, []).append(value.float() if value.is_floating_point() else value)
        pixels.clear()
        captions.clear()

    for index in range(len(table)):
        row = table[index]
        cell = row[cfg_dataset.image_column]
        image = decode_or_skip(cell, index, cfg_dataset.on_bad_image, "left out of the validation loss", "held-out ",
                               alpha=cfg_dataset.alpha)
        if image is None:
            skipped.append(index)
            continue
        caption = row[cfg_dataset.caption_column]
        if isinstance(caption, (list, tuple, np.ndarray)):  # the first caption, so that the loss stays fixed
            texts_in_cell = [c for c in caption if isinstance(c, str) and c.strip()]
            if not texts_in_cell:
                raise UserError(f"held-out data set row {index}: caption column {cfg_dataset.caption_column!r} holds "
                                f"{[type(c).__name__ for c in caption][:5]}, no text; set dataset.caption_column to "
                                "the text column")
            caption = texts_in_cell[0]
        captions.append(pick_caption(caption, index, cfg_dataset.caption_column))
        geometry: dict = {}
        pixels.append(train_transform(image, cfg_dataset.resolution, center_crop=True, random_flip=False,
                                      geometry=geometry))
        for key, value in geometry.items():
            sizes.setdefault(key, []).append(value)
        if len(pixels) == batch_size:
            encode()
    if pixels:
        encode()
    if not latents and skipped:
        raise UserError(f"dataset.on_bad_image=skip: none of the {len(table)} held-out images can be decoded (rows "
                        f"{skipped[:5]}{' ...' if len(skipped) > 5 else ''}); fix or remove them, or hold out other "
                        "rows (dataset.validation_split / dataset.validation_source)")
    latents = torch.cat(latents)
    n, k = len(latents), num_timesteps
    total = noise_scheduler.config.num_train_timesteps
    steps = torch.linspace(0, total - 1, k).round().long()  # spread over the whole schedule
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((n * k,) + tuple(latents.shape[1:]), generator=generator)
    return ValidationSet(
        latents=latents.repeat_interleave(k, dim=0),
        text={**{key: torch.cat(parts).repeat_interleave(k, dim=0) for key, parts in texts.items()},
              **{key: torch.stack(parts).repeat_interleave(k, dim=0).to(device) for key, parts in sizes.items()}},
        timesteps=steps.repeat(n).to(device),
        noise=noise.to(device),
        num_samples=n,
    )


@contextlib.contextmanager
def evaluating(*modules: torch.nn.Module):
    """The modules in eval mode (no LoRA dropout) for the block; each back in its own mode after it."""
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)


@torch.no_grad()
def validation_loss(unet, family: ModelFamily, noise_scheduler, vset: ValidationSet, dtype: torch.dtype,
                    autocast=contextlib.nullcontext, batch_size: int = 8, text_encoders: tuple = ()) -> float:
    """Mean diffusion loss over all held-out samples and fixed timesteps (captions held as tokens are encoded
    by `text_encoders`)."""
    total, count = 0.0, 0
    with evaluating(unet, *text_encoders):
        for start in range(0, len(vset.latents), batch_size):
            sl = slice(start, start + batch_size)
            latents, noise, t = vset.latents[sl], vset.noise[sl], vset.timesteps[sl]
            noisy = noise_scheduler.add_noise(latents, noise, t)
            target = training_target(noise_scheduler, latents, noise, t)
            with autocast():
                conditioning = family.conditioning(text_encoders, {k: v[sl] for k, v in vset.text.items()}, dtype)
                pred = family.predict(unet, noisy.to(dtype), t, conditioning)
            total += F.mse_loss(pred.float(), target.float(), reduction="sum").item()
            count += target.numel()
    return total / count


def build_evaluator(cfg: Config, accelerator, family: ModelFamily, comps: Components, val_table,
                    weight_dtype: torch.dtype) -> Callable:
    """A function (unet, state) -> validation loss, logged to tensorboard and kept in the run state."""
    def text_of(captions: list[str]) -> dict[str, torch.Tensor]:
        if comps.text_trained:  # tokens: encoded at each evaluation, with the text encoders' LoRA as it is then
            return {k: v.to(accelerator.device) for k, v in family.tokenize(comps.tokenizers, captions).items()}
        return family.encode_captions(comps, captions, accelerator.device)

    vset = build_validation_set(val_table, cfg.dataset, text_of,
                                comps.vae, comps.noise_scheduler, accelerator.device, weight_dtype,
                                cfg.trainer.validation_loss_timesteps, cfg.trainer.validation_loss_seed)
    log.info("validation loss on %d held-out sample(s) x %d fixed timesteps", vset.num_samples,
             cfg.trainer.validation_loss_timesteps)

    def evaluate(unet, state: RunState) -> float:
        base = accelerator.unwrap_model(unet, keep_torch_compile=False)
        # a factory: accelerate's autocast is a one-shot context manager, entered once per batch
        autocast = accelerator.autocast if weight_dtype != torch.float32 else contextlib.nullcontext
        value = validation_loss(base, family, comps.noise_scheduler, vset, weight_dtype, autocast,
                                text_encoders=comps.text_encoders if comps.text_trained else ())
        state.validation_loss, state.validation_loss_step = value, state.global_step
        accelerator.log({"val/loss": value}, step=state.global_step)
        log.info("validation loss at step %d: %.6f", state.global_step, value)
        return value

    return evaluate


def render_validation_images(cfg: Config, accelerator, family: ModelFamily, comps: Components, unet, model_path: Path,
                             run_dir: Path, weight_dtype: torch.dtype, epoch: int, step: int) -> list[Path]:
    """Render the validation prompts with the current LoRA into samples/ and tensorboard."""
    t = cfg.trainer
    unet = accelerator.unwrap_model(unet, keep_torch_compile=False)
    comps.move_frozen(accelerator.device)
    pipeline = family.pipeline(model_path, cfg.model, weight_dtype, components=comps, unet=unet)
    pipeline.set_progress_bar_config(disable=True)
    generator = torch.Generator(device=accelerator.device).manual_seed(t.seed)
    out = run_dir / "samples"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    autocast = accelerator.autocast() if weight_dtype != torch.float32 else contextlib.nullcontext()
    tracker = accelerator.get_tracker("tensorboard", unwrap=True) if Tracker.tensorboard in t.report_to else None
    with torch.no_grad(), autocast, evaluating(unet, *comps.text_encoders):
        for i, prompt in enumerate(t.validation_prompts):
            images = pipeline(prompt, num_inference_steps=t.num_inference_steps, generator=generator,
                              num_images_per_prompt=t.num_validation_images,
                              height=cfg.dataset.resolution, width=cfg.dataset.resolution).images
            for j, image in enumerate(images):
                path = out / f"step{step:06d}-epoch{epoch:04d}-prompt{i}-{j}.png"
                image.save(path)
                written.append(path)
            if tracker is not None:
                tracker.add_images(f"validation/{i}: {prompt}", np.stack([np.asarray(im) for im in images]), step,
                                   dataformats="NHWC")
    if cfg.dataset.cache:
        comps.move_frozen("cpu")
    log.info("validation at step %d: %d image(s) in %s", step, len(written), out)
    return written
