import math
import time
from types import SimpleNamespace

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

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
    logger.flush([])  # the steps go to the store asynchronously: wait for them
    history = client.get_metric_history(run_id, "train_loss")
    assert [(m.step, m.value) for m in history] == [(3, 0.5)]
    # The per-step learning rate is `lr`: the param `learning_rate` is the configured peak.
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "lr")] == [(3, 1e-4)]
    assert "learning_rate" not in client.get_run(run_id).data.metrics


def test_step_metrics_are_written_off_the_loop_and_flush_stores_every_step(tracking_uri, client, monkeypatch):
    """on_log only hands a step over (MLflow's asynchronous logging writes it); flush hands over the steps the
    Trainer logged that never reached on_log (a signal between a step and its logging) and waits for all."""
    run_id = client.create_run(client.create_experiment("async-steps")).info.run_id
    logger = training.MlflowStepLogger(run_id)
    handed = []
    original = MlflowClient.log_batch
    monkeypatch.setattr(MlflowClient, "log_batch", lambda self, *a, synchronous=True, **k: handed.append(
        synchronous) or original(self, *a, synchronous=synchronous, **k))
    entries = [{"step": step, "loss": 1.0 / step, "grad_norm": 2.0} for step in range(1, 6)]
    for entry in entries[:3]:
        logger.on_log(None, SimpleNamespace(global_step=entry["step"]), None, logs=dict(entry))
    assert handed == [False] * 3, "never a synchronous write in the training loop"
    logger.flush(entries)
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "train_loss")] == [
        (step, 1.0 / step) for step in range(1, 6)]
    assert len(client.get_metric_history(run_id, "grad_norm")) == 5 and logger.pending == []
    logger.flush(entries)
    assert len(handed) == 4 and len(client.get_metric_history(run_id, "train_loss")) == 5, "each step once"
    assert logger.seconds > 0 and logger.flush_seconds > 0


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


def test_throughput_comes_from_the_batches_trained_on_and_the_step_times():
    steps = [training.StepTime(5.0, True), training.StepTime(1.0, False), training.StepTime(3.0, True),
             training.StepTime(1.2, False), training.StepTime(0.8, False)]
    batches = [(8, 100), (8, 120), (8, 90), (4, 70), (8, 60), (8, 999)]  # the last one was built ahead, unused
    metrics = training.throughput(12.0, steps, batches)
    assert metrics["train_steps"] == 5 and metrics["train_examples"] == 36 and metrics["train_tokens"] == 440
    assert metrics["train_tokens_per_s"] == pytest.approx(440 / 12) and metrics["train_samples_per_s"] == 3.0
    assert metrics["train_step_ms_median"] == pytest.approx(1200)
    # warm-up: the first step and the one that compiled, beyond the median step; steady: the other three
    assert metrics["warmup_s"] == pytest.approx((5.0 - 1.2) + (3.0 - 1.2))
    assert metrics["compile_s"] == pytest.approx(metrics["warmup_s"])
    assert metrics["steady_tokens_per_s"] == pytest.approx((120 + 70 + 60) / (1.0 + 1.2 + 0.8))
    eager = training.throughput(3.0, [training.StepTime(2.0, False), training.StepTime(0.5, False)], batches)
    assert "compile_s" not in eager and eager["warmup_s"] == pytest.approx(2.0 - 1.25)


def test_train_counts_the_examples_and_real_tokens_the_model_saw(client, tmp_path):
    """Stopped mid-epoch, the dataloader has built a batch more than was trained on; the counts must be those
    of the forwards the model ran, padding excluded."""
    import datasets
    from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding

    from finetune_lab import models
    from finetune_lab.config import ClassifyConfig

    texts = [" ".join(["word"] * (n % 23 + 1)) for n in range(40)]
    model, tokenizer = models.load(models.tiny(models.CLASSIFIER, texts, seed=0), AutoModelForSequenceClassification)
    encoded = datasets.Dataset.from_dict(dict(tokenizer(texts), labels=[n % 2 for n in range(40)]))
    seen = []
    model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["attention_mask"]) if module.training else None,
        with_kwargs=True)
    config = ClassifyConfig(max_steps=3, batch_size=4)
    run_id = client.create_run(client.create_experiment("counts")).info.run_id
    trainer = training.make_trainer(model, tokenizer, tmp_path, encoded, DataCollatorWithPadding(tokenizer), config,
                                    0, run_id, "counts")
    metrics = training.train(trainer)
    assert len(seen) == 3 == metrics["train_steps"]
    assert metrics["train_examples"] == sum(mask.shape[0] for mask in seen) == 12
    assert metrics["train_tokens"] == sum(int(mask.sum()) for mask in seen)
    assert metrics["train_tokens"] < sum(mask.numel() for mask in seen), "the batches were padded"
    assert metrics["train_tokens_per_s"] == pytest.approx(metrics["train_tokens"] / metrics["train_runtime_s"])
