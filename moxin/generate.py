"""Token generation: sampling from the model.

This is the plain reference decoder: every step recomputes the logits of the whole (window-
bounded) sequence, so it is exact and simple but slow for long outputs. The rolling-buffer KV
cache engine keeps this interface and replaces the inner loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moxin.model import Transformer


@dataclass
class Generation:
    tokens: list[list[int]]  # the new token ids of each prompt (prompt excluded)
    logprobs: list[list[float]]  # log p(token) under the raw logits (before temperature / top-k / top-p)


def sample_next(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                generator: torch.Generator | None) -> torch.Tensor:
    """One token id per row of logits (B, V): greedy when temperature == 0."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass.
        drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= top_p
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, top_k: int = 0, stop: list[int] | None = None,
             seed: int | None = None) -> Generation:
    """Continue each prompt by up to max_new_tokens tokens; stop early at any token id in `stop`.

    Sampling is reproducible for a given seed. The stop token, when hit, is included in `.tokens`.
    """
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (start it with BOS)")
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    stop_ids = set(stop or [])
    limit = model.config.max_seq_len
    was_training = model.training
    model.eval()
    result = Generation(tokens=[], logprobs=[])
    for prompt in prompts:
        sequence, new, logps = list(prompt), [], []
        for _ in range(max_new_tokens):
            context = torch.tensor([sequence[-limit:]], device=device)
            logits = model(context)[0, -1].float()  # (V,)
            token = int(sample_next(logits[None], temperature, top_k, top_p, generator)[0])
            logps.append(float(logits.log_softmax(-1)[token]))
            new.append(token)
            sequence.append(token)
            if token in stop_ids:
                break
        result.tokens.append(new)
        result.logprobs.append(logps)
    model.train(was_training)
    return result
