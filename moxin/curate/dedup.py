"""Exact and near duplicate removal.

Exact: documents with the same content hash; the first one is kept.

Near (MinHash + LSH with datasketch): each document becomes the set of its n-grams (of
characters or words, after `normalize_for_dedup`); `MinHash.bulk` turns the sets into signatures
in worker processes; an LSH index with `bands` x `rows` (inserted in one insertion session)
proposes candidate pairs; a candidate pair is confirmed (`verify`: the exact Jaccard similarity
of the two n-gram sets, or the signatures' estimate, reaches the threshold); confirmed pairs are
merged into clusters (union-find) and each cluster keeps exactly one document, its earliest.

Banding. LSH finds a pair of similarity s with probability 1 - (1 - s^rows)^bands. SlimPajama's
9 bands x 13 rows finds a pair at s = 0.8 with probability 0.40 (0.93 at 0.9): it drops mainly
very close duplicates. The default here, 16 x 8 with exact verification, finds 95% of pairs at
0.8 and confirms each against the threshold, so what goes is what the threshold says.
`bands=9 rows=13 verify=none` reproduces SlimPajama's behaviour exactly.

Memory: a signature is num_perm 8-byte values (1 KiB at 128 permutations); the LSH index keeps
the band keys, about as much again: ~2-3 GiB per million documents at 128 permutations, beside
the documents themselves. Larger corpora are deduplicated shard by shard, or through
datasketch's Redis/Cassandra storage backends (MinHashLSH storage_config).
"""

from __future__ import annotations

import hashlib
import os
import zlib
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np

from moxin.curate.normalize import normalize_for_dedup

SCHEME = "affine32"  # datasketch 2's default permutation scheme, named so signatures stay comparable
SIGNATURE_DTYPE = np.uint32  # the hash values of the affine32 scheme


@dataclass
class NearDedupConfig:
    ngram: int = 13
    unit: str = "char"  # char: character n-grams (SlimPajama); word: word n-grams (code: BigCode's tokens)
    num_perm: int = 128
    bands: int = 16  # SlimPajama: 9 x 13 (finds only ~40% of pairs at Jaccard 0.8; see module docstring)
    rows: int = 8
    threshold: float = 0.8
    verify: str = "exact"  # exact | minhash | none: how a candidate pair is confirmed before merging
    seed: int = 1
    workers: int = 0  # processes for signatures; 0: all cores
    chunk_size: int = 512  # documents per worker task

    def __post_init__(self) -> None:
        if self.verify not in ("exact", "minhash", "none"):
            raise ValueError(f"near dedup verify must be exact, minhash or none, got {self.verify!r}")
        if self.unit not in ("char", "word"):
            raise ValueError(f"near dedup unit must be 'char' or 'word', got {self.unit!r}")
        if self.bands * self.rows > self.num_perm:
            raise ValueError(f"bands x rows = {self.bands * self.rows} exceeds num_perm {self.num_perm}")
        if not 0 < self.threshold <= 1:
            raise ValueError(f"near dedup threshold must be in (0, 1], got {self.threshold}")
        for name in ("ngram", "num_perm", "bands", "rows", "chunk_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"near dedup {name} must be >= 1, got {getattr(self, name)}")


def content_hash(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def exact_duplicates(texts: Sequence[str]) -> dict[int, int]:
    """{index of a duplicate: index of the earlier document it repeats}."""
    first: dict[bytes, int] = {}
    duplicates = {}
    for i, text in enumerate(texts):
        duplicates_of = first.setdefault(content_hash(text), i)
        if duplicates_of != i:
            duplicates[i] = duplicates_of
    return duplicates


def shingles(text: str, cfg: NearDedupConfig) -> set[bytes]:
    """The document's n-grams after dedup normalisation, as bytes (a short document is one n-gram).
    The readable definition: the pipeline hashes the same n-grams with `shingle_hashes`."""
    normalized = normalize_for_dedup(text)
    units: Sequence[str] = normalized if cfg.unit == "char" else normalized.split()
    join = "".join if cfg.unit == "char" else " ".join
    n = cfg.ngram
    if len(units) <= n:
        return {join(units).encode("utf-8")}
    return {join(units[i:i + n]).encode("utf-8") for i in range(len(units) - n + 1)}


_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit constant (golden ratio): polynomial base


def ngram_hashes(units: np.ndarray, n: int) -> np.ndarray:
    """Distinct 64-bit hashes of every window of n consecutive units (uint64 ids of characters or
    words): a polynomial hash of the window, then mixed. Fewer than n units make one window."""
    if len(units) == 0:
        units = np.zeros(1, dtype=np.uint64)
    n = min(n, len(units))
    powers = _MULTIPLIER ** np.arange(n - 1, -1, -1, dtype=np.uint64)  # wraps mod 2^64, as intended
    with np.errstate(over="ignore"):
        h = (np.lib.stride_tricks.sliding_window_view(units, n) * powers).sum(axis=1, dtype=np.uint64)
        h ^= h >> np.uint64(31)
        h *= _MULTIPLIER
        h ^= h >> np.uint64(29)
    return np.unique(h)


def word_ids(words: Sequence[str]) -> np.ndarray:
    """A stable 32-bit id per word (crc32: the same in every process, unlike hash())."""
    return np.array([zlib.crc32(w.encode("utf-8")) for w in words], dtype=np.uint64)


def shingle_hashes(text: str, cfg: NearDedupConfig) -> np.ndarray:
    """Distinct 32-bit hashes of the document's n-grams (those of `shingles`), computed in numpy."""
    normalized = normalize_for_dedup(text)
    if cfg.unit == "char":
        units = np.frombuffer(normalized.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    else:
        units = word_ids(normalized.split())
    return np.unique(ngram_hashes(units, cfg.ngram) & np.uint64(0xFFFFFFFF))


def _signature_chunk(args: tuple[list[str], NearDedupConfig]) -> np.ndarray:
    from datasketch import MinHash

    texts, cfg = args
    # The n-grams arrive already hashed to 32-bit integers: datasketch's hash function is then `int`.
    minhashes = MinHash.bulk((shingle_hashes(t, cfg).tolist() for t in texts), num_perm=cfg.num_perm, seed=cfg.seed,
                             scheme=SCHEME, hashfunc=int)
    return np.stack([m.hashvalues for m in minhashes]) if minhashes else np.zeros((0, cfg.num_perm), SIGNATURE_DTYPE)


def signatures(texts: Sequence[str], cfg: NearDedupConfig, progress=None) -> np.ndarray:
    """(documents, num_perm) MinHash signatures, computed on all cores."""
    chunks = [(list(texts[i:i + cfg.chunk_size]), cfg) for i in range(0, len(texts), cfg.chunk_size)]
    workers = cfg.workers or os.cpu_count() or 1
    if workers == 1 or len(chunks) <= 1:
        parts = []
        for chunk in chunks:
            parts.append(_signature_chunk(chunk))
            if progress is not None:
                progress(len(parts[-1]))
    else:
        with ProcessPoolExecutor(max_workers=min(workers, len(chunks))) as pool:
            parts = []
            for part in pool.map(_signature_chunk, chunks):
                parts.append(part)
                if progress is not None:
                    progress(len(part))
    return np.concatenate(parts) if parts else np.zeros((0, cfg.num_perm), SIGNATURE_DTYPE)


class UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, i: int, j: int) -> None:
        a, b = self.find(i), self.find(j)
        if a != b:
            self.parent[max(a, b)] = min(a, b)  # the root is the earliest document: deterministic keep


def candidate_pairs(sigs: np.ndarray, cfg: NearDedupConfig) -> list[tuple[int, int]]:
    """Pairs (i < j) that share at least one LSH band."""
    from datasketch import LeanMinHash, MinHashLSH

    lsh = MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm, params=(cfg.bands, cfg.rows))
    lean = [LeanMinHash(seed=cfg.seed, hashvalues=hv, scheme=SCHEME) for hv in sigs]
    with lsh.insertion_session() as session:
        for i, minhash in enumerate(lean):
            session.insert(i, minhash, check_duplication=False)
    return [(i, j) for i, minhash in enumerate(lean) for j in sorted(lsh.query(minhash)) if j > i]


def confirmed(pairs: list[tuple[int, int]], texts: Sequence[str], sigs: np.ndarray,
              cfg: NearDedupConfig) -> list[tuple[int, int]]:
    """The candidate pairs whose similarity (exact, or estimated from signatures) reaches the threshold."""
    if cfg.verify == "none":
        return pairs
    if cfg.verify == "minhash":
        return [(i, j) for i, j in pairs if np.mean(sigs[i] == sigs[j]) >= cfg.threshold]
    grams: dict[int, np.ndarray] = {}
    kept = []
    for i, j in pairs:
        for k in (i, j):
            if k not in grams:
                grams[k] = shingle_hashes(texts[k], cfg)
        shared = len(np.intersect1d(grams[i], grams[j], assume_unique=True))
        if shared / (len(grams[i]) + len(grams[j]) - shared) >= cfg.threshold:
            kept.append((i, j))
    return kept


def clusters_of(n: int, pairs: list[tuple[int, int]]) -> list[list[int]]:
    """Connected components of two or more documents (sorted members, largest first)."""
    groups = UnionFind(n)
    for i, j in pairs:
        groups.union(i, j)
    members: dict[int, list[int]] = {}
    for i in range(n):
        members.setdefault(groups.find(i), []).append(i)
    return sorted((c for c in members.values() if len(c) > 1), key=lambda c: (-len(c), c[0]))


def near_duplicates(texts: Sequence[str], cfg: NearDedupConfig, progress=None) -> tuple[dict[int, int], list]:
    """({removed index: the kept index of its cluster}, clusters). Each cluster keeps its earliest document."""
    sigs = signatures(texts, cfg, progress)
    clusters = clusters_of(len(texts), confirmed(candidate_pairs(sigs, cfg), texts, sigs, cfg))
    removed = {member: cluster[0] for cluster in clusters for member in cluster[1:]}
    return removed, clusters
