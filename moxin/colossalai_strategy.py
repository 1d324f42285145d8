"""Colossal-AI (the framework Moxin-7B was trained with) as a Lightning strategy: its `Booster` wraps the
LightningModule and the optimizer with the configured plugin, runs the backward pass and the optimizer
step, and saves and loads checkpoints.

Colossal-AI is an optional extra (`make install-colossalai`): version 0.5.0 pins torch <= 2.5.1, so it
is installed with --no-deps next to the torch we use. On a CPU its TorchDDPPlugin and HybridParallelPlugin
(data and tensor parallel: moxin/colossalai_tp.py) run; LowLevelZeroPlugin (ZeRO-1/2) and GeminiPlugin need
CUDA.

A checkpoint is a folder `<name>.ckpt/`: `model/` and `optimizer/` written by the booster (each rank its
shard where the plugin shards), and `meta.pt`, the rest of Lightning's checkpoint (loops, schedulers,
the module's own state), written by rank 0. A frozen reference policy (DPO, GRPO) is left out of `model/`
(but under Gemini, whose chunks hold it): it is rebuilt from the starting weights on resume.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.core.optimizer import LightningOptimizer, do_nothing_closure
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies.ddp import _DDPForwardRedirection
from lightning.pytorch.trainer.states import TrainerFn

from moxin.colossalai_tp import (
    check_split,
    moxin_policy,
    norm_counts_fused_parts_once,
    optimizer_states_in_the_weights_order,
    run_on_cpu,
)

PLUGINS = {"torch_ddp": "TorchDDPPlugin", "low_level_zero": "LowLevelZeroPlugin", "gemini": "GeminiPlugin",
           "hybrid_parallel": "HybridParallelPlugin"}
INSTALL_HINT = ("Colossal-AI is an optional extra: `make install-colossalai` (pip install --no-deps "
                "colossalai==0.5.0 plus the modules it imports)")
META_FILE = "meta.pt"
PLUGIN_KEY = "colossalai_plugin"  # in meta.pt: the plugin that wrote the folder
REFERENCE = "reference"  # the frozen reference policy's submodule (moxin/modules/reference.py)


def clips_in_optimizer(plugin: str) -> bool:
    """Plugins whose optimizers clip gradients themselves (their max_norm option)."""
    return plugin in ("low_level_zero", "gemini", "hybrid_parallel")


def colossalai_available() -> bool:
    try:
        import colossalai.booster  # noqa: F401
    except ImportError:
        return False
    return True


# HybridParallelPlugin options read only by Colossal-AI's own model policies (and their layers).
UNUSED_BY_THE_POLICY = ("enable_all_optimization", "enable_flash_attention", "enable_fused_normalization",
                        "enable_jit_fused", "gradient_checkpoint_config", "parallel_output")


def check_hybrid_options(options: dict) -> None:
    """HybridParallelPlugin's options that the moxin model supports: tensor parallelism (tp_size), data
    parallelism with ZeRO (zero_stage); not the plugin's pipeline or sequence parallelism."""
    tp = options.get("tp_size", 1)
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise ValueError(f"hardware.colossalai.options.tp_size={tp!r} must be a whole number >= 1")
    if options.get("pp_size", 1) != 1:
        raise ValueError(f"hardware.colossalai.options.pp_size={options['pp_size']}: the moxin model has no "
                         "Colossal-AI pipeline stages; keep pp_size=1, or use moxin's pipeline (hardware=fsdp with "
                         "hardware.fsdp.pipeline_parallel)")
    if options.get("sp_size") not in (None, 1) or options.get("enable_sequence_parallelism"):
        raise ValueError("hardware.colossalai.options: the moxin model does not split sequences (sp_size, "
                         "enable_sequence_parallelism); leave them unset")
    ignored = sorted(name for name in UNUSED_BY_THE_POLICY if options.get(name))
    if ignored:
        raise ValueError(f"hardware.colossalai.options: {', '.join(ignored)} would do nothing: they configure "
                         "Colossal-AI's policies for Hugging Face models, not moxin's. moxin's own switches: "
                         "hardware.activation_checkpointing and hardware.compile (attention already runs "
                         "PyTorch's fused SDPA kernels)")


def make_plugin(name: str, options: dict):
    if name not in PLUGINS:
        raise ValueError(f"hardware.colossalai.plugin={name!r} is not one of {sorted(PLUGINS)}")
    try:
        from colossalai.booster import plugin as plugins
    except ImportError as error:
        raise ImportError(f"hardware.strategy=colossalai needs colossalai ({error}). {INSTALL_HINT}") from None
    options = dict(options)
    if name == "hybrid_parallel":
        check_hybrid_options(options)
        options.setdefault("tp_size", 1)
        options.setdefault("pp_size", 1)
        options["custom_policy"] = moxin_policy()  # tensor parallelism over tp_size ranks, or none
        norm_counts_fused_parts_once()
        optimizer_states_in_the_weights_order()
    return getattr(plugins, PLUGINS[name])(**options)


def gemini_optimizer(param_groups: list[dict], lr: float, betas, eps: float, weight_decay: float):
    """Gemini steps only Colossal-AI's own Adam kernels: HybridAdam in AdamW mode (decoupled weight
    decay), on the GPU or the CPU wherever Gemini placed each chunk."""
    from colossalai.nn.optimizer import HybridAdam

    return HybridAdam(param_groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, adamw_mode=True)


def steps_beside_their_weights(optimizer) -> None:
    """Put each parameter's AdamW step count on the parameter's device where the optimizer is fused
    (or capturable), which requires it there: Colossal-AI's ZeRO and hybrid loaders restore it on the
    CPU, and the resumed run's first step failed. `optimizer`: Lightning's, the booster's wrapper or
    ZeRO's, each holding the next in `.optim` (or `._optimizer`)."""
    while not isinstance(optimizer, torch.optim.Optimizer):
        inner = getattr(optimizer, "optim", None) or getattr(optimizer, "_optimizer", None)
        if inner is None:
            return
        optimizer = inner
    for group in optimizer.param_groups:
        if not (group.get("fused") or group.get("capturable")):
            continue
        for param in group["params"]:
            step = optimizer.state.get(param, {}).get("step")
            if torch.is_tensor(step) and step.device != param.device:
                optimizer.state[param]["step"] = step.to(param.device)


def saved_model_keys(folder: Path) -> set[str]:
    """The parameter names a booster's sharded model folder holds (from its index file)."""
    indexes = sorted(folder.glob("*.index.json"))
    if not indexes:
        raise FileNotFoundError(f"{folder} holds no *.index.json: not a model folder the Colossal-AI booster wrote")
    with open(indexes[0]) as f:
        return set(json.load(f)["weight_map"])


class ColossalAIPrecision(Precision):
    """The plugin does mixed precision itself (its `precision` option); here the optimizer step runs the
    closure (forward, backward, clipping hooks) first, since Colossal-AI optimizers take no closure."""

    def optimizer_step(self, optimizer, model, closure, **kwargs):
        closure_result = self._wrap_closure(model, optimizer, closure)
        # training_step returned None: Lightning's convention to skip the step. (A module stepping by
        # hand, e.g. phase.nonfinite_loss=skip, passes no closure: then it has run its own already.)
        if closure_result is None and closure is not do_nothing_closure and getattr(model, "automatic_optimization",
                                                                                    False):
            return None
        return optimizer.step(**kwargs)

    def clip_grad_by_norm(self, optimizer, clip_val) -> None:
        optimizer.clip_grad_by_norm(clip_val)  # the booster's optimizer wrapper knows its parameters


class _WrapperOfBoostedOptimizer(LightningOptimizer):
    """Lightning's optimizer wrapper, whose class derives from the wrapped optimizer's. ZeRO's optimizer
    removes its gradient hooks in __del__, so a discarded wrapper ran that on the live optimizer's hooks:
    from then on no gradient reached its partitions and every step left the weights as they were."""

    def __del__(self) -> None:
        pass  # the wrapped optimizer cleans up after itself, when it is deleted


class _BoostedDDPForwardRedirection(_DDPForwardRedirection):
    """Lightning's handling of manual optimization under DDP (no gradient synchronisation armed by the
    forward that runs training_step; each manual backward arms its own), for the DistributedDataParallel
    inside the TorchDDPPlugin's wrapper."""

    def on_after_inner_forward(self, wrapper_module, original_module) -> None:
        super().on_after_inner_forward(getattr(wrapper_module, "module", wrapper_module), original_module)

    def on_after_outer_forward(self, wrapper_module, original_module) -> None:
        super().on_after_outer_forward(getattr(wrapper_module, "module", wrapper_module), original_module)


class ColossalAIStrategy(DDPStrategy):
    """Processes, ranks and collectives as DDP; the model and optimizer wrapping, backward, step and
    checkpoints through Colossal-AI's Booster."""

    strategy_name = "colossalai"

    def __init__(self, plugin: str = "torch_ddp", plugin_options: dict | None = None, **kwargs):
        if not colossalai_available():
            raise ImportError(f"hardware.strategy=colossalai needs colossalai. {INSTALL_HINT}")
        if plugin not in PLUGINS:
            raise ValueError(f"hardware.colossalai.plugin={plugin!r} is not one of {sorted(PLUGINS)}")
        super().__init__(precision_plugin=ColossalAIPrecision(), **kwargs)
        self._forward_redirection = _BoostedDDPForwardRedirection()
        self.plugin_name = plugin
        self.plugin_options = dict(plugin_options or {})
        self.booster = None
        self._boosted = None  # the boosted module: Lightning re-connects the plain one at every fit/validate

    @property
    def tensor_parallel(self) -> int:
        """Ranks that split each block (HybridParallelPlugin's tp_size) and share their batches (what
        ParallelConfig.colossalai_tensor_parallel reads from the config, before the strategy exists)."""
        return self.plugin_options.get("tp_size", 1) if self.plugin_name == "hybrid_parallel" else 1

    @property
    def distributed_sampler_kwargs(self) -> dict:
        # The plugin's process mesh is (data, pipeline, tensor): a tensor-parallel group is tp consecutive
        # ranks, one data-parallel replica.
        kwargs = super().distributed_sampler_kwargs
        return {"num_replicas": kwargs["num_replicas"] // self.tensor_parallel,
                "rank": kwargs["rank"] // self.tensor_parallel}

    @property
    def optimizers(self) -> list:
        return self._optimizers

    @optimizers.setter
    def optimizers(self, optimizers: list) -> None:
        self._optimizers = optimizers
        self._lightning_optimizers = [_WrapperOfBoostedOptimizer._to_lightning_optimizer(o, self) for o in optimizers]

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True  # the booster loads into the boosted model and optimizer

    @property
    def lightning_restore_optimizer(self) -> bool:
        return False  # load_checkpoint restored the optimizer already

    def setup(self, trainer) -> None:
        from colossalai.booster import Booster

        self.accelerator.setup(trainer)
        self.model_to_device()
        if self.root_device.type == "cpu":
            run_on_cpu()
        if trainer.state.fn == TrainerFn.FITTING and self._boosted is None:
            if not self.lightning_module.automatic_optimization and self.plugin_name != "torch_ddp":
                # Its backward passes run inside the wrapped module's forward: only plain DDP's gradient
                # synchronisation can be prepared for each of them (pre_backward), not ZeRO's partitions.
                raise ValueError(f"{type(self.lightning_module).__name__} optimizes by hand (GRPO), which the "
                                 f"Colossal-AI plugin {self.plugin_name} does not support; use "
                                 "hardware=colossalai_ddp, ddp or fsdp")
            self.setup_optimizers(trainer)
            if len(self.optimizers) != 1:
                raise ValueError("the Colossal-AI strategy boosts one optimizer; the module configured "
                                 f"{len(self.optimizers)}")
            self.booster = Booster(plugin=make_plugin(self.plugin_name, self.plugin_options))
            self._boosted, optimizer, *_ = self.booster.boost(self.model, self.optimizers[0])
            if self.tensor_parallel > 1:
                check_split(self.lightning_module, self.tensor_parallel)
            # The LR scheduler keeps driving the optimizer it was built on: the wrapper shares its param_groups.
            self.optimizers = [optimizer]
        if self._boosted is not None:  # after fit (a final validation, the last save): still the boosted one
            self.model = self._boosted
        self.setup_precision_plugin()

    def pre_backward(self, closure_loss: torch.Tensor) -> None:
        """Manual optimization (GRPO) runs its backward passes inside the module's forward: arm the
        TorchDDPPlugin's DistributedDataParallel for each, as Lightning's DDP strategy does."""
        ddp = getattr(self.model, "module", None)
        manual = not self.lightning_module.automatic_optimization
        if manual and isinstance(ddp, torch.nn.parallel.DistributedDataParallel):
            from lightning.pytorch.overrides.distributed import prepare_for_backward

            prepare_for_backward(ddp, closure_loss)

    def backward(self, closure_loss: torch.Tensor, optimizer, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.pre_backward(closure_loss)
        closure_loss = self.precision_plugin.pre_backward(closure_loss, self.lightning_module)
        self.booster.backward(closure_loss, self.optimizers[0])  # loss scaling and gradient partitioning
        closure_loss = self.precision_plugin.post_backward(closure_loss, self.lightning_module)
        self.post_backward(closure_loss)
        return closure_loss

    @contextmanager
    def block_backward_sync(self):
        """No gradient all-reduce on the micro-batches before the last of an accumulated step (where the
        plugin can: not ZeRO-2, whose gradient partitions are reduced as they are produced)."""
        zero2 = self.plugin_options.get("zero_stage", self.plugin_options.get("stage")) == 2
        if self.booster is not None and self.booster.plugin.support_no_sync() and not zero2:
            with self.booster.no_sync(self.model, self.optimizers[0]):
                yield None
        else:
            yield None

    def teardown(self) -> None:
        # Not Lightning's: it moves the module and optimizer states to the CPU, under the plugin's feet
        # (its chunks, working weights and partitions); the last save and the export still use them.
        if self.cluster_environment is not None:
            self.cluster_environment.teardown()
        self.precision_plugin.teardown()
        self.accelerator.teardown()
        self.checkpoint_io.teardown()

    # --- checkpoints ---

    @contextmanager
    def _without_reference(self, saved_keys: set[str] | None = None):
        """The booster saves (and loads) the module's whole state dict: hide the frozen reference from it,
        which the module rebuilds from its starting weights. Not under Gemini, whose chunks name every
        parameter; nor when loading a folder that holds the reference (written before it was left out)."""
        module = self.lightning_module
        holds_reference = saved_keys is not None and any(k.startswith(f"{REFERENCE}.") for k in saved_keys)
        if self.plugin_name == "gemini" or holds_reference or module._modules.get(REFERENCE) is None:
            yield
            return
        reference = module._modules.pop(REFERENCE)
        try:
            yield
        finally:
            module._modules[REFERENCE] = reference

    def lightning_module_state_dict(self) -> dict:
        return {}  # the booster writes the model; see save_checkpoint

    def optimizer_state(self, optimizer) -> dict:
        return {}  # the booster writes the optimizer, each rank its partition (no gathering of ZeRO states)

    def save_checkpoint(self, checkpoint: dict, filepath, storage_options: Any = None) -> None:
        path = Path(self.broadcast(str(filepath)))
        if self.is_global_zero:
            if path.is_file():
                path.unlink()
            (path / META_FILE).unlink(missing_ok=True)  # incomplete until the new meta.pt is written
            path.mkdir(parents=True, exist_ok=True)
        self.barrier("colossalai_checkpoint_folder")
        checkpoint.pop("state_dict", None)
        checkpoint.pop("optimizer_states", None)
        with self._without_reference():
            self.booster.save_model(self._boosted, str(path / "model"), shard=True)
        self.booster.save_optimizer(self.optimizers[0], str(path / "optimizer"), shard=True)
        if self.is_global_zero:
            checkpoint[PLUGIN_KEY] = self.plugin_name
            temporary = path / f"{META_FILE}.tmp"
            torch.save(checkpoint, temporary)
            os.replace(temporary, path / META_FILE)  # written last: its presence marks a complete checkpoint
        self.barrier("colossalai_checkpoint_saved")

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict:
        path = Path(self.broadcast(str(checkpoint_path)))
        if not (path / META_FILE).is_file():
            raise FileNotFoundError(f"{path} is not a Colossal-AI checkpoint of this strategy (no {META_FILE})")
        checkpoint = torch.load(path / META_FILE, map_location="cpu", weights_only=True)
        written_by = checkpoint.get(PLUGIN_KEY, self.plugin_name)  # (older folders do not say)
        if written_by != self.plugin_name:  # their optimizer states (and Gemini's model) are laid out otherwise
            raise ValueError(f"{path} was saved under the Colossal-AI plugin {written_by}, and this run has "
                             f"{self.plugin_name}: resume it under hardware.colossalai.plugin={written_by}, or "
                             f"start from its weights with phase.init_from={path}")
        with self._without_reference(saved_model_keys(path / "model")):
            self.booster.load_model(self._boosted, str(path / "model"))
        self.booster.load_optimizer(self.optimizers[0], str(path / "optimizer"))
        steps_beside_their_weights(self.optimizers[0])
        checkpoint["state_dict"] = {}  # the weights are in place already
        return checkpoint

    def load_model_state_dict(self, checkpoint, strict: bool = True) -> None:
        pass  # load_checkpoint loaded the weights through the booster

    def remove_checkpoint(self, filepath) -> None:
        if self.is_global_zero:
            shutil.rmtree(filepath, ignore_errors=True)

    def full_model_state_dict(self) -> dict:
        """The Transformer's whole state dict on rank 0 (collective under Gemini, whose chunks hold it, and
        under tensor parallelism, whose ranks hold parts of each block)."""
        if hasattr(self._boosted, "_force_wait_all_gather"):  # ZeRO's overlapped all-gathers of the weights
            self._boosted._force_wait_all_gather()
        if self.plugin_name == "gemini" and self._boosted is not None:
            state = self._boosted.state_dict(only_rank_0=True)
        elif self.tensor_parallel > 1:
            from colossalai.checkpoint_io.utils import gather_distributed_param

            state = {}
            for name, tensor in self.lightning_module.state_dict(keep_vars=True).items():
                if name.startswith("model."):  # (every rank gathers the same ones, in order)
                    whole = gather_distributed_param(tensor)
                    if self.is_global_zero:  # one whole model, in CPU memory
                        state[name] = whole.cpu()
        else:
            state = self.lightning_module.state_dict()
        return {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
