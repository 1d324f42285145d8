"""The optional Hydra plugins: conf/hydra/sweeper/moxin_optuna.yaml and conf/hydra/launcher/{slurm,local_submitit}.yaml
compose onto the plugins' own configs (hydra-optuna-sweeper, hydra-submitit-launcher; skipped without them)."""

import json

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import get_class, instantiate

from tests.conftest import CONF_DIR

pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
pytest.importorskip("hydra_plugins.hydra_submitit_launcher")

OPTUNA_SWEEPER = "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"
SLURM_LAUNCHER = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
LOCAL_LAUNCHER = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher"
SLURM_ENV = ("PARTITION", "ACCOUNT", "QOS", "CPUS_PER_TASK", "MEM_GB", "TIMEOUT_MIN")


@pytest.fixture
def hydra_cfg(tmp_path, monkeypatch):
    """The composed config with its hydra node; the defaults, not this machine's MOXIN_SLURM_* settings."""
    for name in SLURM_ENV:
        monkeypatch.delenv(f"MOXIN_SLURM_{name}", raising=False)

    def _compose(*overrides: str):
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose("config", overrides=[f"paths.output_root={tmp_path}", *overrides], return_hydra_config=True)
        return cfg.hydra

    return _compose


def test_optuna_sweeper_is_seeded_tpe_minimising(hydra_cfg):
    sweeper = hydra_cfg("hydra/sweeper=moxin_optuna", "+experiment=tiny_debug", "seed=7").sweeper
    assert sweeper._target_ == OPTUNA_SWEEPER and get_class(sweeper._target_).__name__ == "OptunaSweeper"
    assert sweeper.sampler._target_ == "optuna.samplers.TPESampler"
    assert sweeper.sampler.seed == 7  # the run's seed
    assert (sweeper.direction, sweeper.n_trials, sweeper.n_jobs) == ("minimize", 20, 1)
    assert sweeper.study_name == "tiny_debug"  # ${name}
    assert sweeper.storage is None and sweeper.params == {}
    assert type(instantiate(sweeper.sampler)).__name__ == "TPESampler"


def test_optuna_search_space_from_one_override(hydra_cfg):
    space = '++hydra.sweeper.params={phase.optimizer.lr: "tag(log, interval(1e-4, 1e-2))"}'
    sweeper = hydra_cfg("hydra/sweeper=moxin_optuna", space).sweeper
    assert dict(sweeper.params) == {"phase.optimizer.lr": "tag(log, interval(1e-4, 1e-2))"}
    random = hydra_cfg("hydra/sweeper=moxin_optuna", "hydra/sweeper/sampler=random").sweeper.sampler
    assert random._target_ == "optuna.samplers.RandomSampler" and random.seed == 1234  # the seed carries over


def test_slurm_launcher_runs_one_task_per_gpu(hydra_cfg):
    hydra = hydra_cfg("hydra/launcher=slurm", "+experiment=phase1_2k", "hardware=ddp")
    launcher = hydra.launcher
    assert launcher._target_ == SLURM_LAUNCHER and get_class(launcher._target_).__name__ == "SlurmLauncher"
    assert (launcher.nodes, launcher.gpus_per_node, launcher.tasks_per_node) == (1, 8, 8)
    assert launcher.timeout_min == 2880 and launcher.partition is None and launcher.max_num_timeout == 0
    assert isinstance(launcher.cpus_per_task, int) and isinstance(launcher.mem_gb, int)
    assert launcher.submitit_folder == f"{hydra.sweep.dir}/.submitit/%j"


def test_slurm_launcher_reads_the_environment_and_follows_the_hardware(hydra_cfg, monkeypatch):
    monkeypatch.setenv("MOXIN_SLURM_PARTITION", "h100")
    monkeypatch.setenv("MOXIN_SLURM_CPUS_PER_TASK", "16")
    launcher = hydra_cfg("hydra/launcher=slurm", "hydra.launcher.timeout_min=600", "hardware=gpu").launcher
    assert (launcher.partition, launcher.cpus_per_task, launcher.timeout_min) == ("h100", 16, 600)  # ints
    # The documented multi-node command: 4 nodes x 8 GPUs, one srun task per GPU, as the trainer expects.
    launcher = hydra_cfg("hydra/launcher=slurm", "+experiment=phase1_2k", "hardware=fsdp",
                         "hardware.num_nodes=4").launcher
    assert (launcher.nodes, launcher.gpus_per_node, launcher.tasks_per_node) == (4, 8, 8)
    assert "export SLURM_KILL_BAD_EXIT=1" in launcher.setup  # one failing rank ends them all


def test_local_submitit_launcher(hydra_cfg):
    hydra = hydra_cfg("hydra/launcher=local_submitit", "+experiment=tiny_debug")
    launcher = hydra.launcher
    assert launcher._target_ == LOCAL_LAUNCHER and get_class(launcher._target_).__name__ == "LocalLauncher"
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (1, 1, 0)
    assert launcher.submitit_folder.startswith(str(hydra.sweep.dir))


def test_plugins_combine(hydra_cfg):
    hydra = hydra_cfg("hydra/sweeper=moxin_optuna", "hydra/launcher=slurm", "+experiment=phase1_2k",
                      "hardware.devices=8")
    assert (hydra.sweeper._target_, hydra.launcher._target_) == (OPTUNA_SWEEPER, SLURM_LAUNCHER)
    assert hydra.sweeper.study_name == "phase1_2k"


@pytest.mark.slow
def test_an_optuna_sweep_minimises_the_objective_and_names_a_missing_one(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    root = Path(CONF_DIR).parent
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    common = [sys.executable, str(root / "run.py"), "-m", "hydra/sweeper=moxin_optuna", "hydra.sweeper.n_trials=2",
              "+experiment=tiny_debug", "phase.max_steps=2", "phase.val_every_steps=2", "logger=csv",
              "progress_bar=false", "phase.optimizer.lr=tag(log, interval(1e-4, 1e-2))"]
    # The two sweeps run side by side, one core each.
    with open(tmp_path / "bad.log", "w") as log:  # a file, not a pipe that could fill and stall it
        bad = subprocess.Popen([*common, "objective=val/nonexistent", f"paths.output_root={tmp_path / 'bad'}"],
                               env=env, stdout=subprocess.DEVNULL, stderr=log)
    subprocess.run([*common, f"paths.output_root={tmp_path / 'ok'}"], env=env, check=True, capture_output=True,
                   timeout=600)
    (found,) = (tmp_path / "ok").glob("multirun/tiny_debug/*/optimization_results.yaml")
    best = yaml.safe_load(found.read_text())
    runs = (tmp_path / "ok").glob("multirun/tiny_debug/*/*/metrics.json")
    losses = [json.loads(p.read_text())["val/loss"] for p in runs]
    assert len(losses) == 2 and best["best_value"] == pytest.approx(min(losses))
    assert bad.wait(timeout=600) != 0
    assert "objective='val/nonexistent' is not among" in (tmp_path / "bad.log").read_text()
