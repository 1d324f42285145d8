"""run.py with Colossal-AI's ZeRO-2 (LowLevelZeroPlugin) on the CPU, for the suite: one process.

Its optimizer keeps CUDA streams for overlapping gradient reduction with the backward pass, and
refuses a CPU. In one process on the CPU, work runs in order anyway, so the streams become no-ops
here and the CPU check is lifted. Everything else runs as on a GPU:
- the bf16 working weights and fp32 master weights;
- the gradient buckets and partitions;
- the sharded optimizer checkpoints;
- the strategy's hooks around them.
A GPU showed what this leaves out of the CPU suite otherwise: under Lightning ZeRO-2 trained
nothing (tests/test_parallel.py).

    python tests/zero2_on_cpu.py <run.py's overrides>
"""

from __future__ import annotations

import contextlib
import runpy
import sys

import torch


class _NoStream:
    def wait_stream(self, *args, **kwargs) -> None:
        pass

    def synchronize(self) -> None:
        pass


def run_streams_in_order() -> None:
    from colossalai.accelerator import cpu_accelerator
    from colossalai.zero.low_level.low_level_optim import LowLevelZeroOptimizer

    accelerator = cpu_accelerator.CpuAccelerator
    accelerator.Stream = lambda self, *args, **kwargs: _NoStream()
    accelerator.current_stream = lambda self, *args, **kwargs: _NoStream()
    accelerator.stream = lambda self, stream=None: contextlib.nullcontext()
    accelerator.synchronize = lambda self, *args, **kwargs: None
    LowLevelZeroOptimizer._sanity_checks = lambda self: None  # (it asserts a CUDA or NPU device)
    torch.Tensor.record_stream = lambda self, stream: None  # (this process only)


if __name__ == "__main__":
    run_streams_in_order()
    sys.argv = ["run.py", *sys.argv[1:]]
    runpy.run_path("run.py", run_name="__main__")
