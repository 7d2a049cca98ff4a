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


def tiny_pipeline(model_path):
    """The diffusers pipeline of a tiny model folder, as a user loads it (no safety checker, offline)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model_path, safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def renderer(pipe, prompt: str = "a red circle", steps: int = 2):
    """A function rendering `prompt` at 64 px with a fixed seed through `pipe` as it is at each call."""
    import torch

    def image():
        return pipe(prompt, num_inference_steps=steps, height=64, width=64,
                    generator=torch.Generator().manual_seed(0), output_type="np").images[0]

    return image


def run_launch(*overrides: str, cwd: Path = ROOT, env: dict | None = None, module: str | None = None,
               timeout: int = 900) -> subprocess.CompletedProcess:
    """Run `python launch.py OVERRIDES` (or `python -m MODULE`) as a user would; capture its output."""
    cmd = [sys.executable, "-m", module] if module else [sys.executable, str(ROOT / "launch.py")]
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(cmd + list(overrides), cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


# what the multi-process runs of tests/test_distributed.py share
DDP_COMMON = [
    "device=cpu", "trainer.max_train_steps=3", "trainer.validation_prompts=[]", "trainer.checkpointing_steps=null",
    "dataset.random_flip=false", "dataset.center_crop=true", "optimizer.lr=1e-2", "trainer.seed=3",
]
# the C++ kernels built at -O0 (Inductor's debug build): the same graphs and caches as at -O3, built in less time
# on a 2-core machine
FAST_BUILD = {"TORCHINDUCTOR_DEBUG_COMPILE": "1"}
COMPILED_DDP = [*DDP_COMMON, "device.num_processes=2", "trainer.train_batch_size=2", "trainer.compile=true",
                "trainer.compile_mode=reduce-overhead", "dataset.drop_last=true", "trainer.compile_cache=cc/unet.bin",
                "model.lora.fused_matmul=true"]  # as perf=throughput: the fused LoRA under compiled DDP


@pytest.fixture(scope="session")
def compiled_ddp_run(tmp_path_factory, tiny_model_path):
    """One cold compiled run of two processes (the slowest thing the suite does, so two test modules share it):
    tests/test_distributed.py checks its gradients, tests/test_compile_cache.py the compile-cache file it finds
    damaged at its relative trainer.compile_cache path and rewrites. Its own, empty TORCHINDUCTOR_CACHE_DIR.
    Returns (root, output); the run is root/first."""
    root = tmp_path_factory.mktemp("compiled_ddp")
    (root / "cc").mkdir()
    (root / "cc" / "unet.bin").write_bytes(b"half a file")
    # Inductor compiles the tiny U-Net's C++ kernels in both ranks at once: a few minutes on a loaded 2-core
    # machine, hence the long timeout
    result = run_launch(*COMPILED_DDP, f"hydra.run.dir={root / 'first'}", cwd=root,
                        env={**FAST_BUILD, "TORCHINDUCTOR_CACHE_DIR": str(root / "inductor-first")}, timeout=1200)
    assert result.returncode == 0, result.stdout + result.stderr
    return root, result.stdout + result.stderr
