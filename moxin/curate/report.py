"""The data report: what each stage did to each source, as Markdown and a plot, from the manifest."""

from __future__ import annotations

import os
from typing import Any

from moxin.curate.pipeline import STAGES


def report_markdown(manifest: dict[str, Any]) -> str:
    lines = ["# Data curation report", "",
             f"Tokenizer `{manifest['tokenizer']}`, configuration hash `{manifest['config_hash']}`, "
             f"{manifest['seconds']} s.", "", "## Documents left after each stage", "",
             "| source | " + " | ".join(STAGES) + " | train tokens | val tokens |",
             "|---" * (len(STAGES) + 3) + "|"]
    for name, source in manifest["sources"].items():
        tokens = [source["streams"].get(split, {}).get("tokens", 0) for split in ("train", "val")]
        lines.append(f"| {name} | " + " | ".join(f"{source['documents'][s]:,}" for s in STAGES)
                     + f" | {tokens[0]:,} | {tokens[1]:,} |")
    for measure in ("tokens", "characters"):
        lines += ["", f"{measure.capitalize()} left after each stage (without BOS/EOS):" if measure == "tokens"
                  else "Characters left after each stage:", "", "| source | " + " | ".join(STAGES) + " |",
                  "|---" * (len(STAGES) + 1) + "|"]
        for name, source in manifest["sources"].items():
            lines.append(f"| {name} | " + " | ".join(f"{source[measure][s]:,}" for s in STAGES) + " |")

    lines += ["", "## What removed documents", "", "| source | stage | reason | documents |", "|---|---|---|---|"]
    removals = [(n, stage, reason, count) for n, s in manifest["sources"].items()
                for stage, reasons in s["removed"].items() for reason, count in reasons.items()]
    for name, stage, reason, count in sorted(removals, key=lambda r: -r[3]):
        lines.append(f"| {name} | {stage} | {reason} | {count:,} |")
    skipped = [(n, reason, count) for n, s in manifest["sources"].items()
               for reason, count in s["read_skipped"].items()]
    if skipped:
        lines += ["", "Malformed records skipped while reading:", "", "| source | reason | records |", "|---|---|---|"]
        lines += [f"| {n} | {reason} | {count:,} |" for n, reason, count in skipped]

    lines += ["", f"## Largest duplicate clusters ({manifest['duplicate_cluster_count']} in all)", ""]
    for cluster in manifest["duplicate_clusters"]:
        kept = cluster["kept"]
        lines.append(f"- {cluster['size']} documents ({cluster['profile']}); kept {kept['source']}#{kept['index']}: "
                     f"\"{kept['excerpt']}\"")
        for removed in cluster["removed"][:2]:
            lines.append(f"  - removed {removed['source']}#{removed['index']}: \"{removed['excerpt']}\"")

    hits = manifest["contamination"]
    lines += ["", f"## Contamination hits ({len(hits)} documents)", ""]
    for hit in hits[:20]:
        items = ", ".join(f"{i['benchmark']} {i['item']}" for i in hit["items"][:3])
        lines.append(f"- {hit['source']}#{hit['index']} ({items}): \"{hit['excerpt']}\"")
    return "\n".join(lines) + "\n"


def plot_stages(manifest: dict[str, Any], path: str) -> str:
    """Documents left after each stage, one line per source."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for name, source in manifest["sources"].items():
        ax.plot(STAGES, [source["documents"][s] for s in STAGES], marker="o", label=name)
    ax.set_ylabel("documents")
    ax.set_title("Documents left after each curation stage")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(manifest: dict[str, Any], out_dir: str) -> tuple[str, str]:
    """report.md and report.png in out_dir."""
    markdown = os.path.join(out_dir, "report.md")
    with open(markdown, "w") as f:
        f.write(report_markdown(manifest))
    return markdown, plot_stages(manifest, os.path.join(out_dir, "report.png"))
