"""Lightning callbacks shared by the phases."""

from __future__ import annotations

import time

import lightning as L

from moxin.data.datamodule import data_parallel_rank


class ThroughputMonitor(L.Callback):
    """Logs perf/tokens_per_s and perf/mfu over the last `window` training batches.

    A batch's time runs from the end of the previous batch to the end of this one, so data
    loading counts; intervals that contain validation or a checkpoint are not counted (the clock
    restarts after validation). On a GPU the timings are asynchronous per batch but right on
    average over the window, since the host cannot run ahead of the device for long.
    MFU = achieved training FLOP/s / (peak FLOP/s per device x devices), with `flops_per_token`
    from ModelConfig.flops_per_token and `peak_tflops` from the hardware config (None: no MFU).
    """

    def __init__(self, flops_per_token: float, peak_tflops: float | None, window: int = 20):
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_tflops * 1e12 if peak_tflops else None
        self.window = window
        self.history: list[tuple[float, int]] = []  # (seconds, tokens) per batch
        self._last: float | None = None

    def restart_clock(self, *args) -> None:
        self._last = time.perf_counter()

    on_train_start = on_validation_end = on_save_checkpoint = restart_clock

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if "input_ids" not in batch:
            return  # a batch of problems (GRPO): the module logs its own rollout and update times
        now = time.perf_counter()
        tokens = batch["input_ids"].numel() * data_parallel_rank(trainer)[1]  # tensor-parallel ranks share a batch
        if self._last is not None:
            self.history = (self.history + [(now - self._last, tokens)])[-self.window:]
        self._last = now
        if not self.history:
            return
        tokens_per_s = sum(t for _, t in self.history) / max(sum(s for s, _ in self.history), 1e-9)
        pl_module.log("perf/tokens_per_s", tokens_per_s, on_step=True, prog_bar=True)
        if self.peak_flops:
            pl_module.log("perf/mfu", self.mfu(tokens_per_s, trainer.world_size), on_step=True)

    def mfu(self, tokens_per_s: float, devices: int) -> float:
        return tokens_per_s * self.flops_per_token / (self.peak_flops * devices)
