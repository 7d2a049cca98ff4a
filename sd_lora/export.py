"""LoRA file layouts, and conversion between them.

- diffusers' (`lora/pytorch_lora_weights.safetensors`): keys `unet.<module path>.lora.down.weight` /
  `.lora.up.weight`, peft's LoraConfig in the `lora_adapter_metadata` header entry (alpha there). What
  the pipelines' `load_lora_weights` reads.
- kohya's (`lora/<run name>.safetensors`): keys `lora_unet_<module path, '.' -> '_'>.lora_down.weight`,
  `.lora_up.weight` and `.alpha` (a tensor holding the real alpha of that module), `lora_te_...` for the text
  encoder, and the `ss_*` header entries kohya's tools write. What ComfyUI, AUTOMATIC1111/Forge and kohya's
  scripts read (diffusers reads it too).

diffusers' own `convert_state_dict_to_kohya` writes alpha = rank, which silently rescales a LoRA trained with
alpha != rank; here alpha comes from the adapter config. Going back, a kohya name is split at `_` and the
parts that belong together in diffusers' module names (`down_blocks`, `to_q`, `self_attn`, ...) joined again.

    python -m sd_lora.export RUN_DIR_OR_FILE --to kohya [--out FILE] [--dtype fp16]
    python -m sd_lora.export RUN_DIR_OR_FILE --merge [--scale 1.0] [--out FOLDER]   # a pipeline with it fused
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from pathlib import Path

import torch

from sd_lora.errors import UserError, user_message
from sd_lora.files import save_safetensors

ADAPTER_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}
# SDXL's two text encoders: kohya's sd-scripts (and ComfyUI) name the first one lora_te1_
KOHYA_PREFIXES_XL = {**KOHYA_PREFIXES, "text_encoder": "lora_te1_"}
KOHYA_READ = {"lora_te1_": "text_encoder", **{v: k for k, v in KOHYA_PREFIXES.items()}}
# the parts of diffusers' U-Net and CLIP module names that hold an underscore themselves
JOINED = ("down_blocks", "up_blocks", "mid_block", "transformer_blocks", "to_q", "to_k", "to_v", "to_out",
          "proj_in", "proj_out", "time_emb_proj", "conv_shortcut", "conv_in", "conv_out", "time_embedding",
          "linear_1", "linear_2", "text_model", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj",
          "add_k_proj", "add_v_proj", "add_q_proj", "to_add_out")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# a LoRA weight's key in diffusers' layout, without the file's prefix: the U-Net's `<module>.lora.down.weight`, a
# text encoder's projections `<module>.lora_linear_layer.down.weight`, other modules peft's `<module>.lora_A.weight`
DIFFUSERS_KEY = re.compile(r"^(?P<module>.+?)\.(?:lora\.(?P<a>down|up)|lora_linear_layer\.(?P<b>down|up)|lora_(?P<c>A|B))"
                           r"\.weight$")


def _split_key(key: str) -> tuple[str, str] | None:
    """`<module>.<any of diffusers' LoRA weight names>` -> (module, "down" | "up"); None for another key."""
    found = DIFFUSERS_KEY.match(key)
    if not found:
        return None
    kind = found["a"] or found["b"] or {"A": "down", "B": "up"}[found["c"]]
    return found["module"], kind


def _diffusers_keys(module_weights: dict[tuple[str, str], torch.Tensor]) -> dict[str, torch.Tensor]:
    """{(module, down|up): tensor} -> the keys the trainer writes (peft's names through diffusers' converter)."""
    from diffusers.utils import convert_state_dict_to_diffusers

    peft = {f"{m}.lora_{'A' if kind == 'down' else 'B'}.weight": v for (m, kind), v in module_weights.items()}
    return convert_state_dict_to_diffusers(peft)


def is_kohya(tensors: dict) -> bool:
    return any(key.startswith(tuple(KOHYA_READ)) for key in tensors)


def _adapter_configs(header: dict) -> dict[str, dict]:
    """`lora_adapter_metadata` ({"unet.r": 4, "unet.lora_alpha": 8, ...}) -> {"unet": {"r": 4, ...}}."""
    flat = header.get(ADAPTER_KEY)
    flat = json.loads(flat) if isinstance(flat, str) else (flat or {})
    configs: dict[str, dict] = {}
    for key, value in flat.items():
        prefix, _, name = key.partition(".")
        configs.setdefault(prefix, {})[name] = value
    return configs


def _pattern_value(patterns: dict, module: str, default):
    """peft's rank_pattern / alpha_pattern lookup: a key matches a module name ending in it."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def diffusers_to_kohya(tensors: dict[str, torch.Tensor], header: dict) -> dict[str, torch.Tensor]:
    """diffusers-layout tensors and header -> kohya-layout tensors, each module with its alpha."""
    configs = _adapter_configs(header)
    names = KOHYA_PREFIXES_XL if any(k.startswith("text_encoder_2.") for k in tensors) else KOHYA_PREFIXES
    dora = [key for key in tensors if key.endswith("lora_magnitude_vector")]
    if dora:
        raise UserError(f"the LoRA is a DoRA ({len(dora)} magnitude vectors, e.g. {dora[0]}), which kohya's layout "
                        "has no place for: use the diffusers file (lora/pytorch_lora_weights.safetensors, which "
                        "diffusers' load_lora_weights reads), or train without model.lora.use_dora")
    out = {}
    for key, value in tensors.items():
        prefix, _, rest = key.partition(".")
        split = _split_key(rest)
        if prefix not in KOHYA_PREFIXES or split is None:
            raise UserError(f"LoRA key {key!r} is not in diffusers' layout (<unet|text_encoder>.<module>.lora.down|up"
                            ".weight); give a LoRA file written by sd_lora or diffusers")
        module, kind = split
        if prefix not in configs:
            raise UserError(f"the LoRA file has no adapter config for {prefix!r} ({ADAPTER_KEY}), so its alpha is "
                            "unknown; give a file written by sd_lora or by diffusers' save_lora_weights")
        name = names[prefix] + module.replace(".", "_")
        out[f"{name}.lora_{kind}.weight"] = value
        cfg = configs[prefix]
        alpha = _pattern_value(cfg.get("alpha_pattern"), module, cfg["lora_alpha"])
        out[f"{name}.alpha"] = torch.tensor(float(alpha))
    return out


def _module_path(kohya_name: str) -> str:
    """`down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0` -> `down_blocks.0....attn1.to_out.0`."""
    parts, path = kohya_name.split("_"), []
    i = 0
    while i < len(parts):
        for width in (3, 2):
            joined = "_".join(parts[i:i + width])
            if joined in JOINED:
                path.append(joined)
                i += width
                break
        else:
            path.append(parts[i])
            i += 1
    return ".".join(path)


def kohya_to_diffusers(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """kohya-layout tensors -> diffusers-layout tensors and the header entry that keeps each module's alpha."""
    by_prefix = KOHYA_READ
    weights, ranks, alphas = {}, {}, {}
    for key, value in tensors.items():
        name, _, kind = key.partition(".")
        prefix = next((p for p in sorted(by_prefix, key=len, reverse=True) if name.startswith(p)), None)
        if prefix is None or kind not in ("lora_down.weight", "lora_up.weight", "alpha"):
            raise UserError(f"LoRA key {key!r} is not in kohya's layout (lora_unet_<module>.lora_down.weight, "
                            ".lora_up.weight, .alpha)")
        target, module = by_prefix[prefix], _module_path(name[len(prefix):])
        if kind == "alpha":
            alphas[(target, module)] = float(value)
            continue
        weights.setdefault(target, {})[(module, kind.split(".")[0].removeprefix("lora_"))] = value
        if kind == "lora_down.weight":
            ranks[(target, module)] = value.shape[0]
    out = {f"{target}.{k}": v for target, found in weights.items() for k, v in _diffusers_keys(found).items()}
    configs = {}
    for target in sorted({t for t, _ in ranks}):
        modules = {m: r for (t, m), r in ranks.items() if t == target}
        module_alphas = {m: alphas.get((target, m), float(r)) for m, r in modules.items()}  # kohya: no alpha = rank
        r = Counter(modules.values()).most_common(1)[0][0]
        alpha = Counter(module_alphas.values()).most_common(1)[0][0]
        configs.update({
            f"{target}.r": r, f"{target}.lora_alpha": alpha,
            f"{target}.rank_pattern": {re.escape(m): v for m, v in modules.items() if v != r},
            f"{target}.alpha_pattern": {re.escape(m): v for m, v in module_alphas.items() if v != alpha},
            f"{target}.target_modules": sorted(modules), f"{target}.lora_dropout": 0.0,
            f"{target}.init_lora_weights": True, f"{target}.use_dora": False, f"{target}.lora_bias": False})
    return out, {ADAPTER_KEY: json.dumps(configs, indent=2, sort_keys=True)}


def kohya_metadata(config: dict, run_name: str, facts: dict | None = None) -> dict[str, str]:
    """The `ss_*` header entries kohya's train_network.py writes, from sd_lora's run config and what the trainer
    knows (`facts`: v2, v_parameterization, steps, epochs, num_images; each left out where unknown): what
    ComfyUI's and AUTOMATIC1111's LoRA browsers show."""
    model, data, lora = config["model"], config["dataset"], config["model"]["lora"]
    alpha = lora["rank"] if lora.get("alpha") is None else lora["alpha"]
    meta = {
        "ss_network_module": "networks.lora", "ss_network_dim": str(lora["rank"]), "ss_network_alpha": str(alpha),
        "ss_sd_model_name": str(model.get("source_repo") or model["pretrained_model_name_or_path"]),
        "ss_resolution": f"({data['resolution']}, {data['resolution']})", "ss_output_name": run_name,
        "ss_learning_rate": str(config["optimizer"]["lr"]), "ss_unet_lr": str(config["optimizer"]["lr"]),
        "ss_training_comment": "trained with sd_lora", "ss_seed": str(config["trainer"]["seed"]),
        "ss_mixed_precision": str(config["precision"]["mixed_precision"]),
        "ss_network_train_unet_only": str(not lora.get("train_text_encoder", False)),
    }
    if lora.get("train_text_encoder"):
        meta["ss_text_encoder_lr"] = str(config["optimizer"].get("text_encoder_lr") or config["optimizer"]["lr"])
    facts = facts or {}
    if "v2" in facts:
        meta.update(ss_v2=str(facts["v2"]), ss_base_model_version=facts.get("base_model_version")
                    or ("sd_v2" if facts["v2"] else "sd_v1"))
    for key, fact in (("ss_v_parameterization", "v_parameterization"), ("ss_steps", "steps"),
                      ("ss_max_train_steps", "steps"), ("ss_epoch", "epochs"), ("ss_num_train_images", "num_images")):
        if facts.get(fact) is not None:
            meta[key] = str(facts[fact])
    return meta


def read_lora(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not path.is_file():
        raise UserError(f"no LoRA file at {path.resolve()}; give a .safetensors LoRA file or a run directory")
    with safe_open(str(path), framework="pt") as f:
        header = dict(f.metadata() or {})
    return load_file(str(path)), header


def convert(source: Path, to: str, out: Path, dtype: str = "fp32", facts: dict | None = None) -> Path:
    """Convert the LoRA file `source` (either layout) to layout `to` in `out`, tensors as `dtype`; `facts` as for
    kohya_metadata."""
    tensors, header = read_lora(source)
    if to == "kohya":
        if is_kohya(tensors):
            converted, meta = tensors, header
        else:
            converted = diffusers_to_kohya(tensors, header)
            meta = {k: v for k, v in header.items() if k != ADAPTER_KEY}
            if "sd_lora_config" in header:
                meta.update(kohya_metadata(json.loads(header["sd_lora_config"]), out.stem, facts))
    else:
        if is_kohya(tensors):
            converted, adapter = kohya_to_diffusers(tensors)
            meta = {**{k: v for k, v in header.items() if not k.startswith("ss_")}, **adapter}
        else:
            converted, meta = tensors, header
    cast = {k: v.to(DTYPES[dtype]) if v.is_floating_point() else v for k, v in converted.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    return save_safetensors(cast, out, metadata={"format": "pt", **meta})


def init_lora_from(modules: dict[str, torch.nn.Module], lora, path: Path) -> None:
    """Set the freshly injected LoRA of `modules` ({"unet": unet, "text_encoder": ...}, the family's prefixes) to
    the weights of the LoRA file at `path`, in either layout; UserError where its modules, rank or alpha do not fit
    `lora` (config.LoraSettings), or where it holds a LoRA for a module that does not train here."""
    from peft.utils import set_peft_model_state_dict

    from sd_lora.model import lora_file, lora_state_dict, peft_state_dict

    tensors, header = read_lora(lora_file(path))
    if is_kohya(tensors):
        tensors, header = kohya_to_diffusers(tensors)
    configs = _adapter_configs(header)
    key = "model.lora.init_from"
    unused = sorted({k.partition(".")[0] for k in tensors} - set(modules))
    if unused:
        raise UserError(f"{key}={str(path)!r} holds a LoRA for {', '.join(unused)} as well, which this run does not "
                        "train; set model.lora.train_text_encoder=true to start from all of it, or give a U-Net-only "
                        "LoRA")
    for prefix, module in modules.items():
        rank, alpha_now, ranks_key, alpha_key = (
            (lora.rank, lora.lora_alpha, "model.lora.rank", "model.lora.alpha") if prefix == "unet" else
            (lora.text_rank, lora.text_lora_alpha, "model.lora.text_encoder_rank", "model.lora.text_encoder_alpha"))
        own = {k.removeprefix(f"{prefix}."): v for k, v in tensors.items() if k.startswith(f"{prefix}.")}
        expected = set(lora_state_dict(module))
        if set(own) != expected:
            extra, missing = sorted(set(own) - expected), sorted(expected - set(own))
            raise UserError(f"{key}={str(path)!r} does not fit this model's LoRA ({prefix}): "
                            + (f"{len(missing)} module weight(s) missing, e.g. {missing[0]}; " if missing else "")
                            + (f"{len(extra)} unknown, e.g. {extra[0]}; " if extra else "")
                            + "give a LoRA of this base model with the same model.lora.target_modules "
                              "(text_encoder_target_modules for the text encoder)")
        ranks = {v.shape[0] for k, v in own.items() if _split_key(k)[1] == "down"}
        if ranks != {rank}:
            raise UserError(f"{key}={str(path)!r} has rank {sorted(ranks)} ({prefix}), {ranks_key}={rank}: set "
                            f"{ranks_key}={max(ranks)}")
        alpha = configs.get(prefix, {}).get("lora_alpha")
        if alpha is not None and float(alpha) != alpha_now:
            raise UserError(f"{key}={str(path)!r} was trained with alpha {alpha} ({prefix}), {alpha_key}={alpha_now}: "
                            f"set {alpha_key}={alpha} (another alpha would rescale it)")
        device = next(p for p in module.parameters() if p.requires_grad).device
        state = peft_state_dict(module, {k: v.to(device, torch.float32) for k, v in own.items()})
        set_peft_model_state_dict(module, state, adapter_name="default")


def merge(source: Path, out_dir: Path, scale: float = 1.0, dtype: str = "fp32", base: str | None = None) -> Path:
    """A full diffusers pipeline folder with the LoRA fused into its weights at `scale`: served without peft.

    The base pipeline is the one the run trained on (from the LoRA file's run config), or `base`."""
    from sd_lora.config import ModelConfig, model_config_from
    from sd_lora.families import family_of
    from sd_lora.model import resolve_model_path

    _, header = read_lora(source)
    if base is not None:
        model_cfg = ModelConfig(pretrained_model_name_or_path=base)
    elif "sd_lora_config" in header:
        model_cfg = model_config_from(json.loads(header["sd_lora_config"]))
    else:
        raise UserError(f"{source} carries no sd_lora run config, so its base model is unknown; give it with "
                        "--base MODEL_FOLDER")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise UserError(f"--out {out_dir}: the folder exists and is not empty; give a new folder")
    pipeline = family_of(model_cfg).pipeline(resolve_model_path(model_cfg), model_cfg, DTYPES[dtype])
    pipeline.load_lora_weights(str(source.parent), weight_name=source.name, adapter_name="sd_lora")
    pipeline.fuse_lora(lora_scale=scale, adapter_names=["sd_lora"])
    pipeline.unload_lora_weights()  # the fused weights stay; peft's layers go
    pipeline.save_pretrained(str(out_dir))
    return out_dir


def main(argv: list[str] | None = None) -> int:
    from sd_lora.model import lora_file

    parser = argparse.ArgumentParser(prog="python -m sd_lora.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="a LoRA .safetensors file (diffusers or kohya layout), or a run directory")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--to", choices=("kohya", "diffusers"), help="the layout to write")
    what.add_argument("--merge", action="store_true", help="write a pipeline folder with the LoRA fused in")
    parser.add_argument("--out", help="the file (folder, with --merge) to write; default: beside the source")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="the tensors' dtype")
    parser.add_argument("--scale", type=float, default=1.0, help="--merge: the LoRA's weight (1 = as trained)")
    parser.add_argument("--base", help="--merge: the base pipeline folder, for a LoRA file sd_lora did not write")
    args = parser.parse_args(argv)
    source = lora_file(Path(args.source))
    try:
        if args.merge:
            written = merge(source, Path(args.out) if args.out else source.parent.parent / "merged", args.scale,
                            args.dtype, args.base)
        else:
            default = source.with_name(f"{source.stem}.{args.to}.safetensors")
            written = convert(source, args.to, Path(args.out) if args.out else default, args.dtype)
    except UserError as exc:
        print(user_message(exc), file=sys.stderr)
        return 2
    print(written)
    return 0


if __name__ == "__main__":
    sys.exit(main())
