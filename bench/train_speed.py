"""Training speed and memory: diffusers' LoRA loop against the framework's presets, in one run.

    python bench/train_speed.py --work /tmp/bench                      # SD 2.1 architecture, 768 px, batch 4, fp16
    python bench/train_speed.py --work /tmp/bench --tiny --device cpu  # smoke test of this script on a CPU
    python bench/train_speed.py --work /tmp/bench --precompile --variants reference,throughput,throughput_gc,...
    python bench/train_speed.py --work /tmp/bench --precompile throughput,nocache_encoders \
        --variants reference,throughput,nocache,nocache_encoders

--precompile compiles the trainer variants (all, or those it names) side by side before any timing (their
first_step_s then shows a warm compile cache, and the compile time is printed once for all).

Builds the SD 2.1-architecture pipeline with random weights (bench/sd21.py) and a synthetic captioned
data set at the training resolution, then measures in this one process tree:
  reference   what diffusers' train_text_to_image_lora.py does each step: VAE encode + text encoder +
              U-Net with AttnProcessor2_0 under fp16 autocast, LoRA rank 4 on to_q/k/v/out.0, foreach
              AdamW, clipping, loss read back every step; no compile, no caching
  the trainer's variants (VARIANTS below: the overrides of each), among them
  throughput  `perf=throughput`, the framework's trainer (`python launch.py`, the loop users run)
  nocache     the same without the cache: the same work per step as the reference
  memory      `perf=memory`
It prints a table: s/step after --skip steps, median and mean (the reference: from one synchronised step's
end to the next, its wait for the batch included, as in the trainer's; the step alone is printed below the
table; the trainer: report.json's median of per-step device-event times and its wall-time mean), images/s, peak allocated memory, MFU (U-Net forward +
backward FLOPs per step, counted with torch.utils.flop_counter, over step time over the measured fp16
matmul rate), and the ratio of images/s to the reference's. Full numbers go to <out>/results.json (the
reference keyed like report.json: seconds_per_step the mean, seconds_per_step_median the median).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import common  # noqa: E402  (bench/common.py, importable once bench/ is on the path)

VARIANTS = {
    # perf=throughput has compile_mode=auto since 2026-11-28: CUDA graphs on one GPU with the cache, none
    # without it. *_nographs and *_graphs set the mode explicitly
    "throughput": ["perf=throughput"],
    "throughput_nographs": ["perf=throughput", "trainer.compile_mode=null"],
    "nocache": ["perf=throughput", "dataset.cache=false"],
    "nocache_encoders": ["perf=throughput", "dataset.cache=false", "trainer.compile_encoders=true"],
    "nocache_encoders_graphs": ["perf=throughput", "dataset.cache=false", "trainer.compile_encoders=true",
                                "trainer.compile_mode=reduce-overhead"],
    "memory": ["perf=memory"],
    "memory_graphs": ["perf=memory", "trainer.compile_mode=reduce-overhead"],
    "throughput_cudnn": ["perf=throughput", "model.sdp_kernel=cudnn"],
    "throughput_flash": ["perf=throughput", "model.sdp_kernel=flash"],
    "throughput_autotune": ["perf=throughput", "trainer.kernel_autotune=true"],
    "throughput_gc": ["perf=throughput", "trainer.gc_every_n_steps=50"],
    "eager": ["perf=none"],  # the framework with no levers at all
    # model.lora.train_text_encoder: the text encoder's LoRA trains too (its forward and backward every step)
    "throughput_te": ["perf=throughput", "model.lora.train_text_encoder=true"],
    "memory_te": ["perf=memory", "model.lora.train_text_encoder=true"],
    # model.base_precision=fp8: the U-Net's frozen Linear weights and their matmuls in float8 (Ada/Hopper)
    "throughput_fp8": ["perf=throughput", "model.base_precision=fp8"],
    "memory_fp8": ["perf=memory", "model.base_precision=fp8"],
    # profiled: 5 steps after skip under torch.profiler; its operator table and busy-time summary go to --out.
    # Its step times hold the profiler's cost: read the speed from the unprofiled rows
    "throughput_profile": ["perf=throughput", "trainer.profile_steps=5"],
    "throughput_nographs_profile": ["perf=throughput", "trainer.compile_mode=null", "trainer.profile_steps=5"],
    "nocache_profile": ["perf=throughput", "dataset.cache=false", "trainer.profile_steps=5"],
}


def matmul_tflops(device: str) -> float | None:
    import torch

    if device != "cuda":
        return None
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 2 * 8192**3 * 10 / (time.perf_counter() - start) / 1e12


def unet_flops(model_path: Path, batch: int, resolution: int, device: str) -> float:
    """FLOPs of one U-Net forward + backward with LoRA at this batch and resolution."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from sd_lora.config import Attention, LoraSettings, ModelConfig
    from sd_lora.model import add_lora, load_components

    dtype = torch.float16 if device == "cuda" else torch.float32
    model_cfg = ModelConfig(pretrained_model_name_or_path=str(model_path))
    comps = load_components(model_cfg, model_path, dtype=dtype)
    unet = comps.unet.to(device)
    add_lora(unet, Attention.sdp, LoraSettings(rank=4))
    side = resolution // 8
    latents = torch.randn(batch, 4, side, side, device=device, dtype=dtype)
    text = torch.randn(batch, 77, unet.config.cross_attention_dim, device=device, dtype=dtype)
    t = torch.randint(0, 1000, (batch,), device=device)
    with FlopCounterMode(display=False) as counter:
        with torch.autocast(device, dtype=dtype, enabled=device == "cuda"):
            out = unet(latents, t, text).sample
        out.float().pow(2).mean().backward()
    return float(counter.get_total_flops())


def reference_loop(model_path: Path, data: Path, args) -> dict:
    """diffusers' train_text_to_image_lora.py step, written out (LoRA, fp16 autocast, SDPA, foreach AdamW)."""
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator
    from diffusers.models.attention_processor import AttnProcessor2_0
    from peft import LoraConfig

    from sd_lora.config import DatasetConfig, ModelConfig
    from sd_lora.data import CaptionedImages, build_dataloader, load_table
    from sd_lora.families import family_of
    from sd_lora.model import load_components

    mixed = "fp16" if args.device == "cuda" else "no"
    accelerator = Accelerator(mixed_precision=mixed, cpu=args.device == "cpu")
    dtype = torch.float16 if mixed == "fp16" else torch.float32
    torch.manual_seed(0)
    model_cfg = ModelConfig(pretrained_model_name_or_path=str(model_path))
    comps = load_components(model_cfg, model_path, dtype=dtype)
    unet, vae, (text_encoder,), sched = comps.unet, comps.vae, comps.text_encoders, comps.noise_scheduler
    for m in (unet, vae, text_encoder):
        m.to(accelerator.device)
    unet.set_attn_processor(AttnProcessor2_0())
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    optimizer = torch.optim.AdamW(params, lr=1e-4)  # foreach, as torch picks on CUDA
    dataset_cfg = DatasetConfig(path=str(data), resolution=args.resolution, center_crop=True, random_flip=True)
    tokenize = functools.partial(family_of(model_cfg).tokenize, comps.tokenizers)
    loader = build_dataloader(CaptionedImages(load_table(dataset_cfg), dataset_cfg, tokenize),
                              args.batch, args.workers, 0, pin_memory=args.device == "cuda")
    unet, optimizer, loader = accelerator.prepare(unet, optimizer, loader)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, iterations, step = [], [], 0
    previous_end = time.perf_counter()
    while step < args.steps:
        for batch in loader:
            start = time.perf_counter()
            latents = vae.encode(batch["pixel_values"].to(dtype)).latent_dist.sample() * vae.config.scaling_factor
            noise = torch.randn_like(latents)
            t = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],), device=latents.device)
            noisy = sched.add_noise(latents, noise, t)
            ehs = text_encoder(batch["input_ids"], return_dict=False)[0]
            target = sched.get_velocity(latents, noise, t)
            pred = unet(noisy, t, ehs, return_dict=False)[0]
            loss = F.mse_loss(pred.float(), target.float(), reduction="mean")
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad()
            loss.item()  # the script reads the loss back every step (train_loss += avg_loss.item())
            end = time.perf_counter()
            times.append(end - start)  # the step alone
            iterations.append(end - previous_end)  # and the wait for its batch, as the trainer's step times hold
            previous_end = end
            step += 1
            if step >= args.steps:
                break
    timed, timed_iterations = times[args.skip:], iterations[args.skip:]
    peak = torch.cuda.max_memory_allocated() if args.device == "cuda" else None
    # like for like with the trainer, whose step times run from one step's end to the next: batch wait included
    # keyed as the trainer's report.json: seconds_per_step the mean, seconds_per_step_median the median
    return {"seconds_per_step_median": statistics.median(timed_iterations),
            "seconds_per_step": statistics.mean(timed_iterations),
            "step_only_median_s": statistics.median(timed), "step_only_mean_s": statistics.mean(timed),
            "peak_memory_bytes": peak, "first_step_s": times[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/sd_lora_bench")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--tiny", action="store_true", help="the tiny demo model instead of SD 2.1 (smoke test)")
    parser.add_argument("--resolution", type=int, default=None)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--skip", type=int, default=10)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--variants", default="reference,nocache,throughput,memory")
    parser.add_argument("--precompile", nargs="?", const="all", default=None,
                        help="first run the trainer variants at once for 2 steps, filling Inductor's cache in parallel: "
                             "all of them, or those named (comma-separated; a variant whose graphs another one "
                             "compiles needs no place here)")
    parser.add_argument("--out", default=None, help="folder for results.json and the runs' logs (default: --work)")
    args = parser.parse_args()
    args.resolution = args.resolution or (64 if args.tiny else 768)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    args.out = Path(args.out or work)
    args.out.mkdir(parents=True, exist_ok=True)

    from sd_lora.demo import ensure_tiny_model, write_shapes

    t0 = time.perf_counter()
    model_path = ensure_tiny_model(work / "models") if args.tiny else __import__("sd21").build_sd21(work / "sd21")
    data = work / f"shapes{args.resolution}"
    if not (data / "metadata.jsonl").is_file():
        write_shapes(data, size=args.resolution)
    print(f"model and data ready in {time.perf_counter() - t0:.0f} s", flush=True)

    import torch

    facts = {**common.facts(args.device), "resolution": args.resolution, "batch": args.batch, "steps": args.steps,
             "skip": args.skip}
    facts["matmul_tflops"] = matmul_tflops(args.device)
    facts["unet_flops"] = unet_flops(model_path, args.batch, args.resolution, args.device)
    torch.cuda.empty_cache() if args.device == "cuda" else None
    print(json.dumps(facts), flush=True)

    base = common.base_overrides(args.device, model_path, data, args.resolution, args.workers, args.batch, args.work,
                                 args.steps, args.skip)
    runs = Path(args.work) / "runs"
    if args.precompile:
        names = args.variants.split(",") if args.precompile == "all" else args.precompile.split(",")
        common.precompile([(f"precompile-{n}", [*base, *VARIANTS[n]], runs / f"precompile-{n}", None)
                           for n in names if n != "reference"], out=args.out)
    results = {}
    for name in args.variants.split(","):
        t = time.perf_counter()
        if name == "reference":
            results[name] = reference_loop(model_path, data, args)
            if args.device == "cuda":
                torch.cuda.empty_cache()
        else:
            results[name] = common.run_trainer(name, [*base, *VARIANTS[name]], runs / name, args.out)
        print(f"{name}: done in {time.perf_counter() - t:.0f} s: {json.dumps(results[name], default=str)[:400]}",
              flush=True)
        (args.out / "results.json").write_text(json.dumps({"facts": facts, "results": results}, indent=2, default=str))
    print_table(facts, results, args.batch)


def step_times(r: dict) -> tuple[float | None, float | None]:
    """(median, mean) s/step of a reference result or a trainer report (keyed alike)."""
    return r.get("seconds_per_step_median"), r.get("seconds_per_step")


def print_table(facts: dict, results: dict, batch: int) -> None:
    ref, ref_mean = step_times(results.get("reference", {}))
    rows = []
    for name, r in results.items():
        s, mean = step_times(r)
        if "error" in r or not s:
            rows.append(f"| {name} | failed | | | | | |")
            continue
        peak = r.get("peak_memory_bytes")
        mfu = facts["unet_flops"] / s / (facts["matmul_tflops"] * 1e12) if facts.get("matmul_tflops") else None
        ratio = f"{ref / s:.2f}x / {ref_mean / mean:.2f}x" if ref else "-"
        peak_text = f"{peak / 2**30:.2f} GiB" if peak else "-"
        rows.append(f"| {name} | {s:.4f} / {mean:.4f} | {batch / s:.1f} / {batch / mean:.1f} | {peak_text} | "
                    + (f"{mfu:.1%}" if mfu else "-") + f" | {ratio} | {r.get('first_step_s') or 0:.1f} |")
    print(f"\n{facts.get('card', facts['device'])}, torch {facts['torch']}, diffusers {facts['diffusers']}, "
          f"{facts['resolution']} px, batch {batch}, U-Net fwd+bwd {facts['unet_flops'] / 1e12:.2f} TFLOP/step, "
          f"fp16 matmul {facts.get('matmul_tflops') or 0:.0f} TFLOP/s")
    print("| variant | s/step (median / mean) | images/s (median / mean) | peak memory | MFU (median) "
          "| vs reference (median / mean) | first step s |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    r = results.get("reference", {})
    if r.get("step_only_median_s"):
        step_only = r["step_only_median_s"]
        print(f"\nThe reference's times run from one step's end to the next, as the trainer's do (its wait for "
              f"the next batch included). Without that wait: {step_only:.4f} s/step median, "
              f"{r['step_only_mean_s']:.4f} mean; the trainer's rows against it: " + ", ".join(
                  f"{name} {step_only / step_times(x)[0]:.2f}x" for name, x in results.items()
                  if name != "reference" and step_times(x)[0]))

if __name__ == "__main__":
    main()
