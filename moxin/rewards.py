"""Verifiable math rewards: the answer in a response's last \\boxed{} checked with math-verify.

Rewards (by name, for GRPO's `reward` setting):
  - `correct`:    1 when the last \\boxed{} answer equals the reference, else 0;
  - `deepscaler`: 1 when correct and the answer comes after `</think>`, else 0 (DeepScaleR's reward);
  - `areal`:      (correct - 0.5) x 10, i.e. +5 or -5 (AReaL's transformation of the binary reward);
  - `format`:     1 when the response closes its thinking with `</think>` and then gives a \\boxed{} answer.

Checking an answer runs sympy, which a model's output can drive into hours of work or gigabytes of
memory (`\\boxed{9^{9^{9^{9}}}}`). So math-verify runs in a worker process with a memory limit, each
check has a wall-clock bound, and a worker that overruns it is killed and replaced: the answer
scores 0 and the timeout is counted. Every other failure also scores 0 and is counted by reason.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from dataclasses import dataclass, field

THINK_END = "</think>"
REWARDS = ("correct", "deepscaler", "areal", "format")
FAILURES = ("no_answer", "answer_too_long", "timeout", "error")


def last_boxed(text: str) -> str | None:
    """Contents of the last \\boxed{...} (or \\fbox{...}), braces balanced; None when there is none or
    it is never closed."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    if text.startswith("\\boxed ", start):  # \boxed 5
        return text[start + len("\\boxed "):].split("$")[0].strip() or None
    open_brace = text.find("{", start)
    if open_brace < 0:
        return None
    depth = 0
    for i in range(open_brace, len(text)):
        char = text[i]
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[open_brace + 1:i]
    return None


# The checking process: a fresh interpreter (no fork of a process holding torch threads, no re-import
# of the caller's __main__) that limits its own memory, then answers one JSON line per request.
_WORKER = r"""
import json, os, resource, sys
memory = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
replies = os.fdopen(os.dup(1), "w")  # replies only: anything a library prints goes to stderr
sys.stdout = sys.stderr
from math_verify import parse, verify
replies.write("ready\n"); replies.flush()
for line in sys.stdin:
    answer, reference = json.loads(line)
    try:
        result = bool(verify(parse("$" + reference + "$"), parse("$" + answer + "$")))
    except BaseException as error:  # MemoryError, RecursionError, sympy's own: the answer scores 0
        result = "error: " + type(error).__name__
    replies.write(json.dumps(result) + "\n"); replies.flush()
"""


@dataclass
class RewardStats:
    """Checks made and failures by reason; `take()` returns them and starts counting afresh."""

    checks: int = 0
    failures: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FAILURES, 0))

    def fail(self, reason: str) -> None:
        self.failures[reason] += 1

    def take(self) -> dict[str, int]:
        counts = {"checks": self.checks, **self.failures}
        self.checks, self.failures = 0, dict.fromkeys(FAILURES, 0)
        return counts


class MathVerifier:
    """math-verify in a limited worker process. `equal(answer, reference)` returns within `timeout_s`
    (once the worker is up), whatever the answer."""

    def __init__(self, timeout_s: float = 1.0, memory_mb: int = 2048, max_answer_chars: int = 1000,
                 startup_timeout_s: float = 120.0):
        self.timeout_s, self.memory_mb, self.max_answer_chars = timeout_s, memory_mb, max_answer_chars
        self.startup_timeout_s = startup_timeout_s
        self.stats = RewardStats()
        self._process: subprocess.Popen | None = None
        self._buffer = b""

    def _start(self) -> None:
        self._process = subprocess.Popen([sys.executable, "-c", _WORKER, str(self.memory_mb * 2**20)],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self._buffer = b""
        if self._read_line(self.startup_timeout_s) != "ready":
            self.close()
            raise RuntimeError("the math-verify worker did not start; is math-verify installed?")

    def _read_line(self, timeout_s: float) -> str | None:
        """The worker's next line, or None when none came within timeout_s (or it died)."""
        deadline = time.monotonic() + timeout_s
        fd = self._process.stdout.fileno()
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:  # the worker died (e.g. its memory limit)
                return None
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode()

    def close(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            for stream in (self._process.stdin, self._process.stdout):
                stream.close()
        self._process = None

    def equal(self, answer: str, reference: str) -> bool:
        self.stats.checks += 1
        if len(answer) > self.max_answer_chars:
            self.stats.fail("answer_too_long")
            return False
        if self._process is None or self._process.poll() is not None:
            self.close()  # a dead worker's pipes
            self._start()
        try:
            self._process.stdin.write((json.dumps([answer, str(reference)]) + "\n").encode())
            self._process.stdin.flush()
        except (BrokenPipeError, OSError):
            self.stats.fail("error")
            self.close()
            return False
        line = self._read_line(self.timeout_s)
        if line is None:  # too slow (or dead): killed; the next check starts a fresh worker
            self.stats.fail("timeout" if self._process.poll() is None else "error")
            self.close()
            return False
        try:
            result = json.loads(line)
        except ValueError:  # not a reply: start afresh rather than misread the next one
            self.stats.fail("error")
            self.close()
            return False
        if not isinstance(result, bool):
            self.stats.fail("error")
            return False
        return result

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass


def is_correct(response: str, reference: str, verifier: MathVerifier) -> bool:
    """The response's last \\boxed{} answer equals the reference (math-verify)."""
    answer = last_boxed(response)
    if answer is None:
        verifier.stats.fail("no_answer")
        return False
    return verifier.equal(answer, reference)


def has_format(response: str) -> bool:
    """Thinking closed by </think> (opened at most once), then a \\boxed{} answer."""
    thinking, closed, after = response.partition(THINK_END)
    if not closed or "<think>" in after or thinking.count("<think>") > 1:
        return False
    return last_boxed(after) is not None


def reward(kind: str, response: str, reference: str, verifier: MathVerifier) -> tuple[float, bool]:
    """(reward, whether the answer was correct) of one response."""
    if kind not in REWARDS:
        raise ValueError(f"reward must be one of {REWARDS}, got {kind!r}")
    if kind == "format":
        return float(has_format(response)), is_correct(response, reference, verifier)
    if kind == "deepscaler":
        after = response.partition(THINK_END)[2] if THINK_END in response else None
        correct = is_correct(after if after is not None else response, reference, verifier)
        return float(correct and after is not None), correct
    correct = is_correct(response, reference, verifier)
    return ((float(correct) - 0.5) * 10.0 if kind == "areal" else float(correct)), correct


def timed_rewards(kind: str, responses: list[str], references: list[str], verifier: MathVerifier
                  ) -> tuple[list[float], list[bool], float]:
    """Rewards and correctness of a batch of responses, and the seconds it took."""
    start = time.perf_counter()
    results = [reward(kind, r, ref, verifier) for r, ref in zip(responses, references, strict=True)]
    return [r for r, _ in results], [c for _, c in results], time.perf_counter() - start

