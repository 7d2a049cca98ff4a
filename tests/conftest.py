"""Shared test set-up: an isolated cache for the tiny model and hub/datasets caches, offline."""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

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


def run_launch(*overrides: str, cwd: Path = ROOT, env: dict | None = None, module: str | None = None,
               timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `python launch.py OVERRIDES` (or `python -m MODULE`) as a user would; capture its output."""
    cmd = [sys.executable, "-m", module] if module else [sys.executable, str(ROOT / "launch.py")]
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(cmd + list(overrides), cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=timeout)
