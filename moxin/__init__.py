"""moxin: the Moxin-7B recipe, from pretraining to GRPO, as one Hydra-configured framework."""

from pathlib import Path

try:
    from omegaconf import OmegaConf
except ImportError:  # the model, its kernels and the GPU benchmarks need torch alone (a bare GPU image)
    pass
else:
    # ${moxin.repo:} in configs: the repository's folder (the tiny offline data lives under experiments/).
    OmegaConf.register_new_resolver("moxin.repo", lambda: str(Path(__file__).resolve().parent.parent), replace=True)
