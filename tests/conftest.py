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
def tiny_sd15_model_path() -> Path:
    """The tiny model in SD 1.5's layout (epsilon, convolutional attention projections): model=sd15's code path."""
    from sd_lora.config import cache_dir
    from sd_lora.demo import ensure_tiny_model

    return ensure_tiny_model(cache_dir(), layout="sd15")


@pytest.fixture(scope="session")
def tiny_components(tiny_model_path):
    """The tiny model's parts, fp32, loaded once: for tests that only read them (no LoRA injected)."""
    from sd_lora.config import ModelConfig
    from sd_lora.model import load_components

    return load_components(ModelConfig(pretrained_model_name_or_path=str(tiny_model_path)), tiny_model_path)


@pytest.fixture(scope="session")
def tokenizer(tiny_components):
    """The tiny model's CLIP tokenizer."""
    return tiny_components.tokenizers[0]


@pytest.fixture(scope="session")
def tokenize(tiny_components):
    """Captions -> the tiny (SD-family) model's token tensors, as the training data set gets them."""
    import functools

    from sd_lora.families import FAMILIES
    from sd_lora.config import ModelFamilyName

    return functools.partial(FAMILIES[ModelFamilyName.sd].tokenize, tiny_components.tokenizers)


def noise(width: int, height: int, seed: int = 0) -> np.ndarray:
    """Random RGB pixels (height, width, 3): no symmetry, so a mirror image or a shifted crop differs."""
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def noise_image(width: int, height: int, seed: int = 0):
    from PIL import Image

    return Image.fromarray(noise(width, height, seed))


def write_noise_folder(root: Path, rows: list[tuple[tuple[int, int], str]], broken: int | None = None) -> Path:
    """An imagefolder data set of noise PNGs: rows of ((width, height), caption); row `broken` is not a PNG."""
    import json

    root.mkdir(parents=True)
    with open(root / "metadata.jsonl", "w") as f:
        for i, (size, caption) in enumerate(rows):
            name = f"{i:02d}.png"
            if i == broken:
                (root / name).write_bytes(b"not a png")
            else:
                noise_image(*size, seed=i).save(root / name)
            f.write(json.dumps({"file_name": name, "text": caption}) + "\n")
    return root


def run_launch(*overrides: str, cwd: Path = ROOT, env: dict | None = None, module: str | None = None,
               timeout: int = 900) -> subprocess.CompletedProcess:
    """Run `python launch.py OVERRIDES` (or `python -m MODULE`) as a user would; capture its output."""
    cmd = [sys.executable, "-m", module] if module else [sys.executable, str(ROOT / "launch.py")]
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(cmd + list(overrides), cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=timeout)
