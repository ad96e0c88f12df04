from finetune_lab import metrics, plots


def test_confusion_figure_has_true_labels_on_rows():
    matrix = metrics.confusion([0, 0, 1], [0, 1, 1], ["neg", "pos"])
    figure = plots.confusion_figure(matrix)
    axes = figure.axes[0]
    assert axes.get_xlabel() == "predicted label" and axes.get_ylabel() == "true label"
    assert [t.get_text() for t in axes.get_xticklabels()] == ["neg", "pos"]
    shown = sorted((t.get_position(), t.get_text()) for t in axes.texts)
    # cell (row=true, column=predicted) at (x=column, y=row)
    assert shown == [((0, 0), "1"), ((0, 1), "0"), ((1, 0), "1"), ((1, 1), "1")]
