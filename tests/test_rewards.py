"""Math rewards: answer extraction, math-verify equivalence, the reward variants, and time bounds."""

import time

import pytest

from moxin.rewards import MathVerifier, has_format, is_correct, last_boxed, reward


@pytest.fixture(scope="module")
def verifier():
    checker = MathVerifier(timeout_s=1.0)
    yield checker
    checker.close()


@pytest.mark.parametrize(("text", "answer"), [
    ("so \\boxed{42}.", "42"),
    ("first \\boxed{1} then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # the last box counts
    ("nested \\boxed{\\{1, 2\\} \\cup {3}}", "\\{1, 2\\} \\cup {3}"),
    ("\\fbox{7}", "7"),
    ("\\boxed 5$ rest", "5"),
    ("no box at all", None),
    ("unterminated \\boxed{12", None),
])
def test_last_boxed(text, answer):
    assert last_boxed(text) == answer


# (response, reference, correct): the answer forms math-verify must judge.
ANSWER_FORMS = [
    ("<think>half</think> \\boxed{\\frac{1}{2}}", "0.5", True),
    ("\\boxed{0.5}", "\\frac{1}{2}", True),
    ("\\boxed{\\dfrac{3}{4}}", "3/4", True),
    ("\\boxed{1/2}", "\\frac12", True),
    ("\\boxed{2.50}", "2.5", True),
    ("\\boxed{(1, 2]}", "(1,2]", True),
    ("\\boxed{[0, \\infty)}", "[0,\\infty)", True),
    ("\\boxed{5 \\text{ cm}}", "5", True),
    ("\\boxed{x = 3}", "3", True),
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt3}{2}", True),
    ("\\boxed{4}", "3", False),
    ("\\boxed{(1, 2)}", "(1,2]", False),
    ("the answer is 3", "3", False),  # no box
    ("<think>so \\boxed{3", "3", False),  # unterminated box (and think)
]


@pytest.mark.parametrize(("response", "reference", "correct"), ANSWER_FORMS)
def test_answer_forms(verifier, response, reference, correct):
    assert is_correct(response, reference, verifier) is correct


def test_reward_variants(verifier):
    good = "<think>3 + 4 is 7</think> The answer is \\boxed{7}."
    wrong = "<think>3 + 4 is 8</think> The answer is \\boxed{8}."
    unclosed = "<think>3 + 4 is 7 so \\boxed{7}"  # correct, but the thinking never ends
    assert reward("correct", good, "7", verifier) == (1.0, True)
    assert reward("correct", unclosed, "7", verifier) == (1.0, True)
    assert reward("deepscaler", good, "7", verifier) == (1.0, True)
    assert reward("deepscaler", wrong, "7", verifier) == (0.0, False)
    assert reward("deepscaler", unclosed, "7", verifier)[0] == 0.0  # </think> must precede the answer
    assert reward("deepscaler", "\\boxed{7} </think> done", "7", verifier)[0] == 0.0
    assert reward("areal", good, "7", verifier) == (5.0, True)
    assert reward("areal", wrong, "7", verifier) == (-5.0, False)
    assert reward("format", wrong, "7", verifier) == (1.0, False)
    assert reward("format", unclosed, "7", verifier)[0] == 0.0
    assert not has_format("<think>a</think> b </think> no box")
    assert not has_format("<think><think>a</think> \\boxed{1}")
    with pytest.raises(ValueError, match="reward must be one of"):
        reward("bleu", good, "7", verifier)


@pytest.mark.parametrize("response", [
    "\\boxed{9^{9^{9^{9}}}}",  # sympy would try to evaluate a number with billions of digits
    "\\boxed{" + "{" * 500_000 + "}" * 500_000 + "}",  # a megabyte of nested braces
    "\\boxed{" + "{" * 1_000_000,  # ... never closed
    "\\boxed{" + "(" * 400 + "1" + ")" * 400 + "}",  # deep nesting within the length limit
])
def test_adversarial_answers_score_zero_within_a_second(verifier, response):
    verifier.equal("1", "1")  # the worker is up (its start-up is not the answer's time)
    start = time.perf_counter()
    assert reward("deepscaler", "<think>x</think>" + response, "1", verifier)[0] == 0.0
    assert time.perf_counter() - start < 1.5  # 1 s bound, plus killing the worker on a slow machine
    assert verifier.equal("2", "2")  # and the next check still works


def test_failures_are_counted(verifier):
    verifier.stats.take()
    is_correct("no box", "1", verifier)
    is_correct("\\boxed{" + "1" * 5000 + "}", "1", verifier)
    is_correct("\\boxed{9^{9^{9^{9}}}}", "1", verifier)
    counts = verifier.stats.take()
    assert counts["no_answer"] == 1 and counts["answer_too_long"] == 1
    assert counts["timeout"] + counts["error"] == 1  # either way: scored 0 and counted
    assert verifier.stats.take()["checks"] == 0  # take() starts afresh
