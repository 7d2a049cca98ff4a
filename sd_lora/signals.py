"""Pre-emption: SIGTERM, SIGINT and SIGUSR1 stop a run at the end of its current optimizer step, with a checkpoint.

SLURM and Kubernetes send SIGTERM before they take a machine back (SLURM's `--signal=USR1@120` sends SIGUSR1
ahead of time), and Ctrl-C is SIGINT. The first of them only sets a flag: the loop reads it after each optimizer
step (a Python flag: no device sync), saves a checkpoint, the report so far, and the run exits with
PREEMPTED_EXIT_STATUS; `trainer.resume_from_checkpoint=latest` continues it exactly. A second signal ends the
process at once, as the signal's default action would have.

Under several processes the ranks must stop at the same step (the checkpoint is a collective call), so there the
flags are combined at the logging steps (`trainer.log_every_n_steps`), where the loop reads the device anyway.
Workers started by sd_lora itself (torch elastic) get SIGTERM/SIGINT from the launcher, which waits 30 s before
it kills them: keep log_every_n_steps x step time below that. SIGUSR1 is left to the workers (SLURM signals
every process of a job step); the launcher ignores it.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
PREEMPTED_EXIT_STATUS = 3  # stopped by a signal, checkpoint saved: resume it (2 is a user's mistake, 1 a crash)


class Preempted(Exception):
    """The run stopped on a signal after saving `checkpoint` and the report so far."""

    def __init__(self, signame: str, step: int, checkpoint):
        self.signame, self.step, self.checkpoint = signame, step, checkpoint
        super().__init__(f"stopped by {signame} after optimizer step {step}: checkpoint {checkpoint} and the report "
                         f"so far are saved; continue with trainer.resume_from_checkpoint=latest (same run directory)")


class StopRequest:
    """Catches SIGNALS while a run trains (a context manager); `signame` is the first one caught, or None."""

    def __init__(self):
        self.signame: str | None = None
        self._previous: dict = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # Python allows handlers there only
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.signame is not None:  # the second one: end now, as the signal would have without us
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signame = signal.Signals(signum).name
        log.warning("%s received: the run stops after the current optimizer step, with a checkpoint (send it again "
                    "to stop at once, without one)", self.signame)

    def agreed(self, accelerator, can_sync: bool) -> bool:
        """Whether the run stops now: this process's flag, or under several processes any process's flag, read
        only where `can_sync` (a logging step)."""
        if accelerator.num_processes == 1:
            return self.signame is not None
        if not can_sync:
            return False
        import torch

        mine = torch.tensor([SIGNALS.index(signal.Signals[self.signame]) + 1 if self.signame else 0],
                            device=accelerator.device)
        caught = int(accelerator.gather(mine).max())  # one collective, on a logging step
        if caught and self.signame is None:
            self.signame = SIGNALS[caught - 1].name
        return caught > 0
