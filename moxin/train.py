"""The edge between Hydra and moxin: configs become typed objects here and nowhere else.

`run(cfg)` dispatches on `cfg.task`; each task is a plain function `task(cfg) -> dict`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import logging
import os
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from moxin.callbacks import ThroughputMonitor
from moxin.chat import CHAT_TEMPLATE, chat_prompt
from moxin.checkpoint import SHARDED_META, is_sharded_checkpoint
from moxin.checkpoint_io import AtomicCheckpointIO
from moxin.curate.task import prepare_data_task
from moxin.data import DataConfig, PretrainDataModule
from moxin.data.chat_data import ChatDataConfig, chat_datamodule
from moxin.eval.callback import EvalCallback
from moxin.eval.commands import eval_data_task, evaluate_task, suite_from_config
from moxin.generate import generate
from moxin.interactive import chat_task, generate_task
from moxin.kernels import onednn_enabled, use_onednn_linears
from moxin.model import ModelConfig, Transformer
from moxin.modules import MODULES
from moxin.parallel import ParallelConfig, build_strategy, exportable_model, world_size
from moxin.quant_eval import quant_eval_task
from moxin.records import data_manifest, scalar_metrics, write_run_record
from moxin.release import release_task
from moxin.report import report_task
from moxin.system import configure_cpu
from moxin.tokenizer import load_tokenizer
from moxin.tracking import wandb_settings

if logging.getLogger().hasHandlers():
    # lightning/__init__ adds its own console handler; under Hydra (whose root handlers also write
    # the run's log file) that prints every message twice.
    logging.getLogger("lightning").handlers.clear()
# The modules that optimize by hand (GRPO, pipeline parallelism) checkpoint after their optimizer step,
# which is the state a resume continues from; Lightning warns about that at length.
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")


def run(cfg: DictConfig) -> dict:
    if cfg.get("recipe"):
        from moxin.recipe import run_recipe

        return run_recipe(cfg, run)
    task = cfg.get("task", "train")
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {sorted(TASKS)}")
    started = time.time()
    result = TASKS[task](cfg)
    if rank_zero_only.rank == 0 and cfg.paths.get("run_dir"):  # the run record: moxin/records.py
        metrics = result.get("metrics") if isinstance(result.get("metrics"), dict) else result
        write_run_record(cfg, Path(cfg.paths.run_dir), scalar_metrics(metrics), started,
                         extra=result.pop("record", None))
    return result


def model_config_for_context(model: ModelConfig, context: DictConfig) -> ModelConfig:
    """The context group may set rope_theta and sliding_window; null keeps the model's own."""
    changes = {key: context[key] for key in ("rope_theta", "sliding_window") if context.get(key) is not None}
    model = dataclasses.replace(model, **changes)
    if context.seq_len > model.max_seq_len:
        raise ValueError(f"context.seq_len {context.seq_len} exceeds model.max_seq_len {model.max_seq_len}")
    return model


def is_checkpoint(path: str) -> bool:
    """A checkpoint file, or a complete sharded checkpoint folder (its meta.pt is written last): a folder
    cut short by a kill lacks it and is skipped."""
    return os.path.isfile(path) or is_sharded_checkpoint(path)


def find_resume_checkpoint(resume: str | None, search_dir: str) -> str | None:
    """`null`: fresh start; `auto`: the newest checkpoint under search_dir (if any); else a path."""
    if resume in (None, "", "none"):
        return None
    if resume == "auto" and _in_multirun():
        raise ValueError("resume=auto is ambiguous in a multirun sweep (every job would take the same "
                         "checkpoint); give each job its checkpoint path, or resume jobs one by one")
    if resume != "auto":
        if not os.path.exists(resume):
            raise FileNotFoundError(f"resume={resume!r}: no such checkpoint file")
        if not is_checkpoint(resume):
            raise FileNotFoundError(f"resume={resume!r}: a folder without meta.pt is not a complete checkpoint")
        return resume
    found = [path for path in glob.glob(os.path.join(search_dir, "**", "*.ckpt"), recursive=True)
             if is_checkpoint(path)]
    return max(found, key=os.path.getmtime) if found else None


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def build_loggers(cfg: DictConfig, run_dir: Path) -> list:
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    loggers = []
    if cfg.logger.csv:
        loggers.append(CSVLogger(save_dir=str(run_dir), name="csv", version=""))
    wandb_kwargs = wandb_settings(cfg, run_dir)
    if wandb_kwargs is not None:
        loggers.append(WandbLogger(save_dir=str(run_dir), offline=wandb_kwargs["mode"] == "offline", **wandb_kwargs))
    return loggers


def parallel_config(hw: DictConfig) -> ParallelConfig:
    """The hardware option's strategy and memory/speed switches, typed."""
    options = {key: OmegaConf.to_container(hw[key], resolve=True) if OmegaConf.is_config(hw[key]) else hw[key]
               for key in ("strategy", "activation_checkpointing", "compile", "compile_backend", "fsdp", "colossalai")
               if key in hw}
    return ParallelConfig(**options)


def accumulation(cfg: DictConfig, processes: int) -> int:
    """phase.accumulate_grad_batches, or the count that makes phase.global_batch_tokens tokens per
    optimizer step from micro-batches of context.micro_batch_size x context.seq_len on every process."""
    target = cfg.phase.get("global_batch_tokens")
    if not target:
        return cfg.phase.accumulate_grad_batches
    per_micro_step = cfg.context.micro_batch_size * cfg.context.seq_len * processes
    if target % per_micro_step:
        raise ValueError(f"phase.global_batch_tokens={target} is not a multiple of the tokens of one micro-batch "
                         f"on every process ({cfg.context.micro_batch_size} x {cfg.context.seq_len} tokens x "
                         f"{processes} processes = {per_micro_step}); change it or context.micro_batch_size")
    return target // per_micro_step


def micro_batches_per_step(cfg: DictConfig, parallel: ParallelConfig) -> int:
    """The micro-batches of one optimizer step on each data-parallel replica (phase.accumulate_grad_batches,
    or what phase.global_batch_tokens makes of them)."""
    hw = cfg.hardware
    return accumulation(cfg, parallel.data_parallel(world_size(hw.accelerator, hw.devices, hw.num_nodes)))


def build_trainer(cfg: DictConfig, run_dir: Path, model_cfg: ModelConfig, callbacks: list,
                  max_epochs: int | None = None, parallel: ParallelConfig | None = None) -> L.Trainer:
    from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar

    phase, hw = cfg.phase, cfg.hardware
    parallel = parallel or parallel_config(hw)
    processes = world_size(hw.accelerator, hw.devices, hw.num_nodes)
    data_parallel = parallel.data_parallel(processes)  # tensor-parallel groups and pipelines share their batches
    if parallel.strategy == "fsdp":
        parallel.fsdp.replicas(data_parallel)  # a shard size that does not divide the ranks fails here, not later
    accumulate = accumulation(cfg, data_parallel)
    strategy, gradient_clip_val = build_strategy(parallel, processes, phase.gradient_clip_val, hw.precision)
    if parallel.pipeline_parallel > 1:  # a batch is a whole step's micro-batches; the module clips (use_pipeline)
        accumulate, gradient_clip_val = 1, None
    callbacks = [
        *callbacks,
        ThroughputMonitor(model_cfg.flops_per_token(cfg.context.seq_len), hw.peak_tflops),
        ModelCheckpoint(dirpath=str(run_dir / "checkpoints"), filename="step-{step}",
                        every_n_train_steps=phase.checkpoint_every_steps, save_top_k=phase.keep_checkpoints,
                        monitor="step", mode="max",  # "best" = newest: keep the last N
                        auto_insert_metric_name=False),
    ]
    if phase.get("keep_every_steps"):  # and every K-th step for good (e.g. intermediate releases)
        callbacks.append(ModelCheckpoint(dirpath=str(run_dir / "checkpoints" / "kept"), filename="step-{step}",
                                         every_n_train_steps=phase.keep_every_steps, save_top_k=-1,
                                         auto_insert_metric_name=False))
    if cfg.progress_bar:
        callbacks.append(RichProgressBar(leave=True))
    return L.Trainer(
        accelerator=hw.accelerator, devices=hw.devices, num_nodes=hw.num_nodes, strategy=strategy,
        precision=hw.precision, max_steps=phase.max_steps, max_epochs=max_epochs, accumulate_grad_batches=accumulate,
        gradient_clip_val=gradient_clip_val, val_check_interval=phase.val_every_steps * accumulate,
        check_val_every_n_epoch=None, limit_val_batches=phase.limit_val_batches, num_sanity_val_steps=0,
        log_every_n_steps=phase.log_every_steps, logger=build_loggers(cfg, run_dir) or False,
        callbacks=callbacks, enable_progress_bar=cfg.progress_bar, enable_model_summary=cfg.progress_bar,
        default_root_dir=str(run_dir), plugins=[AtomicCheckpointIO()],
        use_distributed_sampler=False,  # the data modules shard by rank themselves, in order (moxin/data/datamodule.py)
        # FSDP2 gathers weights into buffers it reuses in training: no inference tensors during validation.
        inference_mode=parallel.strategy not in ("fsdp", "colossalai"),
    )


def start_weights(init_from: str, read: bool = True) -> dict | None:
    """The weights a phase starts from (a checkpoint, a run folder or a Hugging Face folder), in fp32:
    training keeps fp32 weights whatever the file stores (bf16-mixed computes in bf16 from them).
    read=False (FSDP's ranks other than 0) only checks that init_from names something, so that a wrong
    path stops every rank, not rank 0 alone."""
    from moxin.checkpoint import load_model, resolve_model_path

    if init_from == "previous":
        raise ValueError("phase.init_from=previous names the previous stage of a recipe; outside a recipe "
                         "(python run.py +recipe=NAME) give a checkpoint, a run folder or a Hugging Face folder")
    if not read:
        resolve_model_path(init_from)
        return None
    return {name: tensor.float() if tensor.is_floating_point() else tensor
            for name, tensor in load_model(init_from).state_dict().items()}


def init_weights(module, init_from: str, state: dict | None) -> None:
    """Start from another run's weights (`state`, read by start_weights from init_from). Under FSDP the
    model is still on the meta device: rank 0 keeps them to broadcast (the other ranks get None)."""
    from moxin.hf import check_state_dict, load_state_dict_checked

    if module.parallel.strategy == "fsdp":
        if state is not None and holds_full_model(module.parallel):  # (DPO's cached reference: every rank)
            check_state_dict(module.model, state, source=init_from)
            module.initial_state = dict(state)
    else:
        load_state_dict_checked(module.model, dict(state), source=init_from)  # names a mismatched tensor
    print(f"Initialised the weights from {init_from}")


def holds_full_model(parallel: ParallelConfig) -> bool:
    """Whether this process builds the whole model: all of them, except under FSDP, where only rank 0
    does (the rank Lightning reads from the environment: RANK, LOCAL_RANK or SLURM_PROCID; before the
    processes start, the launching process is rank 0)."""
    return parallel.strategy != "fsdp" or rank_zero_only.rank == 0


def build_module(cfg: DictConfig, model_cfg: ModelConfig, data_cfg, parallel: ParallelConfig | None = None,
                 random_init: bool = True):
    """The phase's LightningModule, after checking that the data is the kind it trains on. Under FSDP
    its model is built on the meta device, and rank 0 alone draws the random starting weights (when the
    run starts from them), which it broadcasts once the model is sharded."""
    name = cfg.phase.module
    parallel = parallel or ParallelConfig()
    if name not in MODULES:
        raise ValueError(f"phase.module={name!r} is not one of {sorted(MODULES)}")
    module_class = MODULES[name]
    data_format = data_cfg.format if isinstance(data_cfg, ChatDataConfig) else "pretrain"
    if data_format != module_class.data_format:
        raise ValueError(f"phase.module={name} trains on {module_class.data_format} data, but the data option gives "
                         f"{data_format} data; pick a matching data option (see conf/data/)")
    if module_class.generates and parallel.strategy == "colossalai" and parallel.colossalai.plugin != "torch_ddp":
        raise ValueError(f"phase.module={name} optimizes by hand, several steps per rollout batch, which "
                         f"Colossal-AI's {parallel.colossalai.plugin} plugin cannot run (its backward passes would "
                         "skip the gradient partitioning); use hardware=colossalai_ddp, ddp or fsdp")
    if module_class.generates and parallel.strategy == "colossalai" and parallel.colossalai.options.get("static_graph"):
        raise ValueError(f"phase.module={name} optimizes by hand, for which DDP's static_graph would need the first "
                         "backward's all-reduce started by hand; leave hardware.colossalai.options.static_graph unset")
    if parallel.colossalai_tensor_parallel > 1:  # (the policy checks again when it splits the blocks)
        from moxin.colossalai_tp import check_divides

        check_divides(model_cfg, parallel.colossalai_tensor_parallel)
    options = {key: instantiate(cfg.phase[key]) for key in module_class.phase_options if key in cfg.phase}
    with torch.device("meta") if parallel.strategy == "fsdp" else contextlib.nullcontext():
        module = module_class(model_cfg, instantiate(cfg.phase.optimizer),
                              nonfinite_loss=cfg.phase.get("nonfinite_loss", "stop"), **options)
    module.parallel = parallel
    if parallel.strategy == "fsdp" and random_init and holds_full_model(parallel):
        module.initial_state = Transformer(model_cfg).state_dict()  # the draws one process would make
    return module


def eval_callbacks(cfg: DictConfig, tokenizer, run_dir: Path, parallel: ParallelConfig) -> list:
    """The `eval` suite every eval.every_n_steps optimizer steps (none when 0)."""
    suite, every_n_steps = suite_from_config(cfg.eval)
    # FSDP gathers the whole model on every rank for it (gathered_weights; under tensor parallelism rank
    # 0's group runs it together); Gemini's chunks, and Colossal-AI's tensor-parallel blocks, cannot run on one rank.
    gemini = parallel.strategy == "colossalai" and parallel.colossalai.plugin == "gemini"
    if every_n_steps > 0 and parallel.pipeline_parallel > 1:
        raise ValueError("eval.every_n_steps runs the whole model on rank 0, which holds one pipeline stage under "
                         "hardware.fsdp.pipeline_parallel; set eval.every_n_steps=0 and evaluate the saved "
                         "checkpoints (or the run's final/ folder) with task=evaluate")
    if every_n_steps > 0 and (gemini or parallel.colossalai_tensor_parallel > 1):
        which = "plugin=gemini" if gemini else "options.tp_size > 1"
        raise ValueError(f"eval.every_n_steps runs the model on rank 0 alone, which hardware.colossalai.{which} "
                         "cannot do (no rank holds the whole model); set eval.every_n_steps=0 and evaluate the "
                         "saved checkpoints with task=evaluate")
    return [EvalCallback(suite, every_n_steps, tokenizer, run_dir)] if every_n_steps > 0 else []


def check_checkpoint_kind(checkpoint: str, parallel: ParallelConfig) -> None:
    """A checkpoint folder resumes only under the strategy that wrote it (FSDP's distributed checkpoint, or
    Colossal-AI's Booster folder); its weights can start any run through phase.init_from."""
    if not is_sharded_checkpoint(checkpoint):
        return
    kind = "fsdp" if os.path.isfile(os.path.join(checkpoint, ".metadata")) else "colossalai"
    if parallel.strategy != kind:
        raise ValueError(f"{checkpoint} is a sharded checkpoint of hardware.strategy={kind}; resume it under that "
                         f"strategy (this run has {parallel.strategy}), or start from its weights with "
                         f"phase.init_from={checkpoint}")


def read_checkpoint_state(checkpoint: str, sharded: bool) -> dict:
    """A checkpoint's non-tensor state: a folder's meta.pt, or a file memory-mapped (its tensors are not
    read), or read whole where it is of the old non-zip format, which cannot be mapped."""
    if sharded:
        return torch.load(os.path.join(checkpoint, SHARDED_META), map_location="cpu", weights_only=True)
    try:
        return torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as error:
        if "mmap" not in str(error):
            raise
        return torch.load(checkpoint, map_location="cpu", weights_only=True)


def train(cfg: DictConfig) -> dict:
    run_dir = Path(cfg.paths.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    configure_cpu(cfg.hardware.get("tune_cpu_allocator", False), cfg.hardware.get("onednn_linears", False))

    model_cfg = model_config_for_context(instantiate(cfg.model), cfg.context)
    data_cfg: DataConfig = instantiate(cfg.data)
    if data_cfg.warning:
        logging.getLogger(__name__).warning("data mix: %s", data_cfg.warning)
        print(f"WARNING (data mix): {data_cfg.warning}")
    parallel = parallel_config(cfg.hardware)
    for folder in (run_dir, Path(cfg.paths.checkpoint_search_dir)):  # saves cut short by a kill
        for leftover in folder.glob("**/*.ckpt.*.tmp"):
            leftover.unlink(missing_ok=True)
    checkpoint = find_resume_checkpoint(cfg.resume, cfg.paths.checkpoint_search_dir)
    init_from = cfg.phase.get("init_from")
    module = build_module(cfg, model_cfg, data_cfg, parallel, random_init=checkpoint is None and not init_from)
    chat = isinstance(data_cfg, ChatDataConfig)
    datamodule = chat_datamodule(data_cfg) if chat else PretrainDataModule(data_cfg)
    callbacks = eval_callbacks(cfg, load_tokenizer(data_cfg.tokenizer), run_dir, parallel)
    # Post-training runs one pass over its data (data.epochs passes of it) unless max_steps stops it sooner.
    trainer = build_trainer(cfg, run_dir, model_cfg, callbacks=callbacks, max_epochs=1 if chat else None,
                            parallel=parallel)
    micro_batches = micro_batches_per_step(cfg, parallel)
    if parallel.pipeline_parallel > 1:  # each batch: one step's micro-batches, which the stages' schedule splits
        module.use_pipeline(micro_batches, cfg.phase.gradient_clip_val)
        datamodule.train_micro_batches = micro_batches
    if not chat and data_cfg.num_samples is None:  # the mix is sized to the run: one epoch = max_steps
        data_cfg.num_samples = (cfg.phase.max_steps * micro_batches * data_cfg.micro_batch_size
                                * parallel.data_parallel(trainer.world_size))

    needs_reference = hasattr(module, "set_reference")  # DPO: the starting weights, resumed or not
    # Under FSDP, rank 0 alone reads the starting weights (unless each rank needs them whole) and hands
    # each rank its shard once the model is sharded (moxin/parallel.py materialize).
    module.broadcast_initial_state = checkpoint is None
    reads_weights = holds_full_model(parallel) or module.start_weights_on_every_rank()
    if init_from and (checkpoint is None or needs_reference):
        state = start_weights(init_from, read=reads_weights)
        if checkpoint is None:
            init_weights(module, init_from, state)  # weights only: optimizer and schedule start fresh
        if needs_reference:
            module.set_reference(state)
        del state
    elif needs_reference:
        raise ValueError(f"phase.module={cfg.phase.module} needs phase.init_from: the model it starts from, which "
                         "is also its reference (e.g. the SFT run's folder)")
    if onednn_enabled():
        use_onednn_linears(module)  # the policy and, for DPO, its reference
    metrics: dict = {}
    if checkpoint is None and cfg.phase.validate_before_training:
        initial = trainer.validate(module, datamodule=datamodule, verbose=False)
        metrics.update({f"{name}_initial": float(value) for name, value in initial[0].items()})
    elif checkpoint is not None:
        print(f"Resuming from {checkpoint}")
        check_checkpoint_kind(checkpoint, parallel)
        # Before the weights load (no hook of Lightning's comes earlier).
        sharded = is_sharded_checkpoint(checkpoint)
        module.check_checkpoint_layout(read_checkpoint_state(checkpoint, sharded), sharded)
    trainer.fit(module, datamodule=datamodule, ckpt_path=checkpoint, weights_only=True)
    final = dict(trainer.callback_metrics)
    if cfg.phase.limit_val_batches and trainer.global_step % cfg.phase.val_every_steps:
        trainer.validate(module, datamodule=datamodule, verbose=False)  # the final metrics are the final model's
        final.update(trainer.callback_metrics)
    trainer.save_checkpoint(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    if trainer.is_global_zero:
        with open(run_dir / "data.json", "w") as f:
            json.dump(datamodule.summary, f, indent=2, default=str)
    for logger in trainer.loggers:  # a recipe runs stages in one process: each stage gets its own W&B run
        if type(logger).__name__ == "WandbLogger":
            # What is known only now, for the report's W&B path: the data manifest's hash.
            logger.experiment.config.update({"moxin": {**logger.experiment.config["moxin"],
                                                       "data_manifest": data_manifest(cfg, run_dir)}},
                                            allow_val_change=True)
            logger.experiment.finish()  # before the run's report, which then stays the last thing printed

    metrics.update({k: float(v) for k, v in final.items() if v.numel() == 1})
    metrics["train/steps"] = float(trainer.global_step)
    metrics["train/tokens"] = module.tokens_seen  # exact; the logged value is a float32
    metrics["run_dir"] = str(run_dir)
    final_dir = run_dir / "final"
    model = exportable_model(trainer, module.model)  # gathered from every rank's shard where sharded
    if trainer.is_global_zero:  # one copy of the outputs, written by rank 0
        model.save_hf(str(final_dir))
        save_tokenizer(datamodule.tokenizer, final_dir, chat_template=CHAT_TEMPLATE if chat else None)
        metrics["sample"] = sample_text(model, datamodule.tokenizer, cfg.sample, chat=chat)
        with open(run_dir / "metrics.json", "w") as f:
            json.dump(metrics, f, indent=2)
        report(metrics, run_dir, final_dir)
    return metrics


def save_tokenizer(tokenizer, folder: Path, chat_template: str | None = None) -> None:
    """The tokenizer beside the weights; a chat model's carries its chat template (the shared tokenizer
    object is left as it is)."""
    if chat_template is not None and not getattr(tokenizer, "chat_template", None):
        import copy

        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(str(folder))


def sample_text(model, tokenizer, sample_cfg: DictConfig, chat: bool = False) -> str:
    """A continuation of sample.prompt; for a chat model, its reply to sample.prompt as a user turn."""
    if chat:
        prompt = chat_prompt(tokenizer, [{"role": "user", "content": sample_cfg.prompt}])
    else:
        prompt = [tokenizer.bos_token_id] + tokenizer.encode(sample_cfg.prompt, add_special_tokens=False)
    out = generate(model, [prompt], max_new_tokens=sample_cfg.max_new_tokens,
                   temperature=sample_cfg.temperature, top_k=sample_cfg.top_k,
                   stop=[tokenizer.eos_token_id], seed=sample_cfg.seed)
    # Decode prompt and continuation together: SentencePiece drops a leading space when a
    # continuation is decoded on its own.
    return tokenizer.decode(prompt + out.tokens[0], skip_special_tokens=True)


def report(metrics: dict, run_dir: Path, final_dir: Path) -> None:
    from rich.console import Console
    from rich.panel import Panel

    console = Console()
    losses = "  ".join(f"{k} {metrics[k]:.3f}" for k in ("val/loss_initial", "val/loss", "train/loss")
                       if k in metrics)
    console.print(Panel(metrics["sample"], title="sample from the trained model", expand=False))
    console.print(f"{losses}\nrun folder: {run_dir}\nHugging Face weights: {final_dir}\n"
                  f"checkpoints: {run_dir / 'checkpoints'}\nmetrics: {run_dir / 'metrics.json'}")


TASKS = {"train": train, "generate": generate_task, "chat": chat_task, "evaluate": evaluate_task,
         "eval_data": eval_data_task, "prepare_data": prepare_data_task, "report": report_task,
         "quant_eval": quant_eval_task, "release": release_task}

