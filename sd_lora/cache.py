"""Cache of the VAE posteriors and text embeddings of a data set (`dataset.cache=true`).

The VAE encode is a third of the reference step's FLOPs and the text encoder runs every step on
the same captions; both are frozen, so their outputs can be computed once. The cache must not
change what is trained: it keeps each image's posterior mean and std (the latent is sampled anew
every step, as the reference does), and when `random_flip` is on it keeps the flipped image's
posterior too and picks one of the two per sample and epoch, from the sample's own seeded stream
(see `sd_lora.data.sample_key`). With `dataset.on_bad_image=skip` rows whose image cannot be decoded
are left out of the cache and listed in it ("skipped_rows").

A cache is keyed by a hash of everything its contents depend on (model folder, revision, variant,
VAE and text encoder configs, dtype, the data set's fingerprint, split, columns, resolution, crop,
flip, sample count, tokenizer length), so a changed setting never reuses a stale cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Callable

import torch

from sd_lora.config import Config, DatasetConfig, ModelConfig, OnFailure, cache_dir
from sd_lora.data import _image_where, decode_or_skip, resized_size, sample_key, train_transform
from sd_lora.errors import UserError
from sd_lora.families import Components, family_of
from sd_lora.files import save_safetensors

log = logging.getLogger(__name__)

CACHE_FORMAT = 2  # bump when the layout of a cache file, or how its images are decoded, changes (2: 16-bit, alpha)


def cache_key(model_cfg: ModelConfig, model_path: Path, comps: Components, table, cfg: DatasetConfig,
              dtype: torch.dtype) -> str:
    family = family_of(model_cfg)
    parts = {
        "format": CACHE_FORMAT,
        "model_path": str(Path(model_path).resolve()),
        "revision": model_cfg.revision,
        "variant": model_cfg.variant,
        **({"vae_path": str(Path(model_cfg.vae_path).expanduser().resolve())} if model_cfg.vae_path else {}),
        "vae": dict(comps.vae.config),
        **family.cache_identity(comps),
        "weights": _files_fingerprint(Path(model_path), ("vae", *family.text_folders)),
        "dtype": str(dtype),
        "dataset_path": str(Path(cfg.path).expanduser().resolve()) if Path(cfg.path).expanduser().exists() else cfg.path,
        "fingerprint": getattr(table, "_fingerprint", None),
        "rows": len(table),
        "split": cfg.split,
        "image_column": cfg.image_column,
        "caption_column": cfg.caption_column,
        "resolution": cfg.resolution,
        "center_crop": cfg.center_crop,
        "random_flip": cfg.random_flip,
        "max_train_samples": cfg.max_train_samples,
        "alpha": cfg.alpha.value,
    }
    if cfg.on_bad_image is OnFailure.skip:  # a cache without the bad rows must not serve a run that would stop on them
        parts["on_bad_image"] = cfg.on_bad_image.value
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _files_fingerprint(root: Path, folders: tuple[str, ...]) -> list:
    """Name, size and modification time of every file the cache's encoders are read from.

    New weights saved into the same folder change the key without hashing gigabytes.
    """
    return [(str(f.relative_to(root)), st.st_size, st.st_mtime_ns)
            for folder in folders for f in sorted((root / folder).rglob("*")) if f.is_file()
            for st in [f.stat()]]


@torch.no_grad()
def compute_embeddings(table, cfg: DatasetConfig, encode_captions: Callable[[list[str]], dict[str, torch.Tensor]],
                       vae, device, dtype: torch.dtype, batch_size: int = 8) -> dict[str, torch.Tensor]:
    """Posterior mean/std of every image (and its mirror image) and the text conditioning of every caption.

    `encode_captions` is the model family's (families.ModelFamily.encode_captions): captions -> its
    conditioning tensors, kept under their own names.
    """
    from tqdm.auto import tqdm

    views = 2 if cfg.random_flip else 1
    means, stds, texts, skipped = [], [], {}, []
    sizes: dict[str, list[torch.Tensor]] = {"original_size": [], "crop_top_left": [], "target_size": []}
    for start in tqdm(range(0, len(table), batch_size), desc="caching latents and text embeddings"):
        rows = table[start:start + batch_size]
        images, captions = [], []
        for offset, (cell, caption) in enumerate(zip(rows[cfg.image_column], rows[cfg.caption_column])):
            index = start + offset
            image = decode_or_skip(cell, index, cfg.on_bad_image, "left out of the cache", alpha=cfg.alpha)
            if image is None:
                skipped.append(index)
                continue
            w, h = image.size
            if not cfg.center_crop and w != h:
                raise UserError(
                    f"dataset.cache=true with dataset.center_crop=false: {_image_where(cell, index)} is {w}x{h}, and a "
                    "random crop of a non-square image differs every epoch, so it cannot be cached; set "
                    "dataset.center_crop=true or dataset.cache=false"
                )
            if not isinstance(caption, str):
                raise UserError(f"dataset.cache=true needs one caption string per row; data set row {index} holds "
                                f"{type(caption).__name__}; set dataset.cache=false")
            geometry: dict = {}
            pixels = train_transform(image, cfg.resolution, center_crop=True, random_flip=False, geometry=geometry)
            images.append(pixels)
            crops = [geometry["crop_top_left"]]
            if views == 2:
                images.append(torch.flip(pixels, dims=[2]))
                top, left = geometry["crop_top_left"].tolist()  # the mirror image's crop, as train_transform's flip
                width = resized_size(image.size, cfg.resolution)[0]
                crops.append(torch.tensor((top, width - left - cfg.resolution)))
            sizes["original_size"].append(geometry["original_size"])
            sizes["crop_top_left"].append(torch.stack(crops))
            sizes["target_size"].append(geometry["target_size"])
            captions.append(caption)
        if not captions:
            continue
        pixel_values = torch.stack(images).to(device, dtype=vae.dtype)  # SDXL keeps its VAE fp32
        posterior = vae.encode(pixel_values).latent_dist
        shape = (len(captions), views) + tuple(posterior.mean.shape[1:])
        means.append(posterior.mean.float().reshape(shape).cpu())
        stds.append(posterior.std.float().reshape(shape).cpu())
        for key, value in encode_captions(captions).items():
            texts.setdefault(key, []).append(value.float().cpu())  # the family's conditioning: floating point
    if not means:
        raise UserError(f"dataset.on_bad_image=skip: none of the {len(table)} images can be decoded; check dataset.path")
    tensors = {"latent_mean": torch.cat(means), "latent_std": torch.cat(stds),
               **{key: torch.cat(parts) for key, parts in texts.items()},
               **{key: torch.stack(parts) for key, parts in sizes.items()}}  # crop_top_left: one per view
    if skipped:
        tensors["skipped_rows"] = torch.tensor(skipped, dtype=torch.int64)
    return tensors


def nonfinite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The names of the floating-point tensors that hold a NaN/Inf."""
    return [name for name, value in tensors.items() if value.is_floating_point() and not torch.isfinite(value).all()]


def load_or_build(path: Path, build) -> dict[str, torch.Tensor]:
    """Read the cache file at `path`, or build it with `build()` and write it atomically."""
    from safetensors.torch import load_file

    if path.is_file():
        log.info("using cached latents and text embeddings: %s", path)
        tensors = load_file(str(path))
        bad = nonfinite(tensors)
        if bad:
            raise UserError(f"the embedding cache {path} holds NaN/Inf ({', '.join(bad)}), so every step would too; "
                            f"delete the file to have it built again")
        return tensors
    tensors = build()
    bad = nonfinite(tensors)
    if bad:  # not written: the next run would read it back
        raise UserError(f"encoding the data set for the embedding cache gave NaN/Inf ({', '.join(bad)}), before "
                        f"any training: the VAE or text encoder overflows in this precision; use precision=bf16 or "
                        f"precision=fp32 (or dataset.cache=false)")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(tensors, path)  # a cache shared by a team (dataset.cache_dir on a shared file system)
    log.info("cached latents and text embeddings of %d samples: %s", len(tensors["latent_mean"]), path)
    return tensors


def load_or_build_cache(cfg: Config, model_path: Path, comps: Components, table,
                        encode_captions: Callable[[list[str]], dict[str, torch.Tensor]], device,
                        dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The run's cache file (in dataset.cache_dir, default $SD_LORA_CACHE/embeddings), read or built."""
    key = cache_key(cfg.model, model_path, comps, table, cfg.dataset, dtype)
    path = Path(cfg.dataset.cache_dir or cache_dir() / "embeddings").expanduser() / f"{key}.safetensors"
    return load_or_build(path, lambda: compute_embeddings(table, cfg.dataset, encode_captions, comps.vae, device, dtype))


def with_live_text(tensors: dict[str, torch.Tensor], condition_keys: tuple[str, ...], tokenize, table,
                   caption_column: str) -> dict[str, torch.Tensor]:
    """The cache's latents with the captions' tokens in place of its text embeddings: for a run whose text
    encoders train (model.lora.train_text_encoder), where an embedding computed once would be stale after the
    first step. The rows are the cache's: the table's, less the rows it left out."""
    skipped = set(tensors["skipped_rows"].tolist()) if "skipped_rows" in tensors else set()
    captions = [c for i, c in enumerate(table[caption_column]) if i not in skipped]
    kept = {k: v for k, v in tensors.items() if k not in condition_keys}
    return {**kept, **tokenize(captions)}


class CachedEmbeddings(torch.utils.data.Dataset):
    """Cached rows -> {"latent_mean", "latent_std", the text conditioning, the sizes}; a random view when
    flipping."""

    def __init__(self, tensors: dict[str, torch.Tensor], random_flip: bool):
        self.mean, self.std = tensors["latent_mean"], tensors["latent_std"]
        self.crops = tensors.get("crop_top_left")  # (rows, views, 2); absent from caches written before 2026-12-01
        self.text = {key: value for key, value in tensors.items()
                     if key not in ("latent_mean", "latent_std", "skipped_rows", "crop_top_left")}
        self.random_flip = random_flip
        self.skipped_rows = tensors["skipped_rows"].tolist() if "skipped_rows" in tensors else []

    def __len__(self) -> int:
        return len(self.mean)

    def __getitem__(self, key) -> dict:
        generator, index = sample_key(key)
        view = 1 if self.random_flip and float(torch.rand(1, generator=generator)) < 0.5 else 0
        item = {"latent_mean": self.mean[index, view], "latent_std": self.std[index, view],
                **{name: value[index] for name, value in self.text.items()}, "index": index}
        if self.crops is not None:
            item["crop_top_left"] = self.crops[index, view]
        return item
