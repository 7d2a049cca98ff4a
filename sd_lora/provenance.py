"""provenance.json: how a run directory was made (config, overrides, package versions, git commit, seeds).

Written by the main process when a run starts, so that a run that is killed or fails says how it
was made too. A resumed run writes its own record and keeps the earlier ones under "earlier": the
run's weights come from all of them (each segment from its `from_step` on, with its own config), and
Hydra rewrites .hydra/ on every start.
"""

from __future__ import annotations

import json
import platform
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

# the distributions whose versions decide what a run computes
PACKAGES = ("torch", "diffusers", "peft", "accelerate", "transformers", "datasets", "safetensors",
            "huggingface_hub", "hydra-core", "omegaconf", "numpy", "Pillow")


def package_versions() -> dict[str, str | None]:
    from sd_lora import devices  # torch_gcu is looked up there only

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    versions["torch_gcu"] = devices.torch_gcu_version()
    return versions


def git_state() -> dict:
    """The commit of the checkout this package runs from, and whether tracked files differ from it.

    None when the package is not a tracked file of a git checkout (an installed wheel, or a venv that
    happens to lie inside some other repository) or git is missing.
    """
    here = Path(__file__).resolve().parent

    def git(*args) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(here), *args], capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    if git("ls-files", "--error-unmatch", "__init__.py") is None:
        return {"commit": None, "dirty": None}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "dirty": None if status is None else bool(status)}


def hydra_overrides(run_dir: Path) -> list[str] | None:
    """The command-line overrides Hydra recorded for this start (None when not started through Hydra)."""
    path = Path(run_dir) / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return None
    from omegaconf import OmegaConf

    return list(OmegaConf.load(path))


def collect(run_dir: Path, config: dict, resumed_from: Path | None) -> dict:
    git = git_state()
    trainer = config.get("trainer", {})
    return {
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "overrides": hydra_overrides(run_dir),
        "config": config,
        "seeds": {  # every random draw of a run derives from these (see sd_lora.data.sample_seed)
            "trainer.seed": trainer.get("seed"),
            "trainer.validation_loss_seed": trainer.get("validation_loss_seed"),
        },
        "resumed_from": None if resumed_from is None else str(resumed_from),
        # this record's segment of the run starts here; "earlier" holds the earlier segments with their config
        "from_step": 0 if resumed_from is None else int(Path(resumed_from).name.rsplit("-", 1)[1]),
        "git_commit": git["commit"],
        "git_dirty": git["dirty"],
        "python": platform.python_version(),
        "packages": package_versions(),
        "host": platform.node(),
    }


def write_provenance(run_dir: Path, config: dict, resumed_from: Path | None) -> Path:
    path = Path(run_dir) / "provenance.json"
    record = collect(run_dir, config, resumed_from)
    if path.is_file():
        try:
            earlier = json.loads(path.read_text())
        except ValueError:  # cut short by a kill while it was written
            earlier = None
        if isinstance(earlier, dict):
            record["earlier"] = earlier.pop("earlier", []) + [earlier]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
    tmp.replace(path)
    return path
