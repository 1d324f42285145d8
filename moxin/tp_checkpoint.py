"""Resuming a sharded checkpoint under another tensor-parallel layout.

Under tensor parallelism the fused projections (`wqkv`, `w13`) are held as one Linear per part
(`wqkv.q`, ...: moxin.parallel.SplitProjection), so a checkpoint saved with
hardware.fsdp.tensor_parallel=1 stores `...wqkv.weight` where one saved with tensor_parallel > 1
stores `...wqkv.q.weight`, `...wqkv.k.weight`, `...wqkv.v.weight`, and the same for the AdamW
moments of each. A part is a block of rows of the fused matrix, so the translation is a row offset:
`PartsLoadPlanner` tells the distributed checkpoint (DCP) to read each rank's own rows of a part from
the fused tensor, or of a fused tensor from its parts. Nothing is gathered: each rank reads only its
shard. Between two sizes above 1 the names agree and DCP reshards by itself.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, create_default_local_load_plan
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex
from torch.distributed.checkpoint.planner import LoadPlan
from torch.distributed.checkpoint.planner_helpers import _create_chunk_list, create_read_items_for_chunk_list

from moxin.checkpoint import SHARDED_META
from moxin.parallel import FUSED_PARTS, part_sizes


def part_rows(cfg) -> dict[str, list[tuple[str, int, int]]]:
    """For each fused projection, its parts as (name, first row in the fused matrix, rows)."""
    out = {}
    for fused, names in FUSED_PARTS.items():
        sizes = part_sizes(cfg, fused)
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        out[fused] = list(zip(names, starts, sizes, strict=True))
    return out


def _shifted(chunk: ChunkStorageMetadata, rows: int, first: int | None = None, count: int | None = None):
    """The chunk moved by `rows` along dimension 0 (and cut to `count` rows from `first`, if given)."""
    offsets, sizes = list(chunk.offsets), list(chunk.sizes)
    if first is not None:
        offsets[0], sizes[0] = first, count
    offsets[0] += rows
    return ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes))


def _reads_into(fqn: str, chunks: list, items: list) -> list:
    """Read items planned for another key (the stored name) that fill this rank's `chunks` of `fqn`."""
    return [dataclasses.replace(item, dest_index=MetadataIndex(fqn, chunks[item.dest_index.index].offsets,
                                                               item.dest_index.index)) for item in items]


class PartsLoadPlanner(DefaultLoadPlanner):
    """DCP's default load plan, plus reads that translate between fused projections and their parts
    (see the module's docstring) for the keys the checkpoint stores under the other naming."""

    def __init__(self, cfg):
        super().__init__()
        self.parts = part_rows(cfg)

    def create_local_plan(self) -> LoadPlan:
        stored = self.metadata.state_dict_metadata
        direct = {fqn: obj for fqn, obj in self.state_dict.items() if fqn in stored}
        plan = create_default_local_load_plan(direct, self.metadata, strict=True)
        translated = [item for fqn, obj in self.state_dict.items() if fqn not in stored
                      for item in self._translated_reads(fqn, obj, stored)]
        return LoadPlan(plan.items + translated)

    def _translated_reads(self, fqn: str, obj, stored) -> list:
        for fused, parts in self.parts.items():
            for name, first, _ in parts:  # a part, stored fused
                source = fqn.replace(f"{fused}.{name}.weight", f"{fused}.weight")
                if source != fqn and source in stored:
                    return self._part_from_fused(fqn, obj, source, stored[source], first, fused)
            sources = [(fqn.replace(f"{fused}.weight", f"{fused}.{name}.weight"), first, rows)
                       for name, first, rows in parts]  # fused, stored as parts
            if sources[0][0] != fqn and all(source in stored for source, _, _ in sources):
                return self._fused_from_parts(fqn, obj, sources, stored)
        raise RuntimeError(f"Missing key in checkpoint state_dict: {fqn} (stored under neither its fused nor its "
                           "split name)")

    def _part_from_fused(self, fqn: str, obj, source: str, md, first: int, fused: str) -> list:
        rows = sum(count for _, _, count in self.parts[fused])
        if len(md.size) and (md.size[0] != rows or tuple(md.size[1:]) != tuple(obj.size()[1:])):
            raise ValueError(f"Size mismatch between saved {md.size} ({source}) and this model's {fqn}: the "
                             f"parts of {fused} make {rows} x {list(obj.size()[1:])}; was the model configured alike?")
        chunks = _create_chunk_list(obj)
        # AdamW's step count (0-d) is the fused tensor's own; the moments are rows of the fused ones.
        wanted = [_shifted(c, first) for c in chunks] if len(md.size) else chunks
        return _reads_into(fqn, chunks, create_read_items_for_chunk_list(source, md, wanted))

    @staticmethod
    def _fused_from_parts(fqn: str, obj, sources, stored) -> list:
        for source, _, rows in sources:
            size = stored[source].size
            if len(size) and tuple(size) != (rows, *obj.size()[1:]):
                raise ValueError(f"Size mismatch between saved {size} ({source}) and this model's part of {fqn}: "
                                 f"{[rows, *obj.size()[1:]]}; was the model configured alike?")
        chunks = _create_chunk_list(obj)
        if not len(stored[sources[0][0]].size):  # AdamW's step count: the same in every part
            return _reads_into(fqn, chunks, create_read_items_for_chunk_list(sources[0][0], stored[sources[0][0]],
                                                                             chunks))
        out = []
        for index, chunk in enumerate(chunks):
            low, high = chunk.offsets[0], chunk.offsets[0] + chunk.sizes[0]
            for source, first, rows in sources:
                start, end = max(low, first), min(high, first + rows)
                if start >= end:
                    continue  # this rank's rows hold none of this part
                piece = _shifted(chunk, -first, first=start, count=end - start)  # in the part's rows
                for item in create_read_items_for_chunk_list(source, stored[source], [piece]):
                    offsets = torch.Size([item.dest_offsets[0] + start - low, *item.dest_offsets[1:]])
                    out.append(dataclasses.replace(item, dest_index=MetadataIndex(fqn, chunk.offsets, index),
                                                   dest_offsets=offsets))
        return out


def load_translated(path: Path, module: torch.nn.Module, optimizers: list, cfg, strict: bool = True) -> dict:
    """Lightning's load of a sharded checkpoint folder (model, then each optimizer, then the rest from
    meta.pt), through PartsLoadPlanner. The optimizer's parameter groups keep this run's names."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    from moxin.safe_dcp import SafeMetadataReader

    state = {"state_dict": get_model_state_dict(module)}
    stored = SafeMetadataReader(str(path)).read_metadata().state_dict_metadata
    # A frozen reference policy (DPO's) that the checkpoint left out (saved with dpo.reference=cached) is
    # rebuilt from the starting weights, as every run rebuilds it: nothing to load.
    rebuilt = [] if any(k.startswith("state_dict.reference.") for k in stored) else [
        k for k in state["state_dict"] if k.startswith("reference.")]
    for key in rebuilt:
        del state["state_dict"][key]
    dcp.load(state, checkpoint_id=path, planner=PartsLoadPlanner(cfg))  # (raises for any other key it lacks)
    module.load_state_dict(state["state_dict"], strict=strict and not rebuilt)
    for index, optimizer in enumerate(optimizers):
        key = f"optimizer_{index}"
        current = get_optimizer_state_dict(module, optimizer)
        names = [group["params"] for group in current["param_groups"]]
        loaded = {key: current}
        dcp.load(loaded, checkpoint_id=path, planner=PartsLoadPlanner(cfg))
        for group, params in zip(loaded[key]["param_groups"], names, strict=True):
            group["params"] = params  # the saved groups name the other layout's parameters
        set_optimizer_state_dict(module, optimizer, optim_state_dict=loaded[key],
                                 options=StateDictOptions(cpu_offload=True))
    return torch.load(path / SHARDED_META, map_location="cpu", weights_only=True)


def splits_projections(tensor_parallel: int) -> bool:
    """Whether a run of this tensor-parallel size holds (and saves) the fused projections as parts."""
    return tensor_parallel > 1


class TranslatingModelParallelStrategy(ModelParallelStrategy):
    """Lightning's FSDP2 / tensor-parallel strategy, which also resumes a sharded checkpoint saved with
    the fused projections split where this run holds them fused, or the reverse (load_translated).
    Under pipeline parallelism the stages are the outermost split of Lightning's data-parallel ranks
    (moxin.parallel.device_meshes), and the ranks of one pipeline take the same batches."""

    def __init__(self, *args, pipeline_parallel: int = 1, **kwargs):
        super().__init__(*args, **kwargs)
        self.pipeline_parallel = pipeline_parallel

    @property
    def distributed_sampler_kwargs(self) -> dict:
        kwargs = super().distributed_sampler_kwargs
        replicas = kwargs["num_replicas"] // self.pipeline_parallel
        return {"num_replicas": replicas, "rank": kwargs["rank"] % replicas}

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict:
        path = Path(self.broadcast(checkpoint_path))
        module = self.lightning_module
        if path.is_dir() and (path / SHARDED_META).is_file() and (path / ".metadata").is_file():  # FSDP's folder
            meta = torch.load(path / SHARDED_META, map_location="cpu", weights_only=True)
            saved = meta.get("tensor_parallel", 1)
            # Pipeline stages: each stage saved its optimizer's parameter groups under the same keys (one copy
            # is kept, naming one stage's parameters); load_translated gives them this rank's names.
            staged = max(meta.get("pipeline_parallel", 1), self.pipeline_parallel) > 1
            if staged or splits_projections(saved) != splits_projections(module.parallel.tensor_parallel):
                return load_translated(path, self.model, self.optimizers, module.model_config,
                                       strict=module.strict_loading)
        return super().load_checkpoint(path, weights_only)
