"""Pretraining: next-token prediction on packed sequences."""

from __future__ import annotations

import torch

from moxin.losses import causal_lm_loss
from moxin.modules.base import MoxinModule


class PretrainModule(MoxinModule):
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits = self.model(batch["input_ids"])  # (B, T, V)
        loss = causal_lm_loss(logits, batch["labels"])
        self.tokens_seen += batch["input_ids"].numel() * self.trainer.world_size
        self.log("train/loss", loss, on_step=True, prog_bar=True)
        self.log("train/tokens", float(self.tokens_seen), on_step=True)
        self.log_lr()
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        logits = self.model(batch["input_ids"])
        loss = causal_lm_loss(logits, batch["labels"])
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=batch["input_ids"].shape[0])
