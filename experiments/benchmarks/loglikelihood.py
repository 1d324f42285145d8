"""Log-likelihood requests/s: our lm-eval model (`moxin`) vs lm-eval's own `HFLM`.

One process, the same random weights (ours exported with save_hf, loaded by HFLM from that
folder with the same tokenizer), the same requests, the same batch size, fp32 on the CPU. The
requests imitate the paper's multiple-choice suites, cut from KJV text: ARC-like (a short
question, four answers of a few words), HellaSwag-like (a longer context, four endings of a
sentence), MMLU-like (a long question, four one-letter answers) and Winogrande-like (two
contexts, one shared continuation). Ours runs as hardware=cpu runs it (oneDNN products; --mkl
for PyTorch's defaults). Also the largest per-request difference between the two, which must
stay within 1e-4. Prints one JSON line last.

    python experiments/benchmarks/loglikelihood.py [--items 40] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time

import torch


def suite_like_requests(items: int, seed: int = 0) -> list[tuple[str, str]]:
    """(context, continuation) pairs shaped like ARC, HellaSwag, MMLU and Winogrande items."""
    from moxin.data.sources import SourceConfig, iter_documents

    words = " ".join(iter_documents(SourceConfig(name="kjv", kind="kjv", max_documents=60))).split()
    rng = random.Random(seed)

    def text(n: int) -> str:
        start = rng.randrange(len(words) - n)
        return " ".join(words[start:start + n])

    requests = []
    for _ in range(items):
        question = f"Question: {text(rng.randint(15, 30))}?\nAnswer:"
        requests += [(question, " " + text(rng.randint(2, 8))) for _ in range(4)]  # ARC
        context = text(rng.randint(40, 70))
        requests += [(context, " " + text(rng.randint(10, 25))) for _ in range(4)]  # HellaSwag
        mmlu = f"{text(rng.randint(50, 90))}\nA. {text(5)}\nB. {text(5)}\nC. {text(5)}\nD. {text(5)}\nAnswer:"
        requests += [(mmlu, f" {letter}") for letter in "ABCD"]  # MMLU
        sentence, ending = text(rng.randint(12, 20)), " " + text(rng.randint(5, 10))
        requests += [(f"{sentence} {option}", ending) for option in (text(1), text(1))]  # Winogrande
    return requests


def requests_per_s(lm, requests, repeats: int) -> tuple[float, list[float]]:
    lm.loglikelihood(requests[:16], disable_tqdm=True)  # warm-up
    best, scores = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        scores = lm.loglikelihood(requests, disable_tqdm=True)
        best = min(best, time.perf_counter() - start)
    return len(requests) / best, [s[0] for s in scores]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=40, help="items of each of the four kinds")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--mkl", action="store_true", help="ours on PyTorch's default CPU kernels (no oneDNN)")
    args = parser.parse_args()

    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from moxin.eval import MoxinLM
    from moxin.kernels import use_onednn_on_cpu
    from moxin.model import ModelConfig, Transformer
    from moxin.tokenizer import load_tokenizer

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=32000, dim=512, n_layers=8, n_heads=8, n_kv_heads=2, head_dim=64,
                      hidden_dim=1536, sliding_window=256, max_seq_len=4096)
    model = Transformer(cfg).eval()
    tokenizer = load_tokenizer()
    with tempfile.TemporaryDirectory() as folder:
        model.save_hf(folder)
        tokenizer.save_pretrained(folder)
        baseline = HFLM(pretrained=folder, batch_size=args.batch_size, device="cpu", dtype="float32")
    ours = MoxinLM(model=model, tokenizer=tokenizer, batch_size=args.batch_size)

    pairs = suite_like_requests(args.items)
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    use_onednn_on_cpu(not args.mkl)
    ours_rate, ours_scores = requests_per_s(ours, requests, args.repeats)
    use_onednn_on_cpu(False)
    base_rate, base_scores = requests_per_s(baseline, requests, args.repeats)
    print(json.dumps({
        "bench": "loglikelihood", "ours": round(ours_rate, 1), "baseline": round(base_rate, 1),
        "ratio": round(ours_rate / base_rate, 3), "unit": "requests/s", "requests": len(requests),
        "max_abs_diff": float(max(abs(a - b) for a, b in zip(ours_scores, base_scores, strict=True))),
    }))


if __name__ == "__main__":
    main()
