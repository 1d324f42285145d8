"""W&B settings shared by every task that logs: files stay inside the run folder, offline by default."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any

WANDB_MODES = ("offline", "online", "disabled")


def wandb_settings(cfg, run_dir: Path) -> dict[str, Any] | None:
    """Keyword arguments for wandb.init / WandbLogger, or None when W&B is switched off.

    Name, group and tags come from the run's identity (moxin.records.run_identity), so the runs of one
    experiment or sweep group together; the static run record (config hash, git, packages,
    hardware) travels in the run config under `moxin`, where the report reads it back. Also points
    W&B's cache, config, data and artifact folders into the run folder, so that nothing lands in
    the home folder.
    """
    from moxin.records import static_record

    wandb_cfg = cfg.logger.wandb
    if not wandb_cfg.enabled:
        return None
    if wandb_cfg.mode not in WANDB_MODES:
        raise ValueError(f"logger.wandb.mode must be one of {WANDB_MODES}, got {wandb_cfg.mode!r}")
    for var, sub in [("WANDB_CACHE_DIR", "cache"), ("WANDB_CONFIG_DIR", "config"),
                     ("WANDB_DATA_DIR", "data"), ("WANDB_ARTIFACT_DIR", "artifacts")]:
        os.environ[var] = str(Path(run_dir) / "wandb" / sub)
    record = static_record(cfg)
    identity = record["run"]
    config = {**record.pop("config"), "moxin": record}
    return dict(project=wandb_cfg.project, entity=wandb_cfg.entity, name=cfg.name,
                group=wandb_cfg.group or identity["group"], job_type=identity["task"],
                tags=[*identity["tags"], *(wandb_cfg.tags or [])], mode=wandb_cfg.mode, config=config)


@contextmanager
def standalone_wandb_run(cfg):
    """A W&B run for a task that has no Trainer (evaluate, prepare_data, report), in the run folder;
    its job type is the task. Yields None when W&B is off. The run is finished on leaving the block."""
    run_dir = Path(cfg.paths.run_dir)
    settings = wandb_settings(cfg, run_dir)
    if settings is None:
        yield None
        return
    import wandb

    run_dir.mkdir(parents=True, exist_ok=True)
    run = wandb.init(dir=str(run_dir), **settings)
    try:
        yield run
    finally:
        run.finish()
