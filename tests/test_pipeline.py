"""Pipeline parallelism's pieces in one process: how the blocks split into stages, that the stages
chained compute the whole model under its parameter names, and the settings it refuses. Its runs
on 2 processes (pipeline 2) are in tests/test_parallel.py beside the other strategies'."""

from __future__ import annotations

import copy
import types
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from moxin.losses import IGNORE_INDEX, linear_cross_entropy
from moxin.model import ModelConfig, Transformer
from moxin.modules import DPOModule, GRPOModule, PretrainModule, SFTModule
from moxin.modules.base import OptimConfig
from moxin.parallel import ParallelConfig
from moxin.pipeline import split_model, stage_layers
from moxin.tp_checkpoint import TranslatingModelParallelStrategy
from moxin.train import eval_callbacks

CONFIG = ModelConfig(vocab_size=97, dim=32, n_layers=5, n_heads=4, n_kv_heads=2, head_dim=8, hidden_dim=64,
                     sliding_window=8, max_seq_len=64)


def test_stages_take_consecutive_blocks_and_the_first_stages_any_extra():
    assert [list(stage_layers(36, 4, s)) for s in range(4)] == [list(range(9 * s, 9 * s + 9)) for s in range(4)]
    assert [list(stage_layers(5, 3, s)) for s in range(3)] == [[0, 1], [2, 3], [4]]  # the last also has the head
    with pytest.raises(ValueError, match="pipeline_parallel=6 is more stages than the model's 5 blocks"):
        stage_layers(5, 6, 0)


def test_chained_stages_compute_the_whole_model_under_its_parameter_names():
    torch.manual_seed(0)
    model = Transformer(CONFIG)
    stages = [split_model(model, s, 3) for s in range(3)]
    tokens = torch.randint(0, CONFIG.vocab_size, (2, 12))  # longer than the window: windowed attention
    hidden = tokens
    for stage in stages:
        hidden = stage(hidden)
    assert torch.equal(hidden, model.hidden_states(tokens))
    names = [set(stage.state_dict()) for stage in stages]
    assert set.union(*names) == set(model.state_dict())  # every weight on one stage, named as in the model
    assert sum(len(n) for n in names) == len(model.state_dict())
    assert "tok_embeddings.weight" in names[0] and {"norm.weight", "output.weight"} <= names[2]
    assert "layers.4.ffn_norm.weight" in names[2] and "layers.1.ffn_norm.weight" in names[0]
    # Packed rows (SFT): every stage takes the segments, within the window (one mask) and beyond it.
    for length in (6, 12):
        rows = tokens[:, :length]
        segments = torch.tensor([[0] * (length - 4) + [1] * 4, [0] * 3 + [1] * (length - 3)])
        hidden = rows
        for stage in stages:
            hidden = stage(hidden, segments)
        assert torch.equal(hidden, model.hidden_states(rows, segments=segments))
        assert not torch.allclose(hidden, model.hidden_states(rows))  # (the segments matter)


def test_sft_under_the_pipeline_scales_each_micro_batch_to_its_share_of_the_step():
    """Each micro-batch's loss is its trained tokens' loss sum x data-parallel ranks / the step's trained
    tokens on all ranks: after FSDP's mean over the ranks and the schedule's sum over micro-batches, the
    gradient of the step's loss sum over its trained tokens. The logged loss is the rank's token mean."""
    module = SFTModule(CONFIG, OptimConfig())
    module._trainer = types.SimpleNamespace(world_size=1, accumulate_grad_batches=1, strategy=types.SimpleNamespace(
        distributed_sampler_kwargs={"rank": 0, "num_replicas": 2}))
    logged = {}
    module.log = lambda name, value, **kwargs: logged.__setitem__(name, float(value))
    module.log_lr = lambda: None
    labels = torch.randint(0, CONFIG.vocab_size, (2, 6))
    labels[0, :4] = IGNORE_INDEX  # a prompt: not trained
    batch = {"input_ids": torch.zeros(2, 6, dtype=torch.long), "labels": labels, "segments": torch.zeros(2, 6),
             "step_tokens": torch.tensor([40.0, 40.0])}
    hidden = torch.randn(2, 6, CONFIG.dim)
    trained = labels != IGNORE_INDEX
    token_sum = linear_cross_entropy(hidden[trained], module.model.output.weight, labels[trained], reduction="sum")

    class Runner:  # the schedule's loss calls, as on the last stage: the step's two micro-batches, one row each
        def train_step(self, input_ids, labels, segments=None):
            assert segments is None  # unpacked rows: the stages keep plain causal attention
            return sum(module.pipeline_loss(hidden[i:i + 1], labels[i:i + 1]) for i in range(2)).detach()

    module.pipeline_runner, module.max_grad_norm = Runner(), None
    optimizer = torch.optim.SGD(module.parameters(), lr=0.0)
    module.optimizers = lambda: optimizer
    module.lr_schedulers = lambda: torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    loss = module.training_step(batch, 0)
    assert float(loss) == pytest.approx(float(token_sum) * 2 / 40, rel=1e-5)  # 2 data-parallel ranks, 40 tokens
    assert logged["train/loss"] == pytest.approx(float(token_sum) / int(trained.sum()), rel=1e-5)
    assert module.tokens_seen == 40  # the step's, on all ranks
    batch["segments"][1, 3:] = 1  # packed rows: every stage takes their segments
    assert module.pipeline_inputs(batch)["segments"] is batch["segments"]


def test_dpo_under_the_pipeline_gives_each_micro_batch_whole_pairs_and_the_step_their_mean_loss():
    """The step's pairs are regrouped so that each equal micro-batch holds its pairs' chosen and rejected
    rows, and each micro-batch's loss (its pairs' mean / micro-batches, with their reference log-probs)
    sums to the step's mean loss over all pairs; the logged metrics are the whole step's."""
    torch.manual_seed(0)
    module = DPOModule(CONFIG, OptimConfig())
    module.set_reference(Transformer(CONFIG).state_dict())  # another model: the rewards are not zero
    module._trainer = types.SimpleNamespace(world_size=1, accumulate_grad_batches=1, strategy=types.SimpleNamespace(
        distributed_sampler_kwargs={"rank": 0, "num_replicas": 1}),
        datamodule=types.SimpleNamespace(config=types.SimpleNamespace(seq_len=16)))
    logged = {}
    module.log = lambda name, value, **kwargs: logged.__setitem__(name, float(value))
    module.log_dict = lambda values, **kwargs: logged.update({k: float(v) for k, v in values.items()})
    module.log_lr = lambda: None
    pairs = 4  # rows: the 4 chosen replies, then the 4 rejected ones; prompts of other lengths
    input_ids = torch.randint(0, CONFIG.vocab_size, (2 * pairs, 10))
    labels = input_ids.clone()
    for row in range(2 * pairs):
        labels[row, :2 + row % 5] = IGNORE_INDEX
    batch = {"input_ids": input_ids, "labels": labels, "index": torch.arange(pairs)}
    expected, metrics = module.preference_step(batch)  # one micro-batch of all 4 pairs, no pipeline

    class Runner:  # as on the last stage: the schedule splits the rows into equal micro-batches
        def train_step(self, input_ids, target):
            return sum(module.pipeline_loss(module.model.hidden_states(ids), part)
                       for ids, part in zip(input_ids.chunk(2), target.chunk(2), strict=True)).detach()

        def forward_only(self, input_ids, on_last, shape, segments=None, model=None):
            return on_last(model.hidden_states(input_ids))

        def from_last_stage(self, value, shape=()):
            return value

    module.use_pipeline(2, None)
    module.parallel = ParallelConfig(strategy="fsdp", fsdp={"pipeline_parallel": 2})
    module.pipeline_runner = Runner()
    ids, target = module.pipeline_rows(batch)
    assert torch.equal(ids[:4, :10], input_ids[[0, 1, 4, 5]])  # micro-batch 0: pairs 0 and 1, chosen then rejected
    regrouped = [0, 1, 4, 5, 2, 3, 6, 7]  # each row's labels, then its row in the step's batch
    assert torch.equal(target[:, :10], labels[regrouped]) and target[:, -1].tolist() == regrouped
    assert ids.shape == (8, 16) and (target[:, 10:16] == IGNORE_INDEX).all()  # padded to seq_len, not trained
    optimizer = torch.optim.SGD(module.parameters(), lr=0.0)
    module.optimizers = lambda: optimizer
    module.lr_schedulers = lambda: torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    loss = module.training_step(batch, 0)
    assert float(loss) == pytest.approx(float(expected), rel=1e-6) and float(expected) > 0.01
    for name, value in metrics.items():
        assert logged[f"train/{name}"] == pytest.approx(float(value), rel=1e-5, abs=1e-7), name
    with pytest.raises(ValueError, match="a step of 3 pairs does not split into 2 equal pipeline micro-batches"):
        module.pipeline_rows({k: v[:6] if k != "index" else v[:3] for k, v in batch.items()})


def test_a_tied_head_cannot_be_split_from_its_embedding():
    with torch.device("meta"):
        tied = Transformer(ModelConfig(**{**CONFIG.to_dict(), "tie_embeddings": True}))
    with pytest.raises(ValueError, match="untied LM head"):
        split_model(tied, 0, 2)


def test_pipeline_settings_are_checked():
    for bad in (0, True, "2"):
        with pytest.raises(ValueError, match=f"pipeline_parallel={bad!r} must be a whole number"):
            ParallelConfig(strategy="fsdp", fsdp={"pipeline_parallel": bad})
    with pytest.raises(ValueError, match="pipeline_parallel=2 needs hardware.strategy=fsdp"):
        ParallelConfig(strategy="ddp", fsdp={"pipeline_parallel": 2})
    with pytest.raises(ValueError, match="needs hardware.fsdp.sharded_checkpoint=true.*only the first stage"):
        ParallelConfig(strategy="fsdp", fsdp={"pipeline_parallel": 2, "sharded_checkpoint": False})
    with pytest.raises(ValueError, match="pipeline_schedule='Interleaved1F1B' is not one of"):
        ParallelConfig(strategy="fsdp", fsdp={"pipeline_schedule": "Interleaved1F1B"})
    parallel = ParallelConfig(strategy="fsdp", fsdp={"pipeline_parallel": 2, "tensor_parallel": 2})
    assert parallel.data_parallel(8) == 2  # 8 ranks: 2 stages x 2 replicas x tp 2
    with pytest.raises(ValueError, match="tensor_parallel=2 x pipeline_parallel=2 does not divide the 6 processes"):
        parallel.data_parallel(6)


def test_grpo_does_not_run_as_pipeline_micro_batches_and_1f1b_needs_enough_of_them():
    parallel = ParallelConfig(strategy="fsdp", fsdp={"pipeline_parallel": 4})
    with torch.device("meta"):
        grpo, sft = GRPOModule(CONFIG, OptimConfig()), SFTModule(CONFIG, OptimConfig())
        pretrain, dpo = PretrainModule(CONFIG, OptimConfig()), DPOModule(CONFIG, OptimConfig())
    grpo.parallel = sft.parallel = pretrain.parallel = dpo.parallel = parallel
    with pytest.raises(ValueError, match="pipeline_parallel runs the pretraining, SFT and DPO phases; GRPOModule"):
        grpo.use_pipeline(8, 1.0)
    for module in (sft, dpo):
        module.use_pipeline(8, 1.0)
        assert not module.automatic_optimization and module.pipeline_microbatches == 8
    with pytest.raises(ValueError, match=r"1F1B pipeline schedule needs at least as many micro-batches.*\(4\); "
                                         "this run has 2"):
        pretrain.use_pipeline(2, 1.0)
    pretrain.use_pipeline(4, 1.0)
    assert not pretrain.automatic_optimization and pretrain.pipeline_microbatches == 4
    pretrain.parallel = ParallelConfig(strategy="fsdp", fsdp={"pipeline_parallel": 4, "pipeline_schedule": "GPipe"})
    pretrain.use_pipeline(2, None)  # GPipe takes any number


def test_the_in_training_evaluation_is_refused_under_pipeline_parallelism(make_cfg, tmp_path):
    cfg = make_cfg("eval.every_n_steps=10")
    parallel = ParallelConfig(strategy="fsdp", fsdp={"pipeline_parallel": 2})
    with pytest.raises(ValueError, match="holds one pipeline stage.*eval.every_n_steps=0"):
        eval_callbacks(cfg, None, tmp_path, parallel)
    assert eval_callbacks(make_cfg("eval.every_n_steps=0"), None, tmp_path, parallel) == []


def test_the_stages_of_a_pipeline_take_the_same_batches():
    """Ranks are laid out (stage, data-parallel replica, tensor-parallel rank): Lightning's data-parallel
    index runs over stages x replicas, and a rank's replica is that index modulo the replicas."""
    strategy = TranslatingModelParallelStrategy(data_parallel_size=4, tensor_parallel_size=2, pipeline_parallel=2)
    seen = []
    for rank in range(8):  # 2 stages x 2 replicas x tp 2
        index = rank // 2
        mesh = {"data_parallel": types.SimpleNamespace(size=lambda: 4, get_local_rank=lambda i=index: i)}
        strategy._device_mesh = mesh
        seen.append(strategy.distributed_sampler_kwargs)
    assert [kwargs["rank"] for kwargs in seen] == [0, 0, 1, 1, 0, 0, 1, 1]
    assert {kwargs["num_replicas"] for kwargs in seen} == {2}


def test_the_hardware_option_composes_a_pipeline(make_cfg):
    from moxin.train import parallel_config

    cfg = make_cfg("+experiment=phase1_2k", "hardware=fsdp", "hardware.fsdp.pipeline_parallel=2",
                   "hardware.fsdp.tensor_parallel=4")
    parallel = parallel_config(cfg.hardware)
    assert parallel.pipeline_parallel == 2 and parallel.fsdp.pipeline_schedule == "1F1B"
    assert instantiate(cfg.model).n_layers == 36 and parallel.data_parallel(8 * 4) == 4  # 4 nodes: the Moxin layout


def test_every_nth_block_is_counted_in_the_whole_model_on_each_stage():
    from moxin.parallel import wrap_training_forwards

    with torch.device("meta"):
        model = Transformer(CONFIG)
    wrapped = []
    for stage in (split_model(model, s, 2) for s in range(2)):  # blocks 0-2, then 3-4
        wrap_training_forwards(stage, lambda forward: forward, every=2)
        wrapped += [int(i) for i, block in stage.layers.items() if "forward" in vars(block)]
    assert wrapped == [0, 2, 4]


def _fit_loop(steps: int, batches: int, manual: bool, stale_steps: int = 0) -> dict:
    """The fit loop's counters as Lightning saves them (its own state_dict, filled in) at a checkpoint
    after `steps` optimizer steps of `batches` loader batches (the last batch not yet marked completed);
    the other mode's step counter holds `stale_steps` (a run resumed across the modes before)."""
    import lightning as L

    loop = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False).fit_loop.state_dict()
    counts = {"ready": batches, "completed": batches - 1, "started": batches, "processed": batches}
    loop["epoch_loop.batch_progress"].update(total=dict(counts), current=dict(counts))
    automatic = loop["epoch_loop.automatic_optimization.optim_progress"]["optimizer"]
    manual_step = loop["epoch_loop.manual_optimization.optim_step_progress"]
    for progress, n in ((manual_step, steps if manual else stale_steps),
                        (automatic["step"], stale_steps if manual else steps)):
        for part in ("total", "current"):
            progress[part].update(ready=n, completed=n)
    for part in ("total", "current"):
        n = automatic["step"][part]["completed"]
        automatic["zero_grad"][part].update(ready=n, started=n, completed=n)
    return {"loops": {"fit_loop": loop}}


def test_a_resume_across_the_pipeline_keeps_the_step_count_and_the_data_position():
    """A pipeline run steps by hand, one loader batch per step; a run without it may accumulate several
    batches per step through Lightning's automatic optimization. Resuming one's checkpoint in the other,
    the step count moves to the counter Lightning reads and the epoch's batches are counted anew."""
    from moxin.modules.base import match_loop_progress

    checkpoint = {**_fit_loop(steps=5, batches=10, manual=False), "loader_batches_per_step": 2}
    match_loop_progress(checkpoint, manual=True, batches_per_step=1)  # into a pipeline run
    loop = checkpoint["loops"]["fit_loop"]
    assert loop["epoch_loop.manual_optimization.optim_step_progress"]["total"]["completed"] == 5
    assert loop["epoch_loop.batch_progress"]["current"] == {"ready": 5, "completed": 4, "started": 5, "processed": 5}

    checkpoint = {**_fit_loop(steps=5, batches=5, manual=True), "loader_batches_per_step": 1}
    match_loop_progress(checkpoint, manual=False, batches_per_step=2)  # out of one, accumulating 2
    loop = checkpoint["loops"]["fit_loop"]
    optimizer = loop["epoch_loop.automatic_optimization.optim_progress"]["optimizer"]
    assert optimizer["step"]["total"]["completed"] == 5 and optimizer["zero_grad"]["total"]["started"] == 5
    assert loop["epoch_loop.batch_progress"]["total"] == {"ready": 10, "completed": 9, "started": 10, "processed": 10}

    # Back into the pipeline after 6 steps without it: the manual counter still says 2, from before.
    checkpoint = {**_fit_loop(steps=6, batches=12, manual=False, stale_steps=2), "loader_batches_per_step": 2}
    match_loop_progress(checkpoint, manual=True, batches_per_step=1)
    assert checkpoint["loops"]["fit_loop"]["epoch_loop.manual_optimization.optim_step_progress"]["total"] == {
        "ready": 6, "completed": 6}

    same_layout = {**_fit_loop(steps=5, batches=5, manual=True), "loader_batches_per_step": 1}
    older = _fit_loop(steps=5, batches=10, manual=False)  # from before batches per step were recorded
    for checkpoint, manual, batches_per_step in ((same_layout, True, 1), (older, False, 2)):
        expected = copy.deepcopy(checkpoint)
        match_loop_progress(checkpoint, manual=manual, batches_per_step=batches_per_step)
        assert checkpoint == expected  # nothing to translate


def test_a_dropped_step_under_manual_optimization_still_counts_as_a_step():
    """Policy skip: the step's gradients are dropped, but the optimizer and the LR schedule step (with no
    gradients: nothing moves), as Lightning counts a skipped step under automatic optimization."""
    module = PretrainModule(CONFIG, OptimConfig())
    module.log = lambda *args, **kwargs: None
    parameter = next(module.parameters())
    before = parameter.detach().clone()
    parameter.grad = torch.ones_like(parameter)
    optimizer = torch.optim.AdamW(module.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    module.drop_step(optimizer, scheduler)
    assert scheduler.last_epoch == 1 and optimizer.param_groups[0]["lr"] == pytest.approx(0.05)
    assert torch.equal(parameter, before) and parameter.grad is None and module.skipped_steps == 1


def test_a_single_file_checkpoint_cannot_resume_under_the_pipeline():
    with torch.device("meta"):
        module = PretrainModule(CONFIG, OptimConfig())
    module.parallel = ParallelConfig(strategy="fsdp", fsdp={"pipeline_parallel": 2})
    with pytest.raises(ValueError, match="single-file checkpoint cannot resume under.*pipeline_parallel"):
        module.check_checkpoint_layout({}, sharded=False)
    module.check_checkpoint_layout({}, sharded=True)


class _Runner:
    """A pipeline of one stage, in place of PipelineRunner: each step's loss and gradients as given."""

    def __init__(self, losses):
        self.losses = iter(losses)

    def train_step(self, input_ids, labels):
        return torch.tensor(next(self.losses))

    def norm_across_stages(self, norm):
        return norm * 2  # as if another stage held as large a gradient again (sqrt 4 = 2)


def test_a_pipeline_step_clips_over_the_stages_steps_and_skips_a_non_finite_one():
    module = PretrainModule(CONFIG, OptimConfig(), nonfinite_loss="skip")
    module._trainer = types.SimpleNamespace(world_size=1)  # nonfinite: one process decides alone
    module.log = lambda *args, **kwargs: None
    module.pipeline_runner, module.max_grad_norm = _Runner([2.5, float("nan")]), 1.0
    optimizer = torch.optim.SGD(module.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    module.optimizers, module.lr_schedulers = (lambda: optimizer), (lambda: scheduler)
    parameter = module.model.output.weight
    gradient = torch.full_like(parameter, 1.0 / parameter.numel() ** 0.5)  # norm 1: 2 over both stages
    for p in module.parameters():
        p.grad = torch.zeros_like(p)
    parameter.grad = gradient.clone()
    before = parameter.detach().clone()
    assert module.pipeline_training_step({"input_ids": None, "labels": None}) == pytest.approx(2.5)
    assert torch.allclose(before - parameter.detach(), gradient / 2, atol=1e-6)  # clipped to norm 1 overall
    assert scheduler.last_epoch == 1 and parameter.grad is None
    parameter.grad = gradient.clone()
    assert module.pipeline_training_step({"input_ids": None, "labels": None}) is None  # NaN: dropped ...
    assert scheduler.last_epoch == 2 and module.skipped_steps == 1  # ... but counted as a step


def test_the_pipeline_layout_check_gives_every_layout_the_one_process_batches(make_cfg):
    """experiments/launch/pipeline_layouts.py (4 processes, by hand) compares each layout with one
    process: each must take its 16 rows per step and validate on its 2 x 16 rows."""
    import importlib.util

    from moxin.train import micro_batches_per_step, parallel_config

    script = Path(__file__).resolve().parent.parent / "experiments" / "launch" / "pipeline_layouts.py"
    spec = importlib.util.spec_from_file_location("layouts", script)
    layouts = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(layouts)
    reference = make_cfg(*layouts.COMMON, "context.micro_batch_size=16")
    for name, overrides in layouts.LAYOUTS.items():
        cfg = make_cfg(*layouts.COMMON, *layouts.PIPELINE, *overrides)
        parallel = parallel_config(cfg.hardware)
        replicas, micro = parallel.data_parallel(cfg.hardware.devices), cfg.context.micro_batch_size
        assert replicas * micro * micro_batches_per_step(cfg, parallel) == 16, name
        assert replicas * micro * cfg.phase.limit_val_batches == reference.context.micro_batch_size * (
            reference.phase.limit_val_batches), name
