"""GRPO step speed (rollout + update): our GRPOModule vs TRL's GRPOTrainer (use_vllm=False), on the CPU.

One process, one model (by default conf/model/tiny.yaml, the model the tiny GRPO recipe trains;
--dim/--layers give a dim x layers model instead): ours under a Lightning Trainer as `python run.py` trains it on a CPU
(oneDNN products, rollouts from moxin.generate), and the same weights exported with save_hf and
loaded as transformers' MistralForCausalLM for TRL (rollouts from transformers' generate). Same
problems, group size, completion length (the untrained model rarely stops early, so both sample
the full length), sampling temperature, KL coefficient and reward function, one optimizer step
per rollout, fp32. Speed is steps per second between consecutive steps after warm-up.
Prints one JSON line last.

    python experiments/benchmarks/grpo.py [--steps 10] [--prompts 4] [--group 4] [--new-tokens 64] [--dim 256]

At dim 128 the fp32 vocabulary head (32000 x dim), computed alike on both sides, is a smaller share of
a step than at dim 256, so the ratio is higher there (see the README's benchmark table).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from sft_dpo import LR, StepClock, fit_ours, hf_clock_callback, small_model_and_tokenizer, trl_args  # shared

from moxin.data.chat_data import ExampleArrays, PromptDataset, collate_prompts
from moxin.data.conversations import TokenizedExample
from moxin.kernels import use_onednn_on_cpu
from moxin.model import ModelConfig
from moxin.modules import GRPOConfig, GRPOModule, OptimConfig


def tiny_model_config() -> ModelConfig:
    from omegaconf import OmegaConf

    values = OmegaConf.to_container(OmegaConf.load(Path(__file__).resolve().parents[2] / "conf/model/tiny.yaml"))
    values.pop("_target_")
    return ModelConfig(**values)


def problems(n: int) -> list[dict]:
    rng = np.random.default_rng(0)
    return [{"prompt": f"What is {a} + {b}? Think step by step.", "answer": str(a + b)}
            for a, b in rng.integers(0, 50, size=(n, 2))]


def exact_answer(completions, answer, **kwargs) -> list[float]:
    """TRL's reward function: 1 when the completion contains the answer (cheap, the same on both sides)."""
    return [float(a in c) for c, a in zip(completions, answer, strict=True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=None, help="a dim x layers model instead of the tiny config")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=4, help="problems per step")
    parser.add_argument("--group", type=int, default=4, help="samples per problem")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10, help="steps per trainer (the first 2 warm up)")
    args = parser.parse_args()

    import datasets
    import trl
    from transformers import MistralForCausalLM

    tiny = None if args.dim else tiny_model_config()
    cfg, weights, tokenizer = small_model_and_tokenizer(args.dim, args.layers, tiny)
    items = problems(args.prompts * args.steps)
    result: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as folder:
        weights.save_hf(os.path.join(folder, "hf"))
        use_onednn_on_cpu(False)  # TRL's model on PyTorch's default kernels
        clock = StepClock()
        trl.GRPOTrainer(
            model=MistralForCausalLM.from_pretrained(os.path.join(folder, "hf"), attn_implementation="sdpa",
                                                     dtype=torch.float32),
            reward_funcs=exact_answer, processing_class=tokenizer, train_dataset=datasets.Dataset.from_list(items),
            args=trl_args(trl.GRPOConfig, os.path.join(folder, "trl"), args.prompts * args.group, args.steps,
                          num_generations=args.group, max_completion_length=args.new_tokens, temperature=1.0,
                          beta=0.001, use_vllm=False, shuffle_dataset=False),
            callbacks=[hf_clock_callback(clock)]).train()
        result["baseline"] = clock.steps_per_second(warmup=2)

        use_onednn_on_cpu(True)
        prompts = [tokenizer.encode(item["prompt"]) for item in items]
        dataset = PromptDataset(ExampleArrays.from_examples([TokenizedExample(np.array(p, dtype=np.int32),
                                                                              np.zeros(len(p), dtype=np.int32))
                                                             for p in prompts]), [item["answer"] for item in items])
        dataset.fit_to_steps(args.prompts)
        module = GRPOModule(cfg, OptimConfig(lr=LR, betas=(0.9, 0.999), weight_decay=0.0, warmup_steps=0,
                                             schedule="constant"),
                            grpo=GRPOConfig(group_size=args.group, max_new_tokens=args.new_tokens, temperature=1.0,
                                            kl_beta=0.001, reward="correct"))
        module.model.load_state_dict(weights.state_dict())
        module.set_reference(weights.state_dict())
        module.setup = lambda stage: setattr(module, "tokenizer", tokenizer)  # no data module here
        clock = StepClock()
        fit_ours(module, torch.utils.data.DataLoader(dataset, batch_size=args.prompts, collate_fn=collate_prompts),
                 args.steps, clock, os.path.join(folder, "ours"))
        module.verifier.close()
        result["ours"] = clock.steps_per_second(warmup=2)

    print(json.dumps({
        "bench": "grpo", "ours": round(result["ours"], 4), "baseline": round(result["baseline"], 4),
        "ratio": round(result["ours"] / result["baseline"], 3), "unit": "steps/s",
        "config": {"model": "tiny" if tiny else f"{cfg.dim}x{cfg.n_layers}", "layers": cfg.n_layers, "dim": cfg.dim,
                   "vocab": cfg.vocab_size, "prompts": args.prompts,
                   "group": args.group, "new_tokens": args.new_tokens, "steps": args.steps,
                   "threads": torch.get_num_threads(), "dtype": "fp32", "trl": trl.__version__,
                   "baseline": "TRL GRPOTrainer (use_vllm=False) on transformers MistralForCausalLM (sdpa)"},
    }))


if __name__ == "__main__":
    main()
