"""The speed switches: compile mode (and where CUDA graphs are right), DDP graph splitting, attention kernel
order, TF32, convolution autotuning, channels_last, gradient checkpointing, the compiled VAE encoder.

None of them changes what is trained. Process-wide switches a run sets are put back when it ends
(`process_switches_kept`), so the next job of an in-process sweep starts clean. What the report says
the run had is what was applied (`SpeedPlan.applied`), not what was asked.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field

import torch

from sd_lora.config import Config, TrainerConfig
from sd_lora.devices import Backend, kernel_flags_kept
from sd_lora.errors import UserError
from sd_lora.families import Components
from sd_lora.model import sdp_kernel_order

log = logging.getLogger(__name__)

CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # the torch.compile modes that record CUDA graphs


def check_cuda_graphs(t: TrainerConfig, backend_name: str) -> None:
    """CUDA graphs (torch.compile's reduce-overhead and max-autotune modes) hand the compiled backward's
    output buffers to the parameters as their .grad; the next micro-batch's replay overwrites them before
    autograd adds its gradient, so accumulated LoRA gradients come out wrong (pytorch/pytorch#169545, and a
    reproduction in #96693: 4 accumulated micro-batches give 1/4 of the gradient). One micro-batch per
    optimizer step is safe: the gradients are used and set to None before the next replay."""
    if backend_name == "cuda" and t.compile and t.compile_mode in CUDA_GRAPH_MODES \
            and t.gradient_accumulation_steps > 1:
        raise UserError(f"trainer.compile_mode={t.compile_mode} records CUDA graphs, which sum the LoRA gradients of "
                        f"trainer.gradient_accumulation_steps={t.gradient_accumulation_steps} micro-batches wrongly "
                        "(PyTorch issue 169545); set trainer.compile_mode=null (or max-autotune-no-cudagraphs), or "
                        "trainer.gradient_accumulation_steps=1")


def check_speed_switches(cfg: Config, backend: Backend) -> None:
    """The switches a user can set wrong for this device, refused before any work."""
    for key in ("compile", "compile_encoders"):
        if getattr(cfg.trainer, key) and not backend.capabilities().compile:
            raise UserError(f"trainer.{key}=true is not supported on device={backend.name}; set trainer.{key}=false")
    if cfg.trainer.compile_cache and not hasattr(torch.compiler, "save_cache_artifacts"):
        raise UserError(f"trainer.compile_cache needs torch 2.7 or later (torch.compiler.save_cache_artifacts); this "
                        f"is torch {torch.__version__}: upgrade torch, or set trainer.compile_cache=null (Inductor's "
                        "own cache, TORCHINDUCTOR_CACHE_DIR, still keeps the compiled graphs on this machine)")
    check_cuda_graphs(cfg.trainer, backend.name)


def compile_mode_for(t: TrainerConfig, backend_name: str, cached: bool = True) -> str | None:
    """trainer.compile_mode as torch.compile gets it. `auto` (perf=throughput's) records CUDA graphs where
    they were measured to pay and no known torch issue makes them wrong: CUDA, one micro-batch per optimizer
    step, the embedding cache on. One process: 3.30x diffusers' loop on an H100 against 2.13x without graphs;
    2 and 4 processes of one H200 host: 0.98 and 0.95 of linear scaling, one run each (docs/performance.md;
    more GPUs and several machines not measured). Under gradient accumulation
    (check_cuda_graphs), without the cache (the VAE encoder's graph beside the U-Net's, not measured) or on
    another device it is torch.compile's default mode."""
    if t.compile_mode != "auto":
        return t.compile_mode
    if backend_name == "cuda" and t.gradient_accumulation_steps == 1 and cached:
        return "reduce-overhead"
    return None


def compiled_graphs() -> tuple[int, int]:
    """Graphs Dynamo has compiled in this process so far, and the times Inductor ran a graph (forward and
    backward count apart) without the CUDA graphs its mode asked for (counts torch keeps; its `cudagraphs` log,
    TORCH_LOGS=cudagraphs, says why)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"]), int(counters["inductor"]["cudagraph_skips"])


@dataclass
class SpeedPlan:
    """The switches as resolved for this run and device, and what was applied (for the report)."""

    compile_mode: str | None  # as torch.compile gets it (auto resolved)
    applied: dict = field(default_factory=dict)
    graphs_before: tuple[int, int] = (0, 0)

    def graphs_compiled(self) -> list[int]:
        """compiled_graphs() counted since the plan was made: this run's."""
        return [now - before for now, before in zip(compiled_graphs(), self.graphs_before)]


def plan_speed(cfg: Config, backend: Backend) -> SpeedPlan:
    t = cfg.trainer
    mode = compile_mode_for(t, backend.name, cfg.dataset.cache)
    if t.compile_mode == "auto" and (t.compile or t.compile_encoders):
        log.info("trainer.compile_mode=auto: %s", "reduce-overhead (CUDA graphs)" if mode else
                 "torch.compile's default mode (CUDA graphs only on CUDA with dataset.cache=true and no gradient "
                 "accumulation)")
    return SpeedPlan(mode, {"compile_mode": mode if t.compile else None, "compile_encoders": False,
                            "kernel_autotune": False, "fused_lora_layers": 0, "lora_layers": None,
                            "fp8_layers": 0},
                     compiled_graphs())


@contextlib.contextmanager
def process_switches_kept(cfg: Config):
    """A scope for the run: kernel flags put back, and this run's compiled graphs (with their CUDA-graph memory
    pool, which holds its modules) let go, when it ends."""
    with kernel_flags_kept(), contextlib.ExitStack() as scope:
        if cfg.trainer.compile or cfg.trainer.compile_encoders:
            scope.callback(torch._dynamo.reset)
        yield scope


def custom_functions_cached():
    """AOTAutograd's compile cache for graphs holding a torch.autograd.Function (the fused LoRA's and fp8's): torch
    passes such graphs by unless `autograd_cache_allow_custom_autograd_functions` is on, so every process traced and
    partitioned the U-Net's forward and backward again (a warm start of 64 s against 19 s on one H200; on this CPU,
    tiny model, compile_s 49 s and 0 AOTAutograd hits against 15 s and 1 hit with it). The switch is torch's own,
    off by default while torch tests it (pytorch/pytorch#149751: Dynamo traces the Function's forward and backward
    into the graph as the pure AutogradFunctionApply operator, both hashed into the cache key, so a changed
    Function is a miss). Our Functions keep no state outside their inputs. A context (a no-op on a torch without it)."""
    import torch._functorch.config as functorch_config

    if not hasattr(functorch_config, "autograd_cache_allow_custom_autograd_functions"):
        return contextlib.nullcontext()
    return functorch_config.patch(autograd_cache_allow_custom_autograd_functions=True)


def set_process_switches(cfg: Config, backend: Backend, accelerator, scope: contextlib.ExitStack,
                         plan: SpeedPlan) -> None:
    """The process-wide switches, once the process's device is known; undone when `scope` closes."""
    t = cfg.trainer
    if t.compile and accelerator.num_processes > 1:
        # torch's default under DDP (DDPOptimizer) splits the compiled graph at DDP's gradient buckets so that each
        # bucket's all-reduce overlaps the rest of the backward. A LoRA's gradients are a few MB (SD 2.1, rank 4:
        # about 3 MB in fp32), two buckets whose all-reduce is short: little to overlap, while the split doubles
        # the graphs (and the CUDA graphs). Measured on 4 H200s: the same step time either way (docs/performance.md).
        # So one graph unless trainer.compile_ddp_split asks for the split; DDP's hooks then all-reduce after the
        # compiled backward. torch compiles at the first step: the setting holds for the run, put back after it.
        scope.enter_context(torch._dynamo.config.patch(optimize_ddp=t.compile_ddp_split))
    if cfg.model.lora.fused_matmul or cfg.model.base_precision is not None:
        scope.enter_context(custom_functions_cached())
    # training, validation loss and validation images alike
    scope.enter_context(sdp_kernel_order(cfg.model.sdp_kernel, accelerator.device))
    if t.allow_tf32:
        backend.enable_tf32()
    plan.applied["kernel_autotune"] = bool(t.kernel_autotune and backend.enable_kernel_autotune())
    if t.kernel_autotune and not plan.applied["kernel_autotune"]:
        log.info("trainer.kernel_autotune: device=%s has no convolution autotuning switch; left as it is", backend.name)


def compile_encoders(cfg: Config, comps: Components, plan: SpeedPlan) -> None:
    """trainer.compile_encoders: the VAE encoder compiled, where it runs in the steps (no embedding cache)."""
    if not cfg.trainer.compile_encoders:
        return
    if cfg.dataset.cache:
        log.info("trainer.compile_encoders: dataset.cache=true, the VAE encoder does not run in the steps; "
                 "left uncompiled")
        return
    # a third of the reference step's FLOPs is this encode (../shared/performance.md)
    comps.vae.encoder = torch.compile(comps.vae.encoder, mode=plan.compile_mode)
    plan.applied["compile_encoders"], plan.applied["compile_mode"] = True, plan.compile_mode
    log.info("trainer.compile_encoders: the VAE encoder is compiled (mode %s)", plan.compile_mode or "default")


def set_module_switches(cfg: Config, comps: Components) -> None:
    """Switches on the LoRA U-Net (after injection) and the VAE: gradient checkpointing, channels_last."""
    if cfg.trainer.gradient_checkpointing:
        comps.unet.enable_gradient_checkpointing()
        if comps.text_trained:  # non-reentrant: the reentrant kind drops the LoRA's gradients when inputs need none
            for text_encoder in comps.text_encoders:
                text_encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.trainer.channels_last:  # the VAE too: it encodes every step without the cache, and builds the cache
        for module in (comps.unet, comps.vae):
            module.to(memory_format=torch.channels_last)


def set_unet_matmuls(cfg: Config, unet: torch.nn.Module, speed: SpeedPlan) -> None:
    """The U-Net's matmul levers, after LoRA injection (they rewrite the injected layers): model.lora.fused_matmul
    (each LoRA projection one matmul against W + s·B·A) or model.base_precision=fp8 (the frozen Linear weights
    and their matmuls in float8; the base layers inside the LoRA layers too). The counts go to the report."""
    fp8 = cfg.model.base_precision is not None
    if cfg.model.lora.fused_matmul and fp8:
        # merging the LoRA into a float8 weight (3 mantissa bits) would round the LoRA's part away
        from peft.tuners.lora.layer import LoraLayer

        total = sum(isinstance(m, LoraLayer) for m in unet.modules())
        speed.applied.update(fused_lora_layers=0, lora_layers=total)
        # info, not a warning: perf=throughput sets fused_matmul, and fp8 on top of it is a choice, not a mistake
        log.info("model.lora.fused_matmul: not with model.base_precision=fp8: all %d LoRA layers of the U-Net keep "
                 "peft's path", total)
    elif cfg.model.lora.fused_matmul:
        from sd_lora.fused_lora import fuse_lora_layers

        fused, total = fuse_lora_layers(unet)
        speed.applied.update(fused_lora_layers=fused, lora_layers=total)
        lora = cfg.model.lora
        why = ", ".join(w for w, on in (("model.lora.dropout>0", lora.dropout > 0),
                                        ("model.lora.use_dora", lora.use_dora)) if on)
        (log.warning if fused < total else log.info)(
            "model.lora.fused_matmul: fused %d of %d LoRA layers of the U-Net%s", fused, total,
            f" (the others keep peft's path: {why or 'not a plain LoRA Linear'})" if fused < total else "")
    if fp8:
        from sd_lora.fp8 import to_fp8_base

        speed.applied["fp8_layers"] = to_fp8_base(unet)
        log.info("model.base_precision=fp8: %d frozen Linear layers of the U-Net in float8", speed.applied["fp8_layers"])
