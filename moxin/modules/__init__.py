"""LightningModules, one per training phase, all holding the same `Transformer`."""

from moxin.modules.base import MoxinModule, OptimConfig
from moxin.modules.dpo import DPOConfig, DPOModule
from moxin.modules.grpo import GRPOConfig, GRPOModule
from moxin.modules.pretrain import PretrainModule
from moxin.modules.sft import SFTModule

MODULES = {"pretrain": PretrainModule, "sft": SFTModule, "dpo": DPOModule, "grpo": GRPOModule}

__all__ = ["MODULES", "DPOConfig", "DPOModule", "GRPOConfig", "GRPOModule", "MoxinModule", "OptimConfig",
           "PretrainModule", "SFTModule"]
