"""A deterministic validation loss: the number a sweep compares runs by.

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

import numpy as np
import torch
import torch.nn.functional as F

from sd_lora.data import decode_or_skip, pick_caption, tokenize, train_transform
from sd_lora.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class ValidationSet:
    """Encoded held-out samples with their fixed timesteps and noise, ready on the device."""

    latents: torch.Tensor  # (N*K, 4, h, w): each sample repeated for each timestep
    encoder_hidden_states: torch.Tensor  # (N*K, 77, d)
    timesteps: torch.Tensor  # (N*K,)
    noise: torch.Tensor  # (N*K, 4, h, w)
    num_samples: int


@torch.no_grad()
def build_validation_set(table, cfg_dataset, tokenizer, vae, text_encoder, noise_scheduler, device,
                         dtype: torch.dtype, num_timesteps: int, seed: int, batch_size: int = 8) -> ValidationSet:
    pixels, captions, latents, texts, skipped = [], [], [], [], []

    def encode() -> None:  # a few at a time, like the embedding cache; no more images than that held at once
        latents.append(vae.encode(torch.stack(pixels).to(device, dtype=dtype)).latent_dist.mean.float()
                       * vae.config.scaling_factor)
        texts.append(text_encoder(tokenize(tokenizer, captions).to(device), return_dict=False)[0].float())
        pixels.clear()
        captions.clear()

    for index in range(len(table)):
        row = table[index]
        cell = row[cfg_dataset.image_column]
        image = decode_or_skip(cell, index, cfg_dataset.on_bad_image, "left out of the validation loss", "held-out ")
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
        pixels.append(train_transform(image, cfg_dataset.resolution, center_crop=True, random_flip=False))
        if len(pixels) == batch_size:
            encode()
    if pixels:
        encode()
    if not latents and skipped:
        raise UserError(f"dataset.on_bad_image=skip: none of the {len(table)} held-out images can be decoded (rows "
                        f"{skipped[:5]}{' ...' if len(skipped) > 5 else ''}); fix or remove them, or hold out other "
                        "rows (dataset.validation_split / dataset.validation_source)")
    latents, texts = torch.cat(latents), torch.cat(texts)
    n, k = len(latents), num_timesteps
    total = noise_scheduler.config.num_train_timesteps
    steps = torch.linspace(0, total - 1, k).round().long()  # spread over the whole schedule
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((n * k,) + tuple(latents.shape[1:]), generator=generator)
    return ValidationSet(
        latents=latents.repeat_interleave(k, dim=0),
        encoder_hidden_states=texts.repeat_interleave(k, dim=0),
        timesteps=steps.repeat(n).to(device),
        noise=noise.to(device),
        num_samples=n,
    )


@torch.no_grad()
def validation_loss(unet, noise_scheduler, vset: ValidationSet, dtype: torch.dtype, autocast=contextlib.nullcontext,
                    batch_size: int = 8) -> float:
    """Mean diffusion loss over all held-out samples and fixed timesteps."""
    from sd_lora.train import training_target

    was_training = unet.training
    unet.eval()
    total, count = 0.0, 0
    for start in range(0, len(vset.latents), batch_size):
        sl = slice(start, start + batch_size)
        latents, noise, t = vset.latents[sl], vset.noise[sl], vset.timesteps[sl]
        noisy = noise_scheduler.add_noise(latents, noise, t)
        target = training_target(noise_scheduler, latents, noise, t)
        with autocast():
            pred = unet(noisy.to(dtype), t, vset.encoder_hidden_states[sl].to(dtype), return_dict=False)[0]
        total += F.mse_loss(pred.float(), target.float(), reduction="sum").item()
        count += target.numel()
    if was_training:
        unet.train()
    return total / count
