"""Model-written code runs only in a limited subprocess; HumanEval and PopQA as moxin ships them."""

import os
import signal
import time
from pathlib import Path

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
    check = ("import os\nassert 'SECRET_TOKEN' not in os.environ\n"
             "assert sorted(os.listdir('.')) == ['program.py', 'stderr', 'stdout']")
    assert run_program(check)[0]


def test_processes_a_passing_program_leaves_behind_are_killed(tmp_path):
    pid_file = tmp_path / "child.pid"
    program = ("import subprocess\n"
               "child = subprocess.Popen(['sleep', '30'], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
               f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n")
    assert run_program(program)[0]
    time.sleep(0.2)
    stat = Path(f"/proc/{pid_file.read_text()}/stat")
    assert not stat.exists() or stat.read_text().split()[2] == "Z"  # gone, or killed awaiting its reaper


def test_a_process_that_leaves_the_group_does_not_hold_up_the_evaluator(tmp_path):
    pid_file = tmp_path / "escaped.pid"
    program = ("import os, subprocess\n"
               "child = subprocess.Popen(['sleep', '30'], start_new_session=True)\n"
               f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
               "import time; time.sleep(30)\n")
    start = time.perf_counter()
    try:
        assert run_program(program, Limits(timeout_s=1.0)) == (False, "timed out")
        assert time.perf_counter() - start < 5
    finally:
        os.kill(int(pid_file.read_text()), signal.SIGKILL)


def test_large_programs_and_floods_of_output_are_handled():
    assert run_program("x = 1\n" * 40_000 + "assert x == 1\n")[0]  # 240 KB: too long for a command line
    passed, reason = run_program("import sys\nwhile True:\n    sys.stderr.write('x' * 65536)",
                                 Limits(timeout_s=5.0, file_mb=1))
    assert not passed and reason != "timed out"  # stopped by the file-size limit, not the clock


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
    suite = EvalSuite(name="qa", data_dir=str(eval_data_dir), log_samples=True,
                      tasks=[{"name": "popqa", "num_fewshot": 1, "metric": "exact_match", "column": "PopQA"}])
    right = run_suite(ScriptedLM(" the USA, I think"), suite, tmp_path / "a")
    assert right["paper_row"]["PopQA"] == 50.0  # right about Cheyenne, wrong about Lyon
    assert run_suite(ScriptedLM(" Canada"), suite, tmp_path / "b")["paper_row"]["PopQA"] == 0.0
    prompt = right["samples"]["popqa"][0]["arguments"][0][0]
    shot = POPQA[1]
    assert prompt == f"Q: {shot['question']} A: France\n\nQ: {POPQA[0]['question']} A:"
