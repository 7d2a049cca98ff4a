"""Everything a user can get wrong, checked before any weights are loaded: the device and precision, the
speed switches for this device, the process layout, the model folder, the data set and its held-out side.

Called by the trainer in every process, and once by the launcher before it starts worker processes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from sd_lora.config import Config
from sd_lora.data import load_tables
from sd_lora.devices import Backend, build_backend
from sd_lora.errors import UserError
from sd_lora.model import resolve_model_path
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


def checks_before_work(cfg: Config) -> Checked:
    """Everything a user can get wrong, checked before any weights are loaded."""
    backend = build_backend(cfg.device.type.value, transfer_to_gcu=cfg.device.transfer_to_gcu)
    backend.check(cfg.precision.mixed_precision.value)
    check_speed_switches(cfg, backend)
    if "LOCAL_WORLD_SIZE" in os.environ:  # under accelerate launch / torchrun the launcher's count rules
        per_machine = int(os.environ["LOCAL_WORLD_SIZE"])
    else:
        per_machine = check_layout(cfg)
    if backend.name != "cpu" and per_machine > backend.device_count():
        raise UserError(
            f"device.num_processes={cfg.device.num_processes} needs {per_machine} {backend.name} device(s) on this "
            f"machine, but {backend.device_count()} are visible ({backend.visible_devices_env}="
            f"{os.environ.get(backend.visible_devices_env or '', 'unset')}); lower device.num_processes"
        )
    model_path = resolve_model_path(cfg.model)
    table, val_table = load_tables(cfg.dataset, seed=cfg.trainer.seed, validation_seed=cfg.trainer.validation_loss_seed)
    if cfg.trainer.validation_loss_steps and val_table is None:
        raise UserError(f"trainer.validation_loss_steps={cfg.trainer.validation_loss_steps} needs held-out data: set "
                        "dataset.validation_split (e.g. 0.1) or dataset.validation_source")
    return Checked(backend, model_path, table, val_table)
