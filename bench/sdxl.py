"""Stable Diffusion XL base 1.0 built from its published architecture with random weights.

Same shapes and FLOPs as stabilityai/stable-diffusion-xl-base-1.0 (U-Net 2567.5M parameters with
transformer depths 1/2/10 and the text_time added conditioning; CLIP ViT-L text encoder of 12 layers and
OpenCLIP bigG of 32 with its projection; the 83.7M-parameter VAE with SDXL's scaling factor), so right for
speed and memory, not for images. The tokenizers are the byte-level one of the tiny demo pipeline: token
ids differ from SDXL's, lengths do not. Saved in the diffusers folder layout, so the trainer and diffusers'
`train_text_to_image_lora_sdxl.py` load it like the real model.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sd21 import SD21_VAE, save_drawn  # noqa: E402  (bench/sd21.py: the same VAE architecture)

SDXL_UNET = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,  # 768 (CLIP ViT-L) + 1280 (OpenCLIP bigG) side by side
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,  # 6 size numbers x 256 + the pooled 1280
    norm_num_groups=32,
)
SDXL_VAE = dict(SD21_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True)  # SD's VAE, SDXL's scale
SDXL_TEXT = dict(  # CLIP ViT-L/14's text tower
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
)
SDXL_TEXT_2 = dict(  # OpenCLIP ViT-bigG/14's text tower, with its projection
    vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
    max_position_embeddings=77, hidden_act="gelu", projection_dim=1280,
)
SDXL_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      prediction_type="epsilon", timestep_spacing="leading", steps_offset=1)


def build_sdxl(out: Path, dtype: str = "float16") -> Path:
    """Write the random SDXL-architecture pipeline to `out` (once) and return it."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from sd_lora.demo import _tiny_spec, _tiny_tokenizer_vocab

    out = Path(out)
    if (out / "model_index.json").is_file():
        return out
    torch.manual_seed(0)
    vocab, merges = _tiny_tokenizer_vocab(_tiny_spec()["words"])
    tokenizers = [CLIPTokenizer(vocab=vocab, merges=merges, pad_token="!", model_max_length=77) for _ in range(2)]
    return save_drawn(out, dtype, lambda: StableDiffusionXLPipeline(
        vae=AutoencoderKL(**SDXL_VAE),
        text_encoder=CLIPTextModel(CLIPTextConfig(**SDXL_TEXT)),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TEXT_2)),
        tokenizer=tokenizers[0], tokenizer_2=tokenizers[1],
        unet=UNet2DConditionModel(**SDXL_UNET),
        scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER),
    ))


if __name__ == "__main__":
    print(build_sdxl(Path(sys.argv[1])))
