"""Model loading, LoRA injection, attention backends, training targets, Min-SNR and clipping.

All on the tiny SD-2.1-shaped pipeline (and its SD-1.5-shaped twin; real diffusers / transformers / peft
classes), on the CPU.
"""

import pytest
import torch
from conftest import ROOT, tiny_pipeline

from sd_lora.config import Attention, LoraSettings, ModelConfig, PredictionType
from sd_lora.model import add_lora, load_components, resolve_model_path
from sd_lora.families import family_of
from sd_lora.loss import StepModels, diffusion_loss, min_snr_weights, sample_generators, train_step, training_target
from sd_lora.optim import clip_gradients


def components(path, dtype=torch.float32, **model_kw):
    cfg = ModelConfig(pretrained_model_name_or_path=str(path), **model_kw)
    return load_components(cfg, resolve_model_path(cfg), dtype=dtype)


def test_v_prediction_target_is_the_velocity(tiny_model_path):
    sched = components(tiny_model_path).noise_scheduler
    assert sched.config.prediction_type == "v_prediction"  # read from the folder's scheduler config
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([0, 500, 999])
    acp = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    expected = acp.sqrt() * noise - (1 - acp).sqrt() * x0  # v = alpha_t * eps - sigma_t * x0
    torch.testing.assert_close(training_target(sched, x0, noise, t), expected, rtol=1e-5, atol=1e-5)


def test_prediction_type_override_gives_epsilon_target(tiny_model_path):
    sched = components(tiny_model_path, prediction_type=PredictionType.epsilon).noise_scheduler
    assert sched.config.prediction_type == "epsilon"
    x0, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    assert torch.equal(training_target(sched, x0, noise, torch.tensor([10, 900])), noise)


@pytest.mark.parametrize("prediction_type", ["v_prediction", "epsilon"])
def test_min_snr_weights_follow_the_prediction_type(tiny_model_path, prediction_type):
    sched = components(tiny_model_path, prediction_type=PredictionType(prediction_type)).noise_scheduler
    t = torch.tensor([0, 50, 300, 999])
    acp = sched.alphas_cumprod[t].double()
    snr = acp / (1 - acp)
    gamma = 5.0
    expected = torch.minimum(snr, torch.full_like(snr, gamma)) / (snr + 1 if prediction_type == "v_prediction" else snr)
    weights = min_snr_weights(sched, t, gamma)
    torch.testing.assert_close(weights.double(), expected, rtol=1e-4, atol=1e-6)
    # the other type's formula gives clearly different weights, so a mix-up would fail above
    other = torch.minimum(snr, torch.full_like(snr, gamma)) / (snr if prediction_type == "v_prediction" else snr + 1)
    assert not torch.allclose(weights.double(), other, rtol=1e-2)

    pred, target = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    per_sample = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(diffusion_loss(pred, target, t, sched, gamma), (per_sample * weights).mean())
    torch.testing.assert_close(diffusion_loss(pred, target, t, sched, None), per_sample.mean())


def test_sd15_and_sd21_layouts_take_the_same_path_to_their_own_targets(tiny_model_path, tiny_sd15_model_path):
    """model=sd15 and model=sd21_base go through the same family, loader, LoRA injection and training step; what
    differs is read from the folder: SD 1.5's epsilon target and its convolutional attention projections."""
    from sd_lora.data import CaptionedImages, collate
    from sd_lora.config import DatasetConfig

    seen = {}
    for name, path in (("sd21", tiny_model_path), ("sd15", tiny_sd15_model_path)):
        comps = components(path)
        unet, family = comps.unet, family_of(ModelConfig(pretrained_model_name_or_path=str(path)))
        params = add_lora(unet, Attention.sdp, LoraSettings(rank=2))
        proj_in = type(unet.down_blocks[0].attentions[0].proj_in).__name__
        pixels = torch.rand(2, 3, 64, 64) * 2 - 1
        tokens = family.tokenize(comps.tokenizers, ["a red circle", "a blue square"])
        models = StepModels(unet, comps.vae, comps.text_encoders, comps.noise_scheduler, torch.float32, family)
        loss = train_step(models, {"pixel_values": pixels, **tokens}, 0.0, None,
                          sample_generators([0, 1], 0, 0, "cpu"))
        loss.backward()
        seen[name] = (comps.noise_scheduler.config.prediction_type, proj_in, all(p.grad is not None for p in params))
    assert seen == {"sd21": ("v_prediction", "Linear", True), "sd15": ("epsilon", "Conv2d", True)}


def test_sd15_hub_id_is_read_from_the_local_cache_or_named_in_a_download_line(tmp_path, monkeypatch):
    import hydra

    import sd_lora.config  # noqa: F401  (schemas)
    from sd_lora.config import to_config
    from sd_lora.errors import UserError

    with hydra.initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = to_config(hydra.compose("config", overrides=["model=sd15"]))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(UserError, match="hf download stable-diffusion-v1-5/stable-diffusion-v1-5"):
        resolve_model_path(cfg.model)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_only_lora_weights_train_and_they_stay_fp32(tiny_model_path, dtype):
    unet = components(tiny_model_path, dtype=dtype).unet
    params = add_lora(unet, Attention.sdp, LoraSettings(rank=4, alpha=8))
    trainable = {n: p for n, p in unet.named_parameters() if p.requires_grad}
    assert trainable and len(params) == len(trainable)
    assert all("lora_A" in n or "lora_B" in n for n in trainable)
    assert all(p.dtype == torch.float32 for p in trainable.values())
    frozen = [p for n, p in unet.named_parameters() if not p.requires_grad]
    assert frozen and all(p.dtype == dtype for p in frozen)
    # every targeted projection got an adapter, with alpha separate from rank
    lora_a = [n for n in trainable if "lora_A" in n]
    assert {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n in lora_a} == {"to_q", "to_k", "to_v", "0"}
    assert unet.peft_config["default"].r == 4 and unet.peft_config["default"].lora_alpha == 8


@pytest.mark.parametrize("attention,expected", [(Attention.sdp, "AttnProcessor2_0"), (Attention.eager, "AttnProcessor")])
def test_attention_processors_survive_lora_injection(tiny_model_path, attention, expected):
    unet = components(tiny_model_path).unet
    add_lora(unet, attention, LoraSettings())
    names = {type(p).__name__ for p in unet.attn_processors.values()}
    assert names == {expected}


def test_sdp_and_eager_give_the_same_unet_output(tiny_model_path):
    g = torch.Generator().manual_seed(0)
    latents, text = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    t = torch.tensor([10, 700])
    outputs = {}
    for attention in Attention:
        unet = components(tiny_model_path).unet
        torch.manual_seed(0)
        add_lora(unet, attention, LoraSettings())
        for name, p in unet.named_parameters():  # make the LoRA branch non-zero so it is exercised too
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.05, generator=g.manual_seed(hash(name) % 2**31))
        with torch.no_grad():
            outputs[attention] = unet(latents, t, text).sample
    torch.testing.assert_close(outputs[Attention.sdp], outputs[Attention.eager], rtol=1e-4, atol=1e-5)


def test_gradient_clipping_clips_the_lora_parameters(tiny_model_path):
    from accelerate import Accelerator

    comps = components(tiny_model_path)
    params = add_lora(comps.unet, Attention.sdp, LoraSettings())
    for name, p in comps.unet.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    accelerator = Accelerator(cpu=True)
    batch = {"pixel_values": torch.rand(2, 3, 64, 64) * 2 - 1,
             "input_ids": comps.tokenizers[0](["a red circle", "a blue square"], padding="max_length",
                                              max_length=77, return_tensors="pt").input_ids}
    family = family_of(ModelConfig(pretrained_model_name_or_path=str(tiny_model_path)))
    models = StepModels(comps.unet, comps.vae, comps.text_encoders, comps.noise_scheduler, torch.float32, family)
    torch.manual_seed(0)
    gens = sample_generators([0, 1], seed=0, epoch=0, device="cpu")
    (train_step(models, batch, 0.0, None, gens) * 1e4).backward()  # a gradient far above the clip norm
    before = [p.grad.clone() for p in params]
    norm_before = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in before]))
    assert norm_before > 10

    assert clip_gradients(accelerator, params, None) is None
    assert all(torch.equal(p.grad, g) for p, g in zip(params, before))  # null = no clipping

    returned = clip_gradients(accelerator, params, 1.0)
    torch.testing.assert_close(returned, norm_before, rtol=1e-4, atol=0)
    norm_after = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
    assert norm_after == pytest.approx(1.0, rel=1e-3)
    scale = 1.0 / norm_before
    for p, g in zip(params, before):  # same direction, scaled down
        torch.testing.assert_close(p.grad, g * scale, rtol=1e-3, atol=1e-8)


def test_the_text_encoder_lora_trains_at_its_own_learning_rate_scaled_like_the_u_nets():
    from sd_lora.config import Config, DatasetConfig, ModelConfig, OptimizerConfig, TrainerConfig
    from sd_lora.optim import build_lr_scheduler, build_optimizer

    unet, text = [torch.nn.Parameter(torch.zeros(2))], [torch.nn.Parameter(torch.zeros(2))]

    def lrs(**optimizer):
        cfg = Config(model=ModelConfig(pretrained_model_name_or_path="m"), dataset=DatasetConfig(path="d"),
                     optimizer=OptimizerConfig(lr=1e-4, **optimizer), trainer=TrainerConfig(train_batch_size=2))
        opt = build_optimizer(cfg, {"unet": unet, "text_encoder": text}, num_processes=2, fused_by_default=False)
        build_lr_scheduler(cfg, opt, 10, 2)
        return [group["lr"] for group in opt.param_groups]

    assert lrs() == [1e-4, 1e-4]  # null: the U-Net's
    assert lrs(text_encoder_lr=5e-5) == [1e-4, 5e-5]
    assert lrs(text_encoder_lr=5e-5, scale_lr=True) == pytest.approx([4e-4, 2e-4])  # batch 2 x 2 processes


def unet_output(unet):
    g = torch.Generator().manual_seed(0)
    latents, text = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 32, generator=g)
    with torch.no_grad():
        return unet(latents, torch.tensor([500]), text).sample


@pytest.mark.parametrize("lora", [dict(use_dora=True), dict(init_lora_weights="pissa"), dict(init_lora_weights="olora"),
                                  dict(init_lora_weights="kaiming")], ids=["dora", "pissa", "olora", "kaiming"])
def test_every_lora_variant_saves_a_file_diffusers_loads_onto_the_unchanged_base(lora, tiny_model_path, tmp_path):
    """The U-Net as trained (DoRA's magnitudes; PiSSA's / OLoRA's start taken out of the frozen fp16 weights) and the
    unchanged base pipeline with the saved file give the same output, and not the base's."""

    from sd_lora.config import LoraInit
    from sd_lora.model import save_lora

    settings = LoraSettings(rank=2, alpha=4, **{k: LoraInit(v) if k == "init_lora_weights" else v
                                                 for k, v in lora.items()})
    unet = components(tiny_model_path, dtype=torch.float16).unet
    base_weight = unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q.weight.detach().clone()
    params = add_lora(unet, Attention.sdp, settings)
    mutated = unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q.base_layer.weight
    assert torch.equal(mutated, base_weight) == (settings.init_lora_weights not in (LoraInit.pissa, LoraInit.olora))
    assert all(p.dtype == torch.float32 for p in params)
    torch.manual_seed(1)
    for p in params:  # as if trained
        p.data += 0.05 * torch.randn_like(p)
    unet.float()
    trained = unet_output(unet)
    path = save_lora({"unet": unet}, tmp_path / "lora")
    pipe = tiny_pipeline(tiny_model_path)
    base = unet_output(pipe.unet)
    pipe.load_lora_weights(str(path.parent), weight_name=path.name)
    config = pipe.unet.peft_config["default_0"]
    mutating = settings.init_lora_weights in (LoraInit.pissa, LoraInit.olora)
    assert (config.r, config.lora_alpha, config.use_dora) == ((4, 8.0) if mutating else (2, 4.0)) + (settings.use_dora,)
    loaded = unet_output(pipe.unet)
    assert (trained - base).abs().max() > 1e-3
    torch.testing.assert_close(loaded, trained, atol=5e-3, rtol=0)  # the frozen weights were fp16 in training


def test_a_dora_lora_is_refused_in_kohyas_layout_before_work_and_by_the_converter(tiny_model_path, tmp_path):
    from sd_lora.config import Config, DatasetConfig, DeviceConfig, DeviceType
    from sd_lora.errors import UserError
    from sd_lora.export import diffusers_to_kohya
    from sd_lora.preflight import checks_before_work

    with pytest.raises(UserError, match=r"model.lora.use_dora=true: kohya's layout .* add trainer.export_formats=\[\]"):
        checks_before_work(Config(model=ModelConfig(pretrained_model_name_or_path=str(tiny_model_path),
                                                    lora=LoraSettings(use_dora=True)),
                                  dataset=DatasetConfig(path=str(ROOT / "sd_lora" / "assets" / "shapes")),
                                  device=DeviceConfig(type=DeviceType.cpu)))
    with pytest.raises(UserError, match=r"the LoRA is a DoRA \(1 magnitude vectors"):
        diffusers_to_kohya({"unet.a.lora.down.weight": torch.zeros(2, 4), "unet.a.lora.up.weight": torch.zeros(4, 2),
                            "unet.a.lora_magnitude_vector": torch.ones(4)}, {"lora_adapter_metadata": "{}"})
