"""Supervised fine-tuning on chat data: next-token loss on assistant replies only.

Rows hold several packed conversations (moxin/data/chat_data.py); the model computes each one
independently. The loss is the sum of the token losses over the trained tokens of the whole
optimizer step (every micro-batch and every rank), so a long reply weighs the same whichever
micro-batch or device it lands on.
"""

from __future__ import annotations

import torch

from moxin.losses import IGNORE_INDEX
from moxin.modules.base import MoxinModule


class SFTModule(MoxinModule):
    data_format = "sft"

    def loss_sum(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of the trained tokens' losses, number of trained tokens) of a micro-batch."""
        segments = batch["segments"]
        if not segments.any():  # one whole conversation per row: plain causal attention, no mask to build
            segments = None
        hidden = self.model.hidden_states(batch["input_ids"], segments=segments)
        # The LM head only where a reply is trained: prompts and padding never reach it.
        trained = batch["labels"] != IGNORE_INDEX
        total = self.head_loss(hidden[trained], batch["labels"][trained], reduction="sum")
        return total, trained.sum()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        total, trained = self.loss_sum(batch)
        world = self.data_parallel_size
        accumulate = self.trainer.accumulate_grad_batches
        # Lightning divides each micro-batch's loss by the accumulation count and DDP averages the
        # gradients over the data-parallel ranks; multiplying both back leaves
        # d(step's loss sum / step's trained tokens).
        loss = total * (world * accumulate) / batch["step_tokens"][0].clamp(min=1)
        if self.nonfinite(loss):
            return self.zero_loss()
        if (batch_idx + 1) % accumulate == 0:  # the step's trained tokens, all micro-batches and ranks
            self.tokens_seen += int(batch["step_tokens"][0])
        self.log("train/loss", total / trained.clamp(min=1), on_step=True, prog_bar=True)
        self.log("train/tokens", float(self.tokens_seen), on_step=True)
        self.log_lr()
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        total, trained = self.loss_sum(batch)
        # Weighted by trained tokens: the epoch value is the token-level mean over the validation set.
        self.log("val/loss", total / trained.clamp(min=1), prog_bar=True, sync_dist=True,
                 batch_size=int(trained))
