"""Metrics, computed with scikit-learn (classification), torch (language-model likelihoods) and rouge-score."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy.special import log_softmax
from scipy.special import softmax as _softmax
from sklearn.metrics import (
    accuracy_score,
    classification_report,
    confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Class probabilities from logits (last axis)."""
    return _softmax(logits, axis=-1)


def cross_entropy(logits: np.ndarray, labels: Sequence[int]) -> float:
    """Mean negative log-likelihood of the true labels (the classifier's held-out loss)."""
    log_probabilities = log_softmax(logits, axis=-1)
    return float(-log_probabilities[np.arange(len(labels)), np.asarray(labels)].mean())


def classification_metrics(labels: Sequence[int], probabilities: np.ndarray) -> dict[str, float]:
    """accuracy, precision, recall, f1 (binary: positive class 1; >2 classes: macro) and roc_auc (binary: of class
    1; >2 classes: the macro average of each class against the rest), the latter only when every class occurs in
    `labels` (it is undefined for a class that does not)."""
    predictions = probabilities.argmax(axis=-1)
    classes = probabilities.shape[-1]
    binary = classes == 2
    precision, recall, f1, _ = precision_recall_fscore_support(
        labels, predictions, average="binary" if binary else "macro", zero_division=0
    )
    metrics = {"accuracy": accuracy_score(labels, predictions), "precision": precision, "recall": recall, "f1": f1}
    if len(set(labels)) == classes:
        metrics["roc_auc"] = (roc_auc_score(labels, probabilities[:, 1]) if binary
                              else roc_auc_score(labels, probabilities, multi_class="ovr", average="macro"))
    return {k: float(v) for k, v in metrics.items()}


def confusion(labels: Sequence[int], predictions: Sequence[int], label_names: list[str]) -> dict:
    matrix = confusion_matrix(labels, predictions, labels=list(range(len(label_names))))
    return {"labels": label_names, "rows": "true label", "columns": "predicted label", "matrix": matrix.tolist()}


def report(labels: Sequence[int], predictions: Sequence[int], label_names: list[str]) -> dict:
    return classification_report(
        labels, predictions, labels=list(range(len(label_names))), target_names=label_names,
        output_dict=True, zero_division=0,
    )


def perplexity(loss: float) -> float:
    """exp(loss), capped so a diverged run logs a large finite number instead of inf."""
    return math.exp(min(loss, 50.0))


def mean_token_nll(model, input_ids: Sequence[int], labels: Sequence[int]) -> float:
    """Mean negative log-likelihood (nats per token) of the labelled tokens (label != -100), each predicted from
    the tokens before it; in eval mode (no dropout) and without gradients, so the same model gives the same value."""
    import torch

    from finetune_lab.models import eval_mode

    ids = torch.tensor([list(input_ids)], device=model.device)
    targets = torch.tensor([list(labels)[1:]], device=model.device)
    with eval_mode(model):
        logits = model(input_ids=ids).logits[:, :-1].float()
    return float(torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100))


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 of `prediction` against `reference` (longest common word subsequence, stemmed), computed
    locally with the `rouge-score` package; 0 for an empty prediction."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return float(scorer.score(reference, prediction)["rougeL"].fmeasure)
