"""model.base_precision=fp8 (sd_lora/fp8.py) on the CPU, where torch's _scaled_mm runs the real float8 arithmetic:
the layer against the fp32 reference, the LoRA U-Net after conversion, a tiny run through the trainer, the
refusals. Only the CUDA capability and the GCU are stand-ins (neither device exists here)."""

from __future__ import annotations

import pytest
import test_devices
import torch
from conftest import renderer, tiny_pipeline

from sd_lora.config import (BasePrecision, Config, DatasetConfig, DeviceConfig, DeviceType, LoraSettings, ModelConfig,
                            OptimizerConfig, TrainerConfig)
from sd_lora.errors import UserError
from sd_lora.fp8 import Fp8Linear, to_fp8_base

fake_gcu = test_devices.fake_gcu  # the torch_gcu 2.x stand-in


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def layer_and_reference(bias: bool = True):
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 128, bias=bias).requires_grad_(False)
    with torch.no_grad():  # rows of very different size: one scale per tensor must still cover them
        linear.weight.mul_(torch.logspace(-2, 1, 128)[:, None])
    return linear, Fp8Linear(linear)


def test_fp8_linear_forward_and_input_gradient_match_fp32_within_fp8_precision():
    linear, fp8 = layer_and_reference()
    x = (torch.randn(3, 7, 256) * 5).requires_grad_(True)  # 3-D: flattened and shaped back
    y, ref = fp8(x), linear(x)
    assert y.shape == ref.shape and y.dtype == torch.float32  # no autocast: the input's dtype
    g = torch.randn_like(ref)
    (grad,), (grad_ref,) = torch.autograd.grad(y, x, g), torch.autograd.grad(ref, x, g)
    assert grad.dtype == torch.float32
    # e4m3 keeps 3 mantissa bits (~3 % per product), the gradient's e5m2 2 bits (~6 %)
    assert rel(y, ref) < 0.06 and rel(grad, grad_ref) < 0.10
    # a wrong weight scale (off by 2) is far outside those bounds: they test the scaling, not just the shapes
    fp8.weight_scale.mul_(2)
    assert rel(fp8(x), ref) > 0.5
    assert rel(torch.autograd.grad(fp8(x), x, g)[0], grad_ref) > 0.5


def test_fp8_linear_under_autocast_returns_the_autocast_dtype_and_the_gradient_in_the_inputs():
    linear, fp8 = layer_and_reference(bias=True)
    x = torch.randn(5, 256, requires_grad=True)  # fp32, as after a LayerNorm under autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fp8(x)
    assert y.dtype == torch.bfloat16 and rel(y, linear(x)) < 0.06
    (grad,) = torch.autograd.grad(y, x, torch.ones_like(y))
    assert grad.dtype == torch.float32
    assert rel(grad, torch.autograd.grad(linear(x), x, torch.ones(5, 128))[0]) < 0.10
    assert fp8.weight.grad is None and fp8.bias.grad is None


def test_fp8_linear_compiles_in_one_graph():
    """Dynamo traces the autograd.Function and the autocast query in one graph, forward and backward (AOT
    autograd; Inductor's code generation is left out here for time: it compiles this layer on the CPU too)."""
    linear, fp8 = layer_and_reference()
    x = torch.randn(4, 256, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager = fp8(x)
        compiled = torch.compile(fp8, fullgraph=True, backend="aot_eager")(x)
    # as near the fp32 layer as eager (not bit-equal: the traced graph's bf16 output rounds a few values apart)
    assert compiled.dtype == torch.bfloat16 and rel(compiled, linear(x)) < 0.06 and rel(compiled, eager) < 0.02
    g = torch.randn_like(eager)
    grad, grad_eager = torch.autograd.grad(compiled, x, g)[0], torch.autograd.grad(eager, x, g)[0]
    assert rel(grad, torch.autograd.grad(linear(x), x, g.float())[0]) < 0.10 and rel(grad, grad_eager) < 0.02


def test_lora_unet_converts_its_frozen_linears_and_keeps_the_lora_trainable(tiny_model_path):
    from sd_lora.config import Attention
    from sd_lora.families import family_of
    from sd_lora.model import add_lora, load_components

    cfg = ModelConfig(pretrained_model_name_or_path=str(tiny_model_path))
    unet = load_components(cfg, tiny_model_path).unet
    params = add_lora(unet, Attention.sdp, LoraSettings(rank=2))
    linears = sum(type(m) is torch.nn.Linear and not m.weight.requires_grad for m in unet.modules())
    count = to_fp8_base(unet)
    assert count == linears > 0
    assert not any(type(m) is torch.nn.Linear and not m.weight.requires_grad for m in unet.modules())
    q = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    assert isinstance(q.base_layer, Fp8Linear) and type(q.lora_A["default"]) is torch.nn.Linear
    fp8 = [m for m in unet.modules() if isinstance(m, Fp8Linear)]
    assert all(m.weight.dtype == m.weight_t.dtype == torch.float8_e4m3fn for m in fp8)
    assert all(p.dtype == torch.float32 and p.requires_grad for p in params)
    names = set(dict(unet.named_parameters())) | set(dict(unet.named_buffers()))
    assert set(unet._ddp_params_and_buffers_to_ignore) <= names  # DDP neither broadcasts nor checks them

    g = torch.Generator().manual_seed(0)
    latents, text = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        for p in params:  # a LoRA that is not zero, so that its gradients flow through the base layers too
            p.normal_(0, 0.1, generator=g)
    family_of(cfg).predict(unet, latents, torch.tensor([10, 900]), {"encoder_hidden_states": text}).pow(2).mean() \
        .backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    assert all(p.grad is None for m in fp8 for p in m.parameters())
    unet.to(torch.float16)  # a dtype cast keeps the float8 weights (their values are exact in fp16, the scale holds)
    assert all(m.weight.dtype == torch.float8_e4m3fn for m in fp8)


def test_layers_whose_sizes_scaled_mm_refuses_stay_as_they_are():
    module = torch.nn.Sequential(torch.nn.Linear(32, 24), torch.nn.Linear(24, 32), torch.nn.Linear(32, 32))
    module.requires_grad_(False)
    assert to_fp8_base(module) == 1
    assert [type(m).__name__ for m in module] == ["Linear", "Linear", "Fp8Linear"]


def test_ddp_leaves_the_float8_tensors_alone(tmp_path):
    """DDP (gloo, one process) would broadcast every parameter at its start, and gloo cannot send float8: the
    converted tensors are on its ignore list (each process quantizes the same weights alike); the trained ones
    still get their gradients through it."""
    import torch.distributed as dist

    def model():
        module = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Linear(32, 32)).requires_grad_(False)
        module[1].bias.requires_grad_(True)  # something trained
        return module

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        module = model()
        to_fp8_base(module)
        ddp = torch.nn.parallel.DistributedDataParallel(module)
        ddp(torch.randn(3, 32)).sum().backward()
        assert module[1].bias.grad is not None
        unlisted = model()
        to_fp8_base(unlisted)
        del unlisted._ddp_params_and_buffers_to_ignore
        with pytest.raises(RuntimeError, match="Invalid scalar type"):  # what the list avoids
            torch.nn.parallel.DistributedDataParallel(unlisted)
    finally:
        dist.destroy_process_group()


def run_config(model, data, fp8: bool, **trainer) -> Config:
    return Config(
        model=ModelConfig(pretrained_model_name_or_path=str(model), lora=LoraSettings(rank=2),
                          base_precision=BasePrecision.fp8 if fp8 else None),
        dataset=DatasetConfig(path=str(data), resolution=64),
        optimizer=OptimizerConfig(lr=1e-2),
        device=DeviceConfig(type=DeviceType.cpu),
        trainer=TrainerConfig(train_batch_size=2, skip_steps=0, export_formats=[], report_to=[], **trainer),
    )


@pytest.fixture(scope="module")
def fp8_runs(tmp_path_factory, tiny_model_path):
    from conftest import write_noise_folder

    from sd_lora.train import train

    root = tmp_path_factory.mktemp("fp8")
    data = write_noise_folder(root / "data", [((64, 64), f"a {c} circle") for c in ("red", "green", "blue", "white")])
    first = {}
    for fp8 in (False, True):  # one step each: its loss is the base model's (the LoRA starts at zero)
        first[fp8] = train(run_config(tiny_model_path, data, fp8, max_train_steps=1), root / f"first-{fp8}")
    # a few steps with what perf=memory adds (gradient checkpointing, channels_last) and the validation image
    trained = root / "trained"
    report = train(run_config(tiny_model_path, data, True, max_train_steps=3, gradient_checkpointing=True,
                              channels_last=True, checkpointing_steps=2, validation_prompts=["a red circle"],
                              num_validation_images=1, num_inference_steps=1), trained)
    return first, trained, report


def test_a_tiny_fp8_run_trains_with_the_base_models_loss_and_says_so(fp8_runs):
    first, trained, report = fp8_runs
    plain, fp8 = first[False]["final_loss"], first[True]["final_loss"]
    assert abs(fp8 - plain) < 0.02 * plain, (fp8, plain)
    assert first[True]["switches"]["base_precision"] == "fp8" and first[True]["switches"]["fp8_layers"] > 0
    assert first[False]["switches"]["base_precision"] is None and first[False]["switches"]["fp8_layers"] == 0
    assert report["global_step"] == 3 and torch.isfinite(torch.tensor(report["final_loss"]))
    assert list((trained / "samples").glob("*.png"))  # the validation pipeline ran the fp8 U-Net


def test_the_fp8_runs_lora_loads_into_diffusers_and_changes_the_image(fp8_runs, tiny_model_path):

    _, trained, _ = fp8_runs
    pipe = tiny_pipeline(tiny_model_path)
    image = renderer(pipe, "a red circle", 2)

    base = image()
    pipe.load_lora_weights(str(trained / "lora"), weight_name="pytorch_lora_weights.safetensors")
    assert abs(image() - base).max() > 1e-4


def test_resume_with_another_base_precision_is_refused(fp8_runs, tiny_model_path):
    from sd_lora.checkpoints import check_resume, list_checkpoints, read_meta

    _, trained, _ = fp8_runs
    fingerprint = read_meta(list_checkpoints(trained)[-1])["fingerprint"]  # the same run otherwise
    cfg = run_config(tiny_model_path, "unused", False, resume_from_checkpoint="latest")
    with pytest.raises(UserError, match=r"model.base_precision: 'fp8' in the checkpoint, None now"):
        check_resume(cfg, trained, fingerprint)
    cfg.model.base_precision = BasePrecision.fp8
    assert check_resume(cfg, trained, fingerprint) == list_checkpoints(trained)[-1]


def test_a_checkpoint_from_before_the_key_counts_as_trained_without_fp8(tiny_model_path):
    """Checkpoints written before model.base_precision existed hold no value for it: they were trained without
    fp8, and a resume with fp8 is a change (refused), not an unknown."""
    from sd_lora.checkpoints import changed_settings, result_settings

    cfg = run_config(tiny_model_path, "unused", True)
    older = {k: v for k, v in result_settings(cfg).items() if k not in ("model.base_precision", "model.lora.fused_matmul")}
    assert changed_settings(cfg, {"settings": older}) == {"model.base_precision": (None, "fp8")}
    cfg.model.base_precision = None
    assert changed_settings(cfg, {"settings": older}) == {}


def test_fp8_is_refused_on_cuda_before_ada_and_on_gcu(monkeypatch, fake_gcu, tiny_model_path):
    from sd_lora.devices import CudaBackend, GcuBackend
    from sd_lora.fp8 import check_base_precision

    cfg = run_config(tiny_model_path, "unused", True)
    # stand-ins: no CUDA device here, so the capability and name torch would report are given
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA A100-SXM4-80GB")
    for capability, refused in (((8, 0), True), ((8, 6), True), ((8, 9), False), ((9, 0), False)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, c=capability: c)
        if refused:
            with pytest.raises(UserError, match=rf"model.base_precision=fp8 .* compute capability "
                                                rf"{capability[0]}.{capability[1]}.*set model.base_precision=null"):
                check_base_precision(cfg, CudaBackend())
        else:
            check_base_precision(cfg, CudaBackend())
    fake_gcu()
    with pytest.raises(UserError, match=r"model.base_precision=fp8 .* device=gcu .* set model.base_precision=null"):
        check_base_precision(cfg, GcuBackend(transfer_to_gcu=True))


def test_fp8_refusals_come_before_any_weights(fake_gcu, tiny_model_path):
    """Through the preflight, as a run meets it; DoRA at config time."""
    from sd_lora.preflight import checks_before_work

    fake_gcu()
    cfg = run_config(tiny_model_path, "unused", True)
    cfg.device = DeviceConfig(type=DeviceType.gcu)
    with pytest.raises(UserError, match=r"model.base_precision=fp8 needs float8 matmuls"):
        checks_before_work(cfg)
    with pytest.raises(UserError, match=r"model.base_precision='fp8' is invalid: DoRA reads the frozen weight"):
        ModelConfig(pretrained_model_name_or_path="m", base_precision=BasePrecision.fp8,
                    lora=LoraSettings(use_dora=True))
