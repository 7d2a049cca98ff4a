"""Finding a model or data set on local disk: a folder, or a hub id already in the local hub cache.

Nothing is ever downloaded at run time. When the files are not there, the error names the path
looked in and the `hf download` command that fetches them.
"""

from __future__ import annotations

from pathlib import Path

from sd_lora.errors import UserError


def looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def download_command(repo_id: str, repo_type: str = "model", local_dir: str | None = None,
                     revision: str | None = None) -> str:
    cmd = f"hf download {repo_id}"
    if repo_type != "model":
        cmd += f" --repo-type {repo_type}"
    if revision:
        cmd += f" --revision {revision}"
    if local_dir:
        cmd += f" --local-dir {local_dir}"
    return cmd


def resolve_local(key: str, name: str, repo_type: str = "model", source_repo: str | None = None,
                  revision: str | None = None, missing_hint: str | None = None) -> Path:
    """`name` (the value of config key `key`) -> an existing local folder, or UserError with the fix.

    A path that exists is used as it is. A name shaped like a hub id (`owner/name`) that is not a
    local path is looked up in the hub cache offline, unless `source_repo` (the hub id a local folder
    is a copy of, named in the download command) says the name is a local folder of another repo.
    `missing_hint` replaces the download command where the source can no longer be downloaded.
    """
    path = Path(name).expanduser()
    if not path.exists() and looks_like_hub_id(name) and source_repo in (None, name):
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            return Path(snapshot_download(name, repo_type=repo_type, revision=revision, local_files_only=True))
        except LocalEntryNotFoundError:
            raise UserError(
                f"{key}={name!r}: no local folder {path.resolve()}, and the hub id is not in the local hub cache "
                f"(revision {revision or 'main'}); "
                + (missing_hint or f"download it first with: {download_command(name, repo_type, revision=revision)}")
            ) from None
    if not path.is_dir():
        if missing_hint:
            how = missing_hint
        elif source_repo:
            how = f"download it with: {download_command(source_repo, repo_type, local_dir=name, revision=revision)}"
        else:
            how = f"point {key} at an existing folder"
        raise UserError(f"{key}={name!r}: folder not found at {path.resolve()}; {how}")
    return path
