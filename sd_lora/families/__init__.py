"""Model families behind one interface (`base.ModelFamily`); `model.family` picks one.

Adding a family is one module here and one entry in FAMILIES (plus its `model=` YAML options).
"""

from __future__ import annotations

from sd_lora.config import ModelConfig, ModelFamilyName
from sd_lora.families.base import Components, ModelFamily
from sd_lora.families.sd import StableDiffusion
from sd_lora.families.sdxl import StableDiffusionXL

FAMILIES: dict[ModelFamilyName, ModelFamily] = {ModelFamilyName.sd: StableDiffusion(),
                                                ModelFamilyName.sdxl: StableDiffusionXL()}


def family_of(cfg: ModelConfig) -> ModelFamily:
    return FAMILIES[cfg.family]


__all__ = ["Components", "ModelFamily", "FAMILIES", "family_of"]
