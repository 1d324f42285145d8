"""LightningModules, one per training phase, all holding the same `Transformer`."""

from moxin.modules.base import MoxinModule, OptimConfig
from moxin.modules.pretrain import PretrainModule

MODULES = {"pretrain": PretrainModule}

__all__ = ["MODULES", "MoxinModule", "OptimConfig", "PretrainModule"]
