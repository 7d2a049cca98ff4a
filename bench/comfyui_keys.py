"""Does ComfyUI load every key of the kohya-layout LoRA that sd_lora writes? (SD 2.1 768-v, SD 1.5 and SDXL)

    python bench/comfyui_keys.py --comfyui PATH_TO_COMFYUI_SOURCE [--model sd21|sd15|sdxl] [--wide]

Builds on the meta device (no weights, no download, under 0.5 GiB) diffusers' U-Net and transformers' CLIP text
encoders with each model's published shapes (SD 2.1: bench/sd21.py, OpenCLIP-H text tower of 23 layers; SD 1.5:
below, CLIP-L of 12 layers; SDXL base 1.0: below, U-Net with text_time added conditioning and 1/2/10 transformer
layers per block, CLIP ViT-L of 12 layers + OpenCLIP bigG of 32 with its projection), injects the LoRA as the
trainer does (sd_lora.model.add_lora, add_text_lora on each text encoder, model.lora.train_text_encoder=true),
builds the tensors and header as save_lora does (prefixes unet / text_encoder / text_encoder_2) and converts them
with sd_lora.export.diffusers_to_kohya, as the trainer's kohya export does (SDXL: lora_te1_ / lora_te2_). Then runs
ComfyUI's own code on it as its LoraLoader does (comfy.sd.load_lora_for_models): the model config ComfyUI detects
(must be SD20 / SD15 / SDXL), its BaseModel and text encoder (SD2: clip_h, SD1: clip_l, SDXL: clip_l + clip_g) on
the meta device, comfy.lora.model_lora_keys_unet + model_lora_keys_clip, comfy.lora_convert.convert_lora,
comfy.lora.load_lora with its "lora key not loaded" warnings caught.

A module is mapped when its name is in ComfyUI's key map, load_lora took its lora_up, lora_down and alpha, and the
weight it patches is in ComfyUI's model with a size up @ down fits (LoRAAdapter.calculate_weight reshapes it).
ComfyUI must also detect the same model and key map from its own (LDM checkpoint) U-Net keys as from diffusers'.
Default targets: the trainer's defaults (to_q, to_k, to_v, to_out.0; q_proj, k_proj, v_proj, out_proj); --wide:
WIDE below (projections, feed-forward, resnets, time embedding (and SDXL's add_embedding), conv_in/out, samplers;
fc1, fc2). Exit status 1 when a module is not mapped.

ComfyUI's optional packages these imports pull in and never use here (torchvision, torchaudio, sentencepiece, ...)
are stubbed when absent; einops it needs (pip install einops). A developer tool, not in the test suite (CI has no
ComfyUI source).

Checked against ComfyUI a125cd84b054a57729b5eecab930ca9408719832 (2025-10-12): every module mapped, all three
models, default and --wide targets (U-Net + text encoder modules; SD 2.1: 128 + 92, --wide 282 + 138; SD 1.5:
128 + 48, --wide 282 + 72; SDXL, detected as SDXL, te1 -> clip_l and te2 -> clip_g: 560 + 48 + 128, --wide
794 + 72 + 192). No change to sd_lora/export.py was needed for SDXL.
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import json
import logging
import sys
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from sd21 import SD21_TEXT, SD21_UNET  # noqa: E402

SD15_UNET = {**SD21_UNET, "sample_size": 64, "attention_head_dim": 8, "cross_attention_dim": 768,
             "use_linear_projection": False}
SD15_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
SDXL_UNET = dict(  # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, norm_num_groups=32,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
SDXL_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,  # CLIP ViT-L
                 num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
SDXL_TEXT_2 = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,  # OpenCLIP bigG
                   num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)
WIDE = dict(target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                            "conv1", "conv2", "time_emb_proj", "conv_shortcut", "conv_in", "conv_out", "linear_1",
                            "linear_2", "downsamplers.0.conv", "upsamplers.0.conv"],
            text_encoder_target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"])
# {model: (U-Net config, ((file prefix, transformers class, text config), ...), ComfyUI's model config)}
MODELS = {"sd21": (SD21_UNET, (("text_encoder", "CLIPTextModel", SD21_TEXT),), "SD20"),
          "sd15": (SD15_UNET, (("text_encoder", "CLIPTextModel", SD15_TEXT),), "SD15"),
          "sdxl": (SDXL_UNET, (("text_encoder", "CLIPTextModel", SDXL_TEXT),
                               ("text_encoder_2", "CLIPTextModelWithProjection", SDXL_TEXT_2)), "SDXL")}
PARTS = {"lora_unet_": "unet", "lora_te_": "te", "lora_te1_": "te1", "lora_te2_": "te2"}  # kohya prefix: table row
NOT_LOADED = "lora key not loaded: "  # comfy.lora.load_lora's warning
OPTIONAL = ("torchvision", "torchaudio", "torchsde", "sentencepiece", "av", "kornia", "spandrel")


def our_kohya_lora(unet_config: dict, text_encoders: tuple, targets: dict | None = None):
    """(the kohya-layout tensors sd_lora writes for these shapes, the bare U-Net's diffusers state dict);
    `text_encoders`: ((file prefix, transformers class name, text config), ...) as in MODELS."""
    import transformers
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig

    from sd_lora.config import Attention, LoraSettings
    from sd_lora.export import ADAPTER_KEY, diffusers_to_kohya
    from sd_lora.model import add_lora, add_text_lora, portable_lora

    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config)
        modules = {"unet": unet, **{prefix: getattr(transformers, cls)(CLIPTextConfig(**config))
                                    for prefix, cls, config in text_encoders}}
        bare_unet = dict(unet.state_dict())
        lora = LoraSettings(train_text_encoder=True, **(targets or {}))
        add_lora(unet, Attention.sdp, lora)
        add_text_lora(tuple(m for prefix, m in modules.items() if prefix != "unet"), lora)
    tensors, adapter = {}, {}  # as sd_lora.model.save_lora builds them
    for prefix, module in modules.items():
        weights, config = portable_lora(module)
        tensors.update({f"{prefix}.{k}": v for k, v in weights.items()})
        adapter.update({f"{prefix}.{k}": sorted(v) if isinstance(v, set) else v for k, v in config.items()})
    header = {ADAPTER_KEY: json.dumps(adapter, default=str)}
    return diffusers_to_kohya(tensors, header), bare_unet


class _Anything:
    def __init__(self, *args, **kwargs): pass
    def __call__(self, *args, **kwargs): return _Anything()
    def __getattr__(self, name): return _Anything()
    def __mro_entries__(self, bases): return (object,)


class _Stubs(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Import an absent optional package as a module whose every attribute is a dummy."""

    def find_spec(self, fullname, path, target=None):
        top = fullname.partition(".")[0]
        if top in OPTIONAL and importlib.machinery.PathFinder.find_spec(top) is None:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []
        module.__getattr__ = lambda name: _Anything()
        return module

    def exec_module(self, module):
        pass


def comfyui_check(comfyui: Path, lora: dict, bare_unet: dict, expected_config: str) -> dict[str, tuple[int, list]]:
    """{part: (our module count, [(module, why it is not loaded)])} by ComfyUI's own LoRA loading code."""
    if str(comfyui) not in sys.path:
        sys.path.insert(0, str(comfyui))
        sys.meta_path.append(_Stubs())
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # model_management picks its device at import
    import comfy.lora
    import comfy.lora_convert
    import comfy.model_detection

    model_config = comfy.model_detection.model_config_from_diffusers_unet(bare_unet)
    if type(model_config).__name__ != expected_config:
        raise SystemExit(f"ComfyUI took this U-Net for {type(model_config).__name__}, not {expected_config}")
    with torch.device("meta"):
        model = model_config.get_model({}, device="meta")  # BaseModel: keys diffusion_model.*
        clip_target = model_config.clip_target()
        clip = clip_target.clip(device="meta", dtype=torch.float16, **clip_target.params)  # clip_h/clip_l/clip_g.*
        from_checkpoint = comfy.model_detection.model_config_from_unet(model.state_dict(), "diffusion_model.")
        checkpoint_model = from_checkpoint.get_model({}, device="meta")  # as from an LDM-layout checkpoint file
    key_map = comfy.lora.model_lora_keys_unet(model, {})
    if (type(from_checkpoint) is not type(model_config)
            or key_map != comfy.lora.model_lora_keys_unet(checkpoint_model, {})):
        raise SystemExit(f"ComfyUI reads a {expected_config} checkpoint file differently from diffusers' U-Net")
    key_map = comfy.lora.model_lora_keys_clip(clip, key_map)

    not_loaded = []
    catcher = logging.Handler()
    catcher.emit = lambda record: not_loaded.extend(
        [record.getMessage().removeprefix(NOT_LOADED)] if record.getMessage().startswith(NOT_LOADED) else [])
    logging.getLogger().addHandler(catcher)
    try:
        patches = comfy.lora.load_lora(comfy.lora_convert.convert_lora(dict(lora)), key_map)
    finally:
        logging.getLogger().removeHandler(catcher)
    weights = {**model.state_dict(), **clip.state_dict()}

    modules = sorted({key.partition(".")[0] for key in lora})
    part_of = {module: next(part for prefix, part in PARTS.items() if module.startswith(prefix)) for module in modules}
    result = {part: (0, []) for part in PARTS.values() if part in part_of.values()}
    for module in modules:
        part = part_of[module]
        count, missing = result[part]
        target = key_map.get(module)
        up, down = lora[f"{module}.lora_up.weight"], lora[f"{module}.lora_down.weight"]
        if target is None:
            why = "not in ComfyUI's key map"
        elif target not in weights:
            why = f"maps to {target}, which ComfyUI's model lacks"
        elif up[0].numel() != down.shape[0] or up.shape[0] * down[0].numel() != weights[target].numel():
            # LoRAAdapter.calculate_weight: mm(up.flatten(1), down.flatten(1)).reshape(weight.shape)
            why = (f"maps to {target} of shape {tuple(weights[target].shape)}, "
                   f"up @ down is {(up.shape[0], down[0].numel())}")
        elif f"{module}.alpha" not in lora:
            why = "no alpha: ComfyUI would scale it by 1, as if alpha were its rank"
        elif target not in patches or any(k.startswith(module + ".") for k in not_loaded):
            why = f"load_lora left {[k for k in not_loaded if k.startswith(module + '.')]}"
        else:
            why = None
        result[part] = (count + 1, missing + ([(module, why)] if why else []))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--comfyui", type=Path, required=True, help="a ComfyUI source tree (holding comfy/lora.py)")
    parser.add_argument("--model", choices=sorted(MODELS), action="append", help="default: all")
    parser.add_argument("--wide", action="store_true", help="LoRA on every module kind in WIDE, not the defaults")
    args = parser.parse_args(argv)
    if not (args.comfyui / "comfy" / "lora.py").is_file():
        parser.error(f"--comfyui {args.comfyui}: no comfy/lora.py there; give a ComfyUI source tree")
    args.comfyui = args.comfyui.resolve()
    rows, problems = [], []
    for name in args.model or sorted(MODELS):
        unet_config, text_encoders, expected = MODELS[name]
        lora, bare_unet = our_kohya_lora(unet_config, text_encoders, WIDE if args.wide else None)
        for part, (count, missing) in comfyui_check(args.comfyui, lora, bare_unet, expected).items():
            rows.append((name, part, count, count - len(missing), len(missing)))
            problems += [(name, module, why) for module, why in missing]
    print(f"{'model':6} {'part':5} {'our modules':>11} {'mapped by ComfyUI':>17} {'not mapped':>10}")
    for row in rows:
        print(f"{row[0]:6} {row[1]:5} {row[2]:>11} {row[3]:>17} {row[4]:>10}")
    for name, module, why in problems:
        print(f"{name}: {module}: {why}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
