"""The shape of the package: rooms that import only rooms below them, the loop imported by the trainer
alone, and the model family as the one place that knows which diffusers / transformers classes a model
family uses. These read the source and run the trainer; they fail when a change breaks the layering."""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import sd_lora

PACKAGE = Path(sd_lora.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """The sd_lora modules a file imports, at its top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sd_lora"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names
                         if (PACKAGE.parent / f"{node.module}.{a.name}".replace(".", "/")).with_suffix(".py").is_file())
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("sd_lora."))
    return found


@functools.cache
def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in imports_of(path) if m in modules and m != name} for name, path in modules.items()}


def test_no_module_imports_a_module_that_imports_it_back():
    edges = graph()
    seen, done, cycles = [], set(), []

    def visit(node):
        if node in seen:
            cycles.append(seen[seen.index(node):] + [node])
            return
        if node in done:
            return
        seen.append(node)
        for child in sorted(edges[node]):
            visit(child)
        seen.pop()
        done.add(node)

    for node in sorted(edges):
        visit(node)
    assert not cycles, "import circles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_only_the_trainer_imports_the_loop_and_only_the_launcher_the_trainer():
    edges = graph()
    assert {m for m, deps in edges.items() if "sd_lora.loop" in deps} == {"sd_lora.train"}
    assert {m for m, deps in edges.items() if "sd_lora.train" in deps} == {"sd_lora.distributed"}


FAMILY_CLASSES = ("StableDiffusionPipeline", "CLIPTextModel", "CLIPTokenizer", "UNet2DConditionModel",
                  "encoder_hidden_states")


def test_only_the_families_and_the_tiny_model_name_a_familys_classes():
    """What differs between SD and SDXL (pipeline class, text encoders, the conditioning's names) is written in
    families/ (and in demo.py, which builds the tiny SD-shaped model); nowhere in the loop, cache or evaluation."""
    outside = [p for p in PACKAGE.rglob("*.py") if "families" not in p.parts and p.name != "demo.py"]
    named = {str(p.relative_to(PACKAGE)): [c for c in FAMILY_CLASSES if c in p.read_text()] for p in outside}
    assert {k: v for k, v in named.items() if v} == {}


RECORDING_RUN = """
import json, sys
from pathlib import Path

from omegaconf import OmegaConf

from sd_lora.config import Config, ModelFamilyName, to_config
from sd_lora.families import FAMILIES
from sd_lora.families.sd import StableDiffusion
from sd_lora.train import train


class Recording(StableDiffusion):
    \"\"\"The SD family, counting what the trainer asks of it (the real methods run).\"\"\"

    calls = {}

    def _count(self, name):
        self.calls[name] = self.calls.get(name, 0) + 1


for name in ("tokenize", "encode", "predict", "pipeline", "lora_modules"):
    def wrapped(self, *args, _name=name, **kwargs):
        self._count(_name)
        return getattr(StableDiffusion, _name)(self, *args, **kwargs)
    setattr(Recording, name, wrapped)

FAMILIES[ModelFamilyName.sd] = family = Recording()
model, data, out = sys.argv[1:4]
for cache in (False, True):
    cfg = OmegaConf.structured(Config)
    cfg.model.pretrained_model_name_or_path = model
    cfg.dataset.path = data
    cfg.dataset.resolution, cfg.dataset.max_train_samples, cfg.dataset.cache = 32, 4, cache
    cfg.dataset.cache_dir = out + "/cache"
    cfg.trainer.train_batch_size, cfg.trainer.max_train_steps = 2, 2
    cfg.trainer.validation_prompts, cfg.trainer.num_validation_images, cfg.trainer.num_inference_steps = ["a"], 1, 1
    cfg.device.type = "cpu"
    family.calls.clear()
    report = train(to_config(cfg), Path(out) / f"run-{cache}")
    print("CALLS", json.dumps({"cache": cache, "steps": report["global_step"], **family.calls}))
"""


def test_the_trainer_reaches_the_model_through_its_family(tiny_model_path, tmp_path):
    """Captions, the U-Net call, validation images and the LoRA file all go through the family object: a family
    that replaces these methods changes what the trainer does, with no branch elsewhere. (In its own process:
    the trainer is driven from Python there, with a recording family in FAMILIES.)"""
    import json
    import subprocess
    import sys

    script = tmp_path / "recording_run.py"
    script.write_text(RECORDING_RUN)
    result = subprocess.run([sys.executable, str(script), str(tiny_model_path), str(PACKAGE / "assets" / "shapes"),
                             str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    images, cached = (json.loads(line.split("CALLS ", 1)[1]) for line in result.stdout.splitlines()
                      if line.startswith("CALLS "))
    for calls in (images, cached):
        assert calls["steps"] == 2
        assert calls["predict"] == 2 and calls["pipeline"] == 1 and calls["lora_modules"] >= 1
    assert cached["encode"] == 1 and cached["tokenize"] == 1  # captions encoded once, for the cache; steps read it
    assert images["encode"] >= 2 and images["tokenize"] >= 4  # each sample tokenized, each step's batch encoded
