import math
import time
from types import SimpleNamespace

import numpy as np
import pytest

from finetune_lab import training


def test_peak_memory_sees_an_allocation_inside_the_block():
    with training.PeakMemory(interval_s=0.01) as baseline:
        pass
    with training.PeakMemory(interval_s=0.01) as memory:
        block = np.ones(200 * 2**20 // 8)  # 200 MB, every page written so it is resident
        time.sleep(0.2)  # let the sampler see it
        del block
    assert memory.metrics["peak_rss_mb"] > baseline.metrics["peak_rss_mb"] + 150


def test_step_logger_records_loss_into_its_run_and_stops_on_nan(tracking_uri, client):
    run_id = client.create_run(client.create_experiment("steps")).info.run_id
    logger = training.MlflowStepLogger(run_id)
    logger.on_log(None, SimpleNamespace(global_step=3), None, logs={"loss": 0.5, "learning_rate": 1e-4})
    with pytest.raises(training.NonFiniteLossError, match="step 4"):
        logger.on_log(None, SimpleNamespace(global_step=4), None, logs={"loss": math.nan})
    history = client.get_metric_history(run_id, "train_loss")
    assert [(m.step, m.value) for m in history] == [(3, 0.5)]
    # The per-step learning rate is `lr`: the param `learning_rate` is the configured peak.
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "lr")] == [(3, 1e-4)]
    assert "learning_rate" not in client.get_run(run_id).data.metrics


def test_predictions_come_back_in_dataset_order_whatever_the_lengths():
    """Row i of `predict_logits` is example i: compared with the model run on each text alone."""
    import datasets
    import torch
    from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding

    from finetune_lab import models

    texts = [" ".join(["word"] * n + [f"text{n}"]) for n in (30, 2, 17, 5, 25, 1, 9, 40, 3, 12)]
    model, tokenizer = models.load(models.tiny(models.CLASSIFIER, texts * 3, seed=0),
                                   AutoModelForSequenceClassification)
    with torch.no_grad():  # a random tiny head answers almost alike for every text: spread its answers apart
        model.classifier.weight.normal_(std=50.0)
    encoded = datasets.Dataset.from_dict(dict(tokenizer(texts), labels=[0] * len(texts)))
    logits = training.predict_logits(model, encoded, DataCollatorWithPadding(tokenizer), batch_size=3)
    model.eval()
    with torch.no_grad():
        alone = np.concatenate([model(**tokenizer(t, return_tensors="pt")).logits.numpy() for t in texts])
    assert logits.shape == (len(texts), 2)
    assert np.allclose(logits, alone, atol=1e-4)
    assert len({round(float(x), 3) for x in alone[:, 0]}) == len(texts), "distinct rows, so an order swap shows"
