"""What one micro-batch's loss is: the noise and timesteps it draws, the training target per prediction
type, Min-SNR weights and the diffusion loss (what diffusers' LoRA script computes each step).

The model family turns the batch's captions (or their cached embeddings) into the U-Net's conditioning
and calls the U-Net; everything else here is the same for every family.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sd_lora.config import PredictionType
from sd_lora.data import sample_seed
from sd_lora.errors import UserError
from sd_lora.families import ModelFamily


def training_target(noise_scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the U-Net is trained to predict: the noise (epsilon) or the velocity (v-prediction)."""
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == PredictionType.epsilon.value:
        return noise
    if prediction_type == PredictionType.v_prediction.value:
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise UserError(
        f"prediction type {prediction_type!r} of the scheduler is not supported; "
        "set model.prediction_type to epsilon or v_prediction"
    )


def min_snr_weights(noise_scheduler, timesteps: torch.Tensor, snr_gamma: float) -> torch.Tensor:
    """Per-sample Min-SNR loss weights (Hang et al. 2023) for the scheduler's prediction type.

    epsilon: min(SNR, gamma) / SNR; v-prediction: min(SNR, gamma) / (SNR + 1), since the velocity
    loss already carries a factor (SNR + 1) relative to the x0 loss.
    """
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps)
    clipped = torch.clamp(snr, max=snr_gamma)
    if noise_scheduler.config.prediction_type == PredictionType.v_prediction.value:
        return clipped / (snr + 1)
    return clipped / snr


def diffusion_loss(model_pred, target, timesteps, noise_scheduler, snr_gamma: float | None) -> torch.Tensor:
    if snr_gamma is None:
        return F.mse_loss(model_pred.float(), target.float(), reduction="mean")
    per_sample = F.mse_loss(model_pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return (per_sample * min_snr_weights(noise_scheduler, timesteps, snr_gamma)).mean()


@dataclass
class StepModels:
    """What a training step runs: the (prepared) LoRA U-Net and the frozen parts beside it."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: tuple
    noise_scheduler: object
    weight_dtype: torch.dtype
    family: ModelFamily
    text_trained: bool = False  # the text encoders carry a LoRA that trains: they run with gradients

    @property
    def scaling_factor(self) -> float:
        return self.vae.config.scaling_factor

    @property
    def trained(self) -> tuple[torch.nn.Module, ...]:
        """The modules whose LoRA trains (what the loop puts in train mode and accumulates gradients of)."""
        return (self.unet, *self.text_encoders) if self.text_trained else (self.unet,)


def sample_generators(indices: list[int], seed: int, epoch: int, device) -> list[torch.Generator]:
    """One generator per sample, seeded by (seed, epoch, sample index).

    Every random draw of the step (posterior sample, noise, offset noise, timestep) comes from the
    sample's own generator, so a sample gets the same draws whatever the batch it lands in, the
    number of processes, or a resume in the middle of an epoch.
    """
    return [torch.Generator(device=device).manual_seed(sample_seed(seed, epoch, index)) for index in indices]


def _randn(gens: list[torch.Generator], shape: tuple, like: torch.Tensor) -> torch.Tensor:
    return torch.stack([torch.randn(shape, generator=g, device=like.device, dtype=like.dtype) for g in gens])


def train_step(m: StepModels, batch: dict, noise_offset: float, snr_gamma: float | None,
               gens: list[torch.Generator]) -> torch.Tensor:
    """Loss of one micro-batch (what diffusers' LoRA script computes each step)."""
    if "latent_mean" in batch:  # cached posterior: sampled anew each step, as the VAE's latent_dist.sample() does
        mean, std = batch["latent_mean"], batch["latent_std"]
    else:
        with torch.no_grad():
            posterior = m.vae.encode(batch["pixel_values"].to(dtype=m.vae.dtype)).latent_dist  # SDXL: fp32
            mean, std = posterior.mean, posterior.std
    conditioning = m.family.conditioning(m.text_encoders, batch, m.weight_dtype, grad=m.text_trained)
    latents = ((mean + std * _randn(gens, mean.shape[1:], mean)) * m.scaling_factor).to(m.weight_dtype)
    noise = _randn(gens, latents.shape[1:], latents)
    if noise_offset:
        noise = noise + noise_offset * _randn(gens, (latents.shape[1], 1, 1), latents)
    timesteps = torch.cat([torch.randint(0, m.noise_scheduler.config.num_train_timesteps, (1,), generator=g,
                                         device=latents.device) for g in gens])
    noisy_latents = m.noise_scheduler.add_noise(latents, noise, timesteps)
    target = training_target(m.noise_scheduler, latents, noise, timesteps)
    model_pred = m.family.predict(m.unet, noisy_latents, timesteps, conditioning)
    return diffusion_loss(model_pred, target, timesteps, m.noise_scheduler, snr_gamma)
