"""Loss functions: pure tensor functions, no model or Lightning inside.

Later phases add sequence log-probabilities, the DPO family and the GRPO family here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy. logits (B, T, V) already aligned with labels (B, T).

    Labels equal to IGNORE_INDEX do not count. `reduction="sum"` lets a caller divide by the
    number of trained tokens of a whole (accumulated, multi-device) batch.
    """
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
        ignore_index=IGNORE_INDEX, reduction=reduction,
    )
