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
                ylim: tuple[float | None, float | None] | None = None) -> plt.Figure:
    """One line with error bars (mean ± std, 0 where a single value) per metric of `series` (metric → legend label)
    against column `x`; `baselines` (metric → (value, legend label)) adds a dashed line of the same colour."""
    figure, axes = plt.subplots(figsize=(6.5, 4.5), layout="constrained")
    for metric, label in series.items():
        if f"{metric}_mean" in summary and summary[f"{metric}_mean"].notna().any():
            std = summary[f"{metric}_std"] if f"{metric}_std" in summary else pd.Series(0.0, index=summary.index)
            line = axes.errorbar(summary[x], summary[f"{metric}_mean"], yerr=std.fillna(0.0), marker="o",
                                 capsize=4, label=label)
            if baselines and metric in baselines:
                value, baseline_label = baselines[metric]
                axes.axhline(value, linestyle="--", color=line[0].get_color(), label=baseline_label)
    if log_x:  # powers of two (ranks, copies) evenly spaced; symlog keeps a 0 (a control) on the axis
        if (summary[x] > 0).all():
            axes.set_xscale("log", base=2)
        else:
            axes.set_xscale("symlog", base=2, linthresh=1)
    axes.set_xticks(list(summary[x]), [str(v) for v in summary[x]])
    axes.set_xlabel(x)
    axes.set_ylabel(ylabel)
    if ylim:
        axes.set_ylim(*ylim)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    _legend_outside(figure, axes)
    return figure


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
    return metric_vs_x(summary, "rank", {"eval_loss": "held-out loss", "train_loss": "train loss (last steps)"},
                       "loss", f"Loss vs LoRA rank ({seeds_note(summary)})")


def memory_vs_rank(summary: pd.DataFrame) -> plt.Figure | None:
    """Peak memory per LoRA rank: CUDA memory when the sweep ran on a GPU, else the process's RSS; the axis starts
    at zero, so that a jitter of a few percent looks like one. None when no memory was measured."""
    metric = next((m for m in MEMORY_LABELS if summary.get(f"{m}_mean", pd.Series(dtype=float)).notna().any()),
                  None)
    if metric is None:
        return None
    return metric_vs_x(summary, "rank", {metric: MEMORY_LABELS[metric]}, MEMORY_LABELS[metric],
                       f"Peak memory vs LoRA rank ({seeds_note(summary)})", ylim=(0, None))


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
