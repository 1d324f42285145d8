"""Model-written code runs only in a limited subprocess; HumanEval and PopQA as moxin ships them."""

import time

import pytest
from lm_eval.api.model import LM

from moxin.eval.runner import run_suite
from moxin.eval.sandbox import Limits, pass_at_k, pass_at_k_estimate, run_program
from moxin.eval.suites import EvalSuite
from tests.eval_fixtures import HUMANEVAL, POPQA


def test_passing_and_failing_programs():
    assert run_program("assert 1 + 1 == 2") == (True, "passed")
    passed, reason = run_program("assert 1 + 1 == 3, 'wrong sum'")
    assert not passed and "wrong sum" in reason


def test_endless_program_is_killed_at_the_timeout():
    start = time.perf_counter()
    passed, reason = run_program("while True:\n    pass", Limits(timeout_s=1.0))
    assert not passed and time.perf_counter() - start < 5


def test_memory_hungry_program_fails_inside_its_limit():
    passed, reason = run_program("x = bytearray(2 * 1024 ** 3)", Limits(memory_mb=256))
    assert not passed and "MemoryError" in reason


def test_program_runs_in_an_empty_folder_without_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SECRET_TOKEN", "abc")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.txt").write_text("x")
    assert run_program("import os\nassert 'SECRET_TOKEN' not in os.environ\nassert os.listdir('.') == []")[0]


def test_pass_at_k_estimates():
    assert pass_at_k_estimate(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k_estimate(5, 2, 2) == pytest.approx(0.7)  # 1 - C(3,2)/C(5,2)
    assert pass_at_k_estimate(5, 0, 1) == 0.0
    assert pass_at_k_estimate(5, 4, 2) == 1.0
    with pytest.raises(ValueError, match="at least 3 samples"):
        pass_at_k_estimate(2, 1, 3)


def test_pass_at_k_metric_runs_candidates_against_the_tests():
    problem = HUMANEVAL[0]
    test = f"{problem['test']}\ncheck({problem['entry_point']})"
    right = problem["prompt"] + problem["canonical_solution"]
    wrong = problem["prompt"] + "    return a - b\n"
    assert pass_at_k([test], [[right]], k=[1]) == {"pass@1": 1.0}
    assert pass_at_k([test], [[right, wrong]], k=[1]) == {"pass@1": 0.5}


class ScriptedLM(LM):
    """Stands in for a model whose generations we choose, to check a task's scoring path."""

    def __init__(self, reply: str):
        super().__init__()
        self.reply = reply

    def loglikelihood(self, requests):
        raise NotImplementedError

    def loglikelihood_rolling(self, requests):
        raise NotImplementedError

    def generate_until(self, requests):
        return [self.reply for _ in requests]


def test_humaneval_needs_confirmation_then_runs_sandboxed(eval_data_dir, tmp_path):
    tasks = [{"name": "humaneval", "metric": "pass@1,create_test", "column": "HumanEval"}]
    solution = ScriptedLM(HUMANEVAL[0]["canonical_solution"])
    with pytest.raises(ValueError, match="unsafe"):
        run_suite(solution, EvalSuite(name="code", tasks=tasks, data_dir=str(eval_data_dir)), tmp_path / "refused")
    suite = EvalSuite(name="code", tasks=tasks, data_dir=str(eval_data_dir), confirm_run_unsafe_code=True)
    assert run_suite(solution, suite, tmp_path / "right")["paper_row"]["HumanEval"] == 100.0
    assert run_suite(ScriptedLM("    return 0\n"), suite, tmp_path / "wrong")["paper_row"]["HumanEval"] == 0.0


def test_popqa_counts_any_possible_answer(eval_data_dir, tmp_path):
    suite = EvalSuite(name="qa", data_dir=str(eval_data_dir),
                      tasks=[{"name": "popqa", "num_fewshot": 0, "metric": "exact_match", "column": "PopQA"}])
    assert POPQA[0]["question"]
    assert run_suite(ScriptedLM(" the USA, I think"), suite, tmp_path / "a")["paper_row"]["PopQA"] == 100.0
    assert run_suite(ScriptedLM(" Canada"), suite, tmp_path / "b")["paper_row"]["PopQA"] == 0.0
