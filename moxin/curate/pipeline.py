"""The curation pipeline: sources -> normalise -> filter -> exact dedup -> near dedup ->
decontaminate -> split -> tokenise -> token shards + manifest (+ report).

Documents are held in memory between stages (dedup compares every document with every other);
a corpus larger than memory is curated in parts, one mix per part (see moxin/curate/dedup.py for
the memory per million documents). Every document that leaves is counted with its stage and
reason, per source, in the manifest, with its documents, characters and tokens after every stage.
Shards are written atomically and a re-run with the same configuration writes only the shards
that are not complete yet.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from moxin.curate.decontam import ContaminationIndex, DecontamConfig
from moxin.curate.dedup import NearDedupConfig, exact_duplicates, near_duplicates
from moxin.curate.filters import CodeFilterConfig, ProseFilterConfig, QualityFilter
from moxin.curate.normalize import normalize_document
from moxin.curate.shards import ShardWriter, write_manifest
from moxin.data.datamodule import DataConfig
from moxin.data.pack import is_validation
from moxin.data.sources import LOCAL_KINDS, SourceStats, iter_documents, list_files, source_fingerprint

MANIFEST_FORMAT = 1
STAGES = ("read", "filter", "exact_dedup", "near_dedup", "decontaminate", "budget")


@dataclass
class CurationConfig:
    out_dir: str
    prose_filters: ProseFilterConfig = field(default_factory=ProseFilterConfig)
    code_filters: CodeFilterConfig = field(default_factory=CodeFilterConfig)
    exact_dedup: bool = True
    prose_dedup: NearDedupConfig | None = field(default_factory=NearDedupConfig)
    code_dedup: NearDedupConfig | None = field(
        default_factory=lambda: NearDedupConfig(unit="word", ngram=5, num_perm=256, bands=32, rows=8, threshold=0.85))
    decontamination: DecontamConfig | None = None
    documents_per_shard: int = 10_000
    report_clusters: int = 10  # largest duplicate clusters shown in the report
    progress: bool = True

    def __post_init__(self) -> None:
        self.prose_filters = _as(ProseFilterConfig, self.prose_filters)
        self.code_filters = _as(CodeFilterConfig, self.code_filters)
        self.prose_dedup = _as(NearDedupConfig, self.prose_dedup)
        self.code_dedup = _as(NearDedupConfig, self.code_dedup)
        self.decontamination = _as(DecontamConfig, self.decontamination)
        if self.documents_per_shard < 1:
            raise ValueError(f"documents_per_shard must be >= 1, got {self.documents_per_shard}")


def _as(cls, value):
    return cls(**value) if isinstance(value, dict) else value


@dataclass
class Document:
    source: str
    index: int  # position among the source's documents as read
    text: str
    tokens: np.ndarray | None = None  # token ids (no BOS/EOS), from the read stage on


@dataclass
class SourceReport:
    """What happened to one source's documents: counts per stage, reasons, characters, tokens."""

    documents: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STAGES, 0))  # left after each stage
    characters: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STAGES, 0))
    tokens: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STAGES, 0))  # without BOS/EOS
    removed: dict[str, dict[str, int]] = field(default_factory=dict)  # stage -> reason -> documents
    read_skipped: dict[str, int] = field(default_factory=dict)  # malformed records, by reason
    streams: dict[str, Any] = field(default_factory=dict)  # split -> documents, tokens, shards

    def passed(self, stage: str, docs: list[Document]) -> None:
        self.documents[stage] = len(docs)
        self.characters[stage] = sum(len(d.text) for d in docs)
        self.tokens[stage] = sum(len(d.tokens) for d in docs)


def curate(data: DataConfig, cfg: CurationConfig, tokenizer, load_dataset: Callable | None = None,
           log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the pipeline for the mix `data` and return the manifest (also written to out_dir)."""
    started = time.time()
    _check_paths(data)  # before any work: a wrong path fails now, naming itself
    _claim_out_dir(cfg.out_dir, config_hash(data, cfg))
    reports = {s.name: SourceReport() for s in data.sources}
    profile = {s.name: s.profile for s in data.sources}

    docs = _read(data, tokenizer, reports, cfg.progress, too_long_from(data, cfg))
    docs = _filter(docs, cfg, profile, reports)
    clusters: list[dict[str, Any]] = []
    if cfg.exact_dedup:
        docs = _drop(docs, exact_duplicates([d.text for d in docs]), "exact_dedup", "duplicate", reports)
    else:
        _passed_all(docs, "exact_dedup", reports)
    docs, clusters = _near_dedup(docs, cfg, profile, reports, log)
    docs, contamination = _decontaminate(docs, cfg, reports, load_dataset, log)
    streams = _split_and_budget(docs, data, reports)
    _write_shards(streams, data, cfg, tokenizer, reports, log)

    manifest = {
        "format": MANIFEST_FORMAT,
        "tokenizer": data.tokenizer,
        "vocab_size": len(tokenizer),
        "config_hash": config_hash(data, cfg),
        "config": {"data": _plain(data), "curation": _plain(cfg)},
        "sources": {name: _plain(report) for name, report in reports.items()},
        "duplicate_clusters": clusters[: cfg.report_clusters],
        "duplicate_cluster_count": len(clusters),
        "contamination": contamination,
        "seconds": round(time.time() - started, 1),
    }
    write_manifest(cfg.out_dir, manifest)
    return manifest


# Settings that do not change the shards' content: left out of the hash, so that an interrupted
# curation resumes under another context length, worker count or progress setting.
_NOT_CONTENT = {"data": ("seq_len", "micro_batch_size", "num_workers", "cache_dir", "progress", "shards_dir", "seed",
                         "num_samples", "val_max_sequences", "tiny_sources", "warning"),
                "curation": ("out_dir", "progress", "report_clusters")}
_NOT_CONTENT_DEDUP = ("workers", "chunk_size")


def config_hash(data: DataConfig, cfg: CurationConfig) -> str:
    """What decides the shards' content: the sources (and their files' sizes and times), the
    tokenizer, the split and every curation setting that changes what is kept."""
    decisive = {"data": {k: v for k, v in _plain(data).items() if k not in _NOT_CONTENT["data"]},
                "curation": {k: v for k, v in _plain(cfg).items() if k not in _NOT_CONTENT["curation"]},
                "files": [source_fingerprint(s) for s in data.sources]}
    for key in ("prose_dedup", "code_dedup"):
        if decisive["curation"].get(key):
            decisive["curation"][key] = {k: v for k, v in decisive["curation"][key].items()
                                         if k not in _NOT_CONTENT_DEDUP}
    return hashlib.sha256(json.dumps(decisive, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _claim_out_dir(out_dir: str, digest: str) -> None:
    """Shards in out_dir are resumed only by a run of the same configuration."""
    os.makedirs(out_dir, exist_ok=True)
    claim = os.path.join(out_dir, "config_hash")
    if os.path.exists(claim):
        with open(claim) as f:
            found = f.read().strip()
        if found != digest:
            raise ValueError(f"{out_dir} holds shards of another configuration or of source files that have "
                             f"changed since (hash {found}, this run {digest}); choose another curation.out_dir "
                             "or delete that folder")
        return
    if os.listdir(out_dir):
        raise ValueError(f"{out_dir} is not empty and was not written by a curation run; choose another "
                         "curation.out_dir")
    with open(claim, "w") as f:
        f.write(digest)


def _plain(obj) -> Any:
    return json.loads(json.dumps(asdict(obj) if hasattr(obj, "__dataclass_fields__") else obj, default=str))


def _check_paths(data: DataConfig) -> None:
    for source in data.sources:
        if source.kind in LOCAL_KINDS:
            list_files(source)  # raises FileNotFoundError naming the source and the path


def too_long_from(data: DataConfig, cfg: CurationConfig) -> dict[str, int | None]:
    """Per source, the length in characters past which its quality filter removes a document as
    too_long (None: no such rule applies, as for qa sources or with too_long disabled)."""
    limits = {}
    for source in data.sources:
        rules = {"prose": cfg.prose_filters, "code": cfg.code_filters}.get(source.profile)
        limits[source.name] = None if rules is None or "too_long" in rules.disabled else rules.max_chars
    return limits


def _read(data: DataConfig, tokenizer, reports: dict[str, SourceReport], progress: bool,
          too_long: dict[str, int | None]) -> list[Document]:
    """Every source's documents, normalised and tokenised (so every stage can count its tokens).
    A document that the filter stage will remove as too_long (a dump of many megabytes) is not
    tokenised: the read stage's token count leaves it out, its characters are counted."""
    from tqdm import tqdm

    dtype = np.uint16 if len(tokenizer) <= 2**16 else np.uint32
    docs = []
    for source in data.sources:
        stats = SourceStats()
        texts = tqdm(iter_documents(source, stats), desc=f"read {source.name}", unit=" docs", disable=not progress)
        mine = [Document(source.name, i, normalize_document(text)) for i, text in enumerate(texts)]
        limit = too_long[source.name]
        pending = []
        for doc in mine:
            if limit is not None and len(doc.text) > limit:
                doc.tokens = np.zeros(0, dtype=dtype)  # the filter drops it: not worth tokenising
            else:
                pending.append(doc)
        for start in tqdm(range(0, len(pending), 256), desc=f"tokenise {source.name}", disable=not progress):
            batch = pending[start:start + 256]
            for doc, ids in zip(batch, tokenizer([d.text for d in batch], add_special_tokens=False)["input_ids"],
                                strict=True):
                doc.tokens = np.asarray(ids, dtype=dtype)
        reports[source.name].read_skipped = {k: v for k, v in stats.skipped.items() if v}
        reports[source.name].passed("read", mine)
        docs += mine
    return docs


def _filter(docs: list[Document], cfg: CurationConfig, profile: dict[str, str],
            reports: dict[str, SourceReport]) -> list[Document]:
    filters = {"prose": QualityFilter(cfg.prose_filters), "code": QualityFilter(cfg.code_filters)}
    kept = []
    for doc in docs:
        rules = filters.get(profile[doc.source])  # qa items (benchmark training splits) are short by nature
        reason = rules.reason(doc.text) if rules is not None else None
        if reason is None:
            kept.append(doc)
        else:
            removed = reports[doc.source].removed.setdefault("filter", {})
            removed[reason] = removed.get(reason, 0) + 1
    _passed_all(kept, "filter", reports)
    return kept


def _passed_all(docs: list[Document], stage: str, reports: dict[str, SourceReport]) -> None:
    by_source = defaultdict(list)
    for doc in docs:
        by_source[doc.source].append(doc)
    for name, report in reports.items():
        report.passed(stage, by_source.get(name, []))


def _drop(docs: list[Document], removed: dict[int, int], stage: str, reason: str,
          reports: dict[str, SourceReport]) -> list[Document]:
    for i in removed:
        counts = reports[docs[i].source].removed.setdefault(stage, {})
        counts[reason] = counts.get(reason, 0) + 1
    kept = [d for i, d in enumerate(docs) if i not in removed]
    _passed_all(kept, stage, reports)
    return kept


def _near_dedup(docs, cfg: CurationConfig, profile, reports, log) -> tuple[list[Document], list[dict[str, Any]]]:
    """Near dedup within each profile (prose with prose, code with code), across sources."""
    from tqdm import tqdm

    removed: dict[int, int] = {}
    clusters: list[dict[str, Any]] = []
    for name, settings in (("prose", cfg.prose_dedup), ("code", cfg.code_dedup)):
        members = [i for i, d in enumerate(docs) if profile[d.source] == name]
        if settings is None or len(members) < 2:
            continue
        with tqdm(total=len(members), desc=f"near dedup ({name})", unit=" docs", disable=not cfg.progress) as bar:
            local_removed, local_clusters = near_duplicates([docs[i].text for i in members], settings, bar.update)
        removed.update({members[r]: members[k] for r, k in local_removed.items()})
        for cluster in local_clusters:
            kept = docs[members[cluster[0]]]
            clusters.append({
                "size": len(cluster), "profile": name,
                "kept": {"source": kept.source, "index": kept.index, "excerpt": _excerpt(kept.text)},
                "removed": [{"source": docs[members[m]].source, "index": docs[members[m]].index,
                             "excerpt": _excerpt(docs[members[m]].text)} for m in cluster[1:6]],
            })
    clusters.sort(key=lambda c: -c["size"])
    return _drop(docs, removed, "near_dedup", "near_duplicate", reports), clusters


def _excerpt(text: str, chars: int = 120) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= chars else flat[:chars] + "..."


def _decontaminate(docs, cfg: CurationConfig, reports, load_dataset, log) -> tuple[list[Document], list[dict]]:
    if cfg.decontamination is None or not cfg.decontamination.benchmarks:
        _passed_all(docs, "decontaminate", reports)
        return docs, []
    index = ContaminationIndex(cfg.decontamination, load_dataset)
    log(f"decontamination: {sum(index.items.values())} evaluation items indexed "
        f"({sum(index.unchecked.values())} too short to check)")
    from tqdm import tqdm

    hits, contaminated = [], {}
    for i, doc in enumerate(tqdm(docs, desc="decontaminate", unit=" docs", disable=not cfg.progress)):
        found = index.hits(doc.text)
        if found:
            contaminated[i] = i
            hits.append({"source": doc.source, "index": doc.index, "excerpt": _excerpt(doc.text),
                         "items": [{"benchmark": b, "item": item} for b, item in found[:20]],
                         "benchmarks": dict(Counter(b for b, _ in found))})
    if not cfg.decontamination.drop:
        _passed_all(docs, "decontaminate", reports)
        return docs, hits
    return _drop(docs, contaminated, "decontaminate", "contaminated", reports), hits


def _split_and_budget(docs: list[Document], data: DataConfig,
                      reports: dict[str, SourceReport]) -> dict[str, list[Document]]:
    """Per source: validation by a stable hash of the text, then the source's weighted share of
    the token budget from the training documents, in order."""
    total_weight = sum(s.weight for s in data.sources)
    streams: dict[str, list[Document]] = {}
    for source in data.sources:
        mine = [d for d in docs if d.source == source.name]
        val = [d for d in mine if is_validation(d.text, data.val_fraction)]
        train = [d for d in mine if not is_validation(d.text, data.val_fraction)]
        budget = data.token_budget
        if budget:
            limit, used, kept = budget * source.weight / total_weight, 0.0, []
            for doc in train:
                if used >= limit:
                    break
                kept.append(doc)
                used += len(doc.tokens) + 2  # BOS and EOS
            if len(kept) < len(train):
                reports[source.name].removed["budget"] = {"over_budget": len(train) - len(kept)}
            train = kept
        reports[source.name].passed("budget", train + val)
        streams[f"{source.name}.train"], streams[f"{source.name}.val"] = train, val
    return streams


def _write_shards(streams, data: DataConfig, cfg: CurationConfig, tokenizer, reports, log) -> None:
    """Each stream's documents as [BOS] ids [EOS], in shards; finished shards are left as they are."""
    from tqdm import tqdm

    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    eos = [tokenizer.eos_token_id]
    for stream, docs in streams.items():
        source, split = stream.rsplit(".", 1)
        if not docs:
            reports[source].streams[split] = {"documents": 0, "tokens": 0, "shards": 0}
            continue
        with ShardWriter(cfg.out_dir, stream, len(tokenizer), cfg.documents_per_shard) as writer:
            todo = [i for i in range(len(docs)) if not writer.is_complete(writer.shard_of(i))]
            for i in tqdm(todo, desc=f"write {stream}", unit=" docs", disable=not cfg.progress):
                writer.add(i, np.concatenate([bos, docs[i].tokens, eos]).astype(docs[i].tokens.dtype))
            shards = writer.close()
        if len(todo) < len(docs):
            log(f"{stream}: {len(docs) - len(todo)} documents in finished shards, not written again")
        reports[source].streams[split] = {"documents": len(docs), "tokens": sum(s["tokens"] for s in shards),
                                          "shards": len(shards)}
