"""Stable Diffusion XL: two CLIP text encoders (ViT-L, then OpenCLIP bigG with its projection), their penultimate
hidden states side by side as the U-Net's conditioning, the second one's pooled embedding and each sample's sizes
(`add_time_ids`: original size, crop top-left, target size) as its added conditioning, and
`StableDiffusionXLPipeline` for images and for loading the LoRA. What diffusers' `train_text_to_image_lora_sdxl.py`
computes: `encode_prompt` and `compute_time_ids` there.

The VAE: SDXL's overflows in fp16, so it stays fp32 (as diffusers' script keeps it) unless `model.vae_path` names
another one (the fp16-fixed VAE, madebyollin/sdxl-vae-fp16-fix), which then takes the run's dtype.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sd_lora.config import ModelConfig
from sd_lora.families.base import Components, ModelFamily
from sd_lora.notices import quiet_pipeline_imports


class StableDiffusionXL(ModelFamily):
    name = "sdxl"
    folders = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
    text_folders = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
    condition_keys = ("encoder_hidden_states", "pooled_prompt_embeds")
    text_prefixes = ("text_encoder", "text_encoder_2")
    unused_text_layers = True  # the first encoder's last layer: only its penultimate hidden states are read

    def load(self, cfg: ModelConfig, path: Path, dtype: torch.dtype) -> Components:
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        kw = dict(revision=cfg.revision, local_files_only=True)
        weights = dict(variant=cfg.variant, dtype=dtype, **kw)
        if cfg.vae_path:
            vae = AutoencoderKL.from_pretrained(cfg.vae_path, dtype=dtype, local_files_only=True)
        else:
            vae = AutoencoderKL.from_pretrained(path, subfolder="vae", variant=cfg.variant, dtype=torch.float32, **kw)
        return Components(
            unet=UNet2DConditionModel.from_pretrained(path, subfolder="unet", **weights),
            vae=vae,
            noise_scheduler=DDPMScheduler.from_pretrained(path, subfolder="scheduler", **kw),
            tokenizers=(CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **kw),
                        CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2", **kw)),
            text_encoders=(CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **weights),
                           CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", **weights)),
        )

    def tokenize(self, tokenizers: tuple, captions: list[str]) -> dict[str, torch.Tensor]:
        out = {}
        for name, tokenizer in zip(("input_ids", "input_ids_2"), tokenizers):
            out[name] = tokenizer(captions, max_length=tokenizer.model_max_length, padding="max_length",
                                  truncation=True, return_tensors="pt").input_ids
        return out

    def encode(self, text_encoders: tuple, tokens: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        hidden, pooled = [], None
        for name, text_encoder in zip(("input_ids", "input_ids_2"), text_encoders):
            out = text_encoder(tokens[name], output_hidden_states=True, return_dict=False)
            pooled = out[0]  # the last encoder's: CLIPTextModelWithProjection's text_embeds
            hidden.append(out[-1][-2])  # the penultimate layer's hidden states, as SDXL was trained
        return {"encoder_hidden_states": torch.cat(hidden, dim=-1), "pooled_prompt_embeds": pooled}

    def sample_conditioning(self, batch: dict) -> dict[str, torch.Tensor]:
        # diffusers' compute_time_ids: original size + crop top-left + target size, (h, w) each
        return {"time_ids": torch.cat([batch["original_size"], batch["crop_top_left"], batch["target_size"]], dim=-1)}

    def predict(self, unet, noisy_latents, timesteps, conditioning):
        added = {"text_embeds": conditioning["pooled_prompt_embeds"], "time_ids": conditioning["time_ids"]}
        return unet(noisy_latents, timesteps, conditioning["encoder_hidden_states"], added_cond_kwargs=added,
                    return_dict=False)[0]

    def kohya_version(self, unet: torch.nn.Module) -> dict:
        return {"v2": False, "base_model_version": "sdxl_base_v1-0"}

    def pipeline(self, path: Path, cfg: ModelConfig, dtype: torch.dtype, components: Components | None = None,
                 unet: torch.nn.Module | None = None):
        quiet_pipeline_imports()
        from diffusers import AutoencoderKL, StableDiffusionXLPipeline

        given = {}
        if components is not None:
            given = dict(unet=unet or components.unet, vae=components.vae, tokenizer=components.tokenizers[0],
                         tokenizer_2=components.tokenizers[1], text_encoder=components.text_encoders[0],
                         text_encoder_2=components.text_encoders[1])
        elif cfg.vae_path:
            given = dict(vae=AutoencoderKL.from_pretrained(cfg.vae_path, dtype=dtype, local_files_only=True))
        # (SDXL's own VAE config says force_upcast: the pipeline decodes in fp32 whatever `dtype` is)
        return StableDiffusionXLPipeline.from_pretrained(
            path, **given, revision=cfg.revision, variant=None if components is not None else cfg.variant,
            local_files_only=True, dtype=dtype)
