"""Token shards: writing, crash safety, resume, the memory-mapped row view and the datamodule reading them
(CPU, offline, tmp_path only)."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random

import numpy as np
import pytest
import torch

import moxin.data.datamodule as datamodule
from moxin.curate.shards import (
    ShardedRows,
    ShardWriter,
    list_streams,
    read_manifest,
    read_stream,
    write_manifest,
)
from moxin.data import DataConfig, PretrainDataModule
from moxin.data.mix import MixedSequenceDataset, validation_dataset
from moxin.tokenizer import load_tokenizer

VOCAB = 100


def fake_docs(n: int, seed: int = 0, low: int = 3, high: int = 12) -> list[list[int]]:
    # Token 1 opens and 2 closes every document, like BOS/EOS.
    rng = random.Random(seed)
    return [[1] + [rng.randrange(3, VOCAB) for _ in range(rng.randint(low, high))] + [2] for _ in range(n)]


def write(out_dir, docs, per_shard: int, stream: str = "toy.train", vocab: int = VOCAB) -> tuple[ShardWriter, list]:
    writer = ShardWriter(out_dir, stream, vocab, per_shard)
    for i, doc in enumerate(docs):
        writer.add(i, doc)
    return writer, writer.close()


def stored_tokens(out_dir, stream: str) -> np.ndarray:
    parts = []
    for s in read_stream(out_dir, stream):
        parts.append(np.fromfile(out_dir / stream / f"shard-{s['shard']:05d}.bin", dtype=s["dtype"]))
    return np.concatenate(parts)


def file_ids(folder) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


def pack_by_hand(docs: list[list[int]], per_shard: int, seq_len: int) -> tuple[np.ndarray, int]:
    width, rows, dropped = seq_len + 1, [], 0
    for start in range(0, len(docs), per_shard):
        tokens = np.concatenate([np.asarray(d) for d in docs[start : start + per_shard]])
        n = len(tokens) // width
        rows.append(tokens[: n * width].reshape(n, width))
        dropped += len(tokens) - n * width
    return np.concatenate(rows), dropped


# --- writing ---


def test_round_trip_keeps_tokens_order_and_sidecars(tmp_path):
    docs = fake_docs(23)
    writer, sidecars = write(tmp_path, docs, per_shard=5)
    assert writer.written == [0, 1, 2, 3, 4] and writer.skipped_existing == 0
    assert [s["documents"] for s in sidecars] == [5, 5, 5, 5, 3]
    assert [s["first_doc"] for s in sidecars] == [0, 5, 10, 15, 20]
    assert [s["shard"] for s in sidecars] == [0, 1, 2, 3, 4] and {s["stream"] for s in sidecars} == {"toy.train"}
    assert {s["dtype"] for s in sidecars} == {"uint16"}
    np.testing.assert_array_equal(stored_tokens(tmp_path, "toy.train"), np.concatenate(docs))
    for s in sidecars:
        data = (tmp_path / "toy.train" / f"shard-{s['shard']:05d}.bin").read_bytes()
        assert len(data) == 2 * s["tokens"] and hashlib.sha256(data).hexdigest() == s["sha256"]
        on_disk = json.loads((tmp_path / "toy.train" / f"shard-{s['shard']:05d}.json").read_text())
        assert on_disk == s
    assert sidecars == read_stream(tmp_path, "toy.train", verify_sha256=True)
    assert list_streams(tmp_path) == ["toy.train"]


def test_dtype_follows_vocab_size(tmp_path):
    assert ShardWriter(tmp_path, "small", 65536, 2).dtype == "uint16"
    docs = [[1, 70_000, 65_536, 2], [1, 5, 69_999, 2]]  # ids past uint16
    _, sidecars = write(tmp_path, docs, per_shard=2, stream="big", vocab=70_001)
    assert sidecars[0]["dtype"] == "uint32"
    assert (tmp_path / "big" / "shard-00000.bin").stat().st_size == 8 * 4
    np.testing.assert_array_equal(stored_tokens(tmp_path, "big"), np.concatenate(docs))


def test_writer_rejects_out_of_order_and_out_of_vocab(tmp_path):
    writer = ShardWriter(tmp_path, "toy.train", VOCAB, 4)
    writer.add(0, [1, 2])
    with pytest.raises(ValueError, match="expected document 1, got 2"):
        writer.add(2, [1, 2])
    with pytest.raises(ValueError, match="expected document 1, got 0"):
        writer.add(0, [1, 2])
    with pytest.raises(ValueError, match=r"document 1 has token ids in \[1, 100\], outside the vocabulary \[0, 100\)"):
        writer.add(1, [1, 100])
    with pytest.raises(ValueError, match="plain folder name"):
        ShardWriter(tmp_path, "a/b", VOCAB, 4)


# --- crash safety ---


def test_leftovers_of_a_crash_never_read_as_complete_and_a_rerun_repairs_them(tmp_path):
    docs = fake_docs(12)
    write(tmp_path, docs, per_shard=3)
    reference = stored_tokens(tmp_path, "toy.train")
    folder = tmp_path / "toy.train"
    (folder / "shard-00001.json").unlink()  # killed between the two renames: .bin, no sidecar
    bin2 = folder / "shard-00002.bin"
    bin2.write_bytes(bin2.read_bytes()[:-2])  # a .bin that disagrees with its sidecar
    (folder / "shard-00003.bin.999.tmp").write_bytes(b"half a shard")  # killed while writing

    probe = ShardWriter(tmp_path, "toy.train", VOCAB, 3)
    assert [probe.is_complete(k) for k in range(5)] == [True, False, False, True, False]
    assert not (folder / "shard-00003.bin.999.tmp").exists()  # temp files are cleaned up
    with pytest.raises(ValueError, match=r"gap: shard\(s\) \[1\] missing before shard 3"):
        read_stream(tmp_path, "toy.train")

    writer, sidecars = write(tmp_path, docs, per_shard=3)
    assert writer.written == [1, 2] and writer.skipped_existing == 6
    assert [s["documents"] for s in sidecars] == [3, 3, 3, 3]
    np.testing.assert_array_equal(stored_tokens(tmp_path, "toy.train"), reference)
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_truncated_bin_with_sidecar_is_rejected_by_readers(tmp_path):
    write(tmp_path, fake_docs(6), per_shard=3)
    bin1 = tmp_path / "toy.train" / "shard-00001.bin"
    bin1.write_bytes(bin1.read_bytes()[:-2])
    with pytest.raises(ValueError, match="shard-00001.bin holds .* bytes, its sidecar says"):
        read_stream(tmp_path, "toy.train")
    with pytest.raises(ValueError, match="shard-00001.bin holds"):
        ShardedRows(tmp_path, "toy.train", 4)


def test_same_size_corruption_is_caught_only_with_sha256(tmp_path):
    write(tmp_path, fake_docs(6), per_shard=3)
    bin0 = tmp_path / "toy.train" / "shard-00000.bin"
    data = bytearray(bin0.read_bytes())
    data[0] ^= 1
    bin0.write_bytes(bytes(data))
    assert ShardWriter(tmp_path, "toy.train", VOCAB, 3).is_complete(0)  # cheap check: size only
    assert not ShardWriter(tmp_path, "toy.train", VOCAB, 3, verify_sha256=True).is_complete(0)
    with pytest.raises(ValueError, match="sha256"):
        read_stream(tmp_path, "toy.train", verify_sha256=True)


def test_crash_between_renames_leaves_shard_incomplete(tmp_path, monkeypatch):
    real_replace = os.replace

    def crash_on_sidecar(src, dst):
        if str(dst).endswith(".json"):
            raise KeyboardInterrupt("killed")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_sidecar)
    writer = ShardWriter(tmp_path, "toy.train", VOCAB, 2)
    writer.add(0, [1, 5, 2])
    with pytest.raises(KeyboardInterrupt):
        writer.add(1, [1, 6, 2])
    monkeypatch.setattr(os, "replace", real_replace)
    folder = tmp_path / "toy.train"
    assert (folder / "shard-00000.bin").exists() and not (folder / "shard-00000.json").exists()
    assert read_stream(tmp_path, "toy.train") == []
    assert not ShardWriter(tmp_path, "toy.train", VOCAB, 2).is_complete(0)
    assert sorted(p.name for p in folder.iterdir()) == ["shard-00000.bin"]  # the temp sidecar is gone


def test_exception_inside_writer_does_not_write_a_short_shard(tmp_path):
    docs = fake_docs(5)
    with pytest.raises(RuntimeError, match="source failed"):
        with ShardWriter(tmp_path, "toy.train", VOCAB, 3) as writer:
            for i, doc in enumerate(docs):
                writer.add(i, doc)
            raise RuntimeError("source failed")
    assert [s["documents"] for s in read_stream(tmp_path, "toy.train")] == [3]  # not [3, 2]


# --- resume ---


def test_rerun_skips_complete_shards_and_leaves_their_files_alone(tmp_path):
    docs = fake_docs(10)
    _, first = write(tmp_path, docs, per_shard=4)
    before = file_ids(tmp_path / "toy.train")
    writer, second = write(tmp_path, docs, per_shard=4)
    assert writer.skipped_existing == 10 and writer.written == []
    assert second == first
    assert file_ids(tmp_path / "toy.train") == before


def test_pipeline_can_skip_tokenising_finished_shards(tmp_path):
    docs = fake_docs(10)
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path, "toy.train", VOCAB, 4) as writer:
            for i, doc in enumerate(docs[:9]):
                writer.add(i, doc)
            raise RuntimeError("killed")
    before = file_ids(tmp_path / "toy.train")
    assert sorted(before) == ["shard-00000.bin", "shard-00000.json", "shard-00001.bin", "shard-00001.json"]

    writer = ShardWriter(tmp_path, "toy.train", VOCAB, 4)
    tokenised = []
    for i, doc in enumerate(docs):
        if writer.is_complete(writer.shard_of(i)):
            continue  # the pipeline does not tokenise these
        tokenised.append(i)
        writer.add(i, doc)
    sidecars = writer.close()
    assert tokenised == [8, 9] and writer.written == [2]
    assert [s["documents"] for s in sidecars] == [4, 4, 2]
    assert {k: v for k, v in file_ids(tmp_path / "toy.train").items() if k in before} == before
    np.testing.assert_array_equal(stored_tokens(tmp_path, "toy.train"), np.concatenate(docs))


def test_grown_input_cannot_extend_a_closed_short_shard(tmp_path):
    docs = fake_docs(12)
    write(tmp_path, docs[:10], per_shard=4)
    writer = ShardWriter(tmp_path, "toy.train", VOCAB, 4)
    for i in range(10):
        writer.add(i, docs[i])
    with pytest.raises(ValueError, match="closed with 2 documents; the input has grown"):
        writer.add(10, docs[10])


def test_changed_layout_is_refused(tmp_path):
    write(tmp_path, fake_docs(8), per_shard=4)
    with pytest.raises(ValueError, match="documents_per_shard 3 puts it at 3"):
        ShardWriter(tmp_path, "toy.train", VOCAB, 3).is_complete(1)
    with pytest.raises(ValueError, match="holds uint16 tokens, but vocab_size 70000 writes uint32"):
        ShardWriter(tmp_path, "toy.train", 70_000, 4).is_complete(0)


def test_gap_raises(tmp_path):
    write(tmp_path, fake_docs(9), per_shard=3)
    for suffix in ("bin", "json"):
        (tmp_path / "toy.train" / f"shard-00001.{suffix}").unlink()
    with pytest.raises(ValueError, match=r"toy.train.*gap: shard\(s\) \[1\] missing before shard 2"):
        read_stream(tmp_path, "toy.train")
    with pytest.raises(ValueError, match="gap"):
        ShardedRows(tmp_path, "toy.train", 4)


# --- the row view ---


def test_sharded_rows_match_packing_by_hand(tmp_path):
    docs = fake_docs(17, seed=3)
    write(tmp_path, docs, per_shard=4)
    rows = ShardedRows(tmp_path, "toy.train", seq_len=6)
    expected, dropped = pack_by_hand(docs, 4, 6)
    assert rows.ndim == 2 and rows.shape == expected.shape == (len(rows), 7)
    assert rows.dropped_tokens == dropped > 0
    assert rows.tokens == sum(len(d) for d in docs)
    for i in range(len(rows)):
        row = rows[i]
        assert isinstance(row, np.ndarray) and type(row) is np.ndarray and row.dtype == np.int32
        np.testing.assert_array_equal(row, expected[i])
    np.testing.assert_array_equal(rows[-1], expected[-1])
    np.testing.assert_array_equal(rows[-len(rows)], expected[0])
    np.testing.assert_array_equal(rows[np.int64(3)], expected[3])
    np.testing.assert_array_equal(rows[np.array([5, 0, -1])], expected[[5, 0, -1]])
    np.testing.assert_array_equal(rows[2:5], expected[2:5])
    np.testing.assert_array_equal(np.asarray(rows), expected)
    for bad in (len(rows), -len(rows) - 1):
        with pytest.raises(IndexError, match="out of range"):
            rows[bad]
    copy = pickle.loads(pickle.dumps(rows))  # what a spawned DataLoader worker gets
    assert not copy._maps and len(pickle.dumps(rows)) < 4000
    np.testing.assert_array_equal(copy[len(copy) - 1], expected[-1])


def test_sharded_rows_skip_shards_too_short_for_a_row(tmp_path):
    docs = [[1, 5, 6, 2]] * 2 + [[1] + [7] * 20 + [2]] * 2  # shard 0: 8 tokens, shard 1: 44 tokens
    write(tmp_path, docs, per_shard=2)
    rows = ShardedRows(tmp_path, "toy.train", seq_len=9)
    assert rows.shape == (4, 10) and rows.dropped_tokens == 8 + 4
    np.testing.assert_array_equal(rows[0], [1] + [7] * 9)
    with pytest.raises(ValueError, match=r"seq_len \+ 1 = 51 tokens is longer than every shard \(the largest holds 44"):
        ShardedRows(tmp_path, "toy.train", seq_len=50)
    with pytest.raises(FileNotFoundError, match="stream 'toy.val' has no complete shards"):
        ShardedRows(tmp_path, "toy.val", seq_len=9)


def test_sharded_rows_feed_the_mix_and_validation_like_arrays(tmp_path, monkeypatch):
    write(tmp_path, fake_docs(40, seed=1), per_shard=5, stream="a.train")
    write(tmp_path, fake_docs(30, seed=2), per_shard=5, stream="b.train")
    sharded = {name: ShardedRows(tmp_path, f"{name}.train", 5) for name in ("a", "b")}
    dense = {name: np.asarray(rows) for name, rows in sharded.items()}
    weights = {"a": 1.0, "b": 2.0}
    mixed, plain = MixedSequenceDataset(sharded, weights, 50, 9), MixedSequenceDataset(dense, weights, 50, 9)
    for i in range(50):
        assert torch.equal(mixed[i]["input_ids"], plain[i]["input_ids"])
        assert torch.equal(mixed[i]["labels"], plain[i]["labels"])
    assert mixed.mix_summary() == plain.mix_summary()
    for cap in (None, 7):
        np.testing.assert_array_equal(validation_dataset(sharded, cap).rows, validation_dataset(dense, cap).rows)

    def forbidden(self, *args, **kwargs):
        raise AssertionError("a capped validation set must read only the rows it keeps")

    monkeypatch.setattr(ShardedRows, "__array__", forbidden)
    np.testing.assert_array_equal(validation_dataset(sharded, 7).rows, validation_dataset(dense, 7).rows)


# --- manifest ---


def test_manifest_round_trip_and_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"no manifest.json in {tmp_path / 'out'}"):
        read_manifest(tmp_path / "out")
    manifest = {"tokenizer": "mistral_v1", "streams": {"toy.train": {"documents": 3}}}
    write_manifest(tmp_path / "out", manifest)
    assert read_manifest(tmp_path / "out") == manifest
    write_manifest(tmp_path / "out", {**manifest, "tokenizer": "other"})
    assert read_manifest(tmp_path / "out")["tokenizer"] == "other"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["manifest.json"]


# --- the datamodule reading shards ---


TEXTS = {
    "books": "the quick brown fox jumps over the lazy dog and runs far into the green hills",
    "web": "click here to read more about prices shipping returns and our privacy policy today",
}


def tokenised_docs(tokenizer, name: str, n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    words = TEXTS[name].split()
    texts = [" ".join(rng.choices(words, k=rng.randint(5, 25))) for _ in range(n)]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [[tokenizer.bos_token_id, *d, tokenizer.eos_token_id] for d in ids]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Curated shards for two sources (web has no validation stream), with the real tokenizer."""
    tokenizer = load_tokenizer()
    out = tmp_path_factory.mktemp("shards")
    docs = {
        "books.train": tokenised_docs(tokenizer, "books", 40, 0),
        "books.val": tokenised_docs(tokenizer, "books", 12, 1),
        "web.train": tokenised_docs(tokenizer, "web", 60, 2),
    }
    for stream, stream_docs in docs.items():
        write(out, stream_docs, per_shard=8, stream=stream, vocab=len(tokenizer))
    write_manifest(out, {"tokenizer": "mistral_v1"})
    return out, docs


def shard_config(tmp_path, shards_dir, names=("books", "web"), **overrides) -> DataConfig:
    unused = tmp_path / "unused.txt"  # a text source needs a path; with shards_dir it is never read
    unused.write_text("never read")
    weights = {"books": 1.0, "web": 3.0, "code": 1.0}
    sources = [{"name": n, "kind": "text", "path": str(unused), "weight": weights[n]} for n in names]
    cfg = dict(sources=sources, shards_dir=str(shards_dir), seq_len=16, micro_batch_size=2, num_samples=400)
    return DataConfig(**{**cfg, "progress": False, **overrides})


def test_datamodule_serves_rows_from_shards(tmp_path, shards, monkeypatch):
    out, docs = shards

    def forbidden(*args, **kwargs):
        raise AssertionError("with shards_dir, sources must not be read or tokenised")

    monkeypatch.setattr(datamodule, "pack_documents", forbidden)
    monkeypatch.setattr(datamodule, "iter_documents", forbidden)
    dm = PretrainDataModule(shard_config(tmp_path, out))
    dm.prepare_data()
    dm.setup("fit")

    by_hand = {stream: pack_by_hand(d, 8, 16) for stream, d in docs.items()}
    known = {name: {tuple(r) for r in by_hand[f"{name}.train"][0]} for name in ("books", "web")}
    ds = dm.train_dataset
    assert ds.names == ["books", "web"] and all(isinstance(a, ShardedRows) for a in ds.arrays)
    for i in range(len(ds)):
        sample = ds[i]
        row = (*sample["input_ids"].tolist(), int(sample["labels"][-1]))
        assert row in known[ds.names[ds.source_ids[i]]]
    mix = dm.summary["mix"]
    for name, share in (("books", 0.25), ("web", 0.75)):
        assert mix[name]["target_share"] == pytest.approx(share)
        assert mix[name]["share"] == pytest.approx(share, abs=0.06)
    assert mix["web"]["rows"] == len(by_hand["web.train"][0])

    books = dm.summary["sources"]["books"]["shards"]
    assert books["train"] == {
        "shards": 5,
        "rows": len(by_hand["books.train"][0]),
        "tokens": sum(len(d) for d in docs["books.train"]),
        "dropped_tokens": by_hand["books.train"][1],
    }
    assert books["val"]["rows"] == len(by_hand["books.val"][0]) > 0
    assert set(dm.summary["sources"]["web"]["shards"]) == {"train"}  # no web.val stream
    # Validation is books.val only, capped evenly at val_max_sequences.
    val_rows = {tuple(r) for r in by_hand["books.val"][0]}
    assert len(dm.val_dataset) == min(64, len(val_rows))
    assert all(tuple(r) in val_rows for r in dm.val_dataset.rows)

    # Downstream is unchanged: batches, and a resumed run starts after the consumed samples.
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == batch["labels"].shape == (2, 16) and batch["input_ids"].dtype == torch.long
    resumed = PretrainDataModule(shard_config(tmp_path, out))
    resumed.load_state_dict({"consumed_samples": 6})
    resumed.setup("fit")
    first = next(iter(resumed.train_dataloader()))
    assert torch.equal(first["input_ids"], torch.stack([ds[6]["input_ids"], ds[7]["input_ids"]]))
    assert resumed.state_dict() == {"consumed_samples": 6}


def test_datamodule_missing_stream_names_source_and_streams(tmp_path, shards):
    out, _ = shards
    dm = PretrainDataModule(shard_config(tmp_path, out, names=("books", "code")))
    with pytest.raises(ValueError, match=r"source 'code': no stream 'code.train' .*streams found: \['books.train', "
                       r"'books.val', 'web.train'\]"):
        dm.setup()


def test_datamodule_refuses_other_tokenizer_and_missing_manifest(tmp_path, shards):
    out, _ = shards
    other = tmp_path / "other"
    write(other, fake_docs(20), per_shard=10, stream="books.train")
    write(other, fake_docs(20), per_shard=10, stream="web.train")
    write_manifest(other, {"tokenizer": "gpt2"})
    with pytest.raises(ValueError, match="tokenised with 'gpt2' .* but data.tokenizer is 'mistral_v1'"):
        PretrainDataModule(shard_config(tmp_path, other, seq_len=4)).setup()
    (other / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match="no manifest.json in"):
        PretrainDataModule(shard_config(tmp_path, other, seq_len=4)).setup()
