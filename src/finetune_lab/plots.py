"""Figures shared by the experiments and the report (matplotlib, headless). Each says what it shows: how many
seeds the error bars stand on, what memory was measured; axes start where the quantity does (memory at zero,
ROUGE-L on [0, 1]) so that a small change looks small; legends sit outside the plot, never on a line."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from sklearn.metrics import ConfusionMatrixDisplay  # noqa: E402

# What each memory metric measures, for the axis of a memory figure (CUDA first: the number that matters on a GPU).
MEMORY_LABELS = {
    "peak_cuda_mem_allocated_mb": "peak CUDA memory allocated (MB)",
    "peak_rss_mb": "peak RSS of the whole process (MB)",
}


def log_figure(figure: plt.Figure, artifact_file: str) -> None:
    """Log a figure to the active run and free it (pyplot keeps every open figure alive)."""
    mlflow.log_figure(figure, artifact_file)
    plt.close(figure)


def _legend_outside(figure: plt.Figure, axes, columns: int = 2) -> None:
    """The legend below the plot, where it cannot hide a line."""
    handles, labels = axes.get_legend_handles_labels()
    if handles:
        figure.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), columns), fontsize="small")


def metric_vs_x(summary: pd.DataFrame, x: str, series: dict[str, str], ylabel: str, title: str,
                log_x: bool = True, baselines: dict[str, tuple[float, str]] | None = None,
                ylim: tuple[float | None, float | None] | None = None, group: str = "") -> plt.Figure:
    """One line with error bars (mean ± std, 0 where a single value) per metric of `series` (metric → legend label)
    against column `x` (and per value of column `group`, when it takes several); `baselines` (metric → (value,
    legend label)) adds a dashed line of the same colour."""
    figure, axes = plt.subplots(figsize=(6.5, 4.5), layout="constrained")
    for metric, label in series.items():
        _lines(axes, summary, x, metric, label, group, baselines)
    _x_axis(axes, summary, x, log_x)
    axes.set_ylabel(ylabel)
    if ylim:
        axes.set_ylim(*ylim)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    _legend_outside(figure, axes)
    return figure


def _groups(summary: pd.DataFrame, group: str) -> list[tuple[str, pd.DataFrame]]:
    """The summary's rows per value of column `group` (one unnamed group when it has one value or is absent)."""
    if not group or group not in summary or summary[group].nunique() <= 1:
        return [("", summary)]
    return [(str(value), rows) for value, rows in summary.groupby(group, sort=False)]


def _lines(axes, summary: pd.DataFrame, x: str, metric: str, label: str, group: str = "",
           baselines: dict[str, tuple[float, str]] | None = None) -> None:
    """Mean ± std of `metric` against `x`, a line per group."""
    if f"{metric}_mean" not in summary or not summary[f"{metric}_mean"].notna().any():
        return
    for name, rows in _groups(summary, group):
        std = rows[f"{metric}_std"] if f"{metric}_std" in rows else pd.Series(0.0, index=rows.index)
        line = axes.errorbar(rows[x], rows[f"{metric}_mean"], yerr=std.fillna(0.0), marker="o", capsize=4,
                             label=f"{label}, {name}" if name else label)
        if baselines and metric in baselines:
            value, baseline_label = baselines[metric]
            axes.axhline(value, linestyle="--", color=line[0].get_color(), label=baseline_label)


def _x_axis(axes, summary: pd.DataFrame, x: str, log_x: bool) -> None:
    if log_x:  # powers of two (ranks, copies) evenly spaced; symlog keeps a 0 (a control) on the axis
        if (summary[x] > 0).all():
            axes.set_xscale("log", base=2)
        else:
            axes.set_xscale("symlog", base=2, linthresh=1)
    ticks = sorted(set(summary[x]))
    axes.set_xticks(ticks, [str(v) for v in ticks])
    axes.set_xlabel(x)


def seeds_note(summary: pd.DataFrame) -> str:
    """How many seeds each point of a per-rank summary stands on: error bars over one seed are no error bars."""
    if "seeds" not in summary:
        return "mean ± std over seeds"
    counts = sorted({int(n) for n in summary["seeds"]})
    if counts == [1]:
        return "n=1 seed: no error bars"
    return f"mean ± std over n={counts[0] if len(counts) == 1 else f'{counts[0]}–{counts[-1]}'} seeds"


def loss_vs_rank(summary: pd.DataFrame) -> plt.Figure:
    """Held-out and training loss per LoRA rank (a sweep's `rank_summary.json`)."""
    series = {"eval_loss": "held-out loss", "train_loss": "train loss (last steps)"}
    if len(_groups(summary, "method")) > 1:  # a line per method: the held-out loss alone stays readable
        series = {"eval_loss": "held-out loss"}
    return metric_vs_x(summary, "rank", series, "loss", f"Loss vs LoRA rank ({seeds_note(summary)})", group="method")


def memory_vs_rank(summary: pd.DataFrame) -> plt.Figure | None:
    """Peak memory per LoRA rank: CUDA memory when the sweep ran on a GPU, else the process's RSS; the axis starts
    at zero, so that a jitter of a few percent looks like one. None when no memory was measured."""
    metric = next((m for m in MEMORY_LABELS if summary.get(f"{m}_mean", pd.Series(dtype=float)).notna().any()),
                  None)
    if metric is None:
        return None
    return metric_vs_x(summary, "rank", {metric: MEMORY_LABELS[metric]}, MEMORY_LABELS[metric],
                       f"Peak memory vs LoRA rank ({seeds_note(summary)})", ylim=(0, None), group="method")


# What the panels of `methods_by_rank` show.
METHOD_PANELS = {"eval_loss": "held-out loss", "peak_memory": "peak memory (MB)",
                 "train_step_ms_median": "median step time (ms)", "trainable_params": "trainable parameters",
                 "adapter_size_bytes": "adapter size (bytes)"}


def methods_by_rank(summary: pd.DataFrame) -> plt.Figure:
    """LoRA methods side by side against the rank: held-out loss, peak memory (CUDA's, else the process's RSS),
    median step time, trainable parameters and adapter size, a line per method (mean ± std over seeds)."""
    memory = next((m for m in MEMORY_LABELS if summary.get(f"{m}_mean", pd.Series(dtype=float)).notna().any()), None)
    figure, grid = plt.subplots(2, 3, figsize=(13, 7.5), layout="constrained")
    for axes, (metric, label) in zip(grid.flat, METHOD_PANELS.items()):
        column = memory if metric == "peak_memory" else metric
        if column is not None:
            _lines(axes, summary, "rank", column, label, group="method")
        _x_axis(axes, summary, "rank", log_x=True)
        axes.set_title(MEMORY_LABELS.get(column, label) if metric == "peak_memory" and column else label,
                       fontsize="medium")
        axes.grid(alpha=0.3)
    grid.flat[-1].axis("off")
    _legend_outside(figure, grid.flat[0], columns=5)
    figure.suptitle(f"LoRA methods by rank ({seeds_note(summary)})")
    return figure


def metrics_by_configuration(table: pd.DataFrame, label: str, metrics: dict[str, str], note: str) -> plt.Figure:
    """One panel per metric (metric → axis label) that the per-child `table` (finished children only) has values
    of (ROC-AUC is not logged where a class is missing from the held-out labels): a point per seed and the
    mean ± std over seeds per configuration (column `label`), configurations in the table's order."""
    metrics = {metric: name for metric, name in metrics.items() if metric in table and table[metric].notna().any()}
    names = list(dict.fromkeys(table[label]))
    figure, grid = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics), 4.2), layout="constrained",
                                squeeze=False)
    for axes, (metric, axis_label) in zip(grid[0], metrics.items()):
        for k, name in enumerate(names):
            values = table.loc[table[label] == name, metric].astype(float).dropna()
            axes.scatter([k] * len(values), values, color="tab:blue", alpha=0.5, s=18,
                         label="one seed" if k == 0 else None)
            if len(values):
                axes.errorbar([k], [values.mean()], yerr=[values.std(ddof=1) if len(values) > 1 else 0.0],
                              fmt="D", color="black", capsize=6, label="mean ± std" if k == 0 else None)
        axes.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize="small")
        axes.set_xlim(-0.5, len(names) - 0.5)
        axes.set_title(axis_label, fontsize="medium")
        axes.grid(alpha=0.3, axis="y")
    _legend_outside(figure, grid[0][0])
    figure.suptitle(f"Metrics per configuration ({note})")
    return figure


def loss_curves(curves: dict[str, list[tuple[int, float]]]) -> plt.Figure:
    """Training loss against step, one line per run."""
    figure, axes = plt.subplots(figsize=(7, 5), layout="constrained")
    for name, points in curves.items():
        if points:
            steps, losses = zip(*points)
            axes.plot(steps, losses, label=name, linewidth=1.2)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    axes.set_xlabel("step")
    axes.set_ylabel("train_loss")
    axes.set_title("Training loss per child run")
    axes.grid(alpha=0.3)
    _legend_outside(figure, axes, columns=4)  # short run names
    return figure


def confusion_figure(matrix: dict) -> plt.Figure:
    """A confusion matrix as `metrics.confusion` returns it (rows are true labels, columns predictions), with the
    class names."""
    figure, axes = plt.subplots(figsize=(4.5, 4), layout="constrained")
    ConfusionMatrixDisplay(np.array(matrix["matrix"]), display_labels=matrix["labels"]).plot(
        ax=axes, cmap="Blues", colorbar=False, values_format="d"
    )
    axes.set_xlabel("predicted label")
    axes.set_ylabel("true label")
    axes.set_title("Confusion matrix (evaluation split)")
    return figure


def search_curves(curves: dict[str, list[tuple[int, float]]], stopped: set[str], objective: str,
                  rungs: list[int]) -> plt.Figure:
    """A search's successive halving: each trial's held-out `objective` against its training steps (at its rungs,
    then at its end for a trial that trained its full budget), a line per trial, the `rungs` dotted; a trial
    stopped at a rung ends in a cross there."""
    figure, axes = plt.subplots(figsize=(7, 5), layout="constrained")
    for name, points in curves.items():
        if not points:
            continue
        steps, values = zip(*points)
        line = axes.plot(steps, values, marker="o", markersize=4, linewidth=1.2, label=name)[0]
        if name in stopped:
            axes.plot(steps[-1], values[-1], marker="x", markersize=10, color=line.get_color())
    for step in rungs:
        axes.axvline(step, color="grey", linewidth=0.6, linestyle=":")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("training step")
    axes.set_ylabel(f"held-out {objective}")
    axes.set_title(f"Held-out {objective} per trial (x: stopped at that rung)")
    axes.grid(alpha=0.3)
    _legend_outside(figure, axes, columns=3)
    return figure
