"""moxin's one entry point: `python run.py [task=...] [+experiment=...] [overrides]`."""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | dict:
    from moxin.train import run  # imported here so `--help` and config errors stay fast

    metrics = run(cfg)
    # What a sweeper that optimises (hydra/sweeper=moxin_optuna) minimises: the final `objective`
    # metric; plain runs and Hydra's basic sweeper ignore the return value.
    objective = cfg.get("objective")
    return float(metrics[objective]) if objective and objective in metrics else metrics


if __name__ == "__main__":
    main()
