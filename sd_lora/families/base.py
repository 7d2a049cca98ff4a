"""The model-family seam: what differs between Stable Diffusion 1.x/2.x, SDXL and later families.

A family knows which component folders a pipeline folder holds and how to load them, how a caption
becomes the U-Net's conditioning (tokens -> text-encoder outputs -> the U-Net call), which diffusers
pipeline renders images and loads the LoRA, and under which prefixes the LoRA file keeps each
trained module. Everything else (the loop, the loss, the cache, checkpoints, the report) is the same
for every family and never asks which one it has. A family is stateless: its methods take the
loaded components, so a data loader's worker processes can carry `tokenize` without the encoders.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import torch

from sd_lora.config import ModelConfig


@dataclass
class Components:
    """The loaded parts of a pipeline: frozen (requires_grad off), on the CPU, weights in one dtype."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    noise_scheduler: object
    tokenizers: tuple  # one per text encoder, in the pipeline's order
    text_encoders: tuple  # torch modules, in the pipeline's order
    text_trained: bool = False  # the text encoders carry a LoRA that trains (model.lora.train_text_encoder)

    def frozen_modules(self) -> tuple[torch.nn.Module, ...]:
        """The modules that run beside the U-Net and do not train: the VAE, and the text encoders unless they do."""
        return (self.vae,) if self.text_trained else (self.vae, *self.text_encoders)

    def move_frozen(self, device) -> None:
        """The frozen modules to `device` (off the accelerator while only cached embeddings are used)."""
        for module in self.frozen_modules():
            module.to(device)


class ModelFamily(ABC):
    name: str
    folders: tuple[str, ...]  # component folders of a diffusers pipeline folder of this family
    text_folders: tuple[str, ...]  # the folders the text side is read from (they key the embedding cache)
    condition_keys: tuple[str, ...]  # the tensors `encode` returns: what the embedding cache keeps per caption
    text_prefixes: tuple[str, ...]  # the LoRA file's key prefix of each text encoder, in the pipeline's order
    unused_text_layers: bool = False  # the conditioning skips a text encoder's last layer(s): their LoRA gets no grad

    @abstractmethod
    def load(self, cfg: ModelConfig, path: Path, dtype: torch.dtype) -> Components:
        """Load the pipeline's parts (raises OSError / ValueError as the libraries do)."""

    @abstractmethod
    def tokenize(self, tokenizers: tuple, captions: list[str]) -> dict[str, torch.Tensor]:
        """Captions -> token tensors, one row per caption (the data set's side; no model runs)."""

    @abstractmethod
    def encode(self, text_encoders: tuple, tokens: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Token tensors (on the encoders' device) -> the conditioning tensors named `condition_keys`."""

    @abstractmethod
    def predict(self, unet, noisy_latents: torch.Tensor, timesteps: torch.Tensor,
                conditioning: dict[str, torch.Tensor]) -> torch.Tensor:
        """The U-Net's prediction for noisy latents under this conditioning."""

    @abstractmethod
    def pipeline(self, path: Path, cfg: ModelConfig, dtype: torch.dtype, components: Components | None = None,
                 unet: torch.nn.Module | None = None):
        """The diffusers pipeline that renders images (and loads a LoRA file) for this family: built from the
        loaded `components` (with `unet` in place of theirs) during training, or read from `path` alone."""

    def sample_conditioning(self, batch: dict) -> dict[str, torch.Tensor]:
        """Conditioning from each sample's image rather than its caption (SDXL: the sizes); none by default."""
        return {}

    def lora_modules(self, unet: torch.nn.Module, text_encoders: tuple = ()) -> dict[str, torch.nn.Module]:
        """The trained modules under the prefixes the LoRA file uses (diffusers names them after the pipeline's
        attributes): the U-Net, and the text encoders when they train (`text_encoders` given)."""
        return {"unet": unet, **dict(zip(self.text_prefixes, text_encoders))}

    def kohya_version(self, unet: torch.nn.Module) -> dict:
        """kohya's `ss_v2` / `ss_base_model_version` facts (what ComfyUI's and AUTOMATIC1111's browsers show)."""
        v2 = unet.config.cross_attention_dim >= 1024  # SD 2.x's OpenCLIP-H width; SD 1.x has 768
        return {"v2": v2, "base_model_version": "sd_v2" if v2 else "sd_v1"}

    def cache_identity(self, components: Components) -> dict:
        """What the cached text embeddings depend on besides the weight files: the encoders' and tokenizers' configs."""
        return {"text_encoder": [te.config.to_dict() for te in components.text_encoders],
                "tokenizer_max_length": [tok.model_max_length for tok in components.tokenizers]}

    # ---- built from the above: the same for every family

    @torch.no_grad()
    def encode_captions(self, components: Components, captions: list[str], device) -> dict[str, torch.Tensor]:
        tokens = self.tokenize(components.tokenizers, captions)
        return self.encode(components.text_encoders, {k: v.to(device) for k, v in tokens.items()})

    def conditioning(self, text_encoders: tuple, batch: dict, dtype: torch.dtype,
                     grad: bool = False) -> dict[str, torch.Tensor]:
        """A batch's conditioning: from the embedding cache when the batch carries it, else encoded now (with
        gradients when `grad`: the text encoders train)."""
        if all(key in batch for key in self.condition_keys):
            found = {key: batch[key] for key in self.condition_keys}
        else:
            with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
                found = self.encode(text_encoders, batch)
        found.update(self.sample_conditioning(batch))
        return {key: value.to(dtype) for key, value in found.items()}
