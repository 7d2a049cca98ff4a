"""File modes: what this project writes is readable as the user's umask says, like any file they write."""

from __future__ import annotations

import os
from pathlib import Path


def as_umask_allows(path: Path | str) -> None:
    """Give `path` the mode a plain new file would get (0666 less the umask).

    safetensors creates its files readable by their owner only (0600), so a LoRA, a checkpoint or an
    embedding cache on a file system a team shares would be unreadable to the rest of the team.
    """
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
