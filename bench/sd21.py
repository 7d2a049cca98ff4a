"""Stable Diffusion 2.1 (768, v-prediction) built from its published architecture with random weights.

Same shapes and FLOPs as stabilityai/stable-diffusion-2-1 (U-Net 865.9M parameters, OpenCLIP-H-sized
text encoder of 23 layers, 83.7M-parameter VAE), so right for speed and memory, not for images. The
tokenizer is the byte-level one of the tiny demo pipeline: token ids differ from SD's, lengths do not.
Saved in the diffusers folder layout, so the trainer loads it like the real model.
"""

from __future__ import annotations

import sys
from pathlib import Path

SD21_UNET = dict(
    sample_size=96,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    attention_head_dim=(5, 10, 20, 20),
    cross_attention_dim=1024,
    use_linear_projection=True,
    norm_num_groups=32,
)
SD21_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=768,
    scaling_factor=0.18215,
)
SD21_TEXT = dict(
    vocab_size=49408,
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=23,
    num_attention_heads=16,
    max_position_embeddings=77,
    hidden_act="gelu",
    projection_dim=512,
)


def build_sd21(out: Path, dtype: str = "float16") -> Path:
    """Write the random SD 2.1-architecture pipeline to `out` (once) and return it."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from sd_lora.demo import _tiny_spec, _tiny_tokenizer_vocab

    out = Path(out)
    if (out / "model_index.json").is_file():
        return out
    torch.manual_seed(0)
    vocab, merges = _tiny_tokenizer_vocab(_tiny_spec()["words"])
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, pad_token="!", model_max_length=77)
    return save_drawn(out, dtype, lambda: StableDiffusionPipeline(
        vae=AutoencoderKL(**SD21_VAE),
        text_encoder=CLIPTextModel(CLIPTextConfig(**SD21_TEXT)),
        tokenizer=tokenizer,
        unet=UNet2DConditionModel(**SD21_UNET),
        scheduler=DDIMScheduler(**_tiny_spec()["scheduler"]),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ))


def save_drawn(out: Path, dtype: str, build) -> Path:
    """The pipeline `build()` makes, its random weights drawn on the GPU where there is one (billions of
    parameters take minutes on a few CPU cores), saved to `out` in `dtype`."""
    import torch

    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        pipe = build()
    pipe.to(getattr(torch, dtype)).save_pretrained(out)
    del pipe
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


if __name__ == "__main__":
    print(build_sd21(Path(sys.argv[1])))
