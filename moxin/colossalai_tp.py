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
booster's checkpoints hold them whole (it gathers the parts on saving), so a checkpoint resumes under any
tp_size, or under another strategy through phase.init_from.

Pipeline and sequence parallelism of the plugin would need the model's forward split into stages by the
policy; they are refused (hardware.fsdp.pipeline_parallel is moxin's pipeline).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from moxin.model import Block, Transformer


def transformer_of(module: torch.nn.Module) -> Transformer:
    """The (first) moxin Transformer inside a LightningModule: the policy, whose blocks are split."""
    for candidate in module.modules():
        if isinstance(candidate, Transformer):
            return candidate
    raise ValueError(f"{type(module).__name__} holds no moxin Transformer for the tensor-parallel policy")


def check_divides(cfg, tp: int) -> None:
    for name in ("n_heads", "n_kv_heads", "hidden_dim"):
        if getattr(cfg, name) % tp:
            raise ValueError(f"hardware.colossalai.options.tp_size={tp} does not divide model.{name}="
                             f"{getattr(cfg, name)}")


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
            config = self.shard_config
            if config.pipeline_stage_manager is not None:
                raise ValueError("hardware.colossalai.options.pp_size > 1: the moxin policy splits blocks across "
                                 "ranks (tp_size), not into pipeline stages; use hardware=fsdp with "
                                 "hardware.fsdp.pipeline_parallel")
            if config.enable_sequence_parallelism:
                raise ValueError("hardware.colossalai.options.enable_sequence_parallelism: the moxin policy does "
                                 "not split sequences; leave it off")

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
            return self.model

        def get_held_layers(self):
            return [self.model]

        def get_shared_params(self):
            return []  # (shared across pipeline stages: none, without stages)

    return MoxinPolicy()


def gather_fused_rows(shard: torch.Tensor, split_sizes: list[int], process_group, transposed: bool = False):
    """A fused projection whole from the ranks' shards: each rank holds its rows of every part (its heads of
    queries, then of keys, then of values), and the whole holds each part's rows of rank 0, 1, ... in turn.
    Colossal-AI's own gather moves the shard to CUDA first; this one gathers where the shard is."""
    ranks = dist.get_world_size(process_group)
    shards = [torch.empty_like(shard) for _ in range(ranks)]
    dist.all_gather(shards, shard.contiguous(), group=process_group)
    dim = -1 if transposed else 0
    pieces = [whole.split([size // ranks for size in split_sizes], dim=dim) for whole in shards]
    return torch.cat([pieces[rank][part] for part in range(len(split_sizes)) for rank in range(ranks)], dim=dim)


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
