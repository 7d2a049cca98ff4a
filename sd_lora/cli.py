"""What `python launch.py` checks on its command line before Hydra composes anything: an optional extra that a
chosen sweeper or launcher needs, a misspelt config key (with the key it probably meant), and a run directory
that another run is writing to.

Hydra would report both too, but as a config-search error with no install hint, and for a typo with the advice
to append the misspelt key (`+optimzer.lr=1`).
"""

from __future__ import annotations

import difflib
import importlib.util
from pathlib import Path

# a Hydra plugin named in a sweeper / launcher option -> the module it is, and the extra that installs it
PLUGINS = {"optuna": ("hydra_plugins.hydra_optuna_sweeper", "sweep"),
           "submitit": ("hydra_plugins.hydra_submitit_launcher", "slurm")}


def config_keys() -> list[str]:
    """Every key of the typed config, dotted (`optimizer.lr`), nodes included (`model.lora`)."""
    from dataclasses import fields, is_dataclass

    from sd_lora.config import Config

    keys = []

    def walk(prefix: str, node) -> None:
        for f in fields(node):
            keys.append(prefix + f.name)
            value = f.default_factory() if callable(f.default_factory) else f.default
            if is_dataclass(value):
                walk(f"{prefix}{f.name}.", value)

    walk("", Config)
    return keys


def missing_extra(argv: list[str], conf_dir: Path) -> str | None:
    """The install line for a plugin a sweeper / launcher override needs and Python cannot find, or None."""
    for arg in argv:
        key, _, value = arg.lstrip("+").partition("=")
        if not value or not (key in ("sweep", "hydra/sweeper", "hydra/launcher")):
            continue
        option = conf_dir / key / f"{value}.yaml"
        text = value + (option.read_text() if option.is_file() else "")
        for name, (module, extra) in PLUGINS.items():
            if name in text and importlib.util.find_spec(module) is None:
                return (f"{arg} needs the Hydra {name} plugin ({module}), which is not installed; install it with: "
                        f"pip install -e \".[{extra}]\"")
    return None


def misspelt_key(argv: list[str], conf_dir: Path) -> str | None:
    """A `key=value` whose key is neither a config key nor a config group, with the nearest key, or None."""
    groups = {p.name for p in conf_dir.iterdir() if p.is_dir()}
    keys = None
    for arg in argv:
        if arg.startswith(("-", "+", "~")) or "=" not in arg:
            continue  # Hydra's flags; an added or deleted key is meant
        key = arg.split("=", 1)[0]
        if key.split("/")[0].split(".")[0] in ("hydra",) or key in groups or "/" in key:
            continue
        keys = keys or config_keys()
        if key not in keys:
            near = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
            hint = f"did you mean {near[0]}? " if near else ""
            return (f"{arg}: there is no config key {key!r}; {hint}(`python launch.py --cfg job` prints every key, "
                    "sd_lora/config.py documents them)")
    return None


def run_dir_in_use(argv: list[str]) -> str | None:
    """A `hydra.run.dir=` that another run is writing to (sd_lora/lock.py), said before Hydra writes its .hydra/
    files into it."""
    from sd_lora.lock import RunLock

    if any(arg in ("-m", "--multirun") for arg in argv):
        return None
    for arg in argv:
        if arg.startswith("hydra.run.dir="):
            return RunLock(Path(arg.split("=", 1)[1])).in_use()
    return None


def command_line_problem(argv: list[str], conf_dir: Path) -> str | None:
    return missing_extra(argv, conf_dir) or misspelt_key(argv, conf_dir) or run_dir_in_use(argv)
