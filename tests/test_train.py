"""Training runs end to end on the tiny config (CPU, seconds)."""

import json
import math

import pytest
import torch

from moxin.model import ModelConfig, Transformer
from moxin.modules.base import OptimConfig, lr_multiplier, parameter_groups
from moxin.train import find_resume_checkpoint, run

DEBUG = ("+experiment=tiny_debug",)


def test_two_step_training_run(make_cfg, tmp_path):
    metrics = run(make_cfg(*DEBUG, "phase.max_steps=2", "phase.val_every_steps=2", "phase.log_every_steps=1"))
    run_dir = tmp_path / "run"
    assert metrics["train/steps"] == 2
    assert math.isfinite(metrics["val/loss"]) and math.isfinite(metrics["train/loss"])
    assert metrics["perf/tokens_per_s"] > 0 and 0 < metrics["perf/mfu"]
    assert metrics["train/tokens"] == 2 * 4 * 64  # steps x micro batch x seq_len
    assert json.loads((run_dir / "metrics.json").read_text())["train/steps"] == 2
    columns = (run_dir / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train/loss", "val/loss", "train/lr", "perf/tokens_per_s", "perf/mfu", "step"} <= set(columns)
    # The exported Hugging Face weights are the trained model's, as in the final checkpoint.
    exported = Transformer.from_hf(str(run_dir / "final")).state_dict()
    trained = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert exported.keys() == {k.removeprefix("model.") for k in trained}
    for name, tensor in exported.items():
        torch.testing.assert_close(tensor, trained[f"model.{name}"], msg=name)
    assert len([k for k in exported if k.endswith("attention.wqkv.weight")]) == 4  # the tiny model's blocks
    assert isinstance(metrics["sample"], str) and metrics["sample"].startswith("And God said")


def test_validation_loss_falls(make_cfg):
    metrics = run(make_cfg(*DEBUG))
    assert metrics["val/loss_initial"] > 10.0  # ~ln(32000) for an untrained model
    assert metrics["val/loss"] < metrics["val/loss_initial"] - 1.0


def test_checkpoints_load_without_unpickling_objects(make_cfg, tmp_path):
    run(make_cfg(*DEBUG, "phase.max_steps=2"))
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 2
    assert checkpoint["tokens_seen"] == 2 * 4 * 64


@pytest.mark.slow
def test_resume_auto_continues_from_newest_checkpoint(make_cfg, tmp_path):
    # Runs of one name live under <output_root>/<name>/, where resume=auto looks.
    first = run(make_cfg(*DEBUG, "phase.max_steps=3", run_name="tiny_debug/first"))
    assert first["train/steps"] == 3
    resumed = run(make_cfg(*DEBUG, "phase.max_steps=5", "resume=auto", run_name="tiny_debug/second"))
    assert resumed["train/steps"] == 5
    assert resumed["train/tokens"] == 5 * 4 * 64  # the token counter came back with the checkpoint
    assert "val/loss_initial" not in resumed  # no fresh start


@pytest.mark.slow
@pytest.mark.parametrize("every,resume_at,extra", [
    (2, 2, ()),  # mid-epoch, early
    (3, 3, ()),  # mid-epoch, halfway
    (4, 4, ("data.num_samples=12",)),  # 3 batches per epoch: resumes inside the second epoch
])
def test_resumed_run_equals_uninterrupted_run(make_cfg, tmp_path, every, resume_at, extra):
    common = (*DEBUG, "phase.max_steps=7", "phase.val_every_steps=7", *extra)
    straight = run(make_cfg(*common, f"phase.checkpoint_every_steps={every}", "phase.keep_checkpoints=-1",
                            run_name="straight"))
    midway = tmp_path / "straight" / "checkpoints" / f"step-{resume_at}.ckpt"
    resumed = run(make_cfg(*common, f"resume={midway}", run_name="resumed"))
    a = Transformer.from_hf(str(tmp_path / "resumed" / "final")).state_dict()
    b = Transformer.from_hf(str(tmp_path / "straight" / "final")).state_dict()
    for name in a:  # optimizer state, schedule and data position all came back
        torch.testing.assert_close(a[name], b[name], msg=name)
    assert resumed["val/loss"] == pytest.approx(straight["val/loss"], rel=1e-5)


def test_resume_auto_without_checkpoints_starts_fresh(tmp_path):
    assert find_resume_checkpoint("auto", str(tmp_path)) is None
    assert find_resume_checkpoint(None, str(tmp_path)) is None
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        find_resume_checkpoint(str(tmp_path / "missing.ckpt"), str(tmp_path))


def test_warmup_then_cosine_to_ten_percent():
    warm, total = 10, 110
    assert lr_multiplier(0, warm, total, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_multiplier(9, warm, total, "cosine", 0.1) == pytest.approx(1.0)
    assert lr_multiplier(60, warm, total, "cosine", 0.1) == pytest.approx(0.55)
    assert lr_multiplier(110, warm, total, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_multiplier(500, warm, total, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_multiplier(60, warm, total, "linear", 0.0) == pytest.approx(0.5)


def test_no_weight_decay_on_norms():
    model = Transformer(ModelConfig(
        vocab_size=50, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16, hidden_dim=64))
    decay, no_decay = parameter_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {p.ndim for p in no_decay["params"]} == {1}
    assert len(no_decay["params"]) == 2 * 2 + 1  # two norms per block + the final norm
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == model.num_params()


@pytest.mark.parametrize("fused", [None, False])
def test_adamw_is_fused_on_the_cpu_unless_switched_off(fused):
    from moxin.modules import PretrainModule

    module = PretrainModule(ModelConfig(vocab_size=50, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16,
                                        hidden_dim=64), OptimConfig(fused=fused))
    module.total_steps = lambda: 10  # no Trainer here
    optimizer = module.configure_optimizers()["optimizer"]
    assert optimizer.defaults["fused"] is (fused is None)  # the fused CPU kernel is ~6x faster than foreach


def test_bad_optimizer_settings_fail_naming_the_field():
    with pytest.raises(ValueError, match="schedule"):
        OptimConfig(schedule="warmup_stable_decay_typo")
    with pytest.raises(ValueError, match="min_lr_ratio"):
        OptimConfig(min_lr_ratio=2.0)


def test_unknown_task_is_refused(make_cfg):
    with pytest.raises(ValueError, match="unknown task 'trian'"):
        run(make_cfg("task=trian"))


@pytest.mark.slow
def test_wandb_stays_offline_and_inside_the_run_folder(make_cfg, tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for var in ("WANDB_MODE", "WANDB_DIR", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    run(make_cfg(*DEBUG, "phase.max_steps=2", "logger=default"))
    offline_runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert offline_runs, "wandb wrote no offline run into the run folder"
    assert not list(home.rglob("*wandb*"))


def test_gradient_accumulation_equals_one_larger_batch(make_cfg, tmp_path):
    # Micro-batches of 2 accumulated twice see the same 4 samples as one batch of 4.
    # eps=1 and lr=1 make the Adam update ~ the gradient itself: large enough that a wrongly scaled
    # accumulated gradient shows, while float-order differences stay tiny.
    common = (*DEBUG, "phase.max_steps=1", "phase.validate_before_training=false", "phase.gradient_clip_val=null",
              "phase.optimizer.eps=1.0", "phase.optimizer.lr=1.0", "phase.optimizer.weight_decay=0")
    run(make_cfg(*common, "context.micro_batch_size=4", run_name="big"))
    run(make_cfg(*common, "context.micro_batch_size=2", "phase.accumulate_grad_batches=2", run_name="accum"))
    big = Transformer.from_hf(str(tmp_path / "big" / "final")).state_dict()
    accumulated = Transformer.from_hf(str(tmp_path / "accum" / "final")).state_dict()
    for name in big:
        torch.testing.assert_close(accumulated[name], big[name], rtol=1e-4, atol=1e-6, msg=name)


def test_gradient_accumulation_counts_optimizer_steps(make_cfg):
    metrics = run(make_cfg(*DEBUG, "phase.max_steps=2", "phase.accumulate_grad_batches=3",
                           "phase.val_every_steps=2"))
    assert metrics["train/steps"] == 2
    assert metrics["train/tokens"] == 2 * 3 * 4 * 64  # steps x accumulation x micro batch x seq_len
    assert "val/loss" in metrics  # validation ran at optimizer step 2, not batch 2


def test_resume_auto_is_refused_inside_a_sweep(tmp_path, monkeypatch):
    import moxin.train

    monkeypatch.setattr(moxin.train, "_in_multirun", lambda: True)
    with pytest.raises(ValueError, match="multirun"):
        find_resume_checkpoint("auto", str(tmp_path))


def test_keep_checkpoints_keeps_the_newest(make_cfg, tmp_path):
    run(make_cfg(*DEBUG, "phase.max_steps=7", "phase.checkpoint_every_steps=2", "phase.keep_checkpoints=2",
                 "phase.validate_before_training=false"))
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("*.ckpt"))
    assert kept == ["last.ckpt", "step-4.ckpt", "step-6.ckpt"]  # step 2 dropped; last.ckpt = step 7


def test_nonfinite_loss_stops_the_run_naming_the_step(make_cfg, monkeypatch):
    from moxin.modules.base import NonFiniteLossError
    from moxin.modules.pretrain import PretrainModule

    real = PretrainModule.lm_loss

    def poisoned(self, batch):
        loss = real(self, batch)
        return loss * float("nan") if self.training and self.global_step == 3 else loss

    monkeypatch.setattr(PretrainModule, "lm_loss", poisoned)
    with pytest.raises(NonFiniteLossError, match="loss is nan at step 3.*Last good checkpoint: .*step-2.ckpt"):
        run(make_cfg(*DEBUG, "phase.max_steps=6", "phase.checkpoint_every_steps=2",
                     "phase.validate_before_training=false"))


def test_nonfinite_loss_steps_can_be_skipped_and_counted(make_cfg, tmp_path, monkeypatch):
    from moxin.modules.pretrain import PretrainModule

    real = PretrainModule.lm_loss
    calls = []

    def poisoned(self, batch):
        loss = real(self, batch)
        calls.append(self.training)
        return loss * float("inf") if self.training and len(calls) in (2, 4) else loss

    monkeypatch.setattr(PretrainModule, "lm_loss", poisoned)
    metrics = run(make_cfg(*DEBUG, "phase.max_steps=5", "phase.nonfinite_loss=skip",
                           "phase.validate_before_training=false", "phase.val_every_steps=5"))
    assert metrics["train/skipped_nonfinite"] == 2
    assert math.isfinite(metrics["val/loss"])
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["skipped_steps"] == 2
    assert calls.count(True) == 5  # a skipped step still counts towards max_steps
    assert checkpoint["tokens_seen"] == (5 - 2) * 4 * 64  # but trains on nothing


def test_next_phase_starts_from_the_previous_weights_with_a_fresh_optimizer(make_cfg, tmp_path):
    first = run(make_cfg(*DEBUG, "phase.max_steps=4", "phase.val_every_steps=4", run_name="phase1"))
    second = run(make_cfg(*DEBUG, "phase.max_steps=2", f"phase.init_from={tmp_path / 'phase1'}",
                          run_name="phase2"))
    # Validation before training sees phase 1's final model; the step count and schedule restart.
    assert second["val/loss_initial"] == pytest.approx(first["val/loss"], rel=1e-5)
    assert second["train/steps"] == 2
    checkpoint = torch.load(tmp_path / "phase2" / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 2
    assert checkpoint["optimizer_states"][0]["state"][0]["step"] == 2  # AdamW counted from zero again
    with pytest.raises(ValueError, match="tensor tok_embeddings.weight has shape"):
        run(make_cfg(*DEBUG, "phase.max_steps=1", "model.dim=64", "model.head_dim=16",
                     f"phase.init_from={tmp_path / 'phase1'}", run_name="wrong"))


def test_a_save_killed_midway_leaves_the_previous_checkpoint_usable(make_cfg, tmp_path, monkeypatch):
    from lightning.fabric.plugins.io import torch_io

    real_save, saves = torch_io._atomic_save, []

    def dying_save(checkpoint, path):
        saves.append(path)
        if len(saves) == 2:  # the step-4 save dies after writing half a file
            with open(path, "wb") as f:
                f.write(b"half a checkpoint")
            raise OSError("the process died during this save")
        real_save(checkpoint, path)

    monkeypatch.setattr(torch_io, "_atomic_save", dying_save)
    with pytest.raises(OSError, match="died during this save"):
        run(make_cfg(*DEBUG, "phase.max_steps=6", "phase.checkpoint_every_steps=2", "phase.keep_checkpoints=-1",
                     "phase.validate_before_training=false"))
    folder = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["step-2.ckpt"]  # no half file, no temporary
    assert torch.load(folder / "step-2.ckpt", weights_only=True)["global_step"] == 2
    assert find_resume_checkpoint("auto", str(tmp_path)) == str(folder / "step-2.ckpt")


def test_every_kth_checkpoint_is_kept_for_good(make_cfg, tmp_path):
    run(make_cfg(*DEBUG, "phase.max_steps=6", "phase.checkpoint_every_steps=1", "phase.keep_checkpoints=1",
                 "phase.keep_every_steps=3", "phase.validate_before_training=false"))
    folder = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in (folder / "kept").glob("*.ckpt")) == ["step-3.ckpt", "step-6.ckpt"]
    newest = sorted(p.name for p in folder.glob("step-*.ckpt"))
    assert len(newest) == 1 and (folder / "last.ckpt").exists()  # the rolling window keeps only the newest


@pytest.mark.slow
def test_a_run_killed_with_sigkill_resumes_to_the_same_losses(tmp_path):
    import csv
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    common = [sys.executable, str(root / "run.py"), *DEBUG, "phase.max_steps=24", "phase.checkpoint_every_steps=4",
              "phase.keep_checkpoints=2", "phase.log_every_steps=1", "phase.val_every_steps=24",
              "phase.validate_before_training=false", "logger=csv", "progress_bar=false",
              f"paths.output_root={tmp_path}"]
    # One thread each: the uninterrupted run trains beside the victim, on the other core.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

    def losses(name: str) -> dict[int, float]:
        (metrics,) = (tmp_path / name).glob("*/csv/metrics.csv")
        with open(metrics) as f:
            return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}

    with open(tmp_path / "straight.log", "w") as log:  # a file, not a pipe that could fill and stall it
        straight_run = subprocess.Popen([*common, "name=straight"], env=env, stdout=subprocess.DEVNULL, stderr=log)
    victim = subprocess.Popen([*common, "name=killed"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300

    def saved_steps() -> list[int]:
        return [int(p.stem.split("-")[1]) for p in (tmp_path / "killed").glob("*/checkpoints/step-*.ckpt")]

    while max(saved_steps(), default=0) < 8 and time.time() < deadline:
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not list((tmp_path / "killed").glob("*/checkpoints/last.ckpt")), "the run ended before the kill"
    subprocess.run([*common, "name=killed", "resume=auto"], env=env, check=True, capture_output=True, timeout=600)
    assert straight_run.wait(timeout=600) == 0, (tmp_path / "straight.log").read_text()[-3000:]

    straight = losses("straight")
    (finished,) = (tmp_path / "killed").glob("*/checkpoints/last.ckpt")  # the resumed run's folder
    with open(finished.parent.parent / "csv" / "metrics.csv") as f:
        resumed = {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}
    after = sorted(resumed)
    assert after[0] >= 8  # it resumed from a checkpoint of step 8 or later
    assert after and after[-1] == 23  # steps are 0-based in the CSV logger
    assert {s: resumed[s] for s in after} == {s: straight[s] for s in after}  # bit-identical


def test_skipping_drops_the_whole_accumulated_step(make_cfg, monkeypatch):
    import lightning as L

    import moxin.train
    from moxin.modules.pretrain import PretrainModule

    weights = []  # the embedding matrix after each micro-batch

    class Watch(L.Callback):
        def on_train_start(self, trainer, module):
            weights.append(module.model.tok_embeddings.weight.detach().clone())

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            weights.append(module.model.tok_embeddings.weight.detach().clone())

    real, calls = PretrainModule.lm_loss, []

    def poisoned(self, batch):
        loss = real(self, batch)
        calls.append(self.training)
        return loss * float("nan") if self.training and calls.count(True) == 1 else loss  # step 1's first half

    monkeypatch.setattr(PretrainModule, "lm_loss", poisoned)
    monkeypatch.setattr(moxin.train, "eval_callbacks", lambda *args: [Watch()])
    metrics = run(make_cfg(*DEBUG, "phase.max_steps=2", "phase.accumulate_grad_batches=2",
                           "phase.nonfinite_loss=skip", "phase.validate_before_training=false",
                           "phase.val_every_steps=2"))
    assert metrics["train/skipped_nonfinite"] == 1
    assert torch.equal(weights[2], weights[0])  # the step with the bad micro-batch changed nothing
    assert not torch.equal(weights[-1], weights[0])  # a later step trained
    assert all(torch.isfinite(w).all() for w in weights)


@pytest.mark.slow
def test_resume_restores_the_random_streams_training_draws_from(make_cfg, tmp_path, monkeypatch):
    from moxin.modules.pretrain import PretrainModule

    real, draws = PretrainModule.lm_loss, []

    def noisy(self, batch):  # as dropout would: one draw from each generator per training step
        if self.training:
            import random

            import numpy as np
            draws.append((self.global_step, torch.rand(1).item(), float(np.random.rand()), random.random()))
        return real(self, batch)

    monkeypatch.setattr(PretrainModule, "lm_loss", noisy)
    common = (*DEBUG, "phase.max_steps=6", "phase.val_every_steps=6", "phase.validate_before_training=false")
    run(make_cfg(*common, "phase.checkpoint_every_steps=3", "phase.keep_checkpoints=-1", run_name="straight"))
    straight = {step: values for step, *values in draws}
    draws.clear()
    run(make_cfg(*common, f"resume={tmp_path / 'straight' / 'checkpoints' / 'step-3.ckpt'}", run_name="resumed"))
    resumed = {step: values for step, *values in draws}
    assert sorted(resumed) == [3, 4, 5]
    assert {step: straight[step] for step in resumed} == resumed
