"""Sweeps: readable job names and the summary that answers "which one is best?".

`${sd_lora.job_name:}` names a sweep job by the overrides that vary across the sweep (from the
command line's sweep overrides and the sweeper's `params`), so a job folder reads
`3_lr-2.4e-4_rank-8` rather than carrying every fixed override too.

`SweepSummary` is a Hydra callback (registered in conf/config.yaml): at the end of a multirun it reads
every job folder's report.json (or failure.json), writes `summary.csv`, `summary.md` and
`val_loss_vs_lr.png` (one line per LoRA rank) into the sweep folder, best first, and prints the table.
Failed jobs are rows with their error; they do not stop the summary.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import re
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

SUMMARY_COLUMNS = ("validation_loss", "final_loss", "samples_per_second", "peak_memory_gib", "run_dir", "status",
                   "error")  # final_loss: the train loss of the last logging step


KEYS_FILE = ".sd_lora_sweep_keys.json"  # in the sweep dir: the varying keys, worked out where the sweep started


def _sweep_keys(root) -> list[str]:
    """Keys that vary across this sweep: the sweeper's params plus the sweep overrides (`a=1,2`, `range(..)`)
    in hydra.overrides.task. Only the launching process's config holds the latter (a job's own config holds
    its one value), so `SweepSummary.on_multirun_start` writes them into the sweep dir for the jobs."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    keys = [str(k) for k in (OmegaConf.select(root, "hydra.sweeper.params", default=None) or {})]
    task = [str(o) for o in (OmegaConf.select(root, "hydra.overrides.task", default=None) or [])]
    for override in OverridesParser.create().parse_overrides(task):
        if override.is_sweep_override():
            keys.append(override.get_key_element().lstrip("+~"))
    return list(dict.fromkeys(keys))


def job_name(*, _root_) -> str:
    """`lr-2.4e-4_rank-8`: this job's values of the keys that vary across the sweep, safe to paste into a shell
    and into `run_dir=` (no `=`, `,` or `/`).

    Resolved where the job runs: in the launching process for Hydra's basic launcher, in a SLURM or local
    submitit worker otherwise, whose command line holds none of the sweep. So the keys come from the file
    the launching process wrote into the sweep dir."""
    keys_file = Path(str(OmegaConf.select(_root_, "hydra.sweep.dir"))) / KEYS_FILE
    varying = json.loads(keys_file.read_text()) if keys_file.is_file() else _sweep_keys(_root_)
    task = OmegaConf.select(_root_, "hydra.overrides.task", default=[]) or []
    names = short_names(varying)
    parts = []
    for item in task:
        key, _, value = str(item).partition("=")
        key = key.lstrip("+~")
        if key in names:
            parts.append(f"{names[key]}-{safe_value(value)}")
    return "_".join(sorted(parts)) or "job"


def safe_value(value: str) -> str:
    """A value with every run of characters other than letters, digits, `.`, `_`, `+` and `-` made one `-` (a `-0.1`
    keeps its sign; `[a,b]` becomes `a-b`)."""
    cleaned = re.sub(r"[^A-Za-z0-9._+-]+", "-", value)
    return cleaned if value.startswith("-") else cleaned.strip("-")


def short_names(keys: list[str]) -> dict[str, str]:
    """Each key by its last part (`optimizer.lr` -> `lr`), or whole with `-` for `.` and `/` where two share one."""
    last = [k.replace("/", ".").split(".")[-1] for k in keys]
    return {k: (tail if last.count(tail) == 1 else re.sub(r"[./]", "-", k)) for k, tail in zip(keys, last)}


def swept_values(job_dir: Path, keys: list[str]) -> dict[str, str]:
    overrides_file = job_dir / ".hydra" / "overrides.yaml"
    values = {}
    if overrides_file.is_file():
        for item in OmegaConf.load(overrides_file):
            key, _, value = str(item).partition("=")
            key = key.lstrip("+~")
            if key in keys:
                values[key] = value
    return values


def collect(sweep_dir: Path, keys: list[str]) -> list[dict[str, Any]]:
    """One row per job folder: its swept values and results (or its error), best validation loss first."""
    rows = []
    for job_dir in sorted(p for p in sweep_dir.iterdir() if (p / ".hydra").is_dir()):
        row: dict[str, Any] = {**{k: "" for k in keys}, **swept_values(job_dir, keys), "run_dir": str(job_dir)}
        report, failure = job_dir / "report.json", job_dir / "failure.json"
        if report.is_file():
            data = json.loads(report.read_text())
            row.update({k: data.get(k) for k in SUMMARY_COLUMNS if k in data}, status="ok", error="")
        else:
            error = json.loads(failure.read_text()).get("error") if failure.is_file() else "no report.json"
            row.update(status="failed", error=error)
        rows.append(row)

    metric = ranking_metric(rows)

    def rank(row):
        value = row.get(metric)
        if row["status"] != "ok":
            return (2, 0.0)
        return (0, value) if value is not None and math.isfinite(value) else (1, math.inf)

    return sorted(rows, key=rank)


METRICS = {"validation_loss": "validation loss (held-out samples, fixed timesteps and noise)",
           "final_loss": "final train loss: no held-out data, so a noisy ranking; set dataset.validation_split "
                         "(e.g. 0.1) to rank by a validation loss"}


def ranking_metric(rows: list[dict[str, Any]]) -> str:
    """validation_loss where the jobs have one, else final_loss (what `objective` returns to a sweeper too)."""
    has_validation = any(r["status"] == "ok" and r.get("validation_loss") is not None for r in rows)
    return "validation_loss" if has_validation else "final_loss"


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else str(value)


def write_summary(sweep_dir: Path, keys: list[str]) -> list[dict[str, Any]]:
    rows = collect(sweep_dir, keys)
    columns = list(keys) + list(SUMMARY_COLUMNS)
    with open(sweep_dir / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({c: "" if r.get(c) is None else r.get(c) for c in columns} for r in rows)  # full precision
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(c)).replace("|", "/") for c in columns) + " |" for r in rows]
    table = "\n".join(lines)
    metric = ranking_metric(rows)
    (sweep_dir / "summary.md").write_text(f"# Sweep summary: {sweep_dir}\n\nBest first by `{metric}`, the "
                                          f"{METRICS[metric]}.\n\n{table}\n")
    plot(rows, sweep_dir / "val_loss_vs_lr.png", metric)
    return rows


def plot(rows: list[dict[str, Any]], path: Path, metric: str = "validation_loss") -> None:
    """The ranking metric against learning rate, one line per LoRA rank (log-x); without points, a note why."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    label = "validation loss" if metric == "validation_loss" else "final train loss (no held-out data)"
    lines: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        lr, loss = r.get("optimizer.lr"), r.get(metric)
        if r["status"] != "ok" or lr in (None, "") or loss is None or not math.isfinite(loss):
            continue
        lines.setdefault(str(r.get("model.lora.rank") or "-"), []).append((float(lr), float(loss)))
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for rank, points in sorted(lines.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"rank {rank}")
    ax.set_xscale("log")
    ax.set_xlabel("optimizer.lr")
    ax.set_ylabel(label)
    ax.set_title(f"{label} vs learning rate")
    if lines:
        ax.legend()
    else:
        why = ("no job varied optimizer.lr" if not any(r.get("optimizer.lr") not in (None, "") for r in rows)
               else "no job finished with a finite loss")
        ax.text(0.5, 0.5, f"nothing to plot: {why}", ha="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


class SweepSummary(Callback):
    """Hydra callback: the sweep's varying keys for the job names when a multirun starts; the sweep summary,
    written and printed, when it ends. Both run in the launching process."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        keys = _sweep_keys(config)
        (sweep_dir / KEYS_FILE).write_text(json.dumps(keys))
        held_out = [k for k in ("dataset.validation_split", "dataset.validation_source")
                    if k in keys or OmegaConf.select(config, k, default=None)]
        preflight(config, keys)
        if not held_out:
            log.warning("this sweep has no held-out data (dataset.validation_split=0): it will rank the jobs by their "
                        "final train loss, which is noisy; set dataset.validation_split=0.1 to rank by a validation "
                        "loss")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        keys = _sweep_keys(config)
        rows = write_summary(sweep_dir, keys)
        print((sweep_dir / "summary.md").read_text().split("\n\n", 2)[-1])
        failed = sum(r["status"] != "ok" for r in rows)
        print(f"sweep summary: {sweep_dir / 'summary.csv'}, {sweep_dir / 'summary.md'}, "
              f"{sweep_dir / 'val_loss_vs_lr.png'} ({len(rows) - failed} ok, {failed} failed)")
        if failed:  # the summary is written; the exit status tells a script or a scheduler that jobs failed
            log.error("%d of %d sweep job(s) failed; their errors are in summary.md", failed, len(rows))
            sys.exit(1)


def preflight(config: DictConfig, swept: list[str]) -> None:
    """The checks a run makes before any work, once for the whole sweep, on what all its jobs share: an
    environment or a data set that every job would fail on stops the sweep before its first job (exit 2)."""
    from sd_lora.config import Config, to_config
    from sd_lora.errors import UserError, user_message
    from sd_lora.preflight import checks_before_work

    left_to_jobs = set(swept)
    launcher = str(OmegaConf.select(config, "hydra.launcher._target_", default="") or "")
    if not launcher.endswith("BasicLauncher"):  # the jobs run elsewhere (SLURM nodes): their devices are not here
        left_to_jobs |= {"device", "precision"}
    shared = {key: value for key, value in OmegaConf.to_container(config, resolve=False).items() if key != "hydra"}
    try:
        cfg = to_config(OmegaConf.merge(OmegaConf.structured(Config), shared))
        checks_before_work(cfg, swept=frozenset(left_to_jobs))
    except UserError as exc:
        if any(key in str(exc) for key in swept):  # a value the jobs set themselves (a swept dataset.path): theirs
            return
        log.error("%s\n(checked once for the whole sweep, before its first job; nothing was run)", user_message(exc))
        sys.exit(2)


def objective(report: dict) -> float:
    """The float a sweeper minimises: the validation loss, else the final training loss."""
    value = report.get("validation_loss")
    value = report.get("final_loss") if value is None else value
    return float("nan") if value is None else float(value)


def record_failure(run_dir: str, exc: BaseException) -> None:
    from sd_lora.errors import UserError, user_message

    message = user_message(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    (Path(run_dir) / "failure.json").write_text(json.dumps({"error": message.removeprefix("error: ")}, indent=2))


def register_resolver() -> None:
    OmegaConf.register_new_resolver("sd_lora.job_name", job_name, replace=True)


register_resolver()
