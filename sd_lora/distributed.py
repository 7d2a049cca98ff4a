"""Several worker processes for one run: started by the Hydra job itself, or by accelerate / torchrun.

`device.num_processes=N` (N > 1) makes the Hydra job start the workers with torchrun's own engine
(`torch.distributed.launcher.elastic_launch`), so sweeps, Optuna and Hydra launchers keep working: one
run directory, chosen by Hydra, handed to every worker; side effects on the main process only. Like
`accelerate launch`, `device.num_processes` counts processes over all machines; with
`device.num_machines > 1` each machine starts num_processes / num_machines and meets the others at
`device.main_process_ip:main_process_port` (torchrun's static rendezvous, `device.machine_rank` = node rank).

Users who start jobs with `accelerate launch` or `torchrun` get one Hydra app per rank (hydra#2070);
`agree_on_run_dir` makes every rank use rank 0's run directory and removes the others' empty ones.

This is the launcher's room, above the trainer: it calls `train.train`, and nothing the trainer
imports imports it.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
from pathlib import Path

from sd_lora.config import Config
from sd_lora.errors import UserError
from sd_lora.signals import Preempted

log = logging.getLogger(__name__)


def launched_externally() -> bool:
    """True inside a process started by accelerate launch / torchrun with more than one rank."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def strip_local_rank_argument(argv: list[str]) -> list[str]:
    """`torch.distributed.launch` passes --local_rank=N (or --local-rank N); Hydra would reject it."""
    out, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg.startswith(("--local_rank=", "--local-rank=")):
            os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
            continue
        if arg in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            os.environ.setdefault("LOCAL_RANK", argv[i + 1])
            skip = True
            continue
        out.append(arg)
    return out


def agree_on_run_dir(run_dir: str, cfg: Config) -> str:
    """Under an external launcher: every rank takes rank 0's run directory; others remove their own.

    The process group is set up here by accelerate's PartialState with the same settings the
    Accelerator will use, which then reuses it (a second group on the launcher's store would race).
    """
    import torch.distributed as dist
    from accelerate import PartialState

    from sd_lora.devices import build_backend

    backend = build_backend(cfg.device.type.value, transfer_to_gcu=cfg.device.transfer_to_gcu)
    backend.before_accelerate()  # GCU: torch_gcu.transfer_to_gcu, so that accelerate's CUDA path drives it
    state = PartialState(**backend.accelerator_kwargs())
    chosen = [run_dir if state.is_main_process else None]
    dist.broadcast_object_list(chosen, src=0)
    own = Path(run_dir)
    if chosen[0] != run_dir and own.is_dir() and {p.name for p in own.iterdir()} <= {".hydra", "launch.log"}:
        shutil.rmtree(own, ignore_errors=True)
    return chosen[0]


def launch_workers(cfg: Config, run_dir: str) -> dict | None:
    """Run `train(cfg, run_dir)` in device.num_processes workers; return rank 0's report."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from sd_lora.preflight import check_layout

    d = cfg.device
    per_machine = check_layout(cfg)
    if d.num_machines == 1:  # torchrun --standalone
        rdzv = dict(rdzv_backend="c10d", rdzv_endpoint=f"localhost:{d.main_process_port or 0}")
    else:  # torchrun --nnodes --node_rank --master_addr --master_port
        rdzv = dict(rdzv_backend="static", rdzv_endpoint=f"{d.main_process_ip}:{d.main_process_port or 29500}",
                    rdzv_configs={"rank": d.machine_rank})
    config = LaunchConfig(min_nodes=d.num_machines, max_nodes=d.num_machines, nproc_per_node=per_machine,
                          run_id=f"sd_lora_{Path(run_dir).name}", max_restarts=0, start_method="spawn", **rdzv)
    log.info("starting %d worker process(es) on this machine (%d in all, machine %d of %d)",
             per_machine, d.num_processes, d.machine_rank, d.num_machines)
    previous = signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # SLURM's --signal reaches the workers too; they stop
    try:
        results = elastic_launch(config, _worker)(cfg, run_dir)
    except ChildFailedError as exc:
        failure = next(iter(exc.failures.values()))
        message = failure.message if isinstance(failure.message, str) else failure.message.get("message", "")
        raise UserError(f"a worker process failed: {str(message).strip().splitlines()[-1] if message else exc}") from None
    finally:
        signal.signal(signal.SIGUSR1, previous)
    first = results.get(0)
    if isinstance(first, dict) and "preempted" in first:  # the workers stopped on a signal, with a checkpoint
        raise Preempted(*first["preempted"])
    return first


def run(cfg: Config, run_dir: str) -> dict | None:
    """Train in this process, in workers started here, or as one rank of an external launcher."""
    from sd_lora.checkpoints import check_resume, finished_run, run_fingerprint
    from sd_lora.preflight import checks_before_work
    from sd_lora.train import leave_finished_run, train

    if launched_externally():  # accelerate launch / torchrun started one Hydra app per rank
        run_dir = agree_on_run_dir(run_dir, cfg)
        if int(os.environ["WORLD_SIZE"]) != cfg.device.num_processes:
            log.warning("the launcher started %s processes; device.num_processes=%d is ignored",
                        os.environ["WORLD_SIZE"], cfg.device.num_processes)
        return train(cfg, run_dir)
    if cfg.device.num_processes > 1 or cfg.device.num_machines > 1:
        # a user's mistake stops here, once, before any worker starts
        checked = checks_before_work(cfg)
        fingerprint = run_fingerprint(cfg, checked.model_path, checked.table, cfg.device.num_processes)
        path = check_resume(cfg, Path(run_dir), fingerprint)
        if path is not None and finished_run(cfg, path, fingerprint):  # no worker started for nothing
            return leave_finished_run(Path(run_dir), path, is_main_process=True)
        return launch_workers(cfg, run_dir)
    return train(cfg, run_dir)


def _worker(cfg: Config, run_dir: str):
    """Entry point of one worker process (spawned, so it imports everything afresh)."""
    from sd_lora.train import train

    rank = int(os.environ.get("RANK", "0"))
    handlers = [logging.StreamHandler(sys.stderr)]
    if rank == 0:
        handlers.append(logging.FileHandler(Path(run_dir) / "launch.log"))
    logging.basicConfig(level=logging.INFO, handlers=handlers, force=True,
                        format=f"[%(asctime)s][rank {rank}][%(name)s][%(levelname)s] - %(message)s")
    try:
        return train(cfg, run_dir)
    except Preempted as exc:  # not a failed worker: the launcher raises it again
        return {"preempted": [exc.signame, exc.step, str(exc.checkpoint)]}
