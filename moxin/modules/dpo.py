"""Direct preference optimisation: the policy learns to prefer the chosen reply over the rejected one,
measured against a frozen reference policy (the starting weights).

The reference is either a frozen copy of the starting weights held beside the policy
(`reference: copy`), or its log-probabilities, computed once before training and cached on disk
(`reference: cached`): then no second model occupies memory while training. Chosen and rejected
replies go through the policy in one concatenated forward pass. Under pipeline parallelism
(hardware.fsdp.pipeline_parallel) each micro-batch of the stages' schedule holds whole pairs, and the
reference runs through stages of its own, forward only.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
from dataclasses import asdict, dataclass

import torch

from moxin.data.datamodule import data_parallel_rank
from moxin.losses import DPO_LOSSES, IGNORE_INDEX, dpo_loss, preference_metrics, sequence_logps_from_hidden
from moxin.model import Transformer
from moxin.modules.base import MoxinModule
from moxin.modules.reference import ReferencePolicy

REFERENCE_MODES = ("copy", "cached")


@dataclass
class DPOConfig:
    loss: str = "dpo_norm"  # sigmoid | dpo_norm | ipo | hinge (moxin.losses.dpo_loss)
    beta: float = 5.0
    label_smoothing: float = 0.0
    reference: str = "copy"  # copy: frozen copy in memory; cached: log-probs computed once, stored on disk
    cache_dir: str | None = None  # reference: cached: where the log-probs go (None: the run folder)

    def __post_init__(self) -> None:
        if self.loss not in DPO_LOSSES:
            raise ValueError(f"dpo.loss must be one of {DPO_LOSSES}, got {self.loss!r}")
        if self.reference not in REFERENCE_MODES:
            raise ValueError(f"dpo.reference must be one of {REFERENCE_MODES}, got {self.reference!r}")
        if self.beta <= 0:
            raise ValueError(f"dpo.beta must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"dpo.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")


class DPOModule(ReferencePolicy, MoxinModule):
    data_format = "preference"
    phase_options = ("dpo",)

    def __init__(self, model_config, optim, nonfinite_loss: str = "stop", dpo: DPOConfig | None = None):
        super().__init__(model_config, optim, nonfinite_loss=nonfinite_loss)
        self.dpo = dpo or DPOConfig()
        self.hparams["dpo"] = asdict(self.dpo)
        self.reference: Transformer | None = None  # reference=copy
        self._start_state: dict[str, torch.Tensor] | None = None  # reference=cached: to compute the cache
        self._start_given = False  # whether set_reference has run (under the pipeline only rank 0 holds them)
        self._reference_id: str | None = None
        self.cached_reference: dict[str, torch.Tensor] | None = None  # reference=cached: split -> (pairs, 2)

    def keeps_reference_copy(self) -> bool:
        return self.dpo.reference == "copy"

    def start_weights_on_every_rank(self) -> bool:
        # Each rank computes its share of the log-probs with the whole model; under the pipeline with its
        # stage of it, which rank 0's weights fill (frozen_like_policy), as the policy's stage.
        return self.dpo.reference == "cached" and self.parallel.pipeline_parallel == 1

    def set_reference(self, state_dict: dict[str, torch.Tensor] | None) -> None:
        super().set_reference(state_dict)
        self._start_given = True
        if self.dpo.reference == "cached" and state_dict is not None:  # kept on the host until the log-probs
            if self.parallel.strategy == "fsdp":  # nothing else holds these tensors: no copy needed
                self._start_state = dict(state_dict)
            else:
                self._start_state = {k: v.detach().to("cpu", copy=True) for k, v in state_dict.items()}

    # --- log-probabilities ---

    @staticmethod
    def sequence_logps(model: Transformer, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Summed log-prob of each row's reply (chosen rows, then rejected rows)."""
        hidden = model.hidden_states(batch["input_ids"])
        return sequence_logps_from_hidden(hidden, model.output.weight, batch["labels"])

    def reference_logps(self, batch: dict[str, torch.Tensor], split: str) -> torch.Tensor:
        if self.cached_reference is not None:  # (pairs, 2): chosen, rejected
            rows = self.cached_reference[split].to(batch["index"].device)[batch["index"]]
            return torch.cat([rows[:, 0], rows[:, 1]])
        if self.reference is None:
            raise RuntimeError("DPO has no reference: call set_reference(starting weights) before training")
        with torch.no_grad():  # (under the pipeline: validation's; a training step's is pipeline_rows')
            return self.logps_of(self.reference, batch)

    def logps_of(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """sequence_logps of `model`, through the stages of the pipeline where there is one."""
        if self.pipeline_runner is not None:
            return self.pipeline_sequence_logps(model, batch)
        return self.sequence_logps(model, batch)

    def preference_step(self, batch: dict[str, torch.Tensor], split: str = "train"
                        ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        policy = self.logps_of(self.model, batch)  # (under the pipeline: validation, forward only)
        return self.preference_losses(policy, self.reference_logps(batch, split), batch["labels"])

    def preference_losses(self, policy: torch.Tensor, reference: torch.Tensor, labels: torch.Tensor
                          ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The mean loss of a batch's pairs (rows: its chosen replies, then its rejected ones) from their
        summed log-probs under the policy and the reference, and the batch's preference metrics."""
        pairs = labels.shape[0] // 2
        reference = reference.to(policy.dtype)
        counts = (labels != IGNORE_INDEX).sum(dim=-1)
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            policy[:pairs], policy[pairs:], reference[:pairs], reference[pairs:], loss=self.dpo.loss,
            beta=self.dpo.beta, label_smoothing=self.dpo.label_smoothing,
            chosen_tokens=counts[:pairs], rejected_tokens=counts[pairs:])
        per_token = (policy / counts.clamp(min=1)).detach()
        metrics = preference_metrics(chosen_rewards, rejected_rewards)
        # Whether the policy itself gives the chosen reply the higher per-token log-prob.
        metrics["preference_accuracy"] = (per_token[:pairs] > per_token[pairs:]).float().mean()
        metrics["chosen_logps"], metrics["rejected_logps"] = per_token[:pairs].mean(), per_token[pairs:].mean()
        return losses.mean(), metrics

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        if self.pipeline_runner is not None:  # the batch is a whole optimizer step's micro-batches
            self.log_lr()  # (before the pipeline's step moves the schedule on)
            loss = self.pipeline_training_step(batch)
            if loss is None:
                return None  # a non-finite loss, policy skip: the step was dropped
            metrics = self.step_metrics_from_last_stage(batch)
        else:
            loss, metrics = self.preference_step(batch)
            if self.nonfinite(loss):
                return self.zero_loss()
            self.log_lr()
        self.tokens_seen += batch["input_ids"].numel() * self.data_parallel_size
        self.log("train/loss", loss, on_step=True, prog_bar=True)
        self.log_dict({f"train/{k}": v for k, v in metrics.items()}, on_step=True)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss, metrics = self.preference_step(batch, "val")
        pairs = batch["input_ids"].shape[0] // 2
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=pairs)
        self.log_dict({f"val/{k}": v for k, v in metrics.items()}, sync_dist=True, batch_size=pairs)

    # --- under pipeline parallelism (hardware.fsdp.pipeline_parallel) ---

    supports_pipeline = True  # each micro-batch holds whole pairs: its loss is its pairs' mean / micro-batches

    def pipeline_sequence_logps(self, model, batch: dict[str, torch.Tensor], chunks: int = 1) -> torch.Tensor:
        """sequence_logps through the stages of `model` (the policy's or the reference's), forward only, the
        rows in `chunks` equal groups one after another (a step's reference: its micro-batches)."""
        logps = []
        for input_ids, labels in zip(batch["input_ids"].chunk(chunks), batch["labels"].chunk(chunks), strict=True):
            def on_last(hidden, labels=labels):
                return sequence_logps_from_hidden(hidden, model.output.weight, labels)

            logps.append(self.pipeline_runner.forward_only(input_ids, on_last, (labels.shape[0],), model=model))
        return torch.cat(logps)

    def pipeline_rows(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's rows regrouped so that each of the schedule's equal micro-batches holds whole pairs
        (its chosen rows, then their rejected ones, as an unsplit micro-batch), right-padded to the data's
        seq_len: the stages learn the shape of what flows between them at the first step and keep it.
        Each row's labels carry its row in the step's batch as one more column, by which pipeline_loss
        reads its reference log-prob and keeps its policy log-prob for the step's metrics. A reference
        copy runs on the same micro-batches first, forward only (the policy's and its kernels alike)."""
        input_ids, labels = batch["input_ids"], batch["labels"]
        pairs, parts = input_ids.shape[0] // 2, self.pipeline_microbatches
        if pairs % parts:
            raise ValueError(f"a step of {pairs} pairs does not split into {parts} equal pipeline micro-batches")
        width = self.trainer.datamodule.config.seq_len
        if input_ids.shape[1] > width:
            raise ValueError(f"a preference batch of {input_ids.shape[1]} tokens is wider than data.seq_len={width}")
        per = pairs // parts
        order = torch.arange(2 * pairs, device=input_ids.device).view(2, parts, per)
        order = order.transpose(0, 1).reshape(-1)  # micro-batch k: chosen rows k*per.., then their rejected
        pad = (0, width - input_ids.shape[1])  # after the replies, never attended to by them, never trained
        rows = torch.nn.functional.pad(input_ids[order], pad)
        row_labels = torch.nn.functional.pad(labels[order], pad, value=IGNORE_INDEX)
        if self.cached_reference is None and self.reference is not None:  # (every stage: only the last uses it)
            regrouped = self.pipeline_sequence_logps(self.reference, {"input_ids": rows, "labels": row_labels}, parts)
            reference = torch.empty_like(regrouped).index_copy_(0, order, regrouped)  # in the batch's row order
        else:
            reference = self.reference_logps(batch, "train")
        self._step = {"reference": reference,
                      "policy": torch.zeros(2 * pairs, dtype=torch.float32, device=order.device)}
        return rows, torch.cat([row_labels, order[:, None]], dim=1)

    def pipeline_loss(self, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """A micro-batch's share of the step's loss, on the last stage: the mean over its pairs / micro-batches.
        (Its rows' log-probs are kept for the step's metrics: the schedule's first call, which infers the
        stages' shapes, writes them too, before the micro-batches do.)"""
        labels, rows = target[:, :-1], target[:, -1]
        policy = sequence_logps_from_hidden(hidden, self.model.output.weight, labels)
        self._step["policy"][rows] = policy.detach().float()
        loss, _ = self.preference_losses(policy, self._step["reference"][rows], labels)
        return loss / self.pipeline_microbatches

    def step_metrics_from_last_stage(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The step's preference metrics over all its pairs, on every stage, from the log-probs the last
        stage's micro-batches computed."""
        policy = self.pipeline_runner.from_last_stage(self._step["policy"])  # (the others' zeros overwritten)
        return self.preference_losses(policy, self._step["reference"], batch["labels"])[1]

    # --- reference: cached ---

    def on_fit_start(self) -> None:
        self._load_or_compute_cached_reference()

    def on_validation_start(self) -> None:  # also before training (trainer.validate)
        self._load_or_compute_cached_reference()

    def _load_or_compute_cached_reference(self) -> None:
        """reference=cached: the starting model's summed log-prob of every reply, train and validation
        pairs, computed once on this device (each rank a share, then gathered) and kept on disk, keyed by
        the data, the starting weights, the model's shape settings and the precision."""
        if self.dpo.reference != "cached" or self.cached_reference is not None:
            return
        if not self._start_given:
            raise RuntimeError("DPO has no reference: call set_reference(starting weights) before training")
        from safetensors.torch import load_file, save_file

        datamodule, trainer = self.trainer.datamodule, self.trainer
        settings = [datamodule.fingerprint(), self._reference_id, self.model_config.to_dict(), str(trainer.precision)]
        if self.pipeline_runner is not None:  # only rank 0 read the weights; the stages compute in FSDP's dtype
            settings[1] = trainer.strategy.broadcast(self._reference_id)
            settings.append(f"pipeline, {self.parallel.fsdp.param_dtype}")
        key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
        path = os.path.join(self.dpo.cache_dir or trainer.default_root_dir, f"reference-logps-{key}.safetensors")
        found, shared = os.path.exists(path), trainer.world_size > 1
        if shared:  # rank 0 decides (another run may be writing the file; a node-local cache may lack it)
            found = trainer.strategy.broadcast(found)
        if found:  # rank 0 reads it for all: the ranks must all load it, or all compute it (collectively)
            cached = load_file(path) if trainer.is_global_zero else None
            cached = trainer.strategy.broadcast(cached) if shared else cached
        else:
            reference = self._starting_model()
            cached = {split: self._compute_reference(getattr(datamodule, f"{split}_dataset"), datamodule, reference)
                      for split in ("train", "val")}
            del reference
            gc.collect()  # (a sharded model's hooks hold it in reference cycles)
            if trainer.is_global_zero:
                os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
                tmp = f"{path}.tmp{os.getpid()}"
                save_file(cached, tmp)
                os.replace(tmp, path)
                print(f"Reference log-probs of {sum(len(v) for v in cached.values())} pairs cached in {path}")
        self.cached_reference = {split: values.double().cpu() for split, values in cached.items()}
        self._start_state = None  # no longer needed: free the host copy

    def _starting_model(self) -> torch.nn.Module:
        """The starting weights as a model to compute log-probs with: whole on this device, or under the
        pipeline this rank's stage of them, split and sharded as the policy's is."""
        if self.pipeline_runner is not None:
            with torch.device("meta"):
                reference = Transformer(self.model_config)
            return self.frozen_like_policy(reference, self._start_state)
        reference = Transformer(self.model_config).to(self.device)
        reference.load_state_dict(self._start_state)
        return reference

    @torch.no_grad()
    def _compute_reference(self, dataset, datamodule, reference: torch.nn.Module | None = None) -> torch.Tensor:
        """(pairs, 2) summed log-probs of chosen and rejected replies under the starting weights (`reference`,
        or _starting_model's). Data-parallel rank r computes pairs r, r + world, ...; all_gather puts every
        rank's share together."""
        rank, world = data_parallel_rank(self.trainer)  # tensor-parallel ranks and pipeline stages share a share
        reference = reference if reference is not None else self._starting_model()
        mine = list(range(rank, dataset.pairs(), world))
        share = torch.zeros(-(-dataset.pairs() // world), 2, dtype=torch.float64, device=self.device)
        size = datamodule.micro_batch_size
        # Every rank runs as many batches as the longest share needs: a sharded model's forward is collective.
        # A rank whose share is done runs pair 0 again, and drops it.
        for start in range(0, share.shape[0], size):
            indices = mine[start:start + size]
            items = [{"index": i, "chosen": dataset.chosen[i], "rejected": dataset.rejected[i]}
                     for i in indices or [0]]
            batch = {k: v.to(self.device) for k, v in datamodule.collate_fn(items).items()}
            with self.trainer.precision_plugin.forward_context():
                values = self.logps_of(reference, batch).double().view(2, -1).T
            share[start:start + len(indices)] = values[:len(indices)]
        if world == 1:
            return share[:dataset.pairs()].cpu()
        # One share per data-parallel rank: the first process holding each (the others repeat it).
        gathered = self.trainer.strategy.all_gather(share)  # (processes, per_rank, 2)
        ranks = self.trainer.strategy.all_gather(torch.tensor(rank, device=self.device)).tolist()
        gathered = gathered[[ranks.index(r) for r in range(world)]]
        # Pair i sits on data-parallel rank i % world at row i // world.
        return gathered.transpose(0, 1).reshape(-1, 2)[:dataset.pairs()].cpu()
