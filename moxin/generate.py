"""Generation: a rolling-buffer KV cache and batched sampling.

With sliding-window attention a token attends to the last W positions only, so the cache keeps
min(W, length) slots per layer and step t is written to slot t mod slots: its memory stays
constant however long the sequence grows. Prompts are prefilled in chunks of at most W tokens (a 32K-token prompt
needs no more memory than a W-token one), then decoded one token per step for the whole batch.

Batches of prompts of different lengths are left-padded: all rows advance through the same
"time" t, row r's token at time t has position t - pad[r], and padded slots are masked out.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moxin.kernels import onednn_enabled, onednn_linears
from moxin.model import ModelConfig, Transformer
from moxin.system import available_memory_bytes

# Packing the weights for oneDNN (moxin.kernels.pack_weight) reads and writes them once: about the
# cost of 8-10 decode steps, each of which it then makes 20-30% faster. Worth it from here on.
PACK_FROM_NEW_TOKENS = 32


class RollingKVCache:
    """Keys and values of every layer for a batch of sequences, in min(W, max_len) slots.

    Used by `Transformer.hidden_states(tokens, cache=...)` through three calls per forward:
    `prepare(T)` (positions and attention mask of the T new tokens), `update(layer, k, v)`
    (store the new keys/values and return those to attend over) and `advance(T)`.
    """

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, pad: torch.Tensor,
                 dtype: torch.dtype, device: torch.device | str, kv_heads: int | None = None):
        if max_len > cfg.max_seq_len:
            raise ValueError(f"prompt + new tokens = {max_len} positions exceeds max_seq_len {cfg.max_seq_len}")
        self.window = cfg.sliding_window or max_len
        self.slots = min(self.window, max_len)
        self.max_len = max_len
        # kv_heads: this rank's share under tensor parallelism (each rank caches its own heads' keys).
        shape = (cfg.n_layers, batch, kv_heads or cfg.n_kv_heads, self.slots, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.slot_time = torch.full((self.slots,), -1, dtype=torch.long, device=device)  # -1: empty
        self.pad = pad.to(device)  # (B,) left padding of each row
        self.time = 0
        self._times = self._slot_ids = None
        self._visible = 0  # cached slots the current tokens attend over

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def prepare(self, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions (B, T) and attention mask (B, 1, T, keys) for the next T tokens.

        The mask is boolean (True = may attend), except for one token (a decode step), where it is
        additive (0 or -inf, the cache's dtype): every layer adds it to its scores, which costs less
        than a select per layer, and SDPA takes either.
        """
        if self.time + T > self.max_len:
            raise ValueError(f"the cache holds {self.max_len} positions; {self.time + T} requested")
        if T > self.slots:
            raise ValueError(f"chunk of {T} tokens is longer than the cache's {self.slots} slots")
        times = torch.arange(self.time, self.time + T, device=self.slot_time.device)
        self._times, self._slot_ids = times, times % self.slots
        positions = (times[None, :] - self.pad[:, None]).clamp(min=0)
        # Until the buffer first wraps, only its first `time` slots hold keys: attention skips the rest.
        if T == 1:  # decode: the new key is written first, then the query attends over the cache
            self._visible = min(self.time + 1, self.slots)
            key_times = self.slot_time[:self._visible].clone()
            key_times[self._slot_ids] = times
        else:  # a prefill chunk attends over the cache plus itself, and is written afterwards
            self._visible = min(self.time, self.slots)
            key_times = torch.cat([self.slot_time[:self._visible], times])
        query, key = times[None, :, None], key_times[None, None, :]  # (1, T, 1), (1, 1, keys)
        mask = (key <= query) & (query - key < self.window) & (key >= self.pad[:, None, None])
        # A padding query sees no real key; letting it see itself keeps its softmax finite.
        mask = (mask | (key == query))[:, None]  # (B, 1, T, keys): broadcast over heads
        if T == 1:
            mask = torch.zeros(mask.shape, dtype=self.k.dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
        return positions, mask

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store keys/values (B, K, T, D) of the new tokens; return those to attend over."""
        cache_k, cache_v = self.k[layer], self.v[layer]  # (B, K, slots, D)
        if k.shape[2] == 1:
            cache_k.index_copy_(2, self._slot_ids, k)
            cache_v.index_copy_(2, self._slot_ids, v)
            return cache_k[:, :, :self._visible], cache_v[:, :, :self._visible]
        visible = slice(None, self._visible)
        keys, values = torch.cat([cache_k[:, :, visible], k], dim=2), torch.cat([cache_v[:, :, visible], v], dim=2)
        cache_k.index_copy_(2, self._slot_ids, k)
        cache_v.index_copy_(2, self._slot_ids, v)
        return keys, values

    def advance(self, T: int) -> None:
        self.slot_time[self._slot_ids] = self._times
        self.time += T


@dataclass
class Generation:
    tokens: list[list[int]]  # the new token ids of each prompt (prompt excluded, stop token included)
    logprobs: list[list[float]]  # log p(token) = log_softmax(raw logits): before temperature, top-k, top-p


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
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass; the most
        # likely token always stays.
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p
        drop_sorted[..., 0] = False
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    return inverse_cdf_sample(logits.softmax(dim=-1), generator)


def inverse_cdf_sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token id per row of probabilities (B, V), by inverting the cumulative distribution.

    torch.multinomial draws an exponential variate per vocabulary entry, and one cumulative sum over
    the whole vocabulary was still the largest cost of a CPU sampling step. So two short scans: pick a
    block of about sqrt(V) tokens by the blocks' total mass, then a token inside it by its own mass,
    with one uniform number each. P(block) x P(token | block) is the same distribution.
    """
    rows, vocab = probs.shape
    size = math.isqrt(vocab - 1) + 1
    count = -(-vocab // size)
    blocks = F.pad(probs, (0, count * size - vocab)).view(rows, count, size)  # padding has zero mass
    u = torch.rand(rows, 2, generator=generator, device=probs.device, dtype=probs.dtype)
    block = _first_above(blocks.sum(-1).cumsum(-1), u[:, :1])
    within = blocks[torch.arange(rows, device=probs.device), block].cumsum(-1)
    return (block * size + _first_above(within, u[:, 1:])).clamp(max=vocab - 1)


def _first_above(cdf: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Index of the first entry of each row's cumulative mass (B, n) above u (B, 1) x its total: with
    side="right" never a zero-mass entry, which has the same cumulative mass as the one before it."""
    return torch.searchsorted(cdf, u * cdf[:, -1:], side="right").squeeze(-1).clamp(max=cdf.shape[-1] - 1)


class StopCriteria:
    """When a row is done: a stop token id, a stop token sequence, or a stop string."""

    def __init__(self, stop: Sequence[int | str | Sequence[int]] | None, tokenizer=None):
        self.ids, self.sequences, self.strings = set(), [], []
        for item in stop or []:
            if isinstance(item, str):
                if tokenizer is None:
                    raise ValueError(f"stop string {item!r} needs generate(..., tokenizer=...) to decode")
                self.strings.append(item)
            elif isinstance(item, int):
                self.ids.add(item)
            else:
                self.sequences.append(list(item))
        self.tokenizer = tokenizer

    def __call__(self, generated: list[int]) -> bool:
        if generated[-1] in self.ids:
            return True
        if any(generated[-len(seq):] == seq for seq in self.sequences):
            return True
        if self.strings:
            text = self.tokenizer.decode(generated, skip_special_tokens=False)
            return any(s in text for s in self.strings)
        return False


def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, top_k: int = 0, stop: Sequence[int | str | Sequence[int]] | None = None,
             seed: int | None = None, tokenizer=None,
             callback: Callable[[int, int], None] | None = None) -> Generation:
    """Continue each prompt by up to max_new_tokens tokens.

    temperature 0 is greedy; otherwise sampling with temperature, then top-k (0: off), then
    top-p (1.0: off), reproducible for a given seed. `stop` holds token ids, token-id sequences
    and strings (strings need `tokenizer`); a row stops when it produces one, and the tokens
    that completed it are kept in `.tokens`. `.logprobs[r][i]` is log_softmax(logits)[token] of
    the model's raw fp32 logits, before temperature, top-k or top-p. `callback(row, token_id)`
    is called for each new token as it is produced (streaming). On a CPU with
    moxin.kernels.use_onednn_on_cpu() switched on, the products run through oneDNN, with the weights
    packed for the call when it may decode PACK_FROM_NEW_TOKENS tokens or more (worth_packing).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt, each of at least one token (start with BOS)")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    should_stop = StopCriteria(stop, tokenizer)
    with inference_context(model, new_tokens=max_new_tokens):
        return _decode(model, prompts, max_new_tokens, temperature, top_p, top_k, generator, should_stop, callback)


def worth_packing(model: torch.nn.Module, max_new_tokens: int) -> bool:
    """Whether generate packs the weights for oneDNN: enough decode steps to repay it, and memory for
    a second copy of the weights (with half the available memory to spare)."""
    if max_new_tokens < PACK_FROM_NEW_TOKENS:
        return False
    available = available_memory_bytes()
    return available is None or 2 * sum(p.nbytes for p in model.parameters()) < available


@contextmanager
def inference_context(model: torch.nn.Module, new_tokens: int = 0):
    """Eval mode (the model's mode is restored after), inference_mode, and oneDNN products on a CPU
    where the process switched them on (moxin.kernels), with the weights packed where the block may
    decode `new_tokens` tokens per generate call and worth_packing says so."""
    was_training = model.training
    on_cpu = next(model.parameters()).device.type == "cpu"
    model.eval()
    try:
        if on_cpu and onednn_enabled():
            onednn = onednn_linears(model, pack=worth_packing(model, new_tokens))
        else:
            onednn = nullcontext()
        with torch.inference_mode(), onednn:
            yield
    finally:
        model.train(was_training)


@torch.inference_mode()
def _decode(model: Transformer, prompts: list[list[int]], max_new_tokens: int, temperature: float, top_p: float,
            top_k: int, generator, should_stop: StopCriteria, callback) -> Generation:
    """The batched prefill + decode loop of generate()."""
    param = next(model.parameters())
    device = param.device
    longest = max(len(p) for p in prompts)
    pad = torch.tensor([longest - len(p) for p in prompts])
    tokens = torch.zeros(len(prompts), longest, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        tokens[row, longest - len(prompt):] = torch.tensor(prompt)
    tokens = tokens.to(device)
    cache = RollingKVCache(model.config, len(prompts), longest + max_new_tokens, pad, param.dtype, device,
                           kv_heads=model.layers[0].attention.n_kv_heads)

    for start in range(0, longest, cache.slots):  # prefill in chunks of at most W tokens
        hidden = model.hidden_states(tokens[:, start:start + cache.slots], cache=cache)
    logits = model.output(hidden[:, -1]).float()  # (B, V): only the last position is needed

    out = Generation(tokens=[[] for _ in prompts], logprobs=[[] for _ in prompts])
    done = [False] * len(prompts)
    for step in range(max_new_tokens):
        next_tokens = sample_next(logits, temperature, top_k, top_p, generator)  # (B,)
        logps = logits.log_softmax(dim=-1).gather(1, next_tokens[:, None]).squeeze(1)
        for row, (token, logp) in enumerate(zip(next_tokens.tolist(), logps.tolist(), strict=True)):
            if done[row]:
                continue  # finished rows keep decoding with the batch; their tokens are dropped
            out.tokens[row].append(token)
            out.logprobs[row].append(logp)
            if callback is not None:
                callback(row, token)
            done[row] = should_stop(out.tokens[row])
        if all(done) or step == max_new_tokens - 1:
            break
        logits = model(next_tokens[:, None], cache=cache)[:, -1].float()
    return out
