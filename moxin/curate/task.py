"""`task=prepare_data`: curate the `data` mix into token shards, with a manifest and a report."""

from __future__ import annotations

from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from moxin.curate.pipeline import CurationConfig, curate
from moxin.curate.report import write_report


def prepare_data_task(cfg: DictConfig) -> dict[str, Any]:
    from moxin.tokenizer import load_tokenizer

    data = instantiate(cfg.data)
    curation = CurationConfig(**OmegaConf.to_container(cfg.curation, resolve=True))
    manifest = curate(data, curation, load_tokenizer(data.tokenizer))
    markdown, plot = write_report(manifest, curation.out_dir)
    _log_to_wandb(cfg, manifest, plot)
    tokens = {name: {split: s["tokens"] for split, s in source["streams"].items()}
              for name, source in manifest["sources"].items()}
    print(f"tokens per source and split: {tokens}\nshards, manifest.json, report.md: {curation.out_dir}\n"
          f"train on them: python run.py data={_data_choice()} data.shards_dir={curation.out_dir}")
    return {"out_dir": curation.out_dir, "report": markdown, "tokens": tokens}


def _log_to_wandb(cfg: DictConfig, manifest: dict[str, Any], plot: str) -> None:
    from moxin.tracking import standalone_wandb_run

    with standalone_wandb_run(cfg) as run:
        if run is None:
            return
        import wandb

        stages = next(iter(manifest["sources"].values()))["documents"].keys()
        table = wandb.Table(columns=["source", *stages], data=[[name, *s["documents"].values()]
                                                               for name, s in manifest["sources"].items()])
        run.log({"data/stages": table, "data/report": wandb.Image(plot)})
        run.summary.update({f"data/{name}/{split}_tokens": s["tokens"] for name, source in manifest["sources"].items()
                            for split, s in source["streams"].items()})


def _data_choice() -> str:
    """The data option this run composed (for the hint that trains on the shards)."""
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().runtime.choices.get("data", "<mix>") if HydraConfig.initialized() else "<mix>"
