"""The curation pipeline end to end: stages, counts, bad input, decontamination, shards, resume,
report, task=prepare_data, and pretraining on the result."""

import gzip
import json
import os
import random
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from moxin.curate.decontam import BenchmarkSet, ContaminationIndex, DecontamConfig
from moxin.curate.pipeline import CurationConfig, curate
from moxin.curate.report import report_markdown, write_report
from moxin.curate.shards import read_stream
from moxin.data.datamodule import DataConfig, PretrainDataModule
from moxin.tokenizer import load_tokenizer

WORDS = ("the river ran past a quiet town where people of every trade gathered with their goods and stories "
         "before the long winter came over the hills and the roads grew hard with frost and snow that lasted "
         "until spring returned to the valley and the farmers began to plant again in the wet black earth").split()


def prose(seed: int, n_words: int = 120) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n_words)).capitalize() + "."


def edited(text: str, changes: int, seed: int = 0) -> str:
    words, rng = text.split(), random.Random(seed)
    for k in rng.sample(range(len(words)), changes):
        words[k] = "changed"
    return " ".join(words)


CONF = Path(__file__).resolve().parent.parent / "conf"
ARC_ITEM = "Which of these is a liquid at room temperature? rock water wood iron"  # tests/eval_fixtures.py


@pytest.fixture
def corpus(tmp_path):
    """A JSONL folder with good documents, planted duplicates, a contaminated one and bad records."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    good = [prose(i) for i in range(30)]
    records = [{"text": t} for t in good]
    records.append({"text": good[3]})  # exact duplicate of document 3
    records.append({"text": edited(good[5], 2)})  # near duplicate of document 5
    records.append({"text": prose(100) + " " + ARC_ITEM + " " + prose(101)})  # contains an evaluation item
    records.append({"text": "Too short."})
    lines = [json.dumps(r) for r in records]
    lines.insert(10, "{not json")  # malformed JSON
    lines.insert(20, json.dumps({"body": "no text field"}))
    lines.insert(25, json.dumps({"text": ""}))
    (folder / "a.jsonl").write_text("\n".join(lines) + "\n")
    with open(folder / "b.jsonl", "wb") as f:  # invalid UTF-8 in one record, good ones around it
        f.write(json.dumps({"text": prose(200)}).encode() + b"\n")
        f.write(b'{"text": "caf\xe9 \xff broken"}\n')
        f.write(json.dumps({"text": prose(201)}).encode() + b"\n")
    payload = "".join(json.dumps({"text": prose(300 + i)}) + "\n" for i in range(40)).encode()
    compressed = gzip.compress(payload)
    (folder / "c.jsonl.gz").write_bytes(compressed[: len(compressed) * 2 // 3])  # cut off mid-stream
    return folder


def mix(corpus, **kwargs) -> DataConfig:
    return DataConfig(sources=[{"name": "web", "kind": "jsonl", "path": str(corpus)}], seq_len=32,
                      micro_batch_size=2, val_fraction=0.1, **kwargs)


def curation(tmp_path, eval_data_dir=None, **kwargs) -> CurationConfig:
    decontamination = None
    if eval_data_dir is not None:
        decontamination = DecontamConfig(data_dir=str(eval_data_dir), benchmarks=[BenchmarkSet(
            "arc_easy", "allenai/ai2_arc", "ARC-Easy", ["test"], ["question", "choices.text"])])
    prose_dedup = {"workers": 1}
    return CurationConfig(out_dir=str(tmp_path / "curated"), decontamination=decontamination, progress=False,
                          prose_dedup=prose_dedup, documents_per_shard=8, **kwargs)


def test_every_stage_counts_what_it_removed(corpus, tmp_path, eval_data_dir):
    manifest = curate(mix(corpus), curation(tmp_path, eval_data_dir), load_tokenizer(), log=lambda m: None)
    web = manifest["sources"]["web"]
    assert web["read_skipped"]["bad_json"] == 2  # the broken line and the line of invalid UTF-8
    assert web["read_skipped"]["missing_field"] == 1 and web["read_skipped"]["empty"] == 1
    assert web["read_skipped"]["truncated_file"] == 1
    read = web["documents"]["read"]
    assert web["removed"]["filter"] == {"too_short": 1}
    assert web["removed"]["exact_dedup"] == {"duplicate": 1}
    assert web["removed"]["near_dedup"] == {"near_duplicate": 1}
    assert web["removed"]["decontaminate"] == {"contaminated": 1}
    assert web["documents"]["decontaminate"] == read - 4
    hit = manifest["contamination"][0]
    assert hit["benchmarks"] == {"arc_easy": 1} and hit["items"][0]["item"].startswith("test/")
    cluster = manifest["duplicate_clusters"][0]
    assert cluster["size"] == 2 and cluster["kept"]["index"] < cluster["removed"][0]["index"]
    # Every good record around the bad ones is kept: 30 + 2 (b.jsonl) + the readable part of c.jsonl.gz.
    assert 32 < read < 30 + 4 + 2 + 40
    streams = web["streams"]
    assert streams["train"]["documents"] + streams["val"]["documents"] == web["documents"]["budget"]
    assert streams["train"]["tokens"] == sum(s["tokens"] for s in read_stream(tmp_path / "curated", "web.train"))
    # Tokens are counted at every stage; the streams add BOS and EOS to each document.
    assert web["tokens"]["read"] > web["tokens"]["filter"] > web["tokens"]["decontaminate"] > 0
    assert streams["train"]["tokens"] + streams["val"]["tokens"] == web["tokens"]["budget"] + 2 * web["documents"][
        "budget"]


def test_a_missing_path_fails_before_any_work(tmp_path):
    data = DataConfig(sources=[{"name": "gone", "kind": "jsonl", "path": str(tmp_path / "nowhere")}])
    with pytest.raises(FileNotFoundError, match="gone.*nowhere"):
        curate(data, curation(tmp_path), load_tokenizer(), log=lambda m: None)
    assert not (tmp_path / "curated").exists()


def test_a_50_mb_document_is_counted_as_too_long_not_a_crash(tmp_path):
    folder = tmp_path / "big"
    folder.mkdir()
    (folder / "a.txt").write_text(prose(1))
    (folder / "b.txt").write_text("word " * 10_000_000)
    manifest = curate(DataConfig(sources=[{"name": "t", "kind": "text", "path": str(folder)}], val_fraction=0.0),
                      curation(tmp_path), load_tokenizer(), log=lambda m: None)
    assert manifest["sources"]["t"]["removed"]["filter"] == {"too_long": 1}
    assert manifest["sources"]["t"]["streams"]["train"]["documents"] == 1
    # Read and counted in characters, but not tokenised (about 40 s of a tokeniser's time): the filter drops it.
    assert manifest["sources"]["t"]["characters"]["read"] > 50_000_000
    assert manifest["sources"]["t"]["tokens"]["read"] < 10_000


def test_only_documents_the_filter_drops_as_too_long_skip_tokenising():
    from moxin.curate.pipeline import too_long_from

    sources = [{"name": "web", "kind": "text", "path": "x"},
               {"name": "code", "kind": "text", "path": "x", "profile": "code"},
               {"name": "qa", "kind": "text", "path": "x", "profile": "qa"}]
    data = DataConfig(sources=sources)
    assert too_long_from(data, CurationConfig(out_dir="x", code_filters={"max_chars": 500})) == {
        "web": 1_000_000, "code": 500, "qa": None}
    assert too_long_from(data, CurationConfig(out_dir="x", prose_filters={"disabled": ["too_long"]}))["web"] is None


def test_a_rerun_resumes_and_a_changed_config_is_refused(corpus, tmp_path):
    tokenizer = load_tokenizer()
    messages = []
    first = curate(mix(corpus), curation(tmp_path), tokenizer, log=messages.append)
    out = tmp_path / "curated" / "web.train"
    shards = sorted(out.glob("shard-*.json"))
    assert len(shards) >= 2
    # An interrupted run: the last shard lost its sidecar (its .bin may be half written).
    last_bin = shards[-1].with_suffix(".bin")
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("shard-*.bin") if p != last_bin}
    shards[-1].unlink()
    messages.clear()
    second = curate(mix(corpus), curation(tmp_path), tokenizer, log=messages.append)
    assert any("not written again" in m for m in messages)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # finished shards untouched
    assert second["sources"]["web"]["streams"] == first["sources"]["web"]["streams"]
    with pytest.raises(ValueError, match="another configuration"):
        curate(mix(corpus), curation(tmp_path, exact_dedup=False), tokenizer, log=lambda m: None)


def test_token_budget_keeps_the_weighted_share(corpus, tmp_path):
    manifest = curate(mix(corpus, token_budget=600), curation(tmp_path), load_tokenizer(), log=lambda m: None)
    web = manifest["sources"]["web"]
    assert web["removed"]["budget"]["over_budget"] > 0
    assert web["streams"]["train"]["documents"] < web["documents"]["decontaminate"]


def test_report_shows_stages_reasons_clusters_and_hits(corpus, tmp_path, eval_data_dir):
    manifest = curate(mix(corpus), curation(tmp_path, eval_data_dir), load_tokenizer(), log=lambda m: None)
    text = report_markdown(manifest)
    assert "| web | " in text and "too_short" in text and "near_duplicate" in text
    assert "Largest duplicate clusters (1 in all)" in text and "arc_easy" in text
    markdown, plot = write_report(manifest, str(tmp_path / "curated"))
    assert os.path.getsize(plot) > 1000 and open(markdown).read() == text


def test_winogrande_blanks_split_an_item_into_the_parts_around_them():
    cfg = DecontamConfig(benchmarks=[])
    index = ContaminationIndex(cfg)
    sentence = ("After the long storm the old fishing boat and the little harbour wall were both badly damaged "
                "and the _ sank")
    index.add("winogrande", "1", *sentence.split("_"))
    filled = sentence.replace("_", "boat")  # how the capability template writes it
    assert index.hits(f"Some text. {filled}. More text.") == [("winogrande", "1")]


def test_contamination_index_matches_items_and_short_items(eval_data_dir):
    cfg = DecontamConfig(data_dir=str(eval_data_dir), benchmarks=[BenchmarkSet(
        "arc_easy", "allenai/ai2_arc", "ARC-Easy", ["test"], ["question", "choices.text"])])
    index = ContaminationIndex(cfg)
    # Pieces are indexed apart: two questions have >= 8 words; the short ones and every choice are too generic.
    assert index.items["arc_easy"] == 2 and index.unchecked["arc_easy"] == 3
    assert index.hits("Intro. " + ARC_ITEM.upper() + " and more") == [("arc_easy", "test/arc-0")]
    assert index.hits(prose(7)) == []
    index.add("mini", "x", "one two three four five six seven eight nine")  # 9 words: matched whole
    assert index.hits("zero one two three four five six seven eight nine ten") == [("mini", "x")]
    assert index.hits("one two three four five six seven eight") == []


def test_pretraining_reads_the_curated_shards_and_resumes_its_position(corpus, tmp_path):
    cfg = curation(tmp_path)
    curate(mix(corpus), cfg, load_tokenizer(), log=lambda m: None)
    data = mix(corpus, shards_dir=cfg.out_dir, num_samples=12)
    module = PretrainDataModule(data)
    module.setup()
    order = [batch["input_ids"] for batch in module.train_dataloader()]
    assert module.summary["sources"]["web"]["shards"]["train"]["rows"] > 0
    resumed = PretrainDataModule(data)
    resumed.load_state_dict({"consumed_samples": 4})  # two batches of two were consumed
    resumed.setup()
    rest = [batch["input_ids"] for batch in resumed.train_dataloader()]
    assert all((a == b).all() for a, b in zip(order[2:], rest, strict=False)) and len(rest) >= len(order) - 2


def test_prepare_data_task(make_cfg, corpus, tmp_path):
    from moxin.train import run

    sources = f"[{{name: web, kind: jsonl, path: '{corpus}'}}]"
    cfg = make_cfg("task=prepare_data", f"data.sources={sources}", "curation.decontamination=null",
                   "curation.prose_dedup.workers=1", "curation.code_dedup.workers=1", "logger=csv")
    out = run(cfg)
    manifest = json.loads(open(os.path.join(out["out_dir"], "manifest.json")).read())
    assert manifest["tokenizer"] == "mistral_v1" and out["tokens"]["web"]["train"] > 0
    assert os.path.exists(out["report"])


def test_capability_items_that_repeat_an_evaluation_item_are_dropped(tmp_path, eval_data_dir):
    """Phase 3's benchmark training splits go through decontamination like any source."""
    items = tmp_path / "arc_train"
    items.mkdir()
    rows = [  # one training item that is really an ARC-Easy test item (tests/eval_fixtures.py), one clean one
        {"id": "leak", "question": "Which of these is a liquid at room temperature?",
         "choices": {"text": ["rock", "water", "wood", "iron"], "label": ["A", "B", "C", "D"]}, "answerKey": "B"},
        {"id": "clean", "question": "Which season comes after winter in the northern half of the world?",
         "choices": {"text": ["spring", "autumn", "summer", "none"], "label": ["A", "B", "C", "D"]}, "answerKey": "A"},
    ]
    (items / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    shipped = OmegaConf.load(CONF / "data" / "capability_enhancement.yaml")
    template = next(s.template for s in shipped.sources if s.name == "arc_challenge")  # the real phase-3 format
    data = DataConfig(sources=[{"name": "arc", "kind": "jsonl", "path": str(items), "template": template,
                                "profile": "qa"}], val_fraction=0.0)
    manifest = curate(data, curation(tmp_path, eval_data_dir), load_tokenizer(), log=lambda m: None)
    arc = manifest["sources"]["arc"]
    assert arc["removed"]["decontaminate"] == {"contaminated": 1} and "filter" not in arc["removed"]
    assert arc["streams"]["train"]["documents"] == 1
