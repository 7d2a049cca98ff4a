"""SDPA kernels on the SD 2.1 U-Net's attention shapes at 768 px: forward + backward time of each kernel.

    python bench/attention.py [--batch 4] [--dtype fp16]

The U-Net's self-attention at the four levels of a 96 x 96 latent (9216, 2304, 576, 144 tokens; 5, 10,
20, 20 heads of 64) and its cross-attention to 77 text tokens. For each shape, each kernel torch has
(flash, memory-efficient, cuDNN, math) and torch's own choice ("auto", what `model.sdp_kernel=auto`
gets) are timed with CUDA events; a kernel that cannot run a shape is marked "n/a". The last row
weights each shape by how often SD 2.1 runs it per U-Net pass, which is what `model.sdp_kernel` changes.
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

# (name, query tokens, key tokens, heads, uses per U-Net forward)
# SD 2.1: one transformer block per attention layer; 2 in each down level, 1 in the mid block, 3 in each up level
SHAPES = [
    ("self 96x96", 9216, 9216, 5, 5),
    ("self 48x48", 2304, 2304, 10, 5),
    ("self 24x24", 576, 576, 20, 5),
    ("self 12x12", 144, 144, 20, 1),
    ("cross 96x96", 9216, 77, 5, 5),
    ("cross 48x48", 2304, 77, 10, 5),
    ("cross 24x24", 576, 77, 20, 5),
    ("cross 12x12", 144, 77, 20, 1),
]
KERNELS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
           "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}


def time_fwd_bwd(q, k, v, backend, repeats: int) -> float | None:
    ctx = sdpa_kernel([backend]) if backend is not None else torch.enable_grad()
    try:
        with ctx:
            for _ in range(3):
                F.scaled_dot_product_attention(q, k, v).sum().backward()
            times = []
            for _ in range(repeats):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                F.scaled_dot_product_attention(q, k, v).sum().backward()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1000)
    except RuntimeError:
        return None
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--dtype", choices=["fp16", "bf16"], default="fp16")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    dtype = torch.float16 if args.dtype == "fp16" else torch.bfloat16
    names = ["auto", *KERNELS]
    totals = dict.fromkeys(names, 0.0)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, batch {args.batch}, {args.dtype}; "
          f"forward + backward, ms (median of {args.repeats})\n")
    print("| shape | uses | " + " | ".join(names) + " |\n|---|---|" + "---|" * len(names))
    for name, sq, sk, heads, uses in SHAPES:
        q = torch.randn(args.batch, heads, sq, 64, device="cuda", dtype=dtype, requires_grad=True)
        k = torch.randn(args.batch, heads, sk, 64, device="cuda", dtype=dtype, requires_grad=True)
        v = torch.randn(args.batch, heads, sk, 64, device="cuda", dtype=dtype, requires_grad=True)
        row = []
        for kernel in names:
            if kernel == "math" and sq * sk > 2304 * 2304:  # the attention matrix alone is gigabytes
                row.append("skipped")
                totals[kernel] = float("nan")
                continue
            t = time_fwd_bwd(q, k, v, KERNELS.get(kernel), args.repeats)
            row.append("n/a" if t is None else f"{t * 1000:.2f}")
            totals[kernel] += float("nan") if t is None else t * uses
        print(f"| {name} | {uses} | " + " | ".join(row) + " |")
    print("| per U-Net step (x uses) | | " + " | ".join(f"{totals[n] * 1000:.1f}" for n in names) + " |")


if __name__ == "__main__":
    main()
