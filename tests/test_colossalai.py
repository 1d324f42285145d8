"""The Colossal-AI strategy in one process: its plugins' options and refusals, its checkpoint folders,
Lightning's optimizer wrapper around the boosted optimizer, and the LM head under Gemini. Its runs
(2 processes, ZeRO-2 on the CPU, the GPU plugins) are in tests/test_parallel.py."""

from __future__ import annotations

import pytest
import torch

from moxin.model import ModelConfig
from moxin.parallel import ParallelConfig, build_strategy
from moxin.train import build_module, eval_callbacks
from tests.conftest import needs_colossalai


@needs_colossalai
def test_a_colossalai_folder_resumes_under_the_plugin_that_wrote_it(tmp_path):
    """The plugins lay out optimizer states (and Gemini the model) each their own way: a folder written
    under one is refused under another before anything is loaded, naming both and phase.init_from."""
    from moxin.colossalai_strategy import PLUGIN_KEY, ColossalAIStrategy

    folder = tmp_path / "step-2.ckpt"
    folder.mkdir()
    torch.save({PLUGIN_KEY: "torch_ddp", "global_step": 2}, folder / "meta.pt")
    with pytest.raises(ValueError, match="plugin torch_ddp, and this run has gemini.*plugin=torch_ddp.*init_from="):
        ColossalAIStrategy(plugin="gemini").load_checkpoint(folder)


@needs_colossalai
def test_a_resumed_fused_adamw_finds_its_step_counts_beside_their_weights():
    """Colossal-AI's ZeRO and hybrid loaders restore AdamW's step counts on the CPU, and fused AdamW needs
    them on the weights' device (the H200 run's resume failed there). Here the weights are on the meta
    device, the loaded counts on the CPU: a fused group's move to the weights, through the wrappers' `.optim`."""
    import types

    from moxin.colossalai_strategy import steps_beside_their_weights

    weights = [torch.nn.Parameter(torch.ones(3, device="meta")), torch.nn.Parameter(torch.ones(2, device="meta"))]
    fused, plain = torch.optim.AdamW(weights[:1]), torch.optim.AdamW(weights[1:])
    fused.param_groups[0]["fused"] = True  # (fused AdamW itself refuses meta weights)
    for optimizer in (fused, plain):
        for weight in optimizer.param_groups[0]["params"]:
            optimizer.state[weight]["step"] = torch.tensor(5.0)
    steps_beside_their_weights(types.SimpleNamespace(optim=types.SimpleNamespace(optim=fused)))  # booster, ZeRO
    steps_beside_their_weights(types.SimpleNamespace(optim=plain))
    assert fused.state[weights[0]]["step"].device.type == "meta"
    assert plain.state[weights[1]]["step"].device.type == "cpu"  # unfused AdamW keeps them on the CPU itself
    steps_beside_their_weights(types.SimpleNamespace())  # (no optimizer inside: nothing to do)


def test_a_discarded_lightning_wrapper_leaves_the_boosted_optimizer_alone():
    """Lightning's optimizer wrapper derives its class from the wrapped optimizer's. ZeRO's optimizer
    removes its gradient hooks in __del__: a wrapper discarded when the strategy's optimizers were set
    again ran that on the live optimizer, and ZeRO-2 under run.py then trained nothing (seen on a GPU)."""
    import gc

    from moxin.colossalai_strategy import ColossalAIStrategy

    cleaned_up = []

    class HookedOptimizer(torch.optim.SGD):  # as LowLevelZeroOptimizer: its own clean-up in __del__
        def __del__(self):
            cleaned_up.append(id(self))

    optimizer = HookedOptimizer([torch.nn.Parameter(torch.ones(2))], lr=0.1)
    strategy = ColossalAIStrategy(plugin="torch_ddp")
    strategy.optimizers = [optimizer]
    first_wrapper = strategy._lightning_optimizers[0]
    assert isinstance(first_wrapper, HookedOptimizer) and first_wrapper.optimizer is optimizer
    strategy.optimizers = [optimizer]  # as setup does once the booster has wrapped it
    del first_wrapper
    gc.collect()
    assert cleaned_up == [] and strategy.optimizers == [optimizer]
    del strategy, optimizer
    gc.collect()
    assert len(cleaned_up) == 1  # the optimizer itself still cleans up


def test_the_lm_head_runs_as_a_module_under_gemini():
    """Gemini gathers a parameter's chunk and reduces its gradient only when a module call or a torch
    function sees it; the chunked loss's autograd.Function is neither (on a GPU: "Parameter
    model.output.weight failed at the gradient reduction"). Under Gemini the head module runs instead,
    to the same loss and gradients."""
    from moxin import losses
    from moxin.modules.base import OptimConfig
    from moxin.modules.pretrain import PretrainModule

    config = ModelConfig(vocab_size=97, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=8, hidden_dim=64,
                         sliding_window=8, max_seq_len=64)
    hidden = torch.randn(2, 6, 32)
    labels = torch.randint(0, 97, (2, 6))
    labels[0, :2] = losses.IGNORE_INDEX
    none_trained = torch.full_like(labels, losses.IGNORE_INDEX)
    results = {}
    for plugin in ("torch_ddp", "gemini"):
        torch.manual_seed(0)
        module = PretrainModule(config, OptimConfig())
        module.parallel = ParallelConfig(strategy="colossalai", colossalai={"plugin": plugin})
        calls = []
        module.model.output.register_forward_hook(lambda *_, calls=calls: calls.append(1))
        for reduction in ("mean", "sum"):
            leaf = hidden.clone().requires_grad_()
            loss = module.head_loss(leaf, labels, reduction=reduction)
            loss.backward()
            results[plugin, reduction] = (loss.detach(), leaf.grad, module.model.output.weight.grad.clone())
            module.model.output.weight.grad = None
        assert float(module.head_loss(hidden, none_trained).detach()) == 0.0  # a mean over no token: 0, not NaN
        module.lm_loss({"input_ids": labels.clamp(min=0), "labels": labels})  # pretraining goes through it
        assert len(calls) == (4 if plugin == "gemini" else 0)
    for reduction in ("mean", "sum"):
        torch.testing.assert_close(results["gemini", reduction], results["torch_ddp", reduction])


@needs_colossalai
def test_colossalai_plugins_that_clip_take_the_phase_clip_value():
    from moxin.colossalai_strategy import ColossalAIStrategy, make_plugin

    strategy, clip = build_strategy(ParallelConfig(strategy="colossalai", colossalai={"plugin": "low_level_zero"}),
                                    8, 1.0)
    assert isinstance(strategy, ColossalAIStrategy) and clip is None  # the ZeRO optimizer clips
    assert strategy.plugin_options["max_norm"] == 1.0
    strategy, clip = build_strategy(ParallelConfig(strategy="colossalai", colossalai={"plugin": "torch_ddp"}), 8, 1.0)
    assert clip == 1.0 and "max_norm" not in strategy.plugin_options  # Lightning clips through the wrapper
    with pytest.raises(ValueError, match="pp_size=2: the moxin model has no Colossal-AI pipeline stages"):
        make_plugin("hybrid_parallel", {"pp_size": 2})
    with pytest.raises(ValueError, match="plugin='zero9'"):
        make_plugin("zero9", {})


def test_colossalai_missing_names_the_install_command(monkeypatch):
    import moxin.colossalai_strategy as module

    monkeypatch.setattr(module, "colossalai_available", lambda: False)
    with pytest.raises(ImportError, match="make install-colossalai"):
        module.ColossalAIStrategy(plugin="torch_ddp")


def test_colossalai_refuses_grpo_but_under_ddp_and_gemini_the_eval_callback(make_cfg, tmp_path):
    fsdp = ParallelConfig(strategy="fsdp")
    cfg = make_cfg("+experiment=grpo_deepscaler", "+scale=tiny")
    from hydra.utils import instantiate

    zero = ParallelConfig(strategy="colossalai", colossalai={"plugin": "low_level_zero"})
    with pytest.raises(ValueError, match="optimizes by hand.*use hardware=colossalai_ddp, ddp or fsdp"):
        build_module(cfg, instantiate(cfg.model), instantiate(cfg.data), zero)
    torch_ddp = ParallelConfig(strategy="colossalai", colossalai={"plugin": "torch_ddp"})
    assert build_module(cfg, instantiate(cfg.model), instantiate(cfg.data), torch_ddp).parallel is torch_ddp
    static = ParallelConfig(strategy="colossalai",
                            colossalai={"plugin": "torch_ddp", "options": {"static_graph": True}})
    with pytest.raises(ValueError, match="static_graph"):  # its gradients would not be all-reduced
        build_module(cfg, instantiate(cfg.model), instantiate(cfg.data), static)
    cfg = make_cfg("eval.every_n_steps=10")
    gemini = ParallelConfig(strategy="colossalai", colossalai={"plugin": "gemini"})
    with pytest.raises(ValueError, match="eval.every_n_steps runs the model on rank 0 alone.*gemini"):
        eval_callbacks(cfg, None, tmp_path, gemini)
    assert len(eval_callbacks(cfg, None, tmp_path, fsdp)) == 1  # FSDP gathers the model for it
    split = ParallelConfig(strategy="colossalai", colossalai={"plugin": "hybrid_parallel", "options": {"tp_size": 2}})
    with pytest.raises(ValueError, match="eval.every_n_steps runs the model on rank 0 alone.*tp_size > 1"):
        eval_callbacks(cfg, None, tmp_path, split)
    whole = ParallelConfig(strategy="colossalai", colossalai={"plugin": "hybrid_parallel", "options": {"tp_size": 1}})
    assert len(eval_callbacks(cfg, None, tmp_path, whole)) == 1


def test_a_fused_projections_rows_go_between_the_ranks_shards_and_the_whole_matrix():
    """Under tensor parallelism each rank holds its rows of every part of wqkv (queries, keys, values): the
    shards one after another are not the whole matrix, whose parts each hold their ranks' rows in turn."""
    from moxin.colossalai_tp import reorder_fused_rows

    whole = torch.arange(8.0)[:, None].expand(8, 3)  # q rows 0-3, k rows 4-5, v rows 6-7
    shards = torch.tensor([0.0, 1, 4, 6, 2, 3, 5, 7])[:, None].expand(8, 3)  # rank 0: q 0-1, k 4, v 6; rank 1 ...
    assert torch.equal(reorder_fused_rows(shards, [4, 2, 2], 2, parts_first=True), whole)
    assert torch.equal(reorder_fused_rows(whole, [4, 2, 2], 2, parts_first=False), shards)
    assert torch.equal(reorder_fused_rows(shards.T, [4, 2, 2], 2, parts_first=True, dim=1), whole.T)
    assert torch.equal(reorder_fused_rows(whole, [4, 2, 2], 1, parts_first=True), whole)  # one rank: as it is


def test_colossalai_tensor_parallel_options_are_checked_before_a_run_starts():
    """HybridParallelPlugin's tp_size splits the blocks (moxin/colossalai_tp.py) and its groups share their
    batches; its own pipeline and sequence parallelism are refused, naming what to use instead."""
    from moxin.colossalai_tp import check_divides

    def hybrid(**options):
        return ParallelConfig(strategy="colossalai", colossalai={"plugin": "hybrid_parallel", "options": options})

    assert hybrid(tp_size=2).data_parallel(8) == 4 and hybrid(tp_size=1).data_parallel(8) == 8
    with pytest.raises(ValueError, match="tp_size=2 does not divide the 3 processes"):
        hybrid(tp_size=2).data_parallel(3)
    with pytest.raises(ValueError, match="pp_size=2.*hardware.fsdp.pipeline_parallel"):
        hybrid(pp_size=2)
    with pytest.raises(ValueError, match="does not split sequences"):
        hybrid(sp_size=2)
    with pytest.raises(ValueError, match="tp_size=0 must be a whole number"):
        hybrid(tp_size=0)
    with pytest.raises(ValueError, match="enable_all_optimization, enable_flash_attention would do nothing.*"
                                         "hardware.activation_checkpointing"):
        hybrid(tp_size=2, enable_flash_attention=True, enable_all_optimization=True)
    cfg = ModelConfig(vocab_size=64, dim=48, n_layers=1, n_heads=6, n_kv_heads=2, hidden_dim=96, max_seq_len=16)
    check_divides(cfg, 2)
    with pytest.raises(ValueError, match="tp_size=3 does not divide model.n_kv_heads=2"):
        check_divides(cfg, 3)


def test_a_run_stops_when_the_policy_split_no_block():
    """Unsplit, every rank of a tensor-parallel group would run the whole model on the group's batch and
    match one process: the 2-rank test could not tell. The strategy checks the first block after boosting."""
    from moxin.colossalai_tp import check_split
    from moxin.model import Transformer

    cfg = ModelConfig(vocab_size=64, dim=48, n_layers=1, n_heads=6, n_kv_heads=2, hidden_dim=96, max_seq_len=16)
    model = Transformer(cfg)
    with pytest.raises(RuntimeError, match="tp_size=2: the blocks were not split"):
        check_split(torch.nn.ModuleDict({"model": model}), 2)
    attention = model.layers[0].attention  # what the policy makes of it on one of 2 ranks
    attention.n_heads, attention.n_kv_heads = 3, 1
    attention.qkv_sizes = [size // 2 for size in attention.qkv_sizes]
    attention.wqkv = torch.nn.Linear(48, sum(attention.qkv_sizes), bias=False)
    check_split(torch.nn.ModuleDict({"model": model}), 2)


@needs_colossalai
def test_colossalai_step_is_skipped_only_for_a_skipped_training_step(monkeypatch):
    """A training_step returning None skips the step; a module stepping by hand (nonfinite_loss=skip
    runs its closure itself, then steps with none) still steps."""
    from types import SimpleNamespace

    from lightning.pytorch.core.optimizer import do_nothing_closure

    from moxin.colossalai_strategy import ColossalAIPrecision

    precision = ColossalAIPrecision()
    monkeypatch.setattr(precision, "_after_closure", lambda model, optimizer: None)
    steps = []
    optimizer = SimpleNamespace(step=lambda: steps.append(1))
    module = SimpleNamespace(automatic_optimization=True)
    precision.optimizer_step(optimizer, module, lambda: None)  # training_step returned None
    assert steps == []
    precision.optimizer_step(optimizer, module, do_nothing_closure)
    assert steps == [1]
    precision.optimizer_step(optimizer, module, lambda: torch.tensor(1.0))
    assert steps == [1, 1]
