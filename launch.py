"""Entry point: `python launch.py [overrides]` composes conf/ with Hydra and trains a LoRA.

Hydra stays here: the composed config becomes the typed `sd_lora.config.Config` once, and the
run directory is Hydra's output folder. A user's mistake (`UserError`) is printed as one message
and exits with status 2; anything else keeps its traceback.
"""

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from sd_lora import config as _config  # registers the schemas and resolvers  # noqa: F401
from sd_lora.cli import command_line_problem
from sd_lora.distributed import run, strip_local_rank_argument
from sd_lora.sweep import objective, record_failure
from sd_lora.errors import UserError, user_message
from sd_lora.signals import PREEMPTED_EXIT_STATUS, Preempted

log = logging.getLogger("sd_lora")


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    hydra_cfg = HydraConfig.get()
    run_dir = hydra_cfg.runtime.output_dir
    try:
        report = run(_config.to_config(cfg), run_dir)
    except Preempted as exc:  # a sweep's job too: the machine is being taken away
        log.warning("%s", exc)
        sys.exit(PREEMPTED_EXIT_STATUS)
    except Exception as exc:
        if hydra_cfg.mode != RunMode.MULTIRUN:
            if isinstance(exc, UserError):
                log.error("%s", user_message(exc))
                sys.exit(2)
            raise
        # in a sweep a failed job is a failed row of the summary, not the end of the sweep
        if isinstance(exc, UserError):
            log.error("job failed: %s", user_message(exc))
        else:
            log.exception("job failed")
        record_failure(run_dir, exc)
        return float("nan")
    if report is not None:
        print(f"results in {run_dir}: lora/ (the LoRA), report.json, samples/, tensorboard/, checkpoints/")
        return objective(report)
    return None


if __name__ == "__main__":
    sys.argv = strip_local_rank_argument(sys.argv)
    problem = command_line_problem(sys.argv[1:], Path(__file__).parent / "conf")
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    main()
