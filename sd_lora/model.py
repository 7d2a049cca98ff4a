"""The frozen Stable Diffusion parts, the LoRA U-Net and its attention backend.

`resolve_model_path` finds the pipeline folder (a local folder, or a hub id already in the local
hub cache: nothing is downloaded) and checks its components before anything is loaded.
`load_components` loads the pipeline's parts through the model family (sd_lora/families/).
`add_lora` sets the attention processors and injects peft's LoRA; `lora_state_dict` / `save_lora`
write the adapter in the format the family's pipeline's `load_lora_weights` reads. Nothing here runs
a training step.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import torch

from sd_lora.config import Attention, LoraInit, LoraSettings, MixedPrecision, ModelConfig, SdpKernel
from sd_lora.errors import UserError
from sd_lora.families import Components, family_of
from sd_lora.files import save_safetensors
from sd_lora.hub import download_command, resolve_local

log = logging.getLogger(__name__)

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
WEIGHT_DTYPES = {MixedPrecision.no: torch.float32, MixedPrecision.fp16: torch.float16, MixedPrecision.bf16: torch.bfloat16}


def lora_file(path: Path) -> Path:
    """A run directory's diffusers LoRA file, or `path` itself (a LoRA file)."""
    return path / "lora" / LORA_WEIGHT_NAME if path.is_dir() else path


def weight_dtype_of(mixed_precision: MixedPrecision) -> torch.dtype:
    """The dtype of the frozen weights (the LoRA weights stay fp32 whatever the precision)."""
    return WEIGHT_DTYPES[mixed_precision]


def resolve_model_path(cfg: ModelConfig) -> Path:
    """The local pipeline folder for `model.pretrained_model_name_or_path`, checked; UserError if absent."""
    path = resolve_local("model.pretrained_model_name_or_path", cfg.pretrained_model_name_or_path,
                         source_repo=cfg.source_repo, revision=cfg.revision)
    folders = family_of(cfg).folders
    missing = [c for c in folders if not (path / c).is_dir()]
    if missing:
        raise UserError(
            f"model folder {path.resolve()} lacks component folder(s) {', '.join(missing)} "
            f"(a diffusers pipeline of model.family={cfg.family.value} has {', '.join(folders)}); "
            + (f"download it again with: {download_command(cfg.source_repo, local_dir=str(path))}"
               if cfg.source_repo else "point model.pretrained_model_name_or_path at a complete pipeline folder")
        )
    return path


def load_components(cfg: ModelConfig, path: Path, dtype: torch.dtype = torch.float32) -> Components:
    """Load the frozen parts of the pipeline (weights in `dtype`, on the CPU, requires_grad off)."""
    try:
        comps = family_of(cfg).load(cfg, path, dtype)
    except (OSError, ValueError) as exc:
        raise UserError(
            f"could not load the pipeline in {path} (variant={cfg.variant}, revision={cfg.revision}): {exc}"
        ) from None
    if cfg.prediction_type is not None:
        comps.noise_scheduler.register_to_config(prediction_type=cfg.prediction_type.value)
    for module in (comps.unet, *comps.frozen_modules()):
        module.requires_grad_(False)
    return comps


def attention_processor(attention: Attention):
    """The diffusers processor for an attention backend."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    return AttnProcessor2_0() if attention is Attention.sdp else AttnProcessor()


def sdp_kernel_order(kernel: SdpKernel, device: torch.device | str = "cpu"):
    """A context in which scaled_dot_product_attention tries `kernel` first, then torch's others; auto: torch's order.

    A preference, not a demand: a kernel that cannot run a shape (or this device) falls back to the next.
    The order is process-wide (autograd's threads see it). CUDA's dispatch reads it; on the CPU (torch 2.13)
    torch takes its CPU flash kernel whenever it can, whatever the order. On CUDA, torch sets its default
    order at the first attention call of the process (cuDNN first on Hopper with a recent cuDNN) and
    would overwrite an order set before that call: one tiny attention call on `device` comes first.
    """
    if kernel is SdpKernel.auto:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if torch.device(device).type == "cuda":
        q = torch.zeros(1, 1, 8, 64, device=device, dtype=torch.float16)
        torch.nn.functional.scaled_dot_product_attention(q, q, q)
    first = {SdpKernel.flash: SDPBackend.FLASH_ATTENTION, SdpKernel.efficient: SDPBackend.EFFICIENT_ATTENTION,
             SdpKernel.cudnn: SDPBackend.CUDNN_ATTENTION, SdpKernel.math: SDPBackend.MATH}[kernel]
    # OVERRIDEABLE is the slot a device plug-in (PrivateUse1) fills with its own kernel: it stays enabled
    rest = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH,
            SDPBackend.OVERRIDEABLE]
    return sdpa_kernel([first, *(b for b in rest if b != first)], set_priority=True)


def sdp_priority_order() -> list[str] | None:
    """The order in which torch now tries the attention kernels (None where torch does not say)."""
    from torch.nn.attention import SDPBackend

    read = getattr(torch._C, "_get_sdp_priority_order", None)  # private: the public API only sets the order
    if read is None:
        return None
    names = {b.value: name for name, b in SDPBackend.__members__.items()}
    return [names.get(int(v), str(v)) for v in read()]


def add_lora(unet: torch.nn.Module, attention: Attention, lora: LoraSettings) -> list[torch.nn.Parameter]:
    """Set the attention backend, inject peft LoRA, keep the LoRA weights fp32; return them."""
    from peft import LoraConfig

    unet.set_attn_processor(attention_processor(attention))
    config = LoraConfig(
        r=lora.rank,  # our `rank` is peft's `r`, mapped here only
        lora_alpha=lora.lora_alpha,
        lora_dropout=lora.dropout,
        init_lora_weights=PEFT_INIT[lora.init_lora_weights],
        use_dora=lora.use_dora,
        target_modules=list(lora.target_modules),
    )
    try:
        unet.add_adapter(config)
    except ValueError as exc:
        raise UserError(f"model.lora.target_modules={list(lora.target_modules)}: {exc}") from None
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()  # trainable weights stay fp32 whatever the frozen weights' dtype
    if lora.init_lora_weights in MUTATING_INITS:  # what the base weights lost to the LoRA: taken off at save
        setattr(unet, INITIAL_LORA, {k: v.detach().clone() for k, v in lora_state_dict(unet).items()})
    return params


PEFT_INIT = {LoraInit.gaussian: "gaussian", LoraInit.kaiming: True, LoraInit.pissa: "pissa", LoraInit.olora: "olora"}
MUTATING_INITS = (LoraInit.pissa, LoraInit.olora)  # they move part of the frozen weight into the LoRA's start
INITIAL_LORA = "sd_lora_initial_lora"  # attribute of a U-Net whose LoRA started from its own weights: that start


def add_text_lora(text_encoders: tuple, lora: LoraSettings) -> list[torch.nn.Parameter]:
    """Inject peft LoRA into each text encoder (model.lora.train_text_encoder), weights fp32; return them.

    peft's own injection: transformers' `add_adapter` does the same but refuses the peft releases on PyPI
    today (transformers 5.24 asks for peft >= 0.22). `peft_config` is set where transformers' would set it,
    which is where `get_peft_model_state_dict` and `save_lora` read the adapter's rank and alpha.
    """
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=lora.text_rank, lora_alpha=lora.text_lora_alpha, lora_dropout=lora.dropout,
                        init_lora_weights=PEFT_INIT[lora.init_lora_weights],
                        target_modules=list(lora.text_encoder_target_modules))
    params = []
    for text_encoder in text_encoders:
        try:
            inject_adapter_in_model(config, text_encoder, adapter_name="default")
        except ValueError as exc:
            raise UserError(f"model.lora.text_encoder_target_modules={list(lora.text_encoder_target_modules)}: "
                            f"{exc}") from None
        text_encoder.peft_config = {"default": config}
        params += [p for p in text_encoder.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    return params


@contextlib.contextmanager
def lora_off(*modules: torch.nn.Module):
    """The modules' LoRA layers switched off for the block: the base model's outputs (for the embedding cache,
    which other runs share, while the text encoders carry a LoRA, model.lora.init_from's one included)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for module in modules for m in module.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def _flat_clip(module: torch.nn.Module) -> bool:
    """transformers 5's CLIP text models hold their layers at the top (`encoder.layers...`), transformers 4's
    under `text_model`. LoRA files keep the `text_model.` names that every tool reads (diffusers' loader maps
    them onto either), so that a file does not depend on the transformers release it was written with."""
    return type(module).__name__.startswith("CLIPText") and not hasattr(module, "text_model")


def lora_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A module's LoRA weights as trained, keyed as diffusers' `load_lora_weights` expects (without the `unet.` /
    `text_encoder.` prefix). Checkpoints keep these; the LoRA file is `portable_lora` of them."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(module))
    return {f"text_model.{k}": v for k, v in state.items()} if _flat_clip(module) else state


def peft_state_dict(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`lora_state_dict`'s keys back to peft's for `module` (what `set_peft_model_state_dict` takes)."""
    from diffusers.utils import convert_state_dict_to_peft, convert_unet_state_dict_to_peft

    if _flat_clip(module):
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    if any(".lora_linear_layer." in k for k in state):  # a text encoder's projections (diffusers' names)
        return convert_state_dict_to_peft(state)
    return convert_unet_state_dict_to_peft(state)


def portable_lora(module: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    """The module's LoRA weights and peft config as a file for the unchanged base model.

    PiSSA and OLoRA start from B0 A0 taken out of the frozen weight W (which then holds W - s B0 A0); trained to B A,
    the change to W is s (B A - B0 A0): a plain LoRA of twice the rank with down = [A; A0], up = [B, -B0] and twice the
    alpha (the same scale s), which is what peft's own conversion writes."""
    tensors = lora_state_dict(module)
    config = module.peft_config["default"].to_dict()
    initial = getattr(module, INITIAL_LORA, None)
    if initial is None:
        return tensors, config
    out = {}
    for key, down in tensors.items():
        if key.endswith(".lora.down.weight"):
            up_key = key.replace(".lora.down.weight", ".lora.up.weight")
            out[key] = torch.cat([down, initial[key].to(down)], dim=0)
            out[up_key] = torch.cat([tensors[up_key], -initial[up_key].to(down)], dim=1)
    config.update(r=2 * config["r"], lora_alpha=2 * config["lora_alpha"], init_lora_weights=True,
                  rank_pattern={k: 2 * v for k, v in (config.get("rank_pattern") or {}).items()},
                  alpha_pattern={k: 2 * v for k, v in (config.get("alpha_pattern") or {}).items()})
    return out, config


def save_lora(modules: dict[str, torch.nn.Module], out_dir: Path, metadata: dict[str, str] | None = None) -> Path:
    """Write `out_dir/pytorch_lora_weights.safetensors` readable by the family's pipeline's `load_lora_weights`.

    `modules` maps the file's key prefix to a LoRA-carrying module (`{"unet": unet}`; the family names them,
    see ModelFamily.lora_modules). Same layout as diffusers' `save_lora_weights` (keys prefixed, each peft
    LoraConfig under `lora_adapter_metadata` so that alpha != rank loads right), written with safetensors
    directly because diffusers cannot add our own header entries (the run config).
    """
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors, adapter = {}, {}
    for prefix, module in modules.items():
        weights, config = portable_lora(module)
        tensors.update({f"{prefix}.{k}": v.detach().to("cpu", torch.float32) for k, v in weights.items()})
        adapter.update({f"{prefix}.{k}": sorted(v) if isinstance(v, set) else v for k, v in config.items()})
    header = {"format": "pt", LORA_ADAPTER_METADATA_KEY: json.dumps(adapter, indent=2, sort_keys=True, default=str)}
    header.update(metadata or {})
    return save_safetensors(tensors, out_dir / LORA_WEIGHT_NAME, metadata=header)


def read_lora_metadata(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return {k: (json.loads(v) if k in ("sd_lora_config", "lora_adapter_metadata") else v) for k, v in meta.items()}
