"""task=quant_eval: what each GGUF quantization type costs, before anyone deploys it.

    python run.py task=quant_eval ckpt=outputs/dpo_tulu3/<time> quant=[q8_0,q4_0] [quant_eval.suite=true]

For each type the model is exported to GGUF (moxin/gguf_export.py), read back and dequantized into
our model, then measured beside the unquantized one: perplexity on held-out sequences of the `data`
option's validation split, the file's size and, with quant_eval.suite=true, the accuracy of the
`eval` suite. Writes quant_eval.json and quant_eval.md in the run folder and prints the table.
An instruct or reasoning model is measured on its own kind of data: pick an SFT data option
(e.g. +experiment=cot_sft_openr1), whose replies only are scored.
"""

from __future__ import annotations

import gc
import json
import math
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig


@torch.no_grad()
def perplexity(model, sequences: list[dict[str, torch.Tensor]], batch_size: int = 8) -> float:
    """exp(mean next-token cross-entropy) of held-out items (input_ids and their labels, as the
    trainer's validation sees them)."""
    total, count = 0.0, 0
    for start in range(0, len(sequences), batch_size):
        items = sequences[start:start + batch_size]
        inputs, labels = (torch.stack([torch.as_tensor(i[k], dtype=torch.long) for i in items])
                          for k in ("input_ids", "labels"))
        segments = torch.stack([i["segments"] for i in items]) if "segments" in items[0] else None
        logits = model(inputs, segments=segments).float()  # packed chat rows: each conversation alone
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum",
                                                 ignore_index=-100)
        total, count = total + float(loss), count + int((labels != -100).sum())
    return math.exp(total / count)


def held_out_sequences(cfg: DictConfig, limit: int) -> list[dict[str, torch.Tensor]]:
    from hydra.utils import instantiate

    from moxin.data import PretrainDataModule
    from moxin.data.chat_data import ChatDataConfig, chat_datamodule

    data_cfg = instantiate(cfg.data)
    if isinstance(data_cfg, ChatDataConfig) and data_cfg.format != "sft":
        raise ValueError(f"quant_eval measures perplexity on text or SFT conversations; data.format is "
                         f"{data_cfg.format!r} (pick a pretraining or SFT data option)")
    data = chat_datamodule(data_cfg) if isinstance(data_cfg, ChatDataConfig) else PretrainDataModule(data_cfg)
    data.prepare_data()
    data.setup("validate")
    sequences = [data.val_dataset[i] for i in range(min(limit, len(data.val_dataset)))]
    if not sequences:
        raise ValueError("the data option has no validation sequences to measure perplexity on")
    return sequences


def quant_eval_task(cfg: DictConfig) -> dict[str, Any]:
    from moxin.checkpoint import load_model, tokenizer_for
    from moxin.gguf_export import export_gguf, ggml_type, load_gguf

    if not cfg.ckpt:
        raise ValueError("task=quant_eval needs ckpt=PATH (a Hugging Face folder, a run folder or a .ckpt)")
    chosen = cfg.quant if isinstance(cfg.quant, str) else ",".join(cfg.quant)  # quant=[q8_0,q4_0] or "q8_0,q4_0"
    types = [t.strip().lower() for t in chosen.split(",") if t.strip()]
    for name in types:
        ggml_type(name)  # an unknown type fails here, before any work
    run_dir = Path(cfg.paths.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    model = load_model(cfg.ckpt).float().eval()
    tokenizer = tokenizer_for(cfg.ckpt, cfg.data.tokenizer)
    sequences = held_out_sequences(cfg, cfg.quant_eval.max_sequences)

    def measure(name: str, variant, megabytes: float) -> dict[str, float]:
        row = {"perplexity": perplexity(variant, sequences), "megabytes": megabytes}
        if cfg.quant_eval.suite:
            row.update(_suite_scores(cfg, variant, tokenizer, run_dir / "suite" / name.split()[0]))
        print(f"{name}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()))
        return row

    rows = {"unquantized (fp32)": measure("unquantized (fp32)", model,
                                         sum(p.numel() * 4 for p in model.parameters()) / 1e6)}
    for name in types:  # one dequantized copy at a time: a 7B model is 28 GB in fp32
        path = export_gguf(model, tokenizer, run_dir / "gguf" / f"model-{name}.gguf", name)
        restored = load_gguf(path).eval()
        rows[name] = measure(name, restored, path.stat().st_size / 1e6)
        del restored
        gc.collect()

    table = markdown_table(rows, len(sequences))
    print(table)
    (run_dir / "quant_eval.md").write_text(table)
    (run_dir / "quant_eval.json").write_text(json.dumps(rows, indent=2))
    metrics = {f"quant/{name.split()[0]}/{key}": value for name, row in rows.items() for key, value in row.items()}
    return {"table": table, "metrics": metrics, "run_dir": str(run_dir)}


def _suite_scores(cfg: DictConfig, model, tokenizer, work_dir: Path) -> dict[str, float]:
    """The `eval` suite's paper row for a model held in memory."""
    from moxin.eval.commands import suite_from_config
    from moxin.eval.lm import MoxinLM
    from moxin.eval.runner import run_suite, summary_metrics

    suite, _ = suite_from_config(cfg.eval)
    lm = MoxinLM(model=model, tokenizer=tokenizer, batch_size=suite.batch_size, max_length=suite.max_length,
                 max_gen_toks=suite.max_gen_toks)
    return summary_metrics(run_suite(lm, suite, work_dir)["paper_row"], suite)


def markdown_table(rows: dict[str, dict[str, float]], sequences: int) -> str:
    columns = list(dict.fromkeys(key for row in rows.values() for key in row))
    lines = [f"**Quantization cost (perplexity on {sequences} held-out sequences)**", "",
             "| type | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for name, row in rows.items():
        cells = ["–" if row.get(c) is None else f"{row[c]:.3f}" for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
