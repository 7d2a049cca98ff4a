"""model.lora.fused_matmul: the U-Net's LoRA projections as one matmul against a weight merged each step.

peft's LoRA Linear computes `base(x) + lora_B(lora_A(dropout(x))) * s`: per projection two skinny matmuls and an
add in the forward, four skinny matmuls and an add of two input gradients in the backward. With W the frozen
weight (out x in), A = lora_A (r x in), B = lora_B (out x r), both fp32 master copies, s = alpha / rank, the
same function is computed here as

    forward   W' = W + s B A                       (out x in x r: small next to the activations, once a step)
              y  = x W'^T + bias                   (one matmul)
    backward  grad_x = grad_y W'                   (one matmul, only when x needs a gradient)
              g = grad_y B,  h = x A^T             (M x r each; M = the rows of x flattened to 2-D)
              grad_B = s grad_y^T h,  grad_A = s g^T x      (cast to the parameters' dtype, fp32)

inside a `torch.autograd.Function`, so that autograd never forms dL/dW' (a full weight-gradient GEMM, the very
thing a frozen base avoids). W' is computed in the compute dtype: autocast's (fp16/bf16) where autocast is on,
else the frozen weight's. The function keeps peft's parameters (lora_A / lora_B), their names, the saved files
and the checkpoints: only how the step computes the output and the gradients changes.

h is recomputed in the backward from the saved x rather than saved by the forward: x is saved anyway (grad_A
needs it), the fused forward never forms h, so saving it would cost the forward an extra skinny matmul and M x r
of memory per layer, and under gradient checkpointing the forward runs twice (the recomputation would form it
again). Recomputing costs one skinny matmul in the backward, the same FLOPs as forming it in the forward. W' is
saved (out x in in the compute dtype per layer: about 0.2 GB for SD 2.1's projections in fp16, small next to the
activations), so that the backward does not merge again.

Precision. Under fp16 (bf16) the merged weight W' = W + s B A is rounded once to W's precision, so a delta below
half a unit in the last place of W_ij (2^-11 of |W_ij| in fp16, 2^-8 in bf16) does not show in the forward yet,
where peft's path adds the LoRA output to the base output in fp16 and rounds there (relative to |y_i|). This does
not lose training signal:
  - the gradients of A and B are computed from A and B (cast to the compute dtype, as peft's autocast casts
    them), x and grad_y by the same products as peft's backward; W' enters only through the loss's value and
    grad_x, i.e. as a weight perturbed by at most half an ulp of W per element;
  - that perturbation has the size of the error W itself carries from being stored in fp16 (bf16), which every
    run under mixed precision already trains with;
  - A and B are updated in fp32, so updates too small for W's precision accumulate in the master weights (nothing
    is lost as it would be in a pure-fp16 weight) and appear in W' once the delta reaches W's grid.
The forward therefore sees the trained LoRA quantised to W's grid, an error of W's own size; what is learnt is the
same. tests/test_fused_lora.py trains one layer both ways under bf16 autocast and compares the LoRA. A base weight
stored in fp8 would be another matter (the merged weight quantised to fp8 would drop the delta): the two are not
for use together.

Only plain LoRA Linear layers are fused (`qualifies`): one active adapter, not merged, no dropout, no DoRA (or
other peft variant), no LoRA bias, a frozen nn.Linear base, not fan_in_fan_out. Every other layer keeps peft's
forward, and a fused layer falls back to it whenever its adapters are switched off, merged or changed (diffusers'
pipeline calls, `lora_off`).
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

FUSED_ADAPTER = "_sd_lora_fused_adapter"  # attribute of a fused layer: the adapter it fuses


class FusedLoraLinear(torch.autograd.Function):
    """y = x (W + s B A)^T + bias, with the gradients of x, A and B only (W and bias are frozen)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling: float, dtype: torch.dtype):
        a, b = lora_A.to(dtype), lora_B.to(dtype)
        merged = torch.addmm(weight.to(dtype), b, a, alpha=scaling)  # W + s B A, rounded once
        xc = x.to(dtype)
        y = F.linear(xc, merged, None if bias is None else bias.to(dtype))
        ctx.save_for_backward(xc, merged, a, b)
        ctx.scaling, ctx.x_dtype = scaling, x.dtype
        ctx.a_dtype, ctx.b_dtype = lora_A.dtype, lora_B.dtype
        return y

    @staticmethod
    def backward(ctx, grad_y):
        xc, merged, a, b = ctx.saved_tensors
        need_x, need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4]
        grad_y = grad_y.to(merged.dtype)
        grad_x = grad_a = grad_b = None
        if need_x:
            grad_x = torch.matmul(grad_y, merged).to(ctx.x_dtype)
        gy = grad_y.reshape(-1, grad_y.shape[-1])  # M x out
        x2 = xc.reshape(-1, xc.shape[-1])  # M x in
        # the scale goes on the small M x r products before the large fp16 reductions, as in peft's path (where
        # it scales the LoRA's output): a scale < 1 then cannot overflow fp16 earlier than peft would
        if need_a:
            g = (gy @ b) * ctx.scaling  # M x r
            grad_a = (g.t() @ x2).to(ctx.a_dtype)  # r x in
        if need_b:
            h = (x2 @ a.t()) * ctx.scaling  # M x r, recomputed from x (see the module docstring)
            grad_b = (gy.t() @ h).to(ctx.b_dtype)  # out x r
        return grad_x, None, None, grad_a, grad_b, None, None


def fused_forward(layer, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """A qualifying peft LoRA Linear's forward (installed as `layer.forward`); peft's own where the layer's state
    has moved since (adapters off, merged or another adapter active, adapter_names per sample), and where no
    gradient is recorded: the validation loss and images then see the LoRA exactly as its file applies it (the
    merged weight rounds the LoRA's part to the frozen weight's precision), and training loses nothing."""
    name = getattr(layer, FUSED_ADAPTER)
    if (args or kwargs or not torch.is_grad_enabled() or layer.disable_adapters or layer.merged
            or layer.active_adapters != [name]):
        return type(layer).forward(layer, x, *args, **kwargs)
    base = layer.base_layer
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else base.weight.dtype
    return FusedLoraLinear.apply(x, base.weight, base.bias, layer.lora_A[name].weight, layer.lora_B[name].weight,
                                 layer.scaling[name], dtype)


def qualifies(layer) -> bool:
    """A plain peft LoRA Linear: one active adapter, not merged, no dropout, no DoRA or other variant, no LoRA bias,
    a frozen nn.Linear base not stored transposed."""
    from peft.tuners.lora.layer import Linear

    if type(layer) is not Linear or layer.merged or layer.disable_adapters or layer.fan_in_fan_out:
        return False
    active = layer.active_adapters
    if len(active) != 1 or active[0] not in layer.lora_A:
        return False
    name = active[0]
    base = layer.get_base_layer()
    return (isinstance(layer.lora_dropout[name], torch.nn.Identity)
            and name not in getattr(layer, "lora_variant", {}) and not layer.use_dora.get(name, False)
            and layer.lora_A[name].bias is None and layer.lora_B[name].bias is None
            and type(base) is torch.nn.Linear and not base.weight.requires_grad
            and (base.bias is None or not base.bias.requires_grad))


def fuse_lora_layers(module: torch.nn.Module) -> tuple[int, int]:
    """Install the fused forward on every qualifying LoRA layer of `module`; return (fused, LoRA layers)."""
    from peft.tuners.lora.layer import LoraLayer

    layers = [m for m in module.modules() if isinstance(m, LoraLayer)]
    fused = 0
    for layer in layers:
        if qualifies(layer):
            setattr(layer, FUSED_ADAPTER, layer.active_adapters[0])
            # a partial, not a bound method: copy.deepcopy and pickle rebuild it onto the copied layer
            layer.forward = functools.partial(fused_forward, layer)
            fused += 1
    return fused, len(layers)


def is_fused(layer: torch.nn.Module) -> bool:
    return hasattr(layer, FUSED_ADAPTER) and isinstance(layer.__dict__.get("forward"), functools.partial)
