"""Direct preference optimisation: the policy learns to prefer the chosen reply over the rejected one,
measured against a frozen reference policy (the starting weights).

The reference is either a frozen copy of the starting weights held beside the policy
(`reference: copy`), or its log-probabilities, computed once before training and cached on disk
(`reference: cached`): then no second model occupies memory while training. Chosen and rejected
replies go through the policy in one concatenated forward pass.
"""

from __future__ import annotations

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
        self._reference_id: str | None = None
        self.cached_reference: dict[str, torch.Tensor] | None = None  # reference=cached: split -> (pairs, 2)

    def keeps_reference_copy(self) -> bool:
        return self.dpo.reference == "copy"

    def start_weights_on_every_rank(self) -> bool:
        return self.dpo.reference == "cached"  # each rank computes its share of the log-probs

    def set_reference(self, state_dict: dict[str, torch.Tensor]) -> None:
        super().set_reference(state_dict)
        if self.dpo.reference == "cached":  # kept on the host until the log-probs are computed
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
        with torch.no_grad():
            return self.sequence_logps(self.reference, batch)

    def preference_step(self, batch: dict[str, torch.Tensor], split: str = "train"
                        ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        pairs = batch["input_ids"].shape[0] // 2
        policy = self.sequence_logps(self.model, batch)
        reference = self.reference_logps(batch, split).to(policy.dtype)
        counts = (batch["labels"] != IGNORE_INDEX).sum(dim=-1)
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

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, metrics = self.preference_step(batch)
        if self.nonfinite(loss):
            return self.zero_loss()
        self.tokens_seen += batch["input_ids"].numel() * self.data_parallel_size
        self.log("train/loss", loss, on_step=True, prog_bar=True)
        self.log_dict({f"train/{k}": v for k, v in metrics.items()}, on_step=True)
        self.log_lr()
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss, metrics = self.preference_step(batch, "val")
        pairs = batch["input_ids"].shape[0] // 2
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=pairs)
        self.log_dict({f"val/{k}": v for k, v in metrics.items()}, sync_dist=True, batch_size=pairs)

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
        if self._start_state is None:
            raise RuntimeError("DPO has no reference: call set_reference(starting weights) before training")
        from safetensors.torch import load_file, save_file

        datamodule, trainer = self.trainer.datamodule, self.trainer
        key = hashlib.sha256(json.dumps([datamodule.fingerprint(), self._reference_id, self.model_config.to_dict(),
                                         str(trainer.precision)], sort_keys=True).encode()).hexdigest()[:16]
        path = os.path.join(self.dpo.cache_dir or trainer.default_root_dir, f"reference-logps-{key}.safetensors")
        if os.path.exists(path):
            cached = load_file(path)
        else:
            cached = {split: self._compute_reference(getattr(datamodule, f"{split}_dataset"), datamodule)
                      for split in ("train", "val")}
            if trainer.is_global_zero:
                os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
                tmp = f"{path}.tmp{os.getpid()}"
                save_file(cached, tmp)
                os.replace(tmp, path)
                print(f"Reference log-probs of {sum(len(v) for v in cached.values())} pairs cached in {path}")
        self.cached_reference = {split: values.double().cpu() for split, values in cached.items()}
        self._start_state = None  # no longer needed: free the host copy

    @torch.no_grad()
    def _compute_reference(self, dataset, datamodule) -> torch.Tensor:
        """(pairs, 2) summed log-probs of chosen and rejected replies under the starting weights. Rank r
        computes pairs r, r + world, ...; all_gather puts every rank's share together."""
        rank, world = data_parallel_rank(self.trainer)  # tensor-parallel ranks of a group share a share
        reference = Transformer(self.model_config).to(self.device)
        reference.load_state_dict(self._start_state)
        mine = list(range(rank, dataset.pairs(), world))
        share = torch.zeros(-(-dataset.pairs() // world), 2, dtype=torch.float64, device=self.device)
        size = datamodule.micro_batch_size
        for start in range(0, len(mine), size):
            items = [{"index": i, "chosen": dataset.chosen[i], "rejected": dataset.rejected[i]}
                     for i in mine[start:start + size]]
            batch = {k: v.to(self.device) for k, v in datamodule.collate_fn(items).items()}
            with self.trainer.precision_plugin.forward_context():
                logps = self.sequence_logps(reference, batch).double()
            share[start:start + len(items)] = logps.view(2, -1).T
        del reference
        gathered = self.trainer.strategy.all_gather(share) if world > 1 else share[None]  # (processes, per_rank, 2)
        gathered = gathered[::gathered.shape[0] // world]  # one share per data-parallel rank (a TP group repeats it)
        # Pair i sits on data-parallel rank i % world at row i // world.
        return gathered.transpose(0, 1).reshape(-1, 2)[:dataset.pairs()].cpu()
