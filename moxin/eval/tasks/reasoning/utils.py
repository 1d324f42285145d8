"""The reasoning benchmarks of the paper's Table 7 (MATH 500, AMC, Minerva Math, OlympiadBench).

Every problem gets the reasoning instruction that GRPO trains with, each is sampled `repeats`
times, and pass@1 is the share of correct samples, averaged over problems. Answers are graded by
moxin.rewards, the same code (last \\boxed{}, math-verify in a limited worker) as the GRPO reward.
"""

from __future__ import annotations

from moxin.data.conversations import REASONING_INSTRUCTION

_verifier = None


def _answer(doc: dict) -> str:
    answer = doc.get("answer", doc.get("final_answer"))
    if isinstance(answer, list):  # OlympiadBench: a list of accepted answers, in $...$
        answer = answer[0] if answer else ""
    return str(answer).strip().strip("$").strip()


def process_docs(dataset):
    """Each dataset's fields as {problem, answer}."""
    def normalised(doc: dict) -> dict:
        return {"problem": doc.get("problem") or doc.get("question") or "", "answer": _answer(doc)}

    return dataset.map(normalised, remove_columns=dataset.column_names)


def all_samples(responses, docs):
    """The filter that keeps all `repeats` samples of each problem (lm-eval's default keeps the first)."""
    return responses


def doc_to_text(doc: dict) -> str:
    return f"{doc['problem']} {REASONING_INSTRUCTION}"


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    from moxin.rewards import MathVerifier, is_correct

    global _verifier
    if _verifier is None:
        _verifier = MathVerifier()
    samples = results[0] if results and isinstance(results[0], list) else results  # all_samples: one list
    return {"pass@1": sum(is_correct(r, doc["answer"], _verifier) for r in samples) / max(len(samples), 1)}
