"""Everything a user can get wrong, checked before any weights are loaded: the device and precision, the
speed switches for this device, the process layout, the model folder, the data set and its held-out side.
Every failure is reported, in one message, so that one launch tells a user all there is to fix.

Called by the trainer in every process, once by the launcher before it starts worker processes, and once by
a multirun before its first job (for what all its jobs share).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

from sd_lora.config import Config, LoraFormat
from sd_lora.data import load_tables
from sd_lora.devices import Backend, build_backend
from sd_lora.errors import UserError
from sd_lora.fp8 import check_base_precision
from sd_lora.hub import resolve_local
from sd_lora.model import lora_file, resolve_model_path
from sd_lora.optim import check_optimizer
from sd_lora.report import check_trackers
from sd_lora.speed import check_speed_switches


@dataclass
class Checked:
    backend: Backend
    model_path: Path
    table: object  # the training rows (a datasets.Dataset)
    val_table: object | None  # the held-out rows, if any


def check_layout(cfg: Config) -> int:
    """Processes per machine, or UserError if the numbers do not fit together."""
    d = cfg.device
    if d.num_processes % d.num_machines:
        raise UserError(
            f"device.num_processes={d.num_processes} is not a multiple of device.num_machines={d.num_machines}: "
            "like accelerate's --num_processes it counts processes on all machines together"
        )
    if d.num_machines > 1 and not d.main_process_ip:
        raise UserError(f"device.num_machines={d.num_machines} needs device.main_process_ip (the address of the "
                        "machine with device.machine_rank=0)")
    return d.num_processes // d.num_machines


class Problems:
    """Collects the UserErrors of independent checks, so that one launch reports all of them."""

    def __init__(self, swept: frozenset[str] = frozenset()):
        self.found: list[str] = []
        self.swept = swept

    def skips(self, keys: tuple[str, ...]) -> bool:
        """Whether a check that reads `keys` is left to the jobs, because a sweep varies one of them."""
        return any(s == k or s.startswith(k + ".") or k.startswith(s + ".") for s in self.swept for k in keys)

    @contextlib.contextmanager
    def check(self):
        try:
            yield
        except UserError as exc:
            self.found.append(str(exc))

    def raise_if_any(self) -> None:
        if len(self.found) == 1:
            raise UserError(self.found[0])
        if self.found:
            raise UserError(f"{len(self.found)} problems, to be fixed before the run can start:\n"
                            + "\n".join(f"  {i}. {message}" for i, message in enumerate(self.found, 1)))


MODEL_KEYS = ("model.pretrained_model_name_or_path", "model.source_repo", "model.revision", "model.family")
DATA_KEYS = ("dataset.path", "dataset.source_repo", "dataset.missing_hint", "dataset.split", "dataset.image_column",
             "dataset.caption_files", "dataset.caption_extension", "dataset.caption_column",
             "dataset.max_train_samples", "dataset.validation_split", "dataset.validation_source",
             "dataset.max_validation_samples", "trainer.seed", "trainer.validation_loss_seed",
             "trainer.validation_loss_steps")


def checks_before_work(cfg: Config, swept: frozenset[str] = frozenset()) -> Checked:
    """Everything a user can get wrong, checked before any weights are loaded; every failure in one UserError.

    `swept`: the keys a multirun varies; the checks that read one of them are left to each job (the sweep's
    preflight checks only what all its jobs share)."""
    problems = Problems(swept)
    backend = per_machine = model_path = table = val_table = None
    if not problems.skips(("device",)):
        with problems.check():
            backend = build_backend(cfg.device.type.value, transfer_to_gcu=cfg.device.transfer_to_gcu)
    usable = False  # the backend is there and takes the precision: it can be asked more
    if backend is not None:
        with problems.check():  # availability, then the precision on it (fp32 where a sweep varies precision)
            backend.check("no" if problems.skips(("precision",)) else cfg.precision.mixed_precision.value)
            usable = True
    if usable and not problems.skips(("trainer.compile", "trainer.compile_encoders", "trainer.compile_mode",
                                      "trainer.compile_cache", "trainer.gradient_accumulation_steps")):
        with problems.check():
            check_speed_switches(cfg, backend)
    if usable and not problems.skips(("model.base_precision",)):
        with problems.check():  # float8 matmuls: CUDA compute capability 8.9 or later, or the CPU
            check_base_precision(cfg, backend)
    if not problems.skips(("optimizer",)):
        with problems.check():  # a missing optional package, or adamw8bit off CUDA
            check_optimizer(cfg, backend.name if usable and not problems.skips(("device",)) else None)
    with problems.check():
        if "LOCAL_WORLD_SIZE" in os.environ:  # under accelerate launch / torchrun the launcher's count rules
            per_machine = int(os.environ["LOCAL_WORLD_SIZE"])
        elif not problems.skips(("device",)):
            per_machine = check_layout(cfg)
    if usable and per_machine is not None and backend.name != "cpu" and per_machine > backend.device_count():
        problems.found.append(
            f"device.num_processes={cfg.device.num_processes} needs {per_machine} {backend.name} device(s) on this "
            f"machine, but {backend.device_count()} are visible ({backend.visible_devices_env}="
            f"{os.environ.get(backend.visible_devices_env or '', 'unset')}); lower device.num_processes")
    if not problems.skips(MODEL_KEYS):
        with problems.check():
            model_path = resolve_model_path(cfg.model)
    if cfg.model.vae_path and not problems.skips(("model.vae_path",)):
        with problems.check():
            resolve_local("model.vae_path", cfg.model.vae_path)
    if cfg.model.lora.init_from and not problems.skips(("model.lora.init_from",)):
        with problems.check():
            path = lora_file(Path(cfg.model.lora.init_from))
            if not path.is_file():
                raise UserError(f"model.lora.init_from={cfg.model.lora.init_from!r}: no LoRA file at "
                                f"{path.resolve()}; give a .safetensors LoRA file or a run directory")
    if not problems.skips(("trainer.report_to",)):
        with problems.check():
            check_trackers(cfg)
    if (cfg.model.lora.use_dora and LoraFormat.kohya in cfg.trainer.export_formats
            and not problems.skips(("model.lora.use_dora", "trainer.export_formats"))):
        problems.found.append("model.lora.use_dora=true: kohya's layout (trainer.export_formats=[kohya], the default) "
                              "has no place for DoRA's magnitude vectors; add trainer.export_formats=[] (the diffusers "
                              "file lora/pytorch_lora_weights.safetensors is always written, and diffusers loads it)")
    if not problems.skips(DATA_KEYS):
        with problems.check():
            table, val_table = load_tables(cfg.dataset, seed=cfg.trainer.seed,
                                           validation_seed=cfg.trainer.validation_loss_seed)
            if cfg.trainer.validation_loss_steps and val_table is None:
                raise UserError(f"trainer.validation_loss_steps={cfg.trainer.validation_loss_steps} needs held-out "
                                "data: set dataset.validation_split (e.g. 0.1) or dataset.validation_source")
    problems.raise_if_any()
    return Checked(backend, model_path, table, val_table)
