"""The `report` entry point: read the runs of some experiments back from the tracking store and write one
side-by-side report, `report.md` (images next to it) and `report.html` (one file, images embedded), logged
as the artifacts of the report's own run. No training.

Recipe: find each experiment's runs → sort the top-level runs into classification runs, sweeps and probes →
per kind a table of runs, figures and one verdict line per comparison → render markdown and HTML.

A verdict compares the mean of a metric over seeds between two configurations: the difference counts when
it is larger than the seed-to-seed spread (the larger of the two standard deviations over seeds); with a
single seed on either side it says "single seed: not conclusive".
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import mlflow
import pandas as pd
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from finetune_lab import metrics as metrics_lib
from finetune_lab import plots, sweep, tracking
from finetune_lab.config import InputError, ReportConfig, as_dict

PARENT_TAG = "mlflow.parentRunId"
MEMORY_METRICS = ["peak_cuda_mem_allocated_mb", "peak_rss_mb"]
CLASSIFY_METRICS = ["accuracy", "precision", "recall", "f1", "roc_auc", "eval_loss", *MEMORY_METRICS,
                    "train_runtime_s"]
SWEEP_METRICS = ["train_loss", "eval_loss", "eval_perplexity", *MEMORY_METRICS, "train_tokens_per_s",
                 "train_runtime_s"]
# The probe: what each child (`before`, `after`, `after-r<N>`) measures, and what the parent compares.
PROBE_CHILD_METRICS = ["target_nll", "target_nll_new_input", "rouge_l", "eval_loss", "train_loss",
                       "new_example_copies_seen", *MEMORY_METRICS, "train_runtime_s"]
PROBE_METRICS = ["target_nll_before", "target_nll_after", "target_nll_drop", "rouge_l_before", "rouge_l_after",
                 "replies_differ", "forgetting"]
PROBE_TABLE = "probe_comparison.json"
PROBE_FIGURES = ["target_nll_vs_repeats.png", "similarity_vs_repeats.png"]
PROBE_REFERENCE = "before"
# Params that identify where a run's inputs came from rather than how it was configured: they may differ with
# the seed (a split's digest, a tiny model built per seed) or the checkout; listed under a table, not in it.
PROVENANCE_PARAMS = {"model_path", "model_revision", "dataset_digest", "git_commit", "run_name", "experiment"}
SEED_PARAMS = {"seed", "split_seed"}
IMAGES = "report_images"
MAX_ERROR_CHARS = 120


# ---------------------------------------------------------------------------------------------- blocks
@dataclass
class Heading:
    level: int
    text: str


@dataclass
class Text:
    text: str


@dataclass
class Bullets:
    items: list[str]


@dataclass
class Table:
    columns: list[str]
    rows: list[list[str]]


@dataclass
class Figures:
    """Figures shown side by side: (caption, PNG bytes)."""

    items: list[tuple[str, bytes]]


Block = Heading | Text | Bullets | Table | Figures


def png(figure) -> bytes:
    """The figure as PNG bytes; the figure is closed."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90)
    plots.plt.close(figure)
    return buffer.getvalue()


def number(value) -> str:
    """A metric as printed in the tables: integers as such, other numbers to 6 significant digits."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, (int, float)) and float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def cell(value) -> str:
    """A table cell: text as it is, numbers as `number` prints them."""
    return value if isinstance(value, str) else number(value)


def short(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def run_label(run: Run) -> str:
    return run.info.run_name or run.info.run_id[:8]


# ---------------------------------------------------------------------------------------------- reading
@dataclass
class ExperimentRuns:
    name: str
    top: list[Run] = field(default_factory=list)
    children: dict[str, list[Run]] = field(default_factory=dict)


def read_experiment(client: MlflowClient, name: str, skip_run_id: str) -> ExperimentRuns | None:
    """All active runs of experiment `name` (oldest first), top-level runs apart from children; None if missing."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        return None
    runs, token = [], None
    while True:
        page = client.search_runs([experiment.experiment_id], max_results=1000, page_token=token,
                                  order_by=["attributes.start_time ASC"])
        runs += [r for r in page if r.info.run_id != skip_run_id]
        token = page.token
        if not token:
            break
    found = ExperimentRuns(name)
    for run in runs:
        parent = run.data.tags.get(PARENT_TAG)
        if parent:
            found.children.setdefault(parent, []).append(run)
        else:
            found.top.append(run)
    return found


class Artifacts:
    """Top-level artifacts of runs, downloaded into a scratch folder; None where a run lacks one."""

    def __init__(self, client: MlflowClient, scratch: Path):
        self.client, self.scratch = client, scratch

    def raw(self, run: Run, path: str) -> bytes | None:
        """The bytes of a top-level artifact."""
        if path not in {a.path for a in self.client.list_artifacts(run.info.run_id)}:
            return None
        local = self.client.download_artifacts(run.info.run_id, path, str(self.scratch / run.info.run_id))
        return Path(local).read_bytes()

    def json(self, run: Run, path: str):
        data = self.raw(run, path)
        return None if data is None else json.loads(data)

    def table(self, run: Run, path: str) -> pd.DataFrame | None:
        """A `mlflow.log_table` artifact as a DataFrame."""
        logged = self.json(run, path)
        return None if logged is None else pd.DataFrame(logged["data"], columns=logged["columns"])


def kind_of(run: Run, children: list[Run]) -> str:
    params, metrics = run.data.params, run.data.metrics
    if "probe_input" in params or any(m.startswith("target_nll") for m in metrics):
        return "probe"  # first: its children log `lora_r` too
    if "ranks" in params or any("lora_r" in c.data.params for c in children):
        return "sweep"
    if "label_column" in params or "accuracy" in metrics:
        return "classification"
    return "other"


# ---------------------------------------------------------------------------------------------- tables
def differing_params(runs: list[Run]) -> list[str]:
    """Params whose value is not the same in every run (a param missing from a run counts as differing)."""
    names = sorted(set().union(*(r.data.params for r in runs))) if runs else []
    return [n for n in names if len({r.data.params.get(n) for r in runs}) > 1]


def run_table(runs: list[Run], metrics: list[str], first_params: tuple[str, ...] = (),
              hidden: tuple[str, ...] = ()) -> list[Block]:
    """Runs side by side: the params that differ between them (`hidden` ones left out), the metrics any of them
    logged, errors."""
    differing = differing_params(runs)
    params = [p for p in first_params if p in differing]
    params += [p for p in differing if p not in PROVENANCE_PARAMS and p not in params and p not in hidden]
    shown = [m for m in metrics if any(m in r.data.metrics for r in runs)]
    with_error = any("error" in r.data.tags for r in runs)
    columns = ["run", "run id", "status", *params, *shown, *(["error"] if with_error else [])]
    rows = []
    for r in runs:
        row = [run_label(r), r.info.run_id[:8], r.info.status, *(r.data.params.get(p, "") for p in params),
               *(number(r.data.metrics.get(m)) for m in shown)]
        rows.append(row + ([short(r.data.tags.get("error", ""))] if with_error else []))
    blocks: list[Block] = [Table(columns, rows)]
    provenance = [p for p in differing if p in PROVENANCE_PARAMS - {"run_name", "experiment"}]
    if provenance:
        blocks.append(Text(f"Also differing between these runs: {', '.join(provenance)}."))
    return blocks


def summary_table(summary: pd.DataFrame, x: str) -> Table:
    """`x`, seeds, then `mean ± std` per metric of a sweep summary (metrics without values left out)."""
    metrics = [c[: -len("_mean")] for c in summary.columns if c.endswith("_mean") and summary[c].notna().any()]
    rows = [[number(row[x]), number(row.get("seeds")),
             *(" ± ".join(filter(None, (number(row[f"{m}_mean"]), number(row.get(f"{m}_std"))))) for m in metrics)]
            for _, row in summary.iterrows()]
    return Table([x, "seeds", *metrics], rows)


# ---------------------------------------------------------------------------------------------- verdicts
def verdicts(groups: dict[str, list[float]], metric: str, lower_is_better: bool, reference: str = "") -> list[str]:
    """One line per configuration against `reference` (default: the best mean): is the difference of the means
    over seeds larger than the seed-to-seed spread (the larger of the two standard deviations)?"""
    groups = {label: values for label, values in groups.items() if values}
    if len(groups) < 2:
        return [f"{metric}: one configuration only, nothing to compare"]
    means = {label: statistics.fmean(values) for label, values in groups.items()}
    if reference not in groups:
        reference = (min if lower_is_better else max)(means, key=means.get)
    lines = []
    for label, values in groups.items():
        if label == reference:
            continue
        difference = means[label] - means[reference]
        head = (f"{label} vs {reference}: {metric} {means[label]:.4g} vs {means[reference]:.4g} "
                f"(difference {difference:+.3g})")
        if min(len(values), len(groups[reference])) < 2:
            lines.append(f"{head}; single seed: not conclusive")
            continue
        spread = max(statistics.stdev(values), statistics.stdev(groups[reference]))
        larger = abs(difference) > spread
        better = label if (difference < 0) == lower_is_better else reference
        lines.append(f"{head} is {'' if larger else 'not '}larger than the seed-to-seed spread (largest std "
                     f"{spread:.3g}; {len(values)} and {len(groups[reference])} seeds): "
                     + (f"{better} is better" if larger else "no real difference"))
    return lines


def seed_groups(runs: list[Run], label: Callable[[Run], str], metric: str) -> dict[str, list[float]]:
    """The metric's values per configuration (runs that differ only in their seed share a label)."""
    groups: dict[str, list[float]] = {}
    for run in runs:
        if run.info.status == "FINISHED" and metric in run.data.metrics:
            groups.setdefault(label(run), []).append(run.data.metrics[metric])
    return groups


def config_label(runs: list[Run]) -> Callable[[Run], str]:
    """Label a run by the params that differ between `runs`, seeds and provenance left out."""
    keys = [p for p in differing_params(runs) if p not in SEED_PARAMS | PROVENANCE_PARAMS]

    def label(run: Run) -> str:
        return ", ".join(f"{k}={run.data.params.get(k, '')}" for k in keys) or "same config"

    return label


# ---------------------------------------------------------------------------------------------- sections
def classification_section(runs: list[Run], artifacts: Artifacts) -> list[Block]:
    blocks: list[Block] = [Heading(3, f"Classification runs ({len(runs)})"), *run_table(runs, CLASSIFY_METRICS)]
    matrices = []
    for run in runs:
        matrix = artifacts.json(run, "confusion_matrix.json")
        if matrix:
            figure = metrics_lib.confusion_figure(matrix)
            figure.axes[0].set_title(run_label(run))
            matrices.append((f"{run_label(run)} ({run.info.run_id[:8]})", png(figure)))
    if matrices:
        blocks += [Text("Confusion matrices on each run's evaluation split:"), Figures(matrices)]
    finished = [r for r in runs if r.info.status == "FINISHED"]
    blocks.append(Bullets(verdicts(seed_groups(finished, config_label(finished), "accuracy"), "accuracy", False)))
    return blocks


def rank_summary(parent: Run, children: list[Run], artifacts: Artifacts) -> pd.DataFrame:
    """The sweep's logged per-rank summary, or the same summary computed from its children if it lacks one."""
    logged = artifacts.table(parent, "rank_summary.json")
    if logged is not None:
        return logged
    rows = [{"rank": int(c.data.params["lora_r"]), "seed": c.data.params.get("seed"), "status": c.info.status,
             **{m: c.data.metrics.get(m, math.nan) for m in sweep.SUMMARY_METRICS}}
            for c in children if "lora_r" in c.data.params]
    return sweep.summarise(pd.DataFrame(rows))


def sweep_section(parent: Run, children: list[Run], artifacts: Artifacts) -> list[Block]:
    tags = parent.data.tags
    blocks: list[Block] = [
        Heading(3, f"LoRA rank sweep {run_label(parent)} ({parent.info.run_id[:8]})"),
        Text(f"{len(children)} child runs, status {parent.info.status}; best rank (lowest mean held-out loss): "
             f"{tags.get('best_rank', 'n/a')}, best child run {tags.get('best_run_id', 'n/a')[:8]}."),
    ]
    if not children:
        return blocks
    blocks += run_table(children, SWEEP_METRICS, first_params=("lora_r", "seed"))
    summary = rank_summary(parent, children, artifacts)
    if len(summary):
        memory = next((m for m in MEMORY_METRICS if summary.get(f"{m}_mean", pd.Series()).notna().any()), None)
        figures = [("loss vs rank", png(plots.metric_vs_x(
            summary, "rank", {"eval_loss": "held-out loss", "train_loss": "train loss"}, "loss",
            "Loss vs LoRA rank (mean ± std over seeds)")))]
        if memory:
            figures.append(("memory vs rank", png(plots.metric_vs_x(
                summary, "rank", {memory: memory}, "MB", "Peak memory vs LoRA rank (mean ± std over seeds)"))))
        blocks += [Text("Per rank, mean ± std over seeds (`rank_summary.json`):"), summary_table(summary, "rank"),
                   Figures(figures)]
    groups = seed_groups(children, lambda r: f"r{r.data.params.get('lora_r')}", "eval_loss")
    blocks.append(Bullets(verdicts(groups, "eval_loss", True)))
    return blocks


def probe_section(parent: Run, children: list[Run], artifacts: Artifacts) -> list[Block]:
    """The probe's child runs (`before`, `after` or `after-r<N>`), the before/after comparison and its figures."""
    params = parent.data.params
    # `mlflow run` logs the parent's -P values shell-quoted; the children hold the value as the code used it.
    probe_input = next((c.data.params["probe_input"] for c in children if "probe_input" in c.data.params),
                       params.get("probe_input", "n/a"))
    blocks: list[Block] = [
        Heading(3, f"Retraining probe {run_label(parent)} ({parent.info.run_id[:8]})"),
        Text(f"status {parent.info.status}; probe_input {probe_input!r}, mode "
             f"{params.get('mode', 'n/a')}, rank {params.get('rank', 'n/a')}, copies of the new example "
             f"{params.get('repeats', params.get('new_example_repeats', 'n/a'))}."),
    ]
    if children:
        blocks += run_table(children, PROBE_CHILD_METRICS, first_params=("new_example_repeats",), hidden=("reply",))
    comparison = artifacts.table(parent, PROBE_TABLE)
    if comparison is not None and "repeats" in comparison:
        blocks += [Text(f"Before / after retraining (`{PROBE_TABLE}`):"), before_after_table(comparison)]
    else:
        compared = [r for r in [parent, *children] if any(m in r.data.metrics for m in PROBE_METRICS)]
        if compared:
            blocks += [Text("Before / after retraining (metrics of the runs):"), *run_table(compared, PROBE_METRICS)]
    figures = [(name, data) for name in PROBE_FIGURES if (data := artifacts.raw(parent, name)) is not None]
    if figures:
        blocks.append(Figures(figures))
    return blocks


def before_after_table(comparison: pd.DataFrame) -> Table:
    """The probe's comparison turned around: one row per measure; `before`, then one column per repeats value.
    `<measure>_before` / `<measure>_after` pairs share a row; a change (drop, forgetting, ...) has no `before`."""
    columns = ["measure", "before", *(f"after (repeats={n})" for n in comparison["repeats"])]
    rows, seen = [], set()
    for column in comparison.columns:
        if column in ("repeats", "probe_input", "mode", "before_run_id", "after_run_id"):
            continue
        measure = re.sub(r"_(before|after)$", "", column)
        if measure in seen:
            continue
        seen.add(measure)
        before, after = comparison.get(f"{measure}_before"), comparison.get(f"{measure}_after", comparison[column])
        if measure == column:
            before = None
        rows.append([measure, "" if before is None else cell(before.iloc[0]), *(cell(v) for v in after)])
    return Table(columns, rows)


def probe_verdicts(parents: list[Run], children: dict[str, list[Run]]) -> list[Block]:
    """Each `after` child against `before` on the target's NLL, over probe runs that differ only in their seed."""
    label = config_label(parents)
    by_config: dict[str, list[Run]] = {}
    for parent in parents:
        by_config.setdefault(label(parent), []).extend(children.get(parent.info.run_id, []))
    lines = []
    for config, stages in by_config.items():
        prefix = "" if len(by_config) == 1 else f"[{config}] "
        groups = seed_groups(stages, run_label, "target_nll")
        lines += [prefix + line for line in verdicts(groups, "target_nll", True, reference=PROBE_REFERENCE)]
    return [Bullets(lines)]


def other_section(runs: list[Run]) -> list[Block]:
    return [Heading(3, f"Other runs ({len(runs)})"),
            *run_table(runs, ["eval_loss", "train_loss", *MEMORY_METRICS, "train_runtime_s"])]


def parents_overview(kind: str, parents: list[Run], metrics: list[str]) -> list[Block]:
    """With several sweeps or probes in one experiment, their parent runs side by side first."""
    if len(parents) < 2:
        return []
    return [Heading(3, f"{kind} ({len(parents)} parent runs)"), *run_table(parents, metrics)]


def experiment_section(found: ExperimentRuns, artifacts: Artifacts) -> list[Block]:
    blocks: list[Block] = [Heading(2, f"Experiment `{found.name}`")]
    if not found.top:
        return blocks + [Text("No runs.")]
    by_kind: dict[str, list[Run]] = {}
    for run in found.top:
        by_kind.setdefault(kind_of(run, found.children.get(run.info.run_id, [])), []).append(run)
    if "classification" in by_kind:
        blocks += classification_section(by_kind["classification"], artifacts)
    sweeps, probes = by_kind.get("sweep", []), by_kind.get("probe", [])
    blocks += parents_overview("LoRA rank sweeps", sweeps, ["best_rank", "best_eval_loss", "failed_children"])
    for parent in sweeps:
        blocks += sweep_section(parent, found.children.get(parent.info.run_id, []), artifacts)
    blocks += parents_overview("Retraining probes", probes, PROBE_METRICS)
    for parent in probes:
        blocks += probe_section(parent, found.children.get(parent.info.run_id, []), artifacts)
    if probes:
        blocks += probe_verdicts(probes, found.children)
    if "other" in by_kind:
        blocks += other_section(by_kind["other"])
    return blocks


def build(client: MlflowClient, experiments: list[str], scratch: Path, skip_run_id: str = "") -> list[Block]:
    """The report's blocks for `experiments`, in the order given."""
    artifacts = Artifacts(client, scratch)
    blocks: list[Block] = [
        Heading(1, "finetune-lab report"),
        Text(f"Generated {time.strftime('%Y-%m-%d %H:%M:%S %Z')} from `{mlflow.get_tracking_uri()}`. A verdict "
             "compares means over seeds: a difference counts when it is larger than the seed-to-seed spread "
             "(the larger standard deviation over seeds); with a single seed it is not conclusive."),
    ]
    for name in experiments:
        found = read_experiment(client, name, skip_run_id)
        if found is None:
            blocks += [Heading(2, f"Experiment `{name}`"), Text("Not found in the tracking store.")]
        else:
            blocks += experiment_section(found, artifacts)
    return blocks


# ---------------------------------------------------------------------------------------------- rendering
def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "figure"


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _md_table(columns: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(map(_md_cell, columns)) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(map(_md_cell, row)) + " |" for row in rows]
    return "\n".join(lines)


def to_markdown(blocks: list[Block], images: Path) -> str:
    """Markdown; figures are written as PNG files into `images` (referenced relative to its parent)."""
    parts, figure_number = [], 0
    for block in blocks:
        if isinstance(block, Heading):
            parts.append("#" * block.level + " " + block.text)
        elif isinstance(block, Text):
            parts.append(block.text)
        elif isinstance(block, Bullets):
            parts.append("\n".join(f"- **verdict** {item}" for item in block.items))
        elif isinstance(block, Table):
            parts.append(_md_table(block.columns, block.rows))
        elif isinstance(block, Figures):
            links = []
            for caption, data in block.items:
                figure_number += 1
                path = images / f"{figure_number:03d}-{_slug(caption)}.png"
                path.write_bytes(data)
                links.append(f"![{caption}]({images.name}/{path.name})")
            parts.append(_md_table([c for c, _ in block.items], [links]))  # a row of images: side by side
    return "\n\n".join(parts) + "\n"


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; white-space: nowrap; }
.wide { overflow-x: auto; }
.figures { display: flex; flex-wrap: wrap; gap: 1em; } figure { margin: 0; }
figcaption { font-size: 0.85em; text-align: center; } li.verdict { margin: 0.2em 0; }
"""


def _inline(text: str) -> str:
    """Escape, then render `code` spans (the only markdown the blocks' text uses)."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))


def to_html(blocks: list[Block]) -> str:
    """One self-contained HTML file: the styles inline, the figures as base64 data URIs."""
    parts = []
    for block in blocks:
        if isinstance(block, Heading):
            parts.append(f"<h{block.level}>{_inline(block.text)}</h{block.level}>")
        elif isinstance(block, Text):
            parts.append(f"<p>{_inline(block.text)}</p>")
        elif isinstance(block, Bullets):
            items = "".join(f'<li class="verdict"><b>verdict</b> {html.escape(i)}</li>' for i in block.items)
            parts.append(f"<ul>{items}</ul>")
        elif isinstance(block, Table):
            head = "".join(f"<th>{html.escape(c)}</th>" for c in block.columns)
            body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>"
                           for row in block.rows)
            parts.append(f'<div class="wide"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>')
        elif isinstance(block, Figures):
            figures = "".join(
                f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,'
                f'{base64.b64encode(data).decode()}"><figcaption>{html.escape(caption)}</figcaption></figure>'
                for caption, data in block.items)
            parts.append(f'<div class="figures">{figures}</div>')
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>finetune-lab report</title>"
            f"<style>{STYLE}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")


def write(blocks: list[Block], output: Path) -> tuple[Path, Path]:
    """report.md (+ its images folder, replaced) and report.html in `output`."""
    output.mkdir(parents=True, exist_ok=True)
    images = output / IMAGES
    shutil.rmtree(images, ignore_errors=True)
    images.mkdir()
    markdown, page = output / "report.md", output / "report.html"
    markdown.write_text(to_markdown(blocks, images), encoding="utf-8")
    page.write_text(to_html(blocks), encoding="utf-8")
    return markdown, page


# ---------------------------------------------------------------------------------------------- entry point
def run(config: ReportConfig, config_problems: list[str] | None = None) -> dict:
    """Build the report inside its own MLflow run and log it as that run's artifacts."""
    with tracking.experiment_run(config.experiment, config.run_name) as active:
        tracking.log_config(as_dict(config))
        problems = config.validate() if config_problems is None else config_problems
        if problems:
            raise InputError(problems)
        experiments = [e.strip() for e in config.experiments.split(",") if e.strip()]
        client = MlflowClient()
        with tracking.scratch_dir("report") as scratch:
            blocks = build(client, experiments, scratch, skip_run_id=active.info.run_id)
        markdown, page = write(blocks, Path(config.output))
        mlflow.log_artifact(str(markdown))
        mlflow.log_artifact(str(page))
        mlflow.log_artifacts(str(markdown.parent / IMAGES), IMAGES)
        found = [e for e in experiments if client.get_experiment_by_name(e) is not None]
        summary = {"experiments_found": len(found), "experiments_missing": len(experiments) - len(found),
                   "verdicts": sum(len(b.items) for b in blocks if isinstance(b, Bullets))}
        mlflow.log_metrics(summary)
        return {"run_id": active.info.run_id, "metrics": summary,
                "notes": [f"report: {markdown.resolve()}", f"        {page.resolve()}"], "ui": tracking.ui_hint()}
