"""Run records: what a run was and what it measured, so that tables are built from runs, not copied.

Every task run (`moxin.train.run`) ends by writing `results.json` in its run folder:

    run           experiment, task, phase, model, data, group, tags, sweep (id, job, overrides) and, for
                  an evaluation, the evaluated model's own run (`model_run`): how the report finds it
    config        the resolved configuration, and `config_hash` (without paths and logging settings)
    git           commit and whether the tree had uncommitted changes
    packages      versions of the libraries that decide the numbers
    hardware      the machine and the hardware options the run used
    data_manifest the data manifest (curated shards) or the run's data summary, and its hash
    metrics       the run's final scalar metrics (an evaluation's: eval/<suite>/<column>)

The same identity goes to W&B: group and tags (`experiment:NAME`, `phase:...`, `model:...`, `data:...`,
`sweep:ID`), and the whole static record under the run config's `moxin` key.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parent.parent
# Settings that change where a run writes or how it reports, not what it computes.
VOLATILE_KEYS = ("paths", "progress_bar", "resume", "logger", "tracking", "hydra", "objective", "report", "table",
                 "release")
PACKAGES = ("moxin", "torch", "lightning", "transformers", "datasets", "tokenizers", "lm_eval", "trl",
            "hydra-core", "omegaconf", "numpy", "math-verify", "datasketch", "wandb")


def config_hash(config: dict[str, Any]) -> str:
    """A short hash of what the run computes: the resolved config without where it reads and writes
    (folders, paths, the run's name, checkpoints to start from) and without logging options, so that
    the same configuration hashes alike in another folder, checkout or machine."""
    kept = _without_paths({k: v for k, v in config.items() if k not in VOLATILE_KEYS})
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _is_path_key(key: str) -> bool:
    return key.endswith("dir") or "path" in key or key in ("name", "ckpt", "init_from")


def _without_paths(value: Any) -> Any:
    return _pruned(value, _is_path_key)


def _pruned(value: Any, drop) -> Any:
    """value with every dict entry whose key `drop(key)` accepts removed, at any depth."""
    if isinstance(value, dict):
        return {k: _pruned(v, drop) for k, v in value.items() if not drop(str(k))}
    if isinstance(value, list):
        return [_pruned(v, drop) for v in value]
    return value


def git_state(repo: Path = REPO_ROOT) -> dict[str, Any]:
    """The commit and whether tracked files differ from it; nulls outside a git checkout."""
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def package_versions() -> dict[str, str | None]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def hardware_info(hardware: DictConfig | dict | None = None) -> dict[str, Any]:
    import torch

    # Device names only where CUDA is already initialised: initialising it here, before the Trainer
    # starts, would break fork-based strategies (ddp_fork, ddp_notebook).
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] \
        if torch.cuda.is_initialized() else None
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "cpu": _cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                            "cuda_device_count": torch.cuda.device_count(), "cuda_devices": names}
    if hardware is not None:
        chosen = OmegaConf.to_container(hardware, resolve=True) if isinstance(hardware, DictConfig) else hardware
        info["options"] = {k: chosen.get(k) for k in ("accelerator", "devices", "num_nodes", "precision", "strategy")
                           if k in chosen}
    return info


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def data_manifest(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """The curation manifest of the shards a run trained on, else the run's own data summary (without
    whether its tokens came from the cache, which differs between two runs of the same data)."""
    shards = cfg.get("data", {}).get("shards_dir") if isinstance(cfg.get("data"), DictConfig) else None
    manifest = Path(shards) / "manifest.json" if shards else None
    if manifest is not None and manifest.is_file():
        return {"path": str(manifest), "hash": file_hash(manifest)}
    summary = run_dir / "data.json"
    if summary.is_file():
        try:
            content = _pruned(json.loads(summary.read_text()), lambda key: key == "cached")
        except (OSError, ValueError):
            return {"path": str(summary), "hash": None}
        digest = hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:16]
        return {"path": str(summary), "hash": digest}
    return {"path": None, "hash": None}


def option_choices(cfg: DictConfig) -> dict[str, str]:
    """The option chosen in each config group (model: tiny, phase: sft, ...), where Hydra knows it."""
    chosen = cfg.get("tracking", {}).get("choices") if isinstance(cfg.get("tracking"), DictConfig) else None
    if chosen:  # set by the recipe runner for each stage it composes
        return dict(chosen)
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {}
    return {k: str(v) for k, v in HydraConfig.get().runtime.choices.items()
            if v is not None and not k.startswith("hydra")}


def sweep_info() -> dict[str, Any] | None:
    """id (the sweep folder's name), job number and the job's overrides, inside a Hydra multirun."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    hydra_cfg = HydraConfig.get()
    folder = Path(hydra_cfg.sweep.dir)
    # The folder's last two parts (<name>/<time> by default): two sweeps started in the same second
    # under different names stay apart.
    return {"id": f"{folder.parent.name}/{folder.name}", "dir": str(folder.resolve()), "job": hydra_cfg.job.num,
            "overrides": list(hydra_cfg.overrides.task)}


def run_identity(cfg: DictConfig) -> dict[str, Any]:
    """How the run is named, grouped and tagged, in results.json and in W&B alike."""
    choices = option_choices(cfg)
    tracking = cfg.get("tracking") or {}
    phase = cfg.get("phase")
    identity = {
        # The experiment file (+experiment=NAME) where one was chosen: a recipe stage named moxin_tiny-sft is
        # still an sft_tulu3 run; else tracking.experiment (default: the run's name).
        "experiment": choices.get("experiment") or tracking.get("experiment") or cfg.get("name"),
        "name": cfg.get("name"),
        "task": cfg.get("task", "train"),
        "phase": choices.get("phase") or (phase.get("module") if phase is not None else None),
        "model": choices.get("model"),
        "data": choices.get("data"),
        "eval": choices.get("eval") if cfg.get("task") == "evaluate" else None,
        "sweep": sweep_info(),
    }
    sweep = identity["sweep"]
    identity["group"] = tracking.get("group") or (f"{identity['experiment']}-sweep-{Path(sweep['dir']).name}"
                                                  if sweep else identity["experiment"])
    if tracking.get("model_run"):  # an evaluation: the run it evaluated (set by task=evaluate)
        identity["model_run"] = OmegaConf.to_container(tracking.model_run) \
            if isinstance(tracking.model_run, DictConfig) else tracking.model_run
    identity["scale"] = choices.get("scale")
    tags = [f"{key}:{identity[key]}" for key in ("experiment", "task", "phase", "model", "data", "eval", "scale")
            if identity[key]]
    if sweep:
        tags.append(f"sweep:{sweep['id']}")
    identity["tags"] = tags + [str(t) for t in tracking.get("tags") or []]
    return identity


def static_record(cfg: DictConfig) -> dict[str, Any]:
    """Everything known before the run starts (W&B gets it as config; results.json adds metrics)."""
    config = OmegaConf.to_container(cfg, resolve=True)
    config.pop("hydra", None)
    run_dir = cfg.get("paths", {}).get("run_dir") if isinstance(cfg.get("paths"), DictConfig) else None
    return {"run": run_identity(cfg), "config_hash": config_hash(config), "git": git_state(),
            "packages": package_versions(), "hardware": hardware_info(cfg.get("hardware")),
            "run_dir": str(Path(run_dir).resolve()) if run_dir else None, "config": config}


def scalar_metrics(values: dict[str, Any]) -> dict[str, float]:
    """The numbers of a task's result (strings, paths and nested values are not metrics)."""
    out = {}
    for key, value in values.items():
        if isinstance(value, bool):
            continue
        if isinstance(value, (int, float)) or (hasattr(value, "numel") and value.numel() == 1):  # or a tensor
            number = float(value)
            out[key] = number if math.isfinite(number) else None  # JSON has no NaN: null, as "not measured"
    return out


def write_run_record(cfg: DictConfig, run_dir: Path, metrics: dict[str, float], started: float,
                  extra: dict[str, Any] | None = None) -> Path:
    """results.json of the run folder: the record plus metrics, merged into what the task wrote there
    (an evaluation's lm-eval output stays, under its own keys)."""
    path = Path(run_dir) / "results.json"
    try:
        existing = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError) as error:  # a torn file of an earlier attempt: start afresh
        log.warning("results.json of %s unreadable (%s); writing a new one", run_dir, error)
        existing = {}
    static, extra = static_record(cfg), extra or {}
    record = {**existing, **static, **extra}
    record["run"] = {**static["run"], **extra.get("run", {})}
    record.update(data_manifest=data_manifest(cfg, Path(run_dir)),
                  started=_iso(started), finished=_iso(time.time()), seconds=round(time.time() - started, 1),
                  metrics={**existing.get("metrics", {}), **metrics})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str))
    tmp.replace(path)
    return path


def _iso(timestamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(timestamp))


def model_run(ckpt: str | None) -> dict[str, Any] | None:
    """The run record behind a checkpoint (a run folder, its final/ HF folder or a .ckpt inside it):
    an evaluation's row in a table is the model's experiment, not the evaluation's. `checkpoint` names
    an intermediate .ckpt (None: the run's final weights), which is a model of its own."""
    if not ckpt:
        return None
    path = Path(ckpt).expanduser().resolve()
    for folder in [path, *list(path.parents)[:3]]:
        results = folder / "results.json"
        if results.is_file():
            try:
                saved = json.loads(results.read_text())
            except (OSError, ValueError):
                return None
            run = saved.get("run") if isinstance(saved.get("run"), dict) else {}
            if "config_hash" not in saved or run.get("task", "train") != "train":
                return None
            intermediate = path.suffix == ".ckpt" and path.name != "last.ckpt"
            return {"experiment": run.get("experiment"), "config_hash": saved["config_hash"], "run_dir": str(folder),
                    "sweep": run.get("sweep"), "checkpoint": path.stem if intermediate else None}
    return None
