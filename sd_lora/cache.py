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
from sd_lora.data import (_image_where, bucket_resized_size, bucket_transform, decode_or_skip, drops_caption,
                          make_buckets, nearest_bucket, resized_size, sample_key, size_conditioning, train_transform)
from sd_lora.errors import UserError
from sd_lora.families import Components, family_of
from sd_lora.files import save_safetensors
from sd_lora.hub import resolve_local

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
    if cfg.buckets:  # each row at its bucket's size
        parts["buckets"] = [cfg.bucket_step, *cfg.bucket_edges()]
    if model_cfg.vae_path:  # another VAE (SDXL's fp16-fixed one): its folder (a hub snapshot's names its revision)
        vae_dir = resolve_local("model.vae_path", model_cfg.vae_path)
        parts["vae_path"] = str(vae_dir.resolve())
        parts["vae_weights"] = _files_fingerprint(vae_dir, (".",))
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
    means, stds, texts, skipped, bucket_sizes = [], [], {}, [], []
    sizes: dict[str, list[torch.Tensor]] = {key: [] for key in SIZE_KEYS}
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
                target = (cfg.resolution, cfg.resolution)  # (w, h)
                geometry: dict = {}
                pixels = train_transform(image, cfg.resolution, center_crop=True, random_flip=False, geometry=geometry)
                resized = resized_size(image.size, cfg.resolution)
            else:  # the image's bucket, with the (centred) crop of its rounding
                target = buckets[nearest_bucket(image.size, buckets)]
                pixels, crop = bucket_transform(image, target, center_crop=True, random_flip=False)
                geometry = size_conditioning((h, w), crop, (target[1], target[0]))
                resized = bucket_resized_size(image.size, target)
                bucket_sizes.append(target)
            top, left = geometry["crop_top_left"].tolist()
            images.append(pixels)
            crops = [geometry["crop_top_left"]]
            if views == 2:
                images.append(torch.flip(pixels, dims=[2]))
                crops.append(torch.tensor((top, resized[0] - left - target[0])))  # the mirror image's, as data's flip
            sizes["original_size"].append(geometry["original_size"])
            sizes["crop_top_left"].append(torch.stack(crops))
            sizes["target_size"].append(geometry["target_size"])
            captions.append(caption)
        if not captions:
            continue
        for first, count in _same_shape_runs(images, views):  # one VAE call per bucket in the chunk
            pixel_values = torch.stack(images[first * views:(first + count) * views]).to(device, dtype=vae.dtype)
            posterior = vae.encode(pixel_values).latent_dist  # (SDXL keeps its VAE fp32: vae.dtype)
            shape = (count, views) + tuple(posterior.mean.shape[1:])
            means += posterior.mean.float().reshape(shape).cpu().unbind(0)
            stds += posterior.std.float().reshape(shape).cpu().unbind(0)
        for key, value in encode_captions(captions).items():
            texts.setdefault(key, []).append(value.float().cpu())  # the family's conditioning: floating point
    if not means:
        raise UserError(f"dataset.on_bad_image=skip: none of the {len(table)} images can be decoded; check dataset.path")
    if buckets is None:
        tensors = {"latent_mean": torch.stack(means), "latent_std": torch.stack(stds)}
    else:  # rows of several shapes: flattened one after another, with each row's shape and bucket (w, h)
        tensors = {"latent_mean": torch.cat([m.flatten() for m in means]),
                   "latent_std": torch.cat([v.flatten() for v in stds]),
                   "latent_shape": torch.tensor([m.shape for m in means], dtype=torch.int64),
                   "bucket_size": torch.tensor(bucket_sizes, dtype=torch.int64)}
    tensors.update({key: torch.cat(parts) for key, parts in texts.items()})
    tensors.update({key: torch.stack(parts) for key, parts in sizes.items()})  # crop_top_left: one per view
    if skipped:
        tensors["skipped_rows"] = torch.tensor(skipped, dtype=torch.int64)
    return tensors


def nonfinite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The names of the floating-point tensors that hold a NaN/Inf."""
    return [name for name, value in tensors.items() if value.is_floating_point() and not torch.isfinite(value).all()]


# each cached row's sizes (data.size_conditioning): original (h, w), the crop's (top, left) for each view, target (h, w)
SIZE_KEYS = ("original_size", "crop_top_left", "target_size")
NOT_TEXT = ("latent_mean", "latent_std", "skipped_rows", "latent_shape", "bucket_size", *SIZE_KEYS)


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

    def __init__(self, tensors: dict[str, torch.Tensor], random_flip: bool, caption_dropout: float = 0.0,
                 empty_caption: dict[str, torch.Tensor] | None = None):
        self.mean, self.std = tensors["latent_mean"], tensors["latent_std"]
        self.buckets = self.bucket_of = None
        self.sizes = {key: tensors[key] for key in SIZE_KEYS if key in tensors}
        if "latent_shape" in tensors:  # dataset.buckets: each row's (views, C, h, w) block, and its bucket
            shapes = tensors["latent_shape"].tolist()
            numels = [int(torch.tensor(shape).prod()) for shape in shapes]
            self.mean = [m.reshape(shape) for m, shape in zip(self.mean.split(numels), shapes)]
            self.std = [v.reshape(shape) for v, shape in zip(self.std.split(numels), shapes)]
            of_row = [tuple(size) for size in tensors["bucket_size"].tolist()]
            self.buckets = sorted(set(of_row))
            self.bucket_of = [self.buckets.index(size) for size in of_row]
        self.text = {key: value for key, value in tensors.items() if key not in NOT_TEXT}
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
        sizes = {name: value[index][view] if name == "crop_top_left" else value[index]
                 for name, value in self.sizes.items()}
        return {"latent_mean": self.mean[index][view], "latent_std": self.std[index][view], **text, "index": index,
                **sizes}
