"""Library notices a user cannot act on, kept out of the log (everything else the libraries say passes)."""

from __future__ import annotations

import logging


class _NoTorchvisionFallbackNotice(logging.Filter):
    """diffusers' pipelines import transformers' image processors (for safety checkers and image encoders that
    sd_lora never loads); without torchvision transformers says once that it falls back to PIL. Nothing a user
    can act on: sd_lora needs no torchvision. Other warnings pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


def quiet_pipeline_imports() -> None:
    logger = logging.getLogger("transformers.utils.import_utils")
    if not any(isinstance(f, _NoTorchvisionFallbackNotice) for f in logger.filters):
        logger.addFilter(_NoTorchvisionFallbackNotice())
