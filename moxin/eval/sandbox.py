"""Run model-written code (HumanEval) in a separate, limited process.

Each program is written to a file in an empty temporary folder and run there by a fresh
`python -I` (isolated mode: no user site-packages, no PYTHON* variables) with an empty
environment and no stdin. Before the program starts, the child limits itself: address space
(RLIMIT_AS), CPU time (RLIMIT_CPU), file size (RLIMIT_FSIZE, which also caps its output: stdout
and stderr go to files in the folder, never to a pipe the evaluator must drain). The child runs
in its own process group, which is killed when the program ends or its wall-clock time is up.

This contains accidents (endless loops, memory blow-ups, floods of output, stray files and
processes), not an attacker: a process that leaves its group (setsid) outlives the kill. Run
code from models you do not trust inside a container or VM as well.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

# Runs in the child: apply the limits to itself, then run the program as __main__.
_LAUNCHER = """
import resource, runpy, sys
memory, cpu, size = (int(x) for x in sys.argv[1:4])
resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
sys.argv = [sys.argv[4]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0
    memory_mb: int = 1024
    file_mb: int = 16


def run_program(program: str, limits: Limits = Limits()) -> tuple[bool, str]:
    """(passed, reason): passed when the program exits with status 0 within the limits."""
    if os.name != "posix":
        raise RuntimeError("sandboxed code execution needs a POSIX system (resource limits, process groups)")
    with tempfile.TemporaryDirectory(prefix="moxin_sandbox_") as folder:
        work = Path(folder)
        (work / "program.py").write_text(program)
        args = [str(limits.memory_mb * 1024 * 1024), str(math.ceil(limits.timeout_s)),
                str(limits.file_mb * 1024 * 1024), "program.py"]
        with open(work / "stdout", "wb") as out, open(work / "stderr", "wb") as err:
            proc = subprocess.Popen([sys.executable, "-I", "-c", _LAUNCHER, *args], cwd=folder, env={},
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True)
            try:
                proc.wait(timeout=limits.timeout_s)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _kill_group(proc.pid)  # also whatever the program started and left running
                proc.wait()
        if timed_out:
            return False, "timed out"
        if proc.returncode == 0:
            return True, "passed"
        tail = _last_line(work / "stderr") or f"exit status {proc.returncode}"
        return False, tail


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _last_line(path: Path, max_bytes: int = 4096) -> str:
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - max_bytes))
        lines = f.read().decode(errors="replace").strip().splitlines()
    return lines[-1] if lines else ""


def pass_at_k_estimate(n: int, correct: int, k: int) -> float:
    """Unbiased pass@k from n samples of which `correct` pass (Chen et al., 2021)."""
    if n < k:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem, got {n}")
    if n - correct < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - correct + 1, n + 1))


def pass_at_k(references: list[str], predictions: list[list[str]], k: list[int] | int = 1,
              timeout_s: float = Limits.timeout_s, memory_mb: int = Limits.memory_mb) -> dict[str, float]:
    """lm-eval metric for HumanEval-style tasks: `references` hold the test code, `predictions`
    the candidate programs of each problem; each candidate + test runs sandboxed."""
    limits = Limits(timeout_s=float(timeout_s), memory_mb=int(memory_mb))
    ks = [k] if isinstance(k, int) else list(k)
    scores: dict[str, list[float]] = {f"pass@{n}": [] for n in ks}
    for test, candidates in zip(references, predictions, strict=True):
        correct = sum(run_program(f"{candidate}\n{test}\n", limits)[0] for candidate in candidates)
        for n in ks:
            scores[f"pass@{n}"].append(pass_at_k_estimate(len(candidates), correct, n))
    return {name: sum(values) / len(values) for name, values in scores.items()}


def humaneval_programs(resps: list[list[str]], docs: list[dict]) -> list[list[str]]:
    """Filter: prompt (signature and docstring) + each completion = a runnable candidate."""
    return [[doc["prompt"] + completion for completion in completions]
            for completions, doc in zip(resps, docs, strict=True)]


def humaneval_instruct_programs(resps: list[list[str]], docs: list[dict]) -> list[list[str]]:
    """Filter for chat answers that continue an opened code block: keep the code up to the fence."""
    return [[doc["prompt"] + completion.split("```")[0] for completion in completions]
            for completions, doc in zip(resps, docs, strict=True)]
