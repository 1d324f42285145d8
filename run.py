"""moxin's one entry point: `python run.py [task=...] [+experiment=...] [overrides]`."""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> dict:
    from moxin.train import run  # imported here so `--help` and config errors stay fast

    return run(cfg)


if __name__ == "__main__":
    main()
