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
    """Memory the process can still take: Linux's MemAvailable, or less where a container's memory
    limit (cgroup v2 or v1) leaves less; None where neither is known."""
    candidates = [_meminfo_available(), _cgroup_headroom()]
    known = [value for value in candidates if value is not None]
    return min(known) if known else None


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # reported in kB
    except (OSError, ValueError, IndexError):
        pass
    return None


_CGROUP_FILES = (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),  # v2
                 ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"))


def _cgroup_headroom(files=_CGROUP_FILES) -> int | None:
    """The container's memory limit minus what it uses now; None without a limit."""
    for limit_file, usage_file in files:
        try:
            with open(limit_file) as f:
                limit = f.read().strip()
            with open(usage_file) as f:
                usage = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 2**60:  # "max" (v2) or a huge number (v1): no limit
            return max(int(limit) - usage, 0)
        return None
    return None
