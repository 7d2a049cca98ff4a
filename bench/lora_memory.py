"""Memory of one U-Net training step: peft's LoRA path against the fused matmul, with and without checkpointing.

    python bench/lora_memory.py --device cuda --compile inductor     # SD 2.1 U-Net, 96x96 latent (768 px), batch 4
    python bench/lora_memory.py --device cpu --latent 48 --batch 2    # the same U-Net on the CPU, eager
    python bench/lora_memory.py --device cpu --tiny --latent 8        # the tiny demo U-Net: a smoke test

Written to find why `perf=memory model.lora.fused_matmul=true` peaked 1.44 GiB above `perf=memory` on an H200
(docs/performance.md, 2026-12-02 evening), where the CPU showed no such difference.

Each of the four configurations (LoRA path x gradient checkpointing) runs in a process of its own, since a peak
is per process. It builds the U-Net (SD 2.1's architecture with random weights, bench/sd21.py, or the tiny demo
one), frozen in the compute dtype (fp16 on CUDA, bf16 on the CPU) with LoRA rank 4 on to_q/to_k/to_v/to_out.0 in
fp32 (as the trainer keeps them), channels_last as the presets have it; fuses the LoRA layers or not; turns on
checkpointing or not; compiles the U-Net or not (--compile: a torch.compile backend); runs one warm step under
autocast, then the measured step, and reports:
  saved      what the measured step's forward keeps for its backward, seen through saved_tensors_hooks: the
             distinct tensor storages saved, the frozen parameters and buffers and the step's inputs left out
             (a tensor saved by several ops counts once; a compiled graph's saved activations are seen too).
             Under eager gradient checkpointing (diffusers checkpoints each transformer block, so every LoRA
             layer, non-reentrantly) the checkpoint's own hooks take the saves inside the blocks, so these rows
             see only what lies outside them and are equal for both LoRA paths by construction: the peak is
             the measure there
  peak       CUDA: max_memory_allocated during the measured step, above what was allocated before it; CPU: the
             process's peak RSS over its whole life (model build and warm step included; under --compile the
             compiler's own memory too, so a weak measure there)
  step       the measured step's time (one step: for speed, use bench/train_speed.py)
A configuration that fails or passes --timeout is a row with its error; the others still run. --out FILE also
writes the rows as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

CONFIGS = [(False, False), (False, True), (True, False), (True, True)]  # (fused, checkpointing)


def build_unet(tiny: bool):
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    if tiny:
        from sd_lora.demo import build_tiny_pipeline

        return build_tiny_pipeline().unet
    from sd21 import SD21_UNET

    return UNet2DConditionModel(**SD21_UNET)


class SavedActivations:
    """Counts what autograd saves for the backward while `counting` is on, through saved_tensors_hooks: each
    distinct storage once (a tensor several ops save, or views of one storage, count once), and none of the
    storages of `exclude` (the frozen parameters, buffers and the step's inputs, which the step holds anyway)."""

    def __init__(self, exclude):
        self.skip = {t.untyped_storage().data_ptr() for t in exclude}
        self.storages: dict[int, int] = {}  # storage address -> bytes
        self.counting = False

    def pack(self, tensor):
        if self.counting:
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in self.skip:
                self.storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    def hooks(self):
        import torch

        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda tensor: tensor)

    @property
    def bytes(self) -> int:
        return sum(self.storages.values())


def one(args) -> dict:
    """One configuration, in this process."""
    import resource

    import torch

    from sd_lora.config import Attention, LoraSettings
    from sd_lora.fused_lora import fuse_lora_layers
    from sd_lora.model import add_lora

    fused, checkpointing = args.fused, args.checkpointing
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    torch.set_default_dtype(dtype)  # built in the compute dtype: an fp32 SD 2.1 U-Net would set the CPU's peak
    with torch.device(device):  # on a GPU drawn there: 866M random weights take a while on the host's cores
        unet = build_unet(args.tiny)
    torch.set_default_dtype(torch.float32)
    unet.requires_grad_(False)
    add_lora(unet, Attention.sdp, LoraSettings(rank=4))
    layers = fuse_lora_layers(unet) if fused else None
    if checkpointing:
        unet.enable_gradient_checkpointing()
    unet.to(device, memory_format=torch.channels_last).train()
    model = torch.compile(unet, backend=args.compile) if args.compile else unet
    generator = torch.Generator().manual_seed(0)
    # the trainer's inputs: latents and text embeddings in the compute dtype (sd_lora/loss.py), latents channels_last
    latents = torch.randn(args.batch, unet.config.in_channels, args.latent, args.latent, generator=generator)
    text = torch.randn(args.batch, 77, unet.config.cross_attention_dim, generator=generator)
    latents = latents.to(device, dtype).contiguous(memory_format=torch.channels_last)
    text = text.to(device, dtype)
    timesteps = torch.tensor([10 + 900 * i // max(args.batch - 1, 1) for i in range(args.batch)], device=device)
    saved = SavedActivations((*unet.parameters(), *unet.buffers(), latents, text, timesteps))

    def step() -> None:
        # the same hooks in the warm step as in the measured one: a compiled graph guarded on them is not rebuilt
        with torch.autocast(device.type, dtype=dtype), saved.hooks():
            pred = model(latents, timesteps, text).sample
        pred.float().pow(2).mean().backward()
        unet.zero_grad(set_to_none=True)

    step()  # compiles, warms the allocator
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    saved.counting = True
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if device.type == "cuda":
        peak, kind = torch.cuda.max_memory_allocated() - before, "cuda max_memory_allocated above the start"
    else:
        peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process peak RSS"
    return {"fused": fused, "checkpointing": checkpointing, "fused_layers": layers[0] if layers else None,
            "lora_layers": layers[1] if layers else None, "saved_bytes": saved.bytes,
            "saved_storages": len(saved.storages), "peak_bytes": peak, "peak_kind": kind, "step_s": seconds,
            "batch": args.batch, "latent": args.latent, "compile": args.compile, "tiny": args.tiny,
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}


def run_child(cmd: list[str], timeout: float) -> dict:
    """One configuration in its own process group (a stop at the timeout takes the compiler's workers too)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        stopped = f"stopped after {timeout:g} s"
    else:
        stopped = None
    lines = [line for line in stdout.splitlines() if line.startswith("ROW ")]
    if not lines:
        return {"error": stopped or f"exit {proc.returncode}", "stderr": stderr.strip()[-2000:]}
    # a row printed before a hang or a failure at exit still counts (the measurement was done); the exit says how
    return {**json.loads(lines[-1][4:]), "exit": stopped or proc.returncode}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--tiny", action="store_true", help="the tiny demo U-Net (a smoke test of this script)")
    parser.add_argument("--latent", type=int, default=96, help="latent side: 96 is 768 px")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--compile", default=None, metavar="BACKEND",
                        help="torch.compile the U-Net with this backend: inductor (the trainer's), aot_eager_decomp_partition "
                             "(Inductor's partitioner without its code), ...; default eager")
    parser.add_argument("--timeout", type=float, default=1200, help="stop a configuration after this many s")
    parser.add_argument("--out", type=Path, default=None, help="also write the rows to this JSON file")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # "fused,checkpointing" as 0/1: a child
    args = parser.parse_args()
    if args.one is not None:
        args.fused, args.checkpointing = (flag == "1" for flag in args.one.split(","))
        print("ROW " + json.dumps(one(args)), flush=True)
        return

    import torch

    rows = []
    passed = ["--device", args.device, "--latent", str(args.latent), "--batch", str(args.batch),
              *(["--tiny"] if args.tiny else []), *(["--compile", args.compile] if args.compile else [])]
    for fused, checkpointing in CONFIGS:
        cmd = [sys.executable, __file__, *passed, "--one", f"{int(fused)},{int(checkpointing)}"]
        row = run_child(cmd, args.timeout)
        rows.append({"fused": fused, "checkpointing": checkpointing, **row})
        if "error" in row:
            print(f"fused={fused} checkpointing={checkpointing}: {row['error']}\n{row['stderr']}", file=sys.stderr,
                  flush=True)
    model = "tiny demo" if args.tiny else "SD 2.1"
    if args.out:  # first: nothing below can lose it
        args.out.write_text(json.dumps({"torch": torch.__version__, "device": args.device, "model": model,
                                        "batch": args.batch, "latent": args.latent, "compile": args.compile,
                                        "rows": rows}, indent=1))
    names = {r["device_name"] for r in rows if "device_name" in r}
    print(f"torch {torch.__version__}, {args.device}{' (' + ', '.join(sorted(names)) + ')' if names else ''}; "
          f"{model} U-Net, batch "
          f"{args.batch}, {args.latent}x{args.latent} latent, LoRA rank 4, "
          f"{'compiled: ' + args.compile if args.compile else 'eager'}; peak: "
          f"{'max_memory_allocated above the start of the step' if args.device == 'cuda' else 'the process peak RSS (its whole life)'}\n")
    print("| LoRA path | checkpointing | saved for backward (activations) | peak | step s |")
    print("|---|---|---|---|---|")
    for r in rows:
        path = "peft"
        if r["fused"]:
            path = f"fused ({r['fused_layers']} of {r['lora_layers']} layers)" if "error" not in r else "fused"
        ckpt = "on" if r["checkpointing"] else "off"
        if "error" in r:
            why = r["stderr"].splitlines()[-1][:200] if r["stderr"] else ""
            print(f"| {path} | {ckpt} | failed: {r['error']}{': ' + why if why else ''} | | |")
            continue
        print(f"| {path} | {ckpt} | {r['saved_bytes'] / 2**20:.1f} MiB in {r['saved_storages']} storages | "
              f"{r['peak_bytes'] / 2**30:.3f} GiB | {r['step_s']:.3f} |")
    if any("error" in r or r["exit"] != 0 for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
