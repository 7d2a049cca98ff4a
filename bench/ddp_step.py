"""What several GPUs cost the U-Net step itself: SD 2.1 U-Net + LoRA on synthetic inputs, no data loader.

    torchrun --nproc_per_node N bench/ddp_step.py --model DIR --modes solo,ddp,ddp_static,ddp_nosync
    torchrun --nproc_per_node 2 bench/ddp_step.py --model TINY --resolution 64 --steps 4 --skip 1  # CPU try-out

Each process trains the LoRA U-Net on its own GPU with inputs of the cached-latent shape (batch 4,
4 x 96 x 96 latents, 77 x 1024 text states), fp16 autocast, grad scaler, clipping, fused AdamW,
channels_last: the trainer's step with `dataset.cache=true`, without its data loader. Modes:
  solo        no DDP: the processes only share the machine (do busy GPUs slow each other down?)
  ddp         DistributedDataParallel as accelerate builds it (bucket views off, dynamic graph)
  ddp_static  static_graph=True, gradient_as_bucket_view=True
  ddp_nosync  ddp inside no_sync(): DDP's hooks but no all-reduce
  ddp_onegraph  ddp with torch._dynamo.config.optimize_ddp=False (with --compile: one graph, not one per bucket)
--compile compiles each mode's model as accelerate does (torch.compile after the DDP wrapping); every mode
then compiles anew (a cold compile of this U-Net takes minutes).
Step times come from CUDA events (no host sync per step); each process's median is gathered and rank 0
prints one JSON line per mode and round: {"mode", "position", "world_size", "compiled", "median_s"
(slowest rank), "per_rank", "p90_per_rank"}. Modes run --rounds times, every other round in reverse order, so that a card warming up over
the run does not pass for the cost of a mode.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--modes", default="solo,ddp,ddp_static,ddp_nosync")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=2,
                        help="run the modes this many times, every other round in reverse order (the card warms up)")
    parser.add_argument("--skip", type=int, default=10)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=768)
    args = parser.parse_args()

    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel

    from sd_lora.config import Attention, LoraSettings, ModelConfig
    from sd_lora.devices import build_backend
    from sd_lora.model import add_lora, load_components

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    cuda = torch.cuda.is_available()  # the CPU (gloo, fp32) only to try this script out with a tiny model
    backend = build_backend("cuda" if cuda else "cpu")
    device = backend.device(local)
    dtype = torch.float16 if cuda else torch.float32
    if cuda:
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    comps = load_components(ModelConfig(pretrained_model_name_or_path=args.model), Path(args.model), dtype=dtype)
    unet = comps.unet
    params = add_lora(unet, Attention.sdp, LoraSettings(rank=4))
    unet.to(device, memory_format=torch.channels_last).train()
    side = args.resolution // 8
    gen = torch.Generator(device).manual_seed(rank)
    latents = torch.randn(args.batch, 4, side, side, device=device, generator=gen, dtype=dtype)
    text = torch.randn(args.batch, 77, unet.config.cross_attention_dim, device=device, generator=gen, dtype=dtype)

    modes = args.modes.split(",")
    order = [m for r in range(args.rounds) for m in (modes if r % 2 == 0 else modes[::-1])]
    for position, mode in enumerate(order):
        model = unet
        if mode.startswith("ddp"):
            extra = dict(static_graph=True, gradient_as_bucket_view=True) if mode == "ddp_static" else {}
            model = DistributedDataParallel(unet, device_ids=[local] if cuda else None, **extra)
        torch._dynamo.config.optimize_ddp = mode != "ddp_onegraph"
        if args.compile:
            torch._dynamo.reset()
            model = torch.compile(model)
        optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)
        scaler = torch.amp.GradScaler(device.type, enabled=cuda)
        marks = []
        for step in range(args.steps + 1):
            marks.append(backend.step_mark())  # a CUDA event (no host sync), or the clock on the CPU
            if step == args.steps:
                break
            t = torch.randint(0, 1000, (args.batch,), device=device, generator=gen)
            noise = torch.randn(latents.shape, device=device, generator=gen, dtype=latents.dtype)
            sync = model.no_sync() if mode == "ddp_nosync" else contextlib.nullcontext()
            with sync:
                with torch.autocast(device.type, dtype=torch.float16, enabled=cuda):
                    pred = model(latents + noise, t, text).sample
                loss = F.mse_loss(pred.float(), noise.float())
                scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
        times = [b.seconds_since(a) for a, b in zip(marks, marks[1:])][args.skip:]
        p90 = sorted(times)[math.ceil(0.9 * len(times)) - 1]  # nearest rank, as the trainer's report
        median = torch.tensor([statistics.median(times), p90], device=device)
        everyone = [torch.zeros_like(median) for _ in range(world)]
        dist.all_gather(everyone, median)
        if rank == 0:
            per_rank = [round(float(x[0]), 5) for x in everyone]
            p90_per_rank = [round(float(x[1]), 5) for x in everyone]
            print(json.dumps({"mode": mode, "position": position, "world_size": world, "compiled": args.compile,
                              "median_s": max(per_rank), "per_rank": per_rank, "p90_per_rank": p90_per_rank}),
                  flush=True)
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
