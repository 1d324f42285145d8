"""Runs -> the paper's tables: models as rows, benchmarks as columns, an average, published rows beside ours.

A table is defined by a YAML file under experiments/tables/ (see experiments/tables/README.md): its
columns (label -> metric of a run record), its rows (which runs: by experiment, tags or sweep) and
the CSV of the paper's published rows. Runs are read from `results.json` files under a folder
(moxin/records.py writes one per run) or through the W&B API. An evaluation run counts for the model
it evaluated, so a model's row gathers its training metrics and every suite it was evaluated on.

    python run.py task=report table=few_shot_base        # one table; table=null: every table
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

EXPERIMENTS_DIR = Path(__file__).resolve().parent.parent / "experiments"
log = logging.getLogger(__name__)


# --- definitions ---

@dataclass
class Column:
    label: str
    metric: str  # a key of a run record's metrics, e.g. eval/fewshot/ARC-C or val/loss
    scale: float = 1.0  # e.g. 100 for a 0-1 accuracy shown as a percentage


@dataclass
class RowSpec:
    label: str | None = None  # None: the run's experiment (or, in a sweep, its overrides)
    experiment: str | None = None
    tags: list[str] = field(default_factory=list)
    sweep: str | None = None  # "selected": the runs of report.sweep (or the newest sweep)
    checkpoint: str | None = None  # None: final weights only; "any", or a .ckpt name such as step-1000


@dataclass
class TableSpec:
    name: str
    title: str
    columns: list[Column]
    rows: list[RowSpec]
    published: str | None = None  # CSV under experiments/, columns: model + the column labels (+ Avg)
    average: bool = True
    digits: int = 2

    @classmethod
    def load(cls, path: str | Path) -> TableSpec:
        path = Path(path)
        raw = yaml.safe_load(path.read_text())
        unknown = set(raw) - {"title", "columns", "rows", "published", "average", "digits", "metric_prefix"}
        if unknown:
            raise ValueError(f"{path}: unknown keys {sorted(unknown)}")
        prefix = raw.get("metric_prefix", "")
        try:
            columns = [Column(c, prefix + c) if isinstance(c, str) else Column(**c) for c in raw["columns"]]
            rows = [RowSpec(**r) for r in raw["rows"]]
        except (KeyError, TypeError) as error:
            raise ValueError(f"{path}: a column needs label and metric (scale optional), a row label, experiment, "
                             f"tags or sweep: {error}") from None
        return cls(name=path.stem, title=raw["title"], columns=columns, rows=rows, published=raw.get("published"),
                   average=raw.get("average", True), digits=raw.get("digits", 2))


def table_names(tables_dir: Path = EXPERIMENTS_DIR / "tables") -> list[str]:
    return sorted(p.stem for p in Path(tables_dir).glob("*.yaml"))


def load_spec(name: str, tables_dir: Path = EXPERIMENTS_DIR / "tables") -> TableSpec:
    path = Path(tables_dir) / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"no table {name!r}; the tables are {table_names(tables_dir)} ({tables_dir})")
    return TableSpec.load(path)


# --- runs ---

def load_local_runs(root: str | Path) -> list[dict[str, Any]]:
    """Every run record (results.json with a config hash) under root; unreadable files are skipped
    and logged, never fatal."""
    records, skipped = [], 0
    for path in sorted(Path(root).expanduser().rglob("results.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError) as error:  # ValueError: bad JSON or bad UTF-8
            skipped += 1
            log.warning("skipped %s: %s", path, error)
            continue
        if isinstance(record, dict) and "config_hash" in record and isinstance(record.get("run"), dict):
            record["run_dir"] = str(path.parent.resolve())  # where it is now, whatever it was written as
            records.append(record)
    if skipped:
        log.warning("%d unreadable results.json files skipped under %s", skipped, root)
    return records


def load_wandb_runs(project: str, entity: str | None = None, api=None) -> list[dict[str, Any]]:
    """The same records through the W&B API (online runs): the static record is the run config's
    `moxin` key (moxin.tracking.wandb_settings), the metrics its summary."""
    if api is None:
        import wandb

        api = wandb.Api()
    path = f"{entity}/{project}" if entity else project
    records = []
    # Finished runs only (a crashed rerun must not win as the newest); configs fetched with the list.
    for run in api.runs(path, filters={"state": "finished"}, lazy=False):
        saved = dict(run.config).get("moxin")
        if not isinstance(saved, dict) or not isinstance(saved.get("run"), dict) or "config_hash" not in saved:
            continue  # not a moxin run
        metrics = {k: float(v) for k, v in dict(run.summary).items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and not k.startswith("_")}
        records.append({**saved, "metrics": metrics, "run_dir": saved.get("run_dir") or run.url,
                        "finished": saved.get("finished") or getattr(run, "created_at", "")})
    return records


@dataclass
class ModelRuns:
    """One model: its training run's record (when found) and the evaluations of it, merged. Runs of one
    configuration (same config hash) are one model: a rerun's newer metrics win."""
    key: str  # <config hash>@<checkpoint>: "final", or an intermediate .ckpt evaluated on its own
    experiment: str | None
    config_hash: str | None
    checkpoint: str | None
    tags: set[str]
    sweep: dict | None
    metrics: dict[str, float]
    run_dirs: list[str]
    finished: str
    phase: str | None = None
    train_dir: str | None = None  # the training run's folder (its CSV log: loss curves)


def model_key(config_hash: str, checkpoint: str | None = None) -> str:
    """A model's key: its training run's config hash and which weights ("final" or a .ckpt's name)."""
    return f"{config_hash}@{checkpoint or 'final'}"


def _model_of(record: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The key of the model a record measures, and what names it (the record's run, or the run it evaluated)."""
    run = record["run"]
    if run.get("task") == "evaluate":
        target = run.get("model_run")
        if isinstance(target, dict) and target.get("config_hash"):
            return model_key(target["config_hash"], target.get("checkpoint")), target
        return f"ckpt:{run.get('ckpt') or record.get('run_dir')}", run  # a model from elsewhere: by its name
    return model_key(record["config_hash"]), {**run, "config_hash": record["config_hash"]}


def collect_models(records: list[dict[str, Any]]) -> list[ModelRuns]:
    """Group records by the model they measure: an evaluation counts for the run it evaluated."""
    models: dict[str, ModelRuns] = {}
    for record in sorted(records, key=lambda r: r.get("finished") or ""):  # newer metrics win
        run = record["run"]
        if run.get("task", "train") not in ("train", "evaluate"):
            continue  # reports, data preparation, generation: they measure no model
        key, names = _model_of(record)
        model = models.get(key)
        if model is None:
            model = models[key] = ModelRuns(key=key, experiment=names.get("experiment"),
                                            config_hash=names.get("config_hash"), checkpoint=names.get("checkpoint"),
                                            tags=set(), sweep=names.get("sweep"), metrics={}, run_dirs=[], finished="")
        if run.get("task", "train") == "train":  # the training run itself names the model
            model.experiment, model.sweep, model.phase = run.get("experiment"), run.get("sweep"), run.get("phase")
            model.tags |= set(run.get("tags") or [])
            model.train_dir = record.get("run_dir")
        model.metrics.update({k: v for k, v in (record.get("metrics") or {}).items() if v is not None})
        model.run_dirs.append(str(record.get("run_dir")))
        model.finished = max(model.finished, record.get("finished") or "")
    return list(models.values())


def latest_sweep(models: list[ModelRuns]) -> str | None:
    sweeps = [(m.finished, m.sweep["id"]) for m in models if m.sweep]
    return max(sweeps)[1] if sweeps else None


# --- tables ---

@dataclass
class Row:
    label: str
    source: str  # "ours" or "published"
    values: dict[str, float | None]
    average: float | None
    detail: str = ""  # ours: the config hash and run folder; published: the CSV


@dataclass
class Table:
    spec: TableSpec
    rows: list[Row]
    missing: list[str]  # row labels with no run

    def to_markdown(self) -> str:
        head = ["Model", *self.labels(), "Source"]
        lines = [f"**{self.spec.title}**", "", "| " + " | ".join(head) + " |",
                 "|" + "|".join(["---"] + ["---:"] * (len(head) - 2) + ["---"]) + "|"]
        for row in self.rows:
            lines.append("| " + " | ".join([_md(row.label), *self._cells(row, "–"), row.source]) + " |")
        if self.missing:
            lines += ["", "No runs yet for: " + ", ".join(self.missing)]
        return "\n".join(lines) + "\n"

    def to_latex(self) -> str:
        head = ["Model", *self.labels(), "Source"]
        lines = [r"\begin{table}[t]", r"\centering", rf"\caption{{{_tex(self.spec.title)}}}",
                 rf"\label{{tab:{self.spec.name}}}", r"\begin{tabular}{l" + "r" * (len(head) - 2) + "l}",
                 r"\toprule", " & ".join(_tex(h) for h in head) + r" \\", r"\midrule"]
        published = [r for r in self.rows if r.source == "published"]
        ours = [r for r in self.rows if r.source != "published"]
        for group in (published, ours):
            for row in group:
                cells = self._cells(row, "--")
                if row.source == "published":  # published rows in italics, ours upright
                    cells = [rf"\textit{{{c}}}" for c in cells]
                lines.append(" & ".join([_tex(row.label), *cells, row.source]) + r" \\")
            if group is published and published and ours:
                lines.append(r"\midrule")
        lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
        return "\n".join(lines) + "\n"

    def to_csv(self) -> str:
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["model", *self.labels(), "source", "detail"])
        for row in self.rows:
            writer.writerow([row.label, *self._cells(row, ""), row.source, row.detail])
        return out.getvalue()

    def labels(self) -> list[str]:
        return [c.label for c in self.spec.columns] + (["Avg"] if self.spec.average else [])

    def _cells(self, row: Row, empty: str) -> list[str]:
        values = [row.values.get(c.label) for c in self.spec.columns]
        if self.spec.average:
            values.append(row.average)
        return [empty if v is None else f"{v:.{self.spec.digits}f}" for v in values]


_TEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "_": r"\_", "#": r"\#", "$": r"\$",
                "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def _tex(text: str) -> str:
    return "".join(_TEX_SPECIAL.get(char, char) for char in text)


def _md(text: str) -> str:
    return text.replace("|", "\\|")


def published_rows(spec: TableSpec, experiments_dir: Path = EXPERIMENTS_DIR) -> list[Row]:
    if not spec.published:
        return []
    path = Path(experiments_dir) / spec.published
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        wanted = [c.label for c in spec.columns]
        absent = [label for label in wanted if label not in (reader.fieldnames or [])]
        if absent:
            raise ValueError(f"{path}: no column for {absent} (table {spec.name})")
        rows = []
        for line in reader:
            values = {label: float(line[label]) if line[label] else None for label in wanted}
            average = float(line["Avg"]) if line.get("Avg") else _mean(values)  # the published average
            rows.append(Row(line["model"], "published", values, average, detail=spec.published))
    return rows


def build_table(spec: TableSpec, models: list[ModelRuns], sweep: str | None = None, tags: list[str] = (),
                experiments_dir: Path = EXPERIMENTS_DIR) -> Table:
    """The table of `spec`: the published rows first, then one row per model each row spec selects
    (several when several configurations match, labelled by what sets them apart)."""
    models = [m for m in models if set(tags) <= m.tags]
    chosen_sweep = latest_sweep(models) if sweep in (None, "latest") else sweep
    rows, missing = published_rows(spec, experiments_dir), []
    for row_spec in spec.rows:
        matched = [m for m in models if _matches(row_spec, m, chosen_sweep)]
        newest = {m.key: m for m in sorted(matched, key=lambda m: m.finished)}
        if not newest:
            missing.append(row_spec.label or row_spec.experiment or f"sweep {chosen_sweep}")
            continue
        shared = set.intersection(*(set(_overrides(m)) for m in newest.values()))
        for model in sorted(newest.values(), key=lambda m: (m.sweep or {}).get("job", 0)):
            values = {c.label: _metric(model, c) for c in spec.columns}
            label = _row_label(row_spec, model, several=len(newest) > 1, shared=shared)
            detail = f"{model.key} {model.train_dir or ''}".strip()
            rows.append(Row(label, "ours", values, _mean(values) if spec.average else None, detail))
    return Table(spec, rows, missing)


def _matches(spec: RowSpec, model: ModelRuns, sweep: str | None) -> bool:
    if spec.experiment and model.experiment != spec.experiment:
        return False
    if spec.checkpoint != "any" and model.checkpoint != spec.checkpoint:
        return False
    if spec.tags and not set(spec.tags) <= model.tags:
        return False
    if spec.sweep == "selected":
        return bool(model.sweep) and model.sweep["id"] == sweep
    return True


def _overrides(model: ModelRuns) -> list[str]:
    return list((model.sweep or {}).get("overrides", []))


def _row_label(spec: RowSpec, model: ModelRuns, several: bool, shared: set[str] = frozenset()) -> str:
    """The spec's label; for several configurations, with the sweep overrides that set this one apart."""
    overrides = ", ".join(o for o in _overrides(model) if o not in shared)
    if model.checkpoint:
        overrides = ", ".join(filter(None, [overrides, model.checkpoint]))
    if spec.label is None:
        return overrides or model.experiment or model.key
    if several:
        return f"{spec.label} ({overrides or model.config_hash})"
    return spec.label


def _metric(model: ModelRuns, column: Column) -> float | None:
    value = model.metrics.get(column.metric)
    return None if value is None or not math.isfinite(value) else value * column.scale


def _mean(values: dict[str, float | None]) -> float | None:
    present = list(values.values())
    return None if not present or any(v is None for v in present) else sum(present) / len(present)


# --- plots ---

def bar_chart(table: Table, path: Path) -> Path | None:
    """Grouped bars: one group per column, one bar per row (published rows hatched)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [c.label for c in table.spec.columns]
    rows = [r for r in table.rows if any(r.values.get(label) is not None for label in labels)]
    if not rows:
        return None
    width = 0.8 / len(rows)
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(labels) + 2), 4))
    for i, row in enumerate(rows):
        heights = [math.nan if row.values.get(label) is None else row.values[label] for label in labels]  # no bar
        ax.bar([j + i * width for j in range(len(labels))], heights, width, label=f"{row.label} ({row.source})",
               hatch="//" if row.source == "published" else None, alpha=0.6 if row.source == "published" else 1.0)
    ax.set_xticks([j + width * (len(rows) - 1) / 2 for j in range(len(labels))], labels)
    ax.set_title(table.spec.title, fontsize=9)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def read_curve(run_dir: str | Path, metric: str = "train/loss") -> list[tuple[int, float]]:
    """(step, value) pairs of a metric from the run's CSV log (csv/metrics.csv)."""
    path = Path(run_dir) / "csv" / "metrics.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [(int(float(r["step"])), float(r[metric])) for r in csv.DictReader(f) if r.get(metric)]


def loss_curves(models: list[ModelRuns], out_dir: Path, metric: str = "train/loss") -> list[Path]:
    """One PNG per phase: the metric against the optimizer step, one line per training run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_curves = [(m, curve) for m in models if m.train_dir and (curve := read_curve(m.train_dir, metric))]
    shared = set.intersection(*(set(_overrides(m)) for m, _ in with_curves)) if with_curves else set()
    by_phase: dict[str, list[tuple[str, list]]] = {}
    for model, curve in with_curves:
        label = _row_label(RowSpec(), model, several=False, shared=shared) if model.sweep else model.experiment
        by_phase.setdefault(model.phase or "run", []).append((label or model.key, curve))
    written = []
    for phase, curves in sorted(by_phase.items()):
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for label, curve in curves:
            ax.plot([s for s, _ in curve], [v for _, v in curve], label=label)
        ax.set_xlabel("step")
        ax.set_ylabel(metric)
        ax.set_title(f"{metric}: phase {phase}")
        ax.legend(fontsize=6)
        fig.tight_layout()
        path = Path(out_dir) / f"loss_{phase}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


# --- the task ---

def write_table(table: Table, out_dir: Path, plots: bool = True) -> dict[str, str]:
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    for suffix, text in (("md", table.to_markdown()), ("tex", table.to_latex()), ("csv", table.to_csv())):
        path = out_dir / f"{table.spec.name}.{suffix}"
        path.write_text(text)
        files[suffix] = str(path)
    if plots and (chart := bar_chart(table, out_dir / f"{table.spec.name}.png")):
        files["png"] = str(chart)
    return files


def report_task(cfg) -> dict[str, Any]:
    """task=report: build `table` (null: every table under experiments/tables/) from local run folders
    (report.runs) or the W&B API (report.source=wandb, or auto with logger.wandb.mode=online)."""
    from moxin.tracking import standalone_wandb_run

    options = cfg.report
    source = options.source
    if source not in ("auto", "local", "wandb"):
        raise ValueError(f"report.source must be auto, local or wandb, got {source!r}")
    online = cfg.logger.wandb.enabled and cfg.logger.wandb.mode == "online"
    if source == "wandb" or (source == "auto" and online):
        records = load_wandb_runs(cfg.logger.wandb.project, cfg.logger.wandb.entity)
    else:
        records = load_local_runs(options.runs)
    models = [m for m in collect_models(records) if set(options.tags) <= m.tags]
    tables_dir = Path(options.tables_dir) if options.get("tables_dir") else EXPERIMENTS_DIR / "tables"
    names = [cfg.table] if cfg.get("table") else table_names(tables_dir)
    out_dir = Path(cfg.paths.run_dir)
    written: dict[str, dict[str, str]] = {}
    tables = {}
    for name in names:
        table = build_table(load_spec(name, tables_dir), models, sweep=options.sweep)  # models: tag-filtered
        tables[name] = table
        written[name] = write_table(table, out_dir, plots=options.plots)
        print(table.to_markdown())
    curves = [str(p) for p in loss_curves(models, out_dir)] if options.plots else []
    print(f"{len(records)} run records read; tables and plots in {out_dir}")
    with standalone_wandb_run(cfg) as run:
        if run is not None:
            import wandb

            for name, table in tables.items():
                run.log({f"report/{name}": wandb.Table(columns=["model", *table.labels(), "source"],
                                                       data=[[r.label, *table._cells(r, ""), r.source]
                                                             for r in table.rows])})
            images = [Path(f["png"]) for f in written.values() if "png" in f] + [Path(p) for p in curves]
            run.log({f"report/{p.stem}": wandb.Image(str(p)) for p in images})
    return {"tables": written, "loss_curves": curves, "runs": len(records), "models": len(models)}
