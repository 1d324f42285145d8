"""Every config file composes, instantiates into typed objects, and the CLI runs sweeps."""

import glob
import json
import os
import subprocess
import sys

import pytest
import yaml
from hydra.utils import instantiate

from moxin.data import ChatDataConfig, DataConfig
from moxin.model import ModelConfig
from moxin.modules import MODULES, OptimConfig
from moxin.train import model_config_for_context
from tests.conftest import CONF_DIR

REPO = os.path.dirname(CONF_DIR)
EXPERIMENTS = sorted(os.path.splitext(os.path.basename(p))[0] for p in glob.glob(f"{CONF_DIR}/experiment/*.yaml"))


def typed_objects(cfg):
    model = model_config_for_context(instantiate(cfg.model), cfg.context)
    return model, instantiate(cfg.data), instantiate(cfg.phase.optimizer)


def test_default_config_is_the_tiny_offline_demo(make_cfg):
    cfg = make_cfg("logger=default")  # the fixture picks csv; the default logger is W&B offline + CSV
    model, data, optim = typed_objects(cfg)
    assert isinstance(model, ModelConfig) and model.n_layers == 4
    assert isinstance(data, DataConfig) and {s.kind for s in data.sources} == {"kjv", "python_stdlib"}
    assert isinstance(optim, OptimConfig) and optim.betas == (0.9, 0.95)
    assert data.seq_len == cfg.context.seq_len  # one value, interpolated
    assert cfg.phase.module in MODULES
    assert cfg.logger.wandb.mode == "offline"


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_instantiates(make_cfg, experiment):
    path = os.path.join(CONF_DIR, "experiment", f"{experiment}.yaml")
    assert open(path).readline().strip() == "# @package _global_"
    cfg = make_cfg(f"+experiment={experiment}")
    model, data, optim = typed_objects(cfg)
    assert isinstance(model, ModelConfig) and isinstance(data, (DataConfig, ChatDataConfig))
    assert isinstance(optim, OptimConfig)
    assert cfg.phase.module in MODULES
    data_format = data.format if isinstance(data, ChatDataConfig) else "pretrain"
    assert MODULES[cfg.phase.module].data_format == data_format  # the phase trains on the data it is given
    assert data.seq_len <= model.max_seq_len


def test_post_training_experiments_have_the_papers_settings(make_cfg):
    sft = make_cfg("+experiment=sft_tulu3")
    _, data, optim = typed_objects(sft)
    assert (optim.lr, optim.warmup_ratio, optim.schedule, optim.min_lr_ratio) == (5e-6, 0.03, "linear", 0.0)
    assert (data.format, data.epochs, data.seq_len) == ("sft", 2, 4096)
    assert [s.path for s in data.sources] == ["allenai/tulu-3-sft-mixture"]
    dpo = make_cfg("+experiment=dpo_tulu3")
    _, data, optim = typed_objects(dpo)
    assert (optim.lr, optim.warmup_ratio, optim.schedule) == (5e-7, 0.1, "linear")
    assert (data.format, data.epochs, data.seq_len) == ("preference", 1, 2048)
    assert [s.path for s in data.sources] == ["allenai/llama-3.1-tulu-3-8b-preference-mixture"]
    options = instantiate(dpo.phase.dpo)
    assert (options.loss, options.beta) == ("dpo_norm", 5.0)
    _, data, _ = typed_objects(make_cfg("+experiment=sft_infinity"))
    assert data.sources[0].path == "BAAI/Infinity-Instruct" and data.sources[0].schema == "conversations"
    _, data, _ = typed_objects(make_cfg("+experiment=dpo_infinity"))
    assert data.sources[0].path == "BAAI/Infinity-Preference" and data.format == "preference"


def test_experiment_is_not_in_the_defaults_list():
    defaults = yaml.safe_load(open(os.path.join(CONF_DIR, "config.yaml")))["defaults"]
    assert not any("experiment" in (d if isinstance(d, str) else next(iter(d))) for d in defaults)


def test_full_scale_experiment_is_the_recipe(make_cfg):
    cfg = make_cfg("+experiment=pretrain_moxin_7b")
    model, data, optim = typed_objects(cfg)
    assert model.num_params() == 8_114_180_096
    assert cfg.context.seq_len == 2048 and cfg.hardware.precision == "bf16-mixed"
    assert (optim.weight_decay, optim.eps, optim.warmup_steps, optim.min_lr_ratio) == (0.1, 1e-8, 2000, 0.1)
    assert [s.path for s in data.sources] == [
        "cerebras/SlimPajama-627B", "mlfoundations/dclm-baseline-1.0", "bigcode/the-stack-dedup"]
    assert all(s.streaming for s in data.sources)


def test_context_longer_than_the_model_is_refused(make_cfg):
    cfg = make_cfg("context=ctx2k")  # the tiny model has 1024 positions
    with pytest.raises(ValueError, match="max_seq_len"):
        model_config_for_context(instantiate(cfg.model), cfg.context)


def test_context_can_set_the_window(make_cfg):
    cfg = make_cfg("model=moxin_7b", "context=ctx32k", "context.sliding_window=1024")
    assert model_config_for_context(instantiate(cfg.model), cfg.context).sliding_window == 1024


@pytest.mark.slow
def test_multirun_sweep_gives_one_output_folder_per_run(tmp_path):
    env = {**os.environ, "MOXIN_OUTPUT_ROOT": str(tmp_path), "WANDB_MODE": "disabled"}
    subprocess.run(
        [sys.executable, "run.py", "-m", "+experiment=tiny_debug", "phase.optimizer.lr=1e-3,3e-4",
         "phase.max_steps=1", "phase.val_every_steps=1", "progress_bar=false"],
        cwd=REPO, env=env, check=True, capture_output=True, timeout=300,
    )
    runs = sorted(glob.glob(str(tmp_path / "multirun" / "tiny_debug" / "*" / "*" / "metrics.json")))
    assert len(runs) == 2
    lrs = {yaml.safe_load(open(os.path.join(os.path.dirname(r), "config.yaml")))["phase"]["optimizer"]["lr"]
           for r in runs}
    assert lrs == {1e-3, 3e-4}
    assert all(json.load(open(r))["train/steps"] == 1 for r in runs)


@pytest.mark.slow
@pytest.mark.parametrize("experiment", [e for e in EXPERIMENTS if not e.startswith("phase")])  # phases: the recipe test
def test_every_experiment_runs_at_tiny_scale_with_one_override(make_cfg, experiment, tmp_path):
    from moxin.train import run

    start = []
    if make_cfg(f"+experiment={experiment}").phase.get("init_from") == "previous":  # post-training: a tiny start
        from moxin.model import Transformer

        Transformer(instantiate(make_cfg("model=tiny").model)).save_hf(str(tmp_path / "start"))
        start = [f"phase.init_from={tmp_path / 'start'}"]
    cfg = make_cfg(f"+experiment={experiment}", "+scale=tiny", "phase.max_steps=2", "phase.val_every_steps=2",
                   "phase.validate_before_training=false", *start)
    assert cfg.model.dim == 128 and cfg.hardware.accelerator == "cpu"
    metrics = run(cfg)
    assert metrics["train/steps"] == 2
    assert metrics["val/loss"] < 11 if cfg.phase.module != "grpo" else "val/accuracy" in metrics  # GRPO: no loss
