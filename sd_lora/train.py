"""The accelerate training loop: loss, checkpoints, validation images, tensorboard, report.

`train(cfg, run_dir)` reads as the table of contents of a run; `train_step` is one micro-batch.
All checks a user can fail (device, precision, model folder, data set, columns) run before any
model weights are loaded. Side effects (files, logs, validation images) happen on the main
process only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import math
import re
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from sd_lora.config import Config, MixedPrecision, PredictionType
from sd_lora.data import CaptionedImages, build_dataloader, load_table, load_validation_table
from sd_lora.devices import Backend, build_backend
from sd_lora.errors import UserError
from sd_lora.model import add_lora, load_components, lora_state_dict, resolve_model_path, save_lora

log = logging.getLogger(__name__)

WEIGHT_DTYPES = {MixedPrecision.no: torch.float32, MixedPrecision.fp16: torch.float16, MixedPrecision.bf16: torch.bfloat16}
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


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
    gens = []
    for index in indices:
        digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
        gens.append(torch.Generator(device=device).manual_seed(int.from_bytes(digest, "little") & (2**63 - 1)))
    return gens


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


# ---------------------------------------------------------------- run


@dataclass
class Timer:
    """Wall time of the optimizer steps after the first `skip_steps` of this process (synchronised at both ends).

    Also the time to the first optimizer step, which holds torch.compile's compilation when it is on.
    """

    skip_steps: int
    steps: int = 0  # optimizer steps this process has done
    start: float | None = None
    end: float | None = None
    loop_start: float = field(default_factory=time.perf_counter)
    first_step_s: float | None = None

    def __post_init__(self):
        if self.skip_steps == 0:
            self.start = self.loop_start

    def step(self, backend: Backend) -> None:
        self.steps += 1
        if self.steps == 1:
            backend.synchronize()
            self.first_step_s = time.perf_counter() - self.loop_start
        if self.steps == self.skip_steps:
            backend.synchronize()
            self.start = time.perf_counter()

    def stop(self, backend: Backend) -> None:
        backend.synchronize()
        self.end = time.perf_counter()

    @property
    def timed_steps(self) -> int:
        return max(0, self.steps - self.skip_steps) if self.start is not None else 0

    def seconds_per_step(self) -> float | None:
        if self.end is None or self.timed_steps == 0:
            return None
        return (self.end - self.start) / self.timed_steps


@dataclass
class RunState:
    global_step: int = 0
    first_epoch: int = 0
    resume_batches: int = 0  # batches of first_epoch already consumed before the resume
    last_loss: float | None = None
    validation_loss: float | None = None
    validation_loss_step: int | None = None
    validations: list = field(default_factory=list)


def checks_before_work(cfg: Config) -> tuple[Backend, Path, object, object]:
    """Everything a user can get wrong, checked before any weights are loaded."""
    backend = build_backend(cfg.device.type.value, transfer_to_gcu=cfg.device.transfer_to_gcu)
    backend.check(cfg.precision.mixed_precision.value)
    if cfg.trainer.compile and not backend.capabilities().compile:
        raise UserError(f"trainer.compile=true is not supported on device={backend.name}; set trainer.compile=false")
    per_machine = cfg.device.num_processes // cfg.device.num_machines
    if backend.name != "cpu" and per_machine > backend.device_count():
        raise UserError(
            f"device.num_processes={cfg.device.num_processes} needs {per_machine} {backend.name} device(s) on this "
            f"machine, but {backend.device_count()} are visible ({backend.visible_devices_env}="
            f"{os.environ.get(backend.visible_devices_env or '', 'unset')}); lower device.num_processes"
        )
    model_path = resolve_model_path(cfg.model)
    table = load_table(cfg.dataset, seed=cfg.trainer.seed, validation_seed=cfg.trainer.validation_loss_seed)
    val_table = load_validation_table(cfg.dataset, validation_seed=cfg.trainer.validation_loss_seed)
    if cfg.trainer.validation_loss_steps and val_table is None:
        raise UserError(f"trainer.validation_loss_steps={cfg.trainer.validation_loss_steps} needs held-out data: set "
                        "dataset.validation_split (e.g. 0.1) or dataset.validation_source")
    return backend, model_path, table, val_table


def build_accelerator(cfg: Config, backend: Backend, run_dir: Path):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    from accelerate.utils import DataLoaderConfiguration, TorchDynamoPlugin

    if backend.name == "gcu" and backend.transfer_to_gcu:
        backend.enable_transfer_to_gcu()
    kwargs = dict(backend.accelerator_kwargs())
    if cfg.trainer.compile:  # accelerate compiles in prepare(), after any DDP wrapping
        kwargs["dynamo_plugin"] = TorchDynamoPlugin(backend="inductor", mode=cfg.trainer.compile_mode)
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
    from accelerate.utils import set_seed

    t0 = time.perf_counter()
    run_dir = Path(run_dir)
    backend, model_path, table, val_table = checks_before_work(cfg)
    accelerator = build_accelerator(cfg, backend, run_dir)
    set_seed(cfg.trainer.seed, device_specific=False)
    backend.manual_seed_all(cfg.trainer.seed)
    if cfg.trainer.allow_tf32:
        backend.enable_tf32()

    weight_dtype = WEIGHT_DTYPES[cfg.precision.mixed_precision]
    comps = load_components(cfg.model, model_path, dtype=weight_dtype)
    for module in (comps.unet, comps.vae, comps.text_encoder):
        module.to(accelerator.device)
    lora_params = add_lora(comps.unet, cfg.model.attention, cfg.model.lora)
    if cfg.trainer.gradient_checkpointing:
        comps.unet.enable_gradient_checkpointing()
    if cfg.trainer.channels_last:
        comps.unet.to(memory_format=torch.channels_last)

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
    dataloader = accelerator.prepare(dataloader)  # sharded first, so that steps are counted as they will run
    optimizer, lr_scheduler, max_train_steps, num_epochs = build_optimization(cfg, lora_params, len(dataloader),
                                                                               accelerator.num_processes, fused)
    unet, optimizer, lr_scheduler = accelerator.prepare(comps.unet, optimizer, lr_scheduler)
    register_checkpoint_hooks(accelerator, unet)

    state = RunState()
    if cfg.trainer.resume_from_checkpoint:
        state = resume(accelerator, cfg, run_dir, math.ceil(len(dataloader) / cfg.trainer.gradient_accumulation_steps))
    if accelerator.is_main_process:
        accelerator.init_trackers("train", config=tensorboard_hparams(cfg))
        log.info("training %s on %s (%s, %d process(es)): %d samples, %d epochs, %d optimizer steps, run dir %s",
                 model_path, backend.name, cfg.precision.mixed_precision.value, accelerator.num_processes,
                 len(dataset), num_epochs, max_train_steps, run_dir)

    models = StepModels(unet, comps.vae, comps.text_encoder, comps.noise_scheduler, weight_dtype)
    backend.reset_peak_memory()
    timer = Timer(cfg.trainer.skip_steps)
    run_loop(cfg, accelerator, backend, models, lora_params, optimizer, lr_scheduler, dataloader, state, timer,
             max_train_steps, num_epochs, comps, model_path, run_dir, evaluate)
    timer.stop(backend)
    if evaluate is not None and state.validation_loss_step != state.global_step:
        evaluate(models.unet, state)

    save_checkpoint(accelerator, cfg, run_dir, state.global_step)  # LoRA-only and small: lets a run be extended
    accelerator.wait_for_everyone()
    report = None
    if accelerator.is_main_process:
        base = accelerator.unwrap_model(unet, keep_torch_compile=False)
        lora_file = save_lora(base, run_dir / "lora", metadata={"sd_lora_config": config_json(cfg)})
        report = build_report(cfg, accelerator, backend, model_path, state, timer, max_train_steps, lora_file,
                              time.perf_counter() - t0)
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
        autocast = accelerator.autocast() if weight_dtype != torch.float32 else nullcontext()
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
    path = Path(cfg.dataset.cache_dir or cache_dir() / "embeddings") / f"{key}.safetensors"
    with accelerator.main_process_first():  # the main process builds, the others then read its file
        tensors = load_or_build(path, lambda: compute_embeddings(table, cfg.dataset, comps.tokenizer, comps.vae,
                                                                 comps.text_encoder, accelerator.device, weight_dtype))
    offload(comps, "cpu")  # not needed by the training step any more; validation brings them back
    return CachedEmbeddings(tensors, cfg.dataset.random_flip), collate_cached


def offload(comps, device) -> None:
    comps.vae.to(device)
    comps.text_encoder.to(device)


def build_optimization(cfg: Config, params, per_process_batches: int, num_processes: int, fused: bool = False):
    """Optimizer, lr schedule, total optimizer steps and epochs, from the sharded loader's length."""
    from diffusers.optimization import get_scheduler

    t, o = cfg.trainer, cfg.optimizer
    steps_per_epoch = math.ceil(per_process_batches / t.gradient_accumulation_steps)
    max_train_steps = t.max_train_steps or t.num_train_epochs * steps_per_epoch
    num_epochs = math.ceil(max_train_steps / steps_per_epoch)
    lr = o.lr * (t.train_batch_size * t.gradient_accumulation_steps * num_processes if o.scale_lr else 1)
    optimizer = torch.optim.AdamW(params, lr=lr, betas=tuple(o.betas), weight_decay=o.weight_decay, eps=o.eps,
                                  **({"fused": True} if fused else {}))
    # a prepared scheduler steps once per process per optimizer step, hence the factor (as in diffusers)
    lr_scheduler = get_scheduler(o.lr_scheduler.value, optimizer=optimizer,
                                 num_warmup_steps=o.lr_warmup_steps * num_processes,
                                 num_training_steps=max_train_steps * num_processes)
    return optimizer, lr_scheduler, max_train_steps, num_epochs


def run_loop(cfg, accelerator, backend, models, lora_params, optimizer, lr_scheduler, dataloader, state: RunState,
             timer: Timer, max_train_steps: int, num_epochs: int, comps, model_path, run_dir: Path,
             evaluate=None) -> None:
    from tqdm.auto import tqdm

    t = cfg.trainer
    total_batch = t.train_batch_size * accelerator.num_processes * t.gradient_accumulation_steps
    progress = tqdm(total=max_train_steps, initial=state.global_step, desc="steps",
                    disable=not accelerator.is_local_main_process)
    loss_sum = torch.zeros((), device=accelerator.device)
    loss_count = 0
    last_log = (time.perf_counter(), state.global_step)
    for epoch in range(state.first_epoch, num_epochs):
        models.unet.train()
        loader = dataloader
        if epoch == state.first_epoch and state.resume_batches:
            loader = accelerator.skip_first_batches(dataloader, state.resume_batches)
        for batch in loader:
            with accelerator.accumulate(models.unet):
                gens = sample_generators(batch["index"], t.seed, epoch, accelerator.device)
                loss = train_step(models, batch, t.noise_offset, t.snr_gamma, gens)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    clip_gradients(accelerator, lora_params, cfg.optimizer.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.detach()
            loss_count += 1
            if not accelerator.sync_gradients:
                continue
            state.global_step += 1
            progress.update(1)
            timer.step(backend)
            if state.global_step % t.log_every_n_steps == 0 or state.global_step == max_train_steps:
                mean_loss = accelerator.reduce(loss_sum, reduction="mean").item() / loss_count
                loss_sum.zero_()
                loss_count = 0
                now = time.perf_counter()
                samples_per_s = (state.global_step - last_log[1]) * total_batch / max(now - last_log[0], 1e-9)
                last_log = (now, state.global_step)
                state.last_loss = mean_loss
                if not math.isfinite(mean_loss):
                    raise UserError(
                        f"the training loss became {mean_loss} at step {state.global_step}; fp16 overflow is the "
                        "usual cause: try precision=bf16 or a lower optimizer.lr"
                    )
                lr = lr_scheduler.get_last_lr()[0]
                accelerator.log({"train/loss": mean_loss, "train/lr": lr, "train/samples_per_s": samples_per_s},
                                step=state.global_step)
                progress.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}")
            if t.checkpointing_steps and state.global_step % t.checkpointing_steps == 0 \
                    and state.global_step < max_train_steps:
                save_checkpoint(accelerator, cfg, run_dir, state.global_step)
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


# ---------------------------------------------------------------- checkpoints


def register_checkpoint_hooks(accelerator, unet) -> None:
    """Checkpoints hold the LoRA weights only (not the frozen 3 GB U-Net), plus optimizer/scheduler/RNG."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            for model in models:
                base = accelerator.unwrap_model(model, keep_torch_compile=False)
                save_file({k: v.contiguous() for k, v in lora_state_dict(base).items()},
                          str(Path(output_dir) / "lora.safetensors"))
        while weights:
            weights.pop()

    def load_hook(models, input_dir):
        while models:
            model = accelerator.unwrap_model(models.pop(), keep_torch_compile=False)
            state = convert_unet_state_dict_to_peft(load_file(str(Path(input_dir) / "lora.safetensors")))
            result = set_peft_model_state_dict(model, state, adapter_name="default")
            unexpected = getattr(result, "unexpected_keys", None)
            if unexpected:
                raise UserError(f"checkpoint {input_dir} does not fit this model: unexpected keys {unexpected[:3]}")

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[Path]:
    found = [p for p in checkpoint_dir(run_dir).glob("checkpoint-*") if CHECKPOINT_RE.match(p.name) and p.is_dir()]
    return sorted(found, key=lambda p: int(CHECKPOINT_RE.match(p.name).group(1)))


def save_checkpoint(accelerator, cfg: Config, run_dir: Path, step: int) -> Path | None:
    """Save a resumable checkpoint; keep at most `checkpoints_total_limit` of them."""
    target = checkpoint_dir(run_dir) / f"checkpoint-{step}"
    accelerator.save_state(str(target))
    if accelerator.is_main_process and cfg.trainer.checkpoints_total_limit is not None:
        for old in list_checkpoints(run_dir)[: -cfg.trainer.checkpoints_total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    if accelerator.is_main_process:
        log.info("checkpoint saved: %s", target)
    return target


def resume(accelerator, cfg: Config, run_dir: Path, steps_per_epoch: int) -> RunState:
    value = cfg.trainer.resume_from_checkpoint
    if value == "latest":
        found = list_checkpoints(run_dir)
        if not found:
            log.warning("trainer.resume_from_checkpoint=latest: no checkpoint in %s; starting fresh",
                        checkpoint_dir(run_dir))
            return RunState()
        path = found[-1]
    else:
        path = Path(value)
        if not path.is_dir() or not CHECKPOINT_RE.match(path.name):
            raise UserError(f"trainer.resume_from_checkpoint={value!r}: no checkpoint folder checkpoint-<step> at "
                            f"{path.resolve()}; give such a folder or 'latest'")
    accelerator.load_state(str(path))
    step = int(CHECKPOINT_RE.match(path.name).group(1))
    log.info("resumed from %s at step %d", path, step)
    consumed = step * cfg.trainer.gradient_accumulation_steps
    batches_per_epoch = steps_per_epoch * cfg.trainer.gradient_accumulation_steps
    return RunState(global_step=step, first_epoch=step // steps_per_epoch, resume_batches=consumed % batches_per_epoch)


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


def build_report(cfg: Config, accelerator, backend: Backend, model_path: Path, state: RunState, timer: Timer,
                 max_train_steps: int, lora_file: Path, wall_time: float) -> dict:
    seconds_per_step = timer.seconds_per_step()
    global_batch = cfg.trainer.train_batch_size * accelerator.num_processes * cfg.trainer.gradient_accumulation_steps
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
        "seconds_per_step": seconds_per_step,
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
        "lora_rank": cfg.model.lora.rank,
        "lora_alpha": cfg.model.lora.lora_alpha,
        "lora_path": str(lora_file),
        "cache": cfg.dataset.cache,
        "compile": cfg.trainer.compile,
        "channels_last": cfg.trainer.channels_last,
        "gradient_checkpointing": cfg.trainer.gradient_checkpointing,
        "seed": cfg.trainer.seed,
    }
