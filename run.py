"""moxin's one entry point: `python run.py [task=...] [+experiment=...] [overrides]`."""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | dict:
    from moxin.train import run  # imported here so `--help` and config errors stay fast

    metrics = run(cfg)
    _leave_process_group()
    # What a sweeper that optimises (hydra/sweeper=moxin_optuna) minimises: the final `objective`
    # metric; plain runs and Hydra's basic sweeper ignore the return value.
    objective = cfg.get("objective")
    if objective and objective in metrics:
        return float(metrics[objective])
    if _optimising_sweep():
        raise ValueError(f"objective={objective!r} is not among this run's final metrics "
                         f"({sorted(k for k in metrics if '/' in k)}); set objective=<one of them>")
    return metrics


def _leave_process_group() -> None:
    """The ranks of a distributed run leave together, once rank 0 has written the run's outputs: a rank
    that exited while rank 0 still worked could abort in gloo's teardown ("terminate called without an
    active exception"), and its launcher then stopped rank 0 before it had written them."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _optimising_sweep() -> bool:
    """Whether a sweeper that needs one number per run (Optuna) runs this job."""
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.initialized() and "optuna" in str(HydraConfig.get().sweeper.get("_target_", "")).lower()


if __name__ == "__main__":
    main()
