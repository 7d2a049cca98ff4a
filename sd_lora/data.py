"""Captioned image data: loading with 🤗 datasets, transforms, tokenisation, batches.

Sources (`dataset.path`): a hub-layout folder (parquet or image files), an imagefolder with
metadata.jsonl, a `save_to_disk` folder, a hub id already in the local hub cache, or (with
`dataset.caption_files`) a folder of images each with its caption in a .txt file beside it (kohya's layout). Images are
decoded here (not by datasets) so that a file that cannot be decoded is named by row and path.
The transforms are those of diffusers' LoRA script (resize the short side with bilinear
antialiasing, centre or random crop, random horizontal flip, scale to [-1, 1]), written on PIL and
numpy because torchvision is not a dependency. Nothing here touches the model or the optimiser.

Randomness is a function of (seed, epoch, sample index) alone: `EpochShuffle` orders each epoch by
(seed, epoch) and hands seed and epoch to the data set with every index, and the random crop, flip and
caption choice of a sample come from a generator seeded by (seed, epoch, index); its caption dropout and
tag shuffle each from their own stream of the same key (`sample_stream`), so that the embedding cache, which
draws no crop, drops the same captions. A run resumed in
the middle of an epoch therefore sees the same samples, transformed the same way, as the run that
was killed, whatever the number of worker processes.
"""

from __future__ import annotations

import hashlib
import gc
import io
import json
import logging
import math
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from sd_lora.config import Alpha, DatasetConfig, OnFailure, cache_dir
from sd_lora.errors import UserError
from sd_lora.hub import resolve_local

log = logging.getLogger(__name__)


def load_tables(cfg: DatasetConfig, seed: int = 0, validation_seed: int = 0):
    """(training rows, held-out rows or None), with the split read and divided once. The held-out rows are
    `dataset.validation_split` of the split, or the split `dataset.validation_source`."""
    train, held_out = _divided(cfg, validation_seed)
    if cfg.validation_source:
        held_out = _read_split(cfg, cfg.validation_source)
    return _training_rows(train, cfg, seed), _held_out_rows(held_out, cfg)


def load_table(cfg: DatasetConfig, seed: int = 0, validation_seed: int = 0):
    """The training rows as a `datasets.Dataset`, columns checked, images left undecoded.

    With `dataset.validation_split` > 0 that fraction of the split is held out (by `validation_seed`,
    the same in every job of a sweep) and never trained on; `load_tables` returns it too.
    """
    return _training_rows(_divided(cfg, validation_seed)[0], cfg, seed)


def _divided(cfg: DatasetConfig, validation_seed: int):
    """The split, as (rows to train on, rows held out by `dataset.validation_split` or None)."""
    table = _read_split(cfg, cfg.split)
    if not cfg.validation_split:
        return table, None
    parts = table.train_test_split(test_size=cfg.validation_split, seed=validation_seed)
    return parts["train"], parts["test"]


def _training_rows(table, cfg: DatasetConfig, seed: int):
    if cfg.max_train_samples is not None:
        table = table.shuffle(seed=seed).select(range(min(cfg.max_train_samples, len(table))))
    check_captions(table, cfg)
    return table


def check_captions(table, cfg: DatasetConfig, what: str = "training") -> None:
    """UserError naming the rows whose caption is empty, before any training (one pass over the column)."""
    def empty(value) -> bool:
        if value is None:
            return True
        if isinstance(value, str):
            return not value.strip()
        if isinstance(value, (list, tuple, np.ndarray)):
            return all(isinstance(v, str) and not v.strip() for v in value)  # also no caption at all
        return False  # another type is named by pick_caption when the row is read

    rows = [i for i, value in enumerate(table[cfg.caption_column]) if empty(value)]
    if rows:
        first = _image_where(table[rows[0]][cfg.image_column], rows[0])
        listed = ", ".join(map(str, rows[:5])) + (f" and {len(rows) - 5} more" if len(rows) > 5 else "")
        raise UserError(
            f"dataset.caption_column={cfg.caption_column!r}: {len(rows)} of {len(table)} {what} rows have an empty "
            f"caption (rows {listed}; the first is {first}); write a caption for them or remove those rows"
        )


def _held_out_rows(table, cfg: DatasetConfig):
    if table is None:
        return None
    if cfg.max_validation_samples is not None:
        table = table.select(range(min(cfg.max_validation_samples, len(table))))
    check_captions(table, cfg, what="held-out")
    return table


def _read_split(cfg: DatasetConfig, split: str):
    import datasets

    path = resolve_local("dataset.path", cfg.path, repo_type="dataset", source_repo=cfg.source_repo,
                         missing_hint=cfg.missing_hint)
    try:
        if cfg.caption_files:
            table = _read_caption_folder(cfg, path, split)
        elif (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
            table = datasets.load_from_disk(str(path))
            if isinstance(table, datasets.DatasetDict):
                table = _pick_split(table, split, path)
            elif str(table.split or "train") != split:
                raise UserError(f"dataset.split={split!r}: the saved data set at {path} is a single split "
                                f"({table.split or 'train'}); set dataset.split={table.split or 'train'}")
        else:
            table = _pick_split(datasets.load_dataset(str(path), cache_dir=datasets_cache_dir()), split, path)
    except UserError:
        raise
    except (FileNotFoundError, ValueError, datasets.exceptions.DatasetGenerationError) as exc:
        raise UserError(f"dataset.path={cfg.path!r}: could not read a data set in {path}: {exc}") from None
    columns = list(table.column_names)
    for key, column in (("dataset.image_column", cfg.image_column), ("dataset.caption_column", cfg.caption_column)):
        if column not in columns:
            raise UserError(
                f"{key}={column!r} is not a column of the data set in {path}; its columns are {columns}: "
                f"set {key} to one of them"
            )
    if len(table) == 0:
        raise UserError(f"dataset.path={cfg.path!r}: split {split!r} in {path} has no rows")
    if isinstance(table.features[cfg.image_column], datasets.Image):
        table = table.cast_column(cfg.image_column, datasets.Image(decode=False))
    return table


def datasets_cache_dir() -> str:
    """Where 🤗 datasets keeps the tables it prepares: $HF_DATASETS_CACHE if set, else $SD_LORA_CACHE/datasets
    (with the rest of sd_lora's caches, not in ~/.cache/huggingface)."""
    return os.environ.get("HF_DATASETS_CACHE") or str(cache_dir() / "datasets")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _read_caption_folder(cfg: DatasetConfig, path: Path, split: str):
    """kohya's layout: every image under `path` (subfolders too, hidden ones left out) with its caption in the file
    of the same name and `dataset.caption_extension` beside it. One split, train. The table holds the paths; its
    fingerprint (the embedding cache's key) follows each file's size and modification time and the captions."""
    import datasets

    if split != "train":
        raise UserError(f"dataset.caption_files=true reads one split, train, from {path}, and {split!r} was asked "
                        "for: hold out data with dataset.validation_split instead")
    images = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                    and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not images:
        raise UserError(f"dataset.path={cfg.path!r} with dataset.caption_files=true: no images "
                        f"({', '.join(IMAGE_SUFFIXES)}) in {path}")
    ext = cfg.caption_extension
    missing = [p for p in images if not p.with_suffix(ext).is_file()]
    if missing:
        raise UserError(f"dataset.caption_files=true: {len(missing)} of {len(images)} images have no {ext} caption "
                        f"beside them (the first is {missing[0]}); write one for each (a.png + a{ext}) or remove "
                        "those images")
    captions = [p.with_suffix(ext).read_text(encoding="utf-8").strip() for p in images]
    digest = hashlib.sha256(json.dumps([(str(p), p.stat().st_size, p.stat().st_mtime_ns, c)
                                        for p, c in zip(images, captions)]).encode()).hexdigest()[:16]
    features = datasets.Features({cfg.image_column: datasets.Image(decode=False), cfg.caption_column: datasets.Value("string")})
    table = datasets.Dataset.from_dict({cfg.image_column: [{"bytes": None, "path": str(p)} for p in images],
                                        cfg.caption_column: captions}, features=features)
    return datasets.Dataset(table.data, info=table.info, fingerprint=digest)


def _pick_split(tables, split: str, path: Path):
    if split not in tables:
        raise UserError(f"dataset.split={split!r} is not in the data set at {path}; it has {list(tables)}")
    return tables[split]


def decode_image(value, where: str, alpha: Alpha = Alpha.white) -> Image.Image:
    """A datasets image cell (bytes/path dict, PIL image or file path) -> 8-bit RGB PIL image (see to_rgb)."""
    try:
        if isinstance(value, Image.Image):
            image = value
        elif isinstance(value, dict) and value.get("bytes"):
            image = Image.open(io.BytesIO(value["bytes"]))
        elif isinstance(value, dict) and value.get("path"):
            image = Image.open(value["path"])
        elif isinstance(value, str):
            image = Image.open(value)
        else:
            raise ValueError(f"unsupported image cell of type {type(value).__name__}")
        return to_rgb(image, alpha)
    except Exception as exc:  # PIL raises many types for broken files
        raise UserError(f"{where}: the image cannot be decoded ({type(exc).__name__}: {exc}); fix or remove it") from None


SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # a 16-bit grayscale PNG opens as one of these


def to_rgb(image: Image.Image, alpha: Alpha = Alpha.white) -> Image.Image:
    """Any PIL image -> 8-bit RGB, as a viewer shows it.

    PIL's convert("RGB") clamps 16-bit values to 255 (a 16-bit grayscale PNG becomes white): they are scaled
    to 8 bits instead. Transparency (RGBA, LA, PA, a palette's or a colour's transparency entry) is composited
    on white or black (`dataset.alpha`); convert("RGB") alone would keep the hidden colours of transparent
    pixels. Palette and CMYK images go through PIL's conversions."""
    if image.mode in SIXTEEN_BIT_MODES:
        levels = np.asarray(image, dtype=np.float64) / 257.0  # 65535 -> 255
        image = Image.fromarray(np.clip(np.round(levels), 0, 255).astype(np.uint8), "L")
    transparent = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if not transparent or alpha is Alpha.ignore:
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255) if alpha is Alpha.white else (0, 0, 0, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _image_where(value, index: int) -> str:
    path = value.get("path") if isinstance(value, dict) else value if isinstance(value, str) else None
    return f"data set row {index}" + (f" (file {path})" if path else "")


def decode_or_skip(cell, index: int, on_bad_image: OnFailure, skipped_means: str, where: str = "",
                   alpha: Alpha = Alpha.white) -> Image.Image | None:
    """The row's image; or, when it cannot be decoded, None under `dataset.on_bad_image=skip` (with a warning
    that ends in `skipped_means`, e.g. "left out of the cache") and the UserError naming row and file otherwise.
    The training rows, the embedding cache and the held-out rows all decide this way."""
    try:
        return decode_image(cell, where + _image_where(cell, index), alpha)
    except UserError as exc:
        if on_bad_image is not OnFailure.skip:
            raise
        log.warning("dataset.on_bad_image=skip: %s; %s", exc, skipped_means)
        return None


def train_transform(image: Image.Image, resolution: int, center_crop: bool, random_flip: bool,
                    generator: torch.Generator | None = None, geometry: dict | None = None) -> torch.Tensor:
    """Resize short side to `resolution`, crop to a square, maybe flip; CHW float in [-1, 1].

    `geometry`, where given, receives what SDXL's size conditioning reads (as diffusers' SDXL script computes it):
    "original_size" (h, w) before the resize, "crop_top_left" (top, left) in the resized image as seen after the
    flip, "target_size" (h, w).
    """
    w, h = image.size
    original = (h, w)
    size = resized_size(image.size, resolution)
    if size != (w, h):
        image = image.resize(size, Image.BILINEAR)  # PIL antialiases when downscaling, as torchvision does on PIL
    pixels, crop = _crop_flip(image, (resolution, resolution), center_crop, random_flip, generator)
    if geometry is not None:
        geometry.update(size_conditioning(original, crop, (resolution, resolution)))
    return pixels


def _crop_flip(image: Image.Image, size: tuple[int, int], center_crop: bool, random_flip: bool,
               generator: torch.Generator | None) -> tuple[torch.Tensor, tuple[int, int]]:
    """Crop a resized image to `size` (width, height), centred or at a random offset, maybe flip; CHW float in
    [-1, 1] and the crop's (top, left) as seen after the flip."""
    (w, h), (cw, ch) = image.size, size
    if center_crop:
        left, top = int(round((w - cw) / 2.0)), int(round((h - ch) / 2.0))
    else:
        top = int(torch.randint(0, h - ch + 1, (1,), generator=generator))
        left = int(torch.randint(0, w - cw + 1, (1,), generator=generator))
    image = image.crop((left, top, left + cw, top + ch))
    flipped = random_flip and float(torch.rand(1, generator=generator)) < 0.5
    if flipped:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
        left = w - left - cw  # where the crop lies in the mirror image: what diffusers' SDXL script, flipping first, records
    array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous() * 2.0 - 1.0, (top, left)


# ---- aspect-ratio buckets (dataset.buckets): kohya's and SimpleTuner's "aspect ratio bucketing"


def make_buckets(cfg: DatasetConfig) -> list[tuple[int, int]]:
    """The buckets (width, height): edges multiples of bucket_step between the min and max edge, each as close to
    resolution² pixels as the step allows without exceeding it, both orientations (kohya's rule)."""
    lo, hi = cfg.bucket_edges()
    step, area = cfg.bucket_step, cfg.resolution * cfg.resolution
    found = set()
    for width in range(lo, hi + 1, step):
        height = min(hi, area // width // step * step)
        if height >= lo:
            found.update({(width, height), (height, width)})
    return sorted(found)


def nearest_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> int:
    """The index of the bucket whose aspect ratio is nearest the image's (on a log scale: 2:1 is as far from 1:1 as
    1:2); of two as near, the larger."""
    ratio = math.log(size[0] / size[1])
    return min(range(len(buckets)), key=lambda i: (abs(math.log(buckets[i][0] / buckets[i][1]) - ratio),
                                                   -buckets[i][0] * buckets[i][1]))


def bucket_resized_size(size: tuple[int, int], bucket: tuple[int, int]) -> tuple[int, int]:
    """(w, h) of an image of `size` resized to cover `bucket` (w, h), aspect ratio kept, as bucket_transform resizes."""
    (w, h), (bw, bh) = size, bucket
    scale = max(bw / w, bh / h)
    return max(bw, round(w * scale)), max(bh, round(h * scale))


def bucket_transform(image: Image.Image, bucket: tuple[int, int], center_crop: bool, random_flip: bool,
                     generator: torch.Generator | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
    """Resize the image to cover the bucket (the smallest size that does, aspect ratio kept), crop the rounding's
    excess (centred, or at a random offset), maybe flip; CHW float in [-1, 1] and the crop's (top, left)."""
    (w, h) = image.size
    size = bucket_resized_size(image.size, bucket)
    if size != (w, h):
        image = image.resize(size, Image.BILINEAR)
    return _crop_flip(image, bucket, center_crop, random_flip, generator)


def image_size(cell) -> tuple[int, int] | None:
    """An image cell's (width, height) from its header alone (no decode); None if it cannot be opened."""
    try:
        if isinstance(cell, Image.Image):
            return cell.size
        if isinstance(cell, dict) and cell.get("bytes"):
            return Image.open(io.BytesIO(cell["bytes"])).size
        path = cell.get("path") if isinstance(cell, dict) else cell
        with Image.open(path) as image:
            return image.size
    except Exception:  # named where the row is decoded (dataset.on_bad_image)
        return None


class BucketBatches(torch.utils.data.Sampler):
    """Batches of `(seed, epoch, index)` keys, each from one bucket: the rows of each bucket in an order drawn from
    (seed, epoch, bucket), cut into groups of batch_size x num_processes, the groups in an order drawn from
    (seed, epoch). A group is `num_processes` consecutive batches, which accelerate deals out one to each process,
    so that every process trains the same bucket at each step (DDP's shapes agree). A bucket's last, smaller
    group is split evenly over the processes, or dropped with `drop_last` (or when it has fewer rows than there
    are processes). As EpochShuffle: the loop sets `epoch`; left alone it counts up by one per pass."""

    def __init__(self, bucket_of: list[int], buckets: list[tuple[int, int]], batch_size: int, seed: int,
                 num_processes: int = 1, drop_last: bool = False):
        self.rows = {b: [i for i, x in enumerate(bucket_of) if x == b] for b in sorted(set(bucket_of))}
        self.counts = {f"{buckets[b][0]}x{buckets[b][1]}": len(rows) for b, rows in self.rows.items()}
        # no `batch_size` attribute: accelerate then takes the batches as of varying length and deals out each one
        # (with one, it holds back every group of processes' batches whose last batch is smaller)
        self.per_batch, self.seed, self.num_processes, self.drop_last = batch_size, seed, num_processes, drop_last
        self.epoch = 0
        self.num_batches = sum(len(group) for rows in self.rows.values() for group in self._groups(rows))

    def _groups(self, rows: list[int]) -> list[list[list[int]]]:
        n, size = self.num_processes, self.per_batch * self.num_processes
        groups = []
        for start in range(0, len(rows), size):
            chunk = rows[start:start + size]
            if len(chunk) < size and (self.drop_last or len(chunk) < n):
                continue
            groups.append([chunk[k * len(chunk) // n:(k + 1) * len(chunk) // n] for k in range(n)])
        return groups

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self):
        epoch, self.epoch = self.epoch, self.epoch + 1
        groups = []
        for bucket, rows in self.rows.items():
            order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(
                sample_seed(self.seed, epoch, "bucket", bucket))).tolist()
            groups += self._groups([rows[i] for i in order])
        shuffled = torch.randperm(len(groups), generator=torch.Generator().manual_seed(
            sample_seed(self.seed, epoch, "buckets"))).tolist()
        for g in shuffled:
            for batch in groups[g]:
                yield [(self.seed, epoch, index) for index in batch]


def resized_size(size: tuple[int, int], resolution: int) -> tuple[int, int]:
    """(w, h) with the short side resized to `resolution`, as train_transform resizes."""
    w, h = size
    return (resolution, int(resolution * h / w)) if w <= h else (int(resolution * w / h), resolution)


def size_conditioning(original: tuple[int, int], crop_top_left: tuple[int, int], target: tuple[int, int]) -> dict:
    """A sample's sizes as tensors, each (h, w) or (top, left) (see train_transform's `geometry`)."""
    return {"original_size": torch.tensor(original), "crop_top_left": torch.tensor(crop_top_left),
            "target_size": torch.tensor(target)}


def long_captions(table, cfg: DatasetConfig, tokenizers) -> list[int]:
    """The training rows with a caption longer than a tokenizer's limit (CLIP's 77 tokens), which training cuts
    to that limit; warned about once, listing the first rows. Read once, at the start."""
    values = table[cfg.caption_column]
    flat, owner = [], []
    for index, value in enumerate(values):
        for caption in (value if isinstance(value, (list, tuple)) else [value]):
            if isinstance(caption, str):
                flat.append(caption)
                owner.append(index)
    rows, limit = set(), None
    for tokenizer in tokenizers:
        limit = tokenizer.model_max_length
        lengths = tokenizer(flat, truncation=False, verbose=False)["input_ids"]
        rows.update(owner[i] for i, ids in enumerate(lengths) if len(ids) > limit)
    if rows:
        log.warning("%d of %d training rows have a caption longer than the text encoder's %d tokens; training sees "
                    "only its first %d tokens (rows %s%s); put what matters first, or shorten them", len(rows),
                    len(values), limit, limit, sorted(rows)[:10], " ..." if len(rows) > 10 else "")
    return sorted(rows)


def pick_caption(value, index: int, column: str, generator: torch.Generator | None = None) -> str:
    """A caption cell -> one string (a random one of several, as diffusers' script does)."""
    if isinstance(value, (list, tuple, np.ndarray)) and len(value) > 0:
        value = list(value)[int(torch.randint(len(value), (1,), generator=generator))]
    if not isinstance(value, str):
        raise UserError(
            f"data set row {index}: caption column {column!r} holds {type(value).__name__}, not text; "
            "set dataset.caption_column to the text column"
        )
    return value


def sample_seed(*parts) -> int:
    """A 63-bit seed from (seed, epoch, index[, stream]): one independent random stream per sample and use."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def caption_variant(caption: str, cfg: DatasetConfig, key) -> str:
    """A caption with `dataset.shuffle_tags` and `dataset.caption_dropout` applied, each drawn from its own stream of
    the sample's key (see `sample_stream`)."""
    if cfg.shuffle_tags:
        tags = [tag.strip() for tag in caption.split(",") if tag.strip()]
        kept, rest = tags[:cfg.keep_tags], tags[cfg.keep_tags:]
        order = torch.randperm(len(rest), generator=sample_stream(key, "tags")).tolist()
        caption = ", ".join(kept + [rest[i] for i in order])
    return "" if drops_caption(cfg.caption_dropout, key) else caption


def drops_caption(probability: float, key) -> bool:
    """Whether this sample (key) trains with the empty caption: the same draw with and without the embedding cache."""
    return bool(probability) and float(torch.rand(1, generator=sample_stream(key, "caption_dropout"))) < probability


def sample_stream(key, stream: str) -> torch.Generator | None:
    """The sample's own generator for one use (`stream`), from a `(seed, epoch, index)` key; None (torch's global
    RNG) for a plain index."""
    if isinstance(key, tuple):
        seed, epoch, index = key
        return torch.Generator().manual_seed(sample_seed(seed, epoch, index, stream))
    return None


def sample_key(key) -> tuple[torch.Generator | None, int]:
    """(generator, index) for a data set key: `(seed, epoch, index)` from EpochShuffle, or a plain index.

    A plain index (a data set used directly, e.g. in a notebook) draws from torch's global RNG, as
    with torch's own samplers; `(seed, epoch, index)` gets the sample's own seeded stream.
    """
    if isinstance(key, tuple):
        seed, epoch, index = key
        return torch.Generator().manual_seed(sample_seed(seed, epoch, index, "data")), index
    return None, key


MAX_BAD_IN_A_ROW = 32  # dataset.on_bad_image=skip gives up after this many undecodable rows in a row


class CaptionedImages(torch.utils.data.Dataset):
    """Rows of a datasets table -> {"pixel_values", the caption's tokens} with the training transforms.

    `tokenize` turns captions into the model family's token tensors (`{"input_ids": ...}` for SD; see
    families.ModelFamily.tokenize); it travels to loader workers, so it holds the tokenizers only.

    With `dataset.on_bad_image=skip` an undecodable image is logged and the next decodable row takes
    its place (so batches keep their size and every process its step count); the item then lists
    the skipped rows under "skipped_rows", for the report.
    """

    def __init__(self, table, cfg: DatasetConfig, tokenize: Callable[[list[str]], dict[str, torch.Tensor]]):
        self.table, self.cfg, self.tokenize = table, cfg, tokenize
        self.buckets, self.bucket_of = None, None
        if cfg.buckets:  # each row's bucket, from the image headers (a row that cannot be opened: the square one)
            self.buckets = make_buckets(cfg)
            cells = (cell for start in range(0, len(table), 256)  # a chunk at a time: cells may hold the bytes
                     for cell in table[start:start + 256][cfg.image_column])
            self.bucket_of = [nearest_bucket(size or (1, 1), self.buckets) for size in map(image_size, cells)]

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, key) -> dict:
        generator, index = sample_key(key)
        skipped = []
        while True:
            row_index = (index + len(skipped)) % len(self.table)
            row = self.table[row_index]
            image = decode_or_skip(row[self.cfg.image_column], row_index, self.cfg.on_bad_image,
                                   "skipped, the next row takes its place", alpha=self.cfg.alpha)
            if image is not None:
                break
            skipped.append(row_index)
            if len(skipped) >= min(MAX_BAD_IN_A_ROW, len(self.table)):
                raise UserError(f"dataset.on_bad_image=skip: {len(skipped)} rows in a row from data set row {index} "
                                f"cannot be decoded (rows {skipped[:5]}{' ...' if len(skipped) > 5 else ''}, each "
                                "named in a warning above); check dataset.path")
        caption = pick_caption(row[self.cfg.caption_column], row_index, self.cfg.caption_column, generator)
        caption = caption_variant(caption, self.cfg, key)
        tokens = {key: value[0] for key, value in self.tokenize([caption]).items()}
        if self.buckets is None:
            geometry: dict = {}
            pixels = train_transform(image, self.cfg.resolution, self.cfg.center_crop, self.cfg.random_flip, generator,
                                     geometry)
        else:  # the slot's bucket (a skipped row's replacement takes it too)
            bucket = self.buckets[self.bucket_of[index]]
            pixels, crop = bucket_transform(image, bucket, self.cfg.center_crop, self.cfg.random_flip, generator)
            geometry = size_conditioning((image.size[1], image.size[0]), crop, (bucket[1], bucket[0]))
        item = {"pixel_values": pixels, **tokens, **geometry, "index": index}  # the sizes: SDXL's time ids
        if skipped:
            item["skipped_rows"] = skipped
        return item


def collate(examples: list[dict]) -> dict:
    """Stack the samples' tensors (pixels, tokens or cached embeddings); the host-side lists stay lists."""
    batch = {key: torch.stack([e[key] for e in examples]) for key in examples[0] if key not in HOST_KEYS}
    if "pixel_values" in batch:  # as diffusers' script collates
        batch["pixel_values"] = batch["pixel_values"].contiguous(memory_format=torch.contiguous_format)
    batch["index"] = [e["index"] for e in examples]  # a list, so accelerate leaves it on the host
    batch["skipped_rows"] = [row for e in examples for row in e.get("skipped_rows", ())]  # dataset.on_bad_image=skip
    return batch


HOST_KEYS = ("index", "skipped_rows")


class EpochShuffle(torch.utils.data.Sampler):
    """Each epoch a permutation drawn from (seed, epoch) alone; yields `(seed, epoch, index)` keys.

    torch's RandomSampler draws epoch e from a generator that has gone through epochs 0..e-1 (and
    accelerate re-synchronises it from rank 0), so a resumed process would shuffle differently; here
    the order of an epoch depends on nothing else. The seed and epoch travel with each index so that
    the data set seeds the sample's crop / flip / caption choice from them, also in worker processes,
    which keep their own copy of the data set.

    The training loop sets `epoch` before each epoch; left alone it counts up by one per pass. It is
    deliberately not a `set_epoch` method: accelerate calls that with its own iteration counter,
    which starts again at 0 in a resumed process.
    """

    def __init__(self, num_samples: int, seed: int):
        self.num_samples, self.seed, self.epoch = num_samples, seed, 0

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self):
        epoch, self.epoch = self.epoch, self.epoch + 1
        generator = torch.Generator().manual_seed(sample_seed(self.seed, epoch, "shuffle"))
        for index in torch.randperm(self.num_samples, generator=generator).tolist():
            yield self.seed, epoch, index


def epoch_order(loader: torch.utils.data.DataLoader):
    """What orders a loader's epochs (EpochShuffle, or BucketBatches): the loop tells it the epoch."""
    return loader.batch_sampler if isinstance(loader.batch_sampler, BucketBatches) else loader.sampler


def build_dataloader(dataset: torch.utils.data.Dataset, batch_size: int, num_workers: int, seed: int,
                     pin_memory: bool = False, collate_fn=collate, drop_last: bool = False,
                     num_processes: int = 1) -> torch.utils.data.DataLoader:
    """A loader shuffled by `EpochShuffle` (its `.sampler`), or batched by `BucketBatches` where the data set has
    buckets; `seed` also seeds every sample's random transforms."""
    # The loader's own generator only seeds worker processes, whose global RNGs nothing here uses;
    # giving one keeps the loader from drawing that seed from torch's global RNG, a stream that a
    # resumed run must find exactly where the killed run left it.
    generator = torch.Generator().manual_seed(seed)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if num_workers > cores:  # more would only contend (torch warns about it too)
        log.info("dataset.num_workers=%d: %d core(s) available here, so %d loader worker(s)", num_workers, cores, cores)
        num_workers = cores
    workers = dict(generator=generator, collate_fn=collate_fn, num_workers=num_workers, pin_memory=pin_memory,
                   persistent_workers=num_workers > 0,
                   worker_init_fn=_collect_garbage_in_worker if num_workers > 0 else None)
    if getattr(dataset, "bucket_of", None) is not None:
        batches = BucketBatches(dataset.bucket_of, dataset.buckets, batch_size, seed, num_processes, drop_last)
        log.info("dataset.buckets: %d buckets (width x height: samples) %s", len(batches.counts), batches.counts)
        return torch.utils.data.DataLoader(dataset, batch_sampler=batches, **workers)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=EpochShuffle(len(dataset), seed),
                                       drop_last=drop_last, **workers)


def _collect_garbage_in_worker(worker_id: int) -> None:
    """Workers start at the first batch, inside the trainer's loop: where trainer.gc_every_n_steps has turned
    automatic garbage collection off in the main process, a worker turns it back on for itself (nothing
    there would ever collect otherwise)."""
    gc.enable()
