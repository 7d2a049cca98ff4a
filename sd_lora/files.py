"""Writing the project's files: whole or absent, readable as the user's umask says, and a full disk or an
unwritable folder told as one message that names the path, the free space and the fix."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import torch

from sd_lora.errors import UserError


def free_space(path: Path) -> str:
    """The free space on the file system of `path` (or of its nearest existing parent), e.g. '1.2 GiB'."""
    path = Path(path).resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return f"{shutil.disk_usage(path).free / 2**30:.1f} GiB"
    except OSError:
        return "an unknown amount"


@contextlib.contextmanager
def writing(path: Path, what: str, kept: str = ""):
    """Turn a failed write (full disk, file-size limit, read-only or unwritable folder) into one UserError."""
    try:
        yield
    except OSError as exc:
        raise UserError(f"could not write {what} at {path}: {exc.strerror or exc} ({free_space(path)} free there); "
                        f"free some space or make the folder writable, or point hydra.run.dir at another disk"
                        + (f". {kept}" if kept else "")) from None
    except RuntimeError as exc:  # torch.save wraps the OS's error ("PytorchStreamWriter failed writing file",
        if not any(word in str(exc) for word in ("writ", "iostream")):  # "basic_ios::clear: iostream error")
            raise
        raise UserError(f"could not write {what} at {path}: {exc} ({free_space(path)} free there); free some space "
                        f"or make the folder writable, or point hydra.run.dir at another disk"
                        + (f". {kept}" if kept else "")) from None


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
    if metadata and len(metadata) > 1:
        _sort_metadata(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    tmp.replace(path)
    return path


def plain_modes(root: Path) -> None:
    """Give a folder built in a private temporary folder (mkdtemp: 0700) and everything in it the modes a new
    folder / file would have under the user's umask, so that a cache on a shared file system is readable by
    the team."""
    umask = os.umask(0)
    os.umask(umask)
    for folder, _, files in os.walk(root):
        os.chmod(folder, 0o777 & ~umask)
        for name in files:
            os.chmod(os.path.join(folder, name), 0o666 & ~umask)


def _sort_metadata(path: Path) -> None:
    """Put a safetensors file's metadata in key order, so that the same tensors and metadata give the same bytes.

    safetensors (0.8) keeps the metadata in a Rust HashMap, whose order is random in each process: the same LoRA
    written twice differed, and a checksum could not tell two runs apart. The header is rewritten in place when
    its length stays (the same JSON, reordered), else the file is copied behind the new header."""
    import json

    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    meta = header.pop("__metadata__", {})
    text = json.dumps({"__metadata__": dict(sorted(meta.items())), **header}, separators=(",", ":"),
                      ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # safetensors pads its header to 8 bytes
    if len(text) == size:
        with open(path, "r+b") as f:
            f.seek(8)
            f.write(text)
        return
    moved = path.with_name(path.name + ".sorted")
    with open(path, "rb") as src, open(moved, "wb") as dst:
        src.seek(8 + size)
        dst.write(len(text).to_bytes(8, "little") + text)
        shutil.copyfileobj(src, dst)
    moved.replace(path)
