"""Post-training step speed: our SFT and DPO steps vs TRL's SFTTrainer and DPOTrainer.

One process, one small model: ours (moxin.modules.SFTModule / DPOModule under a Lightning Trainer,
as `python run.py` trains them on a CPU: oneDNN products, hardware/cpu.yaml) and the same weights
exported with save_hf and loaded as transformers' MistralForCausalLM for TRL. Both train on the same
token ids, in the same batches (TRL tokenises the conversations first; our batches are built from its
ids), with AdamW at the same settings, fp32. DPO uses the sigmoid loss and a frozen reference copy on
both sides. Speed is steps per second between consecutive optimizer steps (data loading included),
median over the timed steps after warm-up. Prints one JSON line last.

    python experiments/benchmarks/sft_dpo.py [--steps 12] [--batch 4] [--seq 256]
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import statistics
import tempfile
import time

import numpy as np
import torch

from moxin.chat import CHAT_TEMPLATE
from moxin.data.chat_data import ExampleArrays, PackedChatDataset, PreferenceDataset, collate_pairs, pack_conversations
from moxin.data.conversations import TokenizedExample
from moxin.kernels import use_onednn_linears, use_onednn_on_cpu
from moxin.losses import IGNORE_INDEX
from moxin.model import ModelConfig, Transformer
from moxin.modules import DPOConfig, DPOModule, OptimConfig, SFTModule
from moxin.system import keep_freed_memory_for_reuse
from moxin.tokenizer import load_tokenizer

LR = 1e-5


def _words(rng: np.random.Generator, n: int) -> str:
    vocabulary = "river stone cloud bread house light green water table music garden window paper".split()
    return " ".join(rng.choice(vocabulary, size=n))


def sft_dataset(n: int, seq: int):
    """Pre-tokenised conversations of exactly `seq` + 1 tokens, trained on their replies (TRL's
    `input_ids` + `completion_mask` columns)."""
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(n):
        ids = rng.integers(3, 32000, size=seq + 1).tolist()
        prompt = int(rng.integers(seq // 4, seq // 2))
        rows.append({"input_ids": ids, "completion_mask": [0] * prompt + [1] * (seq + 1 - prompt)})
    return rows


def dpo_dataset(n: int, seq: int):
    rng = np.random.default_rng(1)
    words = seq // 6  # about seq / 2 tokens of prompt, seq / 4 per reply after the template
    return [{"prompt": [{"role": "user", "content": _words(rng, words)}],
             "chosen": [{"role": "assistant", "content": _words(rng, words // 2)}],
             "rejected": [{"role": "assistant", "content": _words(rng, words // 2)}]} for _ in range(n)]


class StepClock:
    """Times between consecutive optimizer steps."""

    def __init__(self):
        self.stamps: list[float] = []

    def tick(self) -> None:
        self.stamps.append(time.perf_counter())

    def steps_per_second(self, warmup: int) -> float:
        gaps = np.diff(self.stamps[warmup:])
        return 1.0 / statistics.median(gaps)


def hf_clock_callback(clock: StepClock):
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            clock.tick()

    return Clock()


def lightning_clock_callback(clock: StepClock):
    from lightning.pytorch.callbacks import Callback

    class Clock(Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            clock.tick()

    return Clock()


def fit_ours(module, loader, steps: int, clock: StepClock, folder: str) -> None:
    import lightning as L

    use_onednn_linears(module)
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=folder,
                        num_sanity_val_steps=0, limit_val_batches=0, callbacks=[lightning_clock_callback(clock)])
    trainer.fit(module, train_dataloaders=loader)


def small_model_and_tokenizer(dim: int, layers: int, config: ModelConfig | None = None
                              ) -> tuple[ModelConfig, Transformer, object]:
    """Quiet logs, seeded weights of a small Moxin-shaped model (`config`, else dim x layers), and a
    tokenizer carrying the chat template and a pad token (TRL needs both): what both sides of a
    post-training benchmark start from."""
    import datasets

    logging.getLogger("lightning").setLevel(logging.ERROR)
    datasets.disable_progress_bars()
    keep_freed_memory_for_reuse()
    torch.manual_seed(0)
    cfg = config or ModelConfig(vocab_size=32000, dim=dim, n_layers=layers, n_heads=dim // 64,
                                n_kv_heads=max(1, dim // 128), head_dim=64, hidden_dim=3 * dim, sliding_window=4096,
                                max_seq_len=4096)
    tokenizer = copy.deepcopy(load_tokenizer())
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.pad_token = tokenizer.eos_token
    return cfg, Transformer(cfg), tokenizer


def trl_args(cls, folder: str, batch: int, steps: int, **extra):
    return cls(output_dir=folder, per_device_train_batch_size=batch, max_steps=steps, learning_rate=LR,
               lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999,
               adam_epsilon=1e-8, report_to="none", save_strategy="no", logging_strategy="no", use_cpu=True,
               dataloader_num_workers=0, disable_tqdm=True, seed=0, gradient_checkpointing=False, **extra)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4, help="SFT rows / DPO pairs per step")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per trainer (the first 3 warm up)")
    args = parser.parse_args()

    import datasets
    import trl
    from transformers import MistralForCausalLM

    cfg, weights, tokenizer = small_model_and_tokenizer(args.dim, args.layers)
    n = args.batch * args.steps
    result: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as folder:
        weights.save_hf(os.path.join(folder, "hf"))
        hf = lambda: MistralForCausalLM.from_pretrained(os.path.join(folder, "hf"),  # noqa: E731
                                                        attn_implementation="sdpa", dtype=torch.float32)
        use_onednn_on_cpu(False)  # TRL's model on PyTorch's default kernels

        # --- SFT ---
        rows = sft_dataset(n, args.seq)
        clock = StepClock()
        trl.SFTTrainer(model=hf(), processing_class=tokenizer, train_dataset=datasets.Dataset.from_list(rows),
                       args=trl_args(trl.SFTConfig, os.path.join(folder, "trl_sft"), args.batch, args.steps,
                                     max_length=args.seq + 1, completion_only_loss=True, packing=False),
                       callbacks=[hf_clock_callback(clock)]).train()
        result["sft_baseline"] = clock.steps_per_second(warmup=3)

        use_onednn_on_cpu(True)
        examples = [TokenizedExample(np.array(r["input_ids"][:-1], dtype=np.int32),
                                     np.where(np.array(r["completion_mask"][1:]) == 1, r["input_ids"][1:],
                                              IGNORE_INDEX).astype(np.int32)) for r in rows]
        packed = pack_conversations(ExampleArrays.from_examples(examples), args.seq, tokenizer.eos_token_id, pack=False)
        dataset = PackedChatDataset(packed)
        dataset.fit_to_steps(args.batch)
        module = SFTModule(cfg, OptimConfig(lr=LR, betas=(0.9, 0.999), weight_decay=0.0, warmup_steps=0,
                                            schedule="constant"))
        module.model.load_state_dict(weights.state_dict())
        clock = StepClock()
        fit_ours(module, torch.utils.data.DataLoader(dataset, batch_size=args.batch), args.steps, clock,
                 os.path.join(folder, "ours_sft"))
        result["sft_ours"] = clock.steps_per_second(warmup=3)

        # --- DPO ---
        use_onednn_on_cpu(False)
        clock = StepClock()
        dpo = trl.DPOTrainer(model=hf(), processing_class=tokenizer,
                             train_dataset=datasets.Dataset.from_list(dpo_dataset(n, args.seq)),
                             args=trl_args(trl.DPOConfig, os.path.join(folder, "trl_dpo"), args.batch, args.steps,
                                           loss_type=["sigmoid"], beta=0.1, max_length=args.seq,
                                           precompute_ref_log_probs=False),
                             callbacks=[hf_clock_callback(clock)])
        pairs = list(dpo.train_dataset)
        dpo.train()
        result["dpo_baseline"] = clock.steps_per_second(warmup=3)

        use_onednn_on_cpu(True)

        def side(pair, name):
            ids = np.array(pair["prompt_ids"] + pair[name], dtype=np.int32)
            labels = np.full(len(ids) - 1, IGNORE_INDEX, dtype=np.int32)
            labels[len(pair["prompt_ids"]) - 1:] = ids[len(pair["prompt_ids"]):]
            return TokenizedExample(ids[:-1], labels)

        dataset = PreferenceDataset(ExampleArrays.from_examples([side(p, "chosen_ids") for p in pairs]),
                                    ExampleArrays.from_examples([side(p, "rejected_ids") for p in pairs]))
        module = DPOModule(cfg, OptimConfig(lr=LR, betas=(0.9, 0.999), weight_decay=0.0, warmup_steps=0,
                                            schedule="constant"), dpo=DPOConfig(loss="sigmoid", beta=0.1))
        module.model.load_state_dict(weights.state_dict())
        module.set_reference(weights.state_dict())
        clock = StepClock()
        loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch,
                                             collate_fn=lambda items: collate_pairs(items, tokenizer.eos_token_id))
        fit_ours(module, loader, args.steps, clock, os.path.join(folder, "ours_dpo"))
        result["dpo_ours"] = clock.steps_per_second(warmup=3)

    tokens_per_pair = float(np.mean([len(p["prompt_ids"]) * 2 + len(p["chosen_ids"]) + len(p["rejected_ids"])
                                     for p in pairs]))
    print(json.dumps({
        "bench": "sft_dpo", "ours": round(result["dpo_ours"], 3), "baseline": round(result["dpo_baseline"], 3),
        "ratio": round(result["dpo_ours"] / result["dpo_baseline"], 3), "unit": "dpo steps/s",
        "sft_ours": round(result["sft_ours"], 3), "sft_baseline": round(result["sft_baseline"], 3),
        "sft_ratio": round(result["sft_ours"] / result["sft_baseline"], 3),
        "config": {"layers": args.layers, "dim": args.dim, "vocab": cfg.vocab_size, "sft_seq": args.seq,
                   "batch": args.batch, "dpo_tokens_per_pair": round(tokens_per_pair, 1), "steps": args.steps,
                   "threads": torch.get_num_threads(), "dtype": "fp32", "trl": trl.__version__,
                   "baseline": "TRL SFTTrainer / DPOTrainer on transformers MistralForCausalLM (sdpa), no "
                               "gradient checkpointing; SFTTrainer also logs entropy and token accuracy"},
    }))


if __name__ == "__main__":
    main()
