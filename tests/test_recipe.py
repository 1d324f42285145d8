"""Pretraining phases, context groups, the +scale=tiny switch, and the recipe runner."""

import csv
import json

import pytest
from hydra.utils import instantiate

from moxin.train import run

PHASES = ("phase1_2k", "phase2_4k", "phase3_enhanced")
STAGES = (*PHASES, "sft", "dpo", "cot_sft", "grpo")  # the tiny recipe: pretraining, post-training, reasoning


def test_phase_experiments_compose_at_full_scale(make_cfg):
    seq_lens, inits = [], []
    for phase in PHASES:
        cfg = make_cfg(f"+experiment={phase}")
        assert cfg.model.n_layers == 36 and cfg.hardware.accelerator == "gpu"
        seq_lens.append(cfg.context.seq_len)
        inits.append(cfg.phase.init_from)
        assert all(s.kind == "hf" for s in cfg.data.sources)  # the hub corpora by name
    assert seq_lens == [2048, 4096, 4096] and inits == [None, "previous", "previous"]
    enhanced = make_cfg("+experiment=phase3_enhanced")
    assert {"arc_challenge", "hellaswag", "winogrande", "mmlu_aux", "race", "obqa"} <= {
        s.name for s in enhanced.data.sources}
    assert "EXPERIMENTAL" in enhanced.data.warning and "inflates" in enhanced.data.warning


def test_every_phase_runs_offline_at_tiny_scale_with_one_override(make_cfg):
    seq_lens = []
    for phase in PHASES:
        cfg = make_cfg(f"+experiment={phase}", "+scale=tiny")
        assert cfg.model.dim == 128 and cfg.hardware.accelerator == "cpu"
        data = instantiate(cfg.data)
        assert {s.kind for s in data.sources} <= {"kjv", "python_stdlib", "jsonl"}  # nothing from the hub
        seq_lens.append(cfg.context.seq_len)
    assert seq_lens[1] > seq_lens[0]  # phase 2 still has the longer context


def test_capability_templates_turn_items_into_text(make_cfg):
    from moxin.data.sources import SourceStats, iter_documents

    data = instantiate(make_cfg("+experiment=phase3_enhanced", "+scale=tiny").data)
    (capability,) = [s for s in data.sources if s.name == "capability_tiny"]
    stats = SourceStats()
    docs = list(iter_documents(capability, stats))
    assert stats.skipped["template_error"] == 0 and len(docs) == 18
    assert "Question: Which part of a plant takes in water from the soil?\nAnswer: roots" in docs
    assert "The trophy would not fit in the suitcase because the trophy was too big." in docs
    assert any(d.endswith("Answer: A") and "A. H2O" in d for d in docs)  # MMLU's letter answer
    assert any(d.endswith("Answer: each evening") for d in docs)  # RACE's answer by option letter


def build_every_table_from_the_recipe_runs(make_cfg, tmp_path, root, data_dir) -> None:
    """The recipe's stages carry run records; evaluations of two stages (zero-shot ARC-E on the local
    eval fixtures) count for those stages; task=report builds every table from the folder."""
    for stage in ("phase2_4k", "phase3_enhanced"):
        run(make_cfg("task=evaluate", "eval=zeroshot", f"ckpt={root / stage}", f"eval.data_dir={data_dir}",
                     "eval.limit=4", "eval.tasks=[{name: arc_easy, num_fewshot: 0, metric: acc_norm, column: ARC-E}]",
                     run_name=f"eval_{stage}"))
    out = run(make_cfg("task=report", f"report.runs={tmp_path}", "report.tags=[]", run_name="report"))
    from moxin.report import table_names

    assert sorted(out["tables"]) == table_names() and out["models"] == len(STAGES)
    recipe_table = list(csv.reader((tmp_path / "report" / "tiny_recipe.csv").open()))
    by_label = {row[0]: dict(zip(recipe_table[0], row, strict=True)) for row in recipe_table[1:]}
    assert len(by_label) == len(STAGES)
    losses = [float(row["val loss (own objective)"]) for label, row in by_label.items() if "DeepScaleR" not in label]
    assert len(losses) == len(STAGES) - 1 and min(losses) > 0
    assert 0 <= float(by_label["Moxin-7B-DPO"]["DPO pref. acc. (%)"]) <= 100
    assert 0 <= float(by_label["Moxin-7B-RL-DeepScaleR"]["GRPO greedy acc. (%)"]) <= 100
    ablation = list(csv.reader((tmp_path / "report" / "enhancement_ablation.csv").open()))
    header, rows = ablation[0], {(r[0], r[-2]): r for r in ablation[1:]}
    arc_e = header.index("ARC-E")
    for label in ("Moxin-7B-Original", "Moxin-7B-Enhanced"):
        assert 0 <= float(rows[(label, "ours")][arc_e]) <= 100 and rows[(label, "published")][arc_e]
    stage_record = json.loads((root / "sft" / "results.json").read_text())
    assert stage_record["run"]["experiment"] == "sft_tulu3" and "recipe:moxin_tiny" in stage_record["run"]["tags"]
    assert stage_record["data_manifest"]["hash"] and stage_record["metrics"]["train/steps"] == 4


@pytest.mark.slow
def test_tiny_recipe_runs_the_phases_in_order_and_skips_finished_stages(make_cfg, tmp_path, capsys, eval_data_dir):
    quick = "recipe.overrides=['+scale=tiny','phase.max_steps=4','phase.val_every_steps=4']"
    first = run(make_cfg("+recipe=moxin_tiny", quick))
    assert list(first) == list(STAGES)
    root = tmp_path / "recipes" / "moxin_tiny"
    for i, phase in enumerate(STAGES):
        saved = json.loads((root / phase / "metrics.json").read_text())
        assert saved["train/steps"] == 4
        config = (root / phase / "config.yaml").read_text()
        assert (f"init_from: {root / STAGES[i - 1]}" in config) == (i > 0)  # hand-off from the stage before
    assert "EXPERIMENTAL" in capsys.readouterr().out  # phase 3's mix says so in the run's log

    build_every_table_from_the_recipe_runs(make_cfg, tmp_path, root, eval_data_dir)

    (root / "phase3_enhanced" / "metrics.json").unlink()  # as if phase 3 had been killed
    second = run(make_cfg("+recipe=moxin_tiny", quick))
    out = capsys.readouterr().out
    assert "phase1_2k: finished earlier, skipped" in out and "phase2_4k: finished earlier, skipped" in out
    assert "phase3_enhanced: running" in out and "Resuming from" in out  # from its own newest checkpoint
    assert second["phase1_2k"] == {k: v for k, v in first["phase1_2k"].items() if k != "stage_seconds"}
    assert "has changed since" not in out

    run(make_cfg("+recipe=moxin_tiny", quick.replace("max_steps=4", "max_steps=5")))
    assert "phase1_2k: finished earlier, skipped" in (out := capsys.readouterr().out)
    assert "its configuration has changed since (phase)" in out


@pytest.mark.slow
def test_tiny_sft_then_dpo_improve_their_metrics(make_cfg, tmp_path):
    """SFT on instructions made by code lowers the held-out loss on replies; DPO from that model on
    pairs (chosen = correct answer, rejected = wrong) makes the policy prefer the correct answers of
    held-out pairs."""
    sft = run(make_cfg("+experiment=sft_tulu3", "+scale=tiny", "phase.init_from=null", run_name="sft"))
    assert sft["val/loss"] < 0.3 * sft["val/loss_initial"]
    assert json.loads((tmp_path / "sft" / "data.json").read_text())["sources"]["instructions"]["kept"] == 2000
    # 200 of DPO's tiny run's ~715 steps, for the suite's time: the thresholds below hold with room (measured:
    # validation loss 0.34, reward accuracy 0.84, preference accuracy 0.72 -> 0.86).
    dpo = run(make_cfg("+experiment=dpo_tulu3", "+scale=tiny", f"phase.init_from={tmp_path / 'sft'}",
                       "phase.max_steps=200", run_name="dpo"))
    assert dpo["val/loss_initial"] == pytest.approx(0.6931, abs=1e-3)  # the policy starts as its reference
    assert dpo["val/loss"] < 0.6 and "train/loss" in dpo and "train/loss" in sft
    assert dpo["val/reward_accuracy"] > 0.7
    assert dpo["val/preference_accuracy"] > max(0.75, dpo["val/preference_accuracy_initial"] + 0.04)


@pytest.mark.slow
def test_tiny_reasoning_sft_then_grpo_raises_the_reward(make_cfg, tmp_path):
    """Reasoning SFT on worked sums (the answer boxed in half of them), then GRPO with DeepScaleR's
    reward (correct, boxed, after </think>): the held-out reward of the greedy answers rises."""
    sft = run(make_cfg("+experiment=cot_sft_openr1", "+scale=tiny", "phase.init_from=null", run_name="cot"))
    assert sft["val/loss"] < 0.3
    # Half of GRPO's tiny run, for the suite's time: the held-out reward rises from 0 to about 0.8 by then.
    grpo = run(make_cfg("+experiment=grpo_deepscaler", "+scale=tiny", f"phase.init_from={tmp_path / 'cot'}",
                        "phase.max_steps=15", "phase.val_every_steps=15", run_name="grpo"))
    assert grpo["train/steps"] == 15
    assert grpo["val/reward"] >= grpo["val/reward_initial"] + 0.3
    for name in ("train/reward_std", "train/accuracy", "train/response_length", "train/clip_fraction", "train/kl",
                 "train/entropy", "train/rollout_s", "train/update_s"):
        assert name in grpo, name


def test_deepscaler_recipe_lengthens_responses_from_a_given_start(make_cfg, tmp_path):
    from moxin.recipe import run_recipe

    seen = []

    def record(stage_cfg):
        seen.append((stage_cfg.phase.init_from, stage_cfg.phase.grpo.max_new_tokens, stage_cfg.phase.grpo.reward))
        return {}

    cfg = make_cfg("+recipe=deepscaler", f"recipe.init_from={tmp_path / 'cot_sft'}")
    run_recipe(cfg, record)
    root = tmp_path / "recipes" / "deepscaler"
    assert seen == [(str(tmp_path / "cot_sft"), 8192, "deepscaler"), (str(root / "grpo_8k"), 16384, "deepscaler"),
                    (str(root / "grpo_16k"), 24576, "deepscaler")]
    with pytest.raises(ValueError, match="recipe.init_from"):
        run_recipe(make_cfg("+recipe=deepscaler"), record)
