"""model.base_precision=fp8: the U-Net's frozen Linear weights in float8, their matmuls in float8.

Like kohya's --fp8_base, but for speed too: each frozen nn.Linear of the U-Net (the base layer inside peft's
LoRA layers included; the LoRA matrices and everything trained stay as they are) keeps its weight in
float8_e4m3fn with one scale per tensor, computed once (the weight never changes). The forward matmul and the
input-gradient matmul run in float8 through `torch._scaled_mm` (cuBLASLt's fp8 GEMM on Ada/Hopper), the input
and the incoming gradient scaled per tensor from their amax at each call (e4m3 for activations, e5m2 for
gradients, whose range matters more). No gradient reaches the weight or the bias (frozen).

`_scaled_mm` wants mat1 row-major and mat2 column-major, so the weight is kept in both layouts: (out, in)
for the forward, (in, out) for the backward, each contiguous: together the bytes of the fp16 weight they
replace. Per-tensor scaling, not rowwise: rowwise needs a bf16 output on sm90, and fp16 is the default here.

Each process quantizes the same weights from disk alike, so DDP neither broadcasts nor checks them (its gloo
backend cannot send float8 at all). Nothing saves them: checkpoints and the LoRA file hold the LoRA only, and
export/generate load the base weights from disk.
"""

from __future__ import annotations

import logging

import torch

from sd_lora.config import BasePrecision, Config
from sd_lora.devices import Backend
from sd_lora.errors import UserError

log = logging.getLogger(__name__)

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
E4M3_MAX, E5M2_MAX = torch.finfo(E4M3).max, torch.finfo(E5M2).max  # 448, 57344
MIN_AMAX = 1e-12  # an all-zero tensor gets this amax: its scale stays finite and it quantizes to zeros
ALIGN = 16  # _scaled_mm's (cuBLASLt's) rule for both dimensions of mat2


def check_base_precision(cfg: Config, backend: Backend) -> None:
    """model.base_precision=fp8 where the device has no float8 matmul: refused before any weights load."""
    if cfg.model.base_precision is not BasePrecision.fp8:
        return
    missing = backend.fp8_matmul_missing()
    if missing:
        raise UserError(f"model.base_precision=fp8 needs float8 matmuls (torch._scaled_mm), and device={backend.name} "
                        f"has none: {missing}; set model.base_precision=null (the frozen weights in the precision's "
                        "dtype)")


def quantize(t: torch.Tensor, dtype: torch.dtype, largest: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`t` as `dtype` scaled to its range by one fp32 scale (t ~ q * scale), and that scale."""
    scale = t.abs().amax().float().clamp(min=MIN_AMAX) / largest
    return (t / scale).clamp(-largest, largest).to(dtype), scale


class _Fp8Matmul(torch.autograd.Function):
    """y = x W^T + b with x (M, in) quantized to e4m3 at each call; the input's gradient dy W with dy in e5m2."""

    @staticmethod
    def forward(ctx, x, weight, weight_t, weight_scale, bias, out_dtype):
        x8, x_scale = quantize(x, E4M3, E4M3_MAX)
        fused = bias is not None and out_dtype != torch.float32  # CUDA's _scaled_mm takes no bias for fp32 outputs
        y = torch._scaled_mm(x8, weight.t(), scale_a=x_scale, scale_b=weight_scale, out_dtype=out_dtype,
                             bias=bias.to(out_dtype) if fused else None)
        if bias is not None and not fused:
            y = y + bias.to(out_dtype)
        ctx.save_for_backward(weight_t, weight_scale)
        ctx.x_dtype = x.dtype
        return y

    @staticmethod
    def backward(ctx, grad_out):
        weight_t, weight_scale = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            g8, g_scale = quantize(grad_out.contiguous(), E5M2, E5M2_MAX)
            grad_x = torch._scaled_mm(g8, weight_t.t(), scale_a=g_scale, scale_b=weight_scale,
                                      out_dtype=ctx.x_dtype)
        return grad_x, None, None, None, None, None


class Fp8Linear(torch.nn.Module):
    """A frozen nn.Linear whose weight is float8_e4m3fn with one scale: `weight` (out, in) and `weight_t`
    (in, out), each contiguous, and `weight_scale` (weight ~ weight.float() * weight_scale); the bias as it was.

    The output is in the autocast dtype under autocast, else in the input's dtype (fp32 at precision=fp32)."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        with torch.no_grad():
            w8, scale = quantize(linear.weight.detach().float(), E4M3, E4M3_MAX)
        self.weight = torch.nn.Parameter(w8, requires_grad=False)
        self.weight_t = torch.nn.Parameter(w8.t().contiguous(), requires_grad=False)
        self.register_buffer("weight_scale", scale)
        self.bias = linear.bias  # frozen too, in the precision's dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device = x.device.type
        out_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        # autocast does not reach inside a Function: x comes as the previous op left it (fp32 after a LayerNorm
        # under fp16 autocast) and is quantized from that; its gradient goes back in that dtype
        flat = x.reshape(-1, self.in_features).contiguous()
        y = _Fp8Matmul.apply(flat, self.weight, self.weight_t, self.weight_scale, self.bias, out_dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def _apply(self, fn, recurse=True):
        # .to(device) moves the float8 tensors; a dtype cast (module.to(torch.float16), module.half()) would lose
        # their scale's meaning, so they are cast back: float8 values are exact in fp16, bf16 and fp32
        def keep_float8(t):
            out = fn(t)
            return out.to(t.dtype) if t.dtype in (E4M3, E5M2) and out.dtype != t.dtype else out

        return super()._apply(keep_float8, recurse)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, fp8"


def convertible(module: torch.nn.Module) -> bool:
    """A frozen nn.Linear (not a LoRA matrix) whose sizes _scaled_mm takes."""
    return (type(module) is torch.nn.Linear and not module.weight.requires_grad
            and module.in_features % ALIGN == 0 and module.out_features % ALIGN == 0)


def to_fp8_base(unet: torch.nn.Module) -> int:
    """Replace the U-Net's frozen nn.Linear layers (peft's base layers included) by Fp8Linear, in place; the
    original weights are freed. After LoRA injection (PiSSA/OLoRA then quantize the residual they leave),
    on the device. Returns the number of layers converted; the names of their float8 tensors go to DDP's
    ignore list."""
    count, ignored = 0, []
    # the parents only: a list of every module would keep each replaced weight alive until the end
    parents = [(n, m) for n, m in unet.named_modules() if any(convertible(c) for c in m.children())]
    for parent_name, parent in parents:
        for name, child in list(parent.named_children()):
            if not convertible(child):
                continue
            setattr(parent, name, Fp8Linear(child))
            prefix = f"{parent_name}.{name}" if parent_name else name
            ignored += [f"{prefix}.weight", f"{prefix}.weight_t", f"{prefix}.weight_scale"]
            count += 1
    unet._ddp_params_and_buffers_to_ignore = [*getattr(unet, "_ddp_params_and_buffers_to_ignore", []), *ignored]
    return count
