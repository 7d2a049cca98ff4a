"""The embedded quickstart: a tiny random SD-2.1-shaped pipeline (and an SD-1.5-shaped one) and the bundled
shapes data set.

The tiny pipeline uses the same classes as Stable Diffusion 2.1 (diffusers `UNet2DConditionModel`
with linear-projection attention, `AutoencoderKL` with an 8x downsampling VAE, transformers
`CLIPTextModel` + `CLIPTokenizer`, a v-prediction DDIM scheduler config) at small widths. It is
saved once in the diffusers folder layout and loaded back by the same code as the real model, so
nothing in the trainer knows it is tiny. The SD 1.5 layout (`layout="sd15"`) differs where SD 1.5 does:
convolutional attention projections (no `use_linear_projection`), one head count for every block,
CLIP's quick_gelu text encoder and an epsilon-prediction scheduler. It is reached only through config
(`${sd_lora.tiny_model:}` in `conf/model/tiny.yaml`).

The shapes data set ("a red circle on a blue background") is generated here and bundled in
`sd_lora/assets/shapes` as an imagefolder with metadata.jsonl; `python -m sd_lora.demo shapes DIR`
writes it again.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
import shutil
import sys
import tempfile
from pathlib import Path

from sd_lora.files import plain_modes

TINY_MODEL_VERSION = 1  # bump when the architecture below changes: the cache key includes it

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (240, 210, 40),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle")


def _tiny_tokenizer_vocab(words: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A byte-level BPE vocabulary in CLIP's format: every byte, plus one token per demo word.

    Any text tokenises (unknown words fall back to characters); the demo's words are single tokens.
    """
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab_list = chars + [c + "</w>" for c in chars]
    merges: list[tuple[str, str]] = []
    for word in words:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:
            merged = symbols[0] + symbols[1]
            merge = (symbols[0], symbols[1])
            if merge not in merges:
                merges.append(merge)
            if merged not in vocab_list:
                vocab_list.append(merged)
            symbols = [merged] + symbols[2:]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab_list)}, merges


LAYOUTS = ("sd21", "sd15")  # the tiny model's layouts: SD 2.1's (the default) and SD 1.5's


def _tiny_spec(layout: str = "sd21") -> dict:
    """Architecture of the tiny pipeline: SD 2.1's layout (or SD 1.5's) at small widths."""
    if layout not in LAYOUTS:
        raise ValueError(f"tiny model layout {layout!r}: use one of {LAYOUTS}")
    spec = _tiny_sd21_spec()
    if layout == "sd15":  # what SD 1.5's configs say where SD 2.1's differ
        spec["unet"].update(attention_head_dim=4, use_linear_projection=False)  # one head count; conv proj_in/out
        spec["text_encoder"].update(hidden_act="quick_gelu")  # OpenAI CLIP ViT-L/14
        spec["scheduler"].update(prediction_type="epsilon")
        spec["layout"] = "sd15"  # the cache key; the SD 2.1 spec keeps the key it always had
    return spec


def _tiny_sd21_spec() -> dict:
    return {
        "version": TINY_MODEL_VERSION,
        "unet": dict(
            sample_size=8,  # latent side at the 64 px demo resolution
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(32, 64, 64),
            layers_per_block=1,
            attention_head_dim=(2, 4, 4),  # SD 2.1 gives head counts here, as diffusers reads it
            cross_attention_dim=32,
            use_linear_projection=True,  # SD 2.x
            norm_num_groups=16,
        ),
        "vae": dict(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(16, 16, 32, 32),  # four blocks: 8x downsampling like SD
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=64,
            scaling_factor=0.18215,
        ),
        "text_encoder": dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            hidden_act="gelu",  # SD 2.1's OpenCLIP-H uses gelu
            projection_dim=32,
        ),
        "scheduler": dict(
            num_train_timesteps=1000,
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            prediction_type="v_prediction",  # SD 2.1 (768) is a v-prediction model
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
        ),
        "words": sorted({"a", "on", "background", *COLOURS, *SHAPES, "corgi"}),
    }


def build_tiny_pipeline(seed: int = 0, layout: str = "sd21"):
    """The tiny random pipeline in memory (a `StableDiffusionPipeline`)."""
    import torch

    from sd_lora.notices import quiet_pipeline_imports

    quiet_pipeline_imports()  # before diffusers' pipeline import, which logs a notice about torchvision
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    spec = _tiny_spec(layout)
    vocab, merges = _tiny_tokenizer_vocab(spec["words"])
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, pad_token="!", model_max_length=77)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(vocab_size=len(vocab), pad_token_id=vocab["!"], bos_token_id=vocab["<|startoftext|>"],
                       eos_token_id=vocab["<|endoftext|>"], **spec["text_encoder"])
    )
    unet = UNet2DConditionModel(**spec["unet"])
    vae = AutoencoderKL(**spec["vae"])
    scheduler = DDIMScheduler(**spec["scheduler"])
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def ensure_tiny_model(root: Path, layout: str = "sd21") -> Path:
    """Build the tiny pipeline (SD 2.1's layout, SD 1.5's, or SDXL's) into `root` once (diffusers folder layout)
    and return its folder."""
    spec = _tiny_sdxl_spec() if layout == "sdxl" else _tiny_spec(layout)
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]
    target = Path(root) / f"tiny-{layout}-{key}"
    if (target / "model_index.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=target.parent))
    try:
        (build_tiny_sdxl_pipeline() if layout == "sdxl" else build_tiny_pipeline(layout=layout)).save_pretrained(tmp)
        plain_modes(tmp)  # mkdtemp made it 0700: a shared $SD_LORA_CACHE would be unreadable to the rest
        try:
            tmp.rename(target)  # atomic: a concurrent builder either wins or finds ours
        except OSError:
            if not (target / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _tiny_sdxl_spec() -> dict:
    """Architecture of the tiny SDXL-shaped pipeline: SDXL's classes and added conditioning at small widths."""
    spec = _tiny_spec()
    unet = dict(spec["unet"], down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                cross_attention_dim=64,  # the two text encoders' hidden states side by side: 32 + 32
                transformer_layers_per_block=(1, 1, 2),
                addition_embed_type="text_time", addition_time_embed_dim=8,
                projection_class_embeddings_input_dim=6 * 8 + 32)  # 6 size numbers x 8 + the pooled embedding
    scheduler = dict(spec["scheduler"], prediction_type="epsilon", timestep_spacing="leading")
    return {**spec, "version": f"sdxl-{TINY_MODEL_VERSION}", "unet": unet, "scheduler": scheduler,
            "vae": dict(spec["vae"], scaling_factor=0.13025, force_upcast=True)}


def build_tiny_sdxl_pipeline(seed: int = 0):
    """The tiny random SDXL-shaped pipeline in memory (a `StableDiffusionXLPipeline`)."""
    import torch

    from sd_lora.notices import quiet_pipeline_imports

    quiet_pipeline_imports()
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    spec = _tiny_sdxl_spec()
    vocab, merges = _tiny_tokenizer_vocab(spec["words"])
    tokenizers = [CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad, model_max_length=77) for pad in ("!", "!")]
    config = dict(vocab_size=len(vocab), pad_token_id=vocab["!"], bos_token_id=vocab["<|startoftext|>"],
                  eos_token_id=vocab["<|endoftext|>"], **spec["text_encoder"])
    torch.manual_seed(seed)
    return StableDiffusionXLPipeline(
        vae=AutoencoderKL(**spec["vae"]), text_encoder=CLIPTextModel(CLIPTextConfig(**config)),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**config)), tokenizer=tokenizers[0],
        tokenizer_2=tokenizers[1], unet=UNet2DConditionModel(**spec["unet"]),
        scheduler=EulerDiscreteScheduler(**{k: v for k, v in spec["scheduler"].items()
                                            if k not in ("clip_sample", "set_alpha_to_one")}),
    )


def _draw(shape: str, fg: tuple, bg: tuple, size: int, rng: random.Random):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(image)
    r = rng.uniform(0.22, 0.36) * size
    cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fg)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fg)
    return image


def write_shapes(out: Path, size: int = 64, seed: int = 0) -> Path:
    """Write the shapes data set as an imagefolder: PNGs plus metadata.jsonl (file_name, text)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows = []
    combos = [(s, f, b) for s, f, b in itertools.product(SHAPES, COLOURS, COLOURS) if f != b]
    for i, (shape, fg, bg) in enumerate(combos):
        name = f"{i:03d}.png"
        _draw(shape, COLOURS[fg], COLOURS[bg], size, rng).save(out / name, optimize=True)
        rows.append({"file_name": name, "text": f"a {fg} {shape} on a {bg} background"})
    with open(out / "metadata.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return out


def main(argv: list[str]) -> None:
    if len(argv) != 2 or argv[0] not in ("shapes", "tiny-model"):
        sys.exit("usage: python -m sd_lora.demo shapes OUT_DIR | tiny-model CACHE_DIR")
    what, out = argv
    path = write_shapes(Path(out)) if what == "shapes" else ensure_tiny_model(Path(out))
    print(path)


if __name__ == "__main__":
    main(sys.argv[1:])
