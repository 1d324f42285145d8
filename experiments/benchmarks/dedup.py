"""Near-dedup speed and accuracy: moxin's pipeline vs a straightforward datasketch loop.

One process, one generated corpus: random-word documents (a fixed vocabulary of made-up words,
250-450 words each) of which some are planted near-duplicates: a copy of an earlier document
with a fraction of its words replaced, spread so that their exact Jaccard similarity (over the
SlimPajama shingles: character 13-grams of the normalised text) covers 0.5-1.0.

- ours: `moxin.curate.dedup.near_duplicates` with its defaults (SlimPajama's shingles, 128
  permutations and threshold 0.8; LSH 16 bands x 8 rows; candidates confirmed by exact
  Jaccard): n-gram hashing in numpy and MinHash.bulk in worker processes on all cores, one LSH
  insertion session, union-find clusters.
- baseline: one MinHash per document, `update` per shingle, MinHashLSH insert then query, one
  process, the same banding, candidates merged unconfirmed.

Accuracy against exact Jaccard (over the shingle sets): true pairs have Jaccard >= 0.8 (every
pair inside a planted group of copies is checked, and every pair a method merged). Precision:
share of the pairs a method merged that are true; recall: share of true pairs whose two
documents end in one cluster (one of them removed). With exact confirmation every merged pair
is true by construction, so the line also gives the share of removed documents that reach their
cluster's kept document only through a chain (similarity to it below 0.8). Also reported for
SlimPajama's exact settings (9 x 13, unconfirmed). Prints one JSON line last.

    python experiments/benchmarks/dedup.py [--documents 20000] [--planted 0.2]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import time
from itertools import combinations

from moxin.curate.dedup import (
    SCHEME,
    NearDedupConfig,
    UnionFind,
    candidate_pairs,
    clusters_of,
    confirmed,
    shingles,
    signatures,
)


def make_corpus(n_docs: int, planted_share: float, seed: int = 0) -> tuple[list[str], list[tuple[int, int]]]:
    """Documents and the (original, copy) pairs planted among them."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocabulary = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 9))) for _ in range(20_000)]
    docs: list[str] = []
    planted = []
    while len(docs) < n_docs:
        if docs and rng.random() < planted_share:
            original = rng.randrange(len(docs))
            words = docs[original].split()
            for k in rng.sample(range(len(words)), int(len(words) * rng.uniform(0.0, 0.06))):
                words[k] = rng.choice(vocabulary)
            planted.append((original, len(docs)))
            docs.append(" ".join(words))
        else:
            docs.append(" ".join(rng.choice(vocabulary) for _ in range(rng.randint(250, 450))))
    return docs, planted


def baseline_clusters(docs: list[str], cfg: NearDedupConfig) -> list[tuple[int, int]]:
    """The straightforward loop; returns the pairs it merges."""
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm, params=(cfg.bands, cfg.rows))
    merged = []
    for i, doc in enumerate(docs):
        minhash = MinHash(num_perm=cfg.num_perm, seed=cfg.seed, scheme=SCHEME)
        for shingle in shingles(doc, cfg):
            minhash.update(shingle)
        merged += [(j, i) for j in lsh.query(minhash)]
        lsh.insert(i, minhash)
    return merged


def ours(docs: list[str], cfg: NearDedupConfig) -> list[tuple[int, int]]:
    """moxin's near dedup (as near_duplicates runs it); returns the pairs it merges."""
    sigs = signatures(docs, cfg)
    return confirmed(candidate_pairs(sigs, cfg), docs, sigs, cfg)


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=20_000)
    parser.add_argument("--planted", type=float, default=0.2, help="share of documents that are planted copies")
    parser.add_argument("--baseline-documents", type=int, default=None,
                        help="time the baseline on the first N documents only (docs/s is per document)")
    args = parser.parse_args()

    cfg = NearDedupConfig()
    docs, planted = make_corpus(args.documents, args.planted)

    start = time.perf_counter()
    merged = ours(docs, cfg)
    clusters_of(len(docs), merged)
    ours_rate = len(docs) / (time.perf_counter() - start)

    subset = docs[: args.baseline_documents or len(docs)]
    start = time.perf_counter()
    baseline_clusters(subset, cfg)
    baseline_rate = len(subset) / (time.perf_counter() - start)

    shingle_sets: dict[int, set] = {}

    def similarity(i: int, j: int) -> float:
        for k in (i, j):
            if k not in shingle_sets:
                shingle_sets[k] = shingles(docs[k], cfg)
        return jaccard(shingle_sets[i], shingle_sets[j])

    planted_groups = clusters_of(len(docs), planted)  # copies of copies: every pair inside is checked
    checked = {p for group in planted_groups for p in combinations(group, 2)}

    def accuracy(pairs: list[tuple[int, int]]) -> tuple[float, float]:
        pairs = {tuple(sorted(p)) for p in pairs}
        truth = {p for p in checked | pairs if similarity(*p) >= cfg.threshold}
        together = UnionFind(len(docs))
        for i, j in pairs:
            together.union(i, j)
        precision = sum(p in truth for p in pairs) / len(pairs) if pairs else 1.0
        recall = sum(together.find(i) == together.find(j) for i, j in truth) / len(truth) if truth else 1.0
        return round(precision, 4), round(recall, 4)

    precision, recall = accuracy(merged)
    # Clusters are connected components: a removed document may reach its cluster's kept document
    # only through others. The share of removed documents less similar than 0.8 to the kept one:
    clusters = clusters_of(len(docs), merged)
    removed = [(member, cluster[0]) for cluster in clusters for member in cluster[1:]]
    chained = sum(similarity(m, k) < cfg.threshold for m, k in removed) / len(removed) if removed else 0.0
    recipe = dataclasses.replace(cfg, bands=9, rows=13, verify="none")
    recipe_precision, recipe_recall = accuracy(ours(docs, recipe))
    print(json.dumps({
        "bench": "dedup", "ours": round(ours_rate, 1), "baseline": round(baseline_rate, 1),
        "ratio": round(ours_rate / baseline_rate, 2), "unit": "docs/s", "precision": precision, "recall": recall,
        "documents": len(docs), "planted_pairs": len(planted), "baseline_documents": len(subset),
        "removed_below_threshold_to_kept": round(chained, 4),
        "slimpajama_9x13_precision": recipe_precision, "slimpajama_9x13_recall": recipe_recall,
    }))


if __name__ == "__main__":
    main()
