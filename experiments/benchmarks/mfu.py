"""GPU training throughput and MFU of moxin_7b-shaped layers at sequence 4096, eager and compiled.

One training step = forward (hidden states + the chunked LM-head cross-entropy of PretrainModule),
backward and a fused AdamW step, under bf16 autocast with fp32 weights (hardware=gpu's bf16-mixed).
MFU = tokens/s x FLOPs per token / the device's dense bf16 peak, with FLOPs per token from
ModelConfig.flops_per_token: 6 x (non-embedding parameters + LM head) + 12 x layers x heads x head_dim
x min(seq, window), counting the whole key span although causal attention computes about half of it
(the convention of PaLM and torchtitan, whose published MFU figures this one is comparable with).
The model has moxin_7b's width, heads, vocabulary and window; it keeps as many of the 36 blocks as
fit in the device's memory (the output says how many).
"ours" is the compiled model (each block torch.compile'd, as hardware.compile=true does), "baseline"
the same model eager.

Without a GPU it runs a small model on the CPU, for correctness only (the compiled and eager losses
agree, the figures are computed): its MFU says nothing about a GPU's.

    python experiments/benchmarks/mfu.py [--layers auto] [--batch 2] [--seq 4096] [--steps 10]
        [--activation-checkpointing] [--peak-tflops 989] [--profile top_kernels.txt]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch

from moxin.losses import linear_cross_entropy
from moxin.model import ModelConfig, Transformer
from moxin.parallel import checkpoint_activations, compile_blocks

# Dense bf16 peaks (TFLOP/s, no sparsity), by a word of the device name; SXM parts (an H100 PCIe
# card peaks at 756: give --peak-tflops 756).
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0,
                    "B200": 2250.0, "GH200": 989.0}
MOXIN_7B = ModelConfig()  # the defaults are moxin_7b's shapes (conf/model/moxin_7b.yaml)


def peak_tflops(device_name: str, given: float | None) -> float:
    if given:
        return given
    for word, peak in PEAK_BF16_TFLOPS.items():
        if word in device_name:
            return peak
    raise SystemExit(f"no bf16 peak known for {device_name!r}: give --peak-tflops")


def layers_that_fit(args, device, dtype, free_bytes: int) -> int:
    """Blocks of moxin_7b that fit: the peak memory of short runs with 1 and 2 blocks (weights, gradients,
    AdamW states, autocast copies and activations), extrapolated to 90% of the free memory."""
    probe = argparse.Namespace(**{**vars(args), "steps": 2, "warmup": 1})
    peaks = [measure(ModelConfig(n_layers=n), probe, device, dtype, compiled=False)["peak_bytes"] for n in (1, 2)]
    per_block = peaks[1] - peaks[0]
    fixed = peaks[0] - per_block
    return max(1, min(MOXIN_7B.n_layers, int((0.9 * free_bytes - fixed) // per_block)))


def training_step(model: Transformer, optimizer, tokens: torch.Tensor, dtype) -> torch.Tensor:
    with torch.autocast(tokens.device.type, dtype=dtype, enabled=dtype != torch.float32):
        hidden = model.hidden_states(tokens[:, :-1])
        loss = linear_cross_entropy(hidden, model.output.weight, tokens[:, 1:])
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def measure(cfg: ModelConfig, args, device, dtype, compiled: bool) -> dict:
    torch.manual_seed(0)
    with device:  # built on the device: no initialisation and copy of billions of weights on the CPU
        model = Transformer(cfg)
    if args.activation_checkpointing:
        checkpoint_activations(model)
    if compiled:
        compile_blocks(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.1,
                                  fused=device.type in ("cuda", "cpu"))
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=generator).to(device)
               for _ in range(args.steps)]
    first_loss = float(training_step(model, optimizer, batches[0], dtype))
    for tokens in batches[1:args.warmup]:  # warm-up: compilation, allocator, autotuning
        training_step(model, optimizer, tokens, dtype)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for tokens in batches:
        training_step(model, optimizer, tokens, dtype)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak_memory = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    if args.profile and compiled:
        write_profile(args.profile, model, optimizer, batches[:2], dtype)
    del model, optimizer, batches
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"tokens_per_s": args.steps * args.batch * args.seq / seconds, "first_loss": first_loss,
            "peak_bytes": peak_memory, "peak_memory_gib": round(peak_memory / 2**30, 1) if peak_memory else None}


def write_profile(path: str, model, optimizer, batches, dtype) -> None:
    """The kernels that took the device's time over two more steps, most first: where an MFU short of
    its target goes."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as profiler:
        for tokens in batches:
            training_step(model, optimizer, tokens, dtype)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    with open(path, "w") as f:
        f.write(profiler.key_averages().table(sort_by=sort, row_limit=30, max_name_column_width=90))


def measure_both(cfg: ModelConfig, args, device, dtype) -> tuple[ModelConfig, dict, dict]:
    """Eager and compiled on the same blocks; on running out of memory, two blocks fewer for both."""
    while True:
        try:
            eager = measure(cfg, args, device, dtype, compiled=False)
            print(f"eager, {cfg.n_layers} blocks: {eager['tokens_per_s']:.1f} tokens/s", flush=True)
            return cfg, eager, measure(cfg, args, device, dtype, compiled=True)
        except torch.OutOfMemoryError:
            if cfg.n_layers <= 2:
                raise
            cfg = dataclasses.replace(cfg, n_layers=cfg.n_layers - 2)
            torch.cuda.empty_cache()
            print(f"out of memory: retrying with {cfg.n_layers} blocks", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default="auto", help="blocks of moxin_7b to keep (auto: as many as fit)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak")
    parser.add_argument("--profile", default=None, help="write the compiled steps' top kernels to this file")
    args = parser.parse_args()

    on_gpu = torch.cuda.is_available()
    if on_gpu:
        device, dtype = torch.device("cuda"), torch.bfloat16
        name = torch.cuda.get_device_name()
        peak = peak_tflops(name, args.peak_tflops)
        free, _ = torch.cuda.mem_get_info()
        layers = layers_that_fit(args, device, dtype, free) if args.layers == "auto" else int(args.layers)
        print(f"{name}: {layers} of {MOXIN_7B.n_layers} blocks fit in {free / 2**30:.0f} GiB", flush=True)
        cfg = ModelConfig(n_layers=layers)
    else:  # correctness only: a small model of the same family, fp32
        device, dtype, name, peak = torch.device("cpu"), torch.float32, "cpu", args.peak_tflops or 0.45
        args.seq, args.batch, args.steps, args.warmup = min(args.seq, 256), min(args.batch, 2), min(args.steps, 3), 2
        cfg = ModelConfig(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=64, hidden_dim=768,
                          sliding_window=256, max_seq_len=512)
    cfg, eager, compiled = measure_both(cfg, args, device, dtype)
    layers = cfg.n_layers
    flops_per_token = cfg.flops_per_token(args.seq)
    mfu = compiled["tokens_per_s"] * flops_per_token / (peak * 1e12)
    # The first step runs before any update: compiled and eager must compute the same loss.
    agree = abs(compiled["first_loss"] - eager["first_loss"]) <= 2e-2 * abs(eager["first_loss"])
    print(json.dumps({
        "bench": "mfu", "ours": round(compiled["tokens_per_s"], 1), "mfu": round(mfu, 4),
        "baseline": round(eager["tokens_per_s"], 1),
        "ratio": round(compiled["tokens_per_s"] / eager["tokens_per_s"], 3), "unit": "tokens/s/GPU",
        "eager_mfu": round(eager["tokens_per_s"] * flops_per_token / (peak * 1e12), 4),
        "device": name, "layers": layers, "of_layers": MOXIN_7B.n_layers, "seq": args.seq, "batch": args.batch,
        "activation_checkpointing": args.activation_checkpointing, "peak_tflops": peak,
        "flops_per_token": flops_per_token, "peak_memory_gib": compiled["peak_memory_gib"],
        "losses_agree": agree, "dtype": str(dtype).removeprefix("torch."),
        "note": None if on_gpu else "no GPU: a small model on the CPU, for correctness only; not an MFU figure",
    }))
    if not agree:
        raise SystemExit(f"compiled and eager first-step losses differ: {compiled['first_loss']} vs "
                         f"{eager['first_loss']}")


if __name__ == "__main__":
    main()
