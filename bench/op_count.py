"""How many device operations one training step of the SD 2.1 U-Net dispatches: the host's share of a step.

    python bench/op_count.py [--ranks 0,4]   # on the CPU, in about a minute; no GPU needed

Builds the SD 2.1 U-Net from its architecture (random weights), adds LoRA of each rank (0 = no LoRA,
every weight frozen but the inputs needing grad, so that backward still runs), and runs one forward +
backward at a small latent (the count of operations does not depend on the resolution) under a
TorchDispatchMode that counts every ATen operation reaching the backend, views and other
metadata-only operations apart. In eager mode each counted operation is about one kernel launch on a
GPU, so count x host time per launch is a floor for the step's host time: when it nears the device
time, the step is host-bound. torch.compile (fused kernels) and CUDA graphs (one launch for all) are
the levers against it.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def count_step(unet, lora_rank: int, latent: int) -> tuple[int, int, Counter]:
    import torch
    import torch.nn.functional as F
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops, self.views = Counter(), 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if torch.Tag.view_copy in func.tags or func.is_view or func._schema.name in METADATA_ONLY:
                self.views += 1
            else:
                self.ops[func._schema.name] += 1
            return func(*args, **(kwargs or {}))

    latents = torch.randn(1, 4, latent, latent, requires_grad=lora_rank == 0)
    text = torch.randn(1, 77, unet.config.cross_attention_dim)
    t = torch.tensor([500])
    with Count() as counter:
        pred = unet(latents, t, text, return_dict=False)[0]
        F.mse_loss(pred, torch.zeros_like(pred)).backward()
    return sum(counter.ops.values()), counter.views, counter.ops


METADATA_ONLY = {"aten::detach", "aten::alias", "aten::lift_fresh", "aten::_unsafe_view", "aten::_reshape_alias"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", default="0,4")
    parser.add_argument("--latent", type=int, default=16, help="latent side (96 at 768 px); does not change the count")
    args = parser.parse_args()

    import torch
    from diffusers import UNet2DConditionModel
    from sd21 import SD21_UNET

    from sd_lora.config import Attention, LoraSettings
    from sd_lora.model import add_lora, attention_processor

    print(f"torch {torch.__version__}; SD 2.1 U-Net, one forward + backward at a {args.latent}x{args.latent} latent\n")
    print("| LoRA rank | operations dispatched | views and metadata | top operations |")
    print("|---|---|---|---|")
    for rank in [int(r) for r in args.ranks.split(",")]:
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**SD21_UNET)
        unet.requires_grad_(False)
        if rank:
            add_lora(unet, Attention.sdp, LoraSettings(rank=rank))
        else:
            unet.set_attn_processor(attention_processor(Attention.sdp))
        ops, views, by_name = count_step(unet, rank, args.latent)
        top = ", ".join(f"{name.removeprefix('aten::')} {n}" for name, n in by_name.most_common(6))
        print(f"| {rank or 'none'} | {ops} | {views} | {top} |", flush=True)
        del unet


if __name__ == "__main__":
    main()
