"""sd_lora.data on real PIL images, real `datasets` tables on disk and the tiny pipeline's CLIPTokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from conftest import noise, noise_image
from PIL import Image

import sd_lora
from sd_lora.config import DatasetConfig
from sd_lora.data import CaptionedImages, build_dataloader, load_table, pick_caption, train_transform
from sd_lora.demo import write_shapes
from sd_lora.errors import UserError

SHAPES = Path(sd_lora.__file__).parent / "assets" / "shapes"

# solid colours of different sizes/orientations; the caption names the colour, so a row's pixels
# tell whether image and caption stayed together
ROWS = [
    ("red", (255, 0, 0), (20, 12)),
    ("green", (0, 255, 0), (12, 20)),
    ("blue", (0, 0, 255), (16, 16)),
    ("yellow", (255, 255, 0), (24, 16)),
]


@pytest.fixture(scope="module", autouse=True)
def datasets_cache(tmp_path_factory):
    """Keep the arrow caches `load_dataset` writes out of the user's ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.mktemp("hf_datasets_cache"))
        yield


def solid(colour, size) -> Image.Image:
    return Image.new("RGB", size, colour)


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """CHW in [-1, 1] -> HWC uint8."""
    return np.rint((pixels.permute(1, 2, 0).numpy() + 1.0) * 127.5).astype(np.int64)


# --------------------------------------------------------------------------------------------
# data sets on disk in the three layouts load_table reads


def write_imagefolder(root: Path, rows=ROWS) -> Path:
    root.mkdir(parents=True)
    with open(root / "metadata.jsonl", "w") as f:
        for i, (name, colour, size) in enumerate(rows):
            solid(colour, size).save(root / f"{i:02d}.png")
            f.write(json.dumps({"file_name": f"{i:02d}.png", "text": f"a {name} square"}) + "\n")
    return root


def rows_dataset(rows=ROWS) -> datasets.Dataset:
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    return datasets.Dataset.from_dict(
        {"image": [solid(c, s) for _, c, s in rows], "text": [f"a {n} square" for n, _, _ in rows]},
        features=features,
    )


def write_save_to_disk(root: Path) -> Path:
    rows_dataset().save_to_disk(str(root))
    return root


def write_hub_layout(root: Path) -> Path:
    (root / "data").mkdir(parents=True)
    rows_dataset().to_parquet(str(root / "data" / "train-00000-of-00001.parquet"))
    return root


def write_caption_files(root: Path, rows=ROWS) -> Path:
    """kohya's layout: a.png + a.txt, some in a subfolder; a hidden folder's images are not data."""
    (root / "sub").mkdir(parents=True)
    (root / ".thumbs").mkdir()
    for i, (name, colour, size) in enumerate(rows):
        image = root / ("sub" if i % 2 else "") / f"{i:02d}.png"
        solid(colour, size).save(image)
        image.with_suffix(".txt").write_text(f"a {name} square\n")
    solid((1, 2, 3), (8, 8)).save(root / ".thumbs" / "x.png")
    return root


LAYOUTS = {"imagefolder": write_imagefolder, "save_to_disk": write_save_to_disk, "hub_layout": write_hub_layout,
           "caption_files": write_caption_files}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_load_table_and_captioned_images(layout, tmp_path, tokenizer, tokenize):
    path = LAYOUTS[layout](tmp_path / layout)
    cfg = DatasetConfig(path=str(path), resolution=8, center_crop=True, random_flip=False,
                        caption_files=layout == "caption_files")
    table = load_table(cfg)

    assert len(table) == len(ROWS)
    assert {"image", "text"} <= set(table.column_names)
    # images are left undecoded, so a broken file is only met (and named) when its row is fetched
    assert isinstance(table.features["image"], datasets.Image) and table.features["image"].decode is False

    items = CaptionedImages(table, cfg, tokenize)
    assert len(items) == len(ROWS)
    colours = {f"a {n} square": c for n, c, _ in ROWS}
    seen = set()
    for i in range(len(items)):
        item = items[i]
        assert set(item) == {"pixel_values", "input_ids", "index", "original_size", "crop_top_left",
                             "target_size"} and item["index"] == i
        pixels, ids = item["pixel_values"], item["input_ids"]
        assert pixels.shape == (3, 8, 8) and pixels.dtype == torch.float32
        assert ids.shape == (tokenizer.model_max_length,) and ids.dtype == torch.int64
        caption = tokenizer.decode(ids, skip_special_tokens=True).strip()
        assert caption in colours
        assert ids.tolist() == tokenizer(caption, max_length=tokenizer.model_max_length,
                                         padding="max_length", truncation=True).input_ids
        # the image of this row, not another one's
        assert (to_uint8(pixels) == np.array(colours[caption])).all(), (i, caption)
        # SDXL's size conditioning: the size before the resize (h, w), the centre crop's offset, the square
        w, h = next(size for n, _, size in ROWS if f"a {n} square" == caption)
        assert item["original_size"].tolist() == [h, w] and item["target_size"].tolist() == [8, 8]
        short = min(w, h)
        assert item["crop_top_left"].tolist() == [round((h * 8 // short - 8) / 2), round((w * 8 // short - 8) / 2)]
        seen.add(caption)
    assert seen == set(colours)

    batch = next(iter(build_dataloader(items, batch_size=3, num_workers=0, seed=0)))
    assert batch["pixel_values"].shape == (3, 3, 8, 8)
    assert batch["input_ids"].shape == (3, tokenizer.model_max_length)
    assert len(batch["index"]) == 3 and len(set(batch["index"])) == 3  # sample indices travel with the batch


def test_load_table_picks_split_of_saved_dataset_dict(tmp_path):
    full = rows_dataset()
    datasets.DatasetDict({"train": full.select([0, 1, 2]), "test": full.select([3])}).save_to_disk(str(tmp_path / "dd"))
    table = load_table(DatasetConfig(path=str(tmp_path / "dd"), split="test"))
    assert table["text"] == ["a yellow square"]
    with pytest.raises(UserError) as info:
        load_table(DatasetConfig(path=str(tmp_path / "dd"), split="validation"))
    assert "dataset.split='validation'" in str(info.value)
    assert "['train', 'test']" in str(info.value)


def test_load_table_unknown_split_of_hub_layout(tmp_path):
    path = write_hub_layout(tmp_path / "hub")
    with pytest.raises(UserError) as info:
        load_table(DatasetConfig(path=str(path), split="validation"))
    assert "dataset.split='validation'" in str(info.value)
    assert "['train']" in str(info.value)


def test_bundled_shapes_load(tokenize):
    table = load_table(DatasetConfig(path=str(SHAPES), resolution=64, center_crop=True))
    metadata = [json.loads(line) for line in (SHAPES / "metadata.jsonl").read_text().splitlines()]
    assert len(table) == len(metadata)
    # imagefolder pairs each file with its own caption
    caption_of = {m["file_name"]: m["text"] for m in metadata}
    for row in table.select(range(0, len(table), 17)):
        assert row["text"] == caption_of[Path(row["image"]["path"]).name]
    item = CaptionedImages(table, DatasetConfig(path=str(SHAPES), resolution=64, center_crop=True), tokenize)[0]
    assert item["pixel_values"].shape == (3, 64, 64)


# --------------------------------------------------------------------------------------------
# errors


def test_missing_folder_with_source_repo_names_download_command(tmp_path):
    missing = tmp_path / "nowhere" / "pokemon"
    with pytest.raises(UserError) as info:
        load_table(DatasetConfig(path=str(missing), source_repo="someone/some-captions"))
    text = str(info.value)
    assert f"dataset.path={str(missing)!r}" in text
    assert str(missing) in text.split("folder not found at", 1)[1]
    assert f"hf download someone/some-captions --repo-type dataset --local-dir {missing}" in text


def test_missing_folder_without_source_repo_says_where_to_put_it(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(UserError) as info:
        load_table(DatasetConfig(path=str(missing)))
    assert f"folder not found at {missing}; point dataset.path at an existing folder" in str(info.value)
    assert "hf download" not in str(info.value)


def test_a_withdrawn_source_says_so_instead_of_a_download_that_fails(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as info:  # a hub id, not in the cache: no hub lookup, no download command
        load_table(DatasetConfig(path="lambdalabs/pokemon-blip-captions", missing_hint="it was taken down"))
    assert str(info.value).endswith("is not in the local hub cache (revision main); it was taken down")
    assert "hf download" not in str(info.value)


def test_missing_relative_folder_shaped_like_hub_id_uses_source_repo(tmp_path, monkeypatch):
    # the pokemon experiment's case: a relative folder `pokemon/pokemon_blip_captions` that is a copy
    # of another hub repo; the hint must download that repo into the folder
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as info:
        load_table(DatasetConfig(path="pokemon/pokemon_blip_captions", source_repo="lambdalabs/pokemon-blip-captions"))
    assert ("hf download lambdalabs/pokemon-blip-captions --repo-type dataset "
            "--local-dir pokemon/pokemon_blip_captions") in str(info.value)
    assert str(tmp_path / "pokemon" / "pokemon_blip_captions") in str(info.value)


def test_hub_id_not_in_cache_names_download_command(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as info:
        load_table(DatasetConfig(path="nobody-sd-lora-test/no-such-dataset"))
    text = str(info.value)
    assert "not in the local hub cache" in text
    assert "hf download nobody-sd-lora-test/no-such-dataset --repo-type dataset" in text


def test_folder_without_data(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError) as info:
        load_table(DatasetConfig(path=str(tmp_path / "empty")))
    assert "could not read a data set" in str(info.value)
    assert str(tmp_path / "empty") in str(info.value)


@pytest.mark.parametrize("key,field", [("dataset.caption_column", "caption_column"), ("dataset.image_column", "image_column")])
def test_wrong_column_lists_available_columns(tmp_path, key, field):
    path = write_save_to_disk(tmp_path / "std")
    with pytest.raises(UserError) as info:
        load_table(DatasetConfig(path=str(path), **{field: "caption"}))
    text = str(info.value)
    assert f"{key}='caption' is not a column" in text
    assert str(rows_dataset().column_names) in text  # ['image', 'text']


def test_max_train_samples(tmp_path):
    path = write_save_to_disk(tmp_path / "std")
    all_captions = set(rows_dataset()["text"])
    two = load_table(DatasetConfig(path=str(path), max_train_samples=2), seed=3)
    assert len(two) == 2
    assert len(set(two["text"])) == 2 and set(two["text"]) <= all_captions
    assert load_table(DatasetConfig(path=str(path), max_train_samples=2), seed=3)["text"] == two["text"]
    # a seeded shuffle before the cut: over a few seeds, not always the first two rows
    firsts = {tuple(load_table(DatasetConfig(path=str(path), max_train_samples=2), seed=s)["text"]) for s in range(6)}
    assert len(firsts) > 1
    # more than there are: all rows
    assert len(load_table(DatasetConfig(path=str(path), max_train_samples=100))) == len(ROWS)
    assert len(load_table(DatasetConfig(path=str(path)))) == len(ROWS)


def test_undecodable_image_named_by_row_and_file(tmp_path, tokenize):
    root = write_imagefolder(tmp_path / "imgf")
    (root / "broken.png").write_bytes(b"this is not a png at all")
    with open(root / "metadata.jsonl", "a") as f:
        f.write(json.dumps({"file_name": "broken.png", "text": "a broken square"}) + "\n")
    cfg = DatasetConfig(path=str(root), resolution=8, center_crop=True)
    table = load_table(cfg)  # undecoded: loading does not trip on it
    assert len(table) == len(ROWS) + 1
    bad = [i for i, row in enumerate(table) if row["image"]["path"].endswith("broken.png")]
    assert len(bad) == 1
    items = CaptionedImages(table, cfg, tokenize)
    for i in range(len(items)):
        if i != bad[0]:
            assert items[i]["pixel_values"].shape == (3, 8, 8)
    with pytest.raises(UserError) as info:
        items[bad[0]]
    text = str(info.value)
    assert f"data set row {bad[0]} " in text
    assert str(root / "broken.png") in text
    assert "cannot be decoded" in text


def test_pick_caption():
    assert pick_caption("a cat", 0, "text") == "a cat"
    assert {pick_caption(["a", "b"], 0, "text") for _ in range(50)} == {"a", "b"}
    with pytest.raises(UserError, match=r"row 7: caption column 'label' holds int"):
        pick_caption(3, 7, "label")


# --------------------------------------------------------------------------------------------
# train_transform


def test_transform_shape_dtype_and_range():
    R = 16
    array = np.zeros((R, R, 3), np.uint8)
    array[:, R // 2:] = 255  # left half black, right half white
    out = train_transform(Image.fromarray(array), R, center_crop=True, random_flip=False)
    assert out.shape == (3, R, R) and out.dtype == torch.float32
    assert out.min().item() == -1.0 and out.max().item() == 1.0
    assert (out[:, :, : R // 2] == -1).all() and (out[:, :, R // 2:] == 1).all()
    # CHW layout and the x/127.5 - 1 scale, on an image that needs neither resize nor crop
    pixels = noise(R, R)
    out = train_transform(Image.fromarray(pixels), R, center_crop=True, random_flip=False)
    assert out.min() >= -1 and out.max() <= 1
    np.testing.assert_allclose(out.numpy(), pixels.transpose(2, 0, 1) / 127.5 - 1.0, atol=1e-6)


@pytest.mark.parametrize("tall", [False, True])
def test_transform_resizes_short_side_and_centre_crops(tall):
    R = 32
    # 4R x 2R: red | green | blue columns of widths R, 2R, R, and a white stripe over the top quarter
    # of the green band. Short side to R gives 2R x R, whose centre crop is exactly the green band:
    # white over rows [0, R/4), green below, no red or blue. (A squash would keep red and blue; a crop
    # without the resize would miss the stripe.)
    a = np.zeros((2 * R, 4 * R, 3), np.uint8)
    a[:, :R] = (255, 0, 0)
    a[:, R:3 * R] = (0, 255, 0)
    a[:, 3 * R:] = (0, 0, 255)
    a[: R // 2, R:3 * R] = (255, 255, 255)
    if tall:
        a = a.transpose(1, 0, 2).copy()
    out = to_uint8(train_transform(Image.fromarray(a), R, center_crop=True, random_flip=False))
    if tall:
        out = out.transpose(1, 0, 2)
    assert out.shape == (R, R, 3)
    inner = slice(2, R - 2)  # bilinear antialiasing blends a pixel or two at colour edges
    assert (out[: R // 4 - 2, inner] == 255).all()  # stripe kept at its scaled height
    assert (out[R // 4 + 2:, inner] == (0, 255, 0)).all()
    # edge columns: green dominates, never the cropped-away red/blue
    edges = out[R // 4 + 2:, [0, 1, R - 2, R - 1]]
    assert (edges[..., 1] >= 192).all() and (edges[..., 0] < 64).all() and (edges[..., 2] < 64).all()


def test_centre_crop_is_deterministic():
    image = Image.fromarray(noise(48, 30))  # needs a resize and a crop
    first = train_transform(image, 16, center_crop=True, random_flip=False)
    for seed in range(3):
        again = train_transform(image, 16, True, False, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(first, again)


@pytest.mark.parametrize("width,height", [(48, 16), (16, 48)])
def test_random_crop_is_a_window_chosen_by_the_generator(width, height):
    R = 16
    pixels = noise(width, height, seed=1)  # short side already R: the crop is a window of `pixels`
    image = Image.fromarray(pixels)
    offsets = []
    for seed in range(8):
        out = train_transform(image, R, False, False, generator=torch.Generator().manual_seed(seed))
        got = to_uint8(out)
        windows = [o for o in range(max(width, height) - R + 1)
                   if np.array_equal(got, pixels[:, o:o + R] if width > height else pixels[o:o + R, :])]
        assert len(windows) == 1, f"seed {seed}: not a window of the image"
        offsets.append(windows[0])
        again = train_transform(image, R, False, False, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(out, again)  # same generator state, same crop
    assert len(set(offsets)) > 1


def test_random_flip_flips_about_half_the_time():
    R = 8
    image = Image.fromarray(noise(R, R, seed=2))  # asymmetric: its mirror differs
    plain = train_transform(image, R, center_crop=True, random_flip=False)
    mirror = plain.flip(-1)
    assert not torch.equal(plain, mirror)
    generator = torch.Generator().manual_seed(0)
    flips, draws = 0, 400
    for _ in range(draws):
        out = train_transform(image, R, center_crop=True, random_flip=True, generator=generator)
        if torch.equal(out, mirror):
            flips += 1
        else:
            assert torch.equal(out, plain)
    assert 0.4 * draws < flips < 0.6 * draws


def test_no_random_flip_never_flips():
    R = 8
    image = Image.fromarray(noise(R, R, seed=2))
    plain = train_transform(image, R, center_crop=True, random_flip=False)
    generator = torch.Generator().manual_seed(0)
    for _ in range(100):
        assert torch.equal(train_transform(image, R, True, False, generator=generator), plain)
    # random crop without flip: never the mirror of a window (on a square image the window is the image)
    for _ in range(20):
        assert torch.equal(train_transform(image, R, False, False, generator=generator), plain)


# --------------------------------------------------------------------------------------------
# bundled shapes data


def test_bundled_shapes_match_generator(tmp_path):
    regenerated = write_shapes(tmp_path / "shapes")
    bundled_pngs = sorted(p.name for p in SHAPES.glob("*.png"))
    assert bundled_pngs == sorted(p.name for p in regenerated.glob("*.png"))
    assert len(bundled_pngs) == len((SHAPES / "metadata.jsonl").read_text().splitlines())
    for name in bundled_pngs:
        with Image.open(SHAPES / name) as a, Image.open(regenerated / name) as b:
            assert a.size == b.size
            assert np.array_equal(np.asarray(a.convert("RGB")), np.asarray(b.convert("RGB"))), name
    assert (SHAPES / "metadata.jsonl").read_text().splitlines() == \
        (regenerated / "metadata.jsonl").read_text().splitlines()


def test_load_tables_reads_once_what_the_training_loader_gives_and_holds_out_the_rest():
    from collections import Counter

    from sd_lora.data import load_tables

    cfg = DatasetConfig(path=str(SHAPES), resolution=64, validation_split=0.2, max_train_samples=50)
    train, held_out = load_tables(cfg, seed=3, validation_seed=5)
    assert train["text"] == load_table(cfg, seed=3, validation_seed=5)["text"]
    assert len(train) == 50 and len(held_out) == 18  # 20% of 90 held out, never trained on
    # the held-out rows are exactly the rows the training side of the split leaves out
    everything = load_table(DatasetConfig(path=str(SHAPES), resolution=64))
    trainable = load_table(DatasetConfig(path=str(SHAPES), resolution=64, validation_split=0.2), validation_seed=5)
    assert Counter(trainable["text"]) + Counter(held_out["text"]) == Counter(everything["text"])
    assert load_tables(cfg, seed=3, validation_seed=5)[1]["text"] == held_out["text"]  # the seed fixes them
    assert load_tables(cfg, seed=3, validation_seed=6)[1]["text"] != held_out["text"]
    assert load_tables(DatasetConfig(path=str(SHAPES)))[1] is None


# --------------------------------------------------------------------------------------------
# image modes: what PIL's convert("RGB") alone gets wrong


def png_cell(image: Image.Image, fmt: str = "PNG") -> dict:
    import io

    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return {"bytes": buffer.getvalue(), "path": f"x.{fmt.lower()}"}


def pixels(cell, alpha=None) -> list[tuple]:
    from sd_lora.config import Alpha
    from sd_lora.data import decode_image

    image = decode_image(cell, "row 0", alpha or Alpha.white)
    assert image.mode == "RGB"
    return [tuple(int(c) for c in p) for p in np.asarray(image).reshape(-1, 3)]


def test_sixteen_bit_palette_and_cmyk_images_decode_to_their_colours():
    grey16 = Image.fromarray(np.array([[0, 257 * 128, 65535, 1000]], dtype=np.uint16))  # a 16-bit grayscale PNG
    decoded = png_cell(grey16)
    assert Image.open(__import__("io").BytesIO(decoded["bytes"])).mode.startswith("I")
    assert pixels(decoded) == [(0, 0, 0), (128, 128, 128), (255, 255, 255), (4, 4, 4)]  # was all but the first white
    palette = Image.new("P", (2, 1))
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.putpixel((1, 0), 1)
    assert pixels(png_cell(palette)) == [(255, 0, 0), (0, 0, 255)]
    cmyk = Image.new("CMYK", (3, 1))
    for x, ink in enumerate([(255, 0, 0, 0), (0, 255, 255, 0), (0, 0, 0, 255)]):
        cmyk.putpixel((x, 0), ink)
    assert pixels(png_cell(cmyk, "TIFF")) == [(0, 255, 255), (255, 0, 0), (0, 0, 0)]  # cyan, red, black


def test_transparent_images_are_composited_as_dataset_alpha_says(tokenize):
    from sd_lora.config import Alpha

    rgba = Image.new("RGBA", (3, 1))
    for x, value in enumerate([(255, 0, 0, 0), (255, 0, 0, 128), (0, 255, 0, 255)]):  # hidden red, half red, green
        rgba.putpixel((x, 0), value)

    def over(colour, background, a):  # straight alpha over an opaque background
        return tuple(round((c * a + b * (255 - a)) / 255) for c, b in zip(colour, background))

    for alpha, background in ((Alpha.white, (255, 255, 255)), (Alpha.black, (0, 0, 0))):
        expected = [over((255, 0, 0), background, 0), over((255, 0, 0), background, 128), (0, 255, 0)]
        got = pixels(png_cell(rgba), alpha)
        assert all(abs(g - e) <= 1 for gp, ep in zip(got, expected) for g, e in zip(gp, ep)), (alpha, got, expected)
    assert pixels(png_cell(rgba), Alpha.ignore) == [(255, 0, 0), (255, 0, 0), (0, 255, 0)]  # the old behaviour
    la = Image.new("LA", (2, 1))
    la.putpixel((0, 0), (0, 0))
    la.putpixel((1, 0), (50, 255))
    assert pixels(png_cell(la)) == [(255, 255, 255), (50, 50, 50)]
    keyed = Image.new("P", (2, 1))
    keyed.putpalette([10, 20, 30, 200, 100, 0] + [0] * 762)
    keyed.putpixel((1, 0), 1)
    keyed.info["transparency"] = 0  # palette index 0 is transparent
    assert pixels(png_cell(keyed), Alpha.black) == [(0, 0, 0), (200, 100, 0)]
    # the training rows use dataset.alpha
    table = datasets.Dataset.from_dict({"image": [png_cell(rgba.resize((8, 8)))], "text": ["a"]})
    for alpha, corner in ((Alpha.white, 1.0), (Alpha.black, -1.0)):
        item = CaptionedImages(table, DatasetConfig(path="d", resolution=8, center_crop=True, alpha=alpha), tokenize)[0]
        assert item["pixel_values"][:, 0, 0].tolist() == [corner] * 3  # the hidden red is not what trains


def test_captions_longer_than_the_tokenizer_takes_are_counted_and_warned_about_once(tokenizer, caplog):
    from sd_lora.data import long_captions

    limit = tokenizer.model_max_length
    long = " ".join(["red"] * (limit + 5))
    table = datasets.Dataset.from_dict({"text": ["a red square", long, "blue " * (limit - 2), long]})
    several = datasets.Dataset.from_dict({"text": [["short", long], ["a", "b"]]})  # one of a row's captions is cut
    assert long_captions(several, DatasetConfig(path="d"), (tokenizer,)) == [0]
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert long_captions(table, DatasetConfig(path="d"), (tokenizer,)) == [1, 3]
    assert caplog.text.count(f"2 of 4 training rows have a caption longer than the text encoder's {limit} tokens") == 1
    assert "rows [1, 3]" in caplog.text


# captions: kohya's caption files, caption dropout and tag shuffling


def test_caption_files_missing_one_is_named_and_an_edit_changes_the_fingerprint(tmp_path):
    path = write_caption_files(tmp_path / "data")
    cfg = DatasetConfig(path=str(path), caption_files=True)
    before = load_table(cfg)._fingerprint
    assert load_table(cfg)._fingerprint == before  # the embedding cache's key is stable
    (path / "02.txt").write_text("a blue square, edited")
    assert load_table(cfg)._fingerprint != before  # and follows the captions (and each image's size and time)
    (path / "sub" / "01.txt").unlink()
    with pytest.raises(UserError, match=r"1 of 4 images have no .txt caption beside them \(the first is .*01.png\)"):
        load_table(cfg)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="no images"):
        load_table(DatasetConfig(path=str(empty), caption_files=True))


def test_shuffled_tags_keep_the_first_ones_and_follow_the_sample_key():
    from sd_lora.data import caption_variant

    caption = "a corgi, red, blue, green, yellow, white, black, grass, sky"
    tags = caption.split(", ")
    cfg = DatasetConfig(path="d", shuffle_tags=True, keep_tags=1)
    seen = set()
    for epoch in range(8):
        shuffled = caption_variant(caption, cfg, (0, epoch, 3))
        assert shuffled == caption_variant(caption, cfg, (0, epoch, 3))  # a function of the key: resume is exact
        parts = shuffled.split(", ")
        assert parts[0] == "a corgi" and sorted(parts) == sorted(tags)
        seen.add(shuffled)
    assert len(seen) > 4  # and it does vary with the epoch
    assert caption_variant(caption, DatasetConfig(path="d"), (0, 0, 3)) == caption  # off: untouched


def test_caption_dropout_drops_the_same_samples_with_and_without_the_cache(tokenize):
    """The uncached data set tokenizes the empty caption, the cached one puts in the empty caption's embedding:
    for the same (seed, epoch, index) keys, at about the configured rate."""
    from sd_lora.cache import CachedEmbeddings

    rows = [("red", (255, 0, 0), (8, 8))] * 40
    table = datasets.Dataset.from_dict({"image": [solid(c, s) for _, c, s in rows], "text": ["a red square"] * 40})
    cfg = DatasetConfig(path="d", resolution=8, center_crop=True, caption_dropout=0.3)
    images = CaptionedImages(table, cfg, tokenize)
    empty_ids = tokenize([""])["input_ids"][0]
    cached = CachedEmbeddings({"latent_mean": torch.zeros(40, 1, 4, 1, 1), "latent_std": torch.ones(40, 1, 4, 1, 1),
                               "encoder_hidden_states": torch.ones(40, 2, 3)}, random_flip=False,
                              caption_dropout=0.3, empty_caption={"encoder_hidden_states": torch.zeros(1, 2, 3)})
    keys = [(0, epoch, i) for epoch in range(3) for i in range(40)]
    dropped = [torch.equal(images[k]["input_ids"], empty_ids) for k in keys]
    assert dropped == [not cached[k]["encoder_hidden_states"].any() for k in keys]
    assert 0.2 < sum(dropped) / len(keys) < 0.4
    assert not any(torch.equal(CaptionedImages(table, DatasetConfig(path="d", resolution=8, center_crop=True),
                                               tokenize)[k]["input_ids"], empty_ids) for k in keys[:20])


def test_shuffling_tags_with_the_embedding_cache_is_refused():
    with pytest.raises(UserError, match="set dataset.cache=false to shuffle tags"):
        DatasetConfig(path="d", shuffle_tags=True, cache=True)
    DatasetConfig(path="d", caption_dropout=0.1, cache=True)  # dropout works with the cache


# --------------------------------------------------------------------------------------------
# aspect-ratio buckets


def test_buckets_hold_the_pixel_budget_and_crop_an_image_only_by_the_rounding():
    from sd_lora.data import bucket_transform, make_buckets, nearest_bucket

    cfg = DatasetConfig(path="d", resolution=512, buckets=True, center_crop=True)
    buckets = make_buckets(cfg)
    assert (512, 512) in buckets and all((h, w) in buckets for w, h in buckets)  # both orientations
    assert all(w % 64 == 0 and h % 64 == 0 and 256 <= min(w, h) and max(w, h) <= 1024 for w, h in buckets)
    assert all(512 * 512 - 64 * max(w, h) < w * h <= 512 * 512 for w, h in buckets)  # about the square's pixels

    def lost(size, bucket):  # the fraction of the image a crop to the bucket's aspect ratio loses
        ratio = (size[0] / size[1]) / (bucket[0] / bucket[1])
        return 1 - min(ratio, 1 / ratio)

    for size in [(1000, 500), (333, 1000), (640, 480), (512, 512), (1920, 1080), (300, 290), (2000, 260)]:
        bucket = buckets[nearest_bucket(size, buckets)]
        pixels, (top, left) = bucket_transform(noise_image(*size), bucket, center_crop=True, random_flip=False)
        assert pixels.shape == (3, bucket[1], bucket[0])
        # no bucket would crop less, and far less than the square crop of dataset.buckets=false
        assert lost(size, bucket) == pytest.approx(min(lost(size, b) for b in buckets))
        assert lost(size, bucket) <= lost(size, (512, 512))
        scale = max(bucket[0] / size[0], bucket[1] / size[1])  # the resized image covers the bucket, no more
        assert 2 * top <= round(size[1] * scale) - bucket[1] + 1 and 2 * left <= round(size[0] * scale) - bucket[0] + 1


def test_bucket_batches_give_every_process_the_same_bucket_each_step_and_resume_exactly():
    from accelerate.data_loader import BatchSamplerShard, SkipBatchSampler

    from sd_lora.data import BucketBatches

    bucket_of = [0] * 11 + [1] * 6 + [2] * 1 + [3] * 5  # 23 rows in 4 buckets; 4 rows per step
    buckets = [(64, 64), (96, 32), (32, 96), (128, 32)]

    def per_process(epoch, drop_last=False, skip=0):
        out = []
        for rank in range(2):
            batches = BucketBatches(bucket_of, buckets, batch_size=2, seed=3, num_processes=2, drop_last=drop_last)
            batches.epoch = epoch
            shard = BatchSamplerShard(batches, num_processes=2, process_index=rank)
            out.append([[i for _, _, i in b] for b in (SkipBatchSampler(shard, skip) if skip else shard)])
        return out

    for drop_last in (False, True):
        rank0, rank1 = per_process(1, drop_last)
        assert len(rank0) == len(rank1) == len(BucketBatches(bucket_of, buckets, 2, 3, 2, drop_last)) // 2
        for a, b in zip(rank0, rank1):  # each step one bucket on both processes
            assert len({bucket_of[i] for i in a + b}) == 1
        seen = [i for batch in rank0 + rank1 for i in batch]
        assert len(seen) == len(set(seen))  # no row twice in an epoch
        # a bucket's last rows are split over the two processes (11 = 4 + 4 + 1|2); fewer rows than processes cannot
        # be (bucket 2's one, bucket 3's fifth); drop_last drops every last step short of 4 rows (which rows: the
        # epoch's order)
        per_bucket = {b: sum(bucket_of[i] == b for i in seen) for b in range(4)}
        assert per_bucket == ({0: 8, 1: 4, 2: 0, 3: 4} if drop_last else {0: 11, 1: 6, 2: 0, 3: 4})
        assert {len(b) for b in rank0 + rank1} == ({2} if drop_last else {1, 2})
    assert per_process(1) == per_process(1) and per_process(1) != per_process(2)  # a function of (seed, epoch)
    # a resumed process skips the batches already trained and goes on with the same ones
    assert per_process(1, skip=2) == [rank[2:] for rank in per_process(1)]


def test_bucketed_samples_keep_their_size_and_crop_and_batch_together(tokenize):
    from sd_lora.data import BucketBatches, collate

    rows = [("red", (255, 0, 0), (100, 36)), ("green", (0, 255, 0), (64, 60)), ("blue", (0, 0, 255), (96, 34))]
    table = rows_dataset(rows)
    cfg = DatasetConfig(path="d", resolution=64, buckets=True, bucket_step=32, random_flip=True)
    items = CaptionedImages(table, cfg, tokenize)
    assert [items.buckets[b] for b in items.bucket_of] == [(96, 32), (64, 64), (96, 32)]
    loader = build_dataloader(items, batch_size=2, num_workers=0, seed=0)
    assert isinstance(loader.batch_sampler, BucketBatches) and loader.batch_sampler.counts == {"64x64": 1, "96x32": 2}
    shapes = sorted(tuple(b["pixel_values"].shape) for b in loader)
    assert shapes == [(1, 3, 64, 64), (2, 3, 32, 96)]
    item = items[(0, 0, 0)]
    assert item["original_size"].tolist() == [36, 100]  # (height, width), as SDXL's time ids take them
    top, left = item["crop_top_left"].tolist()
    assert 0 <= top <= 3 and left == 0  # only the rounding: 100x36 resized to 96x35, 3 rows to spare
    assert item["target_size"].tolist() == [32, 96] == list(item["pixel_values"].shape[1:])  # the bucket (h, w)
    assert collate([items[(0, 0, 0)], items[(0, 0, 2)]])["crop_top_left"].shape == (2, 2)


def test_bucket_edges_that_miss_the_resolution_are_refused():
    with pytest.raises(UserError, match="must enclose dataset.resolution=512"):
        DatasetConfig(path="d", buckets=True, bucket_min_edge=576)
    with pytest.raises(UserError, match="dataset.bucket_step=12"):
        DatasetConfig(path="d", buckets=True, bucket_step=12)
