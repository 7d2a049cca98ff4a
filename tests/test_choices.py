"""The choices of issue 18 together, through the trainer, in this process: the tiny SD 1.5-layout model, a kohya
caption folder in aspect-ratio buckets with caption dropout and shuffled tags, Prodigy with a cosine-with-restarts schedule warmed up by a
fraction, DoRA, an EMA of the LoRA weights, no tracker. A run killed after its checkpoint and resumed ends where
the run never interrupted ends, bit for bit; what it saves is the EMA and loads into diffusers."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import noise_image, renderer, tiny_pipeline
from safetensors.torch import load_file

from sd_lora.config import (Config, DatasetConfig, DeviceConfig, DeviceType, LoraSettings, LrScheduler, ModelConfig,
                            OptimizerConfig, OptimizerName, TrainerConfig)

pytest.importorskip("prodigyopt")


def caption_folder(root: Path) -> Path:
    root.mkdir(parents=True)
    colours = ["red", "green", "blue", "yellow", "white", "black"]
    for i, colour in enumerate(colours):
        noise_image(*((100, 36) if i % 2 else (60, 64)), seed=i).save(root / f"{i}.png")  # two buckets
        (root / f"{i}.txt").write_text(f"a {colour} circle, on grass, sunny, photo, {colours[i - 1]} sky")
    return root


def run_config(model: Path, data: Path, resume: bool = False) -> Config:
    return Config(
        model=ModelConfig(pretrained_model_name_or_path=str(model), lora=LoraSettings(rank=2, use_dora=True)),
        dataset=DatasetConfig(path=str(data), caption_files=True, resolution=64, random_flip=True,
                              caption_dropout=0.3, shuffle_tags=True, keep_tags=1, buckets=True, bucket_step=32),
        optimizer=OptimizerConfig(name=OptimizerName.prodigy, lr=1.0, lr_scheduler=LrScheduler.cosine_with_restarts,
                                  lr_num_cycles=2, lr_warmup_fraction=0.25),
        device=DeviceConfig(type=DeviceType.cpu),
        trainer=TrainerConfig(train_batch_size=2, max_train_steps=4, checkpointing_steps=2, skip_steps=0,
                              validation_prompts=["a red circle"], num_validation_images=1, num_inference_steps=1,
                              export_formats=[], report_to=[], ema=True, ema_decay=0.9,
                              resume_from_checkpoint="latest" if resume else None),
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_sd15_model_path):
    from sd_lora.train import train

    root = tmp_path_factory.mktemp("choices")
    data = caption_folder(root / "data")
    whole = root / "whole"
    train(run_config(tiny_sd15_model_path, data), whole)
    resumed = root / "resumed"  # as if killed right after checkpoint-2
    shutil.copytree(whole / "checkpoints" / "checkpoint-2", resumed / "checkpoints" / "checkpoint-2")
    train(run_config(tiny_sd15_model_path, data, resume=True), resumed)
    return whole, resumed


def test_resumed_run_ends_bit_identical_with_its_optimizer_and_moving_average(runs):
    whole, resumed = runs
    name = "lora/pytorch_lora_weights.safetensors"
    a, b = load_file(whole / name), load_file(resumed / name)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    end_a, end_b = whole / "checkpoints" / "checkpoint-4", resumed / "checkpoints" / "checkpoint-4"
    opt_a, opt_b = (torch.load(p / "optimizer.bin", weights_only=False) for p in (end_a, end_b))
    assert opt_a["param_groups"] == opt_b["param_groups"]  # Prodigy's step-size estimate d and its step count k
    for i, slots in opt_a["state"].items():
        for slot, value in slots.items():
            assert torch.equal(value, opt_b["state"][i][slot]) if torch.is_tensor(value) else value == opt_b["state"][i][slot]
    ema_a, ema_b = (torch.load(p / "custom_checkpoint_0.pkl", weights_only=False) for p in (end_a, end_b))
    assert ema_a["optimization_step"] == ema_b["optimization_step"] == 4
    assert all(torch.equal(x, y) for x, y in zip(ema_a["shadow_params"], ema_b["shadow_params"]))


def test_the_saved_lora_is_the_moving_average_and_the_checkpoint_keeps_the_trained_weights(runs):
    whole, _ = runs
    saved = load_file(whole / "lora" / "pytorch_lora_weights.safetensors")
    trained = load_file(whole / "checkpoints" / "checkpoint-4" / "lora.safetensors")
    shadow = torch.load(whole / "checkpoints" / "checkpoint-4" / "custom_checkpoint_0.pkl",
                        weights_only=False)["shadow_params"]
    assert sorted(saved) == sorted(f"unet.{k}" for k in trained)  # DoRA's magnitudes included
    assert any(k.endswith("lora_magnitude_vector") for k in trained)
    assert {v.numel() for v in shadow} == {v.numel() for v in saved.values()}
    shadow_sums = sorted(float(v.double().sum()) for v in shadow)
    assert sorted(float(v.double().sum()) for v in saved.values()) == pytest.approx(shadow_sums, rel=1e-6, abs=1e-9)
    assert any(not torch.equal(saved[f"unet.{k}"], v) for k, v in trained.items())  # not the trained weights


def test_no_tracker_still_writes_samples_and_the_report_counts_the_buckets(runs):
    import json

    whole, _ = runs
    report = json.loads((whole / "report.json").read_text())
    assert report["global_step"] == 4 and report["buckets"] == {"64x64": 3, "96x32": 3}
    assert not (whole / "tensorboard").exists()  # trainer.report_to=[]
    assert list((whole / "samples").glob("*.png"))


def test_the_sd15_lora_loads_into_diffusers_and_changes_the_image(runs, tiny_sd15_model_path):

    whole, _ = runs
    pipe = tiny_pipeline(tiny_sd15_model_path)
    image = renderer(pipe, "a red circle", 2)

    base = image()
    pipe.load_lora_weights(str(whole / "lora"), weight_name="pytorch_lora_weights.safetensors")
    assert pipe.unet.peft_config["default_0"].use_dora
    # small: Prodigy starts from a step size of 1e-6 and grows it over far more than these 4 steps
    assert abs(image() - base).max() > 1e-5


def test_a_cached_bucketed_run_with_lion_and_pissa_trains_and_saves_a_plain_lora(tmp_path, tiny_model_path):
    """The other side of the choices: the embedding cache in buckets with caption dropout (the empty caption's
    cached embedding), Lion on a polynomial schedule, a PiSSA start on the SD 2.1-layout tiny model. Its file is a
    plain LoRA of twice the rank that diffusers loads onto the unchanged base."""
    pytest.importorskip("lion_pytorch")

    from sd_lora.config import LoraInit
    from sd_lora.train import train

    data = caption_folder(tmp_path / "data")
    cfg = Config(
        model=ModelConfig(pretrained_model_name_or_path=str(tiny_model_path),
                          lora=LoraSettings(rank=2, init_lora_weights=LoraInit.pissa)),
        dataset=DatasetConfig(path=str(data), caption_files=True, resolution=64, random_flip=True, center_crop=True,
                              caption_dropout=0.3, buckets=True, bucket_step=32, cache=True,
                              cache_dir=str(tmp_path / "cache")),
        optimizer=OptimizerConfig(name=OptimizerName.lion, lr=1e-3, lr_scheduler=LrScheduler.polynomial,
                                  lr_power=2.0, lr_warmup_steps=1),
        device=DeviceConfig(type=DeviceType.cpu),
        trainer=TrainerConfig(train_batch_size=2, max_train_steps=3, checkpointing_steps=None, skip_steps=0,
                              validation_prompts=[], export_formats=[]))
    report = train(cfg, tmp_path / "run")
    assert report["global_step"] == 3 and report["buckets"] == {"64x64": 3, "96x32": 3} and report["cache"]
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1
    pipe = tiny_pipeline(tiny_model_path)
    pipe.load_lora_weights(str(tmp_path / "run" / "lora"), weight_name="pytorch_lora_weights.safetensors")
    assert pipe.unet.peft_config["default_0"].r == 4  # PiSSA's rank 2, saved as a plain LoRA of rank 4
