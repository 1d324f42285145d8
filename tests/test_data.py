"""Pretraining data: sources, packing, the weighted mix and the datamodule (CPU, offline, tmp_path only)."""

from __future__ import annotations

import gzip
import json
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import moxin.data.datamodule as datamodule
from moxin.data import DataConfig, PretrainDataModule, SourceConfig, SourceStats, iter_documents
from moxin.data.mix import MixedSequenceDataset, validation_dataset
from moxin.data.pack import is_validation, pack_documents
from moxin.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def read(source: SourceConfig) -> tuple[list[str], SourceStats]:
    stats = SourceStats()
    return list(iter_documents(source, stats)), stats


def write_jsonl(path, lines: list[str]) -> None:
    path.write_text("\n".join(lines) + "\n")


def make_docs(n: int) -> list[str]:
    rng = random.Random(0)
    words = "alpha beta gamma delta light water earth heaven".split()
    return [f"doc {i}: " + " ".join(rng.choices(words, k=rng.randint(1, 40))) for i in range(n)]


# --- sources ---


def test_text_file_and_folder(tmp_path):
    (tmp_path / "b.md").write_text("second")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.txt").write_text("third")
    (tmp_path / "a.txt").write_text("first\nline two")
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "ignored.csv").write_text("not read")
    docs, stats = read(SourceConfig("t", "text", path=str(tmp_path)))
    assert docs == ["first\nline two", "second", "third"]  # sorted by relative path, csv ignored
    assert stats.documents == 3 and stats.bytes == sum(len(d) for d in docs)
    assert stats.skipped["empty"] == 1
    assert read(SourceConfig("t", "text", path=str(tmp_path / "b.md")))[0] == ["second"]


def test_jsonl_malformed_records_are_counted_and_skipped(tmp_path):
    write_jsonl(
        tmp_path / "a.jsonl",
        [
            '{"text": "good one"}',
            '{"text": "broken',
            '{"content": "no text field"}',
            '{"text": 42}',
            '{"text": null}',
            '{"text": "   "}',
            '["a", "list"]',
            "",
            '{"text": "good two", "meta": 1}',
        ],
    )
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write('{"text": "good three"}\n')
    docs, stats = read(SourceConfig("j", "jsonl", path=str(tmp_path)))
    assert docs == ["good one", "good two", "good three"]
    assert stats.skipped == {
        "bad_json": 1,
        "not_utf8": 0,
        "not_an_object": 1,
        "missing_field": 2,
        "not_a_string": 1,
        "empty": 1,
        "truncated_file": 0,
        "template_error": 0,
    }


def test_parquet_source(tmp_path):
    pq.write_table(pa.table({"body": ["p one", None, "p two"], "id": [1, 2, 3]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"body": ["p three"], "id": [4]}), tmp_path / "b.parquet")
    docs, stats = read(SourceConfig("p", "parquet", path=str(tmp_path), text_field="body"))
    assert docs == ["p one", "p two", "p three"]
    assert stats.skipped["missing_field"] == 1
    with pytest.raises(ValueError, match="no column 'text'"):
        read(SourceConfig("p", "parquet", path=str(tmp_path)))


def test_hf_source_reads_local_json_offline(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")  # stay in tmp_path
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    write_jsonl(tmp_path / "d.jsonl", ['{"text": "hf one"}', '{"text": ""}', '{"text": "hf two"}'])
    source = SourceConfig("h", "hf", path="json", data_files=[str(tmp_path / "d.jsonl")])
    docs, stats = read(source)
    assert docs == ["hf one", "hf two"]
    assert stats.skipped["empty"] == 1


def test_kjv_one_document_per_chapter():
    docs, stats = read(SourceConfig("kjv", "kjv"))
    assert len(docs) == 1189 and stats.documents == 1189
    assert docs[0].startswith("Genesis 1\n\n") and "In the beginning God created" in docs[0]
    assert docs[1].startswith("Genesis 2\n\n") and "In the beginning" not in docs[1]
    assert docs[-1].startswith("Revelation 22\n\n") and docs[-1].endswith("Amen.")
    assert read(SourceConfig("kjv", "kjv", max_documents=2))[0] == docs[:2]


def test_python_stdlib_respects_caps():
    docs, stats = read(SourceConfig("py", "python_stdlib", max_bytes=100_000))
    assert 0 < stats.bytes <= 100_000 and stats.documents == len(docs) >= 1
    more, _ = read(SourceConfig("py", "python_stdlib", max_bytes=1_000_000))
    assert more[: len(docs)] == docs and len(more) > len(docs)  # a prefix of the same sorted order
    # It stopped before the first file that would have gone past the cap.
    assert stats.bytes + len(more[len(docs)].encode()) > 100_000
    assert len(read(SourceConfig("py", "python_stdlib", max_documents=3))[0]) == 3


def test_missing_path_names_source_and_path(tmp_path):
    missing = str(tmp_path / "nowhere.jsonl")
    with pytest.raises(FileNotFoundError, match="'web'.*nowhere.jsonl"):
        read(SourceConfig("web", "jsonl", path=missing))
    with pytest.raises(FileNotFoundError, match="'web'.*nowhere.jsonl"):
        read(SourceConfig("web", "hf", path="json", data_files=[missing]))


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"kind": "csv"}, "kind"),
        ({"kind": "jsonl"}, "path"),
        ({"kind": "kjv", "weight": 0}, "weight"),
        ({"kind": "kjv", "max_documents": 0}, "max_documents"),
        ({"kind": "kjv", "max_bytes": -5}, "max_bytes"),
        ({"kind": "kjv", "text_field": ""}, "text_field"),
    ],
)
def test_source_config_validation_names_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SourceConfig(name="s", **kwargs)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"seq_len": 0}, "seq_len"),
        ({"micro_batch_size": 0}, "micro_batch_size"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"val_max_sequences": 0}, "val_max_sequences"),
        ({"num_samples": 0}, "num_samples"),
        ({"seed": -1}, "seed"),
        ({"sources": []}, "sources"),
        ({"sources": [{"name": "a", "kind": "kjv"}, {"name": "a", "kind": "kjv"}]}, "unique names"),
    ],
)
def test_data_config_validation_names_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        DataConfig(**{"sources": [{"name": "kjv", "kind": "kjv"}], **kwargs})


def test_data_config_accepts_dicts():
    cfg = DataConfig(sources=[{"name": "kjv", "kind": "kjv", "weight": 2}])
    assert cfg.sources == [SourceConfig("kjv", "kjv", weight=2.0)]
    keyed = DataConfig(sources={"kjv": {"kind": "kjv", "weight": 2}})
    assert keyed.sources == cfg.sources


# --- packing ---


def test_packing_adds_bos_eos_and_conserves_tokens(tokenizer):
    docs = make_docs(300)
    seq_len = 16
    train, val = pack_documents(docs, tokenizer, seq_len, val_fraction=0.0, batch_size=64)
    ids = tokenizer(docs, add_special_tokens=False)["input_ids"]
    stream = [t for d in ids for t in [tokenizer.bos_token_id, *d, tokenizer.eos_token_id]]
    assert train.rows.dtype == np.int32 and train.rows.shape[1] == seq_len + 1
    assert train.rows.size + train.dropped_tokens == len(stream) == train.tokens
    assert 0 <= train.dropped_tokens < seq_len + 1
    # The rows are exactly the bos/ids/eos stream, in document order, cut every seq_len + 1 tokens.
    np.testing.assert_array_equal(train.rows.reshape(-1), stream[: train.rows.size])
    assert train.documents == 300 and val.documents == 0 and val.rows.shape == (0, seq_len + 1)


def test_validation_split_is_by_document_disjoint_and_stable(tokenizer):
    docs = make_docs(400)
    val_docs = {d for d in docs if is_validation(d, 0.2)}
    assert 40 <= len(val_docs) <= 120  # about 20 %
    shuffled = docs[::-1]
    assert {d for d in shuffled if is_validation(d, 0.2)} == val_docs  # independent of order
    # Pinned values: the hash is the same in every process and on every machine (unlike hash()).
    assert [i for i in range(40) if is_validation(f"document {i}", 0.25)] == [11, 15, 26, 27, 28, 36, 37]
    train, val = pack_documents(docs, tokenizer, 8, val_fraction=0.2)
    # Each split is exactly the packing of its own documents: no document is in both.
    only_val, _ = pack_documents([d for d in docs if d in val_docs], tokenizer, 8)
    only_train, _ = pack_documents([d for d in docs if d not in val_docs], tokenizer, 8)
    np.testing.assert_array_equal(val.rows, only_val.rows)
    np.testing.assert_array_equal(train.rows, only_train.rows)
    assert val.documents == len(val_docs) and train.documents == len(docs) - len(val_docs)


# --- mixing ---


def tagged_rows(source: int, n: int, width: int = 5) -> np.ndarray:
    # Token 0 says which source, token 1 which row: a sample shows where it came from.
    rows = np.zeros((n, width), dtype=np.int32)
    rows[:, 0], rows[:, 1] = source, np.arange(n)
    return rows


def origins(ds) -> list[tuple[int, int]]:
    return [(int(ds[i]["input_ids"][0]), int(ds[i]["input_ids"][1])) for i in range(len(ds))]


def test_mix_is_deterministic_and_follows_weights():
    arrays = {"a": tagged_rows(0, 50), "b": tagged_rows(1, 30), "c": tagged_rows(2, 20)}
    weights = {"a": 0.6, "b": 0.3, "c": 0.1}
    same = [MixedSequenceDataset(arrays, weights, 200, seed=7) for _ in range(2)]
    assert origins(same[0]) == origins(same[1])
    assert origins(MixedSequenceDataset(arrays, weights, 200, seed=8)) != origins(same[0])
    big = MixedSequenceDataset(arrays, weights, 20_000, seed=7)
    summary = big.mix_summary()
    for name, w in weights.items():
        assert summary[name]["share"] == pytest.approx(w, abs=0.02)
    assert sum(s["samples"] for s in summary.values()) == 20_000
    sample = big[3]
    assert sample["input_ids"].shape == (4,) and sample["input_ids"].dtype == torch.long
    np.testing.assert_array_equal(sample["input_ids"][1:], sample["labels"][:-1])


def test_mix_repeats_small_source_in_fresh_passes():
    arrays = {"big": tagged_rows(0, 1000), "small": tagged_rows(1, 5)}
    ds = MixedSequenceDataset(arrays, {"big": 1.0, "small": 1.0}, num_samples=100, seed=3)
    small_rows = [row for src, row in origins(ds) if src == 1]
    summary = ds.mix_summary()["small"]
    assert summary["samples"] == len(small_rows) > 10
    assert summary["epochs"] == pytest.approx(len(small_rows) / 5)
    assert summary["passes"] == -(-len(small_rows) // 5)
    for start in range(0, len(small_rows) - 4, 5):  # every full pass visits each row once
        assert sorted(small_rows[start : start + 5]) == [0, 1, 2, 3, 4]
    assert ds.mix_summary()["big"]["passes"] == 1


def test_mix_rejects_empty_source():
    with pytest.raises(ValueError, match="source 'kjv' produced no training sequences of 257 tokens"):
        MixedSequenceDataset({"kjv": np.zeros((0, 257), np.int32)}, {"kjv": 1.0})


def test_validation_dataset_caps_evenly():
    ds = validation_dataset({"a": tagged_rows(0, 90), "b": tagged_rows(1, 10)}, max_sequences=10)
    assert len(ds) == 10
    assert {int(ds[i]["input_ids"][0]) for i in range(10)} == {0, 1}  # both sources kept


# --- datamodule ---


def data_config(tmp_path, **overrides) -> DataConfig:
    folder = tmp_path / "texts"
    folder.mkdir(exist_ok=True)
    for i, doc in enumerate(make_docs(60)):
        (folder / f"{i:03d}.txt").write_text(doc)
    write_jsonl(tmp_path / "web.jsonl", [json.dumps({"text": d}) for d in make_docs(80)] + ["{oops"])
    cfg = dict(
        sources=[
            {"name": "texts", "kind": "text", "path": str(folder)},
            {"name": "web", "kind": "jsonl", "path": str(tmp_path / "web.jsonl"), "weight": 3.0},
        ],
        seq_len=16,
        micro_batch_size=4,
        val_fraction=0.1,
        num_samples=64,
        progress=False,
    )
    return DataConfig(**{**cfg, **overrides})


def test_datamodule_batches(tmp_path):
    dm = PretrainDataModule(data_config(tmp_path))
    dm.setup("fit")
    train_ds = dm.train_dataset
    dm.setup("validate")
    assert dm.train_dataset is train_ds  # packed once
    batches = list(dm.train_dataloader())
    assert len(batches) == 16
    for batch in batches:
        assert batch["input_ids"].shape == batch["labels"].shape == (4, 16)
        assert batch["input_ids"].dtype == batch["labels"].dtype == torch.long
        assert (batch["input_ids"][:, 1:] == batch["labels"][:, :-1]).all()
    val = next(iter(dm.val_dataloader()))
    assert val["input_ids"].shape[1] == 16
    s = dm.summary
    assert s["sources"]["web"]["skipped"]["bad_json"] == 1
    assert s["sources"]["web"]["val_documents"] > 0 and s["sources"]["web"]["cached"] is False
    assert set(s["mix"]) == {"texts", "web"} and s["train_samples"] == 64
    assert s["val_sequences"] == len(dm.val_dataset) > 0
    assert dm.tokenizer.eos_token_id == 2


def test_datamodule_cache_skips_tokenisation(tmp_path, monkeypatch):
    cfg = data_config(tmp_path, cache_dir=str(tmp_path / "cache"))
    first = PretrainDataModule(cfg)
    first.setup()
    assert len(list((tmp_path / "cache").glob("*/meta.json"))) == 2

    def forbidden(*args, **kwargs):
        raise AssertionError("a cache hit must not read or tokenise documents")

    monkeypatch.setattr(datamodule, "pack_documents", forbidden)
    monkeypatch.setattr(datamodule, "iter_documents", forbidden)
    second = PretrainDataModule(cfg)
    second.setup()
    for a, b in zip(first.train_dataset.arrays, second.train_dataset.arrays, strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(first.val_dataset.rows, second.val_dataset.rows)
    assert second.summary["sources"]["web"]["cached"] is True
    assert second.summary["sources"]["web"]["skipped"] == first.summary["sources"]["web"]["skipped"]
    assert second.summary["mix"] == first.summary["mix"]


def test_a_template_formats_records_and_counts_those_it_cannot(tmp_path):
    (tmp_path / "items.jsonl").write_text(
        '{"question": "Two plus two?", "choices": ["3", "4"], "answer": 1}\n'
        '{"question": "No choices here", "answer": 0}\n'
        '{"question": "Red or blue?", "choices": ["red", "blue"], "answer": 0}\n')
    source = SourceConfig("qa", "jsonl", path=str(tmp_path), template="Q: {{ question }} A: {{ choices[answer] }}")
    docs, stats = read(source)
    assert docs == ["Q: Two plus two? A: 4", "Q: Red or blue? A: red"]
    assert stats.skipped["template_error"] == 1
    with pytest.raises(ValueError, match="template does not parse"):
        SourceConfig("qa", "jsonl", path=str(tmp_path), template="{{ unclosed")
