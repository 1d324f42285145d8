"""The 4-process pipeline layouts against one process, through run.py on the CPU (gloo, fp32).

    python experiments/launch/pipeline_layouts.py [--out outputs/pipeline_layouts]

Trains tiny_debug for 6 steps with 16 rows per optimizer step: once in one process, then on 4
processes as pp 2 x 2 replicas, pp 2 x tp 2 (GPipe, activation checkpointing) and pp 2 x HSDP (2
replicas of shard groups of 1). Each layout must log the one process's training and validation losses
within 1e-5 (relative). Prints a JSON line per layout, and exits non-zero if one differs or fails. The
suite runs pp 2 on 2 processes; these need 4 and take about a minute each on 2 cores.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
COMMON = ("+experiment=tiny_debug", "phase.max_steps=6", "phase.val_every_steps=3", "phase.log_every_steps=1",
          "phase.validate_before_training=true", "hardware.onednn_linears=false", "eval.every_n_steps=0",
          "progress_bar=false", "logger=csv")
# Validation batches are single micro-batches: 4 of them per replica hold the one process's 2 x 16 rows.
PIPELINE = ("hardware=fsdp", "hardware.fsdp.param_dtype=null", "hardware.accelerator=cpu", "hardware.devices=4",
            "hardware.fsdp.pipeline_parallel=2", "phase.limit_val_batches=4")
LAYOUTS = {  # 16 rows per step in each
    "pp2_dp2": ("context.micro_batch_size=4", "phase.accumulate_grad_batches=2"),
    "pp2_tp2_gpipe_checkpointing": ("hardware.fsdp.tensor_parallel=2", "context.micro_batch_size=8",
                                    "phase.accumulate_grad_batches=2", "hardware.fsdp.pipeline_schedule=GPipe",
                                    "hardware.activation_checkpointing=true"),
    "pp2_hsdp": ("hardware.fsdp.shard_size=1", "context.micro_batch_size=4", "phase.accumulate_grad_batches=2"),
}


def metrics(run_dir: Path) -> tuple[dict[int, float], list[float]]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    return ({int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")},
            [float(r["val/loss"]) for r in rows if r.get("val/loss")])


def run(out: Path, name: str, overrides: tuple[str, ...], processes: int) -> Path:
    folder = out / name
    launcher = ("-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}") if processes > 1 else ()
    command = [sys.executable, *launcher, "run.py", *COMMON, *overrides, f"paths.output_root={folder}",
               f"hydra.run.dir={folder / 'run'}"]
    with open(out / f"{name}.log", "w") as log:
        done = subprocess.run(command, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=log,
                              stderr=subprocess.STDOUT, timeout=900)
    if done.returncode:
        raise RuntimeError(f"{name} failed (exit {done.returncode}): see {out / (name + '.log')}")
    return folder / "run"


def largest_difference(ours: list[float], reference: list[float]) -> float:
    if len(ours) != len(reference):
        return float("inf")
    return max(abs(a - b) / abs(b) for a, b in zip(ours, reference, strict=True))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="outputs/pipeline_layouts")
    out = Path(parser.parse_args().out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    train, val = metrics(run(out, "one_process", ("context.micro_batch_size=16",), processes=1))
    status = 0
    for name, overrides in LAYOUTS.items():
        try:
            layout_train, layout_val = metrics(run(out, name, (*PIPELINE, *overrides), processes=4))
            worst = max(largest_difference([layout_train.get(s, float("nan")) for s in sorted(train)],
                                           [train[s] for s in sorted(train)]),
                        largest_difference(layout_val, val))
        except RuntimeError as error:
            print(error, file=sys.stderr)
            worst = float("inf")
        ok = worst <= 1e-5
        status |= not ok
        print(json.dumps({"check": "pipeline_layout", "layout": name, "max_relative_difference": worst, "ok": ok}))
    return status


if __name__ == "__main__":
    sys.exit(main())
