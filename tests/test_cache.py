"""The embedding cache (`dataset.cache=true`): right contents, never stale, atomic, same training loss.

All on the tiny SD-2.1-shaped pipeline (real diffusers / transformers classes) on the CPU. The
expected posteriors and text embeddings are computed here independently of `sd_lora.cache`: the
image is decoded with PIL, transformed with `train_transform` (centre crop, no flip), mirrored with
`torch.flip`, and encoded one image at a time.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from conftest import noise_image, run_launch, write_noise_folder

import sd_lora
import sd_lora.data
from sd_lora.cache import CachedEmbeddings, cache_key, compute_embeddings, load_or_build
from sd_lora.config import DatasetConfig, ModelConfig, ModelFamilyName, OnFailure
from sd_lora.data import CaptionedImages, collate, load_table, train_transform
from sd_lora.families import FAMILIES
from sd_lora.errors import UserError
from sd_lora.model import load_components, resolve_model_path
from sd_lora.loss import StepModels, sample_generators, train_step

FAMILY = FAMILIES[ModelFamilyName.sd]

SHAPES = Path(sd_lora.__file__).parent / "assets" / "shapes"
FP32 = dict(rtol=1e-4, atol=1e-5)  # batched vs one-at-a-time fp32 convolutions

# (width, height) of the rows of the non-square imagefolder: wide without resize, tall with resize,
# wide with resize, square
SIZES = [(48, 32), (40, 72), (70, 44), (40, 40)]


# --------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine two spinning OpenMP threads run ~40x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_cfg(tiny_model_path) -> ModelConfig:
    return ModelConfig(pretrained_model_name_or_path=str(tiny_model_path))


@pytest.fixture(scope="module")
def comps(tiny_components):
    return tiny_components


def encoder(comps):
    """The family's caption encoder, as the trainer hands it to the cache."""
    return functools.partial(FAMILY.encode_captions, comps, device="cpu")


def shapes_cfg(**kw) -> DatasetConfig:
    base = dict(path=str(SHAPES), image_column="image", caption_column="text", resolution=64, center_crop=True,
                random_flip=True, max_train_samples=6, cache=True)
    return DatasetConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def shapes_table():
    return load_table(shapes_cfg(), seed=0)


def write_imagefolder(root: Path, sizes=SIZES) -> Path:
    return write_noise_folder(root, [(size, f"a {['red', 'green', 'blue', 'white'][i % 4]} {['circle', 'square'][i % 2]}")
                                     for i, size in enumerate(sizes)])


@pytest.fixture(scope="module")
def nonsquare_folder(tmp_path_factory) -> Path:
    return write_imagefolder(tmp_path_factory.mktemp("nonsquare") / "data")


def folder_cfg(path: Path, **kw) -> DatasetConfig:
    base = dict(path=str(path), resolution=32, center_crop=True, random_flip=True, cache=True)
    return DatasetConfig(**{**base, **kw})


def open_cell(cell) -> Image.Image:
    """The table's undecoded image cell, opened with PIL (not with sd_lora's decode_image)."""
    if cell.get("bytes"):
        return Image.open(io.BytesIO(cell["bytes"])).convert("RGB")
    return Image.open(cell["path"]).convert("RGB")


@torch.no_grad()
def expected_posteriors(vae, table, cfg: DatasetConfig):
    """Per row: (mean, std) of the centre-cropped image and of its mirror image, one image at a time."""
    out = []
    for row in range(len(table)):
        pixels = train_transform(open_cell(table[row][cfg.image_column]), cfg.resolution, center_crop=True,
                                 random_flip=False)
        views = []
        for p in (pixels, torch.flip(pixels, dims=[2])):  # CHW: dim 2 is the width
            dist = vae.encode(p[None]).latent_dist
            views.append((dist.mean[0], dist.std[0]))
        out.append(views)
    return out


@pytest.fixture(scope="module")
def shapes_cache(comps, shapes_table):
    # batch_size=4 over 6 rows: two batches, so rows must be put back together in order
    return compute_embeddings(shapes_table, shapes_cfg(), encoder(comps), comps.vae, "cpu",
                              torch.float32, batch_size=4)


@pytest.fixture(scope="module")
def nonsquare_table(nonsquare_folder):
    return load_table(folder_cfg(nonsquare_folder))


@pytest.fixture(scope="module")
def nonsquare_cache(comps, nonsquare_table, nonsquare_folder):
    return compute_embeddings(nonsquare_table, folder_cfg(nonsquare_folder), encoder(comps), comps.vae, "cpu", torch.float32, batch_size=3)


# --------------------------------------------------------------------------------------------
# 1. cached posteriors = the VAE posterior of each (mirrored) image


@pytest.mark.parametrize("which", ["shapes", "nonsquare"])
def test_cached_posteriors_equal_vae_posterior_of_each_image_and_its_mirror(request, comps, which):
    table = request.getfixturevalue(f"{which}_table")
    tensors = request.getfixturevalue(f"{which}_cache")
    cfg = shapes_cfg() if which == "shapes" else folder_cfg(request.getfixturevalue("nonsquare_folder"))
    side = cfg.resolution // 8
    n = len(table)
    assert tensors["latent_mean"].shape == (n, 2, 4, side, side)
    assert tensors["latent_std"].shape == (n, 2, 4, side, side)
    assert tensors["latent_mean"].dtype == tensors["latent_std"].dtype == torch.float32

    expected = expected_posteriors(comps.vae, table, cfg)
    for row, ((mean0, std0), (mean1, std1)) in enumerate(expected):
        torch.testing.assert_close(tensors["latent_mean"][row, 0], mean0, **FP32, msg=f"row {row} view 0 mean")
        torch.testing.assert_close(tensors["latent_std"][row, 0], std0, **FP32, msg=f"row {row} view 0 std")
        torch.testing.assert_close(tensors["latent_mean"][row, 1], mean1, **FP32, msg=f"row {row} view 1 mean")
        torch.testing.assert_close(tensors["latent_std"][row, 1], std1, **FP32, msg=f"row {row} view 1 std")
        # the images are asymmetric, so the mirror view is a different latent (well beyond the tolerance)
        assert (tensors["latent_mean"][row, 1] - tensors["latent_mean"][row, 0]).abs().max() > 1e-2
    # every row holds its own image: neighbouring rows' posteriors differ
    for row in range(1, n):
        assert not torch.allclose(tensors["latent_mean"][row, 0], expected[row - 1][0][0], **FP32)


def test_nonsquare_rows_are_centre_cropped_not_squashed(comps, nonsquare_table, nonsquare_cache):
    """A wide image's cached view 0 is its centre square, not the whole image resized to a square."""
    row = next(i for i in range(len(nonsquare_table))
               if open_cell(nonsquare_table[i]["image"]).size == SIZES[0])
    image = open_cell(nonsquare_table[row]["image"])
    squashed = torch.from_numpy(np.asarray(image.resize((32, 32), Image.BILINEAR), dtype=np.float32) / 127.5 - 1)
    with torch.no_grad():
        wrong = comps.vae.encode(squashed.permute(2, 0, 1)[None]).latent_dist.mean[0]
    assert not torch.allclose(nonsquare_cache["latent_mean"][row, 0], wrong, rtol=1e-2, atol=1e-3)


def test_no_flip_cache_holds_one_view(comps, shapes_table, shapes_cache):
    tensors = compute_embeddings(shapes_table, shapes_cfg(random_flip=False), encoder(comps), comps.vae, "cpu", torch.float32)
    assert tensors["latent_mean"].shape == (len(shapes_table), 1, 4, 8, 8)
    torch.testing.assert_close(tensors["latent_mean"][:, 0], shapes_cache["latent_mean"][:, 0], **FP32)
    torch.testing.assert_close(tensors["latent_std"][:, 0], shapes_cache["latent_std"][:, 0], **FP32)


def test_square_images_may_be_cached_without_centre_crop(comps, shapes_table, shapes_cache):
    # a square image is resized to exactly resolution x resolution: no random crop to lose
    tensors = compute_embeddings(shapes_table, shapes_cfg(center_crop=False), encoder(comps), comps.vae, "cpu", torch.float32)
    torch.testing.assert_close(tensors["latent_mean"], shapes_cache["latent_mean"], **FP32)


def test_cached_views_are_drawn_half_and_half_when_flipping(shapes_cache):
    flipping = CachedEmbeddings(shapes_cache, random_flip=True)
    torch.manual_seed(0)
    views = []
    for _ in range(200):
        item = flipping[3]
        views.append(next(v for v in (0, 1) if torch.equal(item["latent_mean"], shapes_cache["latent_mean"][3, v])))
        assert torch.equal(item["latent_std"], shapes_cache["latent_std"][3, views[-1]])  # mean and std of one view
    assert 60 <= sum(views) <= 140
    plain = CachedEmbeddings(shapes_cache, random_flip=False)
    assert all(torch.equal(plain[3]["latent_mean"], shapes_cache["latent_mean"][3, 0]) for _ in range(20))


# --------------------------------------------------------------------------------------------
# 2. cached text embedding = text_encoder(tokenize(caption))[0]


@pytest.mark.parametrize("which", ["shapes", "nonsquare"])
def test_cached_text_embedding_equals_text_encoder_of_each_caption(request, comps, which, tokenize):
    table = request.getfixturevalue(f"{which}_table")
    tensors = request.getfixturevalue(f"{which}_cache")
    hidden = comps.text_encoders[0].config.hidden_size
    assert tensors["encoder_hidden_states"].shape == (len(table), comps.tokenizers[0].model_max_length, hidden)
    captions = table["text"]
    with torch.no_grad():
        expected = [comps.text_encoders[0](tokenize([c])["input_ids"])[0][0] for c in captions]
    for row, emb in enumerate(expected):
        torch.testing.assert_close(tensors["encoder_hidden_states"][row], emb, **FP32, msg=f"row {row}")
    assert len(set(captions)) > 1
    other = next(i for i, c in enumerate(captions) if c != captions[0])
    assert not torch.allclose(tensors["encoder_hidden_states"][0], expected[other], **FP32)


# --------------------------------------------------------------------------------------------
# errors


def test_nonsquare_image_without_centre_crop_names_row_and_fix(comps, tmp_path):
    # the only non-square image is the last row, in the second batch: the row number must be the table's
    folder = write_imagefolder(tmp_path / "data", sizes=[(32, 32), (40, 40), (48, 48), (56, 40)])
    cfg = folder_cfg(folder, center_crop=False)
    table = load_table(cfg)
    row = next(i for i in range(len(table)) if table[i]["image"]["path"].endswith("03.png"))
    cache_file = tmp_path / "cache" / "x.safetensors"
    with pytest.raises(UserError) as info:
        load_or_build(cache_file, lambda: compute_embeddings(table, cfg, encoder(comps), comps.vae, "cpu", torch.float32, batch_size=2))
    message = str(info.value)
    assert f"data set row {row}" in message and "03.png" in message and "56x40" in message
    assert "dataset.center_crop=true" in message and "dataset.cache=false" in message
    assert not cache_file.exists()


def test_skipped_undecodable_row_keeps_the_other_rows_aligned(comps, tmp_path, tokenize):
    folder = write_imagefolder(tmp_path / "data", sizes=[(40, 32), (32, 32), (32, 48), (36, 36), (48, 40)])
    (folder / "01.png").write_bytes(b"not a png")
    cfg = folder_cfg(folder, on_bad_image=OnFailure.skip)
    table = load_table(cfg)
    bad = next(i for i in range(len(table)) if table[i]["image"]["path"].endswith("01.png"))
    tensors = compute_embeddings(table, cfg, encoder(comps), comps.vae, "cpu", torch.float32,
                                 batch_size=2)
    assert tensors["skipped_rows"].tolist() == [bad]
    good = [i for i in range(len(table)) if i != bad]
    assert len(tensors["latent_mean"]) == len(tensors["encoder_hidden_states"]) == len(good)
    expected = expected_posteriors(comps.vae, table.select(good), cfg)
    with torch.no_grad():
        texts = [comps.text_encoders[0](tokenize([table[i]["text"]])["input_ids"])[0][0] for i in good]
    for k, row in enumerate(good):
        for view in (0, 1):
            torch.testing.assert_close(tensors["latent_mean"][k, view], expected[k][view][0], **FP32,
                                       msg=f"cache row {k} (table row {row}) view {view}")
        torch.testing.assert_close(tensors["encoder_hidden_states"][k], texts[k], **FP32, msg=f"cache row {k}")


# --------------------------------------------------------------------------------------------
# 3. cache_key: every setting the contents depend on, and nothing else


def test_cache_key_changes_with_every_setting_it_depends_on(tmp_path, tiny_model_path, model_cfg, comps,
                                                            shapes_table):
    model_path = resolve_model_path(model_cfg)

    def key(mcfg=model_cfg, mpath=model_path, table=shapes_table, dcfg=None, dtype=torch.float32, c=comps):
        return cache_key(mcfg, mpath, c, table, dcfg or shapes_cfg(), dtype)

    base = key()
    assert isinstance(base, str) and len(base) >= 8

    # identical settings with fresh objects (components loaded again, table read again) give the same key
    fresh = load_components(model_cfg, resolve_model_path(model_cfg), dtype=torch.float32)
    assert key(mcfg=ModelConfig(pretrained_model_name_or_path=str(tiny_model_path)), mpath=resolve_model_path(model_cfg),
               table=load_table(shapes_cfg(), seed=0), dcfg=shapes_cfg(), c=fresh) == base
    # settings the cache does not depend on leave the key alone
    assert key(dcfg=shapes_cfg(num_workers=2, drop_last=True, cache_dir=str(tmp_path))) == base

    vae_copy, vae_changed = tmp_path / "vae", tmp_path / "vae2"
    shutil.copytree(model_path / "vae", vae_copy)
    shutil.copytree(model_path / "vae", vae_changed)
    (vae_changed / "config.json").write_text((vae_copy / "config.json").read_text() + " ")  # size differs
    changed = {
        "resolution": key(dcfg=shapes_cfg(resolution=32)),
        "center_crop": key(dcfg=shapes_cfg(center_crop=False)),
        "random_flip": key(dcfg=shapes_cfg(random_flip=False)),
        "model path": key(mpath=tmp_path / "another-model"),
        "revision": key(mcfg=dataclasses.replace(model_cfg, revision="v2")),
        "another VAE (model.vae_path)": key(mcfg=dataclasses.replace(model_cfg, vae_path=str(vae_copy))),
        "the other VAE's weights changed": key(mcfg=dataclasses.replace(model_cfg, vae_path=str(vae_changed))),
        "variant": key(mcfg=dataclasses.replace(model_cfg, variant="fp16")),
        "dtype fp16": key(dtype=torch.float16),
        "dtype bf16": key(dtype=torch.bfloat16),
        "dataset path": key(dcfg=shapes_cfg(path=str(tmp_path))),
        "max_train_samples (setting)": key(dcfg=shapes_cfg(max_train_samples=5)),
        "max_train_samples (table)": key(table=load_table(shapes_cfg(max_train_samples=5), seed=0),
                                         dcfg=shapes_cfg(max_train_samples=5)),
        "split": key(dcfg=shapes_cfg(split="validation")),
        "caption column": key(dcfg=shapes_cfg(caption_column="caption")),
        "image column": key(dcfg=shapes_cfg(image_column="picture")),
        "rows picked by another seed": key(table=load_table(shapes_cfg(), seed=1)),
    }
    # a cache without the undecodable rows must not serve a run that stops on them
    changed["on_bad_image=skip"] = key(dcfg=shapes_cfg(on_bad_image=OnFailure.skip))
    same = [name for name, k in changed.items() if k == base]
    assert not same, f"cache key unchanged when these change: {same}"


def test_cache_key_follows_the_dataset_contents(tmp_path, model_cfg, comps):
    folder = write_imagefolder(tmp_path / "data")
    cfg = folder_cfg(folder)
    model_path = resolve_model_path(model_cfg)

    def key():
        return cache_key(model_cfg, model_path, comps, load_table(cfg), cfg,
                         torch.float32)

    first = key()
    assert key() == first  # read again, unchanged

    def touch_later(path: Path):  # a new mtime even on file systems with coarse timestamps
        st = path.stat()
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))

    noise_image(*SIZES[1], seed=99).save(folder / "01.png")  # same file name and size, other pixels
    touch_later(folder / "01.png")
    after_image = key()
    assert after_image != first

    meta = (folder / "metadata.jsonl").read_text().replace("a red circle", "a black circle")
    (folder / "metadata.jsonl").write_text(meta)
    touch_later(folder / "metadata.jsonl")
    assert key() not in (first, after_image)


@pytest.mark.parametrize("layout", ["save_to_disk", "parquet"])
def test_cache_key_follows_the_contents_of_saved_and_parquet_data_sets(tmp_path, model_cfg, comps, layout):
    import datasets

    def write(seed: int) -> Path:
        table = datasets.Dataset.from_dict(
            {"image": [noise_image(32, 32, seed=seed + i) for i in range(3)], "text": ["a red circle"] * 3},
            features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")}))
        root = tmp_path / layout
        if root.exists():
            shutil.rmtree(root)
        if layout == "save_to_disk":
            table.save_to_disk(str(root))
        else:
            (root / "data").mkdir(parents=True)
            table.to_parquet(str(root / "data" / "train-00000-of-00001.parquet"))
        return root

    def key(root: Path) -> str:
        cfg = folder_cfg(root)
        return cache_key(model_cfg, resolve_model_path(model_cfg), comps,
                         load_table(cfg), cfg, torch.float32)

    first = key(write(0))
    assert key(tmp_path / layout) == first  # read again, unchanged
    assert key(write(10)) != first  # same path, rows and captions; other pixels


def test_cache_key_changes_when_the_vae_weights_in_the_model_folder_change(tmp_path, tiny_model_path, shapes_table):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_path, folder)
    mcfg = ModelConfig(pretrained_model_name_or_path=str(folder))
    image = train_transform(open_cell(shapes_table[0]["image"]), 64, center_crop=True, random_flip=False)[None]

    def key_and_latent():
        c = load_components(mcfg, resolve_model_path(mcfg))
        with torch.no_grad():
            latent = c.vae.encode(image).latent_dist.mean
        return cache_key(mcfg, resolve_model_path(mcfg), c, shapes_table,
                         shapes_cfg(), torch.float32), latent, c.vae

    before, latent_before, vae = key_and_latent()
    with torch.no_grad():  # e.g. a fine-tuned VAE saved over the old one: same architecture, other weights
        for param in vae.parameters():
            param.mul_(1.25)
    vae.save_pretrained(folder / "vae")
    after, latent_after, _ = key_and_latent()
    if torch.allclose(latent_before, latent_after, rtol=1e-3, atol=1e-4):
        pytest.fail("precondition: the new VAE weights should encode the image differently")  # not an xfail
    assert after != before, "stale cache: the same key for a VAE that encodes differently"


# --------------------------------------------------------------------------------------------
# 3b. load_or_build: reuse, atomic write


def small_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"latent_mean": torch.randn(3, 2, 4, 2, 2, generator=g), "latent_std": torch.rand(3, 2, 4, 2, 2, generator=g),
            "encoder_hidden_states": torch.randn(3, 5, 8, generator=g)}


def test_load_or_build_builds_once_then_reads_the_file(tmp_path):
    path = tmp_path / "cache" / "abc.safetensors"  # the folder does not exist yet
    calls = []

    def build():
        calls.append(1)
        return small_tensors()

    first = load_or_build(path, build)
    assert len(calls) == 1 and path.is_file()
    second = load_or_build(path, build)
    assert len(calls) == 1  # read, not rebuilt
    assert set(second) == set(small_tensors())
    for name, tensor in small_tensors().items():
        assert torch.equal(first[name], tensor) and torch.equal(second[name], tensor)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_cache_file_permissions_follow_the_umask(tmp_path, umask, mode):
    """safetensors alone writes 0600: a cache folder shared by a team would be unreadable to the others."""
    previous = os.umask(umask)
    try:
        load_or_build(tmp_path / "abc.safetensors", small_tensors)
    finally:
        os.umask(previous)
    assert (tmp_path / "abc.safetensors").stat().st_mode & 0o777 == mode


def test_the_same_tensors_and_metadata_give_the_same_bytes(tmp_path):
    """safetensors keeps metadata in a HashMap (random order per process and per map): sd_lora sorts it."""
    import filecmp

    from sd_lora.files import save_safetensors

    metadata = {f"key{i}": "é" * i for i in range(20)}  # non-ASCII too: the rewritten header keeps its length
    paths = [save_safetensors(small_tensors(), tmp_path / f"{i}.safetensors", metadata=metadata) for i in range(4)]
    assert all(filecmp.cmp(paths[0], p, shallow=False) for p in paths[1:])
    header = json.loads(paths[0].read_bytes()[8:8 + int.from_bytes(paths[0].read_bytes()[:8], "little")])
    assert list(header["__metadata__"]) == sorted(metadata) and header["__metadata__"] == metadata
    from safetensors.torch import load_file

    assert all(torch.equal(load_file(paths[0])[k], v) for k, v in small_tensors().items())


def test_the_tiny_model_cache_and_the_datasets_cache_follow_the_umask_and_sd_lora_cache(tmp_path, monkeypatch):
    from conftest import write_noise_folder

    from sd_lora.data import load_table
    from sd_lora.demo import ensure_tiny_model

    previous = os.umask(0o022)
    try:
        folder = ensure_tiny_model(tmp_path / "shared")
    finally:
        os.umask(previous)
    modes = {p.stat().st_mode & 0o777 for p in folder.rglob("*")}
    assert modes == {0o755, 0o644} and folder.stat().st_mode & 0o777 == 0o755  # not mkdtemp's 0700 / 0600

    monkeypatch.delenv("HF_DATASETS_CACHE")
    monkeypatch.setenv("SD_LORA_CACHE", str(tmp_path / "sd_lora_cache"))
    data = write_noise_folder(tmp_path / "data", [((16, 16), "a"), ((16, 16), "b")])
    assert len(load_table(DatasetConfig(path=str(data)))) == 2
    assert any((tmp_path / "sd_lora_cache" / "datasets").rglob("*.arrow"))  # not under ~/.cache/huggingface
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    load_table(DatasetConfig(path=str(data)))
    assert any((tmp_path / "hf").rglob("*.arrow"))


def test_nan_in_the_cache_is_named_as_such_not_blamed_on_the_learning_rate(tmp_path):
    def with_nan():
        tensors = small_tensors()
        tensors["latent_mean"][1, 0, 0, 0, 0] = float("nan")
        return tensors

    path = tmp_path / "abc.safetensors"
    with pytest.raises(UserError, match=r"gave NaN/Inf \(latent_mean\), before any training.*precision=bf16"):
        load_or_build(path, with_nan)
    assert not path.exists()  # not written
    from safetensors.torch import save_file

    save_file(with_nan(), str(path))  # damaged on disk, or written by an older sd_lora
    with pytest.raises(UserError, match=f"the embedding cache {path} holds NaN/Inf \\(latent_mean\\).*delete the file"):
        load_or_build(path, small_tensors)


def test_load_or_build_leaves_no_file_when_the_build_fails(tmp_path):
    path = tmp_path / "abc.safetensors"

    def build():
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError):
        load_or_build(path, build)
    assert not path.exists()
    calls = []
    load_or_build(path, lambda: calls.append(1) or small_tensors())  # the next run builds it
    assert calls == [1] and path.is_file()


def test_load_or_build_never_shows_a_partial_file(tmp_path, monkeypatch):
    """A crash while the file is written (here: right after the bytes, before the rename) leaves no file at the path."""
    import safetensors.torch

    real_save = safetensors.torch.save_file
    written = []

    def save_then_crash(tensors, filename, *args, **kwargs):
        real_save(tensors, filename, *args, **kwargs)
        written.append(Path(filename))
        raise KeyboardInterrupt  # killed before the file was moved into place

    monkeypatch.setattr(safetensors.torch, "save_file", save_then_crash)
    path = tmp_path / "abc.safetensors"
    with pytest.raises(KeyboardInterrupt):
        load_or_build(path, small_tensors)
    assert written and written[0] != path  # the bytes went to another name first
    assert not path.exists()


# --------------------------------------------------------------------------------------------
# 4. end to end: python launch.py dataset.cache=true


ROWS = 4
LAUNCH = ["device=cpu", "dataset.cache=true", f"dataset.max_train_samples={ROWS}", "trainer.max_train_steps=3",
          "trainer.train_batch_size=2", "trainer.validation_prompts=[]", "trainer.checkpointing_steps=null"]


@pytest.fixture(scope="module")
def launches(tmp_path_factory, tiny_model_path):
    """Three runs sharing one cache dir: a first, the same again, and one at resolution 32."""
    root = tmp_path_factory.mktemp("cached_runs")
    cache = root / "cache"
    runs = {}
    for name, extra in (("first", []), ("again", []), ("res32", ["dataset.resolution=32"])):
        result = run_launch(*LAUNCH, *extra, f"dataset.cache_dir={cache}", f"hydra.run.dir={root / name}",
                            env={"OMP_NUM_THREADS": "1"})
        listing = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} if cache.is_dir() else {}
        runs[name] = (result, listing, root / name)
    return cache, runs


def test_first_cached_run_writes_exactly_one_cache_file(launches):
    cache, runs = launches
    result, listing, run_dir = runs["first"]
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(listing) == 1 and next(iter(listing)).endswith(".safetensors"), listing
    output = result.stdout + result.stderr
    assert f"cached latents and text embeddings of {ROWS} samples" in output
    assert "using cached latents" not in output
    report = json.loads((run_dir / "report.json").read_text())
    assert report["cache"] is True and report["global_step"] == 3 and np.isfinite(report["final_loss"])


def test_same_settings_reuse_the_cache_file(launches):
    cache, runs = launches
    result, listing, run_dir = runs["again"]
    assert result.returncode == 0, result.stdout + result.stderr
    assert listing == runs["first"][1]  # same single file, not rewritten
    output = result.stdout + result.stderr
    assert "using cached latents" in output and next(iter(listing)) in output
    assert "cached latents and text embeddings of" not in output
    report = json.loads((run_dir / "report.json").read_text())
    assert report["global_step"] == 3
    # the embeddings read back from the file train exactly as the freshly computed ones did
    first_report = json.loads((runs["first"][2] / "report.json").read_text())
    assert report["final_loss"] == pytest.approx(first_report["final_loss"], rel=1e-5)


def test_other_resolution_writes_a_second_cache_file(launches):
    from safetensors.torch import load_file

    cache, runs = launches
    result, listing, _ = runs["res32"]
    assert result.returncode == 0, result.stdout + result.stderr
    first_file = next(iter(runs["first"][1]))
    assert len(listing) == 2 and first_file in listing and listing[first_file] == runs["first"][1][first_file]
    output = result.stdout + result.stderr
    assert "using cached latents" not in output
    new_file = next(name for name in listing if name != first_file)
    at64, at32 = load_file(str(cache / first_file)), load_file(str(cache / new_file))
    assert at64["latent_mean"].shape == (ROWS, 2, 4, 8, 8) and at32["latent_mean"].shape == (ROWS, 2, 4, 4, 4)
    assert at64["encoder_hidden_states"].shape == at32["encoder_hidden_states"].shape == (ROWS, 77, 32)
    torch.testing.assert_close(at64["encoder_hidden_states"], at32["encoder_hidden_states"])  # same captions


# --------------------------------------------------------------------------------------------
# 5. the cache does not change what is trained


@pytest.mark.parametrize("noise_offset,snr_gamma", [(0.0, None), (0.1, 5.0)])
def test_train_step_loss_is_the_same_with_and_without_the_cache(comps, shapes_table, noise_offset, snr_gamma, tokenize):
    cfg = shapes_cfg(random_flip=False)
    models = StepModels(comps.unet, comps.vae, comps.text_encoders, comps.noise_scheduler, torch.float32, FAMILY)
    tensors = compute_embeddings(shapes_table, cfg, encoder(comps), comps.vae, "cpu",
                                 torch.float32)
    cached_ds, plain_ds = CachedEmbeddings(tensors, random_flip=False), CaptionedImages(shapes_table, cfg, tokenize)
    indices = [4, 1, 3]
    cached = collate([cached_ds[i] for i in indices])
    plain = collate([plain_ds[i] for i in indices])
    assert cached["index"] == plain["index"] == indices

    def loss(batch, epoch=2):
        with torch.no_grad():
            return train_step(models, batch, noise_offset, snr_gamma, sample_generators(batch["index"], 7, epoch, "cpu"))

    with_cache, without_cache = loss(cached), loss(plain)
    torch.testing.assert_close(with_cache, without_cache, rtol=1e-4, atol=1e-6)
    # the comparison can fail: other rows' embeddings under the same draws give a clearly different loss
    shuffled = collate([cached_ds[i] for i in [1, 3, 4]])
    shuffled["index"] = indices
    assert not torch.allclose(loss(shuffled), without_cache, rtol=1e-3)


def test_flipped_views_and_loss_match_the_uncached_transform(comps, shapes_table, shapes_cache, tokenize):
    """With a sample's (seed, epoch, index) key the cache picks the view the uncached transform flips to."""
    cfg = shapes_cfg()  # random_flip=true
    cached_ds, plain_ds = CachedEmbeddings(shapes_cache, random_flip=True), CaptionedImages(shapes_table, cfg, tokenize)
    upright = [train_transform(open_cell(shapes_table[i]["image"]), 64, center_crop=True, random_flip=False)
               for i in range(len(shapes_table))]
    seen = set()
    for epoch in range(4):
        for i in range(len(shapes_table)):
            pixels = plain_ds[(7, epoch, i)]["pixel_values"]
            flipped = not torch.equal(pixels, upright[i])
            assert torch.equal(pixels, torch.flip(upright[i], dims=[2]) if flipped else upright[i])
            item = cached_ds[(7, epoch, i)]
            view = int(flipped)
            assert torch.equal(item["latent_mean"], shapes_cache["latent_mean"][i, view]), (epoch, i)
            assert torch.equal(item["latent_std"], shapes_cache["latent_std"][i, view]), (epoch, i)
            seen.add(view)
    assert seen == {0, 1}  # both views occurred, so the agreement above is not trivial

    models = StepModels(comps.unet, comps.vae, comps.text_encoders, comps.noise_scheduler, torch.float32, FAMILY)
    keys = [(7, 1, i) for i in range(len(shapes_table))]
    cached, plain = collate([cached_ds[k] for k in keys]), collate([plain_ds[k] for k in keys])
    with torch.no_grad():
        losses = [train_step(models, batch, 0.0, None, sample_generators(batch["index"], 7, 1, "cpu"))
                  for batch in (cached, plain)]
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-4, atol=1e-6)


def test_a_trained_text_encoder_bypasses_the_cached_text_and_gets_gradients(tiny_model_path, shapes_table, tokenize):
    """model.lora.train_text_encoder with dataset.cache: the cached latents are used, the captions are encoded at
    each step by the text encoder being trained (with gradients), the cache file keeps the base model's embeddings."""
    from sd_lora.cache import with_live_text
    from sd_lora.config import LoraSettings
    from sd_lora.model import add_text_lora, lora_off

    cfg = shapes_cfg(random_flip=False)
    parts = load_components(ModelConfig(pretrained_model_name_or_path=str(tiny_model_path)), tiny_model_path)
    (text_encoder,) = parts.text_encoders
    base_cache = compute_embeddings(shapes_table, cfg, encoder(parts), parts.vae, "cpu", torch.float32)
    params = add_text_lora(parts.text_encoders, LoraSettings(rank=4, train_text_encoder=True))
    parts.text_trained = True
    with torch.no_grad():
        for p in params:  # as if trained a while: B is no longer zero
            p.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    with lora_off(text_encoder):  # what the trainer builds the shared cache under
        tensors = compute_embeddings(shapes_table, cfg, encoder(parts), parts.vae, "cpu", torch.float32)
    torch.testing.assert_close(tensors["encoder_hidden_states"], base_cache["encoder_hidden_states"])
    live = with_live_text(tensors, FAMILY.condition_keys, tokenize, shapes_table, "text")
    assert "encoder_hidden_states" not in live and live["input_ids"].dtype == torch.int64

    models = StepModels(parts.unet, parts.vae, parts.text_encoders, parts.noise_scheduler, torch.float32, FAMILY,
                        text_trained=True)
    indices = [4, 1, 3]
    cached = collate([CachedEmbeddings(live, random_flip=False)[i] for i in indices])
    plain = collate([CaptionedImages(shapes_table, cfg, tokenize)[i] for i in indices])
    stale = collate([CachedEmbeddings(tensors, random_flip=False)[i] for i in indices])

    def loss(batch):
        return train_step(models, batch, 0.0, None, sample_generators(batch["index"], 7, 0, "cpu"))

    with_cache = loss(cached)
    with_cache.backward()
    assert all(p.grad is not None for p in params) and any(p.grad.abs().sum() > 0 for p in params)
    with torch.no_grad():
        torch.testing.assert_close(with_cache, loss(plain), rtol=1e-4, atol=1e-6)
        assert not torch.allclose(loss(stale), with_cache, rtol=1e-3)  # the cached embeddings would be stale


def test_bucketed_cache_holds_each_image_at_its_bucket_and_batches_like_the_images(comps, tmp_path, tokenize):
    """dataset.buckets with the cache: each row's posterior is the VAE's of its bucket-sized centre crop, rows of two
    buckets batched in a chunk keep their order, and the cached data set batches by the same buckets, with each
    sample's original size and crop, as the uncached one."""
    from sd_lora.data import BucketBatches, build_dataloader

    sizes = [(100, 36), (64, 60), (96, 34), (40, 44), (30, 90)]
    folder = write_noise_folder(tmp_path / "data", [(size, f"image {i}") for i, size in enumerate(sizes)])
    cfg = folder_cfg(folder, resolution=64, buckets=True, bucket_step=32, center_crop=True)
    table = load_table(cfg)
    tensors = compute_embeddings(table, cfg, encoder(comps), comps.vae, "cpu", torch.float32, batch_size=3)
    cached = CachedEmbeddings(tensors, random_flip=True)
    images = CaptionedImages(table, cfg, tokenize)
    assert [cached.buckets[b] for b in cached.bucket_of] == [images.buckets[b] for b in images.bucket_of]
    for row in range(len(table)):
        pixels, crop = sd_lora.data.bucket_transform(open_cell(table[row]["image"]),
                                                     images.buckets[images.bucket_of[row]], True, False)
        with torch.no_grad():
            expected = comps.vae.encode(pixels[None]).latent_dist.mean[0]
        torch.testing.assert_close(cached.mean[row][0], expected, **FP32)
        item, uncached = cached[(0, 0, row)], images[(0, 0, row)]
        assert torch.equal(item["original_size"], uncached["original_size"])
        assert torch.equal(item["crop_top_left"], torch.tensor(crop))
    loader = build_dataloader(cached, batch_size=2, num_workers=0, seed=0)
    assert isinstance(loader.batch_sampler, BucketBatches)
    assert loader.batch_sampler.counts == build_dataloader(images, 2, 0, 0).batch_sampler.counts
    shapes = {tuple(batch["latent_mean"].shape[-2:]) for batch in loader}  # each batch stacks one bucket's rows
    assert shapes == {(h // 8, w // 8) for w, h in cached.buckets} and len(shapes) >= 2
    with pytest.raises(UserError, match="set dataset.center_crop=true, or dataset.cache=false"):
        DatasetConfig(path="d", buckets=True, cache=True, center_crop=False)
