"""`task=evaluate` (a checkpoint through a suite) and `task=eval_data` (local dataset copies)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from moxin.eval.runner import print_table, run_suite, summary_metrics, wandb_table, write_results
from moxin.eval.suites import EvalSuite, datasets_of, declared_configs, task_manager
from moxin.records import model_run


def suite_from_config(eval_cfg: DictConfig) -> tuple[EvalSuite, int]:
    """The suite of the `eval` config group, and its every_n_steps (the training callback's)."""
    values = OmegaConf.to_container(eval_cfg, resolve=True)
    every_n_steps = int(values.pop("every_n_steps", 0) or 0)
    return EvalSuite(**values), every_n_steps


def model_label(ckpt: str) -> str:
    """A short name for tables: the run or model folder's name."""
    path = Path(os.path.normpath(os.path.expanduser(ckpt)))
    if path.suffix == ".ckpt":  # run/checkpoints/step-10.ckpt
        return f"{path.parent.parent.name}/{path.stem}"
    return path.parent.name if path.name == "final" else path.name


def evaluate_task(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate `ckpt` (a Hugging Face folder, a run folder or a .ckpt) on the `eval` suite."""
    from moxin.eval.lm import MoxinLM
    from moxin.system import configure_cpu, inference_device

    if not cfg.ckpt:
        raise ValueError("task=evaluate needs ckpt=PATH (a Hugging Face folder, a run folder or a .ckpt)")
    suite, _ = suite_from_config(cfg.eval)
    run_dir = Path(cfg.paths.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.tracking.model_run = model_run(cfg.ckpt)  # the row this evaluation fills: in results.json and W&B
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    configure_cpu(cfg.hardware.get("tune_cpu_allocator", False), cfg.hardware.get("onednn_linears", False))

    lm = MoxinLM(ckpt=cfg.ckpt, tokenizer_name=cfg.data.tokenizer, batch_size=suite.batch_size,
                 max_length=suite.max_length, max_gen_toks=suite.max_gen_toks,
                 device=inference_device(cfg.hardware.accelerator))
    results = run_suite(lm, suite, run_dir)
    label = model_label(cfg.ckpt)
    path = write_results(results, suite, run_dir / "results.json", label)
    print_table(results["paper_row"], suite, label)
    print(f"results: {path}")
    _log_to_wandb(cfg, suite, results["paper_row"], label)
    return {"paper_row": results["paper_row"], "results": str(path), "run_dir": str(run_dir),
            "metrics": summary_metrics(results["paper_row"], suite),
            "record": {"run": {"ckpt": str(cfg.ckpt), "model_label": label}}}


def _log_to_wandb(cfg: DictConfig, suite: EvalSuite, row: dict[str, float], label: str) -> None:
    from moxin.tracking import standalone_wandb_run

    with standalone_wandb_run(cfg) as run:
        if run is not None:
            run.summary.update(summary_metrics(row, suite))
            run.log({f"eval/{suite.name}/table": wandb_table([(label, row)])})


def eval_data_task(cfg: DictConfig) -> dict[str, Any]:
    """Copy every dataset the `eval` suite reads to eval.data_dir (needs the internet)."""
    suite, _ = suite_from_config(cfg.eval)
    if not suite.data_dir:
        raise ValueError("task=eval_data needs eval.data_dir=FOLDER (or MOXIN_EVAL_DATA) to write the copies to")
    written = make_local_copies(suite, suite.data_dir, work_dir=Path(cfg.paths.run_dir))
    print(f"{len(written)} dataset configs under {suite.data_dir}; evaluate offline with "
          f"HF_DATASETS_OFFLINE=1 eval.data_dir={suite.data_dir}")
    return {"written": [str(p) for p in written]}


def make_local_copies(suite: EvalSuite, data_dir: str, work_dir: Path,
                      load_dataset: Callable | None = None, overwrite: bool = False) -> list[Path]:
    """Write each dataset as <data_dir>/<dataset_path>/<config>/<split>-<hash>.parquet plus a README.md
    whose `configs:` header lets `datasets.load_dataset(<folder>, <config>)` read it offline, as it
    reads the hub repository. The content hash in the file names keeps the `datasets` cache from
    serving an older copy's rows."""
    if load_dataset is None:
        from datasets import load_dataset
    from tqdm import tqdm

    tm = task_manager(dataclasses.replace(suite, data_dir=None), work_dir)
    wanted = list(dict.fromkeys((p, c, json.dumps(k, sort_keys=True)) for t in suite.tasks
                                for p, c, k in datasets_of(tm, t.name)))
    written = []
    for path, config, kwargs in tqdm(wanted, desc="local copies of eval datasets"):
        folder = Path(data_dir).expanduser() / path
        name = config or "default"
        if name in (declared_configs(folder) or set()) and not overwrite:
            continue
        splits = load_dataset(path, config, **json.loads(kwargs))
        staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=_mkdir(folder)))
        files = []
        for split, data in splits.items():
            data.to_parquet(str(staging / "part.parquet"))
            digest = hashlib.sha256((staging / "part.parquet").read_bytes()).hexdigest()[:12]
            (staging / "part.parquet").rename(staging / f"{split}-{digest}.parquet")
            files.append({"split": split, "path": f"{name}/{split}-{digest}.parquet"})
        shutil.rmtree(folder / name, ignore_errors=True)
        staging.rename(folder / name)  # the config appears whole or not at all
        _declare_config(folder / "README.md", name, files)
        written.append(folder / name)
    return written


def _mkdir(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _declare_config(readme: Path, name: str, files: list[dict[str, str]]) -> None:
    """Add or replace one config in the README's YAML header (the hub's dataset-card format)."""
    configs = []
    if readme.exists():
        header = readme.read_text().split("---")
        configs = (yaml.safe_load(header[1]) or {}).get("configs", []) if len(header) >= 3 else []
    configs = [c for c in configs if c.get("config_name") != name]
    configs.append({"config_name": name, "data_files": files})
    readme.write_text("---\n" + yaml.safe_dump({"configs": configs}, sort_keys=False) + "---\n"
                      "Local copy written by moxin (task=eval_data) for offline evaluation.\n")
