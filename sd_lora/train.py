"""A run's table of contents: check, plan, build the pieces, run the loop, write the results.

Each piece lives in its own room and is only called from here:
    preflight.py   everything a user can get wrong, before any weights load
    speed.py       compile mode, CUDA-graph rules, kernel flags, channels_last
    compile_cache.py   the compile time, and trainer.compile_cache (compiled graphs a fresh node starts from)
    families/      what differs between model families (components, conditioning, pipeline, LoRA prefixes)
    model.py       the model folder, the LoRA U-Net and its attention backend, the LoRA file
    data.py, cache.py   the training rows, their transforms, the embedding cache
    optim.py       optimizer, lr schedule, run length, gradient clipping
    loss.py        one micro-batch's loss (target per prediction type, Min-SNR)
    guard.py       NaN/Inf in the loss, gradients or LoRA weights, grad-scaler skips
    loop.py        the epoch and step loop
    checkpoints.py whole-or-absent checkpoints and exact resume
    lock.py        one run per run directory
    signals.py     pre-emption: SIGTERM/SIGINT/SIGUSR1 end the run after the current step, with a checkpoint
    ema.py         the moving average of the LoRA weights (trainer.ema)
    evaluation.py  the validation loss and validation images
    report.py, provenance.py   report.json, tensorboard hparams, how the run was made
Side effects (files, logs, validation images) happen on the main process only.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import time
from pathlib import Path

import torch

from sd_lora.checkpoints import (RunState, check_resume, checkpoint_dir, finished_run, outputs_written,
                                  register_checkpoint_hooks, resume, run_fingerprint, save_checkpoint)
from sd_lora.compile_cache import CompileCache, compile_cache_scope
from sd_lora.config import Config
from sd_lora.data import CaptionedImages, build_dataloader, collate, epoch_order, long_captions
from sd_lora.devices import Backend
from sd_lora.errors import UserError
from sd_lora.evaluation import build_evaluator, render_validation_images
from sd_lora.families import Components, ModelFamily, family_of
from sd_lora.files import writing
from sd_lora.guard import NonFiniteGuard
from sd_lora.lock import RunLock
from sd_lora.loop import Training, run_loop
from sd_lora.loss import StepModels
from sd_lora.model import add_lora, add_text_lora, load_components, lora_off, save_lora, weight_dtype_of
from sd_lora.optim import build_lr_scheduler, build_optimizer, run_length
from sd_lora.preflight import Checked, checks_before_work
from sd_lora.report import build_report, config_dict, config_json, tensorboard_hparams, write_report
from sd_lora.signals import Preempted, StopRequest
from sd_lora.speed import (SpeedPlan, compile_encoders, plan_speed, process_switches_kept, set_module_switches,
                           set_unet_matmuls,
                           set_process_switches)
from sd_lora.timing import StepProfiler, Timer, scheduled_gc

log = logging.getLogger(__name__)


def train(cfg: Config, run_dir: Path | str) -> dict | None:
    """Train a LoRA as configured; write everything into `run_dir`; return the report (main process)."""
    with process_switches_kept(cfg) as scope, StopRequest() as stop:
        return _train(cfg, Path(run_dir), scope, stop)


def _train(cfg: Config, run_dir: Path, scope: contextlib.ExitStack, stop: StopRequest) -> dict | None:
    t0 = time.perf_counter()
    checked = checks_before_work(cfg)
    speed = plan_speed(cfg, checked.backend)
    accelerator = build_accelerator(cfg, checked.backend, run_dir, speed.compile_mode)
    if accelerator.is_main_process:
        scope.enter_context(RunLock(run_dir))  # one run per run directory, before anything is written there
    set_process_switches(cfg, checked.backend, accelerator, scope, speed)
    fingerprint = run_fingerprint(cfg, checked.model_path, checked.table, accelerator.num_processes)
    resume_path = check_resume(cfg, run_dir, fingerprint)  # a checkpoint that does not fit stops here, before the weights
    if resume_path is not None and finished_run(cfg, resume_path, fingerprint):
        return leave_finished_run(run_dir, resume_path, accelerator.is_main_process)
    if accelerator.is_main_process:
        from sd_lora.provenance import write_provenance

        write_provenance(run_dir, config_dict(cfg), resume_path)
    seed_everything(cfg, checked.backend)
    compiled = scope.enter_context(compile_cache_scope(cfg.trainer.compile_cache, accelerator.is_main_process))
    compiled.load()  # trainer.compile_cache: before anything compiles

    family, dtype = family_of(cfg.model), weight_dtype_of(cfg.precision.mixed_precision)
    comps, lora_params = build_models(cfg, checked.model_path, accelerator, speed, dtype)
    evaluate = None
    if checked.val_table is not None and accelerator.is_main_process:  # encoded now, while the VAE is on the device
        evaluate = build_evaluator(cfg, accelerator, family, comps, checked.val_table, dtype)
    dataset, dataloader = build_data(cfg, accelerator, family, comps, checked, dtype)
    shuffle = epoch_order(dataloader)  # data.EpochShuffle or data.BucketBatches: the loop tells it the epoch
    dataloader = accelerator.prepare(dataloader)  # sharded first, so that steps are counted as they will run
    length = run_length(cfg, len(dataloader))
    trained, optimizer, lr_scheduler = prepare_trained(cfg, accelerator, family, comps, lora_params, length,
                                                       checked.backend)
    unet = trained["unet"]
    all_params = [p for group in lora_params.values() for p in group]
    ema = build_ema(cfg, accelerator, all_params)  # before the resume, which restores it

    state = (resume(accelerator, cfg, resume_path, length.steps_per_epoch, optimizer, lr_scheduler) if resume_path
             else RunState())
    state.fingerprint, state.guard = fingerprint, NonFiniteGuard(cfg, accelerator, run_dir, all_params)
    state.max_train_steps = length.max_train_steps
    state.skipped_image_rows.update(getattr(dataset, "skipped_rows", ()))  # left out of the embedding cache
    if accelerator.is_main_process:
        state.long_captions = len(long_captions(checked.table, cfg.dataset, comps.tokenizers))
        accelerator.init_trackers("train", config=tensorboard_hparams(cfg))
        log.info("training %s on %s (%s, %d process(es)): %d samples, %d epochs, %d optimizer steps, run dir %s",
                 checked.model_path, checked.backend.name, cfg.precision.mixed_precision.value,
                 accelerator.num_processes, len(dataset), length.num_epochs, length.max_train_steps, run_dir)

    text_encoders = tuple(trained[p] for p in family.text_prefixes) if comps.text_trained else comps.text_encoders
    models = StepModels(unet, comps.vae, text_encoders, comps.noise_scheduler, dtype, family, comps.text_trained)
    render = None
    if accelerator.is_main_process and cfg.trainer.validation_prompts and cfg.trainer.num_validation_images > 0:
        render = functools.partial(render_validation_images, cfg, accelerator, family, comps, unet, checked.model_path,
                                   run_dir, dtype)
    if ema is not None:  # the EMA's weights are what is validated
        evaluate, render = ema.under_ema(evaluate), ema.under_ema(render)
    tr = Training(cfg, accelerator, models, all_params, optimizer, lr_scheduler, dataloader, shuffle, state,
                  Timer(cfg.trainer.skip_steps, checked.backend), length, run_dir, evaluate, render, stop=stop, ema=ema)
    run_timed(tr, checked.backend, compiled)
    return finish(tr, checked, family, speed, compiled, t0)


def build_accelerator(cfg: Config, backend: Backend, run_dir: Path, compile_mode: str | None = None):
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, TorchDynamoPlugin

    from accelerate.state import AcceleratorState

    backend.before_accelerate()  # GCU: torch_gcu.transfer_to_gcu, so that accelerate's CUDA path drives it
    # accelerate keeps the first Accelerator's precision and compile switch for the whole process: a Hydra sweep
    # runs its jobs in one process, so each job starts from a fresh state (the process group, PartialState, stays)
    AcceleratorState._reset_state()
    kwargs = dict(backend.accelerator_kwargs())
    if cfg.model.lora.train_text_encoder and family_of(cfg.model).unused_text_layers:
        # a text encoder layer the conditioning does not read gets no gradient for its LoRA, which DDP without
        # unused-parameter detection refuses at the second step (diffusers' SDXL LoRA scripts set the same)
        from accelerate.utils import DistributedDataParallelKwargs

        kwargs["kwargs_handlers"] = [DistributedDataParallelKwargs(find_unused_parameters=True)]
    if cfg.trainer.compile:  # accelerate compiles in prepare(), after any DDP wrapping
        kwargs["dynamo_plugin"] = TorchDynamoPlugin(backend="inductor", mode=compile_mode)
    return Accelerator(
        mixed_precision=cfg.precision.mixed_precision.value,
        gradient_accumulation_steps=cfg.trainer.gradient_accumulation_steps,
        log_with=[tracker.value for tracker in cfg.trainer.report_to] or None,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "tensorboard")),
        dataloader_config=DataLoaderConfiguration(non_blocking=backend.name != "cpu"),
        **kwargs,
    )


def prepare_trained(cfg: Config, accelerator, family: ModelFamily, comps: Components,
                    lora_params: dict[str, list[torch.nn.Parameter]], length, backend: Backend):
    """The optimizer and lr schedule over the LoRA parameters, and the trained modules (the U-Net, and the text
    encoders when they train) prepared by accelerate with them, under the LoRA file's prefixes; checkpoints then
    hold each module's LoRA."""
    optimizer = build_optimizer(cfg, lora_params, accelerator.num_processes,
                                fused_by_default=backend.capabilities().fused_optimizer)
    lr_scheduler = build_lr_scheduler(cfg, optimizer, length.max_train_steps, accelerator.num_processes)
    trained = family.lora_modules(comps.unet, comps.text_encoders if comps.text_trained else ())
    (unet_key, unet), *text_encoders = trained.items()
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    prepared = {unet_key: unet}
    with uncompiled(accelerator):  # trainer.compile is the U-Net's: a trained text encoder stays eager
        for key, module in text_encoders:
            prepared[key] = accelerator.prepare(module)
    register_checkpoint_hooks(accelerator, prepared)
    return prepared, optimizer, lr_scheduler


@contextlib.contextmanager
def uncompiled(accelerator):
    """accelerate's prepare() without its torch.compile (which it applies to every module it prepares). A
    compiled text encoder beside the compiled U-Net crashed at the first step under CUDA graphs on an H200
    (SIGSEGV; torch 2.11.0+cu130, 2026-12-01) and stalled in the default mode; its forward and backward are
    a small part of the step."""
    from accelerate.utils import DynamoBackend

    plugin = accelerator.state.dynamo_plugin
    backend, plugin.backend = plugin.backend, DynamoBackend.NO
    try:
        yield
    finally:
        plugin.backend = backend


def build_ema(cfg: Config, accelerator, lora_params: list[torch.nn.Parameter]):
    """trainer.ema: the moving average of the LoRA weights, saved and restored with every checkpoint; or None."""
    if not cfg.trainer.ema:
        return None
    from sd_lora.ema import LoraEma

    ema = LoraEma(lora_params, cfg.trainer)
    accelerator.register_for_checkpointing(ema)
    return ema


def seed_everything(cfg: Config, backend: Backend) -> None:
    from accelerate.utils import set_seed

    set_seed(cfg.trainer.seed, device_specific=False)
    backend.manual_seed_all(cfg.trainer.seed)


def build_models(cfg: Config, model_path: Path, accelerator, speed: SpeedPlan,
                 dtype: torch.dtype) -> tuple[Components, dict[str, list[torch.nn.Parameter]]]:
    """The frozen parts on the device, the LoRA U-Net (and text encoders), the module switches; the LoRA
    parameters (fp32) under the LoRA file's prefixes."""
    comps = load_components(cfg.model, model_path, dtype=dtype)
    comps.unet.to(accelerator.device)
    comps.move_frozen(accelerator.device)
    compile_encoders(cfg, comps, speed)
    family, lora = family_of(cfg.model), cfg.model.lora
    lora_params = {"unet": add_lora(comps.unet, cfg.model.attention, lora)}
    if lora.train_text_encoder:
        for prefix, text_encoder in zip(family.text_prefixes, comps.text_encoders):
            lora_params[prefix] = add_text_lora((text_encoder,), lora)
        comps.text_trained = True
    trained = family.lora_modules(comps.unet, comps.text_encoders if comps.text_trained else ())
    if lora.init_from:
        from sd_lora.export import init_lora_from

        init_lora_from(trained, lora, Path(lora.init_from))
        log.info("model.lora.init_from: the LoRA starts from %s", lora.init_from)
    set_unet_matmuls(cfg, comps.unet, speed)  # after injection and init_from: they rewrite the layers' matmuls
    set_module_switches(cfg, comps)
    return comps, lora_params


def build_data(cfg: Config, accelerator, family: ModelFamily, comps: Components, checked: Checked,
               dtype: torch.dtype):
    """The training data set (decoded images, or the embedding cache) and its loader."""
    if cfg.dataset.cache:
        from sd_lora.cache import CachedEmbeddings, load_or_build_cache

        encode = functools.partial(family.encode_captions, comps, device=accelerator.device)
        with accelerator.main_process_first(), lora_off(*comps.text_encoders):  # the base model's embeddings:
            # the cache is shared by runs; a run whose text encoders train encodes its captions live (below)
            tensors = load_or_build_cache(cfg, checked.model_path, comps, checked.table, encode, accelerator.device,
                                        dtype)
        tokenize = functools.partial(family.tokenize, comps.tokenizers)
        empty = None
        if cfg.dataset.caption_dropout:  # the empty caption's conditioning (its tokens where the text encoders train)
            empty = tokenize([""]) if comps.text_trained else {k: v.float().cpu() for k, v in encode([""]).items()}
        comps.move_frozen("cpu")  # not needed by the training step any more; validation brings them back
        if comps.text_trained:
            from sd_lora.cache import with_live_text

            tensors = with_live_text(tensors, family.condition_keys, tokenize, checked.table,
                                     cfg.dataset.caption_column)
            if accelerator.is_main_process:
                log.info("dataset.cache=true with model.lora.train_text_encoder=true: the cached latents are used; the "
                         "captions are encoded at every step by the text encoder being trained (cached text "
                         "embeddings would be stale)")
        dataset = CachedEmbeddings(tensors, cfg.dataset.random_flip, cfg.dataset.caption_dropout, empty)
    else:
        dataset = CaptionedImages(checked.table, cfg.dataset, functools.partial(family.tokenize, comps.tokenizers))
    dataloader = build_dataloader(dataset, cfg.trainer.train_batch_size, cfg.dataset.num_workers, cfg.trainer.seed,
                                  pin_memory=checked.backend.name != "cpu", collate_fn=collate,
                                  drop_last=cfg.dataset.drop_last, num_processes=accelerator.num_processes)
    if len(dataloader) == 0:
        raise UserError(f"dataset.drop_last=true leaves no batch: {len(dataset)} samples < trainer.train_batch_size="
                        f"{cfg.trainer.train_batch_size}; lower the batch size or set dataset.drop_last=false")
    return dataset, dataloader


def run_timed(tr: Training, backend: Backend, compiled: CompileCache) -> None:
    """The loop under the step timer, the profiler and scheduled garbage collection; after the first step, the
    compile time logged and trainer.compile_cache written."""
    t = tr.cfg.trainer
    backend.reset_peak_memory()
    profiler = StepProfiler(t.profile_steps, t.skip_steps, backend, tr.run_dir, tr.accelerator.process_index)
    try:
        with scheduled_gc(t.gc_every_n_steps) as gc_step:
            tr.after_step = lambda step: (compiled.after_step(), gc_step(step), profiler.step())
            run_loop(tr)
    finally:
        profiler.stop()
    tr.timer.stop()


def leave_finished_run(run_dir: Path, checkpoint: Path, is_main_process: bool) -> dict | None:
    """Resuming a run that is already at its end: nothing is trained, loaded or written; its report is returned."""
    report = run_dir / "report.json"
    if is_main_process:
        log.info("trainer.resume_from_checkpoint: %s is the end of this run; nothing to train, the run directory "
                 "is left as it was (raise trainer.max_train_steps or trainer.num_train_epochs to train on)",
                 checkpoint)
    return json.loads(report.read_text()) if is_main_process and report.is_file() else None


def export_lora(tr: Training, unet, lora_file: Path, num_images: int) -> None:
    """The LoRA in the other layouts trainer.export_formats asks for, beside the diffusers file."""
    from sd_lora.config import LoraFormat
    from sd_lora.export import convert

    if LoraFormat.kohya in tr.cfg.trainer.export_formats:
        facts = {**tr.models.family.kohya_version(unet),
                 "v_parameterization": tr.models.noise_scheduler.config.prediction_type == "v_prediction",
                 "steps": tr.state.global_step, "epochs": tr.length.num_epochs, "num_images": num_images}
        path = convert(lora_file, "kohya", lora_file.parent / f"{tr.run_dir.name}.safetensors", facts=facts)
        log.info("LoRA for ComfyUI / AUTOMATIC1111 (kohya layout): %s", path)


def finish(tr: Training, checked: Checked, family: ModelFamily, speed: SpeedPlan, compiled: CompileCache,
           t0: float) -> dict | None:
    """The last validation loss, the final checkpoint, the LoRA file and the report; after a pre-emption signal
    only the checkpoint and the report so far (no LoRA file: the run is not done), then `Preempted`."""
    accelerator, state, run_dir = tr.accelerator, tr.state, tr.run_dir
    if state.resumed_from and state.global_step == state.start_step and outputs_written(run_dir):
        # nothing trained, all written: nothing to rewrite
        accelerator.end_training()
        return leave_finished_run(run_dir, Path(state.resumed_from), accelerator.is_main_process)
    if state.stopped_by:
        return stop_preempted(tr, checked, speed, compiled, t0)
    if tr.evaluate is not None and state.validation_loss_step != state.global_step:
        tr.evaluate(tr.models.unet, state)
    compiled.save()  # graphs compiled since the first step (validation, a recompile), if any
    final = save_checkpoint(accelerator, tr.cfg, run_dir, state)  # LoRA-only and small: lets a run be extended
    if state.skipped_image_rows and accelerator.is_main_process:
        log.warning("dataset.on_bad_image=skip: %d image(s) could not be decoded and were skipped (data set rows %s)",
                    len(state.skipped_image_rows), sorted(state.skipped_image_rows)[:20])
    accelerator.wait_for_everyone()
    report = None
    if accelerator.is_main_process:
        base, *text_encoders = (accelerator.unwrap_model(m, keep_torch_compile=False) for m in tr.models.trained)
        with writing(run_dir / "lora", "the LoRA file and the report", f"The final checkpoint {final} is saved: "
                     "once there is room, trainer.resume_from_checkpoint=latest writes them"):
            with tr.ema.applied() if tr.ema is not None else contextlib.nullcontext():  # the EMA's weights are the LoRA
                lora_file = save_lora(family.lora_modules(base, tuple(text_encoders)), run_dir / "lora",
                                      metadata={"sd_lora_config": config_json(tr.cfg)})
            export_lora(tr, base, lora_file, len(checked.table))
            report = build_report(tr.cfg, accelerator, checked.backend, checked.model_path, state, tr.timer,
                                  tr.length.max_train_steps, lora_file, time.perf_counter() - t0, speed, compiled)
            if hasattr(tr.shuffle, "counts"):  # dataset.buckets: the samples in each bucket
                report["buckets"] = tr.shuffle.counts
            log.info("done: LoRA %s, report %s", lora_file, write_report(run_dir, report))
    accelerator.end_training()
    return report


def stop_preempted(tr: Training, checked: Checked, speed: SpeedPlan, compiled: CompileCache, t0: float):
    """A pre-emption signal: the checkpoint of this step (unless the loop just saved it), the report so far."""
    accelerator, state = tr.accelerator, tr.state
    checkpoint = checkpoint_dir(tr.run_dir) / f"checkpoint-{state.global_step}"
    if state.saved_step != state.global_step:
        checkpoint = save_checkpoint(accelerator, tr.cfg, tr.run_dir, state)
    compiled.save()
    if accelerator.is_main_process:
        report = build_report(tr.cfg, accelerator, checked.backend, checked.model_path, state, tr.timer,
                              tr.length.max_train_steps, None, time.perf_counter() - t0, speed, compiled)
        write_report(tr.run_dir, report)
    accelerator.end_training()
    raise Preempted(state.stopped_by, state.global_step, checkpoint)
