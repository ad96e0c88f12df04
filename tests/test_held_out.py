"""Per-example held-out records read back from the store: a classifier's predictions table as `classify` logs it, a
causal LM's per-example losses; seeds pooled per example only on the same examples; each run's read once."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from finetune_lab import held_out, verdicts
from finetune_lab.experiments import classify

TEXTS = ["good", "bad", "fine", "dull"]
LABELS = np.array([1, 0, 1, 0])


def logged_predictions(probabilities, texts=TEXTS) -> str:
    """A run holding a classifier's predictions table, written as `classify` writes it; its id."""
    with mlflow.start_run() as run:
        classify._log_predictions(texts, LABELS, np.asarray(probabilities), ["negative", "positive"])
    return run.info.run_id


def logged_losses(losses, digest: str = "split") -> str:
    with mlflow.start_run() as run:
        held_out.log_losses(held_out.losses_record(np.asarray(losses, float), np.array([3, 0, 2]), digest))
    return run.info.run_id


def test_a_classifiers_record_is_its_predictions_and_seeds_pool_into_their_ensemble(client):
    mlflow.set_experiment("records")
    first = logged_predictions([[0.2, 0.8], [0.6, 0.4], [0.55, 0.45], [0.9, 0.1]])  # wrong on "fine"
    second = logged_predictions([[0.4, 0.6], [0.3, 0.7], [0.1, 0.9], [0.8, 0.2]])  # wrong on "bad"
    records = held_out.Records(client)
    record = records.of(first)
    assert record.kind == verdicts.CORRECT and record.values.tolist() == [1.0, 1.0, 0.0, 1.0]
    assert record.probabilities.shape == (4, 2) and record.labels.tolist() == LABELS.tolist()
    assert records.pooled([first]).values.tolist() == [1.0, 1.0, 0.0, 1.0]
    # averaged: "bad" 0.45 / 0.55 → wrong, "fine" 0.325 / 0.675 → right
    assert records.pooled([first, second]).values.tolist() == [1.0, 0.0, 1.0, 1.0]
    other = logged_predictions([[0.2, 0.8]] * 4, texts=["other", "texts", "held", "out"])
    assert records.of(other).examples != record.examples
    assert records.pooled([first, other]) is None, "other examples do not pool"


def test_a_language_models_record_round_trips_its_missing_losses(client):
    mlflow.set_experiment("records")
    run_id = logged_losses([2.0, np.nan, 1.5])
    record = held_out.Records(client).of(run_id)
    assert record.kind == verdicts.LOSS and record.examples == "split"
    assert record.values[[0, 2]].tolist() == [2.0, 1.5] and np.isnan(record.values[1])
    records = held_out.Records(client)
    pooled = records.pooled([run_id, logged_losses([4.0, np.nan, 2.5])])
    assert pooled.values[[0, 2]].tolist() == [3.0, 2.0] and pooled.examples == "split"
    assert records.pooled([run_id, logged_losses([4.0, np.nan, 2.5], digest="another split")]) is None


def test_runs_without_a_record_pool_into_nothing_and_each_record_is_read_once(client, monkeypatch):
    mlflow.set_experiment("records")
    with mlflow.start_run() as bare:
        mlflow.log_metric("eval_loss", 1.0)
    recorded = logged_losses([1.0, 2.0, 3.0])
    downloads = []
    original = MlflowClient.download_artifacts
    monkeypatch.setattr(MlflowClient, "download_artifacts",
                        lambda self, run_id, *args, **kwargs: downloads.append(run_id) or original(self, run_id, *args,
                                                                                                   **kwargs))
    records = held_out.Records(client)
    assert records.pooled([recorded, bare.info.run_id]) is None
    assert records.of("0" * 32) is None, "a run the store does not have"
    assert records.pooled([]) is None
    for _ in range(3):
        assert records.pooled([recorded]).values.tolist() == pytest.approx([1.0, 2.0, 3.0])
    assert downloads == [recorded]
