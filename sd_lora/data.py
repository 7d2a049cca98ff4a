"""Captioned image data: loading with 🤗 datasets, transforms, tokenisation, batches.

Sources (`dataset.path`): a hub-layout folder (parquet or image files), an imagefolder with
metadata.jsonl, a `save_to_disk` folder, or a hub id already in the local hub cache. Images are
decoded here (not by datasets) so that a file that cannot be decoded is named by row and path.
The transforms are those of diffusers' LoRA script (resize the short side with bilinear
antialiasing, centre or random crop, random horizontal flip, scale to [-1, 1]), written on PIL and
numpy because torchvision is not a dependency. Nothing here touches the model or the optimiser.
"""

from __future__ import annotations

import io
import logging
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sd_lora.config import DatasetConfig
from sd_lora.errors import UserError
from sd_lora.hub import resolve_local

log = logging.getLogger(__name__)


def load_table(cfg: DatasetConfig, seed: int = 0, validation_seed: int = 0):
    """The training rows as a `datasets.Dataset`, columns checked, images left undecoded.

    With `dataset.validation_split` > 0 that fraction of the split is held out (by `validation_seed`,
    the same in every job of a sweep) and never trained on; `load_validation_table` returns it.
    """
    table = _read_split(cfg, cfg.split)
    if cfg.validation_split:
        table = table.train_test_split(test_size=cfg.validation_split, seed=validation_seed)["train"]
    if cfg.max_train_samples is not None:
        table = table.shuffle(seed=seed).select(range(min(cfg.max_train_samples, len(table))))
    return table


def load_validation_table(cfg: DatasetConfig, validation_seed: int = 0):
    """The held-out rows (`dataset.validation_split` of the split, or the split `dataset.validation_source`)."""
    if cfg.validation_source:
        table = _read_split(cfg, cfg.validation_source)
    elif cfg.validation_split:
        table = _read_split(cfg, cfg.split).train_test_split(test_size=cfg.validation_split,
                                                             seed=validation_seed)["test"]
    else:
        return None
    if cfg.max_validation_samples is not None:
        table = table.select(range(min(cfg.max_validation_samples, len(table))))
    return table


def _read_split(cfg: DatasetConfig, split: str):
    import datasets

    path = resolve_local("dataset.path", cfg.path, repo_type="dataset", source_repo=cfg.source_repo)
    try:
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
            table = datasets.load_from_disk(str(path))
            if isinstance(table, datasets.DatasetDict):
                table = _pick_split(table, split, path)
            elif str(table.split or "train") != split:
                raise UserError(f"dataset.split={split!r}: the saved data set at {path} is a single split "
                                f"({table.split or 'train'}); set dataset.split={table.split or 'train'}")
        else:
            table = _pick_split(datasets.load_dataset(str(path)), split, path)
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


def _pick_split(tables, split: str, path: Path):
    if split not in tables:
        raise UserError(f"dataset.split={split!r} is not in the data set at {path}; it has {list(tables)}")
    return tables[split]


def decode_image(value, where: str) -> Image.Image:
    """A datasets image cell (bytes/path dict, PIL image or file path) -> RGB PIL image."""
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
        return image.convert("RGB")
    except Exception as exc:  # PIL raises many types for broken files
        raise UserError(f"{where}: the image cannot be decoded ({type(exc).__name__}: {exc}); fix or remove it") from None


def _image_where(value, index: int) -> str:
    path = value.get("path") if isinstance(value, dict) else value if isinstance(value, str) else None
    return f"data set row {index}" + (f" (file {path})" if path else "")


def train_transform(image: Image.Image, resolution: int, center_crop: bool, random_flip: bool,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """Resize short side to `resolution`, crop to a square, maybe flip; CHW float in [-1, 1]."""
    w, h = image.size
    if w <= h:
        size = (resolution, int(resolution * h / w))
    else:
        size = (int(resolution * w / h), resolution)
    if size != (w, h):
        image = image.resize(size, Image.BILINEAR)  # PIL antialiases when downscaling, as torchvision does on PIL
    w, h = image.size
    if center_crop:
        left, top = int(round((w - resolution) / 2.0)), int(round((h - resolution) / 2.0))
    else:
        top = int(torch.randint(0, h - resolution + 1, (1,), generator=generator))
        left = int(torch.randint(0, w - resolution + 1, (1,), generator=generator))
    image = image.crop((left, top, left + resolution, top + resolution))
    if random_flip and float(torch.rand(1, generator=generator)) < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous() * 2.0 - 1.0


def pick_caption(value, index: int, column: str) -> str:
    """A caption cell -> one string (a random one of several, as diffusers' script does)."""
    if isinstance(value, (list, tuple, np.ndarray)) and len(value) > 0:
        value = random.choice(list(value))
    if not isinstance(value, str):
        raise UserError(
            f"data set row {index}: caption column {column!r} holds {type(value).__name__}, not text; "
            "set dataset.caption_column to the text column"
        )
    return value


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(
        captions, max_length=tokenizer.model_max_length, padding="max_length", truncation=True, return_tensors="pt"
    ).input_ids


class CaptionedImages(torch.utils.data.Dataset):
    """Rows of a datasets table -> {"pixel_values", "input_ids"} with the training transforms."""

    def __init__(self, table, cfg: DatasetConfig, tokenizer):
        self.table, self.cfg, self.tokenizer = table, cfg, tokenizer

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, index: int) -> dict:
        row = self.table[index]
        cell = row[self.cfg.image_column]
        image = decode_image(cell, _image_where(cell, index))
        caption = pick_caption(row[self.cfg.caption_column], index, self.cfg.caption_column)
        pixels = train_transform(image, self.cfg.resolution, self.cfg.center_crop, self.cfg.random_flip)
        return {"pixel_values": pixels, "input_ids": tokenize(self.tokenizer, [caption])[0], "index": index}


def collate(examples: list[dict]) -> dict:
    return {
        "pixel_values": torch.stack([e["pixel_values"] for e in examples]).contiguous(memory_format=torch.contiguous_format),
        "input_ids": torch.stack([e["input_ids"] for e in examples]),
        "index": [e["index"] for e in examples],  # a list, so accelerate leaves it on the host
    }


def build_dataloader(dataset: torch.utils.data.Dataset, batch_size: int, num_workers: int, seed: int,
                     pin_memory: bool = False, collate_fn=collate, drop_last: bool = False) -> torch.utils.data.DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        generator=generator,
        collate_fn=collate_fn,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        drop_last=drop_last,
    )
