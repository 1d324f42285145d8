"""Pipeline parallelism for pretraining, SFT and DPO: the model's blocks split into consecutive stages, one per
rank of a pipeline group, trained by PyTorch's `torch.distributed.pipelining` schedules (GPipe, 1F1B).

- `split_model(model, stage, stages)`: this rank's `StageModel`, whose parameters keep the names they
  have in the whole `Transformer` (`layers.18.attention.wqkv.weight`), so a stage's distributed
  checkpoint holds the same keys as an unsplit run's: checkpoints move between pipeline sizes.
- `PipelineRunner`: one optimizer step's micro-batches through the schedule (forward and backward),
  forward-only passes (validation; DPO's reference log-probs), and the gradient norm over every stage.
  Packed rows (SFT) take their `segments` to every stage, which builds their positions and attention
  mask from them.
- `gather_stages(stage_model, device)`: the stages' weights together on global rank 0 (export).

Composes with FSDP2 (each stage sharded over its data-parallel ranks) and tensor parallelism (each
stage's blocks split over its tensor-parallel ranks): hardware.fsdp.pipeline_parallel in conf/hardware/fsdp.yaml.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from moxin.losses import IGNORE_INDEX, linear_cross_entropy
from moxin.model import Transformer, packed_layout, rope_cos_sin
from moxin.parallel import reshard


def stage_layers(n_layers: int, stages: int, stage: int) -> range:
    """The blocks of `stage`: consecutive, as even as they divide; a remainder goes to the first stages,
    since the last one also runs the LM head and the loss."""
    if stages > n_layers:
        raise ValueError(f"hardware.fsdp.pipeline_parallel={stages} is more stages than the model's "
                         f"{n_layers} blocks")
    per, extra = divmod(n_layers, stages)
    start = stage * per + min(stage, extra)
    return range(start, start + per + (stage < extra))


class StageModel(nn.Module):
    """A consecutive run of the Transformer's blocks; the first stage also holds the embedding, the last
    the final norm and the LM head. Its forward maps tokens (first stage) or hidden states (B, T, dim)
    to hidden states: the last stage's are normalised, the LM head's input (losses.linear_cross_entropy
    takes them with `output.weight`, as the unsplit model's training does)."""

    def __init__(self, model: Transformer, stage: int, stages: int):
        super().__init__()
        self.config, self.stage, self.stages = model.config, stage, stages
        self.first, self.last = stage == 0, stage == stages - 1
        if self.first:
            self.tok_embeddings = model.tok_embeddings
        # Keyed by the block's index in the whole model: the parameter names stay the unsplit model's.
        mine = stage_layers(model.config.n_layers, stages, stage)
        self.layers = nn.ModuleDict({str(i): model.layers[i] for i in mine})
        if self.last:
            self.norm, self.output = model.norm, model.output

    def forward(self, x: torch.Tensor, segments: torch.Tensor | None = None) -> torch.Tensor:
        """`segments` (B, T): the sequence each token belongs to, for rows packing several (as
        Transformer.hidden_states); every stage takes them."""
        if x.shape[1] > self.config.max_seq_len:
            raise ValueError(f"rows of {x.shape[1]} tokens exceed max_seq_len {self.config.max_seq_len}")
        h = self.tok_embeddings(x) if self.first else x  # (B, T, dim)
        if segments is None:  # causal; attention applies the sliding window itself
            positions, mask = torch.arange(h.shape[1], device=h.device), None
        else:
            positions, mask = packed_layout(segments, self.config.sliding_window)
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta)
        for block in self.layers.values():
            h = block(h, cos, sin, mask, None, segments)
        return self.norm(h) if self.last else h


def split_model(model: Transformer, stage: int, stages: int) -> StageModel:
    if model.config.tie_embeddings:
        raise ValueError("pipeline parallelism needs an untied LM head (model.tie_embeddings=false): the "
                         "embedding lives on the first stage, the head on the last")
    return StageModel(model, stage, stages)


class PipelineRunner:
    """Runs a StageModel as stage `mesh.get_local_rank()` of the pipeline group `mesh`. Every rank of the
    group gets the same batch (data is split over data-parallel ranks only); the first stage reads its
    tokens, the last its labels, and the loss is returned to every stage."""

    def __init__(self, stage_model: StageModel, mesh, microbatches: int, schedule: str, device: torch.device,
                 compute_dtype: torch.dtype | None = None, loss_fn=None):
        from torch.distributed.pipelining import PipelineStage
        from torch.distributed.pipelining.schedules import get_schedule_class

        self.model, self.microbatches = stage_model, microbatches
        self.group, self.stage, self.stages = mesh.get_group(), mesh.get_local_rank(), mesh.size()
        # FSDP's compute dtype (bf16 under its mixed precision; None: the weights' own).
        self.device, self.compute_dtype = device, compute_dtype
        stage = PipelineStage(stage_model, self.stage, self.stages, device, group=self.group)
        # The gradients are the sum of the micro-batches' (scale_grads=False): each micro-batch's loss is
        # its share of the step's, by default its mean token loss / micro-batches (the mean over them, as
        # under accumulation); `loss_fn(hidden, labels)` gives another (SFT: token sums over the step's).
        self.loss_fn = loss_fn or self.mean_token_loss
        self.schedule = get_schedule_class(schedule)(stage, microbatches, loss_fn=self.loss_fn, scale_grads=False)

    def mean_token_loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return linear_cross_entropy(hidden, self.model.output.weight, labels) / self.microbatches

    def train_step(self, input_ids: torch.Tensor, labels: torch.Tensor,
                   segments: torch.Tensor | None = None) -> torch.Tensor:
        """One optimizer step's forward and backward passes over its micro-batches (the batch's rows split
        in `microbatches` equal parts); the gradients are left in the stage's parameters. Returns the
        sum of the micro-batches' losses (by default the step's mean loss) on every stage."""
        if input_ids.shape[0] % self.microbatches:
            raise ValueError(f"a batch of {input_ids.shape[0]} rows does not split into {self.microbatches} "
                             "equal pipeline micro-batches")
        losses: list[torch.Tensor] = []
        first, last = self.model.first, self.model.last
        per_row = {} if segments is None else {"segments": segments}  # split into micro-batches like the rows
        self.schedule.step(*([input_ids] if first else []), target=labels if last else None, losses=losses,
                           return_outputs=False, **per_row)
        return self.from_last_stage(torch.stack(losses).sum().detach() if last else None)

    @torch.no_grad()
    def eval_loss(self, input_ids: torch.Tensor, labels: torch.Tensor, segments: torch.Tensor | None = None,
                  reduction: str = "mean") -> torch.Tensor:
        """The batch's mean (or sum of) token loss, forward only (validation), on every stage."""
        def loss(hidden: torch.Tensor) -> torch.Tensor:
            kept, targets = hidden, labels
            if (labels == IGNORE_INDEX).any():  # prompts and padding (SFT) need not reach the LM head
                keep = labels != IGNORE_INDEX
                kept, targets = hidden[keep], labels[keep]
            return linear_cross_entropy(kept, self.model.output.weight, targets, reduction=reduction)

        return self.forward_only(input_ids, loss, (), segments=segments)

    @torch.no_grad()
    def forward_only(self, input_ids: torch.Tensor, on_last, shape: tuple[int, ...],
                     segments: torch.Tensor | None = None, model: StageModel | None = None) -> torch.Tensor:
        """`on_last(hidden)`, a float tensor of `shape`, of the batch's last-stage hidden states, on every
        stage: each stage receives its input from the previous one and sends its output on, the batch as
        one micro-batch, no gradients. `model`: another StageModel of the same stage (DPO's reference)."""
        model = model or self.model
        # What flows between stages: the blocks' compute dtype (the stored weights' under bf16-true or fp32).
        dtype = self.compute_dtype or next(model.parameters()).dtype
        h = input_ids
        if not model.first:
            h = torch.empty(*input_ids.shape, model.config.dim, dtype=dtype, device=self.device)
            dist.recv(h, group=self.group, group_src=self.stage - 1)
        out = model(h, segments)
        value = None
        if not model.last:
            dist.send(out.to(dtype).contiguous(), group=self.group, group_dst=self.stage + 1)
        else:
            value = on_last(out)
        reshard(model)  # no backward pass frees what FSDP gathered (an optimizer step would not reach it)
        return self.from_last_stage(value, shape)

    def from_last_stage(self, value: torch.Tensor | None, shape: tuple[int, ...] = ()) -> torch.Tensor:
        """The last stage's `value` (None elsewhere) on every stage, in fp32 (whatever the default dtype)."""
        value = value.float() if value is not None else torch.zeros(shape, dtype=torch.float32, device=self.device)
        dist.broadcast(value, group=self.group, group_src=self.stages - 1)
        return value

    def norm_across_stages(self, norm: torch.Tensor) -> torch.Tensor:
        """The gradient norm of the whole model from each stage's own."""
        squared = norm.detach().float() ** 2
        dist.all_reduce(squared, group=self.group)
        return squared.sqrt()


def gather_stages(stage_model: StageModel, device: torch.device) -> dict | None:
    """The whole model's weights on global rank 0 (on the CPU), None on the other ranks; every rank calls
    it. Each stage's first rank gathers its stage's weights whole (with the stage's other ranks, one
    tensor at a time), then sends them to rank 0 one tensor at a time: no device holds more than one
    gathered tensor beyond its own, and only the stages' first ranks hold their stage on the host."""
    from torch.distributed.tensor import DTensor

    rank, world = dist.get_rank(), dist.get_world_size()
    leader = rank % (world // stage_model.stages) == 0  # the stage's first rank
    whole = {}
    for name, value in stage_model.state_dict().items():
        value = value.full_tensor() if isinstance(value, DTensor) else value  # collective within the stage
        if leader:
            whole[name] = value.detach().to("cpu", copy=True)
    layouts = [None] * world  # every rank learns what each stage's first rank will send
    dist.all_gather_object(layouts, [(name, tuple(t.shape), t.dtype) for name, t in whole.items()] if leader else None)
    for sender, layout in enumerate(layouts):
        if sender == 0 or layout is None or rank not in (0, sender):
            continue
        for name, shape, dtype in layout:
            if rank == sender:
                dist.send(whole[name].to(device), dst=0)
            else:
                received = torch.empty(shape, dtype=dtype, device=device)
                dist.recv(received, src=sender)
                whole[name] = received.cpu()
    return whole if rank == 0 else None
