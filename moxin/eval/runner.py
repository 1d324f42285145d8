"""Run a suite through lm-eval and report it: results.json, a terminal table in the paper's
layout, and W&B (summary values and a table)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from moxin.eval.suites import EvalSuite, datasets_of, local_dataset_path, task_manager

log = logging.getLogger(__name__)


def run_suite(lm, suite: EvalSuite, work_dir: str | Path, reports: bool = True) -> dict[str, Any] | None:
    """lm-eval's results for every task of the suite, plus `paper_row` (column -> percent). lm-eval
    reports from the process of LOCAL_RANK 0 only: elsewhere the requests run, and with reports=False
    (a tensor-parallel peer of the reporting rank) None is returned."""
    from lm_eval import simple_evaluate

    tm = task_manager(suite, work_dir)
    _check_offline_copies(tm, suite)
    results = simple_evaluate(
        model=lm, tasks=[t.name for t in suite.tasks], task_manager=tm, limit=suite.limit,
        apply_chat_template=suite.apply_chat_template, fewshot_as_multiturn=suite.fewshot_as_multiturn,
        confirm_run_unsafe_code=suite.confirm_run_unsafe_code, log_samples=suite.log_samples,
        random_seed=suite.seed, numpy_random_seed=suite.seed, torch_random_seed=suite.seed,
        fewshot_random_seed=suite.seed,
        **({} if reports else {"bootstrap_iters": 0}),  # a peer's metrics are thrown away: no standard errors
    )
    if results is None:
        if reports:
            raise RuntimeError("lm-eval reported no results: it reports from the process of LOCAL_RANK 0 only, and "
                               f"this one has LOCAL_RANK={os.environ.get('LOCAL_RANK')}; evaluate in one process")
        return None
    results["paper_row"] = paper_row(results, suite)
    return results


def _check_offline_copies(tm, suite: EvalSuite) -> None:
    """Offline, every dataset must be a local copy (or already in the datasets cache): say which are not."""
    if os.environ.get("HF_DATASETS_OFFLINE") != "1" or not suite.data_dir:
        return
    missing = [(t.name, path) for t in suite.tasks for path, _, _ in datasets_of(tm, t.name)
               if local_dataset_path(tm, t.name, suite.data_dir) is None]
    if missing:
        log.warning("HF_DATASETS_OFFLINE=1 and no local copy under %s for %s; these tasks read the datasets "
                    "cache and fail if it lacks them (make copies with task=eval_data)", suite.data_dir,
                    ", ".join(f"{task} ({path})" for task, path in missing))


def paper_row(results: dict[str, Any], suite: EvalSuite) -> dict[str, float]:
    """Each task's reported metric in percent under its column heading, and their average."""
    row: dict[str, float] = {}
    for task in suite.tasks:
        scores = results.get("groups", {}).get(task.name) or results["results"].get(task.name)
        if scores is None or task.metric_key not in scores:
            known = sorted(k for k in (scores or {}) if not k.endswith("_stderr") and "," in k)
            raise KeyError(f"{task.name}: lm-eval reported no {task.metric_key!r}; it reported {known}")
        row[task.column] = 100.0 * float(scores[task.metric_key])
    row["Avg"] = sum(row.values()) / len(row)
    return row


def write_results(results: dict[str, Any], suite: EvalSuite, path: str | Path, model_name: str) -> Path:
    """results.json: the paper row, the suite and lm-eval's full output (minus per-sample logs)."""
    from lm_eval.utils import handle_non_serializable

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"suite": suite.name, "title": suite.title, "model": model_name, "paper_row": results["paper_row"],
               "limit": suite.limit, "lm_eval": {k: v for k, v in results.items() if k not in ("samples", "paper_row")}}
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, default=handle_non_serializable)
    if suite.log_samples and "samples" in results:
        with open(path.with_name(path.stem + "_samples.json"), "w") as f:
            json.dump(results["samples"], f, default=handle_non_serializable)
    return path


def print_table(row: dict[str, float], suite: EvalSuite, model_name: str) -> str:
    """The paper's layout: one row per model, one column per task, then the average."""
    from rich.console import Console
    from rich.table import Table

    title = suite.title or suite.name
    if suite.limit:
        title += f"  (limit={suite.limit}: not comparable with the paper)"
    table = Table(title=title, min_width=len(title) + 4)
    table.add_column("Model")
    for column in row:
        table.add_column(column, justify="right")
    table.add_row(model_name, *(f"{value:.2f}" for value in row.values()))
    console = Console(width=max(100, 14 * (len(row) + 2)), record=True)
    console.print(table)
    return console.export_text()


def summary_metrics(row: dict[str, float], suite: EvalSuite) -> dict[str, float]:
    """eval/<suite>/<column> -> percent."""
    return {f"eval/{suite.name}/{column}": value for column, value in row.items()}


def wandb_table(rows: list[tuple[str, dict[str, float]]]):
    """A wandb.Table in the paper's layout: one row per (model or step) label."""
    import wandb

    columns = list(rows[0][1])
    return wandb.Table(columns=["Model", *columns], data=[[label, *(row[c] for c in columns)] for label, row in rows])
