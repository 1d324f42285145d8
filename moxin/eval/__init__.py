"""Evaluation through lm-evaluation-harness: the `moxin` LM, the paper's suites, the callback."""

from moxin.eval.lm import MoxinLM

__all__ = ["MoxinLM"]
