"""Evaluation suites: which lm-eval tasks, with how many shots, reported by which metric.

A suite (conf/eval/*.yaml) lists lm-eval task or group names. Before lm-eval loads them, each
gets a small generated task file that includes lm-eval's own definition and overrides what the
suite sets (shots; `dataset_path` when a local copy exists under `data_dir`), so the tasks run
are lm-eval's, unchanged otherwise, and keep their names in the results.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

# Our own task definitions (PopQA, sandboxed HumanEval): they take precedence over lm-eval's.
OWN_TASKS_DIR = Path(__file__).parent / "tasks"


@dataclass
class EvalTask:
    name: str  # an lm-eval task or group, e.g. "arc_challenge", "mmlu"
    metric: str = "acc"  # the figure the paper reports: "acc_norm", "exact_match,flexible-extract", ...
    num_fewshot: int | None = None  # None: the task's own default
    column: str | None = None  # heading in the paper's table
    repeats: int | None = None  # samples per item (pass@1 averaged over them); None: the task's own

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("every eval task needs a name")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise ValueError(f"task {self.name}: num_fewshot must be >= 0, got {self.num_fewshot}")
        if self.repeats is not None and self.repeats < 1:
            raise ValueError(f"task {self.name}: repeats must be >= 1, got {self.repeats}")
        self.column = self.column or self.name

    @property
    def metric_key(self) -> str:
        """lm-eval's results key: 'metric,filter' (filter 'none' when the config names none)."""
        return self.metric if "," in self.metric else f"{self.metric},none"


@dataclass
class EvalSuite:
    name: str
    tasks: list[EvalTask]
    title: str = ""  # the paper's table caption this suite reproduces
    limit: int | float | None = None  # items per task: quick runs only, not comparable figures
    batch_size: int = 16
    max_length: int | None = None  # None: the model's max_seq_len
    max_gen_toks: int = 256
    apply_chat_template: bool = False  # instruct models: Moxin's chat template (moxin/chat.py)
    fewshot_as_multiturn: bool = False
    confirm_run_unsafe_code: bool = False  # HumanEval: run generated code (sandboxed subprocess)
    data_dir: str | None = None  # local copies: <data_dir>/<dataset_path>/ (see make_local_copies)
    include_path: list[str] = field(default_factory=list)  # more task folders of the user's
    log_samples: bool = False
    seed: int = 1234

    def __post_init__(self) -> None:
        self.tasks = [t if isinstance(t, EvalTask) else EvalTask(**t) for t in self.tasks]
        if not self.tasks:
            raise ValueError(f"eval suite {self.name!r} lists no tasks")
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"eval suite {self.name!r} lists a task twice: {names}")
        self.include_path = list(self.include_path or [])


def task_manager(suite: EvalSuite, work_dir: str | Path):
    """An lm-eval TaskManager that knows our tasks, the user's, and this suite's overrides."""
    from lm_eval.tasks._index import TaskIndex

    base = _base_task_manager(tuple(suite.include_path))
    override_dir = Path(work_dir) / "task_overrides"
    shutil.rmtree(override_dir, ignore_errors=True)  # files of an earlier suite must not linger
    override_dir.mkdir(parents=True)
    for task in suite.tasks:
        for name, cfg in _overrides(base, task, suite.data_dir).items():
            with open(override_dir / f"{name}.yaml", "w") as f:
                yaml.safe_dump(cfg, f, sort_keys=False)
    # Indexing lm-eval's ~10,000 task files takes seconds: index them once per process and lay
    # this suite's few override files over a copy (later entries win, as in lm-eval's own merge).
    manager = copy.copy(base)
    manager._index = {**base.task_index, **TaskIndex.build([override_dir])}
    return manager


@lru_cache(maxsize=4)
def _base_task_manager(include_path: tuple[str, ...]):
    from lm_eval.tasks import TaskManager

    # Replacing lm-eval's humaneval with ours is intended: keep lm-eval from warning about it.
    index_log = logging.getLogger("lm_eval.tasks._index")
    level = index_log.level
    index_log.setLevel(logging.ERROR)
    try:
        return TaskManager(include_path=[str(OWN_TASKS_DIR), *include_path])
    finally:
        index_log.setLevel(level)


def _overrides(tm, task: EvalTask, data_dir: str | None) -> dict[str, dict[str, Any]]:
    """Task files that re-declare `task` with the suite's settings (nothing when it needs none)."""
    from lm_eval.tasks._index import Kind

    entry = _entry(tm, task.name)
    changes: dict[str, Any] = {}
    if task.num_fewshot is not None:
        changes["num_fewshot"] = task.num_fewshot
    if task.repeats is not None:
        changes["repeats"] = task.repeats
    local = local_dataset_path(tm, task.name, data_dir)
    if local is not None:
        changes["dataset_path"] = local
    if not changes:
        return {}
    if entry.kind == Kind.GROUP:
        # A group passes its own non-structural keys down to every member task.
        return {task.name: {"include": str(entry.yaml_path), "group": task.name, **changes}}
    if entry.kind == Kind.TAG:
        raise ValueError(f"{task.name!r} is a tag (a set of tasks without an aggregate); list its tasks "
                         f"in the suite instead: {sorted(entry.tags)}")
    return {task.name: {"include": str(entry.yaml_path), "task": task.name, **changes}}


def _entry(tm, name: str):
    entry = tm.task_index.get(name)
    if entry is None:
        raise ValueError(f"lm-eval knows no task or group named {name!r}")
    return entry


def leaf_tasks(tm, name: str) -> list[Any]:
    """Index entries of the tasks a name stands for (groups and tags expanded)."""
    from lm_eval.tasks._index import Kind

    entry = _entry(tm, name)
    if entry.kind in (Kind.TASK, Kind.PY_TASK):
        return [entry]
    members = sorted(entry.tags) if entry.kind == Kind.TAG else [
        m if isinstance(m, str) else m.get("task") or m.get("group") for m in _as_list(entry.cfg.get("task"))]
    return [leaf for member in members for leaf in leaf_tasks(tm, member)]


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value] if value else []


def datasets_of(tm, name: str) -> list[tuple[str, str | None, dict]]:
    """(dataset_path, dataset_name, dataset_kwargs) of each dataset a task or group reads, without repeats."""
    found: dict[tuple[str, str | None], dict] = {}
    for leaf in leaf_tasks(tm, name):
        path, config = leaf.cfg.get("dataset_path"), leaf.cfg.get("dataset_name")
        if path:
            found.setdefault((path, config), dict(leaf.cfg.get("dataset_kwargs") or {}))
    return [(path, config, kwargs) for (path, config), kwargs in found.items()]


def local_dataset_path(tm, name: str, data_dir: str | None) -> str | None:
    """`<data_dir>/<dataset_path>` if a local copy of the task's dataset is there.

    A copy that lacks a configuration the task reads is an error, not a silent fall-back to the hub.
    """
    if not data_dir:
        return None
    datasets = datasets_of(tm, name)
    paths = {path for path, _, _ in datasets}
    if len(paths) != 1:
        raise ValueError(f"{name!r} reads {len(paths)} datasets ({sorted(paths)}); local copies need one per "
                         f"suite entry: list its member tasks separately")
    (path,) = paths
    local = os.path.abspath(os.path.join(os.path.expanduser(data_dir), path))
    if not os.path.isdir(local):
        return None
    declared = declared_configs(local)
    missing = sorted({config or "default" for _, config, _ in datasets} - declared) if declared is not None else []
    if missing:
        raise FileNotFoundError(f"the local copy {local} lacks configuration(s) {missing} that {name!r} reads; "
                                f"add them with task=eval_data")
    return local


def declared_configs(folder: str | Path) -> set[str] | None:
    """Config names in a dataset folder's README `configs:` header (None: the folder declares none)."""
    readme = Path(folder) / "README.md"
    if not readme.exists():
        return None
    parts = readme.read_text().split("---")
    header = yaml.safe_load(parts[1]) if len(parts) >= 3 else None
    configs = (header or {}).get("configs")
    return {c["config_name"] for c in configs} if configs else None
