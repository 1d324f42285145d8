"""Loss functions: pure tensor functions, no model or Lightning inside.

Next-token cross-entropy (pretraining, SFT), sequence log-probabilities and the DPO family;
the GRPO family joins them later.
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
    return head_cross_entropy(hidden, lambda h: kernels.linear(h, weight), labels, reduction, chunk_size)


def head_cross_entropy(hidden: torch.Tensor, head, labels: torch.Tensor, reduction: str = "mean",
                       chunk_size: int = 1024) -> torch.Tensor:
    """causal_lm_loss(head(hidden), labels) with `head` (hidden rows -> logits) applied chunk by chunk;
    a mean over no trained token is 0. Under autograd every chunk's logits stay for the backward pass."""
    hidden, labels = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    # (at least one chunk, so that no rows still give a tensor loss)
    total = sum(causal_lm_loss(head(hidden[s:s + chunk_size]), labels[s:s + chunk_size], reduction="sum")
                for s in range(0, max(hidden.shape[0], 1), chunk_size))
    return total / (labels != IGNORE_INDEX).sum().clamp(min=1) if reduction == "mean" else total


# --- sequence log-probabilities ---


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, average: bool = False) -> torch.Tensor:
    """Log-probability of each row's labelled tokens: the sum over positions whose label is not
    IGNORE_INDEX (average=True: their mean). logits (B, T, V) aligned with labels (B, T) -> (B,)."""
    valid = labels != IGNORE_INDEX
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    total = (logp * valid).sum(dim=-1)
    return total / valid.sum(dim=-1).clamp(min=1) if average else total


def sequence_logps_from_hidden(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """sequence_logps(hidden @ weight.T, labels) (sums), forming logits only at labelled positions:
    a DPO batch's replies are a fraction of its tokens, and the (B, T, V) logits never exist."""
    return token_logps_and_entropy(hidden, weight, labels, entropy_rows=0)[0].sum(dim=-1)


# --- the DPO family ---

DPO_LOSSES = ("sigmoid", "dpo_norm", "ipo", "hinge")


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
             reference_rejected: torch.Tensor, *, loss: str = "sigmoid", beta: float = 0.1,
             label_smoothing: float = 0.0, chosen_tokens: torch.Tensor | None = None,
             rejected_tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair preference losses and implicit rewards from summed sequence log-probs (each (B,)).

    With r = beta * (log pi(y|x) - log pi_ref(y|x)) and margin m = (r_chosen - r_rejected) / beta:
      - sigmoid:  -(1 - ls) log sigmoid(beta m) - ls log sigmoid(-beta m)   (DPO; ls = label smoothing)
      - dpo_norm: sigmoid on log-probs divided by each reply's token count (Tülu 3's length-normalised DPO)
      - ipo:      (m - 1 / (2 beta))^2   (IPO, on summed log-probs as in its paper)
      - hinge:    max(0, 1 - beta m)     (SLiC)
    Returns (losses, chosen rewards, rejected rewards); the rewards carry no gradient.
    """
    if loss not in DPO_LOSSES:
        raise ValueError(f"DPO loss must be one of {DPO_LOSSES}, got {loss!r}")
    if loss == "dpo_norm":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("dpo_norm needs chosen_tokens and rejected_tokens (the replies' token counts)")
        chosen_count, rejected_count = chosen_tokens.clamp(min=1), rejected_tokens.clamp(min=1)
        policy_chosen, reference_chosen = policy_chosen / chosen_count, reference_chosen / chosen_count
        policy_rejected, reference_rejected = policy_rejected / rejected_count, reference_rejected / rejected_count
    chosen_ratio = policy_chosen - reference_chosen
    rejected_ratio = policy_rejected - reference_rejected
    margin = chosen_ratio - rejected_ratio
    if loss in ("sigmoid", "dpo_norm"):
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * margin) - label_smoothing * F.logsigmoid(-beta * margin)
    elif loss == "ipo":
        losses = (margin - 1 / (2 * beta)) ** 2
    else:
        losses = torch.relu(1 - beta * margin)
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def preference_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict[str, torch.Tensor]:
    """Reward accuracy (share of pairs whose chosen reply earns the higher implicit reward), the mean
    margin between them, and each side's mean reward."""
    return {"reward_accuracy": (chosen_rewards > rejected_rewards).float().mean(),
            "reward_margin": (chosen_rewards - rejected_rewards).mean(),
            "chosen_reward": chosen_rewards.mean(), "rejected_reward": rejected_rewards.mean()}


# --- the GRPO family ---

AGGREGATIONS = ("grpo", "dapo", "dr_grpo")


def token_logps_and_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                            entropy_rows: int | None = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log p(label) (B, T) of the LM head over hidden (B, T, dim), computed only where labels
    are not IGNORE_INDEX (zeros elsewhere): a rollout's responses, not its prompts. Also the mean entropy
    of those tokens' distributions, a metric without gradient, estimated on an evenly strided sample of at
    most `entropy_rows` of them (None: all; 0: not computed, returned as 0)."""
    valid = labels != IGNORE_INDEX
    logits = kernels.linear(hidden[valid], weight.to(hidden.dtype)).float()  # (response tokens, V)
    logp_all = torch.log_softmax(logits, dim=-1)
    picked = logp_all.gather(-1, labels[valid].unsqueeze(-1)).squeeze(-1)
    logps = torch.zeros(labels.shape, dtype=picked.dtype, device=picked.device).masked_scatter(valid, picked)
    with torch.no_grad():
        rows = logp_all.detach()
        if entropy_rows == 0 or rows.shape[0] == 0:
            return logps, rows.new_zeros(())
        if entropy_rows is not None and rows.shape[0] > entropy_rows:
            rows = rows[torch.linspace(0, rows.shape[0] - 1, entropy_rows, device=rows.device).long()]
        entropy = -(rows.exp() * rows).sum(-1).mean()
    return logps, entropy


def group_advantages(rewards: torch.Tensor, scale: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """GRPO's advantages for rewards (prompts, group): (r - group mean) / (group std + eps); with
    scale=False only the mean is removed (Dr. GRPO). A group whose rewards are all equal gets zeros."""
    centred = rewards - rewards.mean(dim=-1, keepdim=True)
    return centred / (rewards.std(dim=-1, keepdim=True, unbiased=False) + eps) if scale else centred


def kl_k3(logps: torch.Tensor, reference_logps: torch.Tensor, clamp: float = 10.0) -> torch.Tensor:
    """Per-token KL(pi || pi_ref) estimate k3 = exp(d) - d - 1 with d = log pi_ref - log pi (Schulman's
    low-variance, always >= 0 estimator), clamped to [-clamp, clamp] as verl's low_var_kl."""
    delta = reference_logps - logps
    return (delta.exp() - delta - 1).clamp(-clamp, clamp)


def grpo_policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                     *, clip_low: float = 0.2, clip_high: float | None = None, aggregation: str = "grpo",
                     kl: torch.Tensor | None = None, kl_beta: float = 0.0, max_tokens: int | None = None
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped policy objective over response tokens (B, T), as a loss to minimise.

    Per token: -min(ratio A, clip(ratio, 1 - clip_low, 1 + clip_high) A) + kl_beta KL, ratio = pi / pi_old,
    A the sequence's advantage (B,). Aggregation over the masked tokens:
      - grpo:    mean over each sequence's tokens, then over sequences;
      - dapo:    mean over all tokens of the batch (long responses weigh more);
      - dr_grpo: sum over all tokens / (sequences x max_tokens), a constant normaliser (Dr. GRPO).
    Returns the loss and the clipped fraction, mean ratio and mean KL over tokens.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    if aggregation == "dr_grpo" and max_tokens is None:
        raise ValueError("dr_grpo needs max_tokens (the generation budget) as its normaliser")
    clip_high = clip_low if clip_high is None else clip_high
    mask = mask.to(logps.dtype)
    ratio = torch.exp(logps - old_logps)
    advantage = advantages[:, None]
    unclipped, clipped = ratio * advantage, ratio.clamp(1 - clip_low, 1 + clip_high) * advantage
    per_token = -torch.minimum(unclipped, clipped)
    if kl is not None and kl_beta:
        per_token = per_token + kl_beta * kl
    tokens = mask.sum().clamp(min=1)
    if aggregation == "grpo":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    elif aggregation == "dapo":
        loss = (per_token * mask).sum() / tokens
    else:
        loss = (per_token * mask).sum() / (mask.shape[0] * max_tokens)
    stats = {"clip_fraction": ((clipped < unclipped).to(mask.dtype) * mask).sum() / tokens,
             "ratio": (ratio.detach() * mask).sum() / tokens}
    if kl is not None:
        stats["kl"] = (kl.detach() * mask).sum() / tokens
    return loss, stats
