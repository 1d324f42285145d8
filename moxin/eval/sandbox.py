"""Run model-written code (HumanEval) in a separate, limited process.

Each program runs in a fresh `python -I` (no site-packages of the user, no environment
variables, no stdin) inside an empty temporary folder, as its own process group, under an
address-space limit (RLIMIT_AS), a CPU-time limit (RLIMIT_CPU), a file-size limit and a
wall-clock timeout after which the whole group is killed. This is containment against
accidents (infinite loops, memory blow-ups, stray files), not a security boundary against
hostile code: run untrusted models' code in a container or VM as well.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0
    memory_mb: int = 1024
    file_mb: int = 16


def _apply_limits(limits: Limits):
    def set_limits() -> None:
        import resource

        memory = limits.memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        cpu = math.ceil(limits.timeout_s)
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        size = limits.file_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))

    return set_limits


def run_program(program: str, limits: Limits = Limits()) -> tuple[bool, str]:
    """(passed, reason): passed when the program exits with status 0 within the limits."""
    if os.name != "posix":
        raise RuntimeError("sandboxed code execution needs a POSIX system (resource limits)")
    with tempfile.TemporaryDirectory(prefix="moxin_sandbox_") as folder:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-c", program], cwd=folder, env={"PATH": "/usr/bin:/bin"},
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            preexec_fn=_apply_limits(limits), start_new_session=True,
        )
        try:
            _, err = proc.communicate(timeout=limits.timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return False, "timed out"
    if proc.returncode == 0:
        return True, "passed"
    last = err.decode(errors="replace").strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
    return False, last[0]


def pass_at_k_estimate(n: int, correct: int, k: int) -> float:
    """Unbiased pass@k from n samples of which `correct` pass (Chen et al., 2021)."""
    if n < k:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem, got {n}")
    if n - correct < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - correct + 1, n + 1))


def pass_at_k(references: list[str], predictions: list[list[str]], k: list[int] | int = 1) -> dict[str, float]:
    """lm-eval metric for HumanEval-style tasks: `references` hold the test code, `predictions`
    the candidate programs of each problem; each candidate + test runs sandboxed."""
    ks = [k] if isinstance(k, int) else list(k)
    scores: dict[str, list[float]] = {f"pass@{n}": [] for n in ks}
    for test, candidates in zip(references, predictions, strict=True):
        correct = sum(run_program(f"{candidate}\n{test}\n")[0] for candidate in candidates)
        for n in ks:
            scores[f"pass@{n}"].append(pass_at_k_estimate(len(candidates), correct, n))
    return {name: sum(values) / len(values) for name, values in scores.items()}


def humaneval_programs(resps: list[list[str]], docs: list[dict]) -> list[list[str]]:
    """Filter: prompt (signature and docstring) + each completion = a runnable candidate."""
    return [[doc["prompt"] + completion for completion in completions] for completions, doc in zip(resps, docs,
                                                                                                     strict=True)]
