"""Sweeps on the tiny model: job folders, the summary callback, failed jobs, the validation loss."""

import csv
import json
import math

import pytest
from conftest import ROOT, run_launch

FAST = ["device=cpu", "trainer.max_train_steps=3", "trainer.validation_prompts=[]", "trainer.checkpointing_steps=null",
        "dataset.validation_split=0.1", "trainer.skip_steps=1"]


def read_summary(sweep_dir):
    with open(sweep_dir / "summary.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def grid(tmp_path_factory, tiny_model_path):
    sweep_dir = tmp_path_factory.mktemp("grid") / "sweep"
    result = run_launch("-m", *FAST, "optimizer.lr=1e-4,1e-2", "model.lora.rank=2,4", f"hydra.sweep.dir={sweep_dir}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return sweep_dir, result.stdout


def test_grid_gives_one_readable_job_folder_each(grid):
    sweep_dir, _ = grid
    jobs = sorted(p.name for p in sweep_dir.iterdir() if p.is_dir())
    assert len(jobs) == 4
    # the values that vary, not the fixed ones; safe to paste into a shell and into run_dir= (no '=', ',', '/')
    assert jobs == ["0_lr-0.0001_rank-2", "1_lr-0.0001_rank-4", "2_lr-0.01_rank-2", "3_lr-0.01_rank-4"]
    for job in sweep_dir.iterdir():
        if job.is_dir():
            assert (job / "lora" / "pytorch_lora_weights.safetensors").is_file()
            assert (job / "report.json").is_file() and list((job / "tensorboard").rglob("events.out.tfevents.*"))


def test_summary_is_sorted_best_first_and_printed(grid):
    sweep_dir, stdout = grid
    rows = read_summary(sweep_dir)
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows)
    losses = [float(r["validation_loss"]) for r in rows]
    assert losses == sorted(losses) and len(set(losses)) == 4
    assert {(r["optimizer.lr"], r["model.lora.rank"]) for r in rows} == {
        ("0.0001", "2"), ("0.0001", "4"), ("0.01", "2"), ("0.01", "4")}
    for r in rows:  # each row is its job's report
        report = json.loads((sweep_dir / r["run_dir"].split("/")[-1] / "report.json").read_text())
        assert float(r["validation_loss"]) == pytest.approx(report["validation_loss"])
    md = (sweep_dir / "summary.md").read_text()
    assert md.count("\n| ") >= 5 and "validation_loss" in md
    assert "sweep summary:" in stdout and "| optimizer.lr | model.lora.rank |" in stdout
    png = (sweep_dir / "val_loss_vs_lr.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000


def test_a_failed_job_is_a_failed_row_the_sweep_goes_on_and_exits_non_zero(tmp_path, tiny_model_path):
    """Also without held-out data: a warning at the start, and the summary says it ranks by the train loss."""
    sweep_dir = tmp_path / "sweep"
    no_held_out = [o for o in FAST if not o.startswith("dataset.validation_split")]
    result = run_launch("-m", *no_held_out, "model.lora.rank=2,0", f"hydra.sweep.dir={sweep_dir}")
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    rows = read_summary(sweep_dir)
    assert [r["status"] for r in rows] == ["ok", "failed"]
    assert rows[1]["model.lora.rank"] == "0" and "model.lora.rank=0" in rows[1]["error"]
    assert "1 of 2 sweep job(s) failed" in result.stdout + result.stderr
    assert "this sweep has no held-out data" in result.stdout + result.stderr
    assert rows[0]["validation_loss"] == "" and float(rows[0]["final_loss"]) > 0
    assert "Best first by `final_loss`, the final train loss" in (sweep_dir / "summary.md").read_text()


def test_validation_loss_is_reproducible_and_depends_on_training(tmp_path, grid, tiny_model_path):
    sweep_dir, _ = grid
    by_lr = {r["optimizer.lr"]: float(r["validation_loss"]) for r in read_summary(sweep_dir)
             if r["model.lora.rank"] == "2"}
    assert by_lr["0.0001"] != by_lr["0.01"]
    again = tmp_path / "again"
    result = run_launch(*FAST, "optimizer.lr=1e-2", "model.lora.rank=2", f"hydra.run.dir={again}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((again / "report.json").read_text())["validation_loss"] == by_lr["0.01"]  # bit for bit
    assert repr(by_lr["0.01"]) == [r["validation_loss"] for r in read_summary(sweep_dir)
                                   if r["optimizer.lr"] == "0.01" and r["model.lora.rank"] == "2"][0]


def test_committed_sweeps_compose():
    from hydra import compose, initialize_config_dir

    import sd_lora.config  # noqa: F401  (schemas and resolvers)

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        grid_cfg = compose("config", overrides=["+sweep=lr_rank"], return_hydra_config=True)
        assert str(grid_cfg.hydra.mode) == "RunMode.MULTIRUN"
        assert dict(grid_cfg.hydra.sweeper.params) == {"optimizer.lr": "1e-4,2.4e-4", "model.lora.rank": "4,8,16"}
        assert grid_cfg.dataset.validation_split > 0
        optuna_cfg = compose("config", overrides=["+sweep=optuna_lr_rank"], return_hydra_config=True)
        assert "optuna" in optuna_cfg.hydra.sweeper._target_.lower()
        assert optuna_cfg.hydra.sweeper.direction == "minimize"


def test_a_sweep_over_optimizers_composes_one_typed_config_per_job():
    """`-m optimizer=adamw,prodigy model.lora.rank=4,8`: four jobs, each its optimizer's own defaults (prodigy's lr
    1.0) under the swept rank, and one summary column per swept key."""
    import hydra
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from sd_lora.config import to_config
    from sd_lora.sweep import short_names

    overrides = OverridesParser.create().parse_overrides(["optimizer=adamw,prodigy", "model.lora.rank=4,8"])
    (jobs,) = BasicSweeper.split_arguments(overrides, max_batch_size=None)
    with hydra.initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        configs = [to_config(hydra.compose("config", overrides=list(job))) for job in jobs]
    assert sorted((c.optimizer.name.value, c.optimizer.lr, c.model.lora.rank) for c in configs) == [
        ("adamw", 1e-4, 4), ("adamw", 1e-4, 8), ("prodigy", 1.0, 4), ("prodigy", 1.0, 8)]
    assert short_names(["optimizer", "model.lora.rank"]) == {"optimizer": "optimizer", "model.lora.rank": "rank"}


def test_optuna_sweep_minimises_the_validation_loss(tmp_path, tiny_model_path):
    sweep_dir = tmp_path / "optuna"
    result = run_launch("+sweep=optuna_lr_rank", *FAST, "hydra.sweeper.n_trials=2", "model.lora.rank=2",
                        f"hydra.sweep.dir={sweep_dir}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    best = (sweep_dir / "optimization_results.yaml").read_text()
    rows = read_summary(sweep_dir)
    assert len(rows) == 2 and all(r["status"] == "ok" for r in rows)
    assert math.isclose(float(best.split("best_value:")[1].split()[0]), float(rows[0]["validation_loss"]),
                        rel_tol=1e-6)


def test_committed_slurm_launcher_composes():
    from hydra import compose, initialize_config_dir

    import sd_lora.config  # noqa: F401

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=slurm_gpu"], return_hydra_config=True)
    assert "submitit" in cfg.hydra.launcher._target_.lower()
    assert cfg.hydra.launcher.gpus_per_node == 8 and cfg.hydra.launcher.tasks_per_node == 1


def test_validation_loss_under_mixed_precision_spans_several_batches(tmp_path, tiny_model_path):
    """9 held-out samples x 8 timesteps = 9 batches under bf16 autocast (a one-shot autocast broke batch 2)."""
    out = tmp_path / "bf16"
    result = run_launch(*FAST, "precision=bf16", f"hydra.run.dir={out}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert math.isfinite(json.loads((out / "report.json").read_text())["validation_loss"])


def test_job_folders_are_named_by_the_sweep_under_a_submitit_launcher(tmp_path, tiny_model_path):
    """submitit runs each job in a worker process whose command line is submitit's own, not the sweep's:
    the job names must still come from the sweep (the launching process writes its keys into the sweep dir),
    as they do with SLURM (`hydra/launcher=slurm_gpu`, the same plugin)."""
    sweep_dir = tmp_path / "sweep"
    result = run_launch("-m", "hydra/launcher=submitit_local", *FAST, "optimizer.lr=1e-4,1e-2",
                        f"hydra.sweep.dir={sweep_dir}", timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    jobs = sorted(p.name for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert jobs == ["0_lr-0.0001", "1_lr-0.01"]
    assert [r["status"] for r in read_summary(sweep_dir)] == ["ok", "ok"]


def test_job_names_keep_values_readable_and_signs():
    from sd_lora.sweep import safe_value, short_names

    assert [safe_value(v) for v in ("2.4e-4", "-0.1", "[to_q,to_k]", "a/b=c")] == ["2.4e-4", "-0.1", "to_q-to_k", "a-b-c"]
    assert short_names(["optimizer.lr", "model.lora.rank", "dataset.resolution"]) == {
        "optimizer.lr": "lr", "model.lora.rank": "rank", "dataset.resolution": "resolution"}
    # two keys ending alike keep their whole names
    assert short_names(["model.lora.dropout", "trainer.dropout"]) == {
        "model.lora.dropout": "model-lora-dropout", "trainer.dropout": "trainer-dropout"}


def sweep_config(*overrides):
    from hydra import compose, initialize_config_dir

    import sd_lora.sweep  # noqa: F401  (the job_name resolver)

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=True)


def test_the_sweep_preflight_checks_devices_only_where_its_jobs_run():
    """In-process jobs share this machine: a device it lacks stops the sweep. Jobs a launcher sends to other
    machines (SLURM) are checked there: the login node's lack of a GPU must not stop them."""
    from sd_lora.sweep import preflight

    with pytest.raises(SystemExit) as stopped:
        preflight(sweep_config("device=gcu"), swept=["optimizer.lr"])
    assert stopped.value.code == 2
    preflight(sweep_config("device=gcu", "hydra/launcher=submitit_local"), swept=["optimizer.lr"])  # no exit
    with pytest.raises(SystemExit):  # the data set is shared by every job wherever it runs: still checked
        preflight(sweep_config("hydra/launcher=submitit_local", "dataset.path=nowhere"), swept=["optimizer.lr"])
    preflight(sweep_config("dataset.path=nowhere"), swept=["dataset.path"])  # swept: each job checks its own
