"""Decontamination: find training documents that contain evaluation items.

Each configured field of every item (the question, each choice, ...) is indexed on its own, and
a blank `_` (Winogrande) splits a field into the parts on either side: training text reuses
these pieces in any format (a template writes the question and only the right answer). A piece
becomes its word 13-grams (after `normalize_for_dedup`); a piece shorter than 13 words is matched
on its whole word sequence when it has at least `min_item_words` words (shorter ones are too
generic to match). A document that contains any piece is a hit, reported with the benchmark and
the item, and dropped unless `drop` is off. Items with no piece long enough count as unchecked.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moxin.curate.dedup import ngram_hashes, word_ids
from moxin.curate.normalize import normalize_for_dedup


@dataclass
class BenchmarkSet:
    """One evaluation dataset: hub name (or a local copy under data_dir), splits, text fields."""

    name: str
    path: str
    config: str | None = None  # "*": every configuration of the dataset (MMLU's subjects, MATH's)
    splits: list[str] = field(default_factory=lambda: ["test"])
    fields: list[str] = field(default_factory=lambda: ["question"])  # dotted paths; each list element apart
    exclude_configs: list[str] = field(default_factory=list)  # with config "*": e.g. MMLU's "all"


@dataclass
class DecontamConfig:
    benchmarks: list[BenchmarkSet]
    ngram: int = 13
    min_item_words: int = 8
    drop: bool = True  # False: report hits, keep the documents
    data_dir: str | None = None  # local copies in the evaluation layout (task=eval_data)

    def __post_init__(self) -> None:
        self.benchmarks = [b if isinstance(b, BenchmarkSet) else BenchmarkSet(**b) for b in self.benchmarks]
        if self.ngram < 1 or self.min_item_words < 1:
            raise ValueError(f"ngram and min_item_words must be >= 1, got {self.ngram}, {self.min_item_words}")


def _pieces(record: dict, dotted: str) -> list[str]:
    """The texts of one field: a list's elements apart, each split at blanks ('_')."""
    value: Any = record
    for key in dotted.split("."):
        value = value.get(key) if isinstance(value, dict) else None
    values = value if isinstance(value, list) else [] if value is None else [value]
    return [part for v in values for part in str(v).split("_") if part.strip()]


def benchmark_items(bench: BenchmarkSet, data_dir: str | None = None,
                    load_dataset: Callable | None = None) -> Iterable[tuple[str, list[str]]]:
    """(item id, its text pieces) for every item in the benchmark's splits, from a local copy when there is one."""
    if load_dataset is None:
        from datasets import load_dataset
    path = bench.path
    if data_dir and os.path.isdir(os.path.join(os.path.expanduser(data_dir), bench.path)):
        path = os.path.join(os.path.expanduser(data_dir), bench.path)
    configs = [bench.config]
    if bench.config == "*":
        from datasets import get_dataset_config_names

        configs = [c for c in get_dataset_config_names(path) if c not in bench.exclude_configs]
    for config in configs:
        prefix = f"{config}/" if bench.config == "*" else ""
        for split in bench.splits:
            for i, record in enumerate(load_dataset(path, config, split=split)):
                item_id = record.get("id") or f"{i}"
                yield f"{prefix}{split}/{item_id}", [piece for f in bench.fields for piece in _pieces(record, f)]


class ContaminationIndex:
    """The n-grams of every evaluation item, and the items each came from."""

    def __init__(self, cfg: DecontamConfig, load_dataset: Callable | None = None):
        self.cfg = cfg
        self.owners: dict[int, list[tuple[str, str]]] = defaultdict(list)  # n-gram hash -> (benchmark, item)
        self.short_lengths: set[int] = set()  # word counts of items matched whole
        self.items: dict[str, int] = defaultdict(int)
        self.unchecked: dict[str, int] = defaultdict(int)
        for bench in cfg.benchmarks:
            for item_id, pieces in benchmark_items(bench, cfg.data_dir, load_dataset):
                self.add(bench.name, item_id, *pieces)
        self._keys = np.array(sorted(self.owners), dtype=np.uint64)

    def add(self, benchmark: str, item_id: str, *pieces: str) -> None:
        indexed = False
        for piece in pieces:
            words = normalize_for_dedup(piece).split()
            if len(words) < self.cfg.min_item_words:
                continue
            indexed = True
            n = min(self.cfg.ngram, len(words))
            if n < self.cfg.ngram:
                self.short_lengths.add(n)
            for h in ngram_hashes(word_ids(words), n).tolist():
                self.owners[h].append((benchmark, item_id))
        if indexed:
            self.items[benchmark] += 1
            self._keys = None
        else:
            self.unchecked[benchmark] += 1

    def hits(self, text: str) -> list[tuple[str, str]]:
        """(benchmark, item id) of every evaluation item the text contains an n-gram of."""
        if self._keys is None:
            self._keys = np.array(sorted(self.owners), dtype=np.uint64)
        if not len(self._keys):
            return []
        ids = word_ids(normalize_for_dedup(text).split())
        if len(ids) == 0:
            return []
        grams = [ngram_hashes(ids, self.cfg.ngram)] if len(ids) >= self.cfg.ngram else []
        grams += [ngram_hashes(ids, n) for n in self.short_lengths if n <= len(ids)]
        found = np.concatenate(grams) if grams else np.zeros(0, np.uint64)
        matched = found[np.isin(found, self._keys)]
        return sorted({owner for h in matched.tolist() for owner in self.owners[h]})
