"""Direct preference optimisation: the policy learns to prefer the chosen reply over the rejected one,
measured against a frozen reference policy (the starting weights).

The reference is either a frozen copy of the starting weights held beside the policy
(`reference: copy`), or its log-probabilities, computed once before training and cached on disk
(`reference: cached`): then no second model occupies memory while training. Chosen and rejected
replies go through the policy in one concatenated forward pass.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass

import numpy as np
import torch

from moxin.losses import DPO_LOSSES, IGNORE_INDEX, dpo_loss, preference_metrics, sequence_logps_from_hidden
from moxin.model import Transformer
from moxin.modules.base import MoxinModule

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


def weights_fingerprint(state_dict: dict[str, torch.Tensor]) -> str:
    """A cheap hash of a state dict: names, shapes and a strided sample of every tensor's values."""
    digest = hashlib.blake2b(digest_size=8)
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().reshape(-1)
        sample = tensor[:: max(1, tensor.numel() // 4096)].float().cpu().numpy()
        digest.update(f"{name}{tuple(state_dict[name].shape)}".encode())
        digest.update(sample.tobytes())
    return digest.hexdigest()


class DPOModule(MoxinModule):
    data_format = "preference"
    phase_options = ("dpo",)

    def __init__(self, model_config, optim, nonfinite_loss: str = "stop", dpo: DPOConfig | None = None):
        super().__init__(model_config, optim, nonfinite_loss=nonfinite_loss)
        self.dpo = dpo or DPOConfig()
        self.hparams["dpo"] = asdict(self.dpo)
        self.reference: Transformer | None = None  # reference=copy
        self._start_state: dict[str, torch.Tensor] | None = None  # reference=cached: to compute the cache
        self._reference_id: str | None = None

    def set_reference(self, state_dict: dict[str, torch.Tensor]) -> None:
        """The starting weights, which are the reference policy. Called before training, fresh or resumed."""
        self._reference_id = weights_fingerprint(state_dict)
        if self.dpo.reference == "copy":
            self.reference = Transformer(self.model_config)
            self.reference.load_state_dict(state_dict)
            self.reference.requires_grad_(False)  # no dropout in the model: train mode computes the same
        else:
            self._start_state = {k: v.detach().to("cpu", copy=True) for k, v in state_dict.items()}

    # The reference is not part of the checkpoint: it is rebuilt from the starting weights.
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("reference.")}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        if self.reference is not None:
            checkpoint["state_dict"].update({f"reference.{k}": v for k, v in self.reference.state_dict().items()})

    # --- log-probabilities ---

    @staticmethod
    def sequence_logps(model: Transformer, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Summed log-prob of each row's reply (chosen rows, then rejected rows)."""
        hidden = model.hidden_states(batch["input_ids"])
        return sequence_logps_from_hidden(hidden, model.output.weight, batch["labels"])

    def reference_logps(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if "reference_chosen" in batch:
            return torch.cat([batch["reference_chosen"], batch["reference_rejected"]]).float()
        if self.reference is None:
            raise RuntimeError("DPO has no reference: call set_reference(starting weights) before training")
        with torch.no_grad():
            return self.sequence_logps(self.reference, batch)

    def preference_step(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        pairs = batch["input_ids"].shape[0] // 2
        policy = self.sequence_logps(self.model, batch)
        reference = self.reference_logps(batch).to(policy.dtype)
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
        self.tokens_seen += batch["input_ids"].numel() * self.trainer.world_size
        self.log("train/loss", loss, on_step=True, prog_bar=True)
        self.log_dict({f"train/{k}": v for k, v in metrics.items()}, on_step=True)
        self.log_lr()
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss, metrics = self.preference_step(batch)
        pairs = batch["input_ids"].shape[0] // 2
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=pairs)
        self.log_dict({f"val/{k}": v for k, v in metrics.items()}, sync_dist=True, batch_size=pairs)

    # --- reference: cached ---

    def on_fit_start(self) -> None:
        self._attach_reference_cache()

    def on_validation_start(self) -> None:
        self._attach_reference_cache()

    def _attach_reference_cache(self) -> None:
        """reference=cached: load (or first compute, on rank 0) the reference log-probs of every pair,
        keyed by the data and the starting weights, and attach them to the datasets."""
        datamodule = self.trainer.datamodule
        if self.dpo.reference != "cached" or datamodule.train_dataset.reference is not None:
            return
        if self._start_state is None:
            raise RuntimeError("DPO has no reference: call set_reference(starting weights) before training")
        folder = self.dpo.cache_dir or self.trainer.default_root_dir
        path = os.path.join(folder, f"reference-logps-{datamodule.fingerprint()}-{self._reference_id}.safetensors")
        if not os.path.exists(path) and self.trainer.is_global_zero:
            self._write_reference_cache(path, datamodule)
        self.trainer.strategy.barrier()
        from safetensors.numpy import load_file

        cached = load_file(path)
        for split in ("train", "val"):
            dataset = datamodule.train_dataset if split == "train" else datamodule.val_dataset
            dataset.reference = (cached[f"{split}.chosen"], cached[f"{split}.rejected"])

    @torch.no_grad()
    def _write_reference_cache(self, path: str, datamodule) -> None:
        from safetensors.numpy import save_file

        reference = Transformer(self.model_config).to(self.device)
        reference.load_state_dict(self._start_state)
        reference.eval()
        arrays = {}
        for split in ("train", "val"):
            dataset = datamodule.train_dataset if split == "train" else datamodule.val_dataset
            chosen, rejected = np.zeros(dataset.pairs()), np.zeros(dataset.pairs())
            size = datamodule.micro_batch_size
            for start in range(0, dataset.pairs(), size):
                items = [{"index": i, "chosen": dataset.chosen[i], "rejected": dataset.rejected[i]}
                         for i in range(start, min(start + size, dataset.pairs()))]
                batch = {k: v.to(self.device) for k, v in datamodule.collate_fn(items).items()}
                with self.trainer.precision_plugin.forward_context():
                    logps = self.sequence_logps(reference, batch).double().cpu().numpy()
                chosen[start:start + len(items)], rejected[start:start + len(items)] = np.split(logps, 2)
            arrays[f"{split}.chosen"], arrays[f"{split}.rejected"] = chosen, rejected
        del reference
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        save_file(arrays, tmp)
        os.replace(tmp, path)
        print(f"Reference log-probs of {sum(len(a) for a in arrays.values())} replies cached in {path}")
