"""Supervised fine-tuning on chat data: next-token loss on assistant replies only.

Rows hold several packed conversations (moxin/data/chat_data.py); the model computes each one
independently. The loss is the sum of the token losses over the trained tokens of the whole
optimizer step (every micro-batch and every rank), so a long reply weighs the same whichever
micro-batch or device it lands on. Under pipeline parallelism (hardware.fsdp.pipeline_parallel) each
batch is a whole step's micro-batches, which the stages' schedule runs with the same loss.
"""

from __future__ import annotations

import torch

from moxin.losses import IGNORE_INDEX
from moxin.modules.base import MoxinModule


class SFTModule(MoxinModule):
    data_format = "sft"
    supports_pipeline = True  # token losses summed over the step's trained tokens: any micro-batch split
    # The current step's step_scale, set by training_step for pipeline_loss, which the pipeline's schedule
    # calls with a micro-batch's hidden states and labels alone.
    _step_scale: float | None = None

    def loss_sum(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of the trained tokens' losses, number of trained tokens) of a micro-batch."""
        segments = batch["segments"]
        if not segments.any():  # one whole conversation per row: plain causal attention, no mask to build
            segments = None
        hidden = self.model.hidden_states(batch["input_ids"], segments=segments)
        return self.trained_loss_sum(hidden, batch["labels"]), (batch["labels"] != IGNORE_INDEX).sum()

    def trained_loss_sum(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The LM head's loss summed over the trained tokens: prompts and padding never reach the head."""
        trained = labels != IGNORE_INDEX
        return self.head_loss(hidden[trained], labels[trained], reduction="sum")

    def step_scale(self, step_tokens: torch.Tensor) -> float:
        """What a micro-batch's loss sum is multiplied by so that the gradients, after the data-parallel
        ranks' mean and Lightning's division by the accumulated micro-batches (1 under the pipeline, whose
        schedule sums them), are those of the step's loss sum over the step's trained tokens on all ranks."""
        return self.data_parallel_size * self.trainer.accumulate_grad_batches / float(step_tokens.clamp(min=1))

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        self.log_lr()  # (the pipeline's step moves the schedule on)
        trained = int((batch["labels"] != IGNORE_INDEX).sum())
        self._step_scale = self.step_scale(batch["step_tokens"][0])
        if self.pipeline_runner is not None:  # the batch is a whole optimizer step's micro-batches
            loss = self.pipeline_training_step(batch)
            if loss is None:
                return None  # a non-finite loss, policy skip: the step was dropped
            total = loss / self._step_scale  # this rank's sum over the step's trained tokens
        else:
            total, _ = self.loss_sum(batch)
            loss = total * self._step_scale
            if self.nonfinite(loss):
                return self.zero_loss()
        if (batch_idx + 1) % self.trainer.accumulate_grad_batches == 0:  # (every batch under the pipeline)
            self.tokens_seen += int(batch["step_tokens"][0])  # the step's trained tokens, all micro-batches and ranks
        self.log("train/loss", total / max(trained, 1), on_step=True, prog_bar=True)
        self.log("train/tokens", float(self.tokens_seen), on_step=True)
        return loss

    def pipeline_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # As loss_sum: unpacked rows keep plain causal attention (every stage has the same batch to decide on).
        return {"segments": batch["segments"]} if batch["segments"].any() else {}

    def pipeline_loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """A micro-batch's share of the step's loss, on the last stage (which holds the LM head)."""
        return self.trained_loss_sum(hidden, labels) * self._step_scale

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
