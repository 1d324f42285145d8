"""Parallelism and memory switches, applied to the model from the hardware config (torchtitan's
`parallelize`): the model file knows none of this.

- `ParallelConfig`: the typed form of a `conf/hardware/` option's strategy and switches.
- `parallelize(model, ...)`: activation checkpointing, then torch.compile, then FSDP2 per block.
- `build_strategy(...)`: the Lightning strategy for `auto`, `ddp`, `fsdp` or `colossalai`.
- `exportable_model(...)`: the trained weights as one plain Transformer on rank 0, whatever the strategy.
"""

from __future__ import annotations

import functools
import types
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from moxin.model import Transformer

STRATEGIES = ("auto", "ddp", "fsdp", "colossalai")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PIPELINE_SCHEDULES = ("1F1B", "GPipe")  # one stage per rank (the interleaved schedules need several)


@dataclass
class FSDPConfig:
    param_dtype: str | None = "bf16"  # FSDP2 mixed precision: the blocks compute in this dtype (None: as stored)
    reduce_dtype: str | None = "fp32"  # gradients are reduce-scattered in this dtype
    reshard_after_forward: bool = True  # ZeRO-3: free gathered weights after each block's forward
    sharded_checkpoint: bool = True  # each rank saves its shard (a folder); False: one file gathered on rank 0
    # HSDP: shard within groups of this many consecutive data-parallel ranks (a node's GPUs, or with tensor
    # parallelism a node's GPUs / tensor_parallel) and replicate across the groups, so the per-block
    # all-gathers stay inside a node. None: shard over all data-parallel ranks.
    shard_size: int | None = None
    # Tensor parallelism (Megatron-style, PyTorch's DTensor plans): each block's heads and MLP columns are
    # split over groups of this many consecutive ranks; FSDP shards over the remaining data-parallel ranks.
    tensor_parallel: int = 1
    # Pipeline parallelism (pretraining, SFT and DPO; GRPO is refused): the blocks split into this
    # many consecutive stages, one per group of ranks (the outermost split: stage s holds ranks
    # s x ranks/stages ...), trained by this schedule of torch.distributed.pipelining over each optimizer
    # step's micro-batches (moxin/pipeline.py).
    pipeline_parallel: int = 1
    pipeline_schedule: str = "1F1B"  # 1F1B | GPipe

    def replicas(self, ranks: int) -> int:
        """How many copies of the sharded model `ranks` data-parallel ranks hold (1: plain FSDP)."""
        if self.shard_size is None or self.shard_size == ranks:
            return 1
        if ranks % self.shard_size:
            raise ValueError(f"hardware.fsdp.shard_size={self.shard_size} does not divide the {ranks} data-parallel "
                             "ranks (devices x num_nodes / tensor_parallel); give a divisor, such as the GPUs per "
                             "node (divided by tensor_parallel)")
        return ranks // self.shard_size


@dataclass
class ColossalAIConfig:
    plugin: str = "torch_ddp"  # torch_ddp | low_level_zero | gemini | hybrid_parallel
    options: dict = field(default_factory=dict)  # the plugin's keyword arguments (stage, precision, tp_size, ...)


@dataclass
class ParallelConfig:
    strategy: str = "auto"  # auto | ddp | fsdp | colossalai
    # Recompute blocks' activations in the backward pass: true = every block, N = every N-th block
    # (blocks 0, N, 2N, ...: less recomputation, more memory), false = none. Held as N (0: none).
    activation_checkpointing: bool | int = False
    compile: bool = False  # torch.compile each block (training steps only: generation stays eager)
    compile_backend: str = "inductor"
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)
    colossalai: ColossalAIConfig = field(default_factory=ColossalAIConfig)

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"hardware.strategy={self.strategy!r} is not one of {STRATEGIES}")
        if isinstance(self.fsdp, dict):
            self.fsdp = FSDPConfig(**self.fsdp)
        if isinstance(self.colossalai, dict):
            self.colossalai = ColossalAIConfig(**self.colossalai)
        for name in ("param_dtype", "reduce_dtype"):
            value = getattr(self.fsdp, name)
            if value is not None and value not in DTYPES:
                raise ValueError(f"hardware.fsdp.{name}={value!r} is not one of {sorted(DTYPES)} or null")
        self.activation_checkpointing = every_nth_block(self.activation_checkpointing)
        size = self.fsdp.shard_size
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise ValueError(f"hardware.fsdp.shard_size={size!r} must be a whole number >= 1 (or null: all ranks)")
        tp = self.fsdp.tensor_parallel
        if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
            raise ValueError(f"hardware.fsdp.tensor_parallel={tp!r} must be a whole number >= 1")
        if tp > 1 and self.strategy != "fsdp":
            raise ValueError(f"hardware.fsdp.tensor_parallel={tp} needs hardware.strategy=fsdp (got {self.strategy})")
        pp = self.fsdp.pipeline_parallel
        if isinstance(pp, bool) or not isinstance(pp, int) or pp < 1:
            raise ValueError(f"hardware.fsdp.pipeline_parallel={pp!r} must be a whole number >= 1")
        if pp > 1 and self.strategy != "fsdp":
            raise ValueError(f"hardware.fsdp.pipeline_parallel={pp} needs hardware.strategy=fsdp (got {self.strategy})")
        if pp > 1 and not self.fsdp.sharded_checkpoint:
            raise ValueError("hardware.fsdp.pipeline_parallel needs hardware.fsdp.sharded_checkpoint=true: a single "
                             "checkpoint file is gathered on rank 0, which holds only the first stage")
        if self.strategy == "colossalai" and self.colossalai.plugin == "hybrid_parallel":
            from moxin.colossalai_strategy import check_hybrid_options

            check_hybrid_options(self.colossalai.options)
        if self.fsdp.pipeline_schedule not in PIPELINE_SCHEDULES:
            raise ValueError(f"hardware.fsdp.pipeline_schedule={self.fsdp.pipeline_schedule!r} is not one of "
                             f"{PIPELINE_SCHEDULES}")

    @property
    def tensor_parallel(self) -> int:
        return self.fsdp.tensor_parallel if self.strategy == "fsdp" else 1

    @property
    def pipeline_parallel(self) -> int:
        return self.fsdp.pipeline_parallel if self.strategy == "fsdp" else 1

    @property
    def colossalai_tensor_parallel(self) -> int:
        """Colossal-AI's HybridParallelPlugin's tp_size (moxin/colossalai_tp.py)."""
        if self.strategy == "colossalai" and self.colossalai.plugin == "hybrid_parallel":
            return self.colossalai.options.get("tp_size", 1)
        return 1

    def data_parallel(self, processes: int) -> int:
        """The replicas that take their own batches: a tensor-parallel group shares one, and so do the
        stages of a pipeline."""
        split = self.tensor_parallel * self.pipeline_parallel * self.colossalai_tensor_parallel
        if processes % split:
            if self.colossalai_tensor_parallel > 1:
                what = f"hardware.colossalai.options.tp_size={self.colossalai_tensor_parallel}"
            else:
                stages = f" x pipeline_parallel={self.pipeline_parallel}" if self.pipeline_parallel > 1 else ""
                what = f"hardware.fsdp.tensor_parallel={self.tensor_parallel}{stages}"
            raise ValueError(f"{what} does not divide the {processes} processes (devices x num_nodes)")
        return processes // split


def every_nth_block(value) -> int:
    """hardware.activation_checkpointing as the N of "every N-th block": false/null 0, true 1, N as given."""
    if value is None or value is False:
        return 0
    if value is True:
        return 1
    if isinstance(value, int) and value >= 0:
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    raise ValueError(f"hardware.activation_checkpointing={value!r}: give true, false, or N >= 1 to recompute "
                     "every N-th block")


# --- the switches, applied per block ---

def numbered_blocks(model: nn.Module) -> list[tuple[int, nn.Module]]:
    """A model's blocks in order with their index in the whole model: the whole Transformer's (a
    ModuleList) or a pipeline stage's (a ModuleDict keyed by that index: moxin.pipeline.StageModel)."""
    layers = model.layers
    if isinstance(layers, nn.ModuleDict):
        return [(int(index), block) for index, block in layers.items()]
    return list(enumerate(layers))


def blocks(model: nn.Module) -> list[nn.Module]:
    return [block for _, block in numbered_blocks(model)]


def wrap_training_forwards(model: Transformer, wrap, every: int = 1) -> None:
    """Each `every`-th block (0, every, 2 x every, ... of the whole model, whichever of them a pipeline
    stage holds) runs `wrap(its forward)` while gradients are on, and its plain forward otherwise
    (validation, generation with its changing cache shapes). The forward is replaced on the instance,
    so parameter names (and checkpoints) do not change."""
    for block in [block for index, block in numbered_blocks(model) if index % every == 0]:
        plain = block.forward
        training = wrap(plain)

        def forward(self, *args, _plain=plain, _training=training):
            return _training(*args) if torch.is_grad_enabled() else _plain(*args)

        block.forward = types.MethodType(forward, block)


def checkpoint_activations(model: Transformer, every: int = 1) -> None:
    """Each `every`-th block keeps only its input during training and recomputes the rest in the backward
    pass (every=1: all blocks)."""
    wrap_training_forwards(model, lambda plain: functools.partial(checkpoint, plain, use_reentrant=False), every)


def compile_blocks(model: Transformer, backend: str = "inductor") -> None:
    """torch.compile each block's training forward (one compiled graph serves all blocks of a shape)."""
    wrap_training_forwards(model, lambda plain: torch.compile(plain, backend=backend))


def device_meshes(lightning_mesh, fsdp: FSDPConfig):
    """(the mesh FSDP shards over, the tensor-parallel mesh, the pipeline mesh or None) from Lightning's
    2-D mesh (data_parallel, tensor_parallel). FSDP takes all data-parallel ranks, or for HSDP
    (fsdp.shard_size) a 2-D mesh of (replicas, shard_size) in which consecutive data-parallel ranks form
    a shard group. Pipeline stages are the outermost split of Lightning's data-parallel ranks (stage s:
    its s-th block of them). Collective: every rank calls it."""
    data_parallel, tensor_parallel = lightning_mesh["data_parallel"], lightning_mesh["tensor_parallel"]
    stages = fsdp.pipeline_parallel
    ranks = data_parallel.size() // stages
    replicas = fsdp.replicas(ranks)
    if replicas == 1 and stages == 1:
        return data_parallel, tensor_parallel, None
    from torch.distributed.device_mesh import init_device_mesh

    # One root for all: FSDP combines its placements with tensor parallelism's only on one mesh. Ranks
    # are numbered as in Lightning's mesh (a tensor-parallel group is consecutive ranks).
    data = (("replicate", replicas), ("shard", fsdp.shard_size)) if replicas > 1 else (("data_parallel", ranks),)
    dims = (("pipeline_parallel", stages),) * (stages > 1) + data + (("tensor_parallel", tensor_parallel.size()),)
    root = init_device_mesh(lightning_mesh.device_type, tuple(size for _, size in dims),
                            mesh_dim_names=tuple(name for name, _ in dims))
    fsdp_mesh = root["replicate", "shard"] if replicas > 1 else root["data_parallel"]
    return fsdp_mesh, root["tensor_parallel"], root["pipeline_parallel"] if stages > 1 else None


def shard_model(model: Transformer, mesh, fsdp: FSDPConfig) -> None:
    """FSDP2: each block is one unit (gathered for its forward and backward, resharded after); the root
    unit holds the embedding, the final norm and the LM head. `hidden_states` is registered as a forward
    method, since the training losses call it and then the head's weight rather than `forward`. On a 2-D
    mesh (device_meshes with shard_size) FSDP2 shards over its second dimension and replicates over its first."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    policy = MixedPrecisionPolicy(param_dtype=DTYPES.get(fsdp.param_dtype), reduce_dtype=DTYPES.get(fsdp.reduce_dtype))
    layers = blocks(model)
    last = len(layers) - 1
    for i, block in enumerate(layers):
        # The last block is gathered again at once by the backward pass: keep it.
        block._moxin_reshard_after_forward = fsdp.reshard_after_forward and i < last
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=block._moxin_reshard_after_forward)
    # The root stays gathered after its forward: the losses use `output.weight` after `hidden_states` returns.
    model._moxin_reshard_after_forward = False
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
    if hasattr(model, "hidden_states"):  # (a pipeline stage has only its forward)
        register_fsdp_forward_method(model, "hidden_states")


@contextmanager
def gathered_weights(model: nn.Module):
    """Under FSDP2, every rank holds the whole model (in FSDP's compute dtype) inside the block, so each
    rank may run as many forward passes as it needs with no collective among them: rollouts that stop
    at different lengths on different ranks, or an evaluation on rank 0 alone. Entering and leaving
    gather and free the weights: every rank must enter together. Run no backward pass inside. A model
    that FSDP does not shard is left as it is."""
    from torch.distributed.fsdp import FSDPModule

    units = [module for module in model.modules() if isinstance(module, FSDPModule)]
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield model
    except BaseException:
        # A forward cut short leaves FSDP mid-iteration (its reshard would skip units): reset it first.
        if units and hasattr(units[0], "reset_iter_state"):  # torch >= 2.12
            units[0].reset_iter_state()
        raise
    finally:
        for unit in units:
            unit.set_reshard_after_forward(getattr(unit, "_moxin_reshard_after_forward", True), recurse=False)
            unit.reshard()


def from_group_leader(compute, mesh):
    """What `compute()` returns on the first rank of `mesh`, on every rank of it: computed there alone
    and broadcast. For what a tensor-parallel group must agree on but works out on the CPU, where a time
    limit may decide (GRPO's rewards): peers that disagreed would update the parameters they share
    differently, and then decode different tokens. A mesh of one rank (or None) computes here."""
    if mesh is None or mesh.size() == 1:
        return compute()
    import torch.distributed as dist

    result = [None]
    if mesh.get_local_rank() == 0:
        try:
            result = [(compute(), None)]
        except Exception as error:  # the peers wait for it: they fail with it rather than time out
            result = [(None, error)]
    dist.broadcast_object_list(result, group=mesh.get_group(), group_src=0)
    value, error = result[0]
    if error is not None:
        raise error
    return value


def reshard(model: nn.Module) -> None:
    """Free the gathered weights FSDP2 keeps after a forward pass without a backward (validation): the
    root and the last block stay gathered, and their gathered tensors stand in the module's parameters
    until then, where an optimizer built now would take them instead of the shards."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def parallelize(model: Transformer, parallel: ParallelConfig, mesh=None, tp_mesh=None) -> None:
    """Apply the switches in torchtitan's order: tensor parallelism (tp_mesh), activation checkpointing,
    compile, then FSDP. Idempotent: Lightning calls configure_model at every fit and validate (before
    the optimizer is built), so an already sharded model is only resharded."""
    if getattr(model, "_moxin_parallelized", False):
        if parallel.strategy == "fsdp":
            reshard(model)
        return
    if tp_mesh is not None and tp_mesh.size() > 1:
        apply_tensor_parallel(model, tp_mesh)
    if parallel.activation_checkpointing:
        checkpoint_activations(model, every=parallel.activation_checkpointing)
    if parallel.compile:
        compile_blocks(model, parallel.compile_backend)
    if parallel.strategy == "fsdp":
        if mesh is None:
            raise ValueError("hardware.strategy=fsdp needs a device mesh (Lightning's ModelParallelStrategy gives one)")
        shard_model(model, mesh, parallel.fsdp)
    model._moxin_parallelized = True


def on_meta_device(model: nn.Module) -> bool:
    return any(p.device.type == "meta" for p in model.parameters())


def materialize(model: nn.Module, state: dict | None, device, broadcast: bool) -> None:
    """Give a model built on the meta device and sharded its storage on `device`, then (broadcast=True)
    the full weights `state` that rank 0 holds, each rank keeping its shard of them. Only rank 0 ever
    holds the whole model; the others pass None. Resuming, the checkpoint fills the storage instead."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    model.to_empty(device=device)
    if broadcast:
        state = split_fused(state, model.config) if state and has_split_projections(model) else state
        # A copy: set_model_state_dict puts the model's shards into the dict it is given.
        # A pipeline stage takes its own part of the whole model's weights, which rank 0 broadcasts.
        set_model_state_dict(model, dict(state or {}),
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True,
                                                      strict=not hasattr(model, "stage")))


# --- tensor parallelism ---

# The fused projections and their parts, in the order the fused weight stacks them.
FUSED_PARTS = {"attention.wqkv": ("q", "k", "v"), "feed_forward.w13": ("gate", "up")}


def part_sizes(cfg, fused: str) -> list[int]:
    if fused == "attention.wqkv":
        return [cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim]
    return [cfg.hidden_dim, cfg.hidden_dim]


class SplitProjection(nn.Module):
    """A fused projection (query/key/value, or gate/up) as one Linear per part, for tensor parallelism:
    each part is split over the ranks by output rows on its own, so every rank holds whole heads of
    each; the output concatenates the parts' outputs, as the fused product stacks them."""

    def __init__(self, fused: nn.Linear, names: tuple[str, ...], sizes: list[int]):
        super().__init__()
        self.names = names
        for name, rows in zip(names, fused.weight.detach().split(sizes), strict=True):
            part = nn.Linear(fused.in_features, rows.shape[0], bias=False, device=rows.device, dtype=rows.dtype)
            if rows.device.type != "meta":
                part.weight.data.copy_(rows)
            setattr(self, name, part)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([getattr(self, name)(x) for name in self.names], dim=-1)


def has_split_projections(model: nn.Module) -> bool:
    return any(isinstance(module, SplitProjection) for module in model.modules())


def split_fused(state: dict, cfg) -> dict:
    """A state dict with fused projections (`...attention.wqkv.weight`) as its parts' weights
    (`...attention.wqkv.q.weight`, ...): what a tensor-parallel model holds."""
    out = {}
    for key, value in state.items():
        fused = next((f for f in FUSED_PARTS if key.endswith(f"{f}.weight")), None)
        if fused is None:
            out[key] = value
            continue
        prefix = key.removesuffix("weight")
        for name, rows in zip(FUSED_PARTS[fused], value.split(part_sizes(cfg, fused)), strict=True):
            out[f"{prefix}{name}.weight"] = rows
    return out


def fuse_split(state: dict) -> dict:
    """The inverse of split_fused: the parts' weights stacked back into the fused projections (a state
    dict without parts is returned as it is)."""
    out = dict(state)
    for fused, names in FUSED_PARTS.items():
        for key in [k for k in state if k.endswith(f"{fused}.{names[0]}.weight")]:
            prefix = key.removesuffix(f"{names[0]}.weight")
            out[f"{prefix}weight"] = torch.cat([out.pop(f"{prefix}{name}.weight") for name in names])
    return out


def check_tensor_parallel_divides(cfg, tp: int, setting: str) -> None:
    """Every rank of a tensor-parallel group holds whole heads, whole KV heads and whole MLP columns."""
    for name in ("n_heads", "n_kv_heads", "hidden_dim"):
        if getattr(cfg, name) % tp:
            raise ValueError(f"{setting}={tp} does not divide model.{name}={getattr(cfg, name)}")


def apply_tensor_parallel(model: Transformer, mesh) -> None:
    """Megatron-style tensor parallelism over `mesh` (tp ranks): in each block the query/key/value and
    gate/up parts are split by output rows (ColwiseParallel: every rank computes its heads and its MLP
    columns), the output projections by input columns (RowwiseParallel: one all-reduce each). The
    embedding, norms and LM head stay whole on every rank. The model's attention reads its (now local)
    head counts from these attributes; the parameter names gain the parts (`wqkv.q`), which
    split_fused / fuse_split translate at the checkpoint's edges."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        parallelize_module,
    )

    tp, cfg = mesh.size(), model.config
    check_tensor_parallel_divides(cfg, tp, "hardware.fsdp.tensor_parallel")
    # The parts share one replicated input, made a DTensor once: its gradient is then all-reduced once
    # in the backward pass, not once per part.
    shared_input = PrepareModuleInput(input_layouts=(Replicate(),), desired_input_layouts=(Replicate(),),
                                      use_local_output=False)
    plan = {fused: shared_input for fused in FUSED_PARTS}
    plan.update({f"{fused}.{name}": ColwiseParallel() for fused, names in FUSED_PARTS.items() for name in names})
    plan.update({"attention.wo": RowwiseParallel(), "feed_forward.w2": RowwiseParallel()})
    for block in blocks(model):
        attention, ffn = block.attention, block.feed_forward
        attention.wqkv = SplitProjection(attention.wqkv, FUSED_PARTS["attention.wqkv"],
                                         part_sizes(cfg, "attention.wqkv"))
        ffn.w13 = SplitProjection(ffn.w13, FUSED_PARTS["feed_forward.w13"], part_sizes(cfg, "feed_forward.w13"))
        attention.n_heads, attention.n_kv_heads = cfg.n_heads // tp, cfg.n_kv_heads // tp
        attention.qkv_sizes = [size // tp for size in attention.qkv_sizes]
        parallelize_module(block, mesh, plan)


@torch.no_grad()
def clip_grad_norm(parameters, max_norm: float, across=None) -> torch.Tensor:
    """Scale the gradients so that their global L2 norm is at most max_norm; the norm before. Unlike
    torch.nn.utils.clip_grad_norm_, it takes gradients sharded over different device meshes (tensor
    parallelism's blocks and FSDP-only embedding, norms and head): each mesh's norms are reduced on it.
    `across(norm)`: the norm over the other parts of the model (pipeline stages) from this part's."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in parameters if p.grad is not None]
    groups: dict = {}
    for grad in grads:
        key = (grad.device_mesh, grad.placements) if isinstance(grad, DTensor) else None
        groups.setdefault(key, []).append(torch.linalg.vector_norm(grad))
    norms = []
    for key, group in groups.items():
        stacked = torch.stack(group)
        norms.append(stacked.full_tensor() if key is not None else stacked)
    total = torch.linalg.vector_norm(torch.cat(norms)) if norms else torch.zeros(())
    if across is not None:
        total = across(total)
    scale = max_norm / (float(total) + 1e-6)  # a non-finite norm makes every gradient non-finite, as torch's does
    if not scale >= 1.0:
        for grad in grads:
            grad.mul_(scale)
    return total


# --- the Lightning strategy ---

def world_size(accelerator: str, devices, num_nodes: int) -> int:
    """Processes a run will have: devices per node x nodes (Lightning's meaning of `auto` and -1)."""
    if isinstance(devices, str) and devices.isdigit():
        devices = int(devices)
    if not isinstance(devices, (str, int)):  # a list of device ids (a ListConfig from Hydra)
        per_node = len(devices)
    elif devices in ("auto", -1):
        per_node = torch.cuda.device_count() if accelerator in ("gpu", "cuda") else 1
    elif isinstance(devices, int) and devices > 0:
        per_node = devices
    else:
        raise ValueError(f"hardware.devices={devices!r}: give a number of devices, a list of ids, -1 or auto")
    return per_node * num_nodes


def build_strategy(parallel: ParallelConfig, processes: int, gradient_clip_val: float | None,
                   precision: str = "32-true"):
    """(Lightning strategy, the gradient clipping Lightning should do). Colossal-AI's ZeRO, Gemini and
    hybrid plugins clip inside their optimizers (max_norm), so Lightning then clips nothing."""
    if parallel.strategy == "colossalai" and str(precision) not in ("32-true", "32"):
        raise ValueError(f"hardware.precision={precision}: under Colossal-AI the plugin does mixed precision "
                         "(hardware.colossalai.options.precision); keep hardware.precision=32-true")
    if parallel.strategy == "auto":
        return "auto", gradient_clip_val
    if parallel.strategy == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(gradient_as_bucket_view=True), gradient_clip_val
    if parallel.strategy == "fsdp":
        from moxin.tp_checkpoint import TranslatingModelParallelStrategy

        tp = parallel.tensor_parallel  # dividing the processes: checked by moxin.train.build_trainer
        return TranslatingModelParallelStrategy(data_parallel_size=processes // tp, tensor_parallel_size=tp,
                                                save_distributed_checkpoint=parallel.fsdp.sharded_checkpoint,
                                                pipeline_parallel=parallel.pipeline_parallel), \
            gradient_clip_val
    from moxin.colossalai_strategy import ColossalAIStrategy, clips_in_optimizer

    options = dict(parallel.colossalai.options)
    clips_itself = clips_in_optimizer(parallel.colossalai.plugin)
    if clips_itself and gradient_clip_val:
        options.setdefault("max_norm", float(gradient_clip_val))
    strategy = ColossalAIStrategy(plugin=parallel.colossalai.plugin, plugin_options=options)
    return strategy, None if clips_itself else gradient_clip_val


# --- the trained weights, whole ---

def _is_sharded(module: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


def exportable_model(trainer, model: Transformer) -> Transformer | None:
    """The trained weights as a plain Transformer (no compile, checkpointing or sharding wrappers) on
    rank 0, None on the other ranks. Every rank must call it: gathering shards is collective."""
    strategy_state = getattr(trainer.strategy, "full_model_state_dict", None)
    if strategy_state is not None:  # Colossal-AI: the booster knows where its plugin keeps the weights
        state = strategy_state()
    elif hasattr(model, "stage"):  # a pipeline stage: each stage's weights whole, then all on rank 0
        from moxin.pipeline import gather_stages

        state = gather_stages(model, trainer.strategy.root_device)
    elif _is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    elif getattr(model, "_moxin_parallelized", False):
        state = model.state_dict()
    else:
        return model if trainer.is_global_zero else None
    if not trainer.is_global_zero:
        return None
    state = fuse_split(state)  # tensor parallelism's parts back into the fused projections
    from moxin.hf import load_state_dict_checked

    with torch.device("meta"):
        plain = Transformer(model.config)
    load_state_dict_checked(plain, {k: v.detach().to("cpu") for k, v in state.items()}, source="the trained model")
    return plain
