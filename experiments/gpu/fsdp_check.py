"""FSDP2 as hardware=fsdp applies it, checked on one GPU with PyTorch alone (no Lightning or Hydra).

What the CPU tests cannot show: bf16 mixed precision (FSDPConfig's param_dtype bf16, fp32 gradient
reduction), activation checkpointing and torch.compile (inductor) under FSDP on CUDA, and GRPO's
gathered_weights generation in bf16. One process, so FSDP's collectives are NCCL's with one rank.

- Training: the sharded model (checkpointing + compile + FSDP2, moxin.parallel's order) and a plain
  copy under bf16 autocast take the same AdamW steps on the same batches; their losses must agree
  to bf16 precision (the first step exactly computes the same function).
- Generation: inside gathered_weights, greedy decoding from the sharded model; afterwards its
  parameters are shards again and a training step still runs.

Without a GPU it runs on the CPU in fp32 with gloo (the suite runs it so, for correctness only).
Prints one JSON line last; exits non-zero when a check fails.

    PYTHONPATH=. python experiments/gpu/fsdp_check.py [--dim 1024] [--layers 4] [--steps 6]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import torch
import torch.distributed as dist

from moxin.generate import generate
from moxin.losses import linear_cross_entropy
from moxin.model import ModelConfig, Transformer
from moxin.parallel import FSDPConfig, ParallelConfig, gathered_weights, parallelize


def loss_of(model: Transformer, tokens: torch.Tensor, autocast: bool) -> torch.Tensor:
    with torch.autocast(tokens.device.type, dtype=torch.bfloat16, enabled=autocast):
        hidden = model.hidden_states(tokens[:, :-1])
        return linear_cross_entropy(hidden, model.output.weight, tokens[:, 1:])


def train(model: Transformer, batches: list[torch.Tensor], autocast: bool) -> list[float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
    losses = []
    for tokens in batches:
        loss = loss_of(model, tokens, autocast)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()

    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    if not on_gpu:  # correctness only
        args.dim, args.layers, args.seq, args.batch, args.steps = 64, 2, 64, 2, 3
    with tempfile.TemporaryDirectory() as folder:
        dist.init_process_group("nccl" if on_gpu else "gloo", init_method=f"file://{os.path.join(folder, 'init')}",
                                rank=0, world_size=1)
        try:
            result = run_checks(args, device, on_gpu)
        finally:
            dist.destroy_process_group()
    print(json.dumps(result))
    if not result["ok"]:
        raise SystemExit(f"FSDP check failed: {result['failed']}")


def run_checks(args, device: torch.device, on_gpu: bool) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    cfg = ModelConfig(vocab_size=32000, dim=args.dim, n_layers=args.layers, n_heads=args.dim // 128 or 4,
                      n_kv_heads=max(1, args.dim // 512), head_dim=128 if args.dim >= 512 else 16,
                      hidden_dim=int(args.dim * 3.5) // 64 * 64, sliding_window=args.seq, max_seq_len=2 * args.seq)
    torch.manual_seed(0)
    plain = Transformer(cfg).to(device)
    sharded = Transformer(cfg).to(device)
    sharded.load_state_dict(plain.state_dict())
    parallel = ParallelConfig(strategy="fsdp", activation_checkpointing=True, compile=True,
                              compile_backend="inductor" if on_gpu else "aot_eager",
                              fsdp=FSDPConfig(param_dtype="bf16" if on_gpu else None, reduce_dtype="fp32"))
    parallelize(sharded, parallel, init_device_mesh(device.type, (1,)))
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=generator).to(device)
               for _ in range(args.steps)]

    plain_losses = train(plain, batches, autocast=on_gpu)
    sharded_losses = train(sharded, batches, autocast=False)  # FSDP's policy casts to bf16 itself
    tolerance = 2e-2 if on_gpu else 1e-5
    differences = [abs(a - b) / abs(b) for a, b in zip(sharded_losses, plain_losses, strict=True)]

    prompts = [[1, 415, 3198], [1, 28705]]
    with gathered_weights(sharded):
        out = generate(sharded, prompts, 16)
    generated = [len(tokens) for tokens in out.tokens] == [16, 16]
    sharded_again = all(isinstance(p, DTensor) for p in sharded.parameters())
    after = float(loss_of(sharded, batches[0], autocast=False))  # training still runs after the gather

    checks = {"losses_agree": max(differences) <= tolerance, "generated": generated,
              "sharded_after_generation": sharded_again, "finite_after_generation": after == after}
    return {"check": "fsdp", "ok": all(checks.values()), "failed": [k for k, v in checks.items() if not v],
            **checks, "device": torch.cuda.get_device_name() if on_gpu else "cpu",
            "param_dtype": parallel.fsdp.param_dtype, "compile_backend": parallel.compile_backend,
            "losses_fsdp": [round(x, 4) for x in sharded_losses], "losses_plain": [round(x, 4) for x in plain_losses],
            "max_relative_difference": round(max(differences), 6), "tolerance": tolerance,
            "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if on_gpu else None,
            "note": None if on_gpu else "no GPU: fp32 on the CPU with gloo, for correctness only"}


if __name__ == "__main__":
    main()
