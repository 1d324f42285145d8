"""Decode speed: moxin's generate (rolling-buffer KV cache) vs transformers' `generate`.

One process, the same random weights (ours exported with save_hf, loaded by transformers), the
same 64-token prompts, greedy, 256 new tokens, fp32: tokens/s at batch 1 and batch 8. The process
is set up as hardware=cpu sets it up (glibc keeps freed memory; ours computes its products through
oneDNN, with weights packed per generate call; --mkl: PyTorch's default kernels). Neither
side stops early (transformers gets eos_token_id=None). Also the cache's bytes for sequences of
W, 4W and 16W tokens, which the rolling buffer keeps equal. Prints one JSON line last.

    python experiments/benchmarks/decode.py [--new 256] [--repeats 6]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from moxin.generate import RollingKVCache, generate
from moxin.model import ModelConfig, Transformer
from moxin.system import configure_cpu


def tokens_per_s(runs: dict, batch: int, new_tokens: int, repeats: int) -> dict[str, float]:
    """Best tokens/s of each run. The runs alternate, so that a slow spell of a shared machine
    slows both sides rather than one."""
    best = dict.fromkeys(runs, float("inf"))
    for run in runs.values():
        run()  # warm-up
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: batch * new_tokens / seconds for name, seconds in best.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--mkl", action="store_true", help="ours on PyTorch's default CPU kernels (no oneDNN)")
    args = parser.parse_args()

    from transformers import MistralForCausalLM

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=32000, dim=512, n_layers=8, n_heads=8, n_kv_heads=2, head_dim=64,
                      hidden_dim=1536, sliding_window=256, max_seq_len=32768)
    ours = Transformer(cfg).eval()
    with tempfile.TemporaryDirectory() as folder:
        ours.save_hf(folder)
        hf = MistralForCausalLM.from_pretrained(folder, attn_implementation="sdpa", dtype=torch.float32).eval()

    configure_cpu(tune_allocator=True, onednn_linears=not args.mkl)  # as hardware=cpu runs generate
    result = {}
    for batch in (1, 8):
        prompts = torch.randint(3, cfg.vocab_size, (batch, args.prompt), generator=torch.Generator().manual_seed(batch))
        mask = torch.ones_like(prompts)

        def run_ours(prompts=prompts):
            return generate(ours, prompts.tolist(), max_new_tokens=args.new)

        def run_hf(prompts=prompts, mask=mask):
            with torch.inference_mode():
                return hf.generate(input_ids=prompts, attention_mask=mask, max_new_tokens=args.new,
                                   do_sample=False, eos_token_id=None, pad_token_id=0)

        same = [row[args.prompt:] for row in run_hf().tolist()] == run_ours().tokens
        result[batch] = tokens_per_s({"ours": run_ours, "baseline": run_hf}, batch, args.new, args.repeats)
        result[batch]["same_tokens"] = same

    zero = torch.zeros(1, dtype=torch.long)
    w = cfg.sliding_window
    cache_bytes = [RollingKVCache(cfg, 1, n, zero, torch.float32, "cpu").nbytes for n in (w, 4 * w, 16 * w)]
    print(json.dumps({
        "bench": "decode", "ours": round(result[1]["ours"], 1), "baseline": round(result[1]["baseline"], 1),
        "ratio": round(result[1]["ours"] / result[1]["baseline"], 3), "unit": "tokens/s",
        "ours_batch8": round(result[8]["ours"], 1), "baseline_batch8": round(result[8]["baseline"], 1),
        "ratio_batch8": round(result[8]["ours"] / result[8]["baseline"], 3), "cache_bytes": cache_bytes,
        "same_greedy_tokens": result[1]["same_tokens"] and result[8]["same_tokens"],
        "config": {"vocab": 32000, "dim": 512, "layers": 8, "heads": 8, "kv_heads": 2, "hidden": 1536,
                   "window": w, "ours_cpu_kernels": "mkl" if args.mkl else "onednn",
                   "prompt": args.prompt, "new_tokens": args.new, "dtype": "fp32",
                   "threads": torch.get_num_threads()},
    }))


if __name__ == "__main__":
    main()
