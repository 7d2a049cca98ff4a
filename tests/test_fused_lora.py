"""model.lora.fused_matmul (sd_lora/fused_lora.py): a peft LoRA Linear computed as one matmul against W + s B A,
with its own backward. The output and the gradients of x, lora_A and lora_B are peft's; a layer it cannot
compute keeps peft's path; training with it gives peft's LoRA (fp32 on the CPU: to float tolerance; under bf16
autocast: as close to fp32 training as peft's path is), in the same file, under torch.compile too."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_pipeline
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora.layer import Linear as PeftLinear

import sd_lora
from sd_lora.fused_lora import fuse_lora_layers, is_fused

SHAPES = Path(sd_lora.__file__).parent / "assets" / "shapes"


class Block(torch.nn.Module):
    def __init__(self, bias: bool = True, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.proj = torch.nn.Linear(24, 16, bias=bias)
        self.out = torch.nn.Linear(16, 8)

    def forward(self, x):
        return self.out(torch.nn.functional.gelu(self.proj(x)))


def lora_block(bias: bool = True, alpha: float = 6.0, dtype: torch.dtype = torch.float32, **config) -> Block:
    """A frozen Block with peft's LoRA (rank 4) on `proj`, B non-zero, LoRA weights fp32 (as add_lora keeps them)."""
    block = Block(bias)
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=alpha, target_modules=["proj"], **config), block)
    block.to(dtype)
    for name, p in block.named_parameters():
        p.requires_grad_("lora_" in name)
        if "lora_" in name:
            p.data = p.data.float()
    with torch.no_grad():
        block.proj.lora_B["default"].weight.normal_(0, 0.5)
    return block


def outputs_and_grads(layer, forward, x: torch.Tensor) -> list[torch.Tensor]:
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    a.grad = b.grad = x.grad = None
    y = forward(x)
    (y.float().sin() * torch.linspace(-1, 1, y.shape[-1])).sum().backward()  # an uneven gradient for every output
    return [y.detach(), a.grad.clone(), b.grad.clone()] + ([x.grad.clone()] if x.requires_grad else [])


@pytest.mark.parametrize("bias, alpha, shape, x_grad", [
    (True, 4.0, (6, 24), True),  # scale 1
    (True, 6.0, (2, 5, 24), True),  # scale 1.5, 3-D input
    (False, 2.0, (2, 3, 4, 24), False),  # no bias, 4-D input, x needs no gradient
])
def test_output_and_gradients_are_peft_s(bias, alpha, shape, x_grad):
    block = lora_block(bias, alpha)
    layer = block.proj
    assert fuse_lora_layers(block) == (1, 1) and is_fused(layer)
    assert layer.scaling["default"] == alpha / 4
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1)).requires_grad_(x_grad)
    fused = outputs_and_grads(layer, layer, x)
    peft = outputs_and_grads(layer, lambda x: PeftLinear.forward(layer, x), x)
    assert fused[0].shape == (*shape[:-1], 16)
    for got, want, name in zip(fused, peft, ["y", "grad lora_A", "grad lora_B", "grad x"]):
        assert got.dtype == want.dtype, name
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=name)


def test_a_non_contiguous_input_and_a_channels_last_caller_give_peft_s_output():
    block = lora_block()
    fuse_lora_layers(block)
    x = torch.randn(2, 24, 3, 5).permute(0, 2, 3, 1).requires_grad_()  # (B, H, W, C) from an NCHW tensor
    fused = outputs_and_grads(block.proj, block.proj, x)
    peft = outputs_and_grads(block.proj, lambda x: PeftLinear.forward(block.proj, x), x)
    for got, want in zip(fused, peft):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("config", [dict(lora_dropout=0.1), dict(use_dora=True)], ids=["dropout", "dora"])
def test_a_layer_that_does_not_qualify_keeps_peft_s_path(config):
    block = lora_block(**config)
    assert fuse_lora_layers(block) == (0, 1)
    assert not is_fused(block.proj) and "forward" not in vars(block.proj)


def test_a_fused_layer_falls_back_to_peft_when_its_adapter_is_off_or_merged():
    block = lora_block()
    fuse_lora_layers(block)
    layer, x = block.proj, torch.randn(3, 24)
    with torch.no_grad():
        base, with_lora = layer.base_layer(x), PeftLinear.forward(layer, x)
        layer.enable_adapters(False)  # sd_lora.model.lora_off, diffusers' disable_lora
        torch.testing.assert_close(layer(x), base)
        layer.enable_adapters(True)
        torch.testing.assert_close(layer(x), with_lora, rtol=1e-5, atol=1e-5)
        layer.merge()  # diffusers' fuse_lora
        torch.testing.assert_close(layer(x), with_lora, rtol=1e-5, atol=1e-5)
        layer.unmerge()
        layer.scaling["default"] *= 2  # diffusers' lora scale: read at each call
        torch.testing.assert_close(layer(x), base + 2 * (with_lora - base), rtol=1e-5, atol=1e-5)


def test_without_gradients_the_layer_is_peft_s_exactly():
    """The validation loss and images run under no_grad: they see the LoRA as its file applies it (peft's path),
    not through the merged weight, which rounds the LoRA's part to the frozen weight's precision in fp16/bf16."""
    block = lora_block(dtype=torch.bfloat16)
    fuse_lora_layers(block)
    layer, x = block.proj, torch.randn(3, 24, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert "FusedLoraLinear" in type(layer(x).grad_fn).__name__  # training: the fused path
        with torch.no_grad():
            assert torch.equal(layer(x), PeftLinear.forward(layer, x))


def test_a_copy_of_a_fused_module_is_fused_onto_its_own_layer():
    block = lora_block()
    fuse_lora_layers(block)
    twin = copy.deepcopy(block)
    assert is_fused(twin.proj) and twin.proj.forward.args[0] is twin.proj
    with torch.no_grad():
        twin.proj.lora_B["default"].weight.zero_()
        torch.testing.assert_close(twin.proj(torch.ones(1, 24)), twin.proj.base_layer(torch.ones(1, 24)))


def train_layer(fused: bool, autocast: torch.dtype | None, steps: int = 30) -> dict[str, torch.Tensor]:
    """`steps` AdamW steps on the LoRA of a Block whose frozen weights are stored in the autocast dtype."""
    block = lora_block(dtype=autocast or torch.float32)
    if fused:
        fuse_lora_layers(block)
    params = [p for p in block.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    g = torch.Generator().manual_seed(3)
    target = torch.randn(8, 8, generator=g)
    for _ in range(steps):
        x = torch.randn(8, 24, generator=g)
        with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            loss = torch.nn.functional.mse_loss(block(x).float(), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return {n: p.detach().clone() for n, p in block.named_parameters() if p.requires_grad}


def test_training_under_bf16_autocast_learns_what_peft_s_path_learns():
    """The merged weight is rounded to bf16 (the module docstring says why that loses no training signal): the
    LoRA trained through it is as close to fp32 training as peft's bf16 path is, and close to that path's."""
    reference = train_layer(fused=False, autocast=None)
    peft, fused = train_layer(fused=False, autocast=torch.bfloat16), train_layer(fused=True, autocast=torch.bfloat16)

    def distance(a, b):
        return max(((a[k] - b[k]).norm() / b[k].norm()).item() for k in b)

    start = lora_block().proj
    moved = distance({k: start.get_parameter(k.removeprefix("proj.")).detach() for k in reference}, reference)
    assert moved > 0.05  # the steps really trained
    assert distance(fused, reference) < max(2 * distance(peft, reference), 1e-3)
    assert distance(fused, peft) < 0.1 * moved


def test_fp32_training_matches_peft_s_path():
    peft, fused = train_layer(fused=False, autocast=None, steps=10), train_layer(fused=True, autocast=None, steps=10)
    for key in peft:
        torch.testing.assert_close(fused[key], peft[key], rtol=1e-4, atol=1e-6)


def test_the_fused_layer_compiles_into_one_graph_and_matches():
    torch._dynamo.reset()
    try:
        block = lora_block()
        fuse_lora_layers(block)
        compiled = torch.compile(block)
        x = torch.randn(2, 5, 24, requires_grad=True)
        eager = outputs_and_grads(block.proj, block, x)
        got = outputs_and_grads(block.proj, compiled, x)
        for a, b in zip(got, eager):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        explained = torch._dynamo.explain(block)(x)
        assert explained.graph_count == 1 and explained.graph_break_count == 0
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("lora, base, why", [(dict(dropout=0.1), None, "the others keep peft's path: model.lora.dropout>0"),
                                             (dict(use_dora=True), None, "the others keep peft's path: model.lora.use_dora"),
                                             ({}, "fp8", "not with model.base_precision=fp8")],
                         ids=["dropout", "dora", "fp8"])
def test_what_cannot_be_fused_keeps_peft_s_path_and_the_log_says_why(lora, base, why, caplog):
    """perf=throughput sets fused_matmul: a LoRA with dropout or DoRA, or an fp8 base, is accepted with it (not
    refused) and trains on peft's path; a plain LoRA beside it is fused."""
    from sd_lora.config import BasePrecision, LoraSettings
    from sd_lora.speed import SpeedPlan, set_unet_matmuls

    cfg = run_config(Path("unused"), True)
    cfg.model.lora = LoraSettings(rank=4, alpha=8, fused_matmul=True, **lora)
    cfg.model.base_precision = BasePrecision(base) if base else None
    unet = torch.nn.ModuleDict({"plain": lora_block(), "other": lora_block(lora_dropout=lora.get("dropout", 0.0),
                                                                           use_dora=lora.get("use_dora", False))})
    speed = SpeedPlan(None, {"fused_lora_layers": 0, "lora_layers": None, "fp8_layers": 0})
    with caplog.at_level("INFO", logger="sd_lora.speed"):
        set_unet_matmuls(cfg, unet, speed)
    assert why in caplog.text
    assert not is_fused(unet["other"].proj)
    assert is_fused(unet["plain"].proj) == (base is None)
    assert speed.applied["fused_lora_layers"] == (0 if base else 1)
    assert speed.applied["lora_layers"] == 2


def run_config(model: Path, fused: bool, **trainer):
    from sd_lora.config import (Config, DatasetConfig, DeviceConfig, DeviceType, LoraSettings, ModelConfig,
                                OptimizerConfig, TrainerConfig)

    return Config(
        model=ModelConfig(pretrained_model_name_or_path=str(model), lora=LoraSettings(rank=4, alpha=8,
                                                                                      fused_matmul=fused)),
        dataset=DatasetConfig(path=str(SHAPES), resolution=64, center_crop=True, max_train_samples=8),
        optimizer=OptimizerConfig(lr=1e-2),
        device=DeviceConfig(type=DeviceType.cpu),
        trainer=TrainerConfig(train_batch_size=2, max_train_steps=3, checkpointing_steps=None, skip_steps=0,
                              export_formats=[], report_to=[], **trainer),
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_path):
    from sd_lora.train import train

    root = tmp_path_factory.mktemp("fused")
    train(run_config(tiny_model_path, fused=False), root / "peft")
    # with the module switches the fused layers must live with (they change no arithmetic on the CPU)
    train(run_config(tiny_model_path, fused=True, gradient_checkpointing=True, channels_last=True), root / "fused")
    return root / "peft", root / "fused"


def test_a_fused_run_trains_peft_s_lora_into_the_same_file(runs, tiny_model_path):
    from safetensors.torch import load_file

    peft, fused = (load_file(run / "lora" / "pytorch_lora_weights.safetensors") for run in runs)
    assert fused.keys() == peft.keys() and len(fused) > 0
    moved = 0.0
    for key in peft:
        assert fused[key].shape == peft[key].shape, key
        # each tensor to 5e-4 of its largest entry (torch 2.13 CPU: 2.3e-5 alone, 1.2e-4 with channels_last, whose
        # convolutions round otherwise); a wrong scale or gradient would be off by the steps, ~1e-2
        assert (fused[key] - peft[key]).abs().max() <= 5e-4 * peft[key].abs().max(), key
        if key.endswith("up.weight"):  # B starts at zero: what the steps moved
            moved = max(moved, peft[key].abs().max().item())
    assert moved > 1e-3
    report = json.loads((runs[1] / "report.json").read_text())["switches"]
    assert report["fused_matmul"] is True and report["fused_lora_layers"] == report["lora_layers"] > 0
    assert json.loads((runs[0] / "report.json").read_text())["switches"]["fused_lora_layers"] == 0
    pipe = tiny_pipeline(tiny_model_path)
    pipe.load_lora_weights(str(runs[1] / "lora"), weight_name="pytorch_lora_weights.safetensors")
    assert pipe.unet.peft_config["default_0"].r == 4
