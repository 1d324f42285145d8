"""Tensor parallelism and the device meshes: the split projections and their translation, HSDP's
and tensor parallelism's meshes (with 4 gloo processes), resuming a sharded checkpoint across the
tensor-parallel layouts, and GRPO decoding in tensor-parallel groups."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from moxin.checkpoint import load_model
from moxin.model import ModelConfig, Transformer
from moxin.parallel import ParallelConfig
from moxin.train import build_module, eval_callbacks
from tests.test_parallel import (
    STRATEGIES,
    TWO_PROCESSES,
    answering_bigram,
    finish_run,
    sample_scores,
    start_run,
    tiny_model,
    train_metrics,
    train_run,
)


def test_tensor_parallel_parts_translate_to_and_from_the_fused_weights():
    from moxin.parallel import SplitProjection, fuse_split, split_fused

    model = tiny_model()
    state = model.state_dict()
    parts = split_fused(state, model.config)
    assert parts["layers.0.attention.wqkv.q.weight"].shape == (4 * 8, 32)  # n_heads x head_dim rows
    assert parts["layers.0.attention.wqkv.k.weight"].shape == (16, 32)  # n_kv_heads x head_dim
    assert parts["layers.0.attention.wqkv.v.weight"].shape == (16, 32)
    assert parts["layers.1.feed_forward.w13.up.weight"].shape == (64, 32)
    assert "layers.0.attention.wqkv.weight" not in parts
    fused = fuse_split(parts)
    assert fused.keys() == state.keys() and all(torch.equal(fused[k], state[k]) for k in state)
    x = torch.randn(3, 32)
    split = SplitProjection(model.layers[0].attention.wqkv, ("q", "k", "v"), [32, 16, 16])
    torch.testing.assert_close(split(x), model.layers[0].attention.wqkv(x))  # the same product, in parts


def test_tensor_parallel_settings_are_checked(make_cfg, tmp_path):
    from hydra.utils import instantiate

    from moxin.parallel import apply_tensor_parallel
    from moxin.train import build_trainer

    with pytest.raises(ValueError, match="tensor_parallel=2 needs hardware.strategy=fsdp"):
        ParallelConfig(strategy="ddp", fsdp={"tensor_parallel": 2})
    with pytest.raises(ValueError, match="tensor_parallel=0 must be a whole number"):
        ParallelConfig(strategy="fsdp", fsdp={"tensor_parallel": 0})
    # A checkpoint's parameter names follow its tensor parallelism: a sharded folder is translated as it
    # loads (test_sharded_checkpoints_resume_across_the_tensor_parallel_layouts); a single file of the other
    # layout is refused, naming both sizes.
    from moxin.modules.base import OptimConfig
    from moxin.modules.pretrain import PretrainModule

    module = PretrainModule(tiny_model().config, OptimConfig())
    module.parallel = ParallelConfig(strategy="fsdp", fsdp={"tensor_parallel": 2})
    module.check_checkpoint_layout({"tensor_parallel": 4}, sharded=False)  # parts in both
    module.check_checkpoint_layout({}, sharded=True)
    with pytest.raises(ValueError, match="single-file checkpoint was trained with hardware.fsdp.tensor_parallel=1; "
                                         "this run has 2"):
        module.check_checkpoint_layout({}, sharded=False)  # a checkpoint from before tensor parallelism, or without it

    class Mesh:
        def size(self):
            return 4

    with pytest.raises(ValueError, match="tensor_parallel=4 does not divide model.n_kv_heads=2"):
        apply_tensor_parallel(tiny_model(), Mesh())
    tp = ("hardware=fsdp", "hardware.accelerator=cpu", "hardware.devices=3", "hardware.fsdp.tensor_parallel=2")
    with pytest.raises(ValueError, match="tensor_parallel=2 does not divide the 3 processes"):
        build_trainer(make_cfg("+experiment=tiny_debug", *tp), tmp_path, ModelConfig(), [])
    # Gradient accumulation for a global batch counts data-parallel replicas: 4 processes in 2 TP groups.
    cfg = make_cfg("+experiment=tiny_debug", "hardware=fsdp", "hardware.accelerator=cpu", "hardware.devices=4",
                   "hardware.fsdp.tensor_parallel=2", "phase.global_batch_tokens=16384")
    trainer = build_trainer(cfg, tmp_path, ModelConfig(), [])
    assert trainer.accumulate_grad_batches == 16384 // (cfg.context.micro_batch_size * cfg.context.seq_len * 2)
    parallel = ParallelConfig(strategy="fsdp", fsdp={"tensor_parallel": 2})
    cfg = make_cfg("+experiment=grpo_deepscaler", "+scale=tiny")  # rollouts decode in tensor-parallel groups
    assert build_module(cfg, instantiate(cfg.model), instantiate(cfg.data), parallel).parallel is parallel
    assert len(eval_callbacks(make_cfg("eval.every_n_steps=10"), None, tmp_path, parallel)) == 1


def test_onednn_products_leave_tensor_parallel_weights_to_dtensor():
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from moxin.kernels import _suits_onednn

    x, weight = torch.randn(2, 8), torch.randn(4, 8)
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        sharded = distribute_tensor(weight, init_device_mesh("cpu", (2,)), [Replicate()])
        assert not _suits_onednn(x, sharded)  # oneDNN's op has no DTensor rule: nn.Linear's product runs
    finally:
        dist.destroy_process_group()


def _hsdp_groups(rank: int, tensor_parallel: int) -> dict:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from moxin.parallel import FSDPConfig, apply_tensor_parallel, device_meshes

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=8)
    try:  # the mesh Lightning's ModelParallelStrategy gives 8 ranks: (data_parallel, tensor_parallel)
        lightning = init_device_mesh("cpu", (8 // tensor_parallel, tensor_parallel),
                                     mesh_dim_names=("data_parallel", "tensor_parallel"))
        mesh, tp_mesh, _ = device_meshes(lightning, FSDPConfig(shard_size=4 // tensor_parallel))
        model = tiny_model()
        if tensor_parallel > 1:
            apply_tensor_parallel(model, tp_mesh)
        for block in model.layers:
            fully_shard(block, mesh=mesh)
        weight = model.layers[0].attention.wo.weight
        return {"shard": mesh["shard"].mesh.tolist(), "replicate": mesh["replicate"].mesh.tolist(),
                "tp": tp_mesh.mesh.tolist(), "data_parallel": lightning["data_parallel"].mesh.tolist(),
                "placements": tuple(weight.placements), "mesh": weight.device_mesh.mesh_dim_names}
    finally:
        dist.destroy_process_group()


def test_hsdp_shards_within_groups_of_consecutive_ranks():
    """Lightning numbers ranks node by node, so a group of consecutive ranks is one node's GPUs: the
    all-gathers stay inside the node and the replicas (one per node) all-reduce gradients. With tensor
    parallelism (2 here) a node of 4 ranks holds 2 data-parallel ranks of 2 tensor-parallel ranks each,
    and FSDP's and tensor parallelism's meshes share one root, as FSDP needs to combine them."""
    from torch.distributed.tensor import Replicate, Shard

    hsdp = _hsdp_groups(rank=5, tensor_parallel=1)
    assert hsdp["shard"] == [4, 5, 6, 7] and hsdp["replicate"] == [1, 5] and hsdp["tp"] == [5]
    assert hsdp["placements"] == (Replicate(), Shard(0))
    with_tp = _hsdp_groups(rank=5, tensor_parallel=2)
    assert with_tp["shard"] == [5, 7] and with_tp["replicate"] == [1, 5] and with_tp["tp"] == [4, 5]
    assert with_tp["data_parallel"] == [1, 3, 5, 7]  # Lightning's data-parallel group: the same ranks
    assert with_tp["mesh"] == ("replicate", "shard", "tensor_parallel")
    assert with_tp["placements"][0] == Replicate() and with_tp["placements"][2] == Shard(1)  # wo: by columns


def _pipeline_groups(rank: int, tensor_parallel: int, shard_size: int | None) -> dict:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from moxin.parallel import FSDPConfig, device_meshes

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=8)
    try:
        lightning = init_device_mesh("cpu", (8 // tensor_parallel, tensor_parallel),
                                     mesh_dim_names=("data_parallel", "tensor_parallel"))
        fsdp = FSDPConfig(shard_size=shard_size, tensor_parallel=tensor_parallel, pipeline_parallel=2)
        mesh, tp_mesh, pp_mesh = device_meshes(lightning, fsdp)
        return {"fsdp": mesh.mesh.tolist(), "tp": tp_mesh.mesh.tolist(), "pp": pp_mesh.mesh.tolist(),
                "names": mesh.mesh_dim_names}
    finally:
        dist.destroy_process_group()


def test_pipeline_stages_are_the_outermost_split_of_the_ranks():
    """Stage s holds the s-th block of consecutive ranks (Lightning's data-parallel index runs over
    stages x replicas), and FSDP, HSDP and tensor parallelism split each stage's ranks as they would
    split a whole run's: rank 5 of 8 is on the second stage, with rank 1 in its pipeline."""
    with_tp = _pipeline_groups(rank=5, tensor_parallel=2, shard_size=None)
    assert with_tp == {"fsdp": [5, 7], "tp": [4, 5], "pp": [1, 5], "names": ("data_parallel",)}
    hsdp = _pipeline_groups(rank=5, tensor_parallel=1, shard_size=2)
    assert hsdp["fsdp"] == [[4, 5], [6, 7]] and hsdp["names"] == ("replicate", "shard") and hsdp["pp"] == [1, 5]


def _hsdp_with_tensor_parallel_worker(rank: int, init_file: str, save_dir: str) -> None:
    from datetime import timedelta

    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh

    from moxin.parallel import (
        FSDPConfig,
        apply_tensor_parallel,
        clip_grad_norm,
        device_meshes,
        shard_model,
        split_fused,
    )

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=4,
                            timeout=timedelta(seconds=60))
    lightning = init_device_mesh("cpu", (2, 2), mesh_dim_names=("data_parallel", "tensor_parallel"))
    fsdp = FSDPConfig(param_dtype=None, reduce_dtype=None, shard_size=1)  # 2 replicas x 1 shard x 2 TP ranks

    def parallel_model():
        model = tiny_model()
        mesh, tp_mesh, _ = device_meshes(lightning, fsdp)
        apply_tensor_parallel(model, tp_mesh)
        shard_model(model, mesh, fsdp)
        return model

    plain, model = tiny_model(), parallel_model()
    tokens = torch.randint(0, 97, (4, 12), generator=torch.Generator().manual_seed(0))
    rows = tokens[2 * (rank // 2): 2 * (rank // 2) + 2]  # data-parallel rank r takes rows 2r, 2r + 1
    model(rows).logsumexp(-1).mean().backward()  # FSDP averages over the 2 replicas: the whole batch's mean
    plain(tokens).logsumexp(-1).mean().backward()
    expected = torch.nn.utils.clip_grad_norm_(plain.parameters(), 1e-3)
    assert torch.allclose(clip_grad_norm(list(model.parameters()), 1e-3), expected, rtol=1e-5)
    # A split part's gradient (wqkv.q, ...) is its rows of the fused projection's.
    plain_grads = split_fused({name: p.grad for name, p in plain.named_parameters()}, plain.config)
    assert plain_grads.keys() == dict(model.named_parameters()).keys()
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad.full_tensor(), plain_grads[name], atol=1e-7), name
    # The whole weights, as the final export gathers them.
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    whole = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        for name, tensor in split_fused(plain.state_dict(), plain.config).items():
            assert torch.equal(whole[name], tensor), name
    # A checkpoint of the 3-D sharded weights loads back (distributed checkpoint, as Lightning saves it).
    dcp.save(model.state_dict(), checkpoint_id=save_dir)
    restored = parallel_model()
    state = restored.state_dict()
    dcp.load(state, checkpoint_id=save_dir)
    for name, p in model.state_dict().items():
        assert torch.equal(state[name].full_tensor(), p.full_tensor()), name
    dist.destroy_process_group()


def test_hsdp_combines_with_tensor_parallelism(tmp_path):
    """4 gloo processes: 2 HSDP replicas of one tensor-parallel group of 2. The gradients (and clipping
    across the meshes) equal one process's on the whole batch, and the 3-D sharded weights checkpoint."""
    import torch.multiprocessing as mp

    mp.spawn(_hsdp_with_tensor_parallel_worker, args=(str(tmp_path / "init"), str(tmp_path / "ckpt")), nprocs=4,
             join=True)


def _translated_resume_worker(rank: int, init_file: str, folder: str) -> None:
    from datetime import timedelta

    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )
    from torch.distributed.device_mesh import init_device_mesh

    from moxin.parallel import FSDPConfig, apply_tensor_parallel, shard_model, split_fused
    from moxin.tp_checkpoint import load_translated

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))
    fsdp = FSDPConfig(param_dtype=None, reduce_dtype=None)
    tokens = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(0))

    def build(tensor_parallel: int):
        """FSDP over 2 ranks (fused projections), or tensor parallelism over both (parts), with AdamW."""
        model = tiny_model()
        mesh = init_device_mesh("cpu", (2 // tensor_parallel, tensor_parallel),
                                mesh_dim_names=("data_parallel", "tensor_parallel"))
        if tensor_parallel > 1:
            apply_tensor_parallel(model, mesh["tensor_parallel"])
        shard_model(model, mesh["data_parallel"], fsdp)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        return model, optimizer

    def step(model, optimizer, tensor_parallel: int):
        rows = tokens if tensor_parallel > 1 else tokens[rank:rank + 1]  # the same global batch
        model(rows).logsumexp(-1).mean().backward()
        optimizer.step()
        optimizer.zero_grad()

    def whole(model, optimizer) -> dict:
        """Weights and AdamW states, gathered, named as the tensor-parallel layout names them."""
        options = StateDictOptions(full_state_dict=True)
        weights = split_fused(get_model_state_dict(model, options=options), model.config)
        states = get_optimizer_state_dict(model, optimizer, options=options)["state"]
        moments = {}
        for key in ("exp_avg", "exp_avg_sq"):
            split = split_fused({fqn: state[key] for fqn, state in states.items()}, model.config)
            moments.update({f"{key}:{fqn}": tensor for fqn, tensor in split.items()})
        return {"weights": weights, "moments": moments, "steps": {float(state["step"]) for state in states.values()},
                "lr": optimizer.param_groups[0]["lr"]}

    def save(model, optimizer, tensor_parallel: int, path: str) -> None:
        dcp.save({"state_dict": get_model_state_dict(model), "optimizer_0": get_optimizer_state_dict(model, optimizer)},
                 checkpoint_id=path)
        if rank == 0:
            torch.save({"tensor_parallel": tensor_parallel}, f"{path}/meta.pt")
        dist.barrier()

    for saved_tp, resumed_tp in ((1, 2), (2, 1)):
        model, optimizer = build(saved_tp)
        for _ in range(2):
            step(model, optimizer, saved_tp)
        path = f"{folder}/{saved_tp}_to_{resumed_tp}"
        save(model, optimizer, saved_tp, path)
        resumed, resumed_optimizer = build(resumed_tp)
        assert load_translated(Path(path), resumed, [resumed_optimizer], resumed.config) == {
            "tensor_parallel": saved_tp}
        expected, loaded = whole(model, optimizer), whole(resumed, resumed_optimizer)
        assert loaded["steps"] == expected["steps"] == {2.0} and loaded["lr"] == expected["lr"]
        for kind in ("weights", "moments"):
            assert loaded[kind].keys() == expected[kind].keys()
            for key, tensor in expected[kind].items():
                assert torch.equal(loaded[kind][key], tensor), (saved_tp, kind, key)
        step(model, optimizer, saved_tp)  # and training goes on alike
        step(resumed, resumed_optimizer, resumed_tp)
        after, resumed_after = whole(model, optimizer)["weights"], whole(resumed, resumed_optimizer)["weights"]
        for key, tensor in after.items():
            assert torch.allclose(resumed_after[key], tensor, atol=1e-6), (saved_tp, key)
    # A model configured otherwise (more key/value heads: other part sizes) is refused, not half loaded.
    other = Transformer(dataclasses.replace(tiny_model().config, n_kv_heads=4))
    apply_tensor_parallel(other, init_device_mesh("cpu", (2,), mesh_dim_names=("tensor_parallel",)))
    from torch.distributed.checkpoint.api import CheckpointException

    with pytest.raises(CheckpointException) as refused:
        load_translated(Path(f"{folder}/1_to_2"), other, [], other.config)
    assert all("Size mismatch" in str(error) for error in refused.value.failures.values())
    dist.destroy_process_group()


def test_sharded_checkpoints_resume_across_the_tensor_parallel_layouts(tmp_path):
    """A checkpoint saved with the fused projections whole (tensor_parallel=1) resumes under tensor
    parallelism, which holds them as parts, and the reverse: each rank reads its rows of the weights
    and AdamW moments from the other naming, and the next step is the same."""
    import torch.multiprocessing as mp

    mp.spawn(_translated_resume_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)


@pytest.mark.slow
def test_grpo_under_tensor_parallelism_matches_one_process(eval_data_dir, tmp_path):
    """Under tensor parallelism (tp = 2, one data-parallel replica) the two ranks decode each rollout and
    validation answer together, and run the in-training evaluation together: the same rollouts, KL,
    validation, evaluation scores and weights as one process with the same batch."""
    start = answering_bigram(tmp_path / "start")
    grpo = ("+experiment=grpo_deepscaler", "+scale=tiny", f"phase.init_from={start}", "phase.max_steps=3",
            "phase.val_every_steps=2", "phase.limit_val_batches=1", "phase.checkpoint_every_steps=2",
            "context.micro_batch_size=2", "phase.grpo.group_size=4", "phase.grpo.reward=correct",
            "phase.grpo.val_max_new_tokens=8", "eval.every_n_steps=2", f"eval.data_dir={eval_data_dir}",
            "eval.limit=2", "eval.max_length=64", "eval.log_samples=true",
            "eval.tasks=[{name: arc_easy, num_fewshot: 0, metric: acc, column: ARC-E}]")
    one = start_run(tmp_path / "one", *grpo, experiment="grpo_deepscaler")  # beside the tensor-parallel run
    tp, tp_dir = train_run(tmp_path / "tp", *grpo, *STRATEGIES["tp"][:3], *TWO_PROCESSES, experiment="grpo_deepscaler",
                           torchrun=True)
    one, one_dir = finish_run(one)
    assert len(one) == 3 and sorted(tp) == sorted(one)
    assert max(train_metrics(one_dir, "train/reward_std").values()) > 0  # the update had something to learn
    assert train_metrics(tp_dir, "train/response_length") == train_metrics(one_dir, "train/response_length")
    kl = train_metrics(one_dir, "train/kl")
    assert kl[2] > 0  # step 1 updated the policy (step 0's rewards were all equal)
    for key, tolerance in (("train/reward", 1e-6), ("val/accuracy", 1e-6), ("train/kl", 1e-3 * kl[2])):
        assert train_metrics(tp_dir, key) == pytest.approx(train_metrics(one_dir, key), abs=tolerance), key
    one_scores, tp_scores = (sample_scores(run / "eval" / "step-2" / "results_samples.json")
                             for run in (one_dir, tp_dir))
    assert len(one_scores) == 8 and tp_scores == pytest.approx(one_scores, rel=1e-5)
    expected, trained = load_model(str(one_dir)).state_dict(), load_model(str(tp_dir)).state_dict()
    started = load_model(str(start)).state_dict()
    for key, tensor in expected.items():
        moved = torch.linalg.vector_norm(tensor - started[key])
        assert moved > 0, key
        assert torch.linalg.vector_norm(trained[key] - tensor) < 1e-3 * moved, key
