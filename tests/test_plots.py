"""Figures that do not mislead: class names, how many seeds, what memory, axes from where the quantity starts,
integer steps, legends that hide no line."""

import pandas as pd
import pytest

from finetune_lab import metrics, plots
from finetune_lab.experiments import probe


def test_confusion_figure_has_true_labels_on_rows():
    matrix = metrics.confusion([0, 0, 1], [0, 1, 1], ["neg", "pos"])
    figure = plots.confusion_figure(matrix)
    axes = figure.axes[0]
    assert axes.get_xlabel() == "predicted label" and axes.get_ylabel() == "true label"
    assert [t.get_text() for t in axes.get_xticklabels()] == ["neg", "pos"]
    shown = sorted((t.get_position(), t.get_text()) for t in axes.texts)
    # cell (row=true, column=predicted) at (x=column, y=row)
    assert shown == [((0, 0), "1"), ((0, 1), "0"), ((1, 0), "1"), ((1, 1), "1")]


def rank_summary(seeds: list[int], **metrics_mean) -> pd.DataFrame:
    frame = pd.DataFrame({"rank": [2, 4, 8], "seeds": seeds})
    for name, values in metrics_mean.items():
        frame[f"{name}_mean"], frame[f"{name}_std"] = values, [0.01 if n > 1 else float("nan") for n in seeds]
    return frame


@pytest.mark.parametrize("seeds, note", [([1, 1, 1], "(n=1 seed: no error bars)"),
                                         ([2, 2, 2], "(mean ± std over n=2 seeds)"),
                                         ([2, 1, 2], "(mean ± std over n=1–2 seeds)")])
def test_loss_vs_rank_says_how_many_seeds(seeds, note):
    figure = plots.loss_vs_rank(rank_summary(seeds, eval_loss=[2.0, 1.9, 1.8], train_loss=[2.1, 2.0, 1.9]))
    assert figure.axes[0].get_title() == f"Loss vs LoRA rank {note}"


def test_memory_vs_rank_starts_at_zero_and_names_what_it_measured():
    cpu = plots.memory_vs_rank(rank_summary([1, 1, 1], peak_rss_mb=[2010.0, 2040.0, 2020.0],
                                            peak_cuda_mem_allocated_mb=[float("nan")] * 3))
    axes = cpu.axes[0]
    assert axes.get_ylim()[0] == 0 and axes.get_ylabel() == "peak RSS of the whole process (MB)"
    assert axes.get_ylim()[1] > 2040
    gpu = plots.memory_vs_rank(rank_summary([1, 1, 1], peak_rss_mb=[2010.0, 2040.0, 2020.0],
                                            peak_cuda_mem_allocated_mb=[900.0, 950.0, 1000.0]))
    assert gpu.axes[0].get_ylabel() == "peak CUDA memory allocated (MB)" and gpu.axes[0].get_ylim()[0] == 0


def test_loss_curves_tick_whole_steps():
    figure = plots.loss_curves({"r2-seed1": [(1, 2.0), (2, 1.9), (3, 1.85)]})
    figure.canvas.draw()
    ticks = [t for t in figure.axes[0].get_xticks() if 1 <= t <= 3]
    assert ticks and all(float(t).is_integer() for t in ticks)


def overlaps(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def probe_table(rouge_before: float, rouge_after: list[float]) -> pd.DataFrame:
    n = len(rouge_after)
    return pd.DataFrame({"repeats": [0, 1, 32][:n], "rouge_l_before": [rouge_before] * n, "rouge_l_after": rouge_after,
                         "target_nll_before": [3.0] * n, "target_nll_after": [3.1, 2.5, 0.4][:n],
                         "target_nll_new_input_before": [3.2] * n, "target_nll_new_input_after": [3.3, 2.0, 0.2][:n]})


def test_the_legend_hides_no_line_and_the_control_stays_on_the_axis():
    figure = probe.target_nll_figure(probe_table(0.4, [0.4, 0.41, 0.42]))
    figure.canvas.draw()
    axes, (legend,) = figure.axes[0], figure.legends
    assert not overlaps(legend.get_window_extent(), axes.get_window_extent()), "the legend is outside the plot"
    assert {t.get_text() for t in legend.get_texts()} == {"NLL | probe_input after", "NLL | probe_input before",
                                                         "NLL | new_input after", "NLL | new_input before"}
    assert axes.get_xlim()[0] <= 0 < axes.get_xlim()[1], "repeats=0 (the control) is plotted"


def test_the_similarity_figure_is_not_zoomed():
    figure = probe.similarity_figure(probe_table(0.40, [0.40, 0.41, 0.42]))
    assert figure.axes[0].get_ylim() == (0, 1)


def methods_summary() -> pd.DataFrame:
    frame = pd.DataFrame({"method": ["dora", "dora", "lora", "lora"], "rank": [4, 8, 4, 8], "seeds": [2] * 4})
    for name, values in {"eval_loss": [2.0, 1.9, 2.1, 2.0], "peak_rss_mb": [900.0, 910.0, 800.0, 805.0],
                         "train_step_ms_median": [120.0, 125.0, 100.0, 101.0], "trainable_params": [5, 9, 4, 8],
                         "adapter_size_bytes": [50, 90, 40, 80], "train_loss": [2.2, 2.1, 2.3, 2.2]}.items():
        frame[f"{name}_mean"], frame[f"{name}_std"] = values, [0.01] * 4
    return frame


def test_methods_are_lines_of_their_own_against_the_rank():
    figure = plots.methods_by_rank(methods_summary())
    panels = [axes for axes in figure.axes if axes.get_title()]
    assert [axes.get_title() for axes in panels] == ["held-out loss", "peak RSS of the whole process (MB)",
                                                     "median step time (ms)", "trainable parameters",
                                                     "adapter size (bytes)"]
    for axes in panels:
        assert [list(line.get_xdata()) for line in axes.get_lines() if line.get_marker() == "o"] == [[4, 8], [4, 8]]
    assert sorted(t.get_text() for t in figure.legends[0].get_texts()) == ["held-out loss, dora",
                                                                          "held-out loss, lora"]
    loss = plots.loss_vs_rank(methods_summary())
    assert sorted(t.get_text() for t in loss.legends[0].get_texts()) == ["held-out loss, dora", "held-out loss, lora"]


def test_metrics_by_configuration_show_every_seed_and_the_mean():
    table = pd.DataFrame({"configuration": ["a", "b", "a", "b"], "accuracy": [0.8, 0.9, 0.7, 0.95]})
    figure = plots.metrics_by_configuration(table, "configuration", {"accuracy": "accuracy"}, "n=2 seeds")
    axes = figure.axes[0]
    points = sorted(tuple(p) for c in axes.collections if hasattr(c, "get_offsets") for p in c.get_offsets()
                    if len(c.get_offsets()) == 2)
    assert points == [(0.0, 0.7), (0.0, 0.8), (1.0, 0.9), (1.0, 0.95)]
    means = [line.get_ydata()[0] for line in axes.get_lines() if line.get_marker() == "D"]
    assert means == pytest.approx([0.75, 0.925])
    assert [t.get_text() for t in axes.get_xticklabels()] == ["a", "b"]


def test_metrics_by_configuration_leave_out_a_metric_no_child_logged():
    """ROC-AUC is undefined where a class is missing from the held-out labels: its panel is left out, not a crash."""
    table = pd.DataFrame({"configuration": ["a", "b"], "accuracy": [0.8, 0.9], "roc_auc": [None, None]})
    figure = plots.metrics_by_configuration(table.drop(columns="roc_auc"), "configuration",
                                            {"accuracy": "accuracy", "roc_auc": "ROC-AUC", "f1": "F1"}, "n=1 seed")
    assert [axes.get_title() for axes in figure.axes] == ["accuracy"]
    figure = plots.metrics_by_configuration(table, "configuration", {"accuracy": "accuracy", "roc_auc": "ROC-AUC"},
                                            "n=1 seed")
    assert [axes.get_title() for axes in figure.axes] == ["accuracy"]
