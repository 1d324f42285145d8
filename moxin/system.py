"""Process-level settings for training on the CPU."""

from __future__ import annotations

import ctypes
import sys

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameter numbers in glibc's malloc.h
_LARGEST = 2**31 - 1


def configure_cpu(tune_allocator: bool, onednn_linears: bool) -> None:
    """The process-level CPU settings of the hardware group, for every task that runs the model."""
    from moxin.kernels import use_onednn_on_cpu

    if tune_allocator:
        keep_freed_memory_for_reuse()
    use_onednn_on_cpu(onednn_linears)


def keep_freed_memory_for_reuse() -> bool:
    """Make glibc keep large freed blocks in the heap instead of returning them to the kernel.

    By default glibc serves every allocation above 32 MB with a fresh mmap and unmaps it on free,
    so the next one page-faults and zero-fills its memory again. CPU training allocates logits of
    hundreds of MB (tokens x vocab) several times a step; keeping them for reuse made the tiny
    model train about 1.5x faster on 2 cores. The cost: the process keeps its peak memory.
    Returns False where this does not apply (not Linux with glibc).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False  # not glibc (e.g. musl)
    return bool(mallopt(_M_MMAP_THRESHOLD, _LARGEST)) and bool(mallopt(_M_TRIM_THRESHOLD, _LARGEST))


def inference_device(accelerator: str) -> str:
    """`cuda` when the hardware group asks for a GPU and one is there, else `cpu`."""
    import torch

    return "cuda" if accelerator == "gpu" and torch.cuda.is_available() else "cpu"


def available_memory_bytes() -> int | None:
    """Memory the process can still take without swapping (Linux's MemAvailable); None where unknown."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # reported in kB
    except OSError:
        pass
    return None
