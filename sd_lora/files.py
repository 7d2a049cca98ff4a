"""Writing the project's safetensors files: whole or absent, and readable as the user's umask says."""

from __future__ import annotations

import os
from pathlib import Path

import torch


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> Path:
    """Write `tensors` to `path` through a temporary file renamed into place, with a plain file's mode.

    The rename makes a reader (another job sharing a cache, a resume) see the old file or the new one,
    never half of one. safetensors creates its files readable by their owner only (0600), so a LoRA, a
    checkpoint or an embedding cache on a file system a team shares would be unreadable to the rest of
    the team: the file gets 0666 less the umask, as any new file would.
    """
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    tmp.replace(path)
    return path
