"""The Moxin model: a Mistral-style decoder-only transformer, in one file.

Every training phase (pretraining, SFT, DPO, reasoning SFT, GRPO) trains this `Transformer`.
This file knows nothing of training, data, Lightning or Hydra: it maps token ids to logits.

Architecture (Mistral 7B v0.1, with more blocks for Moxin-7B):
    tokens -> embedding -> n_layers x [RMSNorm -> GQA attention (RoPE, causal + sliding window)
    -> residual -> RMSNorm -> SwiGLU MLP -> residual] -> RMSNorm -> untied LM head -> logits

Shapes use B = batch, T = sequence length, H = n_heads, K = n_kv_heads, D = head_dim.
Rotary embeddings use the "rotate half" layout of Hugging Face's Mistral, so no weight needs
permuting; q/k/v and gate/up are stacked into `wqkv` and `w13` (moxin/hf.py splits them for HF).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 32000
    dim: int = 4096
    n_layers: int = 36
    n_heads: int = 32
    n_kv_heads: int = 8
    head_dim: int = 128
    hidden_dim: int = 14336
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    sliding_window: int | None = 4096  # keys within the last W positions (self included); None = full causal
    max_seq_len: int = 32768
    tie_embeddings: bool = False
    init_std: float = 0.02

    def __post_init__(self):
        positive = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                    "hidden_dim", "max_seq_len")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        if self.n_heads % self.n_kv_heads != 0:
            raise ValueError(
                f"ModelConfig.n_heads ({self.n_heads}) must be a multiple of "
                f"n_kv_heads ({self.n_kv_heads}) for grouped-query attention"
            )
        if self.head_dim % 2 != 0:
            raise ValueError(f"ModelConfig.head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int) or self.sliding_window < 1):
            raise ValueError(f"ModelConfig.sliding_window must be >= 1 or None, got {self.sliding_window!r}")
        if self.norm_eps <= 0:
            raise ValueError(f"ModelConfig.norm_eps must be > 0, got {self.norm_eps}")
        if self.rope_theta <= 0:
            raise ValueError(f"ModelConfig.rope_theta must be > 0, got {self.rope_theta}")
        if self.init_std <= 0:
            raise ValueError(f"ModelConfig.init_std must be > 0, got {self.init_std}")

    def to_dict(self) -> dict:
        return asdict(self)

    def num_params(self, include_embeddings: bool = True) -> int:
        """Parameter count computed from the shapes (equals sum(p.numel()) of the Transformer)."""
        attn = self.dim * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        mlp = 3 * self.dim * self.hidden_dim
        per_layer = attn + mlp + 2 * self.dim
        embed = self.vocab_size * self.dim * (1 if self.tie_embeddings else 2)
        return self.n_layers * per_layer + self.dim + (embed if include_embeddings else 0)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward): 6 N plus attention scores.

        Attention spans min(seq_len, window) keys; the LM head is counted, the embedding lookup is not.
        """
        span = min(seq_len, self.sliding_window or seq_len)
        matmul_params = self.num_params(include_embeddings=False) + self.vocab_size * self.dim
        attention = 12 * self.n_layers * self.n_heads * self.head_dim * span
        return 6 * matmul_params + attention


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise (and scale) in fp32 for stability under bf16.
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).type_as(x)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, each (..., T, 1, D), for integer positions (T,) or per row (B, T).

    The 1 broadcasts over heads. The first half of sin is negated, for apply_rope.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim))
    angles = positions.float()[..., None] * inv_freq  # (..., T, D/2)
    angles = torch.cat([angles, angles], dim=-1).unsqueeze(-2)  # (..., T, 1, D): the "rotate half" layout
    sin = angles.sin()
    sin[..., :head_dim // 2].neg_()
    return angles.cos(), sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, T, heads, D) by position; cos/sin from rope_cos_sin.

    With x's halves (x1, x2), the rotation is x cos + (-x2, x1) sin. sin comes with its first half
    negated, so (-x2, x1) sin = (x2, x1) (that sin): one roll of x instead of two slices, a
    negation and a concatenation (a decode step runs this once per layer), with the same result.
    """
    return x * cos.to(x.dtype) + x.roll(x.shape[-1] // 2, dims=-1) * sin.to(x.dtype)


def sliding_window_mask(q_len: int, k_len: int, window: int | None, device) -> torch.Tensor:
    """Boolean (q_len, k_len) mask, True = may attend. Queries are the last q_len of k_len positions.

    Query at position i sees key j when j <= i and i - j < window.
    """
    q_pos = torch.arange(k_len - q_len, k_len, device=device)[:, None]
    k_pos = torch.arange(k_len, device=device)[None, :]
    allowed = k_pos <= q_pos
    if window is not None:
        allowed &= (q_pos - k_pos) < window
    return allowed


def packed_positions(segments: torch.Tensor) -> torch.Tensor:
    """For rows holding several sequences back to back: segments (B, T) numbers the sequence each
    token belongs to (each a contiguous run). Positions (B, T) restart at 0 where a sequence starts,
    so a packed sequence gets the rotary positions it would get alone."""
    B, T = segments.shape
    index = torch.arange(T, device=segments.device).expand(B, T)
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    return index - torch.where(starts, index, 0).cummax(dim=1).values


def same_sequence(query_segments: torch.Tensor, key_segments: torch.Tensor) -> torch.Tensor:
    """(B, 1, Tq, Tk): True where query and key belong to the same packed sequence."""
    return (query_segments[:, :, None] == key_segments[:, None, :])[:, None]


def packed_layout(segments: torch.Tensor, window: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rotary positions (B, T) and attention mask (B, 1, T, T) of packed rows. Rows longer than the
    window get no mask: attention builds it per block of the window (windowed_attention)."""
    T = segments.shape[1]
    mask = None if window is not None and T > window else (
        same_sequence(segments, segments) & sliding_window_mask(T, T, window, segments.device))
    return packed_positions(segments), mask


def windowed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int,
                       segments: torch.Tensor | None = None) -> torch.Tensor:
    """Causal sliding-window attention, one block of W queries at a time.

    q (B, H, T, D), k/v (B, K, T, D). Each block of W queries attends to at most 2W - 1 keys, so
    work and memory grow with T x W rather than T^2 (a 32K sequence with W = 4096 never forms a
    32K x 32K score matrix). With segments (B, T), attention also stays inside each packed sequence.
    """
    out = []
    for start in range(0, q.shape[2], window):
        end = min(start + window, q.shape[2])
        k_start = max(0, start - window + 1)
        mask = sliding_window_mask(end - start, end - k_start, window, q.device)
        if segments is not None:
            mask = mask & same_sequence(segments[:, start:end], segments[:, k_start:end])
        out.append(F.scaled_dot_product_attention(q[:, :, start:end], k[:, :, k_start:end], v[:, :, k_start:end],
                                                  attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1]))
    return torch.cat(out, dim=2)


def single_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One new token per row over its cached keys (decoding on a CPU): q (B, H, 1, D), k/v (B, K, S, D),
    mask (B, 1, 1, S), additive (0 = may attend, -inf = may not) as the cache gives it for one token.
    The H / K query heads that share a key/value head become that head's H / K queries: plain
    attention with K heads, which takes a CPU about half the time of grouped-query SDPA or of two
    batched products at these sizes."""
    B, H, _, D = q.shape
    K = k.shape[1]
    return F.scaled_dot_product_attention(q.view(B, K, H // K, D), k, v, attn_mask=mask).view(B, H, 1, D)


def repeat_kv_for_masks(q: torch.Tensor) -> bool:
    """Whether masked grouped-query attention should repeat key/value heads: on CUDA (see Attention)."""
    return q.is_cuda


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.sliding_window = cfg.sliding_window
        # Query, key and value projections in one matrix: one product instead of three.
        self.qkv_sizes = [cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim]
        self.wqkv = nn.Linear(cfg.dim, sum(self.qkv_sizes), bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None, cache=None, segments: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        # split_with_sizes, not Tensor.split: that is a Python wrapper, and a decode step is op-bound.
        qk, v = self.wqkv(x).split_with_sizes([self.qkv_sizes[0] + self.qkv_sizes[1], self.qkv_sizes[2]], dim=-1)
        # Queries and keys are rotated together: one rotation instead of two.
        qk = apply_rope(qk.view(B, T, self.n_heads + self.n_kv_heads, self.head_dim), cos, sin)
        q, k = qk.split_with_sizes([self.n_heads, self.n_kv_heads], dim=2)
        v = v.view(B, T, self.n_kv_heads, self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, T, D)
        if cache is not None:  # keys/values of earlier positions (moxin/generate.py): (B, K, S, D)
            k, v = cache.update(self.layer_idx, k, v)
        grouped = self.n_kv_heads != self.n_heads
        if segments is not None and grouped and repeat_kv_for_masks(q):
            # Packed training rows: keys/values repeated per query head, so that a memory-efficient
            # kernel takes the mask (with enable_gqa only CUDA's math kernel would, storing T x T scores).
            k, v = (t.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1) for t in (k, v))
            grouped = False
        if cache is not None and T == 1 and not q.is_cuda:
            out = single_query_attention(q, k, v, mask)
        elif mask is None and self.sliding_window is not None and T > self.sliding_window:
            out = windowed_attention(q, k, v, self.sliding_window, segments)
        else:
            # GQA: each group of n_heads / n_kv_heads query heads shares one key/value head.
            # No mask: plain causal (the window covers the whole sequence); else the cache's or packing's mask.
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=grouped
            )  # (B, H, T, D)
        return self.wo(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(gate x) * up x), with gate and up stacked in one matrix w13."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w13 = nn.Linear(cfg.dim, 2 * cfg.hidden_dim, bias=False)  # [gate; up]
        self.w2 = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg, layer_idx)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x, cos, sin, mask, cache=None, segments=None):
        x = x + self.attention(self.attention_norm(x), cos, sin, mask, cache, segments)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        if self.tok_embeddings.weight.device.type != "meta":
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialisation for pretraining from scratch (GPT-2 / OLMo style).

        Normal(0, init_std) everywhere; the projections that write into the residual stream
        (attention wo, MLP w2) are scaled by 1/sqrt(2 n_layers) so the stream's variance does
        not grow with depth; norms start at 1.
        """
        std = self.config.init_std
        residual_std = std / math.sqrt(2 * self.config.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                scaled = name.endswith(("attention.wo", "feed_forward.w2"))
                nn.init.normal_(module.weight, mean=0.0, std=residual_std if scaled else std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def forward(self, tokens: torch.Tensor, start_pos: int = 0, cache=None,
                segments: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, vocab) for tokens (B, T) at positions start_pos .. start_pos + T - 1."""
        # The class's own hidden_states: under FSDP2 the instance's is wrapped as a second entry point,
        # and entering the model inside its own forward would free the root's gathered weights.
        return self.output(Transformer.hidden_states(self, tokens, start_pos, cache, segments))

    def hidden_states(self, tokens: torch.Tensor, start_pos: int = 0, cache=None,
                      segments: torch.Tensor | None = None) -> torch.Tensor:
        """The final normalised hidden states (B, T, dim): the LM head's input.

        Training computes its loss from these and `output.weight` without materialising the
        (B, T, vocab) logits (see moxin.losses.linear_cross_entropy). With a `cache` (the
        rolling-buffer KV cache of moxin/generate.py) the tokens continue the cached sequences:
        the cache supplies each row's positions and the attention mask, start_pos is unused.
        With `segments` (B, T), each row holds several packed sequences, computed independently
        (packed_positions, same_sequence).
        """
        B, T = tokens.shape
        if cache is not None:
            positions, mask = cache.prepare(T)  # (B, T), (B, 1, T, keys)
        elif segments is not None:
            if T > self.config.max_seq_len:
                raise ValueError(f"rows of {T} tokens exceed max_seq_len {self.config.max_seq_len}")
            positions, mask = packed_layout(segments, self.config.sliding_window)
        else:
            if start_pos + T > self.config.max_seq_len:
                raise ValueError(
                    f"sequence of {start_pos + T} positions exceeds max_seq_len {self.config.max_seq_len}"
                )
            positions = torch.arange(start_pos, start_pos + T, device=tokens.device)
            mask = None  # causal; attention applies the sliding window itself
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta)
        h = self.tok_embeddings(tokens)  # (B, T, dim)
        for layer in self.layers:
            h = layer(h, cos, sin, mask, cache, segments)
        if cache is not None:
            cache.advance(T)
        return self.norm(h)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # Hugging Face interop lives in moxin/hf.py; these are the model's doors to it.
    @classmethod
    def from_hf(cls, path: str, dtype: torch.dtype | None = None) -> Transformer:
        """Load a transformers `MistralForCausalLM` checkpoint folder (config.json + safetensors)."""
        from moxin.hf import load_hf

        return load_hf(path, dtype=dtype)

    def save_hf(self, path: str, max_shard_size: str | int = "5GB") -> None:
        """Write a folder that `transformers.AutoModelForCausalLM.from_pretrained` loads."""
        from moxin.hf import save_hf

        save_hf(self, path, max_shard_size=max_shard_size)
