"""Supervised fine-tuning on chat data: next-token loss on assistant replies only.

Rows hold several packed conversations (moxin/data/chat_data.py); the model computes each one
independently. The loss is the sum of the token losses over the trained tokens of the whole
optimizer step (every micro-batch and every rank), so a long reply weighs the same whichever
micro-batch or device it lands on. Under pipeline parallelism (hardware.fsdp.pipeline_parallel) each
batch is a whole step's micro-batches, which the stages' schedule runs with the same loss.
"""

from __future__ import annotations

import torch

from moxin.losses import IGNORE_INDEX, linear_cross_entropy
from moxin.modules.base import MoxinModule


class SFTModule(MoxinModule):
    data_format = "sft"
    supports_pipeline = True  # token losses summed over the step's trained tokens: any micro-batch split

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

    def step_scale(self, step_tokens: torch.Tensor) -> float:
        """What a micro-batch's loss sum is multiplied by so that the gradients, after the data-parallel
        ranks' mean (and under Lightning's accumulation, its division by the micro-batches), are those of
        the step's loss sum over the step's trained tokens on all ranks."""
        accumulate = self.trainer.accumulate_grad_batches if self.pipeline_runner is None else 1
        return self.data_parallel_size * accumulate / float(step_tokens.clamp(min=1))

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        self.log_lr()  # (the pipeline's step moves the schedule on)
        trained = int((batch["labels"] != IGNORE_INDEX).sum())
        self._scale = self.step_scale(batch["step_tokens"][0])
        if self.pipeline_runner is not None:  # the batch is a whole optimizer step's micro-batches
            loss = self.pipeline_training_step(batch)
            if loss is None:
                return None  # a non-finite loss, policy skip: the step was dropped
            total = loss / self._scale  # this rank's sum over the step's trained tokens
        else:
            total, _ = self.loss_sum(batch)
            loss = total * self._scale
            if self.nonfinite(loss):
                return self.zero_loss()
        if self.pipeline_runner is not None or (batch_idx + 1) % self.trainer.accumulate_grad_batches == 0:
            self.tokens_seen += int(batch["step_tokens"][0])  # the step's trained tokens, all micro-batches and ranks
        self.log("train/loss", total / max(trained, 1), on_step=True, prog_bar=True)
        self.log("train/tokens", float(self.tokens_seen), on_step=True)
        return loss

    def pipeline_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # As loss_sum: unpacked rows keep plain causal attention (every stage has the same batch to decide on).
        return {"segments": batch["segments"]} if batch["segments"].any() else {}

    def pipeline_loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """A micro-batch's share of the step's loss, on the last stage (which holds the LM head)."""
        trained = labels != IGNORE_INDEX
        return linear_cross_entropy(hidden[trained], self.model.output.weight, labels[trained],
                                    reduction="sum") * self._scale

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        if self.pipeline_runner is not None:
            total = self.pipeline_runner.eval_loss(batch["input_ids"], batch["labels"], reduction="sum",
                                                   **self.pipeline_inputs(batch))
            trained = (batch["labels"] != IGNORE_INDEX).sum()
        else:
            total, trained = self.loss_sum(batch)
        # Weighted by trained tokens: the epoch value is the token-level mean over the validation set.
        self.log("val/loss", total / trained.clamp(min=1), prog_bar=True, sync_dist=True,
                 batch_size=int(trained))
