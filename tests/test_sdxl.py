"""SDXL through the model-family seam (sd_lora/families/sdxl.py), on a tiny SDXL-shaped pipeline built in code:
the size conditioning, the cache, a whole run whose LoRA (U-Net and both text encoders) loads into diffusers'
StableDiffusionXLPipeline in either layout, and exact resume."""

import json
import shutil

import pytest
import torch
from conftest import run_launch, write_noise_folder

from sd_lora.config import DatasetConfig, ModelConfig, ModelFamilyName
from sd_lora.families import FAMILIES

FAMILY = FAMILIES[ModelFamilyName.sdxl]
TRAIN = ["model=tiny_sdxl", "device=cpu", "trainer.max_train_steps=4", "trainer.checkpointing_steps=2",
         "trainer.log_every_n_steps=1", "optimizer.lr=1e-2", "model.lora.rank=4", "model.lora.alpha=8",
         "model.lora.train_text_encoder=true", "trainer.validation_prompts=[a red circle]",
         "trainer.num_validation_images=1", "trainer.num_inference_steps=2"]


@pytest.fixture(scope="module")
def sdxl_path():
    from sd_lora.config import cache_dir
    from sd_lora.demo import ensure_tiny_model

    return ensure_tiny_model(cache_dir(), "sdxl")


@pytest.fixture(scope="module")
def parts(sdxl_path):
    from sd_lora.model import load_components

    return load_components(ModelConfig(pretrained_model_name_or_path=str(sdxl_path), family=ModelFamilyName.sdxl), sdxl_path)


def test_time_ids_are_each_samples_original_size_crop_and_target_cached_or_not(parts, tmp_path):
    """diffusers' compute_time_ids: (original h, w, crop top, left, target h, w), the crop as seen after the flip;
    the cached views carry the same sizes as the images the uncached path produces, and the same loss."""
    import functools

    from sd_lora.cache import CachedEmbeddings, compute_embeddings
    from sd_lora.data import CaptionedImages, collate, load_table
    from sd_lora.loss import StepModels, sample_generators, train_step

    folder = write_noise_folder(tmp_path / "wide", [((48, 32), "a red circle"), ((32, 40), "a blue square")])
    cfg = DatasetConfig(path=str(folder), resolution=16, center_crop=True, random_flip=True)
    table = load_table(cfg, seed=0)
    plain = CaptionedImages(table, cfg, functools.partial(FAMILY.tokenize, parts.tokenizers))
    # 48x32 -> resized 24x16, centre crop left 4; its mirror image's crop starts at 24 - 4 - 16 = 4 too, so use
    # a random crop to see the flip move it
    seen = set()
    for epoch in range(6):
        item = plain[(0, epoch, 0)]
        ids = FAMILY.sample_conditioning(collate([item]))["time_ids"][0].tolist()
        assert ids[:2] == [32, 48] and ids[4:] == [16, 16] and ids[2] == 0 and ids[3] == 4
        seen.add(tuple(ids))
    random_crop = DatasetConfig(path=str(folder), resolution=16, center_crop=False, random_flip=True)
    lefts = set()
    for epoch in range(12):
        geometry_item = CaptionedImages(table, random_crop, functools.partial(FAMILY.tokenize, parts.tokenizers))[
            (0, epoch, 0)]
        lefts.add(int(geometry_item["crop_top_left"][1]))
        assert 0 <= geometry_item["crop_top_left"][1] <= 24 - 16
    assert len(lefts) > 1  # the crop (and its mirror) moves: the offsets are the sample's own
    encode = functools.partial(FAMILY.encode_captions, parts, device="cpu")
    tensors = compute_embeddings(table, cfg, encode, parts.vae, "cpu", torch.float32)
    assert tensors["crop_top_left"].shape == (2, 2, 2) and tensors["original_size"].tolist() == [[32, 48], [40, 32]]
    assert tensors["pooled_prompt_embeds"].shape == (2, 32) and tensors["encoder_hidden_states"].shape[-1] == 64
    cached = CachedEmbeddings(tensors, random_flip=True)
    models = StepModels(parts.unet, parts.vae, parts.text_encoders, parts.noise_scheduler, torch.float32, FAMILY)
    keys = [(3, 1, 0), (3, 1, 1)]
    a, b = collate([cached[k] for k in keys]), collate([plain[k] for k in keys])
    assert torch.equal(a["crop_top_left"], b["crop_top_left"]) and torch.equal(a["original_size"], b["original_size"])
    # an odd excess (50x32 -> 25x16: 9 px) puts the mirror image's centre crop one pixel off the upright one's
    # (left 4 upright, 5 mirrored): the cache picks, per sample, the crop of the view the images path flips to
    odd_folder = write_noise_folder(tmp_path / "odd", [((50, 32), "a red circle")])
    odd_cfg = DatasetConfig(path=str(odd_folder), resolution=16, center_crop=True, random_flip=True)
    odd_table = load_table(odd_cfg, seed=0)
    odd_plain = CaptionedImages(odd_table, odd_cfg, functools.partial(FAMILY.tokenize, parts.tokenizers))
    odd_cached = CachedEmbeddings(compute_embeddings(odd_table, odd_cfg, encode, parts.vae, "cpu", torch.float32),
                                  random_flip=True)
    crops = [(odd_cached[(0, epoch, 0)]["crop_top_left"].tolist(), odd_plain[(0, epoch, 0)]["crop_top_left"].tolist())
             for epoch in range(8)]
    assert all(cached == plain for cached, plain in crops) and {tuple(p) for _, p in crops} == {(0, 4), (0, 5)}
    with torch.no_grad():
        losses = [train_step(models, batch, 0.0, None, sample_generators(batch["index"], 3, 1, "cpu"))
                  for batch in (a, b)]
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, sdxl_path):
    out = tmp_path_factory.mktemp("sdxl") / "xl"
    result = run_launch(*TRAIN, f"hydra.run.dir={out}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out


def outputs(pipe):
    """The U-Net's and both text encoders' outputs on fixed inputs (the tiny SDXL's shapes)."""
    g = torch.Generator().manual_seed(0)
    latents, text, pooled = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 64, generator=g), torch.randn(1, 32, generator=g)
    time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])
    tokens = torch.arange(3, 20)[None]
    with torch.no_grad():
        unet = pipe.unet(latents, torch.tensor([500]), text,
                         added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        return [unet, pipe.text_encoder(tokens, return_dict=False)[0], pipe.text_encoder_2(tokens, return_dict=False)[0]]


def test_an_sdxl_lora_loads_into_diffusers_in_either_layout_and_changes_the_image(run_dir, sdxl_path):
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import load_file

    report = json.loads((run_dir / "report.json").read_text())
    assert report["global_step"] == 4 and (run_dir / "samples").is_dir()
    kohya = load_file(run_dir / "lora" / "xl.safetensors")
    assert {k.split("_")[1] for k in kohya} == {"unet", "te1", "te2"}  # kohya's SDXL prefixes, ComfyUI's too
    assert {float(v) for k, v in kohya.items() if k.endswith(".alpha")} == {8.0}

    def loaded(name=None):
        pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_path, local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        if name:
            pipe.load_lora_weights(str(run_dir / "lora"), weight_name=name)
        image = pipe("a red circle", num_inference_steps=2, height=64, width=64, output_type="np",
                     generator=torch.Generator().manual_seed(0)).images[0]
        return outputs(pipe), image

    (base, base_image), (mine, image), (theirs, _) = (loaded(), loaded("pytorch_lora_weights.safetensors"),
                                                      loaded("xl.safetensors"))
    for before, after, kohya_out in zip(base, mine, theirs):  # U-Net, text encoder, text encoder 2
        assert (after - before).abs().max() > 1e-4
        torch.testing.assert_close(kohya_out, after, atol=1e-5, rtol=0)
    assert abs(image - base_image).max() > 1e-3


def test_an_sdxl_run_resumes_bit_identical_and_generates(run_dir, tmp_path):
    from safetensors.torch import load_file

    resumed = tmp_path / "resumed"
    shutil.copytree(run_dir, resumed)
    result = run_launch(*TRAIN, f"trainer.resume_from_checkpoint={resumed / 'checkpoints' / 'checkpoint-2'}",
                        "trainer.validation_prompts=[]", f"hydra.run.dir={resumed}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    name = "lora/pytorch_lora_weights.safetensors"
    straight, again = load_file(run_dir / name), load_file(resumed / name)
    assert straight.keys() == again.keys() and any(k.startswith("text_encoder_2.") for k in straight)
    assert all(torch.equal(straight[k], again[k]) for k in straight)
    out = tmp_path / "gen"
    result = run_launch(f"run_dir={run_dir}", "prompt=a green square", "num_images=1", "num_inference_steps=2",
                        f"out_dir={out}", "device_type=cpu", module="sd_lora.generate")
    assert result.returncode == 0, result.stderr[-3000:]
    assert [p.name for p in out.glob("*.png")] == ["00.png"]


def test_sdxl_text_encoders_train_under_ddp_although_a_layer_is_unread(tmp_path, sdxl_path):
    """SDXL reads the first text encoder's penultimate layer, so its last layer's LoRA gets no gradient; DDP (two
    processes here) must be told, or it stops at the second step."""
    out = tmp_path / "ddp"
    result = run_launch("model=tiny_sdxl", "device=cpu", "device.num_processes=2", "model.lora.train_text_encoder=true",
                        "trainer.max_train_steps=3", "trainer.validation_prompts=[]", f"hydra.run.dir={out}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert json.loads((out / "report.json").read_text())["global_step"] == 3
