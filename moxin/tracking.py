"""W&B settings shared by every task that logs: files stay inside the run folder, offline by default."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any

WANDB_MODES = ("offline", "online", "disabled")


def wandb_settings(wandb_cfg, run_dir: Path, name: str, config: dict[str, Any]) -> dict[str, Any] | None:
    """Keyword arguments for wandb.init / WandbLogger, or None when W&B is switched off.

    Also points W&B's cache, config, data and artifact folders into the run folder, so that
    nothing lands in the home folder.
    """
    if not wandb_cfg.enabled:
        return None
    if wandb_cfg.mode not in WANDB_MODES:
        raise ValueError(f"logger.wandb.mode must be one of {WANDB_MODES}, got {wandb_cfg.mode!r}")
    for var, sub in [("WANDB_CACHE_DIR", "cache"), ("WANDB_CONFIG_DIR", "config"),
                     ("WANDB_DATA_DIR", "data"), ("WANDB_ARTIFACT_DIR", "artifacts")]:
        os.environ[var] = str(Path(run_dir) / "wandb" / sub)
    return dict(project=wandb_cfg.project, entity=wandb_cfg.entity, name=name, group=wandb_cfg.group,
                tags=list(wandb_cfg.tags or []), mode=wandb_cfg.mode, config=config)


@contextmanager
def standalone_wandb_run(cfg, job_type: str):
    """A W&B run for a task that has no Trainer (evaluate, prepare_data), in the run folder; yields
    None when W&B is off. The run is finished on leaving the block."""
    from omegaconf import OmegaConf

    run_dir = Path(cfg.paths.run_dir)
    settings = wandb_settings(cfg.logger.wandb, run_dir, cfg.name, OmegaConf.to_container(cfg, resolve=True))
    if settings is None:
        yield None
        return
    import wandb

    run_dir.mkdir(parents=True, exist_ok=True)
    run = wandb.init(dir=str(run_dir), job_type=job_type, **settings)
    try:
        yield run
    finally:
        run.finish()
