"""The `optimizer` group: every optimizer steps the fp32 LoRA and resumes bit-exactly through accelerate's
checkpoints; every lr schedule of diffusers with its warm-up, cycles and power; the refusals a user gets."""

from __future__ import annotations

import pytest
import torch

from sd_lora.config import (AdafactorSettings, Config, DatasetConfig, DeviceConfig, DeviceType, LoraSettings,
                            LrScheduler, ModelConfig, OptimizerConfig, OptimizerName, TrainerConfig)
from sd_lora.errors import UserError
from sd_lora.optim import EXTRAS, build_lr_scheduler, build_optimizer, check_optimizer

CLASSES = {OptimizerName.adamw: "AdamW", OptimizerName.prodigy: "Prodigy", OptimizerName.adafactor: "Adafactor",
           OptimizerName.lion: "Lion"}


def config(**optimizer) -> Config:
    return Config(model=ModelConfig(pretrained_model_name_or_path="m"), dataset=DatasetConfig(path="d"),
                  optimizer=OptimizerConfig(**optimizer))


def lora_unet(tiny_model_path):
    from sd_lora.config import Attention
    from sd_lora.model import add_lora, load_components

    torch.manual_seed(0)
    unet = load_components(ModelConfig(pretrained_model_name_or_path=str(tiny_model_path)), tiny_model_path).unet
    params = add_lora(unet, Attention.sdp, LoraSettings(rank=2))
    return unet, params


def unet_loss(unet) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    latents, text = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    return unet(latents, torch.tensor([100, 700]), text).sample.pow(2).mean()


@pytest.mark.parametrize("name", list(CLASSES), ids=[n.value for n in CLASSES])
def test_every_optimizer_trains_the_fp32_lora_and_resumes_bit_exactly(name, tiny_model_path, tmp_path):
    """Two steps, a checkpoint (the trainer's own hooks), two more: a fresh process state loaded from the checkpoint
    takes the same two steps to the same LoRA weights and optimizer state, bit for bit."""
    if name in EXTRAS:
        pytest.importorskip(EXTRAS[name][0])
    from accelerate import Accelerator

    from sd_lora.checkpoints import register_checkpoint_hooks
    from sd_lora.model import lora_state_dict

    cfg = config(name=name, lr=1.0 if name is OptimizerName.prodigy else 1e-3,
                 lr_scheduler=LrScheduler.cosine_with_restarts, lr_warmup_steps=1, lr_num_cycles=2)

    def prepared():
        accelerator = Accelerator(cpu=True)
        unet, params = lora_unet(tiny_model_path)
        optimizer = build_optimizer(cfg, params, 1, fused_by_default=False)
        scheduler = build_lr_scheduler(cfg, optimizer, max_train_steps=6, num_processes=1)
        unet, optimizer, scheduler = accelerator.prepare(unet, optimizer, scheduler)
        register_checkpoint_hooks(accelerator, {"unet": unet})
        return accelerator, unet, params, optimizer, scheduler

    def steps(accelerator, unet, params, optimizer, scheduler, n):
        for _ in range(n):
            accelerator.backward(unet_loss(unet))
            accelerator.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

    first = prepared()
    start = {k: v.clone() for k, v in lora_state_dict(first[1]).items()}
    assert type(first[3].optimizer).__name__ == CLASSES[name]
    steps(*first, 2)
    first[0].save_state(str(tmp_path / "checkpoint-2"))
    steps(*first, 2)
    second = prepared()
    second[0].load_state(str(tmp_path / "checkpoint-2"))
    steps(*second, 2)

    end, resumed = lora_state_dict(first[1]), lora_state_dict(second[1])
    assert all(v.dtype == torch.float32 for v in end.values())  # the optimizer kept the LoRA fp32
    assert any(not torch.equal(end[k], start[k]) for k in end)  # it trained
    for key in end:
        assert torch.equal(end[key], resumed[key]), key
    state_a, state_b = first[3].optimizer.state_dict(), second[3].optimizer.state_dict()
    assert state_a["param_groups"] == state_b["param_groups"]  # lr, and Prodigy's d estimate
    for i, slots in state_a["state"].items():
        for slot, value in slots.items():
            other = state_b["state"][i][slot]
            assert torch.equal(value, other) if torch.is_tensor(value) else value == other, (i, slot)
    assert first[4].get_last_lr() == second[4].get_last_lr()


def lrs(scheduler: LrScheduler, steps: int = 10, **optimizer) -> list[float]:
    param = torch.nn.Parameter(torch.zeros(1))
    cfg = config(lr=1.0, lr_scheduler=scheduler, **optimizer)
    opt = build_optimizer(cfg, [param], 1, fused_by_default=False)
    sched = build_lr_scheduler(cfg, opt, max_train_steps=steps, num_processes=1)
    out = []
    for _ in range(steps):
        out.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return out


def test_every_schedule_with_its_warmup_cycles_and_power():
    assert lrs(LrScheduler.constant) == [1.0] * 10
    # warm-up as a fraction of the run (0.2 of 10 steps) is the same as 2 steps
    warm = lrs(LrScheduler.constant_with_warmup, lr_warmup_fraction=0.2)
    assert warm == lrs(LrScheduler.constant_with_warmup, lr_warmup_steps=2)
    assert warm[:3] == [0.0, 0.5, 1.0] and warm[3:] == [1.0] * 7
    linear = lrs(LrScheduler.linear, lr_warmup_steps=2)
    assert linear[2] == 1.0 and linear[-1] == pytest.approx(1 / 8)
    cosine = lrs(LrScheduler.cosine, lr_warmup_steps=2)
    assert cosine[2] == 1.0 and all(a > b for a, b in zip(cosine[2:], cosine[3:]))  # falls throughout
    restarts = lrs(LrScheduler.cosine_with_restarts, lr_warmup_steps=2, lr_num_cycles=2)
    assert restarts[2] == 1.0 and restarts[6] == 1.0 and restarts[5] < 0.5  # the second cycle restarts at lr
    assert lrs(LrScheduler.cosine_with_restarts, lr_warmup_steps=2)[6] == pytest.approx(0.5)  # one cycle: half way down
    for power in (1.0, 2.0):
        poly = lrs(LrScheduler.polynomial, lr_warmup_steps=2, lr_power=power)
        progress = [(s - 2) / 8 for s in range(2, 10)]
        assert poly[2:] == pytest.approx([(1 - 1e-7) * (1 - p) ** power + 1e-7 for p in progress])


def test_adafactors_relative_step_reports_the_step_size_it_chose():
    param = torch.nn.Parameter(torch.ones(4, 4))
    cfg = config(name=OptimizerName.adafactor, adafactor=AdafactorSettings(relative_step=True))
    opt = build_optimizer(cfg, [param], 1, fused_by_default=False)
    sched = build_lr_scheduler(cfg, opt, max_train_steps=4, num_processes=1)
    param.sum().backward()
    opt.step()
    sched.step()
    chosen = type(opt)._get_lr(opt.param_groups[0], opt.state[param])  # min(1e-2, 1/sqrt(step)) at step 1
    assert sched.get_last_lr()[0] == chosen > 0 and not torch.equal(param, torch.ones(4, 4))


@pytest.mark.parametrize("optimizer,says", [
    (dict(lr_scheduler=LrScheduler.constant, lr_warmup_steps=10), "use optimizer.lr_scheduler=constant_with_warmup"),
    (dict(lr_scheduler=LrScheduler.linear, lr_warmup_steps=10, lr_warmup_fraction=0.1), "give one of them"),
    (dict(lr_warmup_fraction=1.0, lr_scheduler=LrScheduler.linear), "optimizer.lr_warmup_fraction=1.0"),
    (dict(name=OptimizerName.prodigy, fused=True), "only adamw has a fused kernel"),
    (dict(name=OptimizerName.prodigy, lr=1.0, scale_lr=True), "set optimizer.scale_lr=false"),
    (dict(name=OptimizerName.adafactor, adafactor=AdafactorSettings(relative_step=True),
          lr_scheduler=LrScheduler.cosine), "optimizer.adafactor.relative_step=True"),
    (dict(lr_num_cycles=0), "optimizer.lr_num_cycles=0"),
])
def test_optimizer_settings_that_cannot_work_are_refused(optimizer, says):
    with pytest.raises(UserError) as info:
        OptimizerConfig(**optimizer)
    assert says in str(info.value)


def test_a_missing_optimizer_package_or_device_is_refused_before_work(monkeypatch, tiny_model_path):
    """One message with the install line; adamw8bit off CUDA is refused whether or not bitsandbytes is there."""
    from sd_lora.preflight import checks_before_work

    monkeypatch.setitem(EXTRAS, OptimizerName.lion, ("not_installed_lion", "lion"))
    with pytest.raises(UserError) as info:
        check_optimizer(config(name=OptimizerName.lion), "cpu")
    assert str(info.value) == ("optimizer=lion needs the not_installed_lion package, which is not installed; install "
                               "it with: pip install -e \".[lion]\"")
    cfg = Config(model=ModelConfig(pretrained_model_name_or_path=str(tiny_model_path)),
                 dataset=DatasetConfig(path=str(tiny_model_path.parent / "no-data")),
                 optimizer=OptimizerConfig(name=OptimizerName.adamw8bit), device=DeviceConfig(type=DeviceType.cpu))
    with pytest.raises(UserError) as info:
        checks_before_work(cfg)
    assert "2 problems" in str(info.value)  # told with the data set's in one launch
    assert "optimizer=adamw8bit runs on CUDA only" in str(info.value) and "use optimizer=adamw" in str(info.value)
    try:  # a sweep over devices: the device is left to each job; only the package is checked
        check_optimizer(config(name=OptimizerName.adamw8bit), None)
    except UserError as exc:
        assert "needs the bitsandbytes package" in str(exc)


def test_settings_that_cannot_change_inside_a_run_are_refused_and_adafactors_own_steps_resume():
    """Resume (checkpoints.changed_settings / apply_changed_settings): a changed optimizer, schedule shape or EMA
    setting is among the refused keys; Adafactor's relative step (its schedule's base lrs are 0) resumes without
    rescaling anything; Prodigy with another lr for the text encoder is refused at config time."""
    from sd_lora.checkpoints import REFUSED_ON_RESUME, apply_changed_settings, changed_settings, result_settings

    def cfg_of(optimizer=None, **trainer):
        return Config(model=ModelConfig(pretrained_model_name_or_path="m"), dataset=DatasetConfig(path="d"),
                      optimizer=optimizer or OptimizerConfig(), trainer=TrainerConfig(**trainer))

    saved = {"settings": result_settings(cfg_of())}
    for changed in (cfg_of(OptimizerConfig(name=OptimizerName.lion, lr=1e-5)),
                    cfg_of(OptimizerConfig(lr_scheduler=LrScheduler.cosine_with_restarts, lr_num_cycles=3)),
                    cfg_of(ema=True, ema_decay=0.99)):
        assert set(changed_settings(changed, saved)) & set(REFUSED_ON_RESUME), changed
    relative = cfg_of(OptimizerConfig(name=OptimizerName.adafactor, adafactor=AdafactorSettings(relative_step=True)))
    param = torch.nn.Parameter(torch.zeros(2))
    optimizer = build_optimizer(relative, {"unet": [param]}, num_processes=1, fused_by_default=False)
    scheduler = build_lr_scheduler(relative, optimizer, 10, 1)
    apply_changed_settings(relative, {"settings": result_settings(relative)}, optimizer, scheduler, 1)  # no 0-division
    with pytest.raises(UserError, match="optimizer.text_encoder_lr=0.5.*Prodigy takes one lr"):
        OptimizerConfig(name=OptimizerName.prodigy, lr=1.0, text_encoder_lr=0.5)
