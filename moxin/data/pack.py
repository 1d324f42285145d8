"""Tokenise documents and pack them into fixed-length rows for causal-LM pretraining.

Each document becomes `[bos] + ids + [eos]`; documents are concatenated and cut into rows of
`seq_len + 1` tokens, so a row gives `seq_len` inputs and the same tokens shifted by one as
labels. The incomplete tail is dropped and counted. Validation is held out by document, by a
stable hash of its text, so the split does not depend on reading order or on the Python process.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import islice

import numpy as np


@dataclass
class PackedSplit:
    """One split of one source: rows (n, seq_len + 1) int32 and what went into them."""

    rows: np.ndarray
    documents: int = 0
    tokens: int = 0  # all document tokens, bos and eos included
    dropped_tokens: int = 0  # the incomplete tail that did not fill a row


def is_validation(text: str, val_fraction: float) -> bool:
    """True when the document belongs to validation: its blake2b hash, read as a number in [0, 1),
    falls below `val_fraction` (Python's hash() is salted per process, so it would not be stable)."""
    if val_fraction <= 0:
        return False
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < val_fraction


def pack_tokens(chunks: list[np.ndarray], seq_len: int) -> tuple[np.ndarray, int]:
    """Concatenate token chunks and cut them into (n, seq_len + 1) rows; return rows and dropped tail."""
    stream = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int32)
    width = seq_len + 1
    n_rows = len(stream) // width
    rows = stream[: n_rows * width].reshape(n_rows, width)  # a view: the tail kept alive is < one row
    return rows, len(stream) - n_rows * width


def pack_documents(
    documents: Iterable[str],
    tokenizer,
    seq_len: int,
    val_fraction: float = 0.0,
    *,
    batch_size: int = 256,
    progress: bool = False,
    description: str = "packing",
    total: int | None = None,
) -> tuple[PackedSplit, PackedSplit]:
    """Tokenise `documents` in batches and pack them; return the (train, val) splits.

    `total` (documents expected, when known) only sizes the progress bar.
    """
    prefix = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    suffix = [tokenizer.eos_token_id]
    chunks: dict[str, list[np.ndarray]] = {"train": [], "val": []}
    counts = {"train": [0, 0], "val": [0, 0]}  # documents, tokens
    with _progress_bar(progress, description, total) as advance:
        for batch in _batches(documents, batch_size):
            ids = tokenizer(batch, add_special_tokens=False)["input_ids"]
            batch_tokens: dict[str, list[int]] = {"train": [], "val": []}
            for text, doc_ids in zip(batch, ids, strict=True):
                split = "val" if is_validation(text, val_fraction) else "train"
                batch_tokens[split] += prefix + doc_ids + suffix
                counts[split][0] += 1
            for split, tokens in batch_tokens.items():
                if tokens:
                    chunks[split].append(np.asarray(tokens, dtype=np.int32))
                    counts[split][1] += len(tokens)
            advance(len(batch))
    splits = []
    for split in ("train", "val"):
        rows, dropped = pack_tokens(chunks[split], seq_len)
        splits.append(PackedSplit(rows, counts[split][0], counts[split][1], dropped))
    return splits[0], splits[1]


def _batches(items: Iterable[str], size: int) -> Iterator[list[str]]:
    it = iter(items)
    while batch := list(islice(it, size)):
        yield batch


@contextmanager
def _progress_bar(enabled: bool, description: str, total: int | None) -> Iterator[Callable[[int], None]]:
    """Yield an `advance(n_documents)` function driving a rich progress bar, or a no-op."""
    if not enabled:
        yield lambda n: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("docs"))
    with Progress(*columns, TimeElapsedColumn()) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)
