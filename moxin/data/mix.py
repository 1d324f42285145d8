"""Weighted mixing of packed sources into one deterministic training order.

The whole order is drawn up front from `seed`: which source each sample comes from (by weight),
and which row (a fresh seeded permutation of the source's rows on every pass). The dataset is
therefore a pure function of (arrays, weights, num_samples, seed): the same seed gives the same
batches on any machine, and the position in it is just a sample index.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch.utils.data import Dataset


def _example(row: np.ndarray) -> dict[str, torch.Tensor]:
    tokens = torch.from_numpy(row.astype(np.int64))
    return {"input_ids": tokens[:-1], "labels": tokens[1:]}  # labels: the next token


class MixedSequenceDataset(Dataset):
    """`num_samples` rows drawn from per-source (rows, seq_len + 1) arrays in proportion to weights."""

    def __init__(
        self,
        arrays: Mapping[str, np.ndarray],
        weights: Mapping[str, float],
        num_samples: int | None = None,
        seed: int = 1234,
    ):
        if not arrays:
            raise ValueError("MixedSequenceDataset needs at least one source")
        self.names = list(arrays)
        for name, rows in arrays.items():
            if rows.ndim != 2:
                raise ValueError(f"source {name!r}: expected a (rows, seq_len + 1) array, got shape {rows.shape}")
            if len(rows) == 0:
                raise ValueError(f"source {name!r} produced no training sequences of {rows.shape[1]} tokens")
        if len({rows.shape[1] for rows in arrays.values()}) != 1:
            raise ValueError(f"sources differ in row length: { {n: a.shape[1] for n, a in arrays.items()} }")
        self.arrays = [arrays[name] for name in self.names]
        self.weights = {name: float(weights[name]) for name in self.names}
        w = np.array(list(self.weights.values()))
        self.target_shares = w / w.sum()
        self.num_samples = sum(len(a) for a in self.arrays) if num_samples is None else int(num_samples)
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")

        rng = np.random.default_rng(seed)
        self.source_ids = rng.choice(len(self.names), size=self.num_samples, p=self.target_shares)
        self.row_ids = np.zeros(self.num_samples, dtype=np.int64)
        self.passes: dict[str, int] = {}
        for k, rows in enumerate(self.arrays):
            where = np.flatnonzero(self.source_ids == k)
            passes = -(-len(where) // len(rows))  # ceil
            # Its own generator per source: one source's sample count does not reorder another's rows.
            perm_rng = np.random.default_rng([seed, k])
            order = [perm_rng.permutation(len(rows)) for _ in range(passes)]
            self.row_ids[where] = np.concatenate(order)[: len(where)] if order else []
            self.passes[self.names[k]] = passes

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return _example(self.arrays[self.source_ids[i]][self.row_ids[i]])

    def mix_summary(self) -> dict[str, dict[str, float | int]]:
        """Per source: rows, label tokens per pass (rows * seq_len), weight, target and realised
        share of samples, samples, epochs (samples / rows) and passes (whole or partial)."""
        counts = np.bincount(self.source_ids, minlength=len(self.names))
        return {
            name: {
                "rows": len(rows),
                "tokens": len(rows) * (rows.shape[1] - 1),
                "weight": self.weights[name],
                "target_share": float(self.target_shares[k]),
                "share": float(counts[k] / self.num_samples),
                "samples": int(counts[k]),
                "epochs": float(counts[k] / len(rows)),
                "passes": self.passes[name],
            }
            for k, (name, rows) in enumerate(zip(self.names, self.arrays, strict=True))
        }


class SequenceDataset(Dataset):
    """Plain (unweighted) rows in order: the validation set."""

    def __init__(self, rows: np.ndarray):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return _example(self.rows[i])


def validation_dataset(arrays: Mapping[str, np.ndarray], max_sequences: int | None = None) -> SequenceDataset:
    """Concatenate the per-source validation rows; if capped, keep evenly spaced rows so every
    source stays represented in proportion to its size (the first N would favour the first source)."""
    parts = list(arrays.values())
    total = sum(len(rows) for rows in parts)
    if max_sequences is not None and total > max_sequences:
        # The kept positions of the concatenation, taken from each source before concatenating, so
        # that a memory-mapped source (ShardedRows) only reads the rows that are kept.
        keep = np.linspace(0, total - 1, max_sequences).round().astype(np.int64)
        starts = np.cumsum([0] + [len(rows) for rows in parts])
        bounds = zip(parts, starts[:-1], starts[1:], strict=True)
        parts = [rows[keep[(keep >= lo) & (keep < hi)] - lo] for rows, lo, hi in bounds]
    rows = np.concatenate([np.asarray(p) for p in parts]) if parts else np.zeros((0, 1), dtype=np.int32)
    return SequenceDataset(rows)
