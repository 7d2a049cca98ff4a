"""Stable Diffusion 1.x and 2.x: one CLIP text encoder, its last hidden states as the U-Net's conditioning,
`StableDiffusionPipeline` for images and for loading the LoRA."""

from __future__ import annotations

from pathlib import Path

import torch

from sd_lora.config import ModelConfig
from sd_lora.families.base import Components, ModelFamily
from sd_lora.notices import quiet_pipeline_imports


class StableDiffusion(ModelFamily):
    name = "sd"
    folders = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
    text_folders = ("text_encoder", "tokenizer")
    condition_keys = ("encoder_hidden_states",)
    text_prefixes = ("text_encoder",)

    def load(self, cfg: ModelConfig, path: Path, dtype: torch.dtype) -> Components:
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        kw = dict(revision=cfg.revision, local_files_only=True)
        weights = dict(variant=cfg.variant, dtype=dtype, **kw)
        return Components(
            unet=UNet2DConditionModel.from_pretrained(path, subfolder="unet", **weights),
            vae=(AutoencoderKL.from_pretrained(cfg.vae_path, dtype=dtype, local_files_only=True) if cfg.vae_path
                 else AutoencoderKL.from_pretrained(path, subfolder="vae", **weights)),
            noise_scheduler=DDPMScheduler.from_pretrained(path, subfolder="scheduler", **kw),
            tokenizers=(CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **kw),),
            text_encoders=(CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **weights),),
        )

    def tokenize(self, tokenizers: tuple, captions: list[str]) -> dict[str, torch.Tensor]:
        (tokenizer,) = tokenizers
        return {"input_ids": tokenizer(captions, max_length=tokenizer.model_max_length, padding="max_length",
                                       truncation=True, return_tensors="pt").input_ids}

    def encode(self, text_encoders: tuple, tokens: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        (text_encoder,) = text_encoders
        return {"encoder_hidden_states": text_encoder(tokens["input_ids"], return_dict=False)[0]}

    def predict(self, unet, noisy_latents, timesteps, conditioning):
        return unet(noisy_latents, timesteps, conditioning["encoder_hidden_states"], return_dict=False)[0]

    def cache_identity(self, components: Components) -> dict:
        # one encoder: the keys as they were before families existed, so that existing caches stay valid
        return {"text_encoder": components.text_encoders[0].config.to_dict(),
                "tokenizer_max_length": components.tokenizers[0].model_max_length}

    def pipeline(self, path: Path, cfg: ModelConfig, dtype: torch.dtype, components: Components | None = None,
                 unet: torch.nn.Module | None = None):
        quiet_pipeline_imports()  # before the import: it is the import that logs the notice
        from diffusers import StableDiffusionPipeline

        given = {}
        if components is not None:
            given = dict(unet=unet or components.unet, vae=components.vae, tokenizer=components.tokenizers[0],
                         text_encoder=components.text_encoders[0])
        return StableDiffusionPipeline.from_pretrained(
            path, **given, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
            revision=cfg.revision, variant=None if components is not None else cfg.variant, local_files_only=True,
            dtype=dtype)
