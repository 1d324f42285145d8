"""moxin.eval: the lm-eval model, suites with local data, reports, the command and the callback.

Every lm-eval run here reads small local copies (tests/eval_fixtures.py) in the datasets'
real hub schemas, through lm-eval's real task definitions.
"""

import dataclasses
import json

import pytest
import torch
from lm_eval.api.instance import Instance

from moxin.eval import MoxinLM
from moxin.eval.commands import model_label, suite_from_config
from moxin.eval.runner import paper_row, run_suite
from moxin.eval.suites import EvalSuite, EvalTask, task_manager
from moxin.kernels import onednn_available
from moxin.model import ModelConfig, Transformer
from moxin.tokenizer import load_tokenizer
from tests.eval_fixtures import FIXTURES

MAX_LENGTH = 48  # short, so that the wikitext pages need several rolling windows


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """A small random model (sharp enough that items differ) saved as a Hugging Face folder."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=32000, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=192,
                      sliding_window=16, max_seq_len=512, init_std=0.2)
    model = Transformer(cfg).eval()
    folder = tmp_path_factory.mktemp("hf_model")
    model.save_hf(str(folder))
    load_tokenizer().save_pretrained(str(folder))
    return model, folder


@pytest.fixture(scope="module")
def ours(saved_model):
    model, _ = saved_model
    return MoxinLM(model=model, tokenizer=load_tokenizer(), batch_size=3, max_length=MAX_LENGTH)


@pytest.fixture(scope="module")
def hflm(saved_model):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(saved_model[1]), batch_size=3, max_length=MAX_LENGTH, device="cpu", dtype="float32")


def evaluate(lm, tasks: list[dict], eval_data_dir, work_dir, **suite_kwargs):
    suite = EvalSuite(name="test", tasks=tasks, data_dir=str(eval_data_dir), log_samples=True, **suite_kwargs)
    return run_suite(lm, suite, work_dir)


def responses(results, task: str) -> list:
    samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
    return [[r for r in sample["resps"]] for sample in samples]


def test_model_type_is_registered_with_lm_eval(saved_model):
    from lm_eval.api.registry import get_model

    assert get_model("moxin") is MoxinLM
    lm = MoxinLM.create_from_arg_string(f"ckpt={saved_model[1]},batch_size=4,max_length=64")
    assert (lm.batch_size, lm.max_length) == (4, 64)
    with pytest.raises(ValueError, match="exactly one of ckpt"):
        MoxinLM()


def test_multiple_choice_task_matches_hflm(ours, hflm, eval_data_dir, tmp_path):
    tasks = [{"name": "arc_easy", "num_fewshot": 1, "metric": "acc_norm", "column": "ARC-E"}]
    a = evaluate(ours, tasks, eval_data_dir, tmp_path / "a")
    b = evaluate(hflm, tasks, eval_data_dir, tmp_path / "b")
    ours_ll = [r[0][0] for sample in responses(a, "arc_easy") for r in sample]
    hf_ll = [r[0][0] for sample in responses(b, "arc_easy") for r in sample]
    items = FIXTURES[("allenai/ai2_arc", "ARC-Easy")]["test"]
    assert len(ours_ll) == sum(len(item["choices"]["text"]) for item in items)
    assert ours_ll == pytest.approx(hf_ll, abs=1e-4)
    assert a["results"]["arc_easy"]["acc,none"] == b["results"]["arc_easy"]["acc,none"]
    assert a["results"]["arc_easy"]["acc_norm,none"] == b["results"]["arc_easy"]["acc_norm,none"]
    assert a["n-shot"]["arc_easy"] == 1  # the suite's shot count replaced the task's default of 0
    assert a["paper_row"]["ARC-E"] == pytest.approx(100 * a["results"]["arc_easy"]["acc_norm,none"])


def test_loglikelihood_edge_cases_match_hflm(ours, hflm):
    """Empty context (BOS stands in), trailing spaces moved to the continuation, left truncation."""
    long_context = " ".join(f"word{i}" for i in range(80))  # longer than max_length
    pairs = [("", "Hello world"), ("The sky is ", "blue"), (long_context, " and the end"), ("A", " B")]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    a, b = ours.loglikelihood(requests), hflm.loglikelihood(requests)
    assert [x[0] for x in a] == pytest.approx([x[0] for x in b], abs=1e-4)
    assert [x[1] for x in a] == [x[1] for x in b]


def test_requests_with_identical_inputs_are_each_scored_on_their_own_tokens(ours, saved_model):
    """Two requests whose model inputs coincide but whose continuations split differently
    (periodic documents' rolling windows do this) each get their own targets' log-probs."""
    model, _ = saved_model
    ids = ours.tok_encode("one two three four five six seven eight")
    first, second = (None, ids[:2], ids[2:]), (None, ids[:5], ids[5:])
    got = ours._loglikelihood_tokens([first, second], disable_tqdm=True)
    with torch.no_grad():
        logprobs = model(torch.tensor([ids[:-1]])).log_softmax(-1)[0]
    for (_, context, continuation), (logp, _) in zip([first, second], got, strict=True):
        rows = torch.arange(len(context) - 1, len(ids) - 1)
        assert logp == pytest.approx(logprobs[rows, torch.tensor(continuation)].sum().item(), abs=1e-4)


def test_rolling_perplexity_task_matches_hflm(ours, hflm, eval_data_dir, tmp_path):
    tasks = [{"name": "wikitext", "metric": "word_perplexity", "column": "ppl"}]
    a = evaluate(ours, tasks, eval_data_dir, tmp_path / "a")
    b = evaluate(hflm, tasks, eval_data_dir, tmp_path / "b")
    ours_ll = [s[0][0] for s in responses(a, "wikitext")]
    assert ours_ll == pytest.approx([s[0][0] for s in responses(b, "wikitext")], abs=1e-3)
    n_tokens = len(ours.tok_encode(FIXTURES[("EleutherAI/wikitext_document_level", "wikitext-2-raw-v1")]["test"][0]
                                   ["page"]))
    assert n_tokens > 2 * MAX_LENGTH  # several windows per page
    assert a["results"]["wikitext"]["word_perplexity,none"] == pytest.approx(
        b["results"]["wikitext"]["word_perplexity,none"], rel=1e-3)


def test_generation_task_with_stop_sequences_matches_hflm(saved_model, eval_data_dir, tmp_path):
    from lm_eval.models.huggingface import HFLM

    # Full context (512): room for the prompt and lm-eval's default 256 new tokens.
    ours = MoxinLM(model=saved_model[0], tokenizer=load_tokenizer(), batch_size=2)
    hflm = HFLM(pretrained=str(saved_model[1]), batch_size=2, device="cpu", dtype="float32")
    tasks = [{"name": "gsm8k", "num_fewshot": 1, "metric": "exact_match,flexible-extract", "column": "GSM8K"}]
    a = evaluate(ours, tasks, eval_data_dir, tmp_path / "a")
    b = evaluate(hflm, tasks, eval_data_dir, tmp_path / "b")
    assert responses(a, "gsm8k") == responses(b, "gsm8k")
    assert "GSM8K" in a["paper_row"]


def test_generate_until_cuts_at_the_first_stop_sequence_as_hflm_does(ours, hflm):
    context = "The number of the beast is"
    free = ours.generate_until([Instance("generate_until", {}, (context, {"until": [], "max_gen_toks": 12}), 0)])[0]
    stop = free[len(free) // 2:len(free) // 2 + 3]
    assert stop.strip(), f"pick a visible stop string from {free!r}"
    requests = [Instance("generate_until", {}, (context, {"until": [stop], "max_gen_toks": 12}), 0),
                Instance("generate_until", {}, ("Another prompt", {"until": [stop], "max_gen_toks": 12}), 1)]
    cut = ours.generate_until(requests)
    assert cut[0] == free[:free.index(stop)]
    assert cut == hflm.generate_until(requests)


@pytest.mark.skipif(not onednn_available(), reason="this torch build has no oneDNN")
def test_generate_until_packs_the_weights_once_per_group_of_requests(ours, monkeypatch):
    from moxin import kernels

    packs = []
    real = kernels.pack_weight
    monkeypatch.setattr(kernels, "pack_weight", lambda w: packs.append(w) or real(w))
    requests = [Instance("generate_until", {}, (f"Prompt {i}", {"until": [], "max_gen_toks": 32}), i) for i in range(5)]
    before = kernels.onednn_enabled()
    kernels.use_onednn_on_cpu(True)
    try:
        packed = ours.generate_until(requests)  # batch size 3: two batches
        assert len(packs) == 4 * ours.model.config.n_layers + 1  # once for both batches
        kernels.use_onednn_on_cpu(False)
        assert packed == ours.generate_until(requests)  # PyTorch's own products: the same greedy text
    finally:
        kernels.use_onednn_on_cpu(before)


def test_sampled_generations_differ_across_batches(ours):
    settings = {"until": [], "max_gen_toks": 8, "do_sample": True, "temperature": 1.0}
    requests = [Instance("generate_until", {}, ("Once upon a time", dict(settings)), i) for i in range(6)]
    samples = ours.generate_until(requests)  # batch size 3: two batches
    assert len(set(samples)) == 6
    with pytest.raises(ValueError, match="num_beams"):
        beams = {"until": [], "max_gen_toks": 4, "num_beams": 4}
        ours.generate_until([Instance("generate_until", {}, ("x", beams), 0)])


def test_chat_template_is_moxins(ours):
    prompt = ours.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert prompt == "<s><|user|>\nHi\n<|assistant|>\n"
    assert ours.tok_encode(prompt).count(ours.tokenizer.bos_token_id) == 1


def test_local_copies_read_offline_like_the_hub(eval_data_dir):
    from datasets import load_dataset

    arc = load_dataset(str(eval_data_dir / "allenai/ai2_arc"), "ARC-Easy")
    assert arc["test"].to_list() == FIXTURES[("allenai/ai2_arc", "ARC-Easy")]["test"]
    humaneval = load_dataset(str(eval_data_dir / "openai/openai_humaneval"))
    assert humaneval["test"][0]["entry_point"] == "add"


def test_suite_overrides_reach_every_member_of_a_group(eval_data_dir, tmp_path):
    suite = EvalSuite(name="s", data_dir=str(eval_data_dir), tasks=[{"name": "mmlu", "num_fewshot": 5}])
    tasks = task_manager(suite, tmp_path).load(["mmlu"])["tasks"]  # builds every subject from the local copy
    assert len(tasks) == 57
    local = str(eval_data_dir / "cais/mmlu")
    assert {(t.config.num_fewshot, t.config.dataset_path) for t in tasks.values()} == {(5, local)}


def test_suite_overrides_of_an_earlier_suite_do_not_linger(eval_data_dir, tmp_path):
    task_manager(EvalSuite(name="a", tasks=[{"name": "arc_easy", "num_fewshot": 25}]), tmp_path)
    tm = task_manager(EvalSuite(name="b", tasks=[{"name": "arc_easy"}]), tmp_path)
    assert "num_fewshot" not in tm.task_index["arc_easy"].cfg  # lm-eval's own definition again
    with pytest.raises(ValueError, match="no task or group named 'not_a_task'"):
        task_manager(EvalSuite(name="s", tasks=[{"name": "not_a_task", "num_fewshot": 1}]), tmp_path)


def test_a_local_copy_without_the_tasks_configuration_is_an_error(eval_data_dir, tmp_path):
    suite = EvalSuite(name="s", data_dir=str(eval_data_dir), tasks=[{"name": "arc_challenge"}])  # ARC-Easy only
    with pytest.raises(FileNotFoundError, match="lacks configuration.*ARC-Challenge"):
        task_manager(suite, tmp_path)


def test_rewritten_local_copies_are_read_afresh(tmp_path):
    from datasets import Dataset, DatasetDict, load_dataset

    from moxin.eval.commands import make_local_copies

    suite = EvalSuite(name="s", tasks=[{"name": "arc_easy"}])
    for rows, overwrite in ((FIXTURES[("allenai/ai2_arc", "ARC-Easy")]["test"][:1], False),
                            (FIXTURES[("allenai/ai2_arc", "ARC-Easy")]["test"][:3], True)):
        make_local_copies(suite, str(tmp_path / "data"), tmp_path / "work", overwrite=overwrite,
                          load_dataset=lambda *a, rows=rows, **k: DatasetDict({"test": Dataset.from_list(rows)}))
        assert load_dataset(str(tmp_path / "data/allenai/ai2_arc"), "ARC-Easy", split="test").to_list() == rows


def test_suite_validation():
    with pytest.raises(ValueError, match="lists no tasks"):
        EvalSuite(name="s", tasks=[])
    with pytest.raises(ValueError, match="twice"):
        EvalSuite(name="s", tasks=[{"name": "piqa"}, {"name": "piqa"}])
    with pytest.raises(ValueError, match="num_fewshot"):
        EvalTask(name="piqa", num_fewshot=-1)
    assert EvalTask(name="gsm8k", metric="exact_match,flexible-extract").metric_key == "exact_match,flexible-extract"
    assert EvalTask(name="piqa", metric="acc_norm").metric_key == "acc_norm,none"


def test_paper_row_takes_each_tasks_reported_metric_and_averages():
    suite = EvalSuite(name="s", tasks=[{"name": "mmlu", "metric": "acc", "column": "MMLU"},
                                       {"name": "hellaswag", "metric": "acc_norm", "column": "HellaSwag"}])
    results = {"groups": {"mmlu": {"acc,none": 0.6}},
               "results": {"mmlu": {"acc,none": 0.6}, "hellaswag": {"acc,none": 0.5, "acc_norm,none": 0.8}}}
    assert paper_row(results, suite) == pytest.approx({"MMLU": 60.0, "HellaSwag": 80.0, "Avg": 70.0})
    results["results"]["hellaswag"].pop("acc_norm,none")
    with pytest.raises(KeyError, match="hellaswag: lm-eval reported no 'acc_norm,none'"):
        paper_row(results, suite)


def reported_metric_keys(tm, name: str) -> set[str]:
    """The 'metric,filter' keys lm-eval reports for a task or group, read from its definition."""
    from lm_eval.tasks._index import Kind
    from lm_eval.tasks._yaml_loader import load_yaml

    entry = tm.task_index[name]
    cfg = load_yaml(entry.yaml_path, resolve_func=True)  # imports the task's code, as a real run does
    metrics = cfg.get("aggregate_metric_list" if entry.kind == Kind.GROUP else "metric_list") or []
    filters = [f["name"] for f in cfg.get("filter_list") or []] or ["none"]
    keys = set()
    for m in metrics:
        names = [m["metric"]] if isinstance(m["metric"], str) else [f"pass@{k}" for k in m.get("k", [1])]
        flt = [m["filter_list"]] if isinstance(m.get("filter_list"), str) else m.get("filter_list") or filters
        keys |= {f"{n},{f}" for n in names for f in flt}
    return keys


def test_every_suite_reports_metrics_its_tasks_produce(make_cfg, tmp_path):
    from moxin.eval.commands import suite_from_config
    from moxin.eval.suites import leaf_tasks

    for name in ("fewshot", "zeroshot", "olmes", "math"):
        suite, every = suite_from_config(make_cfg(f"eval={name}").eval)
        assert every == 0 and suite.name == name
        tm = task_manager(suite, tmp_path / name)
        for task in suite.tasks:
            for leaf in leaf_tasks(tm, task.name):
                reported_metric_keys(tm, leaf.name)  # every member's code imports
            assert task.metric_key in reported_metric_keys(tm, task.name), (name, task.name)
    fewshot, _ = suite_from_config(make_cfg("eval=fewshot").eval)
    assert [(t.name, t.num_fewshot, t.metric) for t in fewshot.tasks] == [
        ("arc_challenge", 25, "acc_norm"), ("hellaswag", 10, "acc_norm"), ("mmlu", 5, "acc"), ("winogrande", 5, "acc")]


def test_math_task_checks_answers_with_math_verify(eval_data_dir, tmp_path):
    from tests.test_eval_sandbox import ScriptedLM

    suite = EvalSuite(name="m", data_dir=str(eval_data_dir), tasks=[
        {"name": "minerva_math_algebra", "num_fewshot": 1, "metric": "math_verify", "column": "MATH"}])
    stated = " We get $x=0.5$.\nFinal Answer: The final answer is $0.5$. I hope it is correct."
    assert run_suite(ScriptedLM(stated), suite, tmp_path / "a")["paper_row"]["MATH"] == 100.0  # 0.5 == 1/2
    assert run_suite(ScriptedLM(" $\\boxed{2}$"), suite, tmp_path / "b")["paper_row"]["MATH"] == 0.0
    context = run_suite(ScriptedLM(""), dataclasses.replace(suite, log_samples=True), tmp_path / "c")
    prompt = context["samples"]["minerva_math_algebra"][0]["arguments"][0][0]
    assert "Final Answer: The final answer is $5$. I hope it is correct." in prompt  # the 1-shot example


def test_reasoning_suite_grades_pass_at_1_with_the_reward_code(make_cfg, eval_data_dir, tmp_path):
    from tests.test_eval_sandbox import ScriptedLM

    suite, _ = suite_from_config(make_cfg("eval=math", f"eval.data_dir={eval_data_dir}").eval)
    assert [t.column for t in suite.tasks] == ["MATH 500", "AMC", "Minerva Math", "OlympiadBench"]
    assert suite.apply_chat_template
    suite = dataclasses.replace(suite, apply_chat_template=False)  # the scripted model has no chat template
    right = ScriptedLM("<think>a half and a quarter</think> The answer is \\boxed{\\dfrac{3}{4}}.")
    context = run_suite(right, dataclasses.replace(suite, log_samples=True), tmp_path / "right")
    assert context["paper_row"] == {"MATH 500": 100.0, "AMC": 100.0, "Minerva Math": 100.0, "OlympiadBench": 100.0,
                                    "Avg": 100.0}
    samples = context["samples"]["amc_reasoning"]
    assert len(samples[0]["resps"][0]) == 4  # 4 samples per problem
    assert "within \\boxed{}" in samples[0]["arguments"][0][0]  # the GRPO prompt
    wrong = run_suite(ScriptedLM("The answer is \\boxed{0.7}."), suite, tmp_path / "wrong")
    assert wrong["paper_row"]["Avg"] == 0.0

    class Alternating(ScriptedLM):  # right, wrong, right, wrong...: pass@1 must count every sample
        def generate_until(self, requests):
            return ["\\boxed{3/4}" if i % 2 == 0 else "\\boxed{1}" for i in range(len(requests))]

    half = run_suite(Alternating(""), dataclasses.replace(suite, tasks=suite.tasks[:1]), tmp_path / "half")
    assert half["paper_row"]["MATH 500"] == 50.0


def test_evaluate_command_writes_results_table_and_wandb(make_cfg, saved_model, eval_data_dir, tmp_path, capsys):
    from moxin.train import run

    cfg = make_cfg("task=evaluate", f"ckpt={saved_model[1]}", f"eval.data_dir={eval_data_dir}", "eval.limit=3",
                   "eval.tasks=[{name: arc_easy, num_fewshot: 0, metric: acc, column: ARC-E}]",
                   "logger=default", "hardware.onednn_linears=false")
    out = run(cfg)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["paper_row"] == out["paper_row"]
    assert set(results["paper_row"]) == {"ARC-E", "Avg"}
    assert results["lm_eval"]["results"]["arc_easy"]["acc,none"] * 100 == pytest.approx(results["paper_row"]["ARC-E"])
    assert "ARC-E" in capsys.readouterr().out
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*")), "no offline W&B run in the run folder"


def test_evaluate_needs_a_checkpoint(make_cfg):
    from moxin.train import run

    with pytest.raises(ValueError, match="needs ckpt="):
        run(make_cfg("task=evaluate"))


def test_model_label():
    assert model_label("outputs/demo/2026-01-01/final") == "2026-01-01"
    assert model_label("outputs/demo/run1/checkpoints/step-10.ckpt") == "run1/step-10"
    assert model_label("/models/Moxin-7B-DPO/") == "Moxin-7B-DPO"


@pytest.mark.slow
def test_eval_callback_runs_the_suite_during_training(make_cfg, eval_data_dir, tmp_path):
    from moxin.train import run

    cfg = make_cfg("phase.max_steps=2", "phase.val_every_steps=2", "phase.validate_before_training=false",
                   "eval.every_n_steps=1", f"eval.data_dir={eval_data_dir}", "eval.limit=2", "eval.max_length=64",
                   "eval.tasks=[{name: arc_easy, num_fewshot: 0, metric: acc, column: ARC-E}]")
    run(cfg)
    for step in (1, 2):
        results = json.loads((tmp_path / "run" / "eval" / f"step-{step}" / "results.json").read_text())
        assert set(results["paper_row"]) == {"ARC-E", "Avg"}
    logged = (tmp_path / "run" / "csv" / "metrics.csv").read_text().splitlines()
    header = logged[0].split(",")
    assert "eval/fewshot/ARC-E" in header
    column = header.index("eval/fewshot/ARC-E")
    assert sum(1 for line in logged[1:] if line.split(",")[column]) == 2


@pytest.mark.slow
def test_lm_eval_command_line_runs_model_type_moxin(saved_model, eval_data_dir, tmp_path):
    import subprocess
    import sys

    # The suite's generated task files point arc_easy at the local copy; the CLI reads them.
    task_manager(EvalSuite(name="s", data_dir=str(eval_data_dir), tasks=[{"name": "arc_easy", "num_fewshot": 0}]),
                 tmp_path)
    out = subprocess.run(
        [sys.executable, "-m", "moxin.eval", "run", "--model", "moxin", "--model_args",
         f"ckpt={saved_model[1]},max_length=64", "--tasks", "arc_easy", "--limit", "2",
         "--include_path", str(tmp_path / "task_overrides"), "--output_path", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "arc_easy" in out.stdout and "acc_norm" in out.stdout
