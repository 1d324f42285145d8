"""Run records and the report: tables from recorded runs (checked against expected files), from a
real 2-point multirun, the W&B path, and the analysis notebook."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moxin import records, report

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).parent / "fixtures" / "report_runs.json"
EXPECTED = Path(__file__).parent / "expected" / "report"


def write_fixture_runs(root: Path) -> None:
    """The recorded runs of fixtures/report_runs.json as run folders with results.json under root."""
    for folder, record in json.loads(FIXTURES.read_text())["runs"].items():
        record = json.loads(json.dumps(record))
        model_run = record["run"].get("model_run")
        if model_run:
            model_run["run_dir"] = str(root / model_run["run_dir"])
        (root / folder).mkdir(parents=True)
        (root / folder / "results.json").write_text(json.dumps({**record, "run_dir": str(root / folder)}))


@pytest.fixture
def fixture_models(tmp_path):
    write_fixture_runs(tmp_path / "runs")
    return report.collect_models(report.load_local_runs(tmp_path / "runs")), tmp_path / "runs"


@pytest.mark.parametrize("name", report.table_names())
def test_every_table_from_recorded_runs_matches_the_expected_files(name, fixture_models):
    models, runs = fixture_models
    table = report.build_table(report.load_spec(name), models)
    for suffix, text in (("md", table.to_markdown()), ("tex", table.to_latex()), ("csv", table.to_csv())):
        expected = (EXPECTED / f"{name}.{suffix}").read_text()
        assert text.replace(str(runs), "<runs>") == expected, f"{name}.{suffix} differs from {EXPECTED}"


def test_a_model_row_gathers_its_evaluations_and_the_newest_rerun_wins(fixture_models):
    models, runs = fixture_models
    enhanced = next(m for m in models if m.experiment == "phase3_enhanced" and m.checkpoint is None)
    assert enhanced.key == "aaaa000000000002@final" and enhanced.train_dir == str((runs / "base" / "phase3").resolve())
    assert enhanced.metrics["val/loss"] == 2.25  # from the training run
    assert enhanced.metrics["eval/zeroshot/ARC-C"] == 58.5 and enhanced.metrics["eval/fewshot/ARC-C"] == 59.5
    table = report.build_table(report.load_spec("few_shot_base"), models)
    ours = {r.label: r for r in table.rows if r.source == "ours"}
    assert ours["Moxin-7B-Enhanced"].average == pytest.approx((59.5 + 83.0 + 61.0 + 78.5) / 4)
    assert set(ours["Moxin-7B-Original"].values.values()) == {None}  # trained, never evaluated few-shot
    assert ours["Moxin-7B-Original"].average is None and table.missing == []
    assert report.build_table(report.load_spec("rl_frameworks"), models).missing == ["Moxin-7B-RL-AReal"]
    published = {r.label: r for r in table.rows if r.source == "published"}
    assert published["Moxin-7B-Enhanced"].values["MMLU"] == 60.97 and published["Moxin-7B-Enhanced"].average == 70.55
    assert not any(m.experiment == "report" for m in models)  # a report measures no model


def test_an_intermediate_checkpoint_is_a_model_of_its_own(fixture_models):
    models, _ = fixture_models
    table = report.build_table(report.load_spec("few_shot_base"), models)
    enhanced = next(r for r in table.rows if r.source == "ours" and r.label == "Moxin-7B-Enhanced")
    assert enhanced.values["ARC-C"] == 59.5  # the step-2 evaluation, newer, did not overwrite the final model's
    spec = report.load_spec("few_shot_base")
    spec.rows = [report.RowSpec(label="Enhanced", experiment="phase3_enhanced", checkpoint="any")]
    labels = [r.label for r in report.build_table(spec, models).rows if r.source == "ours"]
    assert sorted(labels) == ["Enhanced (aaaa000000000002)", "Enhanced (step-2)"]


def test_labels_are_escaped_for_latex_and_markdown(fixture_models):
    models, _ = fixture_models
    spec = report.load_spec("sweep")
    spec.title = "50% of {a_b} & $x^2$ ~ #1"
    table = report.build_table(spec, models)
    table.rows[0].label = "a|b"
    latex = table.to_latex()
    assert r"50\% of \{a\_b\} \& \$x\textasciicircum{}2\$ \textasciitilde{} \#1" in latex
    assert "| a\\|b |" in table.to_markdown()


def test_config_hash_ignores_where_a_run_reads_and_writes(make_cfg, tmp_path):
    base = records.static_record(make_cfg("+experiment=tiny_debug"))["config_hash"]
    moved = make_cfg("+experiment=tiny_debug", f"paths.output_root={tmp_path / 'other'}", "name=renamed",
                     f"data.cache_dir={tmp_path / 'cache'}", "eval.data_dir=/elsewhere", run_name="again")
    assert records.static_record(moved)["config_hash"] == base


def test_model_run_finds_the_training_run_of_a_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "final").mkdir(parents=True)
    (run_dir / "checkpoints").mkdir()
    (run_dir / "results.json").write_text(json.dumps({"config_hash": "h1", "run": {"task": "train",
                                                                                   "experiment": "sft_tulu3"}}))
    assert records.model_run(str(run_dir))["checkpoint"] is None
    assert records.model_run(str(run_dir / "final"))["config_hash"] == "h1"
    assert records.model_run(str(run_dir / "checkpoints" / "last.ckpt"))["checkpoint"] is None
    assert records.model_run(str(run_dir / "checkpoints" / "step-4.ckpt"))["checkpoint"] == "step-4"
    assert records.model_run(str(tmp_path / "elsewhere")) is None
    (run_dir / "results.json").write_bytes(b"\xff\xfe not json")
    assert records.model_run(str(run_dir)) is None


def test_rows_can_be_filtered_by_tags_and_sweeps(fixture_models):
    models, _ = fixture_models
    sweep = report.build_table(report.load_spec("sweep"), models)
    assert [r.label for r in sweep.rows] == ["phase.optimizer.lr=0.001", "phase.optimizer.lr=0.003"]
    assert report.build_table(report.load_spec("sweep"), models, sweep="another").rows == []
    tagged = report.build_table(report.load_spec("post_training"), models, tags=["experiment:sft_tulu3"])
    assert [r.label for r in tagged.rows if r.source == "ours"] == ["Moxin-7B-SFT"]


def test_a_bad_table_definition_names_the_file(tmp_path):
    (tmp_path / "broken.yaml").write_text("title: x\ncolumns: [a]\nrows: [{labl: typo}]\n")
    with pytest.raises(ValueError, match="broken.yaml"):
        report.load_spec("broken", tmp_path)
    with pytest.raises(ValueError, match="no table 'nope'"):
        report.load_spec("nope", tmp_path)
    (tmp_path / "extra.yaml").write_text("title: x\ncolumns: [a]\nrows: []\ncolour: red\n")
    with pytest.raises(ValueError, match="colour"):
        report.load_spec("extra", tmp_path)


def test_unreadable_records_are_skipped_not_fatal(tmp_path, caplog):
    write_fixture_runs(tmp_path / "runs")
    (tmp_path / "runs" / "torn").mkdir()
    (tmp_path / "runs" / "torn" / "results.json").write_text("{not json")
    (tmp_path / "runs" / "latin1").mkdir()
    (tmp_path / "runs" / "latin1" / "results.json").write_bytes(b'{"config_hash": "\xe9"}')
    (tmp_path / "runs" / "old").mkdir()
    (tmp_path / "runs" / "old" / "results.json").write_text('{"config_hash": "x", "run": "not a dict"}')
    assert len(report.load_local_runs(tmp_path / "runs")) == len(json.loads(FIXTURES.read_text())["runs"])
    assert "2 unreadable results.json" in caplog.text


def test_tables_through_the_wandb_api_equal_the_local_ones(fixture_models):
    """An online W&B run carries the static record under config['moxin'] and the metrics in its summary."""
    models, runs = fixture_models
    local = report.load_local_runs(runs)

    class FakeRun:
        def __init__(self, record):
            self.config = {"lr": 1, "moxin": {k: v for k, v in record.items() if k != "metrics"}}
            self.summary = {**record["metrics"], "_step": 3, "sample": "text"}
            self.url = "https://wandb.example/run"

    class FakeApi:
        def runs(self, path, filters=None, lazy=True):
            assert path == "team/moxin" and filters == {"state": "finished"} and lazy is False
            return [FakeRun(r) for r in local] + [type("Other", (), {"config": {}, "summary": {}, "url": ""})()]

    online = report.collect_models(report.load_wandb_runs("moxin", "team", api=FakeApi()))
    for name in report.table_names():
        spec = report.load_spec(name)
        assert report.build_table(spec, online).to_csv() == report.build_table(spec, models).to_csv()


def test_the_record_names_config_code_packages_and_hardware(make_cfg, tmp_path):
    cfg = make_cfg("+experiment=tiny_debug", "tracking.tags=[ablation-a]")
    record = records.static_record(cfg)
    assert record["run"]["experiment"] == "tiny_debug" and "ablation-a" in record["run"]["tags"]
    assert len(record["config_hash"]) == 16
    assert record["config_hash"] == records.static_record(make_cfg("+experiment=tiny_debug",
                                                                   run_name="elsewhere"))["config_hash"]
    assert record["config_hash"] != records.static_record(make_cfg("+experiment=tiny_debug", "seed=9"))["config_hash"]
    assert record["git"]["commit"] is None or len(record["git"]["commit"]) == 40
    assert record["packages"]["torch"] and record["packages"]["lightning"]
    assert record["hardware"]["cpu_count"] >= 1 and record["hardware"]["options"]["accelerator"] == "cpu"


def test_git_state_sees_uncommitted_changes(tmp_path):
    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "a.txt").write_text("1")
    git("add", "a.txt")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    clean = records.git_state(tmp_path)
    assert len(clean["commit"]) == 40 and clean["dirty"] is False
    (tmp_path / "a.txt").write_text("2")
    assert records.git_state(tmp_path)["dirty"] is True
    assert records.git_state(tmp_path / "nowhere") == {"commit": None, "dirty": None}


def test_wandb_settings_group_and_tag_the_run(make_cfg, tmp_path):
    from moxin.tracking import wandb_settings

    cfg = make_cfg("+experiment=tiny_debug", "logger=default")
    settings = wandb_settings(cfg, tmp_path)
    assert settings["mode"] == "offline" and settings["group"] == "tiny_debug" and settings["job_type"] == "train"
    assert "experiment:tiny_debug" in settings["tags"]
    assert settings["config"]["moxin"]["config_hash"] == records.static_record(cfg)["config_hash"]
    assert wandb_settings(make_cfg("+experiment=tiny_debug", "logger=default", "logger.wandb.group=mine"),
                          tmp_path)["group"] == "mine"
    assert wandb_settings(make_cfg("+experiment=tiny_debug"), tmp_path) is None  # logger=csv: W&B off


def test_committed_notebook_has_no_outputs():
    import nbformat

    notebook = nbformat.read(ROOT / "notebooks" / "analysis.ipynb", as_version=4)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert code and all(c.outputs == [] and c.execution_count is None for c in code), "run `make strip-notebooks`"


@pytest.mark.slow
def test_a_two_point_multirun_lands_in_one_table_and_the_notebook_runs_on_it(make_cfg, tmp_path, monkeypatch):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline"}
    subprocess.run([sys.executable, str(ROOT / "run.py"), "-m", "+experiment=tiny_debug", "phase.max_steps=2",
                    "phase.val_every_steps=2", "phase.checkpoint_every_steps=2", "phase.log_every_steps=1",
                    "logger=default", "progress_bar=false", "phase.optimizer.lr=0.001,0.003",
                    f"paths.output_root={tmp_path}"],
                   env=env, check=True, capture_output=True, timeout=600)
    saved = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("multirun/tiny_debug/*/*/results.json"))]
    assert len(saved) == 2
    groups = {r["run"]["group"] for r in saved}
    assert len(groups) == 1 and groups.pop().startswith("tiny_debug-sweep-")  # one W&B group for the sweep
    assert all(f"sweep:{r['run']['sweep']['id']}" in r["run"]["tags"] for r in saved)
    assert len({r["config_hash"] for r in saved}) == 2 and all(r["metrics"]["train/steps"] == 2 for r in saved)

    from moxin.train import run

    cfg = make_cfg("task=report", "table=sweep", f"report.runs={tmp_path}", "logger=default", run_name="report")
    out = run(cfg)
    assert list((tmp_path / "report" / "wandb").glob("offline-run-*/files/media/images/report/sweep*.png"))
    csv_text = (tmp_path / "report" / "sweep.csv").read_text()
    assert "phase.optimizer.lr=0.001" in csv_text and "phase.optimizer.lr=0.003" in csv_text
    assert out["tables"]["sweep"]["png"].endswith("sweep.png") and out["loss_curves"]

    import nbclient
    import nbformat

    monkeypatch.setenv("MOXIN_RUNS", str(tmp_path))
    notebook = nbformat.read(ROOT / "notebooks" / "analysis.ipynb", as_version=4)
    nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    printed = "".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code" for o in c.outputs)
    assert "2 curves in 1 phases" in printed and "2 models" in printed
