"""Checkpoints that survive a kill, exact resume, and no silent failure (issue 4).

The kills are real: `python launch.py` runs in a subprocess and gets SIGKILL. "Exact" is bit-identical
on the CPU: the LoRA, the optimizer state, the lr schedule and the RNG states at the end of a killed and
resumed run equal those of the same run never interrupted. The run has what makes that hard: a random
crop, a random flip, LoRA dropout (torch's global RNG), a warm-up + linear lr schedule, gradient
accumulation and epochs of 5 micro-batches, so that most checkpoints fall inside an epoch.
"""

from __future__ import annotations

import functools
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import pytest
import torch
from conftest import ROOT, noise_image, run_launch, write_noise_folder
from safetensors.torch import load_file

from sd_lora.config import Config, DatasetConfig, ModelConfig, ModelFamilyName, OnFailure, TrainerConfig
from sd_lora.data import CaptionedImages, EpochShuffle, build_dataloader, collate, load_table
from sd_lora.errors import UserError
from sd_lora.checkpoints import RunState
from sd_lora.guard import NonFiniteGuard

STEPS = 12
RUN = [
    "device=cpu", f"trainer.max_train_steps={STEPS}", "trainer.checkpointing_steps=2", "trainer.validation_prompts=[]",
    "trainer.skip_steps=0", "dataset.max_train_samples=10", "trainer.train_batch_size=2",
    "trainer.gradient_accumulation_steps=2", "dataset.center_crop=false", "dataset.random_flip=true",
    "model.lora.dropout=0.1", "optimizer.lr=1e-2", "optimizer.lr_scheduler=linear", "optimizer.lr_warmup_steps=2",
    "trainer.log_every_n_steps=7",  # the final loss is the mean of steps 8-12: a resume at 8 or 10 must keep 8's
]


def start(run_dir: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "launch.py"), *RUN, *extra, f"hydra.run.dir={run_dir}"],
                            cwd=ROOT, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def kill_when(proc: subprocess.Popen, ready, timeout: float = 300) -> None:
    """SIGKILL `proc` as soon as `ready()` holds; fail if it ended first (the kill would prove nothing)."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"the run ended (status {proc.returncode}) before the moment to kill it"
        assert time.monotonic() < deadline, "timed out waiting for the moment to kill the run"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL


def resume(run_dir: Path, *extra: str) -> str:
    result = run_launch(*RUN, *extra, "trainer.resume_from_checkpoint=latest", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def checkpoints(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def assert_same_end_state(run: Path, reference: Path, same_config: bool = True) -> None:
    """LoRA, optimizer state, lr schedule, RNG states and step count equal, bit for bit; the LoRA files byte for
    byte (the same training gives the same file: sorted metadata, no resume_from_checkpoint in its config)."""
    import filecmp

    assert not same_config or filecmp.cmp(run / "lora" / "pytorch_lora_weights.safetensors",
                                          reference / "lora" / "pytorch_lora_weights.safetensors", shallow=False)
    mine, theirs = load_file(run / "lora" / "pytorch_lora_weights.safetensors"), \
        load_file(reference / "lora" / "pytorch_lora_weights.safetensors")
    assert mine.keys() == theirs.keys()
    for key in theirs:
        assert torch.equal(mine[key], theirs[key]), key
    a, b = run / "checkpoints" / f"checkpoint-{STEPS}", reference / "checkpoints" / f"checkpoint-{STEPS}"
    opt_a, opt_b = (torch.load(p / "optimizer.bin", weights_only=False) for p in (a, b))
    assert opt_a["state"].keys() == opt_b["state"].keys()
    for i, slots in opt_b["state"].items():
        for name, value in slots.items():
            assert torch.equal(opt_a["state"][i][name], value), (i, name)
    assert torch.load(a / "scheduler.bin", weights_only=False) == torch.load(b / "scheduler.bin", weights_only=False)
    rng_a, rng_b = (torch.load(p / "random_states_0.pkl", weights_only=False) for p in (a, b))
    assert torch.equal(rng_a["torch_manual_seed"], rng_b["torch_manual_seed"])  # dropout drew as much
    assert rng_a["random_state"] == rng_b["random_state"] and rng_a["step"] == rng_b["step"]
    report = json.loads((run / "report.json").read_text())
    assert report["global_step"] == STEPS and report["stopped_by_signal"] is None
    assert report["final_loss"] == json.loads((reference / "report.json").read_text())["final_loss"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_path) -> Path:
    """The run never interrupted. Its `heads`: the checkout's commit before and after it ran."""
    out = tmp_path_factory.mktemp("ckpt") / "reference"
    before = git_head()
    result = run_launch(*RUN, f"hydra.run.dir={out}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    reference_heads[out] = (before, git_head())
    return out


reference_heads: dict[Path, tuple] = {}


def git_head() -> str | None:
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    return head.stdout.strip() if head.returncode == 0 else None


# --------------------------------------------------------------------------------------------
# 1. kill -9 at an arbitrary moment, resume: bit-identical


def test_killed_at_an_arbitrary_moment_and_resumed_ends_bit_identical(reference, tmp_path):
    run = tmp_path / "killed"
    proc = start(run)
    kill_when(proc, lambda: (run / "checkpoints" / "checkpoint-4").is_dir())  # somewhere in step 5 or later
    assert not (run / "report.json").exists()
    output = resume(run)
    resumed_from = int(output.split("resumed from ")[1].split(" at step ")[1].split()[0])
    assert 4 <= resumed_from < STEPS
    assert_same_end_state(run, reference)
    # the resumed start is on record, after the first one
    provenance = json.loads((run / "provenance.json").read_text())
    assert provenance["resumed_from"].endswith(f"checkpoint-{resumed_from}")
    assert [p["resumed_from"] for p in provenance["earlier"]] == [None]


# --------------------------------------------------------------------------------------------
# 2. a checkpoint is whole or absent


def test_kill_during_a_save_leaves_the_last_checkpoint_whole_and_resumable(reference, tmp_path):
    run = tmp_path / "killed_in_save"
    partial = run / "checkpoints" / ".tmp-checkpoint-4"
    # sd_lora's test hook: the main process pauses in the save of checkpoint-4, after accelerate has written it
    # and before it is complete (the fingerprint file) and renamed
    proc = start(run, "trainer.checkpoints_total_limit=1", env={"SD_LORA_TEST_PAUSE_IN_CHECKPOINT": "4"})
    kill_when(proc, lambda: (partial / "random_states_0.pkl").is_file())
    # checkpoint-2 is still there although the limit is 1: old ones go only once the new one is complete
    assert checkpoints(run) == [".tmp-checkpoint-4", "checkpoint-2"]
    assert not (partial / "sd_lora_checkpoint.json").exists()
    output = resume(run, "trainer.checkpoints_total_limit=1")
    assert f"resumed from {run / 'checkpoints' / 'checkpoint-2'} at step 2" in output  # latest = the whole one
    assert checkpoints(run) == [f"checkpoint-{STEPS}"]  # the partial one is cleaned up, the limit kept
    assert_same_end_state(run, reference, same_config=False)  # its config holds checkpoints_total_limit=1


# --------------------------------------------------------------------------------------------
# 2b. pre-emption: SIGTERM finishes the step, saves a checkpoint and the report, exits 3; resume is exact


def test_sigterm_saves_a_checkpoint_and_the_report_and_the_resume_ends_bit_identical(reference, tmp_path):
    from sd_lora.signals import PREEMPTED_EXIT_STATUS

    run = tmp_path / "preempted"
    proc = subprocess.Popen([sys.executable, str(ROOT / "launch.py"), *RUN, f"hydra.run.dir={run}"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not (run / "checkpoints" / "checkpoint-2").is_dir():  # in step 3 or later, between checkpoints
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before the signal"
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    stderr = proc.communicate(timeout=300)[0]  # and stdout, where Hydra's log goes
    assert proc.returncode == PREEMPTED_EXIT_STATUS, stderr[-3000:]
    assert "Traceback" not in stderr and "SIGTERM received" in stderr
    report = json.loads((run / "report.json").read_text())  # the report so far
    step = report["global_step"]
    assert 2 <= step < STEPS and report["stopped_by_signal"] == "SIGTERM" and report["lora_path"] is None
    assert f"stopped by SIGTERM after optimizer step {step}: checkpoint {run / 'checkpoints' / f'checkpoint-{step}'}" \
        in stderr and "trainer.resume_from_checkpoint=latest" in stderr
    assert (run / "checkpoints" / f"checkpoint-{step}" / "sd_lora_checkpoint.json").is_file()
    assert not (run / "lora").exists()  # not a finished LoRA
    assert f"resumed from {run / 'checkpoints' / f'checkpoint-{step}'} at step {step}" in resume(run)
    assert_same_end_state(run, reference)
    assert not (run / "sd_lora.lock").exists()  # released by both runs
    provenance = json.loads((run / "provenance.json").read_text())  # the run's two segments
    assert provenance["from_step"] == step and [p["from_step"] for p in provenance["earlier"]] == [0]


def test_a_second_signal_ends_the_process_at_once(tmp_path):
    """The first signal only asks; the second one ends the process as the signal would have (no handler left)."""
    script = ("import sys, time\nfrom sd_lora.signals import StopRequest\nwith StopRequest() as stop:\n"
              "    print('ready', flush=True)\n    while stop.signame is None: time.sleep(0.01)\n"
              "    print(stop.signame, flush=True)\n    time.sleep(60)\n")
    for signum in (signal.SIGINT, signal.SIGUSR1):
        proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline() == "ready\n"
        proc.send_signal(signum)
        assert proc.stdout.readline() == f"{signal.Signals(signum).name}\n"  # caught, still running
        assert proc.poll() is None
        proc.send_signal(signum)
        assert proc.wait(timeout=30) == -signum


def test_one_run_directory_holds_one_run(tiny_model_path, tmp_path, caplog):
    """A second writer is refused naming the holder; a lock left by a process that ended is taken over."""
    import socket

    from sd_lora.config import DeviceConfig, DeviceType
    from sd_lora.lock import LOCK_NAME, RunLock
    from sd_lora.train import train

    cfg = Config(model=ModelConfig(pretrained_model_name_or_path=str(tiny_model_path)), device=DeviceConfig(
        type=DeviceType.cpu), dataset=DatasetConfig(path=str(ROOT / "sd_lora" / "assets" / "shapes"), resolution=32))
    with RunLock(tmp_path):
        held = json.loads((tmp_path / LOCK_NAME).read_text())
        assert held["pid"] == os.getpid() and held["host"] == socket.gethostname()
        with pytest.raises(UserError) as info:
            train(cfg, tmp_path)  # the trainer takes the lock before it writes anything
        assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_NAME]
        launched = run_launch("device=cpu", f"hydra.run.dir={tmp_path}")  # refused before Hydra writes .hydra/
        assert launched.returncode == 2 and f"run directory {tmp_path} is in use by process {os.getpid()}" \
            in launched.stderr, launched.stdout[-2000:] + launched.stderr[-2000:]
        assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_NAME]
        assert f"run directory {tmp_path} is in use by process {os.getpid()} on {socket.gethostname()}, started " \
               f"{held['started_at']}" in str(info.value) and "hydra.run.dir" in str(info.value)
    assert not (tmp_path / LOCK_NAME).exists()

    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(ended.stdout)
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": dead, "host": socket.gethostname(), "started_at": "x"}))
    with caplog.at_level("WARNING"), RunLock(tmp_path):  # a kill -9 left it: taken over
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert f"taking over the lock of process {dead} (started x), which no longer runs" in caplog.text

    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere", "started_at": "y"}))
    with pytest.raises(UserError, match=f"in use by process 1 on elsewhere, started y .*remove {tmp_path / LOCK_NAME}"):
        with RunLock(tmp_path):
            pass


# --------------------------------------------------------------------------------------------
# 2c. checkpoints in-process: a small model through the real save_checkpoint / check_resume / resume


def small_run(run_dir: Path, **changes):
    """An accelerate-prepared Linear model, AdamW and a warm-up + linear schedule from the optimizer config, as the
    trainer builds them; `changes` override OptimizerConfig / TrainerConfig fields."""
    from accelerate import Accelerator

    from sd_lora.config import LrScheduler, OptimizerConfig
    from sd_lora.optim import build_lr_scheduler, build_optimizer

    accelerator = Accelerator(cpu=True)
    optimizer_keys = {k: v for k, v in changes.items() if k in OptimizerConfig.__dataclass_fields__}
    trainer_keys = {k: v for k, v in changes.items() if k not in optimizer_keys}
    cfg = Config(model=ModelConfig(pretrained_model_name_or_path="m"), dataset=DatasetConfig(path="d"),
                 optimizer=OptimizerConfig(**{"lr": 1e-2, "lr_scheduler": LrScheduler.linear, "lr_warmup_steps": 2,
                                              **optimizer_keys}), trainer=TrainerConfig(**trainer_keys))
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    optimizer = build_optimizer(cfg, list(model.parameters()), 1, fused_by_default=False)
    scheduler = build_lr_scheduler(cfg, optimizer, 10, 1)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    state = RunState(guard=NonFiniteGuard(cfg, accelerator, run_dir, list(model.parameters())),
                     losses=torch.zeros(2))

    def step():
        loss = model(torch.ones(2, 4)).pow(2).mean()
        accelerator.backward(loss)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        state.global_step += 1
        state.losses += torch.stack([loss.detach(), torch.ones(())])

    return cfg, accelerator, model, optimizer, scheduler, state, step


def test_checkpoints_carry_a_manifest_and_a_damaged_one_is_named_with_the_newest_intact_one(tmp_path, caplog):
    from sd_lora.checkpoints import CHECKPOINT_META, find_resume_checkpoint, last_good_checkpoint, save_checkpoint

    cfg, accelerator, model, _, _, state, step = small_run(tmp_path)
    for _ in range(2):
        step()
        save_checkpoint(accelerator, cfg, tmp_path, state)
    first, second = (tmp_path / "checkpoints" / f"checkpoint-{i}" for i in (1, 2))
    listed = json.loads((second / CHECKPOINT_META).read_text())["manifest"]
    assert {"model.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl"} <= set(listed)
    assert all(listed[name]["size"] == (second / name).stat().st_size for name in listed)

    def latest(value="latest"):
        return find_resume_checkpoint(Config(trainer=TrainerConfig(resume_from_checkpoint=value)), tmp_path)

    assert latest() == second
    weights = second / "model.safetensors"
    intact = weights.read_bytes()
    damaged = bytearray(intact)
    damaged[-64:] = bytes(64)  # 64 bytes overwritten inside the tensors, same size
    for content, wrong in ((bytes(damaged), f"{weights} differs from what was saved"),
                           (intact[:-10], f"{weights} is {len(intact) - 10} bytes, {len(intact)} when it was saved")):
        weights.write_bytes(content)
        with pytest.raises(UserError) as info:
            latest()
        assert str(info.value).startswith(f"trainer.resume_from_checkpoint=latest: checkpoint {second} is damaged: "
                                          f"{wrong}")
        assert f"the newest intact checkpoint is {first}: resume from it with " \
               "trainer.resume_from_checkpoint=latest_valid" in str(info.value)
        with caplog.at_level("WARNING"):
            assert latest("latest_valid") == first
        assert f"passing over checkpoint {second}: {wrong}" in caplog.text
        assert last_good_checkpoint(tmp_path) == first  # what the non-finite guard's message names
        with pytest.raises(UserError, match="is damaged"):
            latest(str(second))
    (first / "optimizer.bin").unlink()
    with pytest.raises(UserError, match=f"{first / 'optimizer.bin'} is missing"):
        latest(str(first))
    with pytest.raises(UserError, match="no intact checkpoint is left"):
        latest()


def test_resume_brings_back_the_losses_and_applies_or_refuses_changed_settings(tmp_path, caplog):
    from sd_lora.checkpoints import check_resume, resume, save_checkpoint

    cfg, accelerator, model, optimizer, scheduler, state, step = small_run(tmp_path)
    for _ in range(3):
        step()
    state.last_loss = 0.25  # logged at step 2, say; step 3's loss is not logged yet
    state.losses = torch.tensor([0.75, 1.0])
    save_checkpoint(accelerator, cfg, tmp_path, state)
    lr_at_3 = optimizer.param_groups[0]["lr"]
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    checkpoint = tmp_path / "checkpoints" / "checkpoint-3"

    cfg, accelerator, model, optimizer, scheduler, _, step = small_run(tmp_path, lr=1e-1, weight_decay=0.5)
    with caplog.at_level("WARNING"):
        state = resume(accelerator, cfg, checkpoint, 10, optimizer, scheduler)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())
    assert state.last_loss == 0.25 and state.losses.tolist() == [0.75, 1.0]  # final_loss covers the whole run
    # the new lr is really used: the schedule's factor at step 3, on the new peak; the next steps follow it
    assert optimizer.param_groups[0]["lr"] == pytest.approx(lr_at_3 * 10)
    assert optimizer.param_groups[0]["weight_decay"] == 0.5
    step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-1 * (10 - 4) / (10 - 2))  # linear decay after warm-up
    assert "resumed with optimizer.lr changed 0.01 -> 0.1" in caplog.text
    assert "resumed with optimizer.weight_decay changed 0.01 -> 0.5" in caplog.text

    for changes, named in (({"seed": 1}, "trainer.seed: 0 in the checkpoint, 1 now"),
                           ({"lr_warmup_steps": 0}, "optimizer.lr_warmup_steps: 2 in the checkpoint, 0 now")):
        cfg = small_run(tmp_path, resume_from_checkpoint=str(checkpoint), **changes)[0]
        with pytest.raises(UserError, match=named):
            check_resume(cfg, tmp_path, {})
    assert check_resume(small_run(tmp_path, resume_from_checkpoint=str(checkpoint), lr=1.0)[0], tmp_path, {}) \
        == checkpoint


def test_a_full_disk_gives_one_message_and_keeps_the_previous_checkpoint(tmp_path):
    """A real write failure (a file-size limit, as `ulimit -f` sets it), in a process of its own."""
    import resource

    script = f"""
import resource, sys
sys.path.insert(0, {str(ROOT / "tests")!r})
from pathlib import Path
from test_checkpoints import small_run
from sd_lora.checkpoints import save_checkpoint
from sd_lora.errors import UserError
run = Path({str(tmp_path)!r})
cfg, accelerator, model, _, _, state, step = small_run(run)
step()
save_checkpoint(accelerator, cfg, run, state)
step()
resource.setrlimit(resource.RLIMIT_FSIZE, (300, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:
    save_checkpoint(accelerator, cfg, run, state)
except UserError as exc:
    print("USER ERROR", exc)
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert "USER ERROR" in done.stdout, done.stdout[-2000:] + done.stderr[-2000:]
    message = done.stdout.split("USER ERROR ", 1)[1]
    assert message.startswith(f"could not write the checkpoint at {tmp_path / 'checkpoints' / '.tmp-checkpoint-2'}: ")
    assert "GiB free there" in message and "hydra.run.dir" in message
    assert f"The previous checkpoint {tmp_path / 'checkpoints' / 'checkpoint-1'} is kept" in message
    assert checkpoints(tmp_path) == ["checkpoint-1"]  # the half-written one is gone, the previous one intact
    from sd_lora.checkpoints import damage

    assert damage(tmp_path / "checkpoints" / "checkpoint-1") is None
    assert resource.getrlimit(resource.RLIMIT_FSIZE)  # (the limit was the child's alone)


# --------------------------------------------------------------------------------------------
# 3. resume refuses what does not fit


def test_resume_refuses_a_checkpoint_that_does_not_fit_naming_each_key(reference, tiny_model_path, tmp_path):
    run = tmp_path / "other"
    shutil.copytree(reference / "checkpoints", run / "checkpoints")
    other_model = tmp_path / "other_model"
    shutil.copytree(tiny_model_path, other_model)
    config = json.loads((other_model / "unet" / "config.json").read_text())
    (other_model / "unet" / "config.json").write_text(json.dumps({**config, "sample_size": 16}))
    result = run_launch(*RUN, "model.lora.rank=8", "dataset.max_train_samples=12",
                        f"model.pretrained_model_name_or_path={other_model}", "trainer.resume_from_checkpoint=latest",
                        f"hydra.run.dir={run}")
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "Traceback" not in output
    assert f"{run / 'checkpoints' / f'checkpoint-{STEPS}'} does not fit this run" in output
    assert "model.lora.rank: 4 in the checkpoint, 8 now" in output
    assert "the number of training samples" in output and "10 in the checkpoint, 12 now" in output
    assert "the model (U-Net config and weights)" in output and str(other_model) in output
    assert "model.lora.target_modules" not in output  # only what differs
    assert not (run / "lora").exists() and not (run / "provenance.json").exists()  # stopped before any work


# --------------------------------------------------------------------------------------------
# 4. non-finite loss


NAN_RUN = ["trainer.max_train_steps=4", "trainer.checkpointing_steps=1", "trainer.log_every_n_steps=4",
           "optimizer.lr=1e30", "optimizer.lr_scheduler=constant", "optimizer.lr_warmup_steps=0"]
# step 1 throws the LoRA weights to ~1e30: from step 2 on the loss overflows


def test_nonfinite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tiny_model_path, tmp_path):
    run = tmp_path / "nan"
    result = run_launch(*RUN, *NAN_RUN, f"hydra.run.dir={run}")
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "Traceback" not in output
    assert "became NaN/Inf at optimizer step 2;" in output and "lower optimizer.lr (now 1e+30)" in output
    assert "trainer.on_nonfinite_loss=skip" in output
    assert f"the last good checkpoint is {run / 'checkpoints' / 'checkpoint-1'}" in output
    assert checkpoints(run) == ["checkpoint-1"] and not (run / "lora").exists()
    assert all(torch.isfinite(v).all() for v in load_file(run / "checkpoints" / "checkpoint-1" / "lora.safetensors").values())


def test_nonfinite_guard_names_the_step_it_happened_in_when_checked_later(tmp_path):
    """Between checks the flag stays on the device; the check names the first bad step, not the current one."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)

    def run(policy: OnFailure, losses, norms):
        cfg = Config(model=ModelConfig(pretrained_model_name_or_path="m"), dataset=DatasetConfig(path="d"),
                     trainer=TrainerConfig(on_nonfinite_loss=policy))
        guard, state, withheld = NonFiniteGuard(cfg, accelerator, tmp_path), RunState(), []
        for loss, norm in zip(losses, norms):
            guard.add_loss(torch.tensor(loss))
            withheld.append(guard.skip_step(state, None if norm is None else torch.tensor(norm)))
            state.global_step += 1
        return guard, state, withheld

    nan, inf = float("nan"), float("inf")
    guard, _, withheld = run(OnFailure.error, [1.0, 1.0, nan, 2.0, inf], [1.0, None, 1.0, 1.0, 1.0])
    assert withheld == [False] * 5  # the error policy never waits for the device
    with pytest.raises(UserError, match=r"at optimizer step 3;.*no checkpoint had been saved"):
        guard.check()
    guard, _, _ = run(OnFailure.error, [1.0, 1.0], [1.0, inf])  # a finite loss, a non-finite gradient norm
    with pytest.raises(UserError, match=r"at optimizer step 2;"):
        guard.check()
    run(OnFailure.error, [1.0, 2.0], [1.0, None])[0].check()  # all finite: no error

    guard, state, withheld = run(OnFailure.skip, [1.0, nan, 2.0, 1.0], [1.0, 1.0, 1.0, inf])
    assert withheld == [False, True, False, True] and state.nonfinite_skipped_steps == 2
    guard.check()  # skip policy: never raises


def test_nonfinite_lora_weights_are_refused_before_anything_is_written_under_either_policy(tmp_path):
    """A finite loss and gradient, and an update that overflows (huge lr x weight decay): the weights, not the
    loss, say so. The message names the newest complete checkpoint, never a half-written one."""
    from accelerate import Accelerator

    from sd_lora.checkpoints import CHECKPOINT_META

    accelerator = Accelerator(cpu=True)
    (tmp_path / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    (tmp_path / "checkpoints" / "checkpoint-2" / CHECKPOINT_META).write_text("{}")
    (tmp_path / "checkpoints" / "checkpoint-3").mkdir()  # no sd_lora_checkpoint.json: not complete
    for policy in OnFailure:
        param = torch.nn.Parameter(torch.ones(4))
        optimizer = torch.optim.AdamW([param], lr=3e37, weight_decay=11.0)  # decay to -3.3e38, then -3e37 more
        cfg = Config(model=ModelConfig(pretrained_model_name_or_path="m"), dataset=DatasetConfig(path="d"),
                     trainer=TrainerConfig(on_nonfinite_loss=policy))
        guard = NonFiniteGuard(cfg, accelerator, tmp_path, [param])
        guard.check(0)  # finite weights pass
        loss = (param * 0.5).sum()
        guard.add_loss(loss)
        loss.backward()
        assert not guard.skip_step(RunState(), torch.linalg.vector_norm(param.grad))  # loss and norm are finite
        optimizer.step()
        assert not torch.isfinite(param).all()
        with pytest.raises(UserError) as info:
            guard.check(1)
        text = str(info.value)
        assert "LoRA weights hold NaN/Inf after optimizer step 1" in text and "optimizer.weight_decay (now 0.01)" in text
        assert f"the last good checkpoint is {tmp_path / 'checkpoints' / 'checkpoint-2'} " in text
        guard.check()  # without a step (a logging step) the weights are not read


def test_grad_scaler_skips_are_counted_also_when_a_fused_adamw_skips_in_its_kernel(tmp_path):
    """fp16's normal skipped steps: accelerate's optimizer_step_was_skipped misses those of a fused AdamW."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    accelerator.scaler = torch.amp.GradScaler("cpu")  # what accelerate holds under fp16 on a GPU (none on the CPU)
    cfg = Config(model=ModelConfig(pretrained_model_name_or_path="m"), dataset=DatasetConfig(path="d"))
    guard = NonFiniteGuard(cfg, accelerator, tmp_path)
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = accelerator.prepare(torch.optim.AdamW([param], lr=0.1, fused=True))
    for grad in (1.0, float("inf"), 1.0, float("inf"), 1.0):
        accelerator.backward((param * grad).sum())
        before, scale = param.detach().clone(), guard.scale_before_step()
        optimizer.step()
        optimizer.zero_grad()
        guard.count_scaler_skip(scale)
        assert torch.equal(param, before) == (grad == float("inf"))  # the scaler skipped exactly the inf steps
    assert guard.take_scaler_skips() == 2 and guard.take_scaler_skips() == 0


# --------------------------------------------------------------------------------------------
# 5. bad data; and 4's skip switch


def write_images(root: Path, captions: list, broken: int | None = None) -> Path:
    return write_noise_folder(root, [((64, 64), caption) for caption in captions], broken=broken)


def test_skip_switches_keep_the_run_going_and_count_what_they_skipped(tiny_model_path, tmp_path):
    data = write_images(tmp_path / "data", [f"a square number {i}" for i in range(4)], broken=2)
    run = tmp_path / "skip"
    result = run_launch(*RUN, *NAN_RUN, "trainer.on_nonfinite_loss=skip", "dataset.on_bad_image=skip",
                        f"dataset.path={data}", "dataset.max_train_samples=null", "trainer.train_batch_size=4",
                        "trainer.gradient_accumulation_steps=1", "trainer.log_every_n_steps=1",
                        f"hydra.run.dir={run}")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    report = json.loads((run / "report.json").read_text())
    assert report["global_step"] == 4 and report["nonfinite_skipped_steps"] == 3  # steps 2, 3 and 4
    assert report["grad_scaler_skipped_steps"] == 0  # no grad scaler outside fp16
    assert report["skipped_images"] == 1 and report["skipped_image_rows"] == [2]
    assert str(data / "02.png") in output and "dataset.on_bad_image=skip" in output
    assert "step 2: NaN/Inf loss" in output
    assert all(torch.isfinite(v).all() for v in load_file(run / "lora" / "pytorch_lora_weights.safetensors").values())


def table_of(captions, broken=(), size=(48, 32)):
    def png(i):
        if i in broken:
            return {"bytes": b"not a png", "path": f"{i}.png"}
        buffer = io.BytesIO()
        noise_image(*size, seed=i).save(buffer, "PNG")
        return {"bytes": buffer.getvalue(), "path": f"{i}.png"}

    return datasets.Dataset.from_dict({"image": [png(i) for i in range(len(captions))], "text": captions})


def test_bad_image_skip_takes_the_next_row_and_error_names_the_row(tokenize):
    table = table_of(["a", "b", "c"], broken={1})
    skip = CaptionedImages(table, DatasetConfig(path="d", resolution=16, center_crop=True, on_bad_image=OnFailure.skip),
                           tokenize)
    item = skip[(0, 0, 1)]
    assert item["index"] == 1 and item["skipped_rows"] == [1]  # the slot keeps its index (its random streams)
    assert torch.equal(item["pixel_values"], skip[(0, 0, 2)]["pixel_values"])  # row 2's image in its place
    assert "skipped_rows" not in skip[(0, 0, 0)]
    assert collate([skip[(0, 0, i)] for i in range(3)])["skipped_rows"] == [1]
    with pytest.raises(UserError, match=r"data set row 1 \(file 1.png\): the image cannot be decoded"):
        CaptionedImages(table, DatasetConfig(path="d", resolution=16), tokenize)[(0, 0, 1)]
    all_bad = table_of(["a", "b"], broken={0, 1})
    with pytest.raises(UserError, match="2 rows in a row from data set row 0 cannot be decoded"):
        CaptionedImages(all_bad, DatasetConfig(path="d", resolution=16, on_bad_image=OnFailure.skip), tokenize)[0]


def test_empty_captions_are_refused_at_start_naming_the_rows(tmp_path):
    data = write_images(tmp_path / "data", ["a red square", "", "  ", "a blue square"])
    with pytest.raises(UserError) as info:
        load_table(DatasetConfig(path=str(data)))
    text = str(info.value)
    assert "2 of 4 training rows have an empty caption (rows 1, 2;" in text and str(data / "01.png") in text
    assert "dataset.caption_column='text'" in text
    # rows left out by max_train_samples do not count
    assert len(load_table(DatasetConfig(path=str(write_images(tmp_path / "ok", ["a", "b"])), max_train_samples=1))) == 1


# --------------------------------------------------------------------------------------------
# the data order and transforms a resume must reproduce


def test_epoch_order_and_sample_transforms_depend_on_seed_epoch_and_index_only(tokenize):
    def order(seed, epoch):
        sampler = EpochShuffle(10, seed)
        sampler.epoch = epoch
        return [index for _, _, index in sampler]

    assert sorted(order(0, 3)) == list(range(10))
    assert order(0, 3) == order(0, 3) and order(0, 3) != order(0, 4) and order(0, 3) != order(1, 3)
    sampler = EpochShuffle(10, 0)
    assert [k[2] for k in sampler] == order(0, 0) and [k[2] for k in sampler] == order(0, 1)  # counts up per pass

    # random crop of a 48x32 image, random flip and one of several captions: a function of the key
    table = table_of([["a red square", "a square", "red"]] * 6)
    data = CaptionedImages(table, DatasetConfig(path="d", resolution=16, random_flip=True), tokenize)
    for epoch in range(3):
        again = data[(0, epoch, 4)]
        assert all(torch.equal(again[k], data[(0, epoch, 4)][k]) for k in ("pixel_values", "input_ids"))
    views = {(data[(0, e, 4)]["pixel_values"].numpy().tobytes(), tuple(data[(0, e, 4)]["input_ids"].tolist()))
             for e in range(12)}
    assert len(views) > 3  # and it does vary with the epoch

    # the same batches in worker processes as in the main process, for two epochs
    def batches(workers):
        loader = build_dataloader(data, batch_size=4, num_workers=workers, seed=5)
        return [(b["index"], b["pixel_values"], b["input_ids"]) for _ in range(2) for b in loader]

    for (i0, p0, t0), (i2, p2, t2) in zip(batches(0), batches(2), strict=True):
        assert i0 == i2 and torch.equal(p0, p2) and torch.equal(t0, t2)


# --------------------------------------------------------------------------------------------
# 6. the run directory says how it was made


def test_provenance_records_config_overrides_versions_commit_and_seeds(reference):
    import diffusers
    import peft

    provenance = json.loads((reference / "provenance.json").read_text())
    assert provenance["overrides"] == RUN  # the job's overrides (Hydra keeps hydra.run.dir among its own)
    assert provenance["config"]["trainer"]["max_train_steps"] == STEPS
    assert provenance["config"]["model"]["lora"]["dropout"] == 0.1
    packages = provenance["packages"]
    assert packages["torch"] == torch.__version__ and packages["diffusers"] == diffusers.__version__
    assert packages["peft"] == peft.__version__ and {"accelerate", "transformers", "torch_gcu"} <= set(packages)
    assert provenance["seeds"]["trainer.seed"] == 0
    # the commit the run started from: HEAD read around the run (a commit landing meanwhile may give either)
    assert provenance["git_commit"] in reference_heads[reference]
    assert provenance["resumed_from"] is None and "earlier" not in provenance


@pytest.fixture(scope="module")
def tiny_parts(tiny_components):
    return tiny_components


def held_out_set(table, parts, batch_size=8, **dataset):
    from sd_lora.evaluation import build_validation_set
    from sd_lora.families import FAMILIES

    encode = functools.partial(FAMILIES[ModelFamilyName.sd].encode_captions, parts, device="cpu")
    return build_validation_set(table, DatasetConfig(path="d", resolution=16, **dataset), encode, parts.vae,
                                parts.noise_scheduler, "cpu", torch.float32, num_timesteps=2,
                                seed=0, batch_size=batch_size)


def test_held_out_rows_encoded_in_batches_match_one_at_a_time(tiny_parts):
    """The held-out rows are encoded a few at a time (a last, smaller batch too, and around a skipped row):
    each sample keeps its own latent and text embedding, in row order."""
    table = table_of([f"caption {i}" for i in range(7)], broken={2})
    batched = held_out_set(table, tiny_parts, batch_size=3, on_bad_image=OnFailure.skip)
    single = held_out_set(table, tiny_parts, batch_size=1, on_bad_image=OnFailure.skip)
    assert batched.num_samples == single.num_samples == 6
    torch.testing.assert_close(batched.latents, single.latents, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(batched.text["encoder_hidden_states"], single.text["encoder_hidden_states"], rtol=1e-4, atol=1e-5)
    assert torch.equal(batched.timesteps, single.timesteps) and torch.equal(batched.noise, single.noise)
    # row order: the 4th sample (table row 4, after the skipped row 2) is row 4's image and caption
    alone = held_out_set(table.select([4]), tiny_parts)
    torch.testing.assert_close(batched.latents[3 * 2], alone.latents[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(batched.text["encoder_hidden_states"][3 * 2], alone.text["encoder_hidden_states"][0],
                               rtol=1e-4, atol=1e-5)


def test_held_out_bad_images_follow_on_bad_image(tiny_parts, caplog):
    table = table_of(["a", "b", "c"], broken={1})
    with caplog.at_level("WARNING"):
        kept = held_out_set(table, tiny_parts, on_bad_image=OnFailure.skip)
    assert kept.num_samples == 2 and "left out of the validation loss" in caplog.text
    without = held_out_set(table.select([0, 2]), tiny_parts)  # the same as holding out only the good rows
    assert torch.equal(kept.latents, without.latents)
    assert torch.equal(kept.text["encoder_hidden_states"], without.text["encoder_hidden_states"])
    with pytest.raises(UserError, match=r"held-out data set row 1 \(file 1.png\): the image cannot be decoded"):
        held_out_set(table, tiny_parts)  # on_bad_image=error, the default
    with pytest.raises(UserError, match="none of the 2 held-out images can be decoded"):
        held_out_set(table_of(["a", "b"], broken={0, 1}), tiny_parts, on_bad_image=OnFailure.skip)


def test_held_out_captions_use_the_first_and_are_checked(tiny_parts, tmp_path):
    from sd_lora.data import load_tables

    several = held_out_set(table_of([["a red square", "ignored"]]), tiny_parts)
    one = held_out_set(table_of(["a red square"]), tiny_parts)
    assert torch.equal(several.text["encoder_hidden_states"], one.text["encoder_hidden_states"])  # fixed, not a random pick
    with pytest.raises(UserError, match=r"held-out data set row 0: caption column 'text' holds \['int', 'int'\], no text"):
        held_out_set(datasets.Dataset.from_dict({"image": table_of(["x"])["image"], "text": [[1, 2]]}), tiny_parts)
    # a half split with validation_seed 0 trains on rows 1 and 3 and holds out rows 0 and 2 (datasets' seeded shuffle)
    data = write_images(tmp_path / "data", ["", "a red square", " ", "a blue square"])
    with pytest.raises(UserError, match=r"2 of 2 held-out rows have an empty caption"):
        load_tables(DatasetConfig(path=str(data), validation_split=0.5))
    assert len(load_table(DatasetConfig(path=str(data), validation_split=0.5))) == 2  # the training rows pass


def test_a_finished_run_is_known_by_its_length_and_its_written_outputs(tmp_path):
    """finished_run decides before any weights load whether resuming has anything to do."""
    from sd_lora.checkpoints import CHECKPOINT_META, finished_run

    run = tmp_path / "run"
    ckpt = run / "checkpoints" / "checkpoint-4"
    ckpt.mkdir(parents=True)
    (run / "lora").mkdir()
    fingerprint = {"training_samples": 8, "global_batch_size": 4}
    (ckpt / CHECKPOINT_META).write_text(json.dumps({
        "step": 4, "fingerprint": fingerprint, "max_train_steps": 4, "trainer.max_train_steps": None,
        "trainer.num_train_epochs": 2, "dataset.drop_last": False}))
    epochs = Config(trainer=TrainerConfig(num_train_epochs=2, max_train_steps=None))
    assert not finished_run(epochs, ckpt, fingerprint)  # no LoRA and report yet: resuming writes them
    (run / "report.json").write_text("{}")
    (run / "lora" / "pytorch_lora_weights.safetensors").write_bytes(b"")
    assert finished_run(epochs, ckpt, fingerprint)
    assert not finished_run(Config(trainer=TrainerConfig(num_train_epochs=3, max_train_steps=None)), ckpt, fingerprint)
    assert not finished_run(epochs, ckpt, {**fingerprint, "global_batch_size": 2})  # 2 epochs are 8 steps now
    assert not finished_run(Config(trainer=TrainerConfig(num_train_epochs=2, max_train_steps=None),
                                   dataset=DatasetConfig(path="d", drop_last=True)), ckpt, fingerprint)
    assert finished_run(Config(trainer=TrainerConfig(max_train_steps=4)), ckpt, fingerprint)
    assert not finished_run(Config(trainer=TrainerConfig(max_train_steps=5)), ckpt, fingerprint)


def test_held_out_captions_are_encoded_by_the_text_encoder_as_it_is_when_it_trains(tiny_model_path):
    """model.lora.train_text_encoder: the validation loss encodes the held-out captions with the text encoder's
    LoRA as it is at each evaluation, not as it was when the validation set was built."""
    from sd_lora.config import LoraSettings, ModelConfig
    from sd_lora.evaluation import build_validation_set, validation_loss
    from sd_lora.families import FAMILIES
    from sd_lora.model import add_text_lora, load_components

    family = FAMILIES[ModelFamilyName.sd]
    parts = load_components(ModelConfig(pretrained_model_name_or_path=str(tiny_model_path)), tiny_model_path)
    params = add_text_lora(parts.text_encoders, LoraSettings(rank=4, train_text_encoder=True))
    table = table_of([f"caption {i}" for i in range(3)])

    def held_out(encode):
        return build_validation_set(table, DatasetConfig(path="d", resolution=16), encode, parts.vae,
                                    parts.noise_scheduler, "cpu", torch.float32, num_timesteps=2, seed=0)

    tokens = held_out(lambda captions: family.tokenize(parts.tokenizers, captions))
    assert tokens.text["input_ids"].dtype == torch.int64  # kept as tokens, not cast to float

    def losses():
        embedded = held_out(functools.partial(family.encode_captions, parts, device="cpu"))  # encoded now
        return [validation_loss(parts.unet, family, parts.noise_scheduler, vset, torch.float32,
                                text_encoders=parts.text_encoders) for vset in (tokens, embedded)]

    before = losses()
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.5, generator=torch.Generator().manual_seed(2))
    after = losses()
    assert before[0] == pytest.approx(before[1], rel=1e-5) and after[0] == pytest.approx(after[1], rel=1e-5)
    assert after[0] != pytest.approx(before[0], rel=1e-3)  # the tokens were encoded anew, with the changed LoRA
