"""Pretraining: next-token prediction on packed sequences."""

from __future__ import annotations

import torch

from moxin.modules.base import MoxinModule


class PretrainModule(MoxinModule):
    supports_pipeline = True  # one mean token loss per micro-batch: hardware.fsdp.pipeline_parallel runs it

    def lm_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        # From the final hidden states: the (B, T, vocab) logits are not held in memory (but under Gemini).
        hidden = self.model.hidden_states(batch["input_ids"])  # (B, T, dim)
        return self.head_loss(hidden, batch["labels"])

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        self.log_lr()  # (the pipeline's step moves the schedule on)
        if self.pipeline_runner is not None:  # the batch is a whole optimizer step's micro-batches
            loss = self.pipeline_training_step(batch)
            if loss is None:
                return None  # a non-finite loss, policy skip: the step was dropped
        else:
            loss = self.lm_loss(batch)
            if self.nonfinite(loss):
                return self.zero_loss()  # the optimizer step this micro-batch belongs to is dropped
        self.tokens_seen += batch["input_ids"].numel() * self.data_parallel_size
        # The global batch's loss: the mean over ranks (equal micro-batches of equal length).
        self.log("train/loss", loss, on_step=True, prog_bar=True, sync_dist=True)
        self.log("train/tokens", float(self.tokens_seen), on_step=True)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        if self.pipeline_runner is not None:
            loss = self.pipeline_runner.eval_loss(batch["input_ids"], batch["labels"])
        else:
            loss = self.lm_loss(batch)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=batch["input_ids"].shape[0])
