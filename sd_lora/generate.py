"""Images from a trained LoRA: `python -m sd_lora.generate run_dir=outputs/... prompt="a corgi"`.

`run_dir` is a training run's directory or the path of a LoRA file sd_lora wrote. The LoRA file carries
the run's composed config in its safetensors header, so the base pipeline is found without the original
command line. The images go to `<run dir>/generated/<time>/` (or `out_dir=`), seeded and reproducible.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from sd_lora.config import Attention, DeviceType, MixedPrecision, ModelConfig, SdpKernel, model_config_from
from sd_lora.errors import UserError, user_message

log = logging.getLogger(__name__)


@dataclass
class GenerateConfig:
    run_dir: str = MISSING  # a training run directory (holds lora/pytorch_lora_weights.safetensors), or a LoRA file
    prompt: str = MISSING
    negative_prompt: Optional[str] = None
    num_images: int = 4
    num_inference_steps: int = 30
    guidance_scale: float = 7.5
    lora_scale: float = 1.0  # 0 = the base model, 1 = the LoRA as trained
    seed: int = 0
    resolution: Optional[int] = None  # px; null = the run's training resolution
    device_type: DeviceType = DeviceType.auto  # auto | cpu | cuda | gcu
    mixed_precision: MixedPrecision = MixedPrecision.no  # weights and compute dtype for inference
    attention: Optional[Attention] = None  # null = the run's
    out_dir: Optional[str] = None  # null = Hydra's run dir, <run_dir>/generated/<time>

    def __post_init__(self):
        if self.num_images < 1 or self.num_inference_steps < 1:
            raise UserError("num_images and num_inference_steps must be positive integers")


def _register() -> None:
    OmegaConf.register_new_resolver("sd_lora.run_root", run_root, replace=True)
    cs = ConfigStore.instance()
    cs.store(name="base_generate", node=GenerateConfig)
    cs.store(name="generate", node={
        "defaults": ["base_generate", "_self_"],
        "hydra": {"run": {"dir": "${sd_lora.run_root:${run_dir}}/generated/${now:%Y-%m-%d_%H-%M-%S-%f}"}},
    })


def run_root(run_dir: str) -> str:
    """The folder `generated/` goes into: the run directory (for a LoRA file, the run directory it lies in)."""
    path = Path(run_dir)
    if path.is_file():
        return str(path.parent.parent if path.parent.name == "lora" else path.parent)
    return run_dir


def run_config(lora_file: Path) -> dict:
    """The training config stored in the LoRA file."""
    from sd_lora.model import read_lora_metadata

    if not lora_file.is_file():
        raise UserError(f"run_dir={str(lora_file.parent.parent)!r}: no LoRA at {lora_file.resolve()}; give the "
                        "directory of a finished training run (it holds lora/ and report.json) or a LoRA file")
    meta = read_lora_metadata(lora_file)
    if "sd_lora_config" not in meta:
        raise UserError(f"{lora_file} carries no sd_lora_config metadata; it was not written by sd_lora")
    return meta["sd_lora_config"]


def generate(cfg: GenerateConfig, out_dir: Path) -> list[Path]:
    import torch
    from sd_lora.devices import build_backend
    from sd_lora.families import family_of
    from sd_lora.model import attention_processor, lora_file, resolve_model_path, sdp_kernel_order, weight_dtype_of

    lora = lora_file(Path(cfg.run_dir))
    trained = run_config(lora)
    model_cfg: ModelConfig = model_config_from(trained)
    backend = build_backend(cfg.device_type.value)
    backend.check(cfg.mixed_precision.value)
    path = resolve_model_path(model_cfg)
    dtype = weight_dtype_of(cfg.mixed_precision)
    pipeline = family_of(model_cfg).pipeline(path, model_cfg, dtype)
    attention = cfg.attention or model_cfg.attention
    pipeline.unet.set_attn_processor(attention_processor(attention))
    pipeline.load_lora_weights(str(lora.parent), weight_name=lora.name, adapter_name="sd_lora")
    pipeline.set_adapters(["sd_lora"], adapter_weights=[cfg.lora_scale])
    pipeline.to(backend.device(0))
    resolution = cfg.resolution or trained["dataset"]["resolution"]
    generator = torch.Generator(device=backend.device(0)).manual_seed(cfg.seed)
    kernel = model_cfg.sdp_kernel if attention is Attention.sdp else SdpKernel.auto
    with backend.autocast(None if dtype == torch.float32 else dtype), sdp_kernel_order(kernel, backend.device(0)):
        images = pipeline(cfg.prompt, negative_prompt=cfg.negative_prompt, num_images_per_prompt=cfg.num_images,
                          num_inference_steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale,
                          height=resolution, width=resolution, generator=generator).images
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        paths.append(out_dir / f"{i:02d}.png")
        image.save(paths[-1])
    (out_dir / "prompt.txt").write_text(cfg.prompt + "\n")
    return paths


_register()


@hydra.main(version_base="1.3", config_path=None, config_name="generate")
def main(cfg) -> None:
    try:
        gen_cfg: GenerateConfig = OmegaConf.to_object(cfg)
        out_dir = Path(gen_cfg.out_dir or HydraConfig.get().runtime.output_dir)
        paths = generate(gen_cfg, out_dir)
    except MissingMandatoryValue as exc:
        log.error("error: %s has no value: give it on the command line, e.g. %s=...", exc.full_key, exc.full_key)
        sys.exit(2)
    except UserError as exc:
        log.error("%s", user_message(exc))
        sys.exit(2)
    print(f"{len(paths)} image(s) in {out_dir}")


USAGE = ('usage: python -m sd_lora.generate run_dir=RUN_DIR_OR_LORA_FILE prompt="a corgi" [num_images=4 seed=0 '
         'lora_scale=1.0 device_type=auto mixed_precision=no out_dir=DIR ...]  (every key: --cfg job)')


def missing_keys(argv: list[str]) -> list[str]:
    """The required keys a command line lacks (Hydra cannot even name its output folder without run_dir)."""
    if any(arg.startswith("-") for arg in argv):  # --help, --cfg, -m ...: Hydra's own
        return []
    given = {arg.split("=", 1)[0].lstrip("+") for arg in argv if "=" in arg}
    return [key for key in ("run_dir", "prompt") if key not in given]


if __name__ == "__main__":
    if missing_keys(sys.argv[1:]):
        print(f"error: {' and '.join(missing_keys(sys.argv[1:]))} missing; {USAGE}", file=sys.stderr)
        sys.exit(2)
    main()
