"""Lightning callbacks shared by the phases."""

from __future__ import annotations

import time

import lightning as L


class ThroughputMonitor(L.Callback):
    """Logs perf/tokens_per_s and perf/mfu, averaged over the last `window` batches.

    MFU = achieved training FLOP/s / (peak FLOP/s per device x devices). `flops_per_token` comes
    from ModelConfig.flops_per_token; `peak_tflops` from the hardware config (None: no MFU).
    """

    def __init__(self, flops_per_token: float, peak_tflops: float | None, window: int = 20):
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_tflops * 1e12 if peak_tflops else None
        self.window = window
        self._history: list[tuple[float, int]] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        tokens = batch["input_ids"].numel() * trainer.world_size
        self._history = (self._history + [(time.perf_counter() - self._start, tokens)])[-self.window:]
        seconds = sum(s for s, _ in self._history)
        tokens_per_s = sum(t for _, t in self._history) / max(seconds, 1e-9)
        pl_module.log("perf/tokens_per_s", tokens_per_s, on_step=True, prog_bar=True)
        if self.peak_flops:
            mfu = tokens_per_s * self.flops_per_token / (self.peak_flops * trainer.world_size)
            pl_module.log("perf/mfu", mfu, on_step=True)
