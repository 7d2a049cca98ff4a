"""Training speed and memory: diffusers' unmodified LoRA script against the framework's presets, in one run.

    python bench/train_speed.py --work /tmp/bench --reference-script ../shared/reference/train_text_to_image_lora.py
    python bench/train_speed.py --work /tmp/bench --model sdxl \
        --reference-script ../shared/reference/train_text_to_image_lora_sdxl.py --variants script,throughput
    python bench/train_speed.py --work /tmp/bench --reference-script ... --batch 4,8,16 --variants script,throughput

    python bench/train_speed.py --work /tmp/bench                      # SD 2.1 architecture, 768 px, batch 4, fp16
    python bench/train_speed.py --work /tmp/bench --tiny --device cpu  # smoke test of this script on a CPU
    python bench/train_speed.py --work /tmp/bench --precompile --variants reference,throughput,throughput_gc,...
    python bench/train_speed.py --work /tmp/bench --precompile throughput,nocache_encoders \
        --variants reference,throughput,nocache,nocache_encoders

--precompile compiles the trainer variants (all, or those it names) side by side before any timing (their
first_step_s then shows a warm compile cache, and the compile time is printed once for all).

Builds the SD 2.1-architecture pipeline with random weights (bench/sd21.py; SDXL's with --model sdxl,
bench/sdxl.py) and a synthetic captioned data set at the training resolution, then measures in this one
process tree:
  script      diffusers' own train_text_to_image_lora.py (or _sdxl.py), unmodified, the file --reference-script
              names, run by the step timer beside it (step_timer.py: a CUDA-synchronised timestamp at each
              optimizer step) on the same model, data, resolution and batch: the baseline of every ratio
  reference   what diffusers' train_text_to_image_lora.py does each step: VAE encode + text encoder +
              U-Net with AttnProcessor2_0 under fp16 autocast, LoRA rank 4 on to_q/k/v/out.0, foreach
              AdamW, clipping, loss read back every step; no compile, no caching
  the trainer's variants (VARIANTS below: the overrides of each), among them
  throughput  `perf=throughput`, the framework's trainer (`python launch.py`, the loop users run)
  nocache     the same without the cache: the same work per step as the reference
  memory      `perf=memory`
With several batch sizes (--batch 4,8,16) each row runs at each, named name@bN, its ratio taken to the
script's (or the reference loop's) row of the same batch. --val-loss holds out a tenth of the data and
puts each trainer row's validation loss after the last step in the table (fixed timesteps and noise, so
rows of one run compare: fp8 against fp16, say).
It prints a table: s/step after --skip steps, median and mean (the reference: from one synchronised step's
end to the next, its wait for the batch included, as in the trainer's; the step alone is printed below the
table; the trainer: report.json's median of per-step device-event times and its wall-time mean), images/s, peak allocated memory, MFU (U-Net forward +
backward FLOPs per step, counted with torch.utils.flop_counter, over step time over the measured fp16
matmul rate), and the ratio of images/s to the script's (without --reference-script, to the reference loop's). Full numbers go to <out>/results.json (the
reference keyed like report.json: seconds_per_step the mean, seconds_per_step_median the median).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
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
    # model.lora.fused_matmul (in perf=throughput since 2026-12-02: each U-Net LoRA projection one matmul against
    # W + s·B·A, sd_lora/fused_lora.py): the preset without it (peft's three-matmul path); perf=memory with it
    "throughput_unfused": ["perf=throughput", "model.lora.fused_matmul=false"],
    "memory_fused": ["perf=memory", "model.lora.fused_matmul=true"],
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


def unet_flops(model_path: Path, batch: int, resolution: int, device: str, family: str = "sd") -> float:
    """FLOPs of one U-Net forward + backward with LoRA at this batch and resolution."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from sd_lora.config import Attention, LoraSettings, ModelConfig, ModelFamilyName
    from sd_lora.model import add_lora, load_components

    dtype = torch.float16 if device == "cuda" else torch.float32
    model_cfg = ModelConfig(pretrained_model_name_or_path=str(model_path), family=ModelFamilyName(family))
    comps = load_components(model_cfg, model_path, dtype=dtype)
    unet = comps.unet.to(device)
    add_lora(unet, Attention.sdp, LoraSettings(rank=4))
    side = resolution // 8
    latents = torch.randn(batch, 4, side, side, device=device, dtype=dtype)
    text = torch.randn(batch, 77, unet.config.cross_attention_dim, device=device, dtype=dtype)
    t = torch.randint(0, 1000, (batch,), device=device)
    added = None
    if unet.config.addition_embed_type == "text_time":  # SDXL: the pooled embedding and the six size numbers
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        added = {"text_embeds": torch.randn(batch, pooled, device=device, dtype=dtype),
                 "time_ids": torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * batch,
                                          device=device, dtype=dtype)}
    with FlopCounterMode(display=False) as counter:
        with torch.autocast(device, dtype=dtype, enabled=device == "cuda"):
            out = unet(latents, t, text, added_cond_kwargs=added).sample
        out.float().pow(2).mean().backward()
    flops = float(counter.get_total_flops())
    del unet, comps, out
    return flops


def script_row(script: Path, timer: Path, model_path: Path, data: Path, args, batch: int, out: Path) -> dict:
    """diffusers' own script, unmodified, under the step timer beside it; its BENCH_RESULT keyed as report.json is
    (seconds_per_step the mean, seconds_per_step_median the median), or {"error": ...}. Same model, data,
    resolution, batch, fp16 (fp32 on the CPU) and loader workers as the trainer rows; LoRA rank 4 on
    to_q/k/v/out.0 is both sides' default; no validation, no checkpoint within the run. (With --val-loss the
    trainer rows train on nine tenths of the data and the script on all of it.)"""
    import subprocess

    run_dir = Path(args.work) / "runs" / f"script-b{batch}"
    command = [sys.executable, str(timer), "script", str(args.skip), str(script),
               "--pretrained_model_name_or_path", str(model_path), "--train_data_dir", str(data),
               "--resolution", str(args.resolution), "--center_crop", "--random_flip",
               "--train_batch_size", str(batch), "--max_train_steps", str(args.steps), "--learning_rate", "1e-4",
               "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
               "--mixed_precision", "fp16" if args.device == "cuda" else "no",
               "--dataloader_num_workers", str(args.workers), "--checkpointing_steps", "1000000", "--seed", "42",
               "--output_dir", str(run_dir)]
    env = {**os.environ, "BENCH_BS": str(batch), "PYTHONUNBUFFERED": "1"}
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    start = time.perf_counter()
    # its own process group, so that a stop at --run-timeout takes its loader workers too
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    stdout, stderr = common.communicate(proc, args.run_timeout, run_dir)
    code = proc.returncode
    (out / f"script-b{batch}.log").write_text(stdout[-20000:] + stderr[-20000:])
    found = [line for line in stdout.splitlines() if line.startswith("BENCH_RESULT ")]
    result = json.loads(found[-1][len("BENCH_RESULT "):]) if found else {}
    if code != 0 or "s_per_step_median" not in result:
        print(f"script (batch {batch}): failed (exit {code}):\n{stderr[-3000:]}", flush=True)
        return {"error": stderr[-500:], **result}
    peak = result.get("peak_alloc_GiB_during_training")
    return {"seconds_per_step_median": result["s_per_step_median"], "seconds_per_step": result["s_per_step_mean"],
            "peak_memory_bytes": peak * 2**30 if peak is not None else None,
            "first_step_s": result.get("first_step_s"), "process_wall_s": time.perf_counter() - start,
            "step_timer": result}


def reference_loop(model_path: Path, data: Path, args, batch: int) -> dict:
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
                              batch, args.workers, 0, pin_memory=args.device == "cuda")
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
    parser.add_argument("--model", default="sd21", choices=["sd21", "sdxl"],
                        help="the architecture, built with random weights: SD 2.1 (768 px) or SDXL base 1.0 (1024 px)")
    parser.add_argument("--tiny", action="store_true", help="the tiny demo model of --model's layout (smoke test)")
    parser.add_argument("--reference-script", type=Path, default=None,
                        help="diffusers' train_text_to_image_lora.py (or _sdxl.py for --model sdxl), unmodified: the "
                             "'script' row, timed by the step_timer.py beside it (or --step-timer)")
    parser.add_argument("--step-timer", type=Path, default=None)
    parser.add_argument("--resolution", type=int, default=None)
    parser.add_argument("--batch", default="4", help="batch size, or several: 4,8,16 (each row runs at each)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--skip", type=int, default=10)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--variants", default=None,
                        help="rows, in order (default: script,throughput,memory with --reference-script, else "
                             "reference,nocache,throughput,memory); trainer variants: " + ",".join(VARIANTS))
    parser.add_argument("--precompile", nargs="?", const="all", default=None,
                        help="first run the trainer variants at once for 2 steps, filling Inductor's cache in parallel: "
                             "all of them, or those named (comma-separated; a variant whose graphs another one "
                             "compiles needs no place here), at every batch size")
    parser.add_argument("--val-loss", action="store_true",
                        help="hold out a tenth of the data; each trainer row's validation loss after its last step")
    parser.add_argument("--run-timeout", type=float, default=None, help="stop a row (and its workers) after this many s")
    parser.add_argument("--fresh-node", default=None, metavar="VARIANT",
                        help="after the rows, VARIANT (at the first batch size) twice with trainer.compile_cache: once "
                             "with this machine's Inductor cache, writing the file, then with empty Inductor and Triton "
                             "caches and the file alone, as a fresh node of a cluster would start (first step and compile "
                             "time of each in the table)")
    parser.add_argument("--out", default=None, help="folder for results.json and the runs' logs (default: --work)")
    args = parser.parse_args()
    sdxl = args.model == "sdxl"
    args.resolution = args.resolution or (64 if args.tiny else 1024 if sdxl else 768)
    batches = [int(b) for b in str(args.batch).split(",")]
    variants = (args.variants or ("script,throughput,memory" if args.reference_script
                                  else "reference,nocache,throughput,memory")).split(",")
    unknown = [v for v in variants if v not in (*VARIANTS, "script", "reference")]
    if unknown:
        parser.error(f"--variants {','.join(unknown)}: unknown; use script, reference or {', '.join(VARIANTS)}")
    if "script" in variants and not args.reference_script:
        parser.error("the script row needs --reference-script PATH (diffusers' unmodified train_text_to_image_lora.py)")
    if sdxl and "reference" in variants:
        parser.error("the bench's own reference loop is SD 2.1's: with --model sdxl use the script row")
    timer = args.step_timer or (args.reference_script.parent / "step_timer.py" if args.reference_script else None)
    if "script" in variants and not timer.is_file():
        parser.error(f"no step timer at {timer}: give --step-timer PATH")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    args.out = Path(args.out or work)
    args.out.mkdir(parents=True, exist_ok=True)

    from sd_lora.demo import ensure_tiny_model, write_shapes

    t0 = time.perf_counter()
    if args.tiny:
        model_path = ensure_tiny_model(work / "models", "sdxl" if sdxl else "sd21")
    else:
        model_path = __import__("sdxl").build_sdxl(work / "sdxl") if sdxl else __import__("sd21").build_sd21(work / "sd21")
    data = work / f"shapes{args.resolution}"
    if not (data / "metadata.jsonl").is_file():
        write_shapes(data, size=args.resolution)
    print(f"model and data ready in {time.perf_counter() - t0:.0f} s", flush=True)

    import torch

    family = "sdxl" if sdxl else "sd"
    facts = {**common.facts(args.device), "model": args.model, "resolution": args.resolution, "batches": batches,
             "steps": args.steps, "skip": args.skip}
    facts["matmul_tflops"] = matmul_tflops(args.device)
    # FLOPs grow with the batch: counted once at the smallest, scaled per row
    facts["unet_flops_per_sample"] = unet_flops(model_path, min(batches), args.resolution, args.device,
                                                family) / min(batches)
    torch.cuda.empty_cache() if args.device == "cuda" else None
    print(json.dumps(facts), flush=True)

    runs = Path(args.work) / "runs"
    # the held-out loss once, after the timed steps (the trainer evaluates at its end when there is held-out data)
    extra = ["dataset.validation_split=0.1"] if args.val_loss else []

    def overrides(name: str, batch: int) -> list[str]:
        base = common.base_overrides(args.device, model_path, data, args.resolution, args.workers, batch, args.work,
                                     args.steps, args.skip)
        return [*(["model=sdxl"] if sdxl else []), *base, *extra, *VARIANTS[name]]

    def row(name: str, batch: int) -> str:
        return name if len(batches) == 1 else f"{name}@b{batch}"

    if args.precompile:
        names = variants if args.precompile == "all" else args.precompile.split(",")
        common.precompile([(f"precompile-{row(n, b)}", overrides(n, b), runs / f"precompile-{row(n, b)}", None)
                           for b in batches for n in names if n not in ("reference", "script")], out=args.out,
                          timeout=args.run_timeout)
    results = {}
    for batch in batches:
        for name in variants:
            t = time.perf_counter()
            if name == "script":
                result = script_row(args.reference_script, timer, model_path, data, args, batch, args.out)
            elif name == "reference":
                result = reference_loop(model_path, data, args, batch)
            else:
                result = common.run_trainer(row(name, batch), overrides(name, batch), runs / row(name, batch),
                                            args.out, timeout=args.run_timeout)
            results[row(name, batch)] = {**result, "batch": batch}
            if args.device == "cuda":
                torch.cuda.empty_cache()
            print(f"{row(name, batch)}: done in {time.perf_counter() - t:.0f} s: "
                  f"{json.dumps(result, default=str)[:400]}", flush=True)
            (args.out / "results.json").write_text(json.dumps({"facts": facts, "results": results}, indent=2,
                                                              default=str))
    if args.fresh_node:
        fresh_node(args.fresh_node, overrides(args.fresh_node, batches[0]), runs, args, results)
        (args.out / "results.json").write_text(json.dumps({"facts": facts, "results": results}, indent=2, default=str))
    print_table(facts, results)


def fresh_node(name: str, overrides: list[str], runs: Path, args, results: dict) -> None:
    """trainer.compile_cache as a cluster uses it: a run on this machine writes the file (its graphs from this
    machine's Inductor cache, or compiled), then a run with empty Inductor and Triton caches (a fresh node) starts
    from the file alone. Both run 3 steps; what counts is their first step and compile time."""
    file = runs / "compile-cache" / f"{name}.bin"
    short = [*overrides, f"trainer.compile_cache={file}", "trainer.max_train_steps=3", "trainer.skip_steps=1"]
    fresh = {"TORCHINDUCTOR_CACHE_DIR": str(runs / "fresh-inductor"), "TRITON_CACHE_DIR": str(runs / "fresh-triton")}
    batch = int(next(o for o in overrides if o.startswith("trainer.train_batch_size=")).split("=")[1])
    for i, (row, env) in enumerate(((f"{name}, writing the compile cache", None),
                                    (f"{name}, fresh node from the compile cache", fresh))):
        report = common.run_trainer(f"fresh-node-{i}", short, runs / f"fresh-node-{i}", args.out,
                                    timeout=args.run_timeout, env=env)
        results[row] = {**report, "batch": batch}
        size = file.stat().st_size / 2**20 if file.is_file() else 0
        print(f"{row}: first step {report.get('first_step_s')} s, compile {report.get('compile_s')} s, "
              f"{json.dumps(report.get('compile_cache'))}, file {size:.1f} MB", flush=True)


def step_times(r: dict) -> tuple[float | None, float | None]:
    """(median, mean) s/step of a reference result or a trainer report (keyed alike)."""
    return r.get("seconds_per_step_median"), r.get("seconds_per_step")


def print_table(facts: dict, results: dict) -> None:
    baseline_name = "script" if any(r.get("step_timer") is not None or n.startswith("script")
                                    for n, r in results.items()) else "reference"
    baselines = {r["batch"]: step_times(r) for n, r in results.items()
                 if n.split("@")[0] == baseline_name and "error" not in r}
    rows = []
    for name, r in results.items():
        s, mean = step_times(r)
        batch = r["batch"]
        if "error" in r or not s:
            rows.append(f"| {name} | failed | | | | | | |")
            continue
        peak = r.get("peak_memory_bytes")
        flops = facts["unet_flops_per_sample"] * batch
        mfu = flops / s / (facts["matmul_tflops"] * 1e12) if facts.get("matmul_tflops") else None
        ref, ref_mean = baselines.get(batch, (None, None))
        ratio = f"{ref / s:.2f}x / {ref_mean / mean:.2f}x" if ref and ref_mean else "-"
        peak_text = f"{peak / 2**30:.2f} GiB" if peak else "-"
        val = r.get("validation_loss")
        rows.append(f"| {name} | {s:.4f} / {mean:.4f} | {batch / s:.1f} / {batch / mean:.1f} | {peak_text} | "
                    + (f"{mfu:.1%}" if mfu else "-") + f" | {ratio} | {r.get('first_step_s') or 0:.1f} | "
                    + (f"{val:.5f}" if isinstance(val, (int, float)) else "-") + " |")
    print(f"\n{facts.get('card', facts['device'])}, torch {facts['torch']}, diffusers {facts['diffusers']}, "
          f"transformers {facts['transformers']}, peft {facts['peft']}, accelerate {facts['accelerate']}; "
          f"{facts['model']} architecture (random weights), {facts['resolution']} px, U-Net fwd+bwd "
          f"{facts['unet_flops_per_sample'] / 1e12:.2f} TFLOP per sample, fp16 matmul "
          f"{facts.get('matmul_tflops') or 0:.0f} TFLOP/s")
    print(f"| row | s/step (median / mean) | images/s (median / mean) | peak memory | MFU (median) "
          f"| vs {baseline_name} (median / mean) | first step s | validation loss |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    for name, r in results.items():
        if r.get("step_only_median_s"):
            step_only = r["step_only_median_s"]
            print(f"\n{name}: the reference loop's times run from one step's end to the next, as the trainer's "
                  f"do (its wait for the next batch included). Without that wait: {step_only:.4f} s/step median, "
                  f"{r['step_only_mean_s']:.4f} mean.")

if __name__ == "__main__":
    main()
