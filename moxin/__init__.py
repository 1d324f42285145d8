"""moxin: the Moxin-7B recipe, from pretraining to GRPO, as one Hydra-configured framework."""

from pathlib import Path

from omegaconf import OmegaConf

# ${moxin.repo:} in configs: the repository's folder (the tiny offline data lives under experiments/).
OmegaConf.register_new_resolver("moxin.repo", lambda: str(Path(__file__).resolve().parent.parent), replace=True)
