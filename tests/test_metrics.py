import numpy as np
import pytest

from finetune_lab import metrics


def test_binary_metrics_against_hand_counts():
    # 6 examples: TP=2 (idx 0,1), FN=1 (idx 2), FP=1 (idx 3), TN=2 (idx 4,5)
    labels = [1, 1, 1, 0, 0, 0]
    p1 = np.array([0.9, 0.8, 0.4, 0.7, 0.2, 0.1])
    result = metrics.classification_metrics(labels, np.stack([1 - p1, p1], axis=1))
    assert result["accuracy"] == pytest.approx(4 / 6)
    assert result["precision"] == pytest.approx(2 / 3)
    assert result["recall"] == pytest.approx(2 / 3)
    assert result["f1"] == pytest.approx(2 / 3)
    # Of the 9 positive/negative pairs, the positive scores higher in 8 (0.4 < 0.7 is the exception).
    assert result["roc_auc"] == pytest.approx(8 / 9)


def test_multiclass_uses_macro_averages_one_vs_rest_auc_included():
    labels = [0, 1, 2, 2]
    probabilities = np.eye(3)[[0, 1, 1, 2]]
    result = metrics.classification_metrics(labels, probabilities)
    assert result["accuracy"] == pytest.approx(0.75)
    assert result["recall"] == pytest.approx((1 + 1 + 0.5) / 3)
    # Each class against the rest, pairs counted by hand (a tie counts one half): class 0 ranks its one positive
    # above all 3 negatives (1); class 1 above 2 of 3 and tied with one (2.5 / 3); class 2 ties both negatives with
    # one positive and beats them with the other (3 / 4).
    assert result["roc_auc"] == pytest.approx((1 + 2.5 / 3 + 3 / 4) / 3)


@pytest.mark.parametrize("classes", [2, 3])
def test_no_auc_when_a_class_is_missing_from_the_labels(classes):
    labels = [0, 1, 0, 1]
    probabilities = np.full((4, classes), 1 / classes)
    assert ("roc_auc" in metrics.classification_metrics(labels, probabilities)) == (classes == 2)
    assert "roc_auc" not in metrics.classification_metrics([0, 0, 0, 0], probabilities)


def test_confusion_matrix_rows_are_true_labels():
    matrix = metrics.confusion([0, 0, 1], [0, 1, 1], ["neg", "pos"])
    assert matrix["matrix"] == [[1, 1], [0, 1]]


def test_softmax_rows_sum_to_one():
    assert np.allclose(metrics.softmax(np.array([[1000.0, 0.0], [1.0, 1.0]])).sum(axis=1), 1.0)


def test_cross_entropy_is_the_mean_negative_log_probability_of_the_true_label():
    logits = np.array([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    labels = [0, 0, 1]
    probabilities = metrics.softmax(logits)
    expected = -np.mean(np.log([probabilities[0, 0], probabilities[1, 0], probabilities[2, 1]]))
    assert metrics.cross_entropy(logits, labels) == pytest.approx(expected)
