"""The accelerate training loop: loss, checkpoints, validation images, tensorboard, report.

`train(cfg, run_dir)` reads as the table of contents of a run; `train_step` is one micro-batch.
All checks a user can fail (device, precision, model folder, data set, columns) run before any
model weights are loaded. Side effects (files, logs, validation images) happen on the main
process only.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from sd_lora.checkpoints import (RunState, check_resume, list_checkpoints, register_checkpoint_hooks, resume,
                                  run_fingerprint, save_checkpoint)
from sd_lora.config import Config, MixedPrecision, OnFailure, PredictionType, global_batch_size
from sd_lora.data import CaptionedImages, build_dataloader, load_tables, sample_seed
from sd_lora.devices import Backend, build_backend, kernel_flags_kept
from sd_lora.distributed import check_layout
from sd_lora.errors import UserError
from sd_lora.model import (add_lora, load_components, resolve_model_path, save_lora, sdp_kernel_order,
                           sdp_priority_order)
from sd_lora.timing import StepProfiler, Timer, scheduled_gc

log = logging.getLogger(__name__)

WEIGHT_DTYPES = {MixedPrecision.no: torch.float32, MixedPrecision.fp16: torch.float16, MixedPrecision.bf16: torch.bfloat16}


# ---------------------------------------------------------------- loss


def training_target(noise_scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the U-Net is trained to predict: the noise (epsilon) or the velocity (v-prediction)."""
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == PredictionType.epsilon.value:
        return noise
    if prediction_type == PredictionType.v_prediction.value:
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise UserError(
        f"prediction type {prediction_type!r} of the scheduler is not supported; "
        "set model.prediction_type to epsilon or v_prediction"
    )


def min_snr_weights(noise_scheduler, timesteps: torch.Tensor, snr_gamma: float) -> torch.Tensor:
    """Per-sample Min-SNR loss weights (Hang et al. 2023) for the scheduler's prediction type.

    epsilon: min(SNR, gamma) / SNR; v-prediction: min(SNR, gamma) / (SNR + 1), since the velocity
    loss already carries a factor (SNR + 1) relative to the x0 loss.
    """
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps)
    clipped = torch.clamp(snr, max=snr_gamma)
    if noise_scheduler.config.prediction_type == PredictionType.v_prediction.value:
        return clipped / (snr + 1)
    return clipped / snr


def diffusion_loss(model_pred, target, timesteps, noise_scheduler, snr_gamma: float | None) -> torch.Tensor:
    if snr_gamma is None:
        return F.mse_loss(model_pred.float(), target.float(), reduction="mean")
    per_sample = F.mse_loss(model_pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return (per_sample * min_snr_weights(noise_scheduler, timesteps, snr_gamma)).mean()


@dataclass
class StepModels:
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    noise_scheduler: object
    weight_dtype: torch.dtype

    @property
    def scaling_factor(self) -> float:
        return self.vae.config.scaling_factor


def sample_generators(indices: list[int], seed: int, epoch: int, device) -> list[torch.Generator]:
    """One generator per sample, seeded by (seed, epoch, sample index).

    Every random draw of the step (posterior sample, noise, offset noise, timestep) comes from the
    sample's own generator, so a sample gets the same draws whatever the batch it lands in, the
    number of processes, or a resume in the middle of an epoch.
    """
    return [torch.Generator(device=device).manual_seed(sample_seed(seed, epoch, index)) for index in indices]


def _randn(gens: list[torch.Generator], shape: tuple, like: torch.Tensor) -> torch.Tensor:
    return torch.stack([torch.randn(shape, generator=g, device=like.device, dtype=like.dtype) for g in gens])


def train_step(m: StepModels, batch: dict, noise_offset: float, snr_gamma: float | None,
               gens: list[torch.Generator]) -> torch.Tensor:
    """Loss of one micro-batch (what diffusers' LoRA script computes each step)."""
    if "latent_mean" in batch:  # cached posterior: sampled anew each step, as the VAE's latent_dist.sample() does
        mean, std = batch["latent_mean"], batch["latent_std"]
        encoder_hidden_states = batch["encoder_hidden_states"].to(m.weight_dtype)
    else:
        with torch.no_grad():
            posterior = m.vae.encode(batch["pixel_values"].to(dtype=m.weight_dtype)).latent_dist
            mean, std = posterior.mean, posterior.std
            encoder_hidden_states = m.text_encoder(batch["input_ids"], return_dict=False)[0]
    latents = ((mean + std * _randn(gens, mean.shape[1:], mean)) * m.scaling_factor).to(m.weight_dtype)
    noise = _randn(gens, latents.shape[1:], latents)
    if noise_offset:
        noise = noise + noise_offset * _randn(gens, (latents.shape[1], 1, 1), latents)
    timesteps = torch.cat([torch.randint(0, m.noise_scheduler.config.num_train_timesteps, (1,), generator=g,
                                         device=latents.device) for g in gens])
    noisy_latents = m.noise_scheduler.add_noise(latents, noise, timesteps)
    target = training_target(m.noise_scheduler, latents, noise, timesteps)
    model_pred = m.unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
    return diffusion_loss(model_pred, target, timesteps, m.noise_scheduler, snr_gamma)


def clip_gradients(accelerator, params: list[torch.nn.Parameter], max_norm: float | None) -> torch.Tensor | None:
    """Clip the LoRA gradients' global norm; return the norm before clipping.

    `params` must be a list: one reference script passes a generator it has already exhausted,
    so its clipping silently does nothing.
    """
    if max_norm is None:
        return None
    return accelerator.clip_grad_norm_(params, max_norm)


class NonFiniteGuard:
    """NaN/Inf in a step's loss or LoRA gradient norm, handled as `trainer.on_nonfinite_loss` says.

    error: every micro-batch ORs a flag on the device, and the first bad optimizer step is kept there
    too, so the loop never waits for the accelerator because of this guard. `check` reads them where
    the loop syncs anyway (a logging step) and before every checkpoint, so a checkpoint never holds
    weights a NaN has reached, and the message names the step where it happened, not where it was seen.
    skip: whether to apply a step must be known before optimizer.step(), so that costs one host sync
    (and one all-gather, so that every process decides alike) per optimizer step.
    Under fp16 the grad scaler owns non-finite gradients (it skips the step and lowers its scale, which
    is normal), so there only the loss counts; the steps the scaler skips are counted, on the device too.
    """

    def __init__(self, cfg: Config, accelerator, run_dir: Path):
        self.cfg, self.accelerator, self.run_dir = cfg, accelerator, run_dir
        self.skip = cfg.trainer.on_nonfinite_loss is OnFailure.skip
        self.bad = torch.zeros((), dtype=torch.bool, device=accelerator.device)  # in the current optimizer step
        self.first_bad_step = torch.full((), -1, dtype=torch.long, device=accelerator.device)
        self.scaler_skips = torch.zeros((), dtype=torch.long, device=accelerator.device)  # since the last take

    def scale_before_step(self) -> torch.Tensor | None:
        """fp16: the grad scaler's scale before optimizer.step(), to tell afterwards whether it skipped the step."""
        scale = getattr(self.accelerator.scaler, "_scale", None)
        return None if scale is None else scale.clone()

    def count_scaler_skip(self, scale_before: torch.Tensor | None) -> None:
        # The scaler lowers its scale exactly when it skips a step for inf/NaN gradients. accelerate's
        # optimizer_step_was_skipped misses the skips a fused AdamW (the default on CUDA) makes inside its
        # kernel, and the scaler's get_scale() waits for the device; this comparison stays on the device.
        if scale_before is not None:
            self.scaler_skips += self.accelerator.scaler._scale < scale_before

    def take_scaler_skips(self) -> int:
        """The grad scaler's skipped steps since the last call (a host sync)."""
        count = int(self.scaler_skips)
        self.scaler_skips.zero_()
        return count

    def add_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """Note a micro-batch's loss; return whether it is finite (on the device)."""
        finite = torch.isfinite(loss.detach())
        self.bad |= ~finite
        return finite

    def skip_step(self, state: RunState, grad_norm: torch.Tensor | None) -> bool:
        """At the end of optimizer step state.global_step + 1: whether to leave its update out."""
        step = state.global_step + 1
        if grad_norm is not None and self.accelerator.scaler is None:
            self.bad |= ~torch.isfinite(grad_norm)
        if not self.skip:
            self.first_bad_step.masked_fill_((self.first_bad_step < 0) & self.bad, step)
            self.bad.zero_()
            return False
        bad = bool(self.accelerator.gather(self.bad.reshape(1)).any())
        self.bad.zero_()
        if bad and self.accelerator.scaler is None:  # with a scaler the step is the scaler's skip, counted there
            state.nonfinite_skipped_steps += 1
            log.warning("step %d: NaN/Inf loss or gradient norm; its update is skipped (trainer.on_nonfinite_loss=skip)",
                        step)
        # with a grad scaler, optimizer.step() must run: the scaler itself leaves out a step whose gradients
        # are not finite, and skipping the call would leave its unscale_ bookkeeping half done
        return bad and self.accelerator.scaler is None

    def check(self) -> None:
        """Raise if an optimizer step had a NaN/Inf (error policy). A host sync, and a collective call."""
        if self.skip:
            return
        steps = [s for s in self.accelerator.gather(self.first_bad_step.reshape(1)).tolist() if s >= 0]
        if not steps:
            return
        lr = self.cfg.optimizer.lr
        if self.cfg.precision.mixed_precision is MixedPrecision.fp16:
            cause = f"fp16 overflow is the likely cause: use precision=bf16, or a lower optimizer.lr (now {lr})"
        else:
            cause = f"a learning rate too high for this model is the likely cause: lower optimizer.lr (now {lr})"
        found = list_checkpoints(self.run_dir)
        kept = (f"the last good checkpoint is {found[-1]} (trainer.resume_from_checkpoint=latest resumes from it)"
                if found else "no checkpoint had been saved")
        raise UserError(f"the training loss or the LoRA gradient norm became NaN/Inf at optimizer step {min(steps)}; "
                        f"{cause}; or set trainer.on_nonfinite_loss=skip to skip such steps. The run stopped without "
                        f"saving: {kept}")


# ---------------------------------------------------------------- run


CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # the torch.compile modes that record CUDA graphs


def check_cuda_graphs(t, backend_name: str) -> None:
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


def compile_mode_for(t, backend_name: str, cached: bool = True) -> str | None:
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


def checks_before_work(cfg: Config) -> tuple[Backend, Path, object, object]:
    """Everything a user can get wrong, checked before any weights are loaded."""
    backend = build_backend(cfg.device.type.value, transfer_to_gcu=cfg.device.transfer_to_gcu)
    backend.check(cfg.precision.mixed_precision.value)
    for key in ("compile", "compile_encoders"):
        if getattr(cfg.trainer, key) and not backend.capabilities().compile:
            raise UserError(f"trainer.{key}=true is not supported on device={backend.name}; set trainer.{key}=false")
    check_cuda_graphs(cfg.trainer, backend.name)
    if "LOCAL_WORLD_SIZE" in os.environ:  # under accelerate launch / torchrun the launcher's count rules
        per_machine = int(os.environ["LOCAL_WORLD_SIZE"])
    else:
        per_machine = check_layout(cfg)
    if backend.name != "cpu" and per_machine > backend.device_count():
        raise UserError(
            f"device.num_processes={cfg.device.num_processes} needs {per_machine} {backend.name} device(s) on this "
            f"machine, but {backend.device_count()} are visible ({backend.visible_devices_env}="
            f"{os.environ.get(backend.visible_devices_env or '', 'unset')}); lower device.num_processes"
        )
    model_path = resolve_model_path(cfg.model)
    table, val_table = load_tables(cfg.dataset, seed=cfg.trainer.seed, validation_seed=cfg.trainer.validation_loss_seed)
    if cfg.trainer.validation_loss_steps and val_table is None:
        raise UserError(f"trainer.validation_loss_steps={cfg.trainer.validation_loss_steps} needs held-out data: set "
                        "dataset.validation_split (e.g. 0.1) or dataset.validation_source")
    return backend, model_path, table, val_table


def build_accelerator(cfg: Config, backend: Backend, run_dir: Path, compile_mode: str | None = None):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    from accelerate.utils import DataLoaderConfiguration, TorchDynamoPlugin

    backend.before_accelerate()  # GCU: torch_gcu.transfer_to_gcu, so that accelerate's CUDA path drives it
    kwargs = dict(backend.accelerator_kwargs())
    if cfg.trainer.compile:  # accelerate compiles in prepare(), after any DDP wrapping
        kwargs["dynamo_plugin"] = TorchDynamoPlugin(backend="inductor", mode=compile_mode)
    return Accelerator(
        mixed_precision=cfg.precision.mixed_precision.value,
        gradient_accumulation_steps=cfg.trainer.gradient_accumulation_steps,
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "tensorboard")),
        dataloader_config=DataLoaderConfiguration(non_blocking=backend.name != "cpu"),
        **kwargs,
    )


def train(cfg: Config, run_dir: Path | str) -> dict:
    """Train a LoRA as configured; write everything into `run_dir`; return the report."""
    # process-wide switches a run sets are put back afterwards: the next job of an in-process sweep starts clean
    with kernel_flags_kept(), contextlib.ExitStack() as scope:
        if cfg.trainer.compile or cfg.trainer.compile_encoders:
            # this run's compiled graphs (and their CUDA-graph memory pool) hold its modules: let them go
            scope.callback(torch._dynamo.reset)
        return _train(cfg, run_dir, scope)


def _train(cfg: Config, run_dir: Path | str, scope: contextlib.ExitStack) -> dict:
    from accelerate.utils import set_seed

    t0 = time.perf_counter()
    graphs_before = compiled_graphs()
    run_dir = Path(run_dir)
    backend, model_path, table, val_table = checks_before_work(cfg)
    compile_mode = compile_mode_for(cfg.trainer, backend.name, cfg.dataset.cache)
    if cfg.trainer.compile_mode == "auto" and (cfg.trainer.compile or cfg.trainer.compile_encoders):
        log.info("trainer.compile_mode=auto: %s", "reduce-overhead (CUDA graphs)" if compile_mode else
                 "torch.compile's default mode (CUDA graphs only on CUDA with dataset.cache=true and no gradient "
                 "accumulation)")
    accelerator = build_accelerator(cfg, backend, run_dir, compile_mode)
    if cfg.trainer.compile and accelerator.num_processes > 1:
        # torch's default under DDP (DDPOptimizer) splits the compiled graph at DDP's gradient buckets so that each
        # bucket's all-reduce overlaps the rest of the backward. A LoRA's gradients are a few MB (SD 2.1, rank 4:
        # about 3 MB in fp32), two buckets whose all-reduce is short: little to overlap, while the split doubles
        # the graphs (and the CUDA graphs). Measured on 4 H200s: the same step time either way (docs/performance.md).
        # So one graph unless trainer.compile_ddp_split asks for the split; DDP's hooks then all-reduce after the
        # compiled backward. torch compiles at the first step: the setting holds for the run, put back after it.
        scope.enter_context(torch._dynamo.config.patch(optimize_ddp=cfg.trainer.compile_ddp_split))
    # training, validation loss and validation images alike, once the process's device is known
    scope.enter_context(sdp_kernel_order(cfg.model.sdp_kernel, accelerator.device))
    fingerprint = run_fingerprint(cfg, model_path, table, accelerator.num_processes)
    resume_path = check_resume(cfg, run_dir, fingerprint)  # a checkpoint that does not fit stops here, before the weights
    if accelerator.is_main_process:
        from sd_lora.provenance import write_provenance

        write_provenance(run_dir, config_dict(cfg), resume_path)
    set_seed(cfg.trainer.seed, device_specific=False)
    backend.manual_seed_all(cfg.trainer.seed)
    if cfg.trainer.allow_tf32:
        backend.enable_tf32()
    applied = {"kernel_autotune": bool(cfg.trainer.kernel_autotune and backend.enable_kernel_autotune()),
               "compile_encoders": False, "compile_mode": compile_mode if cfg.trainer.compile else None}  # what the report says the run had, not what was asked
    if cfg.trainer.kernel_autotune and not applied["kernel_autotune"]:
        log.info("trainer.kernel_autotune: device=%s has no convolution autotuning switch; left as it is", backend.name)

    weight_dtype = WEIGHT_DTYPES[cfg.precision.mixed_precision]
    comps = load_components(cfg.model, model_path, dtype=weight_dtype)
    for module in (comps.unet, comps.vae, comps.text_encoder):
        module.to(accelerator.device)
    if cfg.trainer.compile_encoders:
        if cfg.dataset.cache:
            log.info("trainer.compile_encoders: dataset.cache=true, the VAE encoder does not run in the steps; "
                     "left uncompiled")
        else:  # a third of the reference step's FLOPs is this encode (../shared/performance.md)
            comps.vae.encoder = torch.compile(comps.vae.encoder, mode=compile_mode)
            applied["compile_encoders"], applied["compile_mode"] = True, compile_mode
            log.info("trainer.compile_encoders: the VAE encoder is compiled (mode %s)", compile_mode or "default")
    lora_params = add_lora(comps.unet, cfg.model.attention, cfg.model.lora)
    if cfg.trainer.gradient_checkpointing:
        comps.unet.enable_gradient_checkpointing()
    if cfg.trainer.channels_last:  # the VAE too: it encodes every step without the cache, and builds the cache
        for module in (comps.unet, comps.vae):
            module.to(memory_format=torch.channels_last)

    evaluate = None
    if val_table is not None and accelerator.is_main_process:  # encoded now, while the VAE is on the device
        evaluate = build_evaluator(cfg, accelerator, comps, val_table, weight_dtype)
    dataset, collate_fn = build_dataset(cfg, accelerator, comps, model_path, table, weight_dtype)
    dataloader = build_dataloader(dataset, cfg.trainer.train_batch_size, cfg.dataset.num_workers, cfg.trainer.seed,
                                  pin_memory=backend.name != "cpu", collate_fn=collate_fn,
                                  drop_last=cfg.dataset.drop_last)
    if len(dataloader) == 0:
        raise UserError(f"dataset.drop_last=true leaves no batch: {len(dataset)} samples < trainer.train_batch_size="
                        f"{cfg.trainer.train_batch_size}; lower the batch size or set dataset.drop_last=false")
    fused = backend.capabilities().fused_optimizer if cfg.optimizer.fused is None else cfg.optimizer.fused
    shuffle = dataloader.sampler  # data.EpochShuffle: the loop tells it the epoch
    dataloader = accelerator.prepare(dataloader)  # sharded first, so that steps are counted as they will run
    optimizer, lr_scheduler, max_train_steps, num_epochs, steps_per_epoch = build_optimization(
        cfg, lora_params, len(dataloader), accelerator.num_processes, fused)
    unet, optimizer, lr_scheduler = accelerator.prepare(comps.unet, optimizer, lr_scheduler)
    register_checkpoint_hooks(accelerator, unet)

    state = RunState()
    if resume_path is not None:
        state = resume(accelerator, cfg, resume_path, steps_per_epoch)
    state.fingerprint, state.guard = fingerprint, NonFiniteGuard(cfg, accelerator, run_dir)
    state.skipped_image_rows.update(getattr(dataset, "skipped_rows", ()))  # left out of the embedding cache
    if accelerator.is_main_process:
        accelerator.init_trackers("train", config=tensorboard_hparams(cfg))
        log.info("training %s on %s (%s, %d process(es)): %d samples, %d epochs, %d optimizer steps, run dir %s",
                 model_path, backend.name, cfg.precision.mixed_precision.value, accelerator.num_processes,
                 len(dataset), num_epochs, max_train_steps, run_dir)

    models = StepModels(unet, comps.vae, comps.text_encoder, comps.noise_scheduler, weight_dtype)
    backend.reset_peak_memory()
    timer = Timer(cfg.trainer.skip_steps, backend)
    profiler = StepProfiler(cfg.trainer.profile_steps, cfg.trainer.skip_steps, backend, run_dir,
                            accelerator.process_index)
    try:
        with scheduled_gc(cfg.trainer.gc_every_n_steps) as gc_step:
            run_loop(cfg, accelerator, backend, models, lora_params, optimizer, lr_scheduler, dataloader, state, timer,
                     max_train_steps, num_epochs, comps, model_path, run_dir, evaluate, shuffle,
                     lambda step: (gc_step(step), profiler.step()))
    finally:
        profiler.stop()
    timer.stop()
    if evaluate is not None and state.validation_loss_step != state.global_step:
        evaluate(models.unet, state)

    save_checkpoint(accelerator, cfg, run_dir, state)  # LoRA-only and small: lets a run be extended
    if state.skipped_image_rows and accelerator.is_main_process:
        log.warning("dataset.on_bad_image=skip: %d image(s) could not be decoded and were skipped (data set rows %s)",
                    len(state.skipped_image_rows), sorted(state.skipped_image_rows)[:20])
    accelerator.wait_for_everyone()
    report = None
    if accelerator.is_main_process:
        base = accelerator.unwrap_model(unet, keep_torch_compile=False)
        lora_file = save_lora(base, run_dir / "lora", metadata={"sd_lora_config": config_json(cfg)})
        report = build_report(cfg, accelerator, backend, model_path, state, timer, max_train_steps, lora_file,
                              time.perf_counter() - t0, applied,
                              [now - before for now, before in zip(compiled_graphs(), graphs_before)])
        (run_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        log.info("done: LoRA %s, report %s", lora_file, run_dir / "report.json")
    accelerator.end_training()
    return report


def build_evaluator(cfg: Config, accelerator, comps, val_table, weight_dtype: torch.dtype):
    """A function (unet, state) -> validation loss, logged to tensorboard and kept in the run state."""
    from sd_lora.evaluation import build_validation_set, validation_loss

    vset = build_validation_set(val_table, cfg.dataset, comps.tokenizer, comps.vae, comps.text_encoder,
                                comps.noise_scheduler, accelerator.device, weight_dtype,
                                cfg.trainer.validation_loss_timesteps, cfg.trainer.validation_loss_seed)
    log.info("validation loss on %d held-out sample(s) x %d fixed timesteps", vset.num_samples,
             cfg.trainer.validation_loss_timesteps)

    def evaluate(unet, state: RunState) -> float:
        base = accelerator.unwrap_model(unet, keep_torch_compile=False)
        # a factory: accelerate's autocast is a one-shot context manager, entered once per batch
        autocast = accelerator.autocast if weight_dtype != torch.float32 else nullcontext
        value = validation_loss(base, comps.noise_scheduler, vset, weight_dtype, autocast)
        state.validation_loss, state.validation_loss_step = value, state.global_step
        accelerator.log({"val/loss": value}, step=state.global_step)
        log.info("validation loss at step %d: %.6f", state.global_step, value)
        return value

    return evaluate


def build_dataset(cfg: Config, accelerator, comps, model_path: Path, table, weight_dtype: torch.dtype):
    """The training data set and its collate function: decoded images, or the embedding cache."""
    from sd_lora.cache import CachedEmbeddings, cache_key, collate_cached, compute_embeddings, load_or_build
    from sd_lora.config import cache_dir
    from sd_lora.data import collate

    if not cfg.dataset.cache:
        return CaptionedImages(table, cfg.dataset, comps.tokenizer), collate
    key = cache_key(cfg.model, model_path, comps.vae, comps.text_encoder, comps.tokenizer, table, cfg.dataset,
                    weight_dtype)
    path = Path(cfg.dataset.cache_dir or cache_dir() / "embeddings").expanduser() / f"{key}.safetensors"
    with accelerator.main_process_first():  # the main process builds, the others then read its file
        tensors = load_or_build(path, lambda: compute_embeddings(table, cfg.dataset, comps.tokenizer, comps.vae,
                                                                 comps.text_encoder, accelerator.device, weight_dtype))
    offload(comps, "cpu")  # not needed by the training step any more; validation brings them back
    return CachedEmbeddings(tensors, cfg.dataset.random_flip), collate_cached


def offload(comps, device) -> None:
    comps.vae.to(device)
    comps.text_encoder.to(device)


def build_optimization(cfg: Config, params, per_process_batches: int, num_processes: int, fused: bool = False):
    """Optimizer, lr schedule, total optimizer steps, epochs and steps per epoch, from the sharded loader's length.

    Resume places itself in the epoch with the same steps per epoch, so it is computed here only.
    """
    from diffusers.optimization import get_scheduler

    t, o = cfg.trainer, cfg.optimizer
    steps_per_epoch = math.ceil(per_process_batches / t.gradient_accumulation_steps)
    max_train_steps = t.max_train_steps or t.num_train_epochs * steps_per_epoch
    num_epochs = math.ceil(max_train_steps / steps_per_epoch)
    lr = o.lr * (global_batch_size(cfg, num_processes) if o.scale_lr else 1)
    optimizer = torch.optim.AdamW(params, lr=lr, betas=tuple(o.betas), weight_decay=o.weight_decay, eps=o.eps,
                                  **({"fused": True} if fused else {}))
    # a prepared scheduler steps once per process per optimizer step, hence the factor (as in diffusers)
    lr_scheduler = get_scheduler(o.lr_scheduler.value, optimizer=optimizer,
                                 num_warmup_steps=o.lr_warmup_steps * num_processes,
                                 num_training_steps=max_train_steps * num_processes)
    return optimizer, lr_scheduler, max_train_steps, num_epochs, steps_per_epoch


def run_loop(cfg, accelerator, backend, models, lora_params, optimizer, lr_scheduler, dataloader, state: RunState,
             timer: Timer, max_train_steps: int, num_epochs: int, comps, model_path, run_dir: Path,
             evaluate=None, shuffle=None, after_step=lambda step: None) -> None:
    from tqdm.auto import tqdm

    t = cfg.trainer
    total_batch = global_batch_size(cfg, accelerator.num_processes)
    progress = tqdm(total=max_train_steps, initial=state.global_step, desc="steps",
                    disable=not accelerator.is_local_main_process)
    loss_sum = torch.zeros((), device=accelerator.device)
    loss_count = torch.zeros((), device=accelerator.device)  # the finite losses in loss_sum
    last_log = (time.perf_counter(), state.global_step)
    if state.global_step >= max_train_steps:  # resumed from the final checkpoint: nothing left to train
        log.info("the checkpoint is at step %d of %d: nothing left to train", state.global_step, max_train_steps)
        epochs = range(0)
    else:
        epochs = range(state.first_epoch, num_epochs)
    for epoch in epochs:
        models.unet.train()
        if shuffle is not None:  # this epoch's order, also in a process resumed inside it (see data.EpochShuffle)
            shuffle.epoch = epoch
        loader = dataloader
        if epoch == state.first_epoch and state.resume_batches:
            loader = accelerator.skip_first_batches(dataloader, state.resume_batches)
        for batch in loader:
            with accelerator.accumulate(models.unet):
                gens = sample_generators(batch["index"], t.seed, epoch, accelerator.device)
                loss = train_step(models, batch, t.noise_offset, t.snr_gamma, gens)
                accelerator.backward(loss)
                finite = state.guard.add_loss(loss)
                withhold = False
                if accelerator.sync_gradients:
                    grad_norm = clip_gradients(accelerator, lora_params, cfg.optimizer.max_grad_norm)
                    withhold = state.guard.skip_step(state, grad_norm)
                if not withhold:
                    scale = state.guard.scale_before_step() if accelerator.sync_gradients else None
                    optimizer.step()
                    state.guard.count_scaler_skip(scale)
                lr_scheduler.step()  # also after a withheld step: the schedule follows the step count
                optimizer.zero_grad(set_to_none=True)
            state.skipped_image_rows.update(batch.get("skipped_rows", ()))
            loss_sum += torch.where(finite, loss.detach(), 0.0)
            loss_count += finite
            if not accelerator.sync_gradients:
                continue
            state.global_step += 1
            progress.update(1)
            timer.step()
            after_step(state.global_step)  # scheduled garbage collection, profiler
            if state.global_step % t.log_every_n_steps == 0 or state.global_step == max_train_steps:
                state.guard.check()  # this reads the device anyway: stop here, naming the step, on a NaN/Inf
                total, count = accelerator.reduce(torch.stack([loss_sum, loss_count]), reduction="sum").tolist()
                timer.read_marks()  # the line above waited for the device
                loss_sum.zero_()
                loss_count.zero_()
                now = time.perf_counter()
                samples_per_s = (state.global_step - last_log[1]) * total_batch / max(now - last_log[0], 1e-9)
                last_log = (now, state.global_step)
                lr = lr_scheduler.get_last_lr()[0]
                scalars = {"train/lr": lr, "train/samples_per_s": samples_per_s}
                if count:  # else every step since the last log was skipped for a NaN/Inf loss
                    state.last_loss = scalars["train/loss"] = total / count
                accelerator.log(scalars, step=state.global_step)
                progress.set_postfix(loss=f"{state.last_loss:.4f}" if count else "nan", lr=f"{lr:.2e}")
            if t.checkpointing_steps and state.global_step % t.checkpointing_steps == 0 \
                    and state.global_step < max_train_steps:
                save_checkpoint(accelerator, cfg, run_dir, state)
            if evaluate is not None and t.validation_loss_steps and state.global_step % t.validation_loss_steps == 0:
                evaluate(models.unet, state)
            if state.global_step >= max_train_steps:
                break
        last_epoch = epoch == num_epochs - 1 or state.global_step >= max_train_steps
        if accelerator.is_main_process and t.validation_prompts and t.num_validation_images > 0 \
                and ((epoch + 1) % t.validation_epochs == 0 or last_epoch):
            run_validation(cfg, accelerator, backend, models, comps, model_path, run_dir, epoch, state.global_step)
        if state.global_step >= max_train_steps:
            break
    progress.close()


# ---------------------------------------------------------------- validation


def run_validation(cfg, accelerator, backend, models: StepModels, comps, model_path, run_dir: Path, epoch: int,
                   step: int) -> list[Path]:
    """Render the validation prompts with the current LoRA into samples/ and tensorboard."""
    import numpy as np
    from diffusers import StableDiffusionPipeline

    t = cfg.trainer
    unet = accelerator.unwrap_model(models.unet, keep_torch_compile=False)
    offload(comps, accelerator.device)
    pipeline = StableDiffusionPipeline.from_pretrained(
        model_path, unet=unet, vae=comps.vae, text_encoder=comps.text_encoder, tokenizer=comps.tokenizer,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        revision=cfg.model.revision, local_files_only=True, dtype=models.weight_dtype,
    )
    pipeline.set_progress_bar_config(disable=True)
    generator = torch.Generator(device=accelerator.device).manual_seed(t.seed)
    out = run_dir / "samples"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    was_training = unet.training
    unet.eval()
    autocast = accelerator.autocast() if models.weight_dtype != torch.float32 else nullcontext()
    tracker = accelerator.get_tracker("tensorboard", unwrap=True)
    with torch.no_grad(), autocast:
        for i, prompt in enumerate(t.validation_prompts):
            images = pipeline(prompt, num_inference_steps=t.num_inference_steps, generator=generator,
                              num_images_per_prompt=t.num_validation_images,
                              height=cfg.dataset.resolution, width=cfg.dataset.resolution).images
            for j, image in enumerate(images):
                path = out / f"step{step:06d}-epoch{epoch:04d}-prompt{i}-{j}.png"
                image.save(path)
                written.append(path)
            tracker.add_images(f"validation/{i}: {prompt}", np.stack([np.asarray(im) for im in images]), step,
                               dataformats="NHWC")
    if was_training:
        unet.train()
    if cfg.dataset.cache:
        offload(comps, "cpu")
    log.info("validation at step %d: %d image(s) in %s", step, len(written), out)
    return written


# ---------------------------------------------------------------- report


def config_dict(cfg: Config) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True, enum_to_str=True)


def config_json(cfg: Config) -> str:
    return json.dumps(config_dict(cfg), sort_keys=True)


def tensorboard_hparams(cfg: Config) -> dict:
    """Flat scalar hparams for tensorboard (it accepts no lists or None)."""
    flat = {}

    def walk(prefix, node):
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict):
                walk(name + ".", value)
            elif isinstance(value, (int, float, str, bool)):
                flat[name] = value
            else:
                flat[name] = str(value)

    walk("", config_dict(cfg))
    return flat


def _dist_backend() -> str | None:
    import torch.distributed as dist

    return dist.get_backend() if dist.is_available() and dist.is_initialized() else None


def compiled_graphs() -> tuple[int, int]:
    """Graphs Dynamo has compiled in this process so far, and the times Inductor ran a graph (forward and
    backward count apart) without the CUDA graphs its mode asked for (counts torch keeps; its `cudagraphs` log,
    TORCH_LOGS=cudagraphs, says why)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"]), int(counters["inductor"]["cudagraph_skips"])


def build_report(cfg: Config, accelerator, backend: Backend, model_path: Path, state: RunState, timer: Timer,
                 max_train_steps: int, lora_file: Path, wall_time: float, applied: dict, graphs: list[int]) -> dict:
    seconds_per_step = timer.seconds_per_step()
    stats = timer.step_stats()
    global_batch = global_batch_size(cfg, accelerator.num_processes)
    peak = backend.max_memory_allocated()
    return {
        # the fields of the Enflame tutorial's report
        "model": "sd_lora",
        "pretrained_model_name_or_path": cfg.model.pretrained_model_name_or_path,
        "resolution": cfg.dataset.resolution,
        "local_rank": accelerator.local_process_index,
        "batch_size": cfg.trainer.train_batch_size,
        "precision": cfg.precision.mixed_precision.value,
        "max_train_steps": max_train_steps,
        "device": backend.name.upper(),
        "skip_steps": cfg.trainer.skip_steps,
        # measured
        "samples_per_second": None if seconds_per_step is None else global_batch / seconds_per_step,
        "seconds_per_step": seconds_per_step,  # mean: wall time of the timed steps / their number
        "seconds_per_step_median": stats["median"],  # each step's own time (device events on a GPU)
        "seconds_per_step_p90": stats["p90"],
        "seconds_per_step_max": stats["max"],
        "samples_per_second_median": None if stats["median"] is None else global_batch / stats["median"],
        "timed_steps": timer.timed_steps,
        "first_step_s": timer.first_step_s,
        "peak_memory_bytes": peak,
        "peak_memory_gib": peak / 2**30,
        "peak_memory_kind": "process peak RSS" if backend.name == "cpu" else f"{backend.name} max_memory_allocated",
        "final_loss": state.last_loss,
        "validation_loss": state.validation_loss,
        "wall_time_s": wall_time,
        "world_size": accelerator.num_processes,
        "dist_backend": _dist_backend(),
        "global_batch_size": global_batch,
        "global_step": state.global_step,
        "device_name": backend.device_name(),
        "model_path": str(model_path.resolve()),
        "attention": cfg.model.attention.value,
        "sdp_kernel": cfg.model.sdp_kernel.value,
        "sdp_priority_order": sdp_priority_order(),  # as torch held it at the end of training
        # the speed switches: as configured, and as applied where the device or the data can refuse them
        "switches": {"compile": cfg.trainer.compile, "compile_mode": applied["compile_mode"],
                     "compile_encoders": applied["compile_encoders"],
                     "channels_last": cfg.trainer.channels_last, "kernel_autotune": applied["kernel_autotune"],
                     "gc_every_n_steps": cfg.trainer.gc_every_n_steps, "allow_tf32": cfg.trainer.allow_tf32,
                     "gradient_checkpointing": cfg.trainer.gradient_checkpointing,
                     "profile_steps": cfg.trainer.profile_steps,
                     # read from torch (None: nothing compiled under DDP): True = split at DDP's buckets
                     "compile_ddp_split": (torch._dynamo.config.optimize_ddp in (True, "ddp_optimizer")
                                           if cfg.trainer.compile and accelerator.num_processes > 1 else None)},
        "compiled_graphs": graphs[0],  # by torch.compile during this run
        "cudagraph_skips": graphs[1],  # Inductor graphs (forward and backward apart) run without the CUDA graphs the mode asked for
        "lora_rank": cfg.model.lora.rank,
        "lora_alpha": cfg.model.lora.lora_alpha,
        "lora_path": str(lora_file),
        "cache": cfg.dataset.cache,
        "seed": cfg.trainer.seed,
        # how the run went (kept across a resume); provenance.json says how it was made
        "resumed_from": state.resumed_from,
        "nonfinite_skipped_steps": state.nonfinite_skipped_steps,
        "grad_scaler_skipped_steps": state.grad_scaler_skipped_steps,
        "skipped_images": len(state.skipped_image_rows),
        "skipped_image_rows": sorted(state.skipped_image_rows)[:100],
    }
