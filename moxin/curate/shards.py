"""Token shards: what the curation pipeline writes and pretraining reads.

A stream ("slimpajama.train") is a folder of shards. Shard k holds documents k*D .. (k+1)*D - 1
of the stream as one flat little-endian token array (`shard-00000.bin`, uint16 when the vocabulary
fits, else uint32) and a sidecar (`shard-00000.json`) saying what is in it. The sidecar is renamed
into place last, so it marks the shard complete: a killed run leaves at most a .bin without a
sidecar, or temporary files, and a rerun rewrites exactly the shards that are not complete.

Training reads a stream through `ShardedRows`, a memory-mapped (rows, seq_len + 1) view that the
weighted mix uses like an in-memory array of packed rows.
"""

from __future__ import annotations

import hashlib
import json
import operator
import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

MANIFEST = "manifest.json"
TMP_SUFFIX = ".tmp"  # temporary files end with this; a new writer removes any it finds
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}  # little-endian on every machine
SIDECAR_KEYS = ("stream", "shard", "documents", "tokens", "dtype", "sha256", "first_doc")
_SIDECAR_NAME = re.compile(r"shard-(\d+)\.json")


def token_dtype(vocab_size: int) -> str:
    """The narrowest stored dtype for token ids below `vocab_size`."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    if vocab_size > 2**32:
        raise ValueError(f"vocab_size {vocab_size} does not fit uint32 token ids")
    return "uint16" if vocab_size <= 2**16 else "uint32"


def shard_paths(folder: str, shard: int) -> tuple[str, str]:
    """(.bin, .json) paths of shard number `shard` in a stream folder."""
    stem = os.path.join(folder, f"shard-{shard:05d}")
    return f"{stem}.bin", f"{stem}.json"


class ShardWriter:
    """Write one stream's documents, already tokenised, into shards of `documents_per_shard`.

    Documents arrive in stream order through `add(doc_index, tokens)`. Shards already complete on
    disk are kept: `add()` for one of their documents does nothing (counted in `skipped_existing`),
    and a caller may ask `is_complete(shard_of(i))` to skip tokenising such documents at all. One
    writer per stream at a time. Used as a context manager, an exception discards the shard being
    filled instead of writing it short; `close()` (or a clean exit) writes the last partial shard.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        stream: str,
        vocab_size: int,
        documents_per_shard: int,
        verify_sha256: bool = False,
    ):
        _check_stream_name(stream)
        if documents_per_shard < 1:
            raise ValueError(f"documents_per_shard must be >= 1, got {documents_per_shard}")
        self.out_dir, self.stream = os.fspath(out_dir), stream
        self.folder = os.path.join(self.out_dir, stream)
        self.vocab_size = vocab_size
        self.dtype = token_dtype(vocab_size)
        self.documents_per_shard = documents_per_shard
        self.verify_sha256 = verify_sha256
        self.skipped_existing = 0  # add() calls for documents of shards complete before this run
        self.written: list[int] = []  # shard numbers this writer wrote
        self._next_doc = 0  # the doc_index that add() expects next
        self._buffer: list[np.ndarray] = []  # documents of the shard being filled
        self._complete: dict[int, bool] = {}  # is_complete answers: it is asked once per document
        self._sidecars: dict[int, dict[str, Any]] = {}  # of the complete shards found on disk
        self._closed = False
        os.makedirs(self.folder, exist_ok=True)
        for name in os.listdir(self.folder):  # left by a killed run; never part of a shard
            if name.endswith(TMP_SUFFIX):
                os.remove(os.path.join(self.folder, name))

    def shard_of(self, doc_index: int) -> int:
        return doc_index // self.documents_per_shard

    def is_complete(self, shard: int) -> bool:
        """Whether shard `shard` is on disk complete: a sidecar for this stream and layout, and a .bin
        of exactly the recorded size (and sha256, with `verify_sha256`). A sidecar written with
        another dtype or documents_per_shard is a configuration change and raises."""
        if shard not in self._complete:
            self._complete[shard] = self._check_complete(shard)
        return self._complete[shard]

    def add(self, doc_index: int, tokens: Sequence[int] | np.ndarray) -> None:
        """Append document `doc_index` (its token ids, BOS/EOS included) to the stream."""
        if self._closed:
            raise RuntimeError(f"ShardWriter for stream {self.stream!r} is closed")
        doc_index = operator.index(doc_index)
        self._check_order(doc_index)
        shard = self.shard_of(doc_index)
        if self.is_complete(shard):
            sidecar = self._sidecars[shard]
            if doc_index >= sidecar["first_doc"] + sidecar["documents"]:
                # A short last shard from an earlier, shorter run: its documents cannot be appended.
                raise ValueError(
                    f"stream {self.stream!r}: document {doc_index} belongs to shard {shard}, which an "
                    f"earlier run closed with {sidecar['documents']} documents; the input has grown, so "
                    f"delete {self.folder} to rebuild the stream"
                )
            self.skipped_existing += 1
        else:
            self._buffer.append(self._as_tokens(doc_index, tokens))
            if len(self._buffer) == self.documents_per_shard:
                self._flush(shard)
        self._next_doc = doc_index + 1

    def close(self) -> list[dict[str, Any]]:
        """Write the last partial shard; return the sidecars of all the stream's shards, in order."""
        if not self._closed:
            if self._buffer:
                self._flush(self.shard_of(self._next_doc - 1))
            self._closed = True
        return read_stream(self.out_dir, self.stream)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._buffer, self._closed = [], True  # a short shard would read as complete: drop it

    # --- internals ---

    def _check_order(self, doc_index: int) -> None:
        # Documents come in order; the caller may jump only over documents of complete shards.
        expected = self._next_doc
        if doc_index == expected:
            return
        if doc_index > expected:
            jumped = range(self.shard_of(expected), self.shard_of(doc_index - 1) + 1)
            if all(self.is_complete(k) for k in jumped):
                return
        raise ValueError(
            f"stream {self.stream!r}: documents must be added in order, expected document {expected}, "
            f"got {doc_index} (only documents of complete shards may be left out)"
        )

    def _as_tokens(self, doc_index: int, tokens) -> np.ndarray:
        arr = np.asarray(tokens)
        if arr.size == 0:
            return np.zeros(0, dtype=DTYPES[self.dtype])
        if arr.ndim != 1 or arr.dtype.kind not in "iu":
            raise ValueError(
                f"stream {self.stream!r}: document {doc_index} must be a 1-D sequence of ints, "
                f"got shape {arr.shape} dtype {arr.dtype}"
            )
        low, high = int(arr.min()), int(arr.max())
        if low < 0 or high >= self.vocab_size:  # would wrap silently in the narrow dtype
            raise ValueError(
                f"stream {self.stream!r}: document {doc_index} has token ids in [{low}, {high}], "
                f"outside the vocabulary [0, {self.vocab_size})"
            )
        return arr.astype(DTYPES[self.dtype])

    def _flush(self, shard: int) -> None:
        data = np.concatenate(self._buffer).tobytes()
        sidecar = {
            "stream": self.stream,
            "shard": shard,
            "documents": len(self._buffer),
            "tokens": len(data) // DTYPES[self.dtype].itemsize,
            "dtype": self.dtype,
            "sha256": hashlib.sha256(data).hexdigest(),
            "first_doc": shard * self.documents_per_shard,
        }
        bin_path, json_path = shard_paths(self.folder, shard)
        # A stale sidecar must go first: a new .bin beside an old sidecar could read as complete.
        if os.path.exists(json_path):
            os.remove(json_path)
        tmp_bin = _write_temp(bin_path, data)
        tmp_json = _write_temp(json_path, json.dumps(sidecar, indent=1).encode())
        os.replace(tmp_bin, bin_path)
        os.replace(tmp_json, json_path)  # last: from here on the shard reads as complete
        _fsync_dir(self.folder)
        self._buffer = []
        self._complete[shard], self._sidecars[shard] = True, sidecar
        self.written.append(shard)

    def _check_complete(self, shard: int) -> bool:
        try:
            sidecar = _read_sidecar(self.folder, shard)
        except (FileNotFoundError, ValueError):
            return False  # no sidecar, or an unreadable one: the shard is rewritten
        where = f"stream {self.stream!r} shard {shard} in {self.folder}"
        if sidecar["stream"] != self.stream or sidecar["shard"] != shard:
            return False
        if sidecar["dtype"] != self.dtype:
            raise ValueError(
                f"{where} holds {sidecar['dtype']} tokens, but vocab_size {self.vocab_size} writes "
                f"{self.dtype}; delete the stream to rebuild it"
            )
        first = shard * self.documents_per_shard
        if sidecar["first_doc"] != first or sidecar["documents"] > self.documents_per_shard:
            raise ValueError(
                f"{where} starts at document {sidecar['first_doc']} with {sidecar['documents']} documents, "
                f"but documents_per_shard {self.documents_per_shard} puts it at {first}; delete the stream "
                "to rebuild it"
            )
        if _bin_problem(self.folder, sidecar, self.verify_sha256) is not None:
            return False
        self._sidecars[shard] = sidecar
        return True


def read_stream(out_dir: str | os.PathLike, stream: str, verify_sha256: bool = False) -> list[dict[str, Any]]:
    """The sidecars of a stream's complete shards, in order ([] when the stream has none).

    A gap (a shard without its sidecar before one that has one), a sidecar that disagrees with its
    .bin, or documents that do not follow on from the previous shard raise ValueError. A trailing
    .bin without a sidecar is a shard still being written, and is not listed.
    """
    _check_stream_name(stream)
    folder = os.path.join(os.fspath(out_dir), stream)
    if not os.path.isdir(folder):
        return []
    numbers = sorted(int(m.group(1)) for name in os.listdir(folder) if (m := _SIDECAR_NAME.fullmatch(name)))
    missing = sorted(set(range(len(numbers))) - set(numbers))
    if missing:
        raise ValueError(
            f"stream {stream!r} in {folder} has a gap: shard(s) {missing} missing before shard {numbers[-1]}"
        )
    sidecars = []
    next_doc = 0
    for k in numbers:
        sidecar = _read_sidecar(folder, k)
        where = f"stream {stream!r} shard {k} in {folder}"
        if sidecar["first_doc"] != next_doc:
            raise ValueError(f"{where} starts at document {sidecar['first_doc']}, expected {next_doc}")
        if problem := _bin_problem(folder, sidecar, verify_sha256):
            raise ValueError(f"{where}: {problem}")
        next_doc += sidecar["documents"]
        sidecars.append(sidecar)
    return sidecars


def list_streams(out_dir: str | os.PathLike) -> list[str]:
    """Names of the streams in `out_dir` that have at least one shard sidecar."""
    out_dir = os.fspath(out_dir)
    if not os.path.isdir(out_dir):
        return []
    return sorted(
        name
        for name in os.listdir(out_dir)
        if os.path.isdir(os.path.join(out_dir, name))
        and any(_SIDECAR_NAME.fullmatch(f) for f in os.listdir(os.path.join(out_dir, name)))
    )


class ShardedRows:
    """A stream as packed training rows: a read-only, memory-mapped (rows, seq_len + 1) "array".

    Each shard's tokens are cut into rows of seq_len + 1 on their own; the tail of each shard that
    does not fill a row is dropped (`dropped_tokens`). Indexing with an int gives a 1-D int32 row
    (negative indices count from the end); with a 1-D int array or a slice, a 2-D int32 array.
    Memory maps open on first use and are not pickled, so DataLoader workers open their own.
    """

    ndim = 2
    dtype = np.dtype(np.int32)

    def __init__(self, out_dir: str | os.PathLike, stream: str, seq_len: int):
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.out_dir, self.stream, self.seq_len = os.fspath(out_dir), stream, seq_len
        self.width = seq_len + 1
        self.shards = read_stream(out_dir, stream)
        folder = os.path.join(self.out_dir, stream)
        if not self.shards:
            raise FileNotFoundError(f"stream {stream!r} has no complete shards in {folder}")
        self.tokens = sum(s["tokens"] for s in self.shards)
        self.dropped_tokens = sum(s["tokens"] % self.width for s in self.shards)
        # Only shards that give at least one row take part in indexing.
        self._parts = [
            (shard_paths(folder, s["shard"])[0], DTYPES[s["dtype"]], s["tokens"] // self.width)
            for s in self.shards
            if s["tokens"] >= self.width
        ]
        if not self._parts:
            largest = max(s["tokens"] for s in self.shards)
            raise ValueError(
                f"stream {stream!r} in {folder}: a row of seq_len + 1 = {self.width} tokens is longer than "
                f"every shard (the largest holds {largest} tokens); use more documents per shard"
            )
        self._starts = np.cumsum([0] + [rows for _, _, rows in self._parts])  # first row of each part
        self.shape = (int(self._starts[-1]), self.width)
        self._maps: dict[int, np.memmap] = {}

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index) -> np.ndarray:
        if isinstance(index, slice):
            index = np.arange(len(self))[index]
        if isinstance(index, (list, tuple, np.ndarray)):
            idx = np.asarray(index)
            if idx.ndim != 1 or (idx.size and idx.dtype.kind not in "iu"):
                raise TypeError(f"ShardedRows takes an int, a slice or a 1-D int array, got {idx.dtype} {idx.shape}")
            out = np.empty((len(idx), self.width), dtype=self.dtype)
            for j, i in enumerate(idx):
                out[j] = self._row(int(i))
            return out
        return self._row(operator.index(index))

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        # All rows in memory, for np.asarray / np.concatenate: meant for small (validation) streams.
        rows = np.concatenate([self._rows_of(p) for p in range(len(self._parts))])
        return rows if dtype is None else rows.astype(dtype)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_maps": {}}  # a pickled memmap would be a full copy of the shard

    def __repr__(self) -> str:
        return f"ShardedRows({self.stream!r}, shape={self.shape}, shards={len(self.shards)})"

    def _row(self, i: int) -> np.ndarray:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"row {i} is out of range for the {n} rows of stream {self.stream!r}")
        i %= n
        part = int(np.searchsorted(self._starts, i, side="right")) - 1
        return np.array(self._rows_of(part)[i - self._starts[part]], dtype=self.dtype)  # a plain copy

    def _rows_of(self, part: int) -> np.ndarray:
        if part not in self._maps:
            path, dtype, rows = self._parts[part]
            self._maps[part] = np.memmap(path, dtype=dtype, mode="r", shape=(rows * self.width,))
        return self._maps[part].reshape(-1, self.width)


def write_manifest(out_dir: str | os.PathLike, manifest: dict[str, Any]) -> str:
    """Write `out_dir/manifest.json` atomically (temporary file, then rename); return its path."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(os.fspath(out_dir), MANIFEST)
    os.replace(_write_temp(path, json.dumps(manifest, indent=1, sort_keys=True).encode()), path)
    _fsync_dir(os.fspath(out_dir))
    return path


def read_manifest(out_dir: str | os.PathLike) -> dict[str, Any]:
    path = os.path.join(os.fspath(out_dir), MANIFEST)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no {MANIFEST} in {os.fspath(out_dir)}: it is written when a curation run finishes")
    with open(path) as f:
        return json.load(f)


# --- helpers ---


def _check_stream_name(stream: str) -> None:
    if not isinstance(stream, str) or not stream or stream in (".", "..") or "/" in stream or os.sep in stream:
        raise ValueError(f"stream must be a plain folder name such as 'slimpajama.train', got {stream!r}")


def _read_sidecar(folder: str, shard: int) -> dict[str, Any]:
    """The shard's sidecar; FileNotFoundError when absent, ValueError when unreadable or incomplete."""
    path = shard_paths(folder, shard)[1]
    with open(path) as f:
        try:
            sidecar = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from e
    missing = [k for k in SIDECAR_KEYS if k not in sidecar] if isinstance(sidecar, dict) else list(SIDECAR_KEYS)
    if missing:
        raise ValueError(f"{path} lacks {missing}")
    if sidecar["dtype"] not in DTYPES:
        raise ValueError(f"{path}: dtype must be one of {list(DTYPES)}, got {sidecar['dtype']!r}")
    return sidecar


def _bin_problem(folder: str, sidecar: dict[str, Any], verify_sha256: bool) -> str | None:
    """Why the shard's .bin disagrees with its sidecar, or None when it agrees."""
    path = shard_paths(folder, sidecar["shard"])[0]
    if not os.path.exists(path):
        return f"{path} is missing"
    size, expected = os.path.getsize(path), sidecar["tokens"] * DTYPES[sidecar["dtype"]].itemsize
    if size != expected:
        tokens = f"{sidecar['tokens']} {sidecar['dtype']} tokens"
        return f"{path} holds {size} bytes, its sidecar says {tokens} ({expected} bytes)"
    if verify_sha256:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
        if digest.hexdigest() != sidecar["sha256"]:
            return f"{path} does not match the sha256 in its sidecar"
    return None


def _write_temp(path: str, data: bytes) -> str:
    """Write `data` durably under a temporary name beside `path`; return that name."""
    tmp = f"{path}.{os.getpid()}{TMP_SUFFIX}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return tmp


def _fsync_dir(folder: str) -> None:
    # Makes the renames themselves durable; not every platform can open a folder.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
