"""A recipe: experiments run in order, each from the previous one's weights, resumable.

`python run.py +recipe=NAME` composes every stage's configuration (the stage's overrides, then the
recipe's, which therefore win: `+scale=tiny` after `+experiment=...`) and runs it in
<output_root>/recipes/<recipe>/<stage>/. A stage with metrics.json is finished and skipped; a
stage with checkpoints but no metrics.json was interrupted and resumes from its newest
checkpoint; `init_from: previous` becomes the previous stage's folder (for the first stage:
`recipe.init_from`, when a recipe starts from an existing model).
"""

from __future__ import annotations

import json
import os
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

CONF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")


def _command_line_overrides() -> list[str]:
    """The user's own overrides (`seed=7 hardware=gpu ...`): every stage gets them, after its own.
    A recipe is one sequence of folders, so a multirun sweep over it is refused."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return []
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.MULTIRUN:
        raise ValueError("a recipe cannot run as a multirun sweep (its stages share one folder each); run one "
                         "recipe per command, with recipe.name=... to keep variants apart")
    return [o for o in hydra_cfg.overrides.task if not o.lstrip("+~").startswith(("recipe", "paths.run_dir"))]


def _changed_groups(saved_path: Path, stage_cfg: DictConfig) -> list[str]:
    """Top-level keys whose resolved values differ from the configuration the stage ran with."""
    from omegaconf import OmegaConf

    if not saved_path.exists():
        return []
    saved = OmegaConf.to_container(OmegaConf.load(saved_path), resolve=True)
    now = OmegaConf.to_container(stage_cfg, resolve=True)
    return sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))


def _keep_choices(stage_cfg: DictConfig) -> None:
    """Move the options Hydra chose (model: tiny, phase: sft, ...) into tracking.choices, for the stage's
    run record, and drop the rest of the composed `hydra` node, which the stage does not use."""
    from omegaconf import open_dict

    choices = {k: v for k, v in stage_cfg.hydra.runtime.choices.items() if v is not None and not k.startswith("hydra")}
    with open_dict(stage_cfg):
        del stage_cfg["hydra"]
        stage_cfg.tracking.choices = choices


def run_recipe(cfg: DictConfig, run_stage) -> dict[str, Any]:
    """Run cfg.recipe's stages with `run_stage(stage_cfg) -> metrics`; return each stage's metrics."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    recipe = cfg.recipe
    forwarded = _command_line_overrides()
    root = Path(cfg.paths.output_root) / "recipes" / recipe.name
    results: dict[str, Any] = {}
    previous: Path | None = None
    for stage in recipe.stages:
        folder = root / stage.name
        overrides = [*stage.overrides, *recipe.overrides, *forwarded, f"name={recipe.name}-{stage.name}",
                     f"paths.output_root={cfg.paths.output_root}", f"paths.run_dir={folder}",
                     f"paths.checkpoint_search_dir={folder}", "resume=auto", f"progress_bar={cfg.progress_bar}"]
        context = nullcontext() if GlobalHydra.instance().is_initialized() else initialize_config_dir(
            config_dir=CONF_DIR, version_base="1.3")
        with context:
            stage_cfg = compose("config", overrides=overrides, return_hydra_config=True)
        _keep_choices(stage_cfg)
        stage_cfg.tracking.tags = [*stage_cfg.tracking.tags, f"recipe:{recipe.name}", f"stage:{stage.name}"]
        if stage_cfg.phase.get("init_from") == "previous":
            start = str(previous) if previous is not None else recipe.get("init_from")
            if not start:
                raise ValueError(f"recipe {recipe.name}: stage {stage.name} starts from `previous`, but it is "
                                 "the first stage; give its start with recipe.init_from=...")
            stage_cfg.phase.init_from = start
        finished = folder / "metrics.json"
        if finished.exists():
            changed = _changed_groups(folder / "config.yaml", stage_cfg)
            note = f"; its configuration has changed since ({', '.join(changed)}): delete {finished} to rerun it" \
                if changed else ""
            print(f"[recipe {recipe.name}] {stage.name}: finished earlier, skipped ({folder}){note}")
            results[stage.name] = json.loads(finished.read_text())
            previous = folder
            continue
        print(f"[recipe {recipe.name}] {stage.name}: running in {folder}")
        started = time.time()
        results[stage.name] = run_stage(stage_cfg)
        results[stage.name]["stage_seconds"] = round(time.time() - started, 1)
        previous = folder
    return results
