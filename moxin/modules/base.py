"""What every phase shares: the model, parameter groups, optimizer, schedule and checkpoint I/O.

A phase module subclasses `MoxinModule` and adds only its step (and its own state).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import lightning as L
import torch

from moxin.model import ModelConfig, Transformer


@dataclass
class OptimConfig:
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    warmup_steps: int = 2000
    min_lr_ratio: float = 0.1  # cosine decays to this fraction of the peak
    schedule: str = "cosine"
    fused: bool | None = None  # None: fused AdamW when the parameters are on a GPU

    def __post_init__(self):
        self.betas = tuple(self.betas)
        if self.schedule not in SCHEDULES:
            raise ValueError(f"OptimConfig.schedule {self.schedule!r} is not one of {sorted(SCHEDULES)}")
        if self.lr <= 0:
            raise ValueError(f"OptimConfig.lr must be > 0, got {self.lr}")
        if self.warmup_steps < 0:
            raise ValueError(f"OptimConfig.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"OptimConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


def _cosine(progress: float, min_ratio: float) -> float:
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _linear(progress: float, min_ratio: float) -> float:
    return 1.0 - (1.0 - min_ratio) * progress


def _constant(progress: float, min_ratio: float) -> float:
    return 1.0


# Decay after warm-up, by name: f(progress in [0, 1], min_ratio) -> multiplier of the peak lr.
SCHEDULES = {"cosine": _cosine, "linear": _linear, "constant": _constant}


def lr_multiplier(step: int, warmup_steps: int, total_steps: int, schedule: str, min_ratio: float) -> float:
    """Linear warm-up from ~0 to 1 over warmup_steps, then the named decay until total_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return SCHEDULES[schedule](progress, min_ratio)


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (linear and embedding weights); none on norms and biases."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class MoxinModule(L.LightningModule):
    def __init__(self, model_config: ModelConfig, optim: OptimConfig):
        super().__init__()
        # Plain dicts only, so checkpoints load with torch.load(weights_only=True).
        self.save_hyperparameters({"model": model_config.to_dict(), "optim": asdict(optim)})
        self.model_config = model_config
        self.optim = optim
        self.model = Transformer(model_config)
        self.tokens_seen = 0  # training tokens consumed; part of the checkpoint

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(tokens)

    def total_steps(self) -> int:
        return max(1, int(self.trainer.estimated_stepping_batches))

    def configure_optimizers(self):
        fused = self.optim.fused
        if fused is None:
            fused = next(self.model.parameters()).device.type == "cuda"
        optimizer = torch.optim.AdamW(
            parameter_groups(self.model, self.optim.weight_decay), lr=self.optim.lr,
            betas=self.optim.betas, eps=self.optim.eps, fused=fused,
        )
        total, o = self.total_steps(), self.optim
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_multiplier(step, o.warmup_steps, total, o.schedule, o.min_lr_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def log_lr(self) -> None:
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], on_step=True, prog_bar=True)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["tokens_seen"] = self.tokens_seen

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.tokens_seen = checkpoint.get("tokens_seen", 0)
