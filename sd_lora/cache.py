"""Cache of the VAE posteriors and text embeddings of a data set (`dataset.cache=true`).

The VAE encode is a third of the reference step's FLOPs and the text encoder runs every step on
the same captions; both are frozen, so their outputs can be computed once. The cache must not
change what is trained: it keeps each image's posterior mean and std (the latent is sampled anew
every step, as the reference does), and when `random_flip` is on it keeps the flipped image's
posterior too and picks one of the two per sample and epoch, from the sample's own seeded stream
(see `sd_lora.data.sample_key`). `dataset.caption_dropout` puts the empty caption's conditioning in place of
the row's for the same samples as without the cache. With `dataset.on_bad_image=skip` rows whose image cannot be decoded
are left out of the cache and listed in it ("skipped_rows").

A cache is keyed by a hash of everything its contents depend on (model folder, revision, variant,
VAE and text encoder configs, dtype, the data set's fingerprint, split, columns, resolution, crop,
flip, sample count, tokenizer length, buckets), so a changed setting never reuses a stale cache.

With `dataset.buckets` each row is cached at its bucket's size (centre-cropped by the rounding only), the rows
flattened one after another with their shapes, buckets, original sizes and crops; `CachedEmbeddings` then
has the buckets that `data.BucketBatches` batches by.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Callable

import torch

from sd_lora.config import Config, DatasetConfig, ModelConfig, OnFailure, cache_dir
from sd_lora.data import (_image_where, bucket_transform, decode_or_skip, drops_caption, make_buckets, nearest_bucket,
                          sample_key, train_transform)
from sd_lora.errors import UserError
from sd_lora.families import Components, family_of
from sd_lora.files import save_safetensors

log = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when the layout of a cache file changes


def cache_key(model_cfg: ModelConfig, model_path: Path, comps: Components, table, cfg: DatasetConfig,
              dtype: torch.dtype) -> str:
    family = family_of(model_cfg)
    parts = {
        "format": CACHE_FORMAT,
        "model_path": str(Path(model_path).resolve()),
        "revision": model_cfg.revision,
        "variant": model_cfg.variant,
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
    }
    if cfg.buckets:  # each row at its bucket's size
        parts["buckets"] = [cfg.bucket_step, *cfg.bucket_edges()]
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
    buckets = make_buckets(cfg) if cfg.buckets else None
    means, stds, texts, skipped, placed = [], [], {}, [], []
    for start in tqdm(range(0, len(table), batch_size), desc="caching latents and text embeddings"):
        rows = table[start:start + batch_size]
        images, captions = [], []
        for offset, (cell, caption) in enumerate(zip(rows[cfg.image_column], rows[cfg.caption_column])):
            index = start + offset
            image = decode_or_skip(cell, index, cfg.on_bad_image, "left out of the cache")
            if image is None:
                skipped.append(index)
                continue
            w, h = image.size
            if not cfg.center_crop and w != h and buckets is None:
                raise UserError(
                    f"dataset.cache=true with dataset.center_crop=false: {_image_where(cell, index)} is {w}x{h}, and a "
                    "random crop of a non-square image differs every epoch, so it cannot be cached; set "
                    "dataset.center_crop=true or dataset.cache=false"
                )
            if not isinstance(caption, str):
                raise UserError(f"dataset.cache=true needs one caption string per row; data set row {index} holds "
                                f"{type(caption).__name__}; set dataset.cache=false")
            if buckets is None:
                pixels = train_transform(image, cfg.resolution, center_crop=True, random_flip=False)
            else:  # the image's bucket, with the (centred) crop of its rounding and its original size
                bucket = buckets[nearest_bucket(image.size, buckets)]
                pixels, crop = bucket_transform(image, bucket, center_crop=True, random_flip=False)
                placed.append((bucket, (h, w), crop))
            images.append(pixels)
            if views == 2:
                images.append(torch.flip(pixels, dims=[2]))
            captions.append(caption)
        if not captions:
            continue
        for first, count in _same_shape_runs(images, views):  # one VAE call per bucket in the chunk
            pixel_values = torch.stack(images[first * views:(first + count) * views]).to(device, dtype=dtype)
            posterior = vae.encode(pixel_values).latent_dist
            shape = (count, views) + tuple(posterior.mean.shape[1:])
            means += posterior.mean.float().reshape(shape).cpu().unbind(0)
            stds += posterior.std.float().reshape(shape).cpu().unbind(0)
        for key, value in encode_captions(captions).items():
            texts.setdefault(key, []).append(value.float().cpu())
    if not means:
        raise UserError(f"dataset.on_bad_image=skip: none of the {len(table)} images can be decoded; check dataset.path")
    if buckets is None:
        tensors = {"latent_mean": torch.stack(means), "latent_std": torch.stack(stds)}
    else:  # rows of several shapes: flattened one after another, with each row's shape and bucket
        tensors = {"latent_mean": torch.cat([m.flatten() for m in means]),
                   "latent_std": torch.cat([v.flatten() for v in stds]),
                   "latent_shape": torch.tensor([m.shape for m in means], dtype=torch.int64),
                   **{key: torch.tensor([p[i] for p in placed], dtype=torch.int64)
                      for i, key in enumerate(BUCKET_KEYS)}}
    tensors.update({key: torch.cat(parts) for key, parts in texts.items()})
    if skipped:
        tensors["skipped_rows"] = torch.tensor(skipped, dtype=torch.int64)
    return tensors


BUCKET_KEYS = ("bucket_size", "original_size", "crop_top_left")  # a bucketed cache's rows: (w, h), (h, w), (top, left)


def _same_shape_runs(images: list[torch.Tensor], views: int) -> list[tuple[int, int]]:
    """(first row, rows) of each run of consecutive rows whose images have one shape."""
    runs = []
    for row in range(len(images) // views):
        if runs and images[row * views].shape == images[(row - 1) * views].shape:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((row, 1))
    return runs


def load_or_build(path: Path, build) -> dict[str, torch.Tensor]:
    """Read the cache file at `path`, or build it with `build()` and write it atomically."""
    from safetensors.torch import load_file

    if path.is_file():
        log.info("using cached latents and text embeddings: %s", path)
        return load_file(str(path))
    tensors = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(tensors, path)  # a cache shared by a team (dataset.cache_dir on a shared file system)
    log.info("cached latents and text embeddings of %d samples: %s",
             len(tensors.get("latent_shape", tensors["latent_mean"])), path)
    return tensors


def load_or_build_cache(cfg: Config, model_path: Path, comps: Components, table,
                        encode_captions: Callable[[list[str]], dict[str, torch.Tensor]], device,
                        dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The run's cache file (in dataset.cache_dir, default $SD_LORA_CACHE/embeddings), read or built."""
    key = cache_key(cfg.model, model_path, comps, table, cfg.dataset, dtype)
    path = Path(cfg.dataset.cache_dir or cache_dir() / "embeddings").expanduser() / f"{key}.safetensors"
    return load_or_build(path, lambda: compute_embeddings(table, cfg.dataset, encode_captions, comps.vae, device, dtype))


class CachedEmbeddings(torch.utils.data.Dataset):
    """Cached rows -> {"latent_mean", "latent_std", the text conditioning}; a random view when flipping."""

    def __init__(self, tensors: dict[str, torch.Tensor], random_flip: bool, caption_dropout: float = 0.0,
                 empty_caption: dict[str, torch.Tensor] | None = None):
        self.mean, self.std = tensors["latent_mean"], tensors["latent_std"]
        self.buckets = self.bucket_of = None
        self.placed = {key: tensors[key] for key in BUCKET_KEYS if key in tensors}
        if "latent_shape" in tensors:  # dataset.buckets: each row's (views, C, h, w) block, and its bucket
            shapes = tensors["latent_shape"].tolist()
            sizes = [int(torch.tensor(shape).prod()) for shape in shapes]
            self.mean = [m.reshape(shape) for m, shape in zip(self.mean.split(sizes), shapes)]
            self.std = [v.reshape(shape) for v, shape in zip(self.std.split(sizes), shapes)]
            of_row = [tuple(size) for size in tensors["bucket_size"].tolist()]
            self.buckets = sorted(set(of_row))
            self.bucket_of = [self.buckets.index(size) for size in of_row]
        self.text = {key: value for key, value in tensors.items()
                     if key not in ("latent_mean", "latent_std", "skipped_rows", "latent_shape", *BUCKET_KEYS)}
        self.random_flip = random_flip
        # dataset.caption_dropout: the empty caption's conditioning (one row per key) in place of the row's, drawn
        # as the uncached data set draws it
        assert not caption_dropout or empty_caption is not None
        self.caption_dropout, self.empty_caption = caption_dropout, empty_caption
        self.skipped_rows = tensors["skipped_rows"].tolist() if "skipped_rows" in tensors else []

    def __len__(self) -> int:
        return len(self.mean)

    def __getitem__(self, key) -> dict:
        generator, index = sample_key(key)
        view = 1 if self.random_flip and float(torch.rand(1, generator=generator)) < 0.5 else 0
        text = {name: value[index] for name, value in self.text.items()}
        if drops_caption(self.caption_dropout, key):
            text = {name: value[0] for name, value in self.empty_caption.items()}
        return {"latent_mean": self.mean[index][view], "latent_std": self.std[index][view], **text, "index": index,
                **{key: value[index] for key, value in self.placed.items() if key != "bucket_size"}}
