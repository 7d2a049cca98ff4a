"""Entry point: `python launch.py [overrides]` composes conf/ with Hydra and trains a LoRA.

Hydra stays here: the composed config becomes the typed `sd_lora.config.Config` once, and the
run directory is Hydra's output folder. A user's mistake (`UserError`) is printed as one message
and exits with status 2; anything else keeps its traceback.
"""

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from sd_lora import config as _config  # registers the schemas and resolvers  # noqa: F401
from sd_lora.distributed import run, strip_local_rank_argument
from sd_lora.errors import UserError, user_message

log = logging.getLogger("sd_lora")


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    run_dir = HydraConfig.get().runtime.output_dir
    try:
        report = run(_config.to_config(cfg), run_dir)
    except UserError as exc:
        log.error("%s", user_message(exc))
        sys.exit(2)
    if report is not None:
        print(f"results in {run_dir}: lora/ (the LoRA), report.json, samples/, tensorboard/, checkpoints/")
        return report["final_loss"]
    return None


if __name__ == "__main__":
    sys.argv = strip_local_rank_argument(sys.argv)
    main()
