"""Shared test set-up: an isolated cache for the tiny model and hub/datasets caches, offline."""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    # One tiny model for the whole session, built into a temporary cache; nothing goes online.
    cache = Path(os.environ.get("SD_LORA_TEST_CACHE") or tempfile.mkdtemp(prefix="sd_lora_test_cache_"))
    os.environ.setdefault("SD_LORA_CACHE", str(cache))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_CACHE", str(cache / "datasets"))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_path() -> Path:
    from sd_lora.config import cache_dir
    from sd_lora.demo import ensure_tiny_model

    return ensure_tiny_model(cache_dir())


@pytest.fixture(scope="session")
def tokenizer(tiny_model_path):
    """The tiny model's CLIP tokenizer."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(tiny_model_path, subfolder="tokenizer")


def noise(width: int, height: int, seed: int = 0) -> np.ndarray:
    """Random RGB pixels (height, width, 3): no symmetry, so a mirror image or a shifted crop differs."""
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def noise_image(width: int, height: int, seed: int = 0):
    from PIL import Image

    return Image.fromarray(noise(width, height, seed))


def run_launch(*overrides: str, cwd: Path = ROOT, env: dict | None = None, module: str | None = None,
               timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `python launch.py OVERRIDES` (or `python -m MODULE`) as a user would; capture its output."""
    cmd = [sys.executable, "-m", module] if module else [sys.executable, str(ROOT / "launch.py")]
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(cmd + list(overrides), cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=timeout)
