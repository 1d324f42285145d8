"""What every phase shares: the model, parameter groups, optimizer, schedule and checkpoint I/O.

A phase module subclasses `MoxinModule` and adds only its step (and its own state).
"""

from __future__ import annotations

import copy
import math
import random
from dataclasses import asdict, dataclass

import lightning as L
import numpy as np
import torch

from moxin.data.datamodule import data_parallel_rank
from moxin.losses import head_cross_entropy, linear_cross_entropy
from moxin.model import ModelConfig, Transformer
from moxin.parallel import (
    DTYPES,
    ParallelConfig,
    clip_grad_norm,
    device_meshes,
    materialize,
    on_meta_device,
    parallelize,
)
from moxin.pipeline import PipelineRunner, StageModel, split_model


@dataclass
class OptimConfig:
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    warmup_steps: int = 2000
    warmup_ratio: float | None = None  # when set, warm up over this share of the run's steps instead
    min_lr_ratio: float = 0.1  # cosine decays to this fraction of the peak
    schedule: str = "cosine"
    fused: bool | None = None  # None: fused AdamW on a GPU or CPU (6x faster than foreach on these CPUs)

    def __post_init__(self):
        self.betas = tuple(self.betas)
        if self.schedule not in SCHEDULES:
            raise ValueError(f"OptimConfig.schedule {self.schedule!r} is not one of {sorted(SCHEDULES)}")
        if self.lr <= 0:
            raise ValueError(f"OptimConfig.lr must be > 0, got {self.lr}")
        if self.warmup_steps < 0:
            raise ValueError(f"OptimConfig.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.warmup_ratio is not None and not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"OptimConfig.warmup_ratio must be in [0, 1) or None, got {self.warmup_ratio}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"OptimConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


def _cosine(progress: float, min_ratio: float) -> float:
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _linear(progress: float, min_ratio: float) -> float:
    return 1.0 - (1.0 - min_ratio) * progress


def _constant(progress: float, min_ratio: float) -> float:
    return 1.0


# Decay after warm-up, by name: f(progress in [0, 1], min_ratio) -> multiplier of the peak lr.
SCHEDULES = {"cosine": _cosine, "linear": _linear, "constant": _constant}


def lr_multiplier(step: int, warmup_steps: int, total_steps: int, schedule: str, min_ratio: float) -> float:
    """Linear warm-up from ~0 to 1 over warmup_steps, then the named decay until total_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return SCHEDULES[schedule](progress, min_ratio)


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (linear and embedding weights); none on norms and biases."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


NONFINITE_POLICIES = ("stop", "skip")


class NonFiniteLossError(RuntimeError):
    """Training stopped on a NaN or infinite loss (phase.nonfinite_loss=stop)."""


class MoxinModule(L.LightningModule):
    data_format = "pretrain"  # the kind of data module this phase trains on (moxin.train picks it)
    phase_options: tuple[str, ...] = ()  # keys of the phase config given to __init__ (e.g. "dpo")
    generates = False  # samples from the policy while training (GRPO): a rank (TP: its group) decodes alone

    def __init__(self, model_config: ModelConfig, optim: OptimConfig, nonfinite_loss: str = "stop"):
        super().__init__()
        if nonfinite_loss not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite_loss must be one of {NONFINITE_POLICIES}, got {nonfinite_loss!r}")
        self.nonfinite_loss = nonfinite_loss
        self.skipped_steps = 0  # steps skipped for a non-finite loss (policy skip); part of the checkpoint
        # Plain dicts only, so checkpoints load with torch.load(weights_only=True).
        self.save_hyperparameters({"model": model_config.to_dict(), "optim": asdict(optim)})
        self.model_config = model_config
        self.optim = optim
        self.model = Transformer(model_config)
        self.tokens_seen = 0  # training tokens consumed; part of the checkpoint
        self.parallel = ParallelConfig()  # the hardware option's strategy and switches (moxin.train sets it)
        # FSDP builds the model on the meta device: rank 0's full starting weights (None elsewhere), and
        # whether to broadcast them once it is sharded (not when a checkpoint will fill it).
        self.initial_state: dict[str, torch.Tensor] | None = None
        self.broadcast_initial_state = False
        self._meshes = None  # the device meshes FSDP, tensor and pipeline parallelism split over (configure_model)
        # Pipeline parallelism (use_pipeline): this rank's stage runs under a PipelineRunner, which takes
        # each optimizer step's micro-batches together; the module then optimizes by hand.
        self.pipeline_runner = None
        self.pipeline_microbatches = 1
        self.max_grad_norm: float | None = None

    def start_weights_on_every_rank(self) -> bool:
        """Whether each rank needs the whole starting weights even under FSDP (DPO's cached reference)."""
        return False

    def configure_model(self) -> None:
        """Lightning's hook for parallelism: checkpointing, compile and FSDP2 from the hardware option.
        A frozen reference policy (DPO, GRPO) is sharded like the policy but never compiled or checkpointed."""
        fsdp = self.parallel.strategy == "fsdp"
        if fsdp and self._meshes is None:  # built once: Lightning calls this hook at every fit and validate
            self._meshes = device_meshes(self.device_mesh, self.parallel.fsdp)
        mesh, tp_mesh, pp_mesh = self._meshes or (None, None, None)
        if pp_mesh is not None and not isinstance(self.model, StageModel):  # this rank's stage, still on meta
            self.model = split_model(self.model, pp_mesh.get_local_rank(), pp_mesh.size())
        parallelize(self.model, self.parallel, mesh, tp_mesh)
        if fsdp and on_meta_device(self.model):
            if self.broadcast_initial_state and not self.trainer.strategy.broadcast(self.initial_state is not None):
                raise RuntimeError("FSDP: the process group's rank 0 has no starting weights to broadcast: the "
                                   "launcher's rank variables (RANK, LOCAL_RANK, SLURM_PROCID) name another process "
                                   "rank 0 than the process group does")
            materialize(self.model, self.initial_state, self.trainer.strategy.root_device,
                        self.broadcast_initial_state)
            self.initial_state = None
        if pp_mesh is not None and self.pipeline_runner is None:
            fsdp_options = self.parallel.fsdp
            self.pipeline_runner = PipelineRunner(self.model, pp_mesh, self.pipeline_microbatches,
                                                  fsdp_options.pipeline_schedule, self.trainer.strategy.root_device,
                                                  compute_dtype=DTYPES.get(fsdp_options.param_dtype),
                                                  loss_fn=self.pipeline_loss)
        reference = getattr(self, "reference", None)
        if isinstance(reference, torch.nn.Module) and fsdp and on_meta_device(reference):
            self.reference = self.frozen_like_policy(reference, self.reference_state)
            self.reference_state = None

    def frozen_like_policy(self, model: Transformer, state: dict[str, torch.Tensor] | None) -> torch.nn.Module:
        """A frozen model built on the meta device (DPO's reference), split and sharded as the policy is
        under FSDP (this rank's pipeline stage of it, if any), then filled with the full weights `state`
        that rank 0 holds (the other ranks may pass None). Never compiled or checkpointed per block."""
        mesh, tp_mesh, pp_mesh = self._meshes
        if pp_mesh is not None:
            model = split_model(model, pp_mesh.get_local_rank(), pp_mesh.size())
        parallelize(model, ParallelConfig(strategy="fsdp", fsdp=self.parallel.fsdp), mesh, tp_mesh)
        materialize(model, state, self.trainer.strategy.root_device, broadcast=True)
        return model.requires_grad_(False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(tokens)

    def use_pipeline(self, microbatches: int, max_grad_norm: float | None) -> None:
        """Train under pipeline parallelism: each batch is one optimizer step's `microbatches` micro-batches
        together, which the stages' schedule runs; the module steps the optimizer and clips itself."""
        if not self.supports_pipeline:
            raise ValueError(f"hardware.fsdp.pipeline_parallel runs the pretraining, SFT and DPO phases; "
                             f"{type(self).__name__} needs the whole model on each rank (it samples from the "
                             "policy); use tensor_parallel or FSDP alone for it")
        stages, schedule = self.parallel.pipeline_parallel, self.parallel.fsdp.pipeline_schedule
        if schedule == "1F1B" and microbatches < stages:
            raise ValueError(f"the 1F1B pipeline schedule needs at least as many micro-batches per optimizer step as "
                             f"stages ({stages}); this run has {microbatches} (phase.accumulate_grad_batches, or "
                             "phase.global_batch_tokens): raise it, or set hardware.fsdp.pipeline_schedule=GPipe")
        self.automatic_optimization = False
        self.pipeline_microbatches, self.max_grad_norm = microbatches, max_grad_norm

    supports_pipeline = False  # whether the phase's loss runs as pipeline micro-batches (pretraining, SFT, DPO)
    pipeline_loss = None  # the loss of a micro-batch under the pipeline, (hidden, labels) -> its share of the step's
    # (None: its mean token loss / micro-batches)

    def pipeline_rows(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(the step's rows, what pipeline_loss takes of them beside their hidden states), split alike into
        the schedule's micro-batches (DPO: whole pairs in each)."""
        return batch["input_ids"], batch["labels"]

    def pipeline_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What every stage takes beside the tokens (SFT: the packed rows' segments)."""
        return {}

    def pipeline_training_step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """One optimizer step under pipeline parallelism: the schedule's forward and backward passes over
        the step's micro-batches, the gradient norm clipped over all stages, then the optimizer and LR
        schedule. Returns the step's loss (every stage has it), or None for a dropped step."""
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        loss = self.pipeline_runner.train_step(*self.pipeline_rows(batch), **self.pipeline_inputs(batch))
        if self.nonfinite(loss):  # policy skip (stop raises): the step's gradients are dropped
            self.drop_step(optimizer, scheduler)
            return None
        if self.max_grad_norm:
            clip_grad_norm(self.model.parameters(), self.max_grad_norm, across=self.pipeline_runner.norm_across_stages)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        return loss

    def drop_step(self, optimizer, scheduler=None) -> None:
        """Skip this optimizer step (its loss was non-finite on some rank, policy skip), and count it. A
        module that optimizes by hand passes its scheduler: the step then still counts as one, as
        Lightning's automatic optimization counts it (the optimizer steps with no gradients, which leaves
        every parameter and its AdamW state as it is), so max_steps, the LR schedule and the data
        position stay those of the run without the bad step."""
        optimizer.zero_grad(set_to_none=True)
        if scheduler is not None:
            optimizer.step()
            scheduler.step()
        self._skip_this_step = False
        self.skipped_steps += 1
        self.log("train/skipped_nonfinite", float(self.skipped_steps), on_step=True)

    def total_steps(self) -> int:
        return max(1, int(self.trainer.estimated_stepping_batches))

    def configure_optimizers(self):
        fused = self.optim.fused
        if fused is None:
            fused = next(self.model.parameters()).device.type in ("cuda", "cpu")
        groups = parameter_groups(self.model, self.optim.weight_decay)
        if self.under_gemini:
            from moxin.colossalai_strategy import gemini_optimizer

            o = self.optim
            optimizer = gemini_optimizer(groups, o.lr, o.betas, o.eps, o.weight_decay)
        else:
            optimizer = torch.optim.AdamW(groups, lr=self.optim.lr, betas=self.optim.betas, eps=self.optim.eps,
                                          fused=fused)
        total, o = self.total_steps(), self.optim
        warmup = o.warmup_steps if o.warmup_ratio is None else round(o.warmup_ratio * total)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_multiplier(step, warmup, total, o.schedule, o.min_lr_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    @property
    def data_parallel_size(self) -> int:
        """Replicas that each take their own batches (a tensor-parallel group shares one)."""
        return data_parallel_rank(self.trainer)[1]

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        if self.parallel.tensor_parallel > 1 and gradient_clip_val:  # gradients on two meshes (clip_grad_norm)
            if gradient_clip_algorithm not in (None, "norm"):
                raise ValueError("under tensor parallelism gradients are clipped by norm only")
            clip_grad_norm(self.parameters(), gradient_clip_val)
            return
        self.clip_gradients(optimizer, gradient_clip_val=gradient_clip_val,
                            gradient_clip_algorithm=gradient_clip_algorithm)

    @property
    def under_gemini(self) -> bool:
        return self.parallel.strategy == "colossalai" and self.parallel.colossalai.plugin == "gemini"

    def head_loss(self, hidden: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Cross-entropy of the LM head over final hidden states (labels aligned with them). Chunked, the
        logits never held whole (linear_cross_entropy), except under Gemini: its chunks are gathered and
        its gradients reduced only for parameters that torch functions or module calls see, and the
        chunked loss's autograd.Function is neither; there the head module runs on each chunk, whose
        logits autograd keeps for the backward pass."""
        if self.under_gemini:
            return head_cross_entropy(hidden, self.model.output, labels, reduction)
        return linear_cross_entropy(hidden, self.model.output.weight, labels, reduction=reduction)

    def log_lr(self) -> None:
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], on_step=True, prog_bar=True)

    def nonfinite(self, loss: torch.Tensor) -> bool:
        """True when this micro-batch's loss is NaN/inf on any rank. Policy stop: raise, naming the
        step and the last good checkpoint. Policy skip: the caller trains on `zero_loss()` instead and
        the whole optimizer step (every micro-batch of it, on every rank) is dropped."""
        bad = torch.tensor(0.0 if torch.isfinite(loss.detach()).all() else 1.0, device=loss.device)
        if self.trainer.world_size > 1:  # every rank must take the same decision
            bad = self.trainer.strategy.reduce(bad, reduce_op="max")
        if not bad.item():
            return False
        if self.nonfinite_loss == "skip":
            self._skip_this_step = True
            return True
        last_good = getattr(self.trainer.checkpoint_callback, "best_model_path", "") or "none saved yet"
        raise NonFiniteLossError(
            f"training loss is {loss.item()} at step {self.global_step}; stopped instead of training on it. "
            f"Last good checkpoint: {last_good}. Resume from it (resume=auto) with a lower learning rate, "
            "or set phase.nonfinite_loss=skip to skip such steps")

    def zero_loss(self) -> torch.Tensor:
        """A loss of 0 that still reaches every parameter (zero gradients): the backward pass and
        gradient synchronisation run as usual, and nothing non-finite enters the gradients."""
        return sum(p.view(-1)[0] * 0.0 for p in self.parameters() if p.requires_grad)

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        if self.nonfinite_loss != "skip":
            return super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        if optimizer_closure is not None:
            optimizer_closure()  # the last micro-batch's forward and backward: it may be the bad one
        if getattr(self, "_skip_this_step", False):  # some micro-batch of this step was non-finite
            self.drop_step(optimizer)
            return
        optimizer.step()  # clipping and the other before-step hooks still run (Lightning's optimizer)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["tokens_seen"] = self.tokens_seen
        checkpoint["skipped_steps"] = self.skipped_steps
        checkpoint["rng"] = rng_state()
        checkpoint["tensor_parallel"] = self.parallel.tensor_parallel  # its parameters' names depend on it
        checkpoint["pipeline_parallel"] = self.parallel.pipeline_parallel  # (its optimizer's groups, per stage)
        checkpoint["loader_batches_per_step"] = self.trainer.accumulate_grad_batches  # (1 under the pipeline)

    def check_checkpoint_layout(self, checkpoint: dict, sharded: bool) -> None:
        """A checkpoint's parameter names follow its run's tensor parallelism (the fused projections as
        parts when > 1: moxin.parallel.SplitProjection). A sharded folder is translated as it loads
        (moxin.tp_checkpoint); a single file must have this run's layout, and cannot resume under
        pipeline parallelism, whose stages each load their part of a sharded folder."""
        from moxin.tp_checkpoint import splits_projections

        if not sharded and self.parallel.pipeline_parallel > 1:
            raise ValueError("a single-file checkpoint cannot resume under hardware.fsdp.pipeline_parallel (each "
                             "stage loads its part of a sharded folder); resume it without pipeline parallelism, "
                             "or start from its weights with phase.init_from")

        saved = checkpoint.get("tensor_parallel", 1)
        if not sharded and splits_projections(saved) != splits_projections(self.parallel.tensor_parallel):
            raise ValueError(f"this single-file checkpoint was trained with hardware.fsdp.tensor_parallel={saved}; "
                             f"this run has {self.parallel.tensor_parallel}. A file resumes only where both are 1 or "
                             "both above 1 (a sharded folder, hardware.fsdp.sharded_checkpoint=true, resumes at any "
                             "size); or load its weights with phase.init_from, which translates them")

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self._trainer is not None:  # (a checkpoint read outside a fit has no loops to restore)
            match_loop_progress(checkpoint, manual=not self.automatic_optimization,
                                batches_per_step=self._trainer.accumulate_grad_batches)
        self.tokens_seen = checkpoint.get("tokens_seen", 0)
        self.skipped_steps = checkpoint.get("skipped_steps", 0)
        # Restored at the first training batch, not now: Lightning draws from the global generators
        # while it rebuilds the data loaders after loading, which the uninterrupted run did not do.
        self._rng_to_restore = checkpoint.get("rng")

    def on_train_batch_start(self, batch, batch_idx) -> None:
        if getattr(self, "_rng_to_restore", None) is not None:
            set_rng_state(self._rng_to_restore)
            self._rng_to_restore = None


def match_loop_progress(checkpoint: dict, manual: bool, batches_per_step: int) -> None:
    """Translate the fit loop's counters of a checkpoint written in the other optimization mode (the
    pipeline's modules step by hand, the others through Lightning's automatic optimization), or with
    another number of loader batches per optimizer step (a pipeline batch holds a whole step), into this
    run's. Lightning reads the step count from the mode's own counter and ends the epoch after the
    batches it has not yet counted: untranslated, a resumed run would start again from an older step
    and replay or skip data. Lightning restores the loops after this hook, from this dictionary."""
    loop = checkpoint.get("loops", {}).get("fit_loop")
    if not loop:
        return
    automatic_key = "epoch_loop.automatic_optimization.optim_progress"
    manual_key = "epoch_loop.manual_optimization.optim_step_progress"
    # The loop saves both modes' counters, and a run advances only its own: the one with more steps is
    # the live one (a run resumed across the modes twice carries the other's stale count).
    manual_steps = loop.get(manual_key, {}).get("total", {}).get("completed", 0)
    automatic_steps = loop.get(automatic_key, {}).get("optimizer", {}).get("step", {}).get(
        "total", {}).get("completed", 0)
    if manual and automatic_steps > manual_steps:  # counters: {total, current} x {ready, completed}, alike
        loop[manual_key] = copy.deepcopy(loop[automatic_key]["optimizer"]["step"])
    elif not manual and manual_steps > automatic_steps:
        step = copy.deepcopy(loop[manual_key])
        loop[automatic_key]["optimizer"]["step"] = step
        loop[automatic_key]["optimizer"]["zero_grad"] = {
            part: {**counts, "started": counts["ready"]} for part, counts in copy.deepcopy(step).items()}
    # (A checkpoint from before this was recorded: counted in this run's batches, as it always was.)
    saved_batches = checkpoint.get("loader_batches_per_step", batches_per_step)
    if saved_batches != batches_per_step:  # the epoch's batches seen so far, in this run's batches
        for part in ("total", "current"):
            counts = loop["epoch_loop.batch_progress"][part]
            ready = counts["ready"] * batches_per_step // saved_batches
            loop["epoch_loop.batch_progress"][part] = {name: ready - (counts["ready"] - value)
                                                      for name, value in counts.items()}


def rng_state() -> dict:
    """Python's, NumPy's and torch's random states as tensors and ints (loadable with weights_only)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state = {"python": list(internal), "python_version": version, "python_gauss": gauss,
             "numpy": torch.from_numpy(keys.astype(np.int64)), "numpy_rest": [pos, has_gauss, cached],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    pos, has_gauss, cached = state["numpy_rest"]
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():  # resumed on fewer visible GPUs: the first ones
        for device, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, device)
