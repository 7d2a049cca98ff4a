"""One run directory, one run: a lock file that a second writer is refused by.

Two runs in one directory delete each other's checkpoints (each cleans up the other's half-written one) and mix
their outputs. The main process holds `<run dir>/sd_lora.lock` for the whole run: an advisory lock on the file
(flock, released by the kernel when the process ends, however it ends) and, inside it, who holds it (pid, host,
start time) for the message. A lock file left by a process that ended on this host is taken over, with a log
line; one from another host whose lock is not held cannot be checked from here, so it is refused with the
file's path to remove once that run is known to be gone.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
from datetime import datetime, timezone
from pathlib import Path

from sd_lora.errors import UserError

log = logging.getLogger(__name__)

LOCK_NAME = "sd_lora.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


class RunLock:
    """A context manager: holds the run directory's lock file, or raises UserError naming who holds it."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_NAME
        self.fd: int | None = None

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = self._holder(fd)
                os.close(fd)
                raise UserError(self._in_use(holder)) from None
            try:
                same_file = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same_file = False
            if same_file:  # else the holder removed it between our open and our lock: try again
                break
            os.close(fd)
        holder = self._holder(fd)
        if holder and holder.get("host") != socket.gethostname():
            os.close(fd)
            raise UserError(self._in_use(holder) + f"; if that run is gone, remove {self.path}")
        if holder:
            log.warning("run directory %s: taking over the lock of process %s (started %s), which %s", self.path.parent,
                        holder.get("pid"), holder.get("started_at"),
                        "no longer runs" if not _alive(int(holder.get("pid", 0) or 0))
                        else "no longer holds it (its pid now belongs to another process)")
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)  # before the unlock: a waiting run then opens a fresh file
            os.close(self.fd)
            self.fd = None

    def in_use(self) -> str | None:
        """The refusal message if a live process holds this lock now, else None (nothing is taken)."""
        if not self.path.is_file():
            return None
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return self._in_use(self._holder(fd))
        finally:
            os.close(fd)  # also lets go of the shared lock, if taken
        return None

    @staticmethod
    def _holder(fd: int) -> dict | None:
        data = os.pread(fd, 4096, 0)
        try:
            return json.loads(data) if data.strip() else None
        except ValueError:
            return {"pid": "?", "host": "?", "started_at": "?"}  # cut short: its writer was killed mid-write

    def _in_use(self, holder: dict | None) -> str:
        who = (f"process {holder.get('pid')} on {holder.get('host')}, started {holder.get('started_at')}"
               if holder else "another process")
        return (f"run directory {self.path.parent} is in use by {who} (lock file {self.path}): two runs in one "
                f"directory delete each other's checkpoints; wait for that run to end, or give this one its own "
                f"directory (hydra.run.dir=...)")
