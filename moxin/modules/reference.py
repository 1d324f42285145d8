"""A frozen reference policy beside the trained one (DPO, GRPO's KL term).

The reference is a copy of the starting weights. It is left out of checkpoints (it would double
their size) and rebuilt from the starting weights when a run resumes; the starting weights'
fingerprint is saved, so a resume from other weights is refused instead of silently changing it.
It stays in under FSDP, which restores every registered tensor, and under Colossal-AI's Gemini, whose
chunks hold it (the other Colossal-AI plugins leave it out: moxin/colossalai_strategy.py).
"""

from __future__ import annotations

import hashlib

import torch

from moxin.model import Transformer


def weights_fingerprint(state_dict: dict[str, torch.Tensor]) -> str:
    """A cheap hash of a state dict: names, shapes and a strided sample of every tensor's values."""
    digest = hashlib.blake2b(digest_size=8)
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().reshape(-1)
        sample = tensor[:: max(1, tensor.numel() // 4096)].float().cpu().numpy()
        digest.update(f"{name}{tuple(state_dict[name].shape)}".encode())
        digest.update(sample.tobytes())
    return digest.hexdigest()


class ReferencePolicy:
    """Mixin for a MoxinModule: `set_reference(start weights)`, `self.reference`, checkpoint handling.
    The module's __init__ sets `self.reference = None` and `self._reference_id = None` (not class
    attributes here: they would hide the registered submodule from nn.Module's lookup)."""

    def keeps_reference_copy(self) -> bool:
        return True

    reference_state = None  # FSDP: the weights rank 0 broadcasts into the sharded reference (configure_model)

    def set_reference(self, state_dict: dict[str, torch.Tensor] | None) -> None:
        """The starting weights, which are the reference policy. Called before training, fresh or resumed.
        Under FSDP only rank 0 has them (None elsewhere): the reference is built on the meta device and
        filled from rank 0 once sharded."""
        self._reference_id = weights_fingerprint(state_dict) if state_dict is not None else None
        if self.keeps_reference_copy():
            if self.parallel.strategy == "fsdp":
                with torch.device("meta"):
                    self.reference = Transformer(self.model_config)
                self.reference_state = state_dict
            else:
                self.reference = Transformer(self.model_config)
                self.reference.load_state_dict(state_dict)
            self.reference.requires_grad_(False)  # no dropout in the model: train mode computes the same

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.parallel.strategy != "fsdp":  # FSDP loads a checkpoint into every registered tensor: keep it
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                        if not k.startswith("reference.")}
        checkpoint["reference_id"] = self._reference_id

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        saved = checkpoint.get("reference_id", checkpoint.get("dpo_reference_id"))  # (the older key)
        ours = self._reference_id
        if self.parallel.strategy == "fsdp":  # only rank 0 read the starting weights: its verdict for all ranks
            ours = self.trainer.strategy.broadcast(ours)
        if saved is not None and ours is not None and saved != ours:
            raise ValueError("this checkpoint was trained against other reference weights than phase.init_from "
                             "gives now; resume with the run's original init_from")
        state = checkpoint.get("state_dict")  # absent when the strategy loaded the weights itself (FSDP's folders)
        if self.reference is not None and state is not None and not any(k.startswith("reference.") for k in state):
            state.update({f"reference.{k}": v for k, v in self.reference.state_dict().items()})
