"""Training throughput: moxin's Transformer vs transformers' MistralForCausalLM.

Both models get the same weights (ours exported with save_hf, loaded by transformers), the same
batches and the same AdamW settings; each training step is forward + backward + optimizer step,
fp32. Each runs as its trainer runs it: ours with the chunked linear cross-entropy of
PretrainModule (no full logits) and, on the CPU, oneDNN products (hardware/cpu.yaml; --mkl
turns that off); the baseline with full logits + cross-entropy on PyTorch's default kernels.
Rounds alternate between the two models so that drift in the machine's speed hits both alike. Prints one JSON line last.

    python experiments/benchmarks/train_throughput.py [--steps 6] [--compile] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch

from moxin.kernels import use_onednn_linears, use_onednn_on_cpu
from moxin.losses import causal_lm_loss, linear_cross_entropy
from moxin.model import ModelConfig, Transformer
from moxin.system import keep_freed_memory_for_reuse


def make_step(model, loss_of, lr=3e-4):
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)

    def step(inputs, labels):
        loss = loss_of(inputs, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def timed(step, batches, device) -> float:
    """Seconds for one pass over batches (synchronised on GPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for inputs, labels in batches:
        step(inputs, labels)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="torch.compile each of our blocks")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--mkl", action="store_true", help="ours on PyTorch's default CPU kernels (no oneDNN)")
    args = parser.parse_args()

    from transformers import MistralForCausalLM

    device = torch.device(args.device)
    keep_freed_memory_for_reuse()  # process-wide: the baseline benefits exactly as ours does
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=32000, dim=args.dim, n_layers=args.layers, n_heads=args.dim // 64,
                      n_kv_heads=args.dim // 128, head_dim=64, hidden_dim=3 * args.dim,
                      sliding_window=4096, max_seq_len=4096)
    ours = Transformer(cfg)
    with tempfile.TemporaryDirectory() as folder:
        ours.save_hf(folder)
        baseline = MistralForCausalLM.from_pretrained(folder, attn_implementation="sdpa", dtype=torch.float32)
    ours.to(device).train()
    baseline.to(device).train()

    if args.device == "cpu" and not args.mkl:  # as hardware=cpu trains (moxin/kernels.py)
        use_onednn_on_cpu(True)
        use_onednn_linears(ours)
    if args.compile:
        for block in ours.layers:
            block.compile()
    steps = {  # each model's own training loss path, as its trainer runs it
        "ours": make_step(ours, lambda x, y: linear_cross_entropy(ours.hidden_states(x), ours.output.weight, y)),
        "baseline": make_step(
            baseline, lambda x, y: causal_lm_loss(baseline(input_ids=x, use_cache=False).logits, y)),
    }
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.vocab_size, (args.steps, args.batch, args.seq + 1), generator=gen).to(device)
    batches = [(t[:, :-1], t[:, 1:]) for t in tokens]

    for step in steps.values():  # warm-up (and compilation)
        timed(step, batches[:2], device)
    seconds = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            seconds[name].append(timed(step, batches, device))
    tokens_per_round = args.steps * args.batch * args.seq
    result = {name: tokens_per_round / statistics.median(s) for name, s in seconds.items()}
    print(json.dumps({
        "bench": "train_throughput", "ours": round(result["ours"], 1), "baseline": round(result["baseline"], 1),
        "ratio": round(result["ours"] / result["baseline"], 3), "unit": "tokens/s",
        "config": {"layers": args.layers, "dim": args.dim, "seq": args.seq, "batch": args.batch,
                   "vocab": cfg.vocab_size, "compile": args.compile, "device": args.device,
                   "ours_cpu_kernels": "mkl" if args.mkl else "onednn",
                   "threads": torch.get_num_threads(), "dtype": "fp32",
                   "baseline_impl": "transformers MistralForCausalLM (sdpa)"},
    }))


if __name__ == "__main__":
    main()
