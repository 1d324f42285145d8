"""MATH in the Minerva answer format, checked with math-verify.

lm-eval's own minerva_math tasks require antlr4 4.11, which cannot be installed beside Hydra
(it pins 4.9); math-verify with its antlr4 4.9.3 extra parses the same LaTeX. Few-shot examples
are the first training problems of each subject, their solutions ending in the Minerva answer
line, instead of Minerva's four hand-picked problems.
"""

from __future__ import annotations

import re

ANSWER_LINE = "Final Answer: The final answer is ${answer}$. I hope it is correct."


def boxed_answer(solution: str) -> str | None:
    """Contents of the last \\boxed{...} (or \\fbox{...}) in a solution: the rewards' own extraction."""
    from moxin.rewards import last_boxed

    return last_boxed(solution)


def process_docs(dataset):
    def with_answer(doc: dict) -> dict:
        answer = doc.get("answer") or boxed_answer(doc["solution"]) or ""
        return {"problem": doc["problem"], "answer": answer,
                "solution": doc["solution"].rstrip() + "\n" + ANSWER_LINE.format(answer=answer)}

    return dataset.map(with_answer)


def doc_to_text(doc: dict) -> str:
    return f"Problem:\n{doc['problem']}\n\nSolution:"


def final_answer(generation: str) -> str:
    """The answer a generation states: the Minerva answer line, else its last boxed expression."""
    match = re.search(r"final answer is \$?(.*?)\$?\. I hope", generation, flags=re.DOTALL)
    if match:
        return match.group(1).strip()
    return boxed_answer(generation) or ""


def normalize(answer: str) -> str:
    """Light string normalisation for exact match: spacing, \\left/\\right, \\text{}, $ signs."""
    answer = re.sub(r"\\text\{(.*?)\}", r"\1", answer)
    for token in ("\\left", "\\right", "\\!", "\\,", "\\;", "$", " "):
        answer = answer.replace(token, "")
    answer = answer.replace("dfrac", "frac").replace("tfrac", "frac")
    return answer.rstrip(".")


def process_results(doc: dict, results: list[str]) -> dict[str, int]:
    from math_verify import parse, verify

    stated = final_answer(results[0])
    gold = doc["answer"]
    equivalent = bool(stated) and verify(parse(f"${gold}$"), parse(f"${stated}$"))
    return {"exact_match": int(bool(stated) and normalize(stated) == normalize(gold)),
            "math_verify": int(equivalent)}
