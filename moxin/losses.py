"""Loss functions: pure tensor functions, no model or Lightning inside.

Later phases add sequence log-probabilities, the DPO family and the GRPO family here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moxin import kernels

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


class _LinearCrossEntropy(torch.autograd.Function):
    """Cross-entropy of (hidden @ weight.T) computed chunk by chunk, gradients included.

    Each chunk's logits exist only while that chunk is processed; their gradient
    (softmax - one_hot) / n is formed in place and turned straight into the gradients of hidden
    and weight, which backward then only scales. Never holds the (tokens x vocab) logits, and
    skips the separate log-softmax and one-hot passes that full-logit cross-entropy makes.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_size: int, reduction: str):
        valid = labels != IGNORE_INDEX
        # A tensor, not .item(): no host-device sync per micro-batch.
        count = valid.sum().clamp(min=1).float()
        scale = 1.0 / count if reduction == "mean" else torch.ones_like(count)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32)
        w = weight.to(hidden.dtype)
        w_t = w.t().contiguous() if kernels.onednn_enabled() else w.t()  # (dim, V) for grad_hidden
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden.shape[0], chunk_size):
            h = hidden[start:start + chunk_size]
            target = labels[start:start + chunk_size]
            keep = valid[start:start + chunk_size]
            logits = kernels.linear(h, w).float()  # (chunk, V)
            rows, safe_target = torch.arange(h.shape[0], device=h.device), target.clamp(min=0)
            target_logit = logits[rows, safe_target]
            weight_row = keep.float() * scale  # d loss / d (per-token loss)
            # Softmax in place of the logits: one buffer of (chunk, V), no temporaries.
            row_max = logits.amax(dim=-1, keepdim=True)
            exp_sum = logits.sub_(row_max).exp_().sum(dim=-1, keepdim=True)
            lse = (row_max + exp_sum.log()).squeeze(-1)
            total += ((lse - target_logit) * keep).sum()
            grad = logits.mul_(weight_row[:, None] / exp_sum)  # (softmax - one_hot) * weight_row
            grad[rows, safe_target] -= weight_row
            grad_hidden[start:start + chunk_size] = kernels.linear(grad.to(w.dtype), w_t).to(hidden.dtype)
            grad_weight.addmm_(grad.T, h.float())
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        return total * scale

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_output.to(grad_hidden.dtype), grad_weight * grad_output.to(grad_weight.dtype), \
            None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         reduction: str = "mean", chunk_size: int = 1024) -> torch.Tensor:
    """causal_lm_loss(hidden @ weight.T, labels) without materialising the logits.

    hidden (B, T, dim) final hidden states, weight (V, dim) the LM head, labels (B, T).
    Equal to the full-logit loss (and its gradients) up to float rounding.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    hidden, labels = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, labels, chunk_size, reduction)
    # No gradients wanted (validation): the same loss, chunk by chunk.
    weight = weight.to(hidden.dtype)
    total = sum(causal_lm_loss(kernels.linear(hidden[s:s + chunk_size], weight), labels[s:s + chunk_size],
                               reduction="sum") for s in range(0, hidden.shape[0], chunk_size))
    return total / (labels != IGNORE_INDEX).sum().clamp(min=1) if reduction == "mean" else total
