"""Figures shared by the experiments and the report (matplotlib, headless)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.metrics import ConfusionMatrixDisplay  # noqa: E402


def log_figure(figure: plt.Figure, artifact_file: str) -> None:
    """Log a figure to the active run and free it (pyplot keeps every open figure alive)."""
    mlflow.log_figure(figure, artifact_file)
    plt.close(figure)


def _errorbars(axes, summary: pd.DataFrame, x: str, metric: str, label: str) -> None:
    """Mean ± std over seeds (std is 0 for a single seed)."""
    axes.errorbar(summary[x], summary[f"{metric}_mean"], yerr=summary[f"{metric}_std"].fillna(0.0), marker="o",
                  capsize=4, label=label)


def metric_vs_x(summary: pd.DataFrame, x: str, series: dict[str, str], ylabel: str, title: str,
                log_x: bool = True) -> plt.Figure:
    """One line with error bars per metric of `series` (metric → legend label) against column `x`."""
    figure, axes = plt.subplots(figsize=(6, 4))
    for metric, label in series.items():
        if f"{metric}_mean" in summary and summary[f"{metric}_mean"].notna().any():
            _errorbars(axes, summary, x, metric, label)
    if log_x:
        axes.set_xscale("log", base=2)
    axes.set_xticks(list(summary[x]), [str(v) for v in summary[x]])
    axes.set_xlabel(x)
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    return figure


def loss_curves(curves: dict[str, list[tuple[int, float]]]) -> plt.Figure:
    """Training loss against step, one line per run."""
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for name, points in curves.items():
        if points:
            steps, losses = zip(*points)
            axes.plot(steps, losses, label=name, linewidth=1.2)
    axes.set_xlabel("step")
    axes.set_ylabel("train_loss")
    axes.set_title("Training loss per child run")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small", ncol=2)
    figure.tight_layout()
    return figure


def confusion_figure(matrix: dict) -> plt.Figure:
    """A confusion matrix as `metrics.confusion` returns it: rows are true labels, columns predictions."""
    figure, axes = plt.subplots(figsize=(4.5, 4))
    ConfusionMatrixDisplay(np.array(matrix["matrix"]), display_labels=matrix["labels"]).plot(
        ax=axes, cmap="Blues", colorbar=False, values_format="d"
    )
    axes.set_xlabel("predicted label")
    axes.set_ylabel("true label")
    axes.set_title("Confusion matrix (evaluation split)")
    figure.tight_layout()
    return figure
