"""Scale-out: hardware options, the parallelism switches, and 2-process CPU training under DDP, FSDP2
and Colossal-AI matching one process with the same global batch, with checkpoint save and resume."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from safetensors.torch import load_file

from moxin.checkpoint import load_model
from moxin.colossalai_strategy import colossalai_available
from moxin.data.datamodule import ResumeSampler
from moxin.model import ModelConfig, Transformer
from moxin.parallel import ParallelConfig, build_strategy, checkpoint_activations, compile_blocks, world_size
from moxin.train import accumulation, build_module, find_resume_checkpoint, parallel_config
from tests.conftest import CONF_DIR, needs_colossalai

REPO = Path(__file__).resolve().parent.parent
HARDWARE = ("cpu", "gpu", "ddp", "fsdp", "colossalai_ddp", "colossalai_zero2", "colossalai_gemini", "colossalai_hybrid")


def tiny_model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                                   hidden_dim=64, sliding_window=8, max_seq_len=64))


# --- configs ---

@pytest.mark.parametrize("hardware", HARDWARE)
def test_every_hardware_option_composes_with_an_experiment(hardware):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["+experiment=phase1_2k", f"hardware={hardware}"])
    parallel = parallel_config(cfg.hardware)
    expected = {"cpu": "auto", "gpu": "auto", "ddp": "ddp", "fsdp": "fsdp"}.get(hardware, "colossalai")
    assert parallel.strategy == expected
    assert cfg.model.n_layers == 36  # the experiment is untouched
    if expected == "colossalai":
        plugin = {"colossalai_ddp": "torch_ddp", "colossalai_zero2": "low_level_zero", "colossalai_gemini": "gemini",
                  "colossalai_hybrid": "hybrid_parallel"}[hardware]
        assert parallel.colossalai.plugin == plugin
        assert cfg.hardware.precision == "32-true"  # the plugin does mixed precision itself
    if hardware == "fsdp":
        assert parallel.fsdp.param_dtype == "bf16" and parallel.fsdp.reduce_dtype == "fp32"


def test_parallel_config_names_bad_values():
    with pytest.raises(ValueError, match="hardware.strategy='deepspeed'"):
        ParallelConfig(strategy="deepspeed")
    with pytest.raises(ValueError, match="hardware.fsdp.param_dtype='fp8'"):
        ParallelConfig(strategy="fsdp", fsdp={"param_dtype": "fp8"})
    for bad in (0, "8", True):
        with pytest.raises(ValueError, match=f"hardware.fsdp.shard_size={bad!r} must be a whole number"):
            ParallelConfig(strategy="fsdp", fsdp={"shard_size": bad})


def test_hsdp_shard_size_must_divide_the_ranks(make_cfg, tmp_path):
    from moxin.parallel import FSDPConfig
    from moxin.train import build_trainer

    assert FSDPConfig().replicas(12) == 1 and FSDPConfig(shard_size=12).replicas(12) == 1
    assert FSDPConfig(shard_size=4).replicas(12) == 3
    with pytest.raises(ValueError, match="shard_size=8 does not divide the 12 data-parallel ranks"):
        FSDPConfig(shard_size=8).replicas(12)
    cfg = make_cfg("+experiment=tiny_debug", "hardware=fsdp", "hardware.accelerator=cpu", "hardware.devices=3",
                   "hardware.fsdp.shard_size=2")
    with pytest.raises(ValueError, match="shard_size=2 does not divide the 3"):  # before any process starts
        build_trainer(cfg, tmp_path, ModelConfig(), [])


def test_a_checkpoint_folder_resumes_under_its_own_strategy_and_old_files_are_read(tmp_path):
    from moxin.train import check_checkpoint_kind, read_checkpoint_state

    fsdp_folder, colossal_folder = tmp_path / "fsdp.ckpt", tmp_path / "colossalai.ckpt"
    for folder in (fsdp_folder, colossal_folder):
        folder.mkdir()
        torch.save({"tensor_parallel": 2}, folder / "meta.pt")
    (fsdp_folder / ".metadata").write_bytes(b"")
    check_checkpoint_kind(str(fsdp_folder), ParallelConfig(strategy="fsdp"))
    with pytest.raises(ValueError, match="sharded checkpoint of hardware.strategy=fsdp; .*this run has ddp"):
        check_checkpoint_kind(str(fsdp_folder), ParallelConfig(strategy="ddp"))
    with pytest.raises(ValueError, match="strategy=colossalai; .*this run has fsdp.*phase.init_from="):
        check_checkpoint_kind(str(colossal_folder), ParallelConfig(strategy="fsdp"))
    assert read_checkpoint_state(str(fsdp_folder), sharded=True) == {"tensor_parallel": 2}
    old = tmp_path / "old.ckpt"  # torch's format before zip files: it cannot be memory-mapped
    torch.save({"tensor_parallel": 1, "state_dict": {"w": torch.ones(2)}}, old, _use_new_zipfile_serialization=False)
    assert read_checkpoint_state(str(old), sharded=False)["tensor_parallel"] == 1


def test_world_size_counts_devices_times_nodes():
    assert world_size("gpu", 8, 4) == 32
    assert world_size("cpu", "auto", 1) == 1
    assert world_size("gpu", [0, 1, 2], 2) == 6
    assert world_size("cpu", "2", 1) == 2
    with pytest.raises(ValueError, match="hardware.devices=0"):
        world_size("gpu", 0, 1)


def test_strategies_built_from_the_config():
    from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

    assert build_strategy(ParallelConfig(), 1, 1.0) == ("auto", 1.0)
    strategy, clip = build_strategy(ParallelConfig(strategy="ddp"), 2, 1.0)
    assert isinstance(strategy, DDPStrategy) and clip == 1.0
    strategy, clip = build_strategy(ParallelConfig(strategy="fsdp", fsdp={"sharded_checkpoint": False}), 4, 1.0)
    assert isinstance(strategy, ModelParallelStrategy) and clip == 1.0
    assert strategy._data_parallel_size == 4 and strategy._tensor_parallel_size == 1
    assert not strategy._save_distributed_checkpoint


def test_global_batch_tokens_sets_gradient_accumulation():
    cfg = OmegaConf.create({"phase": {"accumulate_grad_batches": 3, "global_batch_tokens": None},
                            "context": {"micro_batch_size": 4, "seq_len": 2048}})
    assert accumulation(cfg, 8) == 3  # not set: the phase's own count
    cfg.phase.global_batch_tokens = 4 * 1024 * 1024  # 4M tokens: 4 x 2048 x 8 GPUs x 64
    assert accumulation(cfg, 8) == 64
    assert accumulation(cfg, 32) == 16
    cfg.phase.global_batch_tokens = 1_000_000
    with pytest.raises(ValueError, match="global_batch_tokens=1000000 is not a multiple"):
        accumulation(cfg, 8)
    # The README's 4 x 8 GPU command: 4M tokens of 2K rows, 4 rows per GPU, 32 GPUs -> 16 micro-batches.
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["+experiment=phase1_2k", "hardware=fsdp", "hardware.num_nodes=4",
                                           "phase.global_batch_tokens=4194304"])
    assert accumulation(cfg, world_size(cfg.hardware.accelerator, cfg.hardware.devices, cfg.hardware.num_nodes)) == 16


# --- data order across ranks ---

def test_ranks_share_each_optimizer_step_in_order_and_resume_there():
    n, micro, accumulate, world = 50, 2, 2, 3
    per_step = micro * accumulate * world
    for start in (0, 2 * per_step):
        shares = [list(ResumeSampler(n, start, rank, world)) for rank in range(world)]
        assert len({len(share) for share in shares}) == 1  # every rank the same number of items
        for step in range((n - start) // per_step):
            taken = sorted(i for share in shares
                           for i in share[step * micro * accumulate:(step + 1) * micro * accumulate])
            first = start + step * per_step
            assert taken == list(range(first, first + per_step))  # the step's items, all ranks together
    with pytest.raises(ValueError, match="rank 3"):
        ResumeSampler(10, 0, 3, 3)


# --- the switches ---

def _loss_and_grads(model: Transformer, tokens: torch.Tensor):
    model.zero_grad()
    loss = model(tokens).logsumexp(-1).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_activation_checkpointing_recomputes_blocks_with_the_same_gradients():
    tokens = torch.randint(0, 97, (2, 16))
    plain = tiny_model()
    loss, grads = _loss_and_grads(plain, tokens)
    model = tiny_model()
    names = list(model.state_dict())
    checkpoint_activations(model)
    calls = []
    for block in model.layers:
        block.feed_forward.register_forward_pre_hook(lambda *args: calls.append(1))
    loss2, grads2 = _loss_and_grads(model, tokens)
    assert len(calls) == 2 * len(model.layers)  # each block ran again in the backward pass
    assert torch.allclose(loss, loss2)
    for name in grads:
        torch.testing.assert_close(grads2[name], grads[name], rtol=1e-5, atol=1e-7)
    assert list(model.state_dict()) == names  # checkpoints keep their parameter names
    calls.clear()
    with torch.no_grad():
        model(tokens)
    assert len(calls) == len(model.layers)  # nothing to recompute without gradients


def test_selective_activation_checkpointing_recomputes_every_nth_block():
    tokens = torch.randint(0, 97, (2, 16))
    model = Transformer(dataclasses.replace(tiny_model().config, n_layers=5))
    _, grads = _loss_and_grads(model, tokens)
    checkpoint_activations(model, every=2)
    runs = []
    for i, block in enumerate(model.layers):
        block.feed_forward.register_forward_pre_hook(lambda *args, i=i: runs.append(i))
    _, grads2 = _loss_and_grads(model, tokens)
    assert sorted(runs) == [0, 0, 1, 2, 2, 3, 4, 4]  # blocks 0, 2 and 4 again in the backward pass
    for name in grads:
        torch.testing.assert_close(grads2[name], grads[name], rtol=1e-5, atol=1e-7)
    for given, every in ((3, 3), ("3", 3), (True, 1), (False, 0), (None, 0), ("0", 0)):
        assert ParallelConfig(activation_checkpointing=given).activation_checkpointing == every, given
    for bad in (-1, 1.5, "abc", "1.5"):
        with pytest.raises(ValueError, match=f"activation_checkpointing={bad!r}: give true, false, or N"):
            ParallelConfig(activation_checkpointing=bad)


def test_compile_covers_training_forwards_and_leaves_generation_eager():
    from moxin.generate import generate

    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    tokens = torch.randint(0, 97, (2, 16))
    loss, grads = _loss_and_grads(tiny_model(), tokens)
    model = tiny_model()
    expected = generate(tiny_model(), [[1, 2, 3]], max_new_tokens=5).tokens
    compile_blocks(model, backend=counting_backend)
    loss2, grads2 = _loss_and_grads(model, tokens)
    assert len(graphs) == 1  # the training forward went through torch.compile, one graph for all blocks
    torch.testing.assert_close(loss2, loss)
    torch.testing.assert_close(grads2["layers.0.attention.wqkv.weight"], grads["layers.0.attention.wqkv.weight"])
    compiled = len(graphs)
    assert generate(model, [[1, 2, 3]], max_new_tokens=5).tokens == expected
    assert len(graphs) == compiled  # decoding (no gradients, changing cache shapes) stayed eager


def test_resume_finds_complete_sharded_checkpoint_folders_only(tmp_path):
    complete = tmp_path / "step-10.ckpt"
    complete.mkdir()
    (complete / "meta.pt").write_bytes(b"x")
    cut_short = tmp_path / "step-20.ckpt"  # a save killed before its meta.pt
    cut_short.mkdir()
    os.utime(complete, (1, 1))
    assert find_resume_checkpoint("auto", str(tmp_path)) == str(complete)
    assert find_resume_checkpoint(str(complete), str(tmp_path)) == str(complete)
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        find_resume_checkpoint(str(cut_short), str(tmp_path))


# --- two processes on the CPU ---

# Validation before training, at steps 4 and 8, and once more after the last step (10): the sharded
# strategies must hand the optimizer its shards after it, and keep working after fit.
COMMON = ("phase.log_every_steps=1", "phase.validate_before_training=true", "phase.val_every_steps=4",
          "phase.keep_checkpoints=-1", "hardware.onednn_linears=false", "eval.every_n_steps=0", "progress_bar=false",
          "logger=csv")
TWO_PROCESSES = ("hardware.accelerator=cpu", "hardware.devices=2")
STRATEGIES = {
    "ddp": ("hardware=ddp", "hardware.precision=32-true"),
    "fsdp": ("hardware=fsdp", "hardware.fsdp.param_dtype=null"),
    "hsdp": ("hardware=fsdp", "hardware.fsdp.param_dtype=null", "hardware.fsdp.shard_size=1"),  # 2 replicas of 1
    # Tensor parallelism over both ranks: one data-parallel replica, so it takes the whole batch of 8;
    # with activation checkpointing, which wraps the tensor-parallel blocks.
    "tp": ("hardware=fsdp", "hardware.fsdp.param_dtype=null", "hardware.fsdp.tensor_parallel=2",
           "context.micro_batch_size=8", "hardware.activation_checkpointing=true"),
    # Pipeline parallelism: 2 stages of one replica, each step's 8 rows as 2 micro-batches of 4 (1F1B);
    # validation batches are single micro-batches: 4 of them hold the reference's 2 x 8 rows.
    "pp": ("hardware=fsdp", "hardware.fsdp.param_dtype=null", "hardware.fsdp.pipeline_parallel=2",
           "context.micro_batch_size=4", "phase.accumulate_grad_batches=2", "phase.limit_val_batches=4"),
    "colossalai_ddp": ("hardware=colossalai_ddp",),
    # HybridParallelPlugin's tensor parallelism (moxin's shardformer policy) over both ranks, as "tp" above;
    # its data parallelism runs in the resume (RESUMED_AS).
    "colossalai_hybrid": ("hardware=colossalai_hybrid", "hardware.colossalai.options.precision=fp32",
                          "hardware.colossalai.options.zero_stage=0", "hardware.colossalai.options.tp_size=2",
                          "context.micro_batch_size=8"),
}


# The tensor-parallel runs resume without tensor parallelism (2 data-parallel ranks of 4 rows): tp's
# checkpoint's split projections load into the fused ones (moxin/tp_checkpoint.py), colossalai_hybrid's
# optimizer states of the fused projections into the whole rows (moxin/colossalai_tp.py), and its steps
# 5-9 check HybridParallelPlugin's data parallelism against the run that matched one process. The fsdp run
# resumes under pipeline parallelism, and the pipeline run without it, accumulating 2 micro-batches of
# 2 rows on each of 2 ranks: the stages load their parts of a whole model's folder and the reverse, and
# the step count and the data position move between the modes' counters (match_loop_progress).
RESUMED_AS = {"tp": ("hardware.fsdp.tensor_parallel=1", "context.micro_batch_size=4"),
              "colossalai_hybrid": ("hardware.colossalai.options.tp_size=1", "context.micro_batch_size=4"),
              "fsdp": ("hardware.fsdp.pipeline_parallel=2", "phase.accumulate_grad_batches=2"),
              "pp": ("hardware.fsdp.pipeline_parallel=1", "context.micro_batch_size=2")}
# Their resumes add no code path (each run is ~12 s of the suite's budget): ddp's checkpoint is the
# single file of one process, and fsdp's resume restores the data position of 2 ranks;
# colossalai_ddp's booster checkpoints are resumed by GRPO's test below.
RESUMED_ELSEWHERE = ("ddp", "colossalai_ddp")


# The multi-node path, on one node: torchrun starts the ranks (Lightning reads its environment instead
# of starting processes), and every rank composes its config. The first runs of ddp, HSDP and
# colossalai_ddp start their ranks through Lightning (its launcher, under DDP, FSDP2 and Colossal-AI);
# the other two-process runs use torchrun, which is quicker.
TORCHRUN = ("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2")  # --standalone: a free port
LAUNCHED_BY_TORCHRUN = ("fsdp", "tp", "pp", "colossalai_hybrid")


def start_run(root: Path, *overrides: str, experiment: str = "tiny_debug", torchrun: bool = False,
              program: str = "run.py"):
    """Start run.py (or `program`, which runs it) in its own process, or its 2 ranks under torchrun;
    finish_run waits for it. torchrun
    starts both ranks at once, 4 s sooner than Lightning starts rank 1 (once rank 0 is set up), and the
    ranks share the run folder they are given. Independent runs may overlap: their imports and gloo
    waits leave the cores idle part of the time."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not any(o.startswith("+experiment=") for o in overrides):
        overrides = (f"+experiment={experiment}", *overrides)
    launcher = ()
    if torchrun:
        launcher = TORCHRUN
        overrides = (*overrides, f"hydra.run.dir={root / experiment / 'shared'}")
    root.mkdir(parents=True, exist_ok=True)
    log = open(root / "stderr.log", "w")  # a file, not a pipe: a full pipe would stall the run
    process = subprocess.Popen([sys.executable, *launcher, program, *COMMON, f"paths.output_root={root}", *overrides],
                               cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=log)
    return process, log, root / experiment


def finish_run(started) -> tuple[dict[int, float], Path]:
    """(train/loss per step, run folder) of a run start_run started, once it has ended well."""
    process, log, folder = started
    try:
        returncode = process.wait(timeout=600)
    finally:
        log.close()
    assert returncode == 0, Path(log.name).read_text()[-3000:]
    (run_dir,) = folder.iterdir()
    with open(run_dir / "csv" / "metrics.csv") as f:
        losses = {int(row["step"]): float(row["train/loss"]) for row in csv.DictReader(f) if row.get("train/loss")}
    return losses, run_dir


def train_run(root: Path, *overrides: str, experiment: str = "tiny_debug", torchrun: bool = False,
              program: str = "run.py") -> tuple[dict[int, float], Path]:
    """Run run.py (see start_run) and wait for it: (train/loss per step, run folder)."""
    return finish_run(start_run(root, *overrides, experiment=experiment, torchrun=torchrun, program=program))


def validation_losses(run_dir: Path) -> list[float]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return [float(row["val/loss"]) for row in csv.DictReader(f) if row.get("val/loss")]


def reference_run(root: Path, *overrides: str, experiment: str = "tiny_debug"):
    """A module fixture's reference run: started at once, beside the first test's own run; calling the
    fixture's value waits for it: (train/loss per step, run folder)."""
    started, finished = start_run(root, *overrides, experiment=experiment), []

    def result() -> tuple[dict[int, float], Path]:
        if not finished:
            finished.append(finish_run(started))
        return finished[0]

    yield result
    started[0].kill()  # (no test waited for it: the ones that did found it ended)
    started[0].wait()
    started[1].close()


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The reference: one process with the global batch of two (2 x 4 rows)."""
    yield from reference_run(tmp_path_factory.mktemp("one_process"), "context.micro_batch_size=8")


SFT = ("+experiment=sft_tulu3", "+scale=tiny", "phase.init_from=null", "phase.max_steps=6")


@pytest.fixture(scope="module")
def one_process_sft(tmp_path_factory):
    """SFT's reference: one process with the global batch of 8 rows."""
    yield from reference_run(tmp_path_factory.mktemp("one_process_sft"), *SFT, "context.micro_batch_size=8",
                             experiment="sft_tulu3")


@pytest.mark.slow
@pytest.mark.parametrize("name", list(STRATEGIES))
def test_two_processes_match_one_and_resume_from_their_checkpoints(name, one_process, tmp_path):
    if name.startswith("colossalai") and not colossalai_available():
        pytest.skip("colossalai is not installed (make install-colossalai)")
    torchrun = name in LAUNCHED_BY_TORCHRUN
    losses, run_dir = train_run(tmp_path / "full", *STRATEGIES[name], *TWO_PROCESSES, torchrun=torchrun)
    reference, reference_dir = one_process()
    assert (run_dir.name == "shared") == torchrun  # under torchrun both ranks wrote into the folder given
    assert sorted(losses) == sorted(reference) and len(losses) == 10
    assert validation_losses(run_dir) == pytest.approx(validation_losses(reference_dir), rel=1e-5)
    for step, loss in reference.items():  # fp32; the ranks' gradients are summed in another order
        assert losses[step] == pytest.approx(loss, rel=1e-5), (name, step)
    # Tokens trained: counted once per data-parallel replica (a tensor-parallel group shares its batch).
    assert train_metrics(run_dir, "train/tokens") == train_metrics(reference_dir, "train/tokens")
    assert_same_exports(run_dir, reference_dir)  # gathered from the shards where the strategy shards them

    if name in ("fsdp", "hsdp"):  # each weight in 2 shards, or (HSDP, shard groups of 1) whole on each replica
        from moxin.safe_dcp import SafeMetadataReader

        stored = SafeMetadataReader(str(run_dir / "checkpoints" / "last.ckpt")).read_metadata().state_dict_metadata
        assert len(stored["state_dict.model.output.weight"].chunks) == {"fsdp": 2, "hsdp": 1}[name]
    # Its checkpoints (files, or folders of shards) load as models for task=evaluate / generate.
    saved = load_model(str(run_dir / "checkpoints" / "last.ckpt")).state_dict()
    for key, tensor in load_model(str(run_dir)).state_dict().items():
        assert torch.equal(saved[key], tensor), (name, key)

    if name in RESUMED_ELSEWHERE:
        return
    middle = run_dir / "checkpoints" / "step-5.ckpt"
    resumed, resumed_dir = train_run(tmp_path / "resumed", *STRATEGIES[name], *TWO_PROCESSES,
                                     *RESUMED_AS.get(name, ()), f"resume={middle}", torchrun=True)
    assert sorted(resumed) == list(range(5, 10))  # it went on from step 5 to the end ...
    if name == "pp":  # (accumulating, the resumed run logs a micro-batch's loss: its weights tell instead)
        assert_same_exports(resumed_dir, run_dir)
        return
    for step in resumed:  # ... exactly as the uninterrupted run did (up to the order of sums, across layouts)
        assert resumed[step] == pytest.approx(losses[step], rel=1e-5 if name in RESUMED_AS else 1e-6), (name, step)


def assert_same_exports(run_dir: Path, expected_dir: Path) -> None:
    """Two runs' final/ weights agree (relative to each tensor's norm, within 1e-4)."""
    final, expected = (load_file(folder / "final" / "model.safetensors") for folder in (run_dir, expected_dir))
    assert final.keys() == expected.keys()
    for key in expected:  # Adam may flip the sign of an update where a gradient is ~0: compare whole tensors
        difference = torch.linalg.vector_norm(final[key] - expected[key]) / torch.linalg.vector_norm(expected[key])
        assert difference < 1e-4, (run_dir, key, float(difference))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fsdp", "pp"])
def test_two_process_sft_equals_one_process(name, one_process_sft, tmp_path):
    """SFT divides each micro-batch's loss by the trained tokens of its whole optimizer step on all ranks
    (step_tokens): right only if the ranks' micro-batches of a step are that step's items, in order.
    Its rows pack several conversations (segments), which FSDP's sharded blocks must keep apart too, and
    under the pipeline (2 stages, each step's 8 rows as 2 micro-batches of 4) every stage.
    (ddp counts the step's tokens by the same all-reduce: its run here added 20 s and no other code.)"""
    losses, two = train_run(tmp_path / "two", *SFT, *STRATEGIES[name], *TWO_PROCESSES, experiment="sft_tulu3",
                            torchrun=True)
    reference, one = one_process_sft()
    expected, trained = load_model(str(one)).state_dict(), load_model(str(two)).state_dict()
    for key, tensor in expected.items():
        difference = torch.linalg.vector_norm(trained[key] - tensor) / torch.linalg.vector_norm(tensor)
        assert difference < 1e-4, (key, float(difference))
    if name == "pp":  # one replica, like the reference: each step's loss is the same token mean of 8 rows
        assert losses == pytest.approx(reference, rel=1e-5)
        assert train_metrics(two, "train/tokens") == train_metrics(one, "train/tokens")
        # It validates the same rows, through the stages (all 13 of the tiny set: 4 batches of 4 would hold
        # 16; 2 data-parallel ranks would share them out, DistributedSampler repeating rows to even them).
        assert validation_losses(two) == pytest.approx(validation_losses(one), rel=1e-5)


def small_dpo(folder: Path) -> tuple[str, ...]:
    """A DPO run's overrides, from a small random starting model saved in `folder` (its reference)."""
    torch.manual_seed(0)
    from moxin.model import ModelConfig as Config

    Transformer(Config(vocab_size=32000, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=128,
                       sliding_window=64, max_seq_len=256)).save_hf(str(folder))
    return ("+experiment=dpo_tulu3", "+scale=tiny", f"phase.init_from={folder}", "model.dim=64", "model.n_layers=2",
            "model.head_dim=16", "model.hidden_dim=128", "phase.max_steps=6", "phase.checkpoint_every_steps=3",
            "phase.val_every_steps=3")


@pytest.mark.slow
def test_dpo_under_fsdp_resumes_with_its_sharded_reference(tmp_path):
    """DPO's frozen reference is sharded beside the policy; FSDP's folder checkpoints keep it, so a
    resumed run loads every tensor it registered and goes on as the uninterrupted one did."""
    dpo = (*small_dpo(tmp_path / "start"), *STRATEGIES["fsdp"], *TWO_PROCESSES)
    losses, run_dir = train_run(tmp_path / "full", *dpo, experiment="dpo_tulu3", torchrun=True)
    assert len(losses) == 6 and losses[0] == pytest.approx(0.6931, abs=1e-3)  # ln 2: policy = reference
    resumed, _ = train_run(tmp_path / "resumed", *dpo, f"resume={run_dir / 'checkpoints' / 'step-3.ckpt'}",
                           experiment="dpo_tulu3", torchrun=True)
    assert min(resumed) == 3
    for step in resumed:
        assert resumed[step] == pytest.approx(losses[step], rel=1e-5), step


@pytest.mark.slow
def test_dpo_under_the_pipeline_equals_one_process_and_resumes_with_a_reference_copy(tmp_path):
    """DPO on 2 pipeline stages (each step's 4 pairs as 2 micro-batches of 2 whole pairs; dpo.reference=cached,
    whose log-probs the starting weights' stages compute) against one process taking the 4 pairs at once
    (its reference a frozen copy): the same per-step losses, validation losses and final weights. It then
    resumes under the pipeline with dpo.reference=copy, split like the policy and run through the stages
    forward only, though the checkpoint holds no reference to load."""
    dpo = small_dpo(tmp_path / "start")
    reference = start_run(tmp_path / "one", *dpo, "phase.limit_val_batches=4", experiment="dpo_tulu3")
    staged = (*dpo, *STRATEGIES["pp"], "context.micro_batch_size=2", "phase.limit_val_batches=8")  # 16 pairs too
    losses, run_dir = train_run(tmp_path / "pp", *staged, *TWO_PROCESSES, "phase.dpo.reference=cached",
                                experiment="dpo_tulu3", torchrun=True)
    expected, one = finish_run(reference)
    assert sorted(losses) == list(range(6)) and losses[0] == pytest.approx(0.6931, abs=1e-3)  # ln 2 at the start
    assert losses == pytest.approx(expected, rel=1e-5)
    assert validation_losses(run_dir) == pytest.approx(validation_losses(one), rel=1e-5)
    # The step's metrics, over its 4 pairs (a difference of log-probs: fp32 noise of ~1e-6 near 0).
    assert train_metrics(run_dir, "train/reward_margin") == pytest.approx(train_metrics(one, "train/reward_margin"),
                                                                          rel=1e-4, abs=1e-5)
    assert train_metrics(run_dir, "train/tokens") == train_metrics(one, "train/tokens")
    assert_same_exports(run_dir, one)
    resumed, _ = train_run(tmp_path / "resumed", *staged, *TWO_PROCESSES, "phase.dpo.reference=copy",
                           f"resume={run_dir / 'checkpoints' / 'step-3.ckpt'}", experiment="dpo_tulu3", torchrun=True)
    assert sorted(resumed) == [3, 4, 5]
    for step in resumed:
        assert resumed[step] == pytest.approx(losses[step], rel=1e-5), step


# --- GRPO under FSDP: each rank samples its own rollouts from the gathered policy ---

def _gathered_generation_worker(rank: int, init_file: str) -> None:
    from datetime import timedelta

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from moxin.generate import generate
    from moxin.parallel import FSDPConfig, gathered_weights, shard_model

    # A collective left unpaired fails in a minute instead of gloo's 30.
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))
    mesh = init_device_mesh("cpu", (2,))
    prompts, new_tokens = [[1, 5, 9], [3]], 4 if rank == 0 else 30  # rank 1 runs 26 forward passes more
    tokens = torch.tensor([[1, 2, 3, 4]])
    for param_dtype in (None, "bf16"):  # as stored (fp32), and FSDP's bf16 compute on GPUs
        plain, model = tiny_model(), tiny_model()
        shard_model(model, mesh, FSDPConfig(param_dtype=param_dtype, reduce_dtype=None))
        with gathered_weights(model):
            out = generate(model, prompts, new_tokens, temperature=1.0, seed=rank)
            for _ in range(1 + 2 * rank):  # whole forward passes too, a different number per rank
                model(tokens)
        compute = plain.to(torch.bfloat16) if param_dtype else plain
        expected = generate(compute, prompts, new_tokens, temperature=1.0, seed=rank)
        assert out.tokens == expected.tokens and len(out.tokens[0]) == new_tokens, param_dtype
        assert all(isinstance(p, DTensor) for p in model.parameters())  # sharded again for training

    with pytest.raises(ValueError, match="exceeds max_seq_len"), gathered_weights(model):
        model(torch.ones(1, 65, dtype=torch.long))  # fails inside FSDP's forward (max_seq_len 64) ...
    assert all(isinstance(p, DTensor) for p in model.parameters())  # ... and FSDP is reset and resharded
    plain, model = tiny_model(), tiny_model()
    shard_model(model, mesh, FSDPConfig(param_dtype=None, reduce_dtype=None))
    with gathered_weights(model):
        generate(model, prompts, new_tokens)
    model(tokens).float().logsumexp(-1).mean().backward()  # training's collectives still pair up
    plain(tokens).float().logsumexp(-1).mean().backward()
    for (name, p), q in zip(model.named_parameters(), plain.parameters(), strict=True):
        assert torch.allclose(p.grad.full_tensor(), q.grad, atol=1e-6), name

    # Tensor parallelism over both ranks: they decode together (each caching its own key/value heads),
    # from one seed, so they draw the same tokens and stop together.
    from moxin.parallel import apply_tensor_parallel

    mesh = init_device_mesh("cpu", (1, 2), mesh_dim_names=("data_parallel", "tensor_parallel"))
    for param_dtype in (None, "bf16"):
        plain, model = tiny_model(), tiny_model()
        apply_tensor_parallel(model, mesh["tensor_parallel"])
        shard_model(model, mesh["data_parallel"], FSDPConfig(param_dtype=param_dtype, reduce_dtype=None))
        with gathered_weights(model):
            out = generate(model, prompts, 30, temperature=1.0, seed=7)
        peers = [None, None]
        dist.all_gather_object(peers, out.tokens)
        assert peers[0] == peers[1] and len(out.tokens[1]) == 30, param_dtype
        if param_dtype is None:  # fp32: the unsplit model's tokens (bf16 sums the heads' outputs in another order)
            assert out.tokens == generate(plain, prompts, 30, temperature=1.0, seed=7).tokens

    from moxin.parallel import from_group_leader

    with pytest.raises(ZeroDivisionError):  # a failure on the group's first rank reaches its peers too
        from_group_leader(lambda: 1 / 0, mesh["tensor_parallel"])
    # GRPO's rewards are the group's first rank's: a peer's verifier that timed out elsewhere (here, a
    # reward that depends on the rank) must not give it other advantages than its group's.
    import moxin.modules.grpo as grpo
    from moxin.modules.base import OptimConfig
    from moxin.tokenizer import load_tokenizer

    module = grpo.GRPOModule(tiny_model().config, OptimConfig(), grpo=grpo.GRPOConfig(group_size=4, max_new_tokens=3,
                                                                                     kl_beta=0.0))
    module.tokenizer, module._meshes = load_tokenizer(), (mesh["data_parallel"], mesh["tensor_parallel"], None)
    grpo.timed_rewards = lambda kind, texts, answers, verifier: ([float(i % 4 == rank) for i in range(len(texts))],
                                                                 [False] * len(texts), 0.0)
    try:
        advantages = module.rollout([[1, 5, 9], [3]], ["1", "2"])["batch"]["advantages"]
    finally:
        module.verifier.close()
    peers = [None, None]
    dist.all_gather_object(peers, advantages)
    assert torch.equal(peers[0], peers[1]) and peers[0][0] > 0  # rank 0's rewards: the first of each group
    dist.destroy_process_group()


def test_gathered_weights_let_each_rank_generate_alone(tmp_path):
    """Inside gathered_weights each rank runs as many forward passes as it needs with no collective (else
    the ranks' all-gathers would not pair up), the tokens are the unsharded model's in fp32 and bf16,
    a failure inside leaves the model sharded, and FSDP trains after."""
    import torch.multiprocessing as mp

    mp.spawn(_gathered_generation_worker, args=(str(tmp_path / "init"),), nprocs=2, join=True)


def answering_bigram(path: Path) -> Path:
    """A tiny-config model that is a bigram table writing "\\boxed{N}" after the prompt, N one or two
    digits drawn at random, then EOS: GRPO's rewards then differ within a group from the first step
    (a randomly initialised model never boxes an answer, so every advantage would be 0). Each token of
    the chain embeds as its own unit vector; the blocks add nothing (wo = w2 = 0); the head's row for a
    token points at the tokens it may follow."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        from hydra.utils import instantiate

        config = instantiate(compose("config", overrides=["model=tiny"]).model)
    model = Transformer(config)
    newline, eos, close = 13, 2, 28752
    digits = [28734, 28740, 28750, 28770, 28781, 28782, 28784, 28787, 28783, 28774]
    chain = [newline, 414, 2858, 286, 28751]  # the prompt's last token, then "\\", "box", "ed", "{"
    follows = {chain[i + 1]: [(chain[i], 3.0)] for i in range(len(chain) - 1)}
    # Each digit follows "{" or another digit (then p ~ 0.25 for all ten together: logits differ by 0.3 x sqrt(128)).
    follows.update({d: [(28751, 3.0)] + [(other, 2.7) for other in digits] for d in digits})
    follows[close] = [(d, 3.0) for d in digits]
    follows[eos] = [(close, 3.0)]
    state = {token: i for i, token in enumerate(chain + digits + [close])}
    with torch.no_grad():
        model.tok_embeddings.weight.zero_()
        model.output.weight.zero_()
        for token, i in state.items():
            model.tok_embeddings.weight[token, i] = 1.0
        for token, previous in follows.items():
            for before, strength in previous:  # logit = strength x sqrt(dim) after the final RMSNorm
                model.output.weight[token, state[before]] = strength
        for block in model.layers:
            block.attention.wo.weight.zero_()
            block.feed_forward.w2.weight.zero_()
    model.save_hf(str(path))
    return path


def sample_scores(path: Path) -> list[float]:
    """The log-likelihoods lm-eval logged for each request of each sample (log_samples)."""
    return [float(response[0]) for sample in json.loads(path.read_text())["arc_easy"]
            for responses in sample["resps"] for response in responses]


def train_metrics(run_dir: Path, key: str) -> dict[int, float]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return {int(row["step"]): float(row[key]) for row in csv.DictReader(f) if row.get(key)}


@pytest.mark.slow
def test_grpo_under_fsdp_and_colossalai_matches_ddp_and_resumes(eval_data_dir, tmp_path):
    """GRPO's rollouts, rewards, validation, in-training evaluation and weights under fsdp (2 gloo
    processes) equal those under ddp, whose ranks sample the same rollouts from the same seeds; the KL
    reference is sharded too. Under Colossal-AI's TorchDDPPlugin (where installed) the rollouts and
    weights are ddp's too, and a run resumed from its checkpoint goes on as the uninterrupted one did
    (under fsdp where Colossal-AI is not installed)."""
    start = answering_bigram(tmp_path / "start")
    grpo = ("+experiment=grpo_deepscaler", "+scale=tiny", f"phase.init_from={start}", "phase.max_steps=4",
            "phase.val_every_steps=2", "phase.limit_val_batches=1", "phase.checkpoint_every_steps=2",
            "context.micro_batch_size=2", "phase.grpo.group_size=4", "phase.grpo.reward=correct",
            "phase.grpo.val_max_new_tokens=8", *TWO_PROCESSES)
    evaluate = ("eval.every_n_steps=3", f"eval.data_dir={eval_data_dir}", "eval.limit=4", "eval.max_length=64",
                "eval.tasks=[{name: arc_easy, num_fewshot: 0, metric: acc, column: ARC-E}]", "eval.log_samples=true")
    ddp = start_run(tmp_path / "ddp", *grpo, *evaluate, *STRATEGIES["ddp"], experiment="grpo_deepscaler",
                    torchrun=True)  # beside the fsdp run
    fsdp, fsdp_dir = train_run(tmp_path / "fsdp", *grpo, *evaluate, *STRATEGIES["fsdp"], experiment="grpo_deepscaler",
                               torchrun=True)
    ddp, ddp_dir = finish_run(ddp)
    assert len(ddp) == 4 and sorted(fsdp) == sorted(ddp)
    # The evaluation callback at step 3: rank 0 alone, on the weights FSDP gathered for it. Each answer
    # choice's log-likelihood (16 of them) as under ddp.
    ddp_scores, fsdp_scores = (sample_scores(run / "eval" / "step-3" / "results_samples.json")
                               for run in (ddp_dir, fsdp_dir))
    assert len(ddp_scores) == 16 and fsdp_scores == pytest.approx(ddp_scores, rel=1e-5)
    assert max(train_metrics(ddp_dir, "train/reward_std").values()) > 0  # the updates had something to learn
    # The same rollouts (lengths, rewards), and the policy moving away from the reference alike: the KL
    # of steps 1-3 (1e-6 to 1e-4) measures the updates. (The loss itself is ~0: advantages average to 0.)
    assert train_metrics(fsdp_dir, "train/response_length") == train_metrics(ddp_dir, "train/response_length")
    kl = train_metrics(ddp_dir, "train/kl")
    assert min(kl[step] for step in (1, 2, 3)) > 0
    for key, tolerance in (("train/reward", 1e-6), ("val/accuracy", 1e-6), ("train/kl", 1e-3 * max(kl.values()))):
        assert train_metrics(fsdp_dir, key) == pytest.approx(train_metrics(ddp_dir, key), abs=tolerance), key
    expected, trained = load_model(str(ddp_dir)).state_dict(), load_model(str(fsdp_dir)).state_dict()
    started = load_model(str(start)).state_dict()
    for key, tensor in expected.items():
        moved = torch.linalg.vector_norm(tensor - started[key])
        assert moved > 0, key  # every tensor trained
        assert torch.linalg.vector_norm(trained[key] - tensor) < 1e-3 * moved, key  # and by the same update

    # Colossal-AI's TorchDDPPlugin: each manual backward arms the plugin's DistributedDataParallel.
    resumable, resumed_under = fsdp_dir, "fsdp"
    if colossalai_available():
        resumed_under = "colossalai_ddp"
        resumable = train_run(tmp_path / "colossalai", *grpo, *STRATEGIES[resumed_under],
                              experiment="grpo_deepscaler", torchrun=True)[1]
        for key in ("train/response_length", "train/reward", "train/kl"):
            assert train_metrics(resumable, key) == pytest.approx(train_metrics(ddp_dir, key), rel=1e-5), key
        trained = load_model(str(resumable)).state_dict()
        for key, tensor in expected.items():
            assert torch.linalg.vector_norm(trained[key] - tensor) < 1e-3 * torch.linalg.vector_norm(
                tensor - started[key]), key
        # Its checkpoints leave the frozen reference out (half their size): a resume rebuilds it from
        # the starting weights and loads the policy strictly.
        from moxin.colossalai_strategy import PLUGIN_KEY, saved_model_keys

        saved = saved_model_keys(resumable / "checkpoints" / "step-2.ckpt" / "model")
        assert saved and all(key.startswith("model.") for key in saved), sorted(saved)[:5]
        meta = torch.load(resumable / "checkpoints" / "step-2.ckpt" / "meta.pt", weights_only=True)
        assert meta[PLUGIN_KEY] == "torch_ddp"  # the plugin it resumes under (refused under another)

    # GRPO's own resume state (consumed rollout batches, the seeds by step), resumed under Colossal-AI
    # where installed, else under fsdp with its sharded reference (which DPO's fsdp test resumes too).
    resumed_dir = train_run(tmp_path / "resumed", *grpo, *STRATEGIES[resumed_under],
                            f"resume={resumable / 'checkpoints' / 'step-2.ckpt'}", experiment="grpo_deepscaler",
                            torchrun=True)[1]
    resumed_kl = train_metrics(resumed_dir, "train/kl")
    assert sorted(resumed_kl) == [2, 3]
    assert resumed_kl == pytest.approx({step: kl for step, kl in train_metrics(resumable, "train/kl").items()
                                        if step >= 2}, rel=1e-4)


def test_resuming_on_another_number_of_ranks_warns(capsys):
    from moxin.data.datamodule import ResumableDataModule

    data = ResumableDataModule(micro_batch_size=2)
    data.train_dataset = list(range(10))
    data.load_state_dict({"consumed_samples": 4, "replicas": 2})  # a checkpoint that records its ranks only
    first = next(iter(data.train_dataloader()))
    assert first.tolist() == [4, 5]  # one rank now: it goes on after the 4 samples consumed
    assert "resuming on 1 data-parallel ranks a run checkpointed on 2" in capsys.readouterr().out
    # With as many samples per step (2 ranks of 1, or one of 2, or a pipeline's step) the steps hold the
    # same items: no warning. Other step sizes group them otherwise.
    data.load_state_dict({"consumed_samples": 4, "replicas": 2, "samples_per_step": 2})
    assert "WARNING" not in capsys.readouterr().out
    data.load_state_dict({"consumed_samples": 4, "replicas": 1, "samples_per_step": 4})
    assert "resuming with 2 samples per optimizer step a run checkpointed with 4" in capsys.readouterr().out


def test_checkpointing_and_compile_switches_train_like_the_plain_model(make_cfg, tmp_path, monkeypatch):
    """hardware.activation_checkpointing (every 2nd block) and hardware.compile through the trainer: the same
    losses and exported weights as without them (aot_eager: torch.compile's graphs without a C compiler)."""
    import moxin.parallel
    from moxin.train import run

    applied = []
    for name in ("checkpoint_activations", "compile_blocks"):
        original = getattr(moxin.parallel, name)
        monkeypatch.setattr(moxin.parallel, name, lambda model, *args, _f=original, _n=name, **kw: (
            applied.append((_n, kw.get("every"))), _f(model, *args, **kw))[1])

    steps = ("+experiment=tiny_debug", "phase.max_steps=4", "phase.val_every_steps=2", "phase.log_every_steps=1",
             "eval.every_n_steps=0")
    plain = run(make_cfg(*steps, run_name="plain"))
    assert applied == []
    switched = run(make_cfg(*steps, "hardware.activation_checkpointing=2", "hardware.compile=true",  # blocks 0, 2
                            "hardware.compile_backend=aot_eager", run_name="switched"))
    # Once, though fit and validate both ran; checkpointing every 2nd block.
    assert applied == [("checkpoint_activations", 2), ("compile_blocks", None)]
    assert switched["val/loss"] == pytest.approx(plain["val/loss"], rel=1e-5)
    assert switched["train/loss"] == pytest.approx(plain["train/loss"], rel=1e-5)
    expected = load_model(str(tmp_path / "plain")).state_dict()
    for key, tensor in load_model(str(tmp_path / "switched")).state_dict().items():
        torch.testing.assert_close(tensor, expected[key], rtol=1e-4, atol=1e-6, msg=key)


def test_fsdp_builds_on_the_meta_device_and_only_rank_zero_holds_the_weights(make_cfg, monkeypatch):
    from hydra.utils import instantiate
    from lightning.pytorch.utilities import rank_zero_only

    from moxin.parallel import on_meta_device

    cfg = make_cfg("+experiment=tiny_debug")
    model_cfg, data_cfg, fsdp = instantiate(cfg.model), instantiate(cfg.data), ParallelConfig(strategy="fsdp")
    torch.manual_seed(3)
    expected = Transformer(model_cfg).state_dict()  # what one process would draw after the same seed
    torch.manual_seed(3)
    module = build_module(cfg, model_cfg, data_cfg, fsdp)
    assert on_meta_device(module.model)  # no rank allocates the whole model for its own use
    assert module.initial_state.keys() == expected.keys()
    assert all(torch.equal(module.initial_state[k], expected[k]) for k in expected)
    assert build_module(cfg, model_cfg, data_cfg, fsdp, random_init=False).initial_state is None  # resumed
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    other = build_module(cfg, model_cfg, data_cfg, fsdp)
    assert on_meta_device(other.model) and other.initial_state is None  # rank 1 receives its shard
    assert not on_meta_device(build_module(cfg, model_cfg, data_cfg, ParallelConfig(strategy="ddp")).model)


def test_start_weights_are_fp32_and_every_rank_checks_the_path(tmp_path):
    from moxin.train import start_weights

    model = tiny_model().to(torch.bfloat16)  # e.g. released weights stored in bf16
    model.save_hf(str(tmp_path / "bf16"))
    state = start_weights(str(tmp_path / "bf16"))
    assert all(tensor.dtype == torch.float32 for tensor in state.values())  # fp32 weights to train
    assert start_weights(str(tmp_path / "bf16"), read=False) is None  # FSDP's other ranks: checked, not read
    with pytest.raises(FileNotFoundError):
        start_weights(str(tmp_path / "missing"), read=False)


# --- the GPU checks' programs, which a bare GPU image (PyTorch alone) must run ---

# Imported at start-up: the project's other dependencies cannot be imported, as on such an image.
TORCH_ONLY = """
import sys
class _Absent:
    names = {"omegaconf", "hydra", "lightning", "datasets", "transformers", "wandb", "lm_eval", "mistral_common",
             "safetensors", "colossalai"}
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.names:
            raise ImportError(f"{name} is not installed on a bare GPU image")
sys.meta_path.insert(0, _Absent())
"""


@pytest.mark.slow
@pytest.mark.parametrize("program", ["experiments/gpu/fsdp_check.py", "experiments/benchmarks/mfu.py"])
def test_gpu_check_programs_run_with_pytorch_alone(program, tmp_path):
    """experiments/gpu/run_checks.sh runs these on a GPU image with nothing but PyTorch; without a GPU
    they check themselves on the CPU (fp32), and say so."""
    (tmp_path / "sitecustomize.py").write_text(TORCH_ONLY)
    # No GPU for them even where one is (CUDA hidden): the CPU mode is what this test checks.
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}:{REPO}", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    args = ["--steps", "2", "--warmup", "1", "--seq", "64"] if program.endswith("mfu.py") else []
    done = subprocess.run([sys.executable, program, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert "no GPU" in result["note"]
    if program.endswith("fsdp_check.py"):
        assert result["ok"] and result["losses_fsdp"] == pytest.approx(result["losses_plain"], rel=1e-5)
    else:
        assert result["losses_agree"] and result["ours"] > 0


# --- on GPUs (skipped without CUDA): the plugins and precisions a CPU cannot run ---

GPU_STRATEGIES = {
    "colossalai_zero2": ("hardware=colossalai_zero2",),
    "colossalai_gemini": ("hardware=colossalai_gemini",),
    "fsdp_bf16": ("hardware=fsdp", "hardware.compile=true"),
    # HybridParallelPlugin in bf16 with ZeRO-1 (its mixed-precision optimizer), and its tensor parallelism.
    "colossalai_hybrid_bf16": ("hardware=colossalai_hybrid",),
    "colossalai_hybrid_tp_bf16": ("hardware=colossalai_hybrid", "hardware.colossalai.options.tp_size=2"),
    # Pipeline stages over NCCL (2 GPUs): send/recv of bf16 activations, 1F1B with 2 micro-batches.
    "fsdp_pipeline_bf16": ("hardware=fsdp", "hardware.fsdp.pipeline_parallel=2", "phase.accumulate_grad_batches=2"),
}
TWO_GPUS = {"fsdp_pipeline_bf16": "pipeline parallelism needs 2 GPUs, one per stage",
            "colossalai_hybrid_tp_bf16": "tensor parallelism over 2 ranks needs 2 GPUs"}


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: ZeRO, Gemini and bf16 FSDP run on GPUs only")
@pytest.mark.parametrize("name", list(GPU_STRATEGIES))
def test_gpu_strategies_train_save_and_resume(name, tmp_path):
    if name.startswith("colossalai") and not colossalai_available():
        pytest.skip("colossalai is not installed (make install-colossalai)")
    if name in TWO_GPUS and torch.cuda.device_count() < 2:
        pytest.skip(TWO_GPUS[name])
    gpus = ("hardware.accelerator=gpu", f"hardware.devices={min(2, torch.cuda.device_count())}")
    assert_trains_saves_and_resumes(tmp_path, *GPU_STRATEGIES[name], *gpus)


@pytest.mark.slow
@needs_colossalai
def test_zero2_trains_saves_and_resumes_with_its_streams_in_order_on_the_cpu(tmp_path):
    """ZeRO-2 through run.py in one CPU process, its CUDA streams run in order (tests/zero2_on_cpu.py).
    On a GPU it once trained nothing under Lightning, which no CPU test could see."""
    assert_trains_saves_and_resumes(tmp_path, "hardware=colossalai_zero2", "hardware.accelerator=cpu",
                                    "hardware.devices=1", program="tests/zero2_on_cpu.py")


def assert_trains_saves_and_resumes(tmp_path: Path, *overrides: str, program: str = "run.py") -> None:
    """10 steps learn; the last checkpoint holds the exported weights; a resume from step 5 takes the same
    losses. bf16 precision: ZeRO saves its bf16 working weights, and exact equality is fp32's (above)."""
    losses, run_dir = train_run(tmp_path / "full", *overrides, program=program)
    assert len(losses) == 10 and losses[9] < losses[0] - 0.5
    saved = load_model(str(run_dir / "checkpoints" / "last.ckpt")).state_dict()
    exported = load_model(str(run_dir)).state_dict()
    for key, tensor in exported.items():
        torch.testing.assert_close(saved[key].float(), tensor.float(), rtol=1e-2, atol=1e-2, msg=key)
    resumed, _ = train_run(tmp_path / "resumed", *overrides, f"resume={run_dir / 'checkpoints' / 'step-5.ckpt'}",
                           program=program)
    assert min(resumed) == 5
    for step in resumed:
        assert resumed[step] == pytest.approx(losses[step], rel=2e-2), (overrides, step)


def test_a_distributed_checkpoint_metadata_that_calls_a_function_is_refused(tmp_path):
    """task=evaluate may be given someone else's FSDP folder: its .metadata names only DCP's classes."""
    import pickle

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(tmp_path / "ran"),))

    folder = tmp_path / "step-1.ckpt"
    folder.mkdir()
    torch.save({"hyper_parameters": {"model": tiny_model().config.to_dict()}}, folder / "meta.pt")
    (folder / ".metadata").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(pickle.UnpicklingError, match="posix.mkdir is not allowed"):
        load_model(str(folder))
    assert not (tmp_path / "ran").exists()
