"""Evaluate the model being trained on a suite every N optimizer steps."""

from __future__ import annotations

import tempfile
from contextlib import contextmanager
from pathlib import Path

import lightning as L

from moxin.data.datamodule import data_parallel_rank
from moxin.eval.runner import print_table, run_suite, summary_metrics, wandb_table, write_results
from moxin.eval.suites import EvalSuite
from moxin.modules.base import rng_state, set_rng_state
from moxin.parallel import gathered_weights


class EvalCallback(L.Callback):
    """Runs `suite` through lm-eval on the live model at steps N, 2N, ... (rank 0; others wait).

    Each evaluation writes <run_dir>/eval/step-<step>/results.json, logs eval/<suite>/<column>
    to every logger at that step, and a table of all evaluations so far to W&B.

    Multi-GPU: the other ranks wait at a barrier, so a suite must finish within the process
    group's timeout (30 minutes by default); keep in-training suites small (eval.limit). Under FSDP
    every rank gathers the whole model for the evaluation (moxin.parallel.gathered_weights), so rank 0
    runs it alone, in FSDP's compute dtype. Under tensor parallelism rank 0's whole tensor-parallel
    group (data-parallel rank 0) runs the same requests in step, each rank computing its heads; rank 0
    alone writes and logs the results.
    """

    def __init__(self, suite: EvalSuite, every_n_steps: int, tokenizer, run_dir: str | Path):
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.suite, self.every_n_steps, self.tokenizer = suite, every_n_steps, tokenizer
        self.run_dir = Path(run_dir)
        self.history: list[tuple[str, dict[str, float]]] = []  # (label, paper row) per evaluation
        self._last_step = -1

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        # With gradient accumulation this hook runs once per micro-batch: evaluate once per step.
        if step == 0 or step % self.every_n_steps or step == self._last_step:
            return
        self._last_step = step
        with gathered_weights(pl_module.model):
            if data_parallel_rank(trainer)[0] == 0:  # rank 0 (and its tensor-parallel peers)
                with preserved_rng_state():  # lm-eval reseeds every generator; training's streams go on
                    if trainer.is_global_zero:
                        self._evaluate(trainer, pl_module, step)
                    else:  # a tensor-parallel peer: the same forward passes, its results unused
                        with tempfile.TemporaryDirectory() as work_dir:
                            run_suite(self._lm(pl_module), self.suite, work_dir, reports=False)
            trainer.strategy.barrier("moxin_eval")

    def _lm(self, pl_module: L.LightningModule):
        from moxin.eval.lm import MoxinLM

        return MoxinLM(model=pl_module.model, tokenizer=self.tokenizer, batch_size=self.suite.batch_size,
                       max_length=self.suite.max_length, max_gen_toks=self.suite.max_gen_toks)

    def _evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        out_dir = self.run_dir / "eval" / f"step-{step}"
        results = run_suite(self._lm(pl_module), self.suite, out_dir)
        row = results["paper_row"]
        label = f"step {step}"
        write_results(results, self.suite, out_dir / "results.json", label)
        print_table(row, self.suite, label)
        self.history.append((label, row))
        for logger in trainer.loggers:
            logger.log_metrics(summary_metrics(row, self.suite), step=step)
            if type(logger).__name__ == "WandbLogger":
                logger.experiment.log({f"eval/{self.suite.name}/table": wandb_table(self.history)}, step=step)


@contextmanager
def preserved_rng_state():
    """Restore Python's, NumPy's and torch's (CPU and CUDA) random states after the block."""
    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)
