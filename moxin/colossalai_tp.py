"""Tensor parallelism for the moxin model under Colossal-AI's HybridParallelPlugin (hardware=colossalai_hybrid
with hardware.colossalai.options.tp_size > 1): a shardformer policy, the plugin's way of learning how a model
splits.

In every block, Megatron-style:
- the fused query/key/value projection `wqkv` and the fused gate/up projection `w13` are split by output
  rows, part by part (Colossal-AI's FusedLinear1D_Col), so each rank holds whole heads of queries, keys and
  values and whole columns of the MLP;
- the output projections `wo` and `w2` are split by input columns (Linear1D_Row: one all-reduce each);
- the attention's head counts become the rank's own.
The embedding, the norms and the LM head stay whole on every rank. The parameters keep their names, and the
booster's checkpoints hold them whole (it gathers the parts on saving), their optimizer states in the
weights' row order (optimizer_states_in_the_weights_order): a checkpoint resumes under any tp_size, and
starts a run under any strategy through phase.init_from.

Below the policy, three fixes to colossalai 0.5.0 for fused layers and CPUs (norm_counts_fused_parts_once,
optimizer_states_in_the_weights_order, run_on_cpu).

The plugin's pipeline and sequence parallelism would need the policy to split the model's forward (into
stages, or along the sequence); they are refused (hardware.fsdp.pipeline_parallel is moxin's pipeline).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from moxin.model import Block, Transformer
from moxin.parallel import check_tensor_parallel_divides


def transformer_of(module: torch.nn.Module) -> Transformer:
    """The first moxin Transformer in a module: the trained model, whose config sizes the split (DPO's
    reference is split by the same Block policy)."""
    for candidate in module.modules():
        if isinstance(candidate, Transformer):
            return candidate
    raise ValueError(f"{type(module).__name__} holds no moxin Transformer for the tensor-parallel policy")


def check_split(module: torch.nn.Module, tp: int) -> None:
    """After boosting: the blocks hold their ranks' parts (a policy that matched no module would leave every
    rank the whole model, computing the same as one process: no check of the losses would notice)."""
    model = transformer_of(module)
    attention = model.layers[0].attention
    rows, expected = attention.wqkv.weight.shape[0], sum(attention.qkv_sizes)
    if attention.n_heads * tp != model.config.n_heads or rows != expected:
        raise RuntimeError(f"hardware.colossalai.options.tp_size={tp}: the blocks were not split (wqkv holds {rows} "
                           f"rows, {attention.n_heads} heads on this rank); the moxin policy matched no block")


def check_divides(cfg, tp: int) -> None:
    check_tensor_parallel_divides(cfg, tp, "hardware.colossalai.options.tp_size")


def moxin_policy():
    """The shardformer policy for a LightningModule holding moxin Transformers (the trained one, and DPO's
    frozen reference, split alike). With tp_size=1 it changes nothing: data parallelism, optionally ZeRO."""
    from colossalai.shardformer.layer import FusedLinear1D_Col, Linear1D_Row
    from colossalai.shardformer.policies.base_policy import (
        ModulePolicyDescription,
        Policy,
        SubModuleReplacementDescription,
    )

    class MoxinPolicy(Policy):
        def config_sanity_check(self):
            pass  # make_plugin refused the options this policy cannot serve (check_hybrid_options)

        def preprocess(self):
            check_divides(transformer_of(self.model).config, self.shard_config.tensor_parallel_size)
            return self.model

        def module_policy(self):
            tp = self.shard_config.tensor_parallel_size
            if tp == 1:
                return {}
            cfg = transformer_of(self.model).config
            qkv_sizes = [cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim]
            local = {"attention.n_heads": cfg.n_heads // tp, "attention.n_kv_heads": cfg.n_kv_heads // tp,
                     "attention.qkv_sizes": [size // tp for size in qkv_sizes]}
            split = [
                SubModuleReplacementDescription("attention.wqkv", FusedLinear1D_Col, kwargs={"split_sizes": qkv_sizes}),
                SubModuleReplacementDescription("attention.wo", Linear1D_Row),
                SubModuleReplacementDescription("feed_forward.w13", FusedLinear1D_Col,
                                                kwargs={"split_sizes": [cfg.hidden_dim, cfg.hidden_dim]}),
                SubModuleReplacementDescription("feed_forward.w2", Linear1D_Row),
            ]
            return {Block: ModulePolicyDescription(attribute_replacement=local, sub_module_replacement=split)}

        def postprocess(self):
            tp = self.shard_config.tensor_parallel_size
            for module in self.model.modules():  # for optimizer_states_in_the_weights_order
                if isinstance(module, FusedLinear1D_Col):
                    setattr(module.weight, FUSED, (list(module.split_sizes), tp))
            return self.model

        def get_held_layers(self):
            return [self.model]

        def get_shared_params(self):
            return []  # (shared across pipeline stages: none, without stages)

    return MoxinPolicy()


FUSED = "moxin_fused_parts"  # on a split fused weight: (the parts' rows in the whole matrix, tensor-parallel ranks)


def reorder_fused_rows(tensor: torch.Tensor, split_sizes, ranks: int, parts_first: bool, dim: int = 0):
    """A fused projection's rows (of its weight, or of an optimizer state of it) between two orders:
    - ranks first: the ranks' shards one after another, each rank's rows of every part (its heads of queries,
      then of keys, then of values);
    - parts first: the whole matrix, each part's rows of rank 0, 1, ... in turn.
    parts_first: from the first order to the second; else back."""
    parts = len(split_sizes)
    local = [size // ranks for size in split_sizes]
    if parts_first:  # pieces (rank, part) in rank-major order, taken part by part
        pieces = tensor.split(local * ranks, dim=dim)
        order = [rank * parts + part for part in range(parts) for rank in range(ranks)]
    else:  # pieces (part, rank) in part-major order, taken rank by rank
        pieces = tensor.split([size for size in local for _ in range(ranks)], dim=dim)
        order = [part * ranks + rank for rank in range(ranks) for part in range(parts)]
    return torch.cat([pieces[index] for index in order], dim=dim)


def gather_fused_rows(shard: torch.Tensor, split_sizes: list[int], process_group, is_transposed: bool = False):
    """A fused projection's weight whole from the ranks' shards (Colossal-AI's gather_fused_qkv_in_gpt2_style,
    whose arguments it takes). Colossal-AI's own moves the shard to CUDA first; this one gathers where it is."""
    ranks = dist.get_world_size(process_group)
    shards = [torch.empty_like(shard) for _ in range(ranks)]
    dist.all_gather(shards, shard.contiguous(), group=process_group)
    dim = -1 if is_transposed else 0
    return reorder_fused_rows(torch.cat(shards, dim=dim), split_sizes, ranks, parts_first=True, dim=dim)


def _fused_states(state: dict, param: torch.Tensor, parts_first: bool) -> dict:
    """An optimizer state of a parameter, whole, with a split fused weight's tensors reordered (see
    optimizer_states_in_the_weights_order)."""
    fused = getattr(param, FUSED, None)
    if fused is None:
        return state
    split_sizes, ranks = fused
    return {key: reorder_fused_rows(value, split_sizes, ranks, parts_first)
            if key != "step" and isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == sum(split_sizes)
            else value for key, value in state.items()}


def optimizer_states_in_the_weights_order() -> None:
    """colossalai 0.5.0 gathers a split weight's optimizer states (AdamW's moments) by putting the ranks'
    shards one after another, and splits them back the same way. For a fused projection that is not the
    weight's order (it interleaves the parts: reorder_fused_rows), so a checkpoint resumed under another
    tp_size gave each row another row's moments. Here the states are saved in the whole weight's order and
    split from it, as the weights are: a checkpoint resumes under any tp_size."""
    from colossalai.checkpoint_io.hybrid_parallel_checkpoint_io import HybridParallelCheckpointIO as checkpoint_io

    if getattr(checkpoint_io, "_moxin_fused_order", False):
        return
    gather, load = checkpoint_io.gather_from_sharded_optimizer_state, checkpoint_io.load_states_into_optimizer

    def gather_whole(state, param, *args, **kwargs):
        return _fused_states(gather(state, param, *args, **kwargs), param, parts_first=True)

    def load_whole(self, optimizer, state_dict: dict, id_map: dict):
        working = optimizer.get_master_to_working_map()
        for key, state in state_dict.items():
            param = id_map.get(int(key))
            if param is not None:
                param = working[id(param)] if working is not None else param
                state_dict[key] = _fused_states(state, param, parts_first=False)
        return load(self, optimizer, state_dict, id_map)

    checkpoint_io.gather_from_sharded_optimizer_state = staticmethod(gather_whole)
    checkpoint_io.load_states_into_optimizer = load_whole
    checkpoint_io._moxin_fused_order = True


def norm_counts_fused_parts_once() -> None:
    """colossalai 0.5.0's hybrid optimizers sum the squared gradient norms over a tensor-parallel group, and
    divide a parameter's by tp_size where it is whole on every rank; they take the fused layers' parts
    (customized distributed tensors) for whole ones, so gradient clipping saw too small a norm. Counted as the
    split parameters they are, the clipped steps equal one process's."""
    from colossalai.booster.plugin import hybrid_parallel_plugin
    from colossalai.tensor.d_tensor.api import is_customized_distributed_tensor, is_distributed_tensor

    hybrid_parallel_plugin.is_distributed_tensor = (
        lambda tensor: is_distributed_tensor(tensor) or is_customized_distributed_tensor(tensor))


def run_on_cpu() -> None:
    """colossalai 0.5.0 on a CPU (gloo): its CPU accelerator raises where a CPU needs nothing done (waiting for
    a device queue) and on the random-number calls that its tensor-parallel layers make when built (on a CPU
    the device's generator is the CPU's); its fused layers' gather moves shards to CUDA."""
    from colossalai.accelerator import cpu_accelerator
    from colossalai.shardformer.layer import qkv_fused_linear

    accelerator = cpu_accelerator.CpuAccelerator
    accelerator.synchronize = lambda self, device=None: None
    accelerator.get_rng_state = lambda self, device=None: torch.get_rng_state()
    accelerator.set_rng_state = lambda self, new_state, device=None: torch.set_rng_state(new_state)
    accelerator.manual_seed = lambda self, seed: torch.manual_seed(seed)
    qkv_fused_linear.gather_fused_qkv_in_gpt2_style = gather_fused_rows
