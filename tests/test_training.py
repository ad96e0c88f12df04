import math
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
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


def test_steps_are_handed_over_several_at_a_time_and_flush_stores_every_step(tracking_uri, client, monkeypatch):
    """on_log keeps the logged steps and hands them to MLflow's asynchronous logging in one request at most every
    `interval_s` (the first at once); flush hands over the rest and the steps the Trainer logged that never reached
    on_log (a signal between a step and its logging), in one request, and waits for all."""
    run_id = client.create_run(client.create_experiment("async-steps")).info.run_id
    logger = training.MlflowStepLogger(run_id, interval_s=3600)
    handed = []
    original = MlflowClient.log_batch
    monkeypatch.setattr(MlflowClient, "log_batch", lambda self, *a, synchronous=True, metrics=(), **k: handed.append(
        (synchronous, sorted({m.step for m in metrics}))) or original(self, *a, synchronous=synchronous,
                                                                         metrics=metrics, **k))
    entries = [{"step": step, "loss": 1.0 / step, "grad_norm": 2.0} for step in range(1, 7)]
    for entry in entries[:4]:
        logger.on_log(None, SimpleNamespace(global_step=entry["step"]), None, logs=dict(entry))
    assert handed == [(False, [1])], "the first step at once, never a synchronous write in the training loop"
    assert [e["step"] for e in logger.kept] == [2, 3, 4]
    logger.flush(entries[:5])
    assert handed == [(False, [1]), (False, [2, 3, 4, 5])], "the rest in one request"
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "train_loss")] == [
        (step, 1.0 / step) for step in range(1, 6)]
    assert len(client.get_metric_history(run_id, "grad_norm")) == 5 and logger.pending == [] == logger.kept
    logger.flush(entries)
    assert handed[-1] == (False, [6]) and len(client.get_metric_history(run_id, "train_loss")) == 6, "each step once"
    assert logger.seconds > 0 and logger.flush_seconds > 0

    every_step = training.MlflowStepLogger(run_id, interval_s=0)
    for entry in entries[:2]:
        every_step.on_log(None, SimpleNamespace(global_step=entry["step"]), None, logs=dict(entry))
    assert handed[-2:] == [(False, [1]), (False, [2])], "an interval of 0: one request per step"
    every_step.flush([])


def test_predictions_come_back_in_dataset_order_whatever_the_lengths():
    """Row i of `predict_logits` is example i: compared with the model run on each text alone."""
    import datasets
    import torch
    from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding

    from finetune_lab import models

    lengths = (30, 2, 17, 5, 25, 1, 9, 40, 3, 12)
    texts = [" ".join(f"word{(n * j) % 7}" for j in range(n)) + f" text{n}" for n in lengths]
    model, tokenizer = models.load(models.tiny(models.CLASSIFIER, texts * 3, seed=0),
                                   AutoModelForSequenceClassification)
    with torch.no_grad():  # a random tiny head answers almost alike for every text: spread its answers apart
        model.classifier.weight.normal_(std=50.0)
    encoded = datasets.Dataset.from_dict(dict(tokenizer(texts), labels=[0] * len(texts)))
    logits = training.predict_logits(model, encoded, DataCollatorWithPadding(tokenizer), batch_size=3,
                                     precision="fp32")
    model.eval()
    with torch.no_grad():
        alone = np.concatenate([model(**tokenizer(t, return_tensors="pt")).logits.numpy() for t in texts])
    assert logits.shape == (len(texts), 2)
    assert np.allclose(logits, alone, atol=1e-4)
    apart = np.abs(alone[:, None, :] - alone[None, :, :]).max(axis=-1) + np.eye(len(texts))
    assert apart.min() > 10 * 1e-4, "rows further apart than the tolerance, so an order swap shows"


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


def tiny_classifier():
    """A tiny random classifier, its tokenizer and 40 encoded texts of varied lengths with labels."""
    import datasets
    from transformers import AutoModelForSequenceClassification

    from finetune_lab import models

    texts = [" ".join(["word"] * (n % 23 + 1)) for n in range(40)]
    model, tokenizer = models.load(models.tiny(models.CLASSIFIER, texts, seed=0), AutoModelForSequenceClassification)
    return model, tokenizer, datasets.Dataset.from_dict(dict(tokenizer(texts), labels=[n % 2 for n in range(40)]))


def compute_dtypes(model) -> list[tuple[bool, torch.dtype]]:
    """(training?, dtype) of every output of the model's first linear layer from now on: what its forward computes
    in, seen from inside it."""
    seen = []
    layer = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
    layer.register_forward_hook(lambda module, args, output: seen.append((module.training, output.dtype)))
    return seen


def test_bf16_on_a_cpu_trains_in_bf16_and_hands_the_model_on_with_its_own_forward(client, tmp_path):
    """precision=bf16 on a CPU runs what a GPU with bf16 runs: the Trainer's forward computes in bf16 (seen inside
    it). accelerate leaves its autocast wrapper on the model (`_original_forward`): `train` takes it off, so that
    the model handed on computes in its weights' fp32, exactly as a registered copy of it does; evaluation autocasts
    to the precision itself."""
    from transformers import DataCollatorWithPadding

    from finetune_lab.config import ClassifyConfig

    model, tokenizer, encoded = tiny_classifier()
    seen = compute_dtypes(model)
    run_id = client.create_run(client.create_experiment("bf16")).info.run_id
    collator = DataCollatorWithPadding(tokenizer)
    trainer = training.make_trainer(model, tokenizer, tmp_path, encoded, collator,
                                    ClassifyConfig(max_steps=2, batch_size=4, precision="bf16"), 0, run_id, "bf16")
    training.train(trainer)
    assert trainer.args.bf16 and {dtype for in_training, dtype in seen if in_training} == {torch.bfloat16}
    assert "_original_forward" not in model.__dict__
    batch = collator([encoded[i] for i in range(4)])
    model.eval()
    seen.clear()
    with torch.no_grad():
        handed_on = model(**batch).logits
        own = type(model).forward(model, **batch).logits
    assert torch.equal(handed_on, own) and {dtype for _, dtype in seen} == {torch.float32}
    for precision, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        seen.clear()
        training.predict_logits(model, encoded, collator, batch_size=8, precision=precision)
        assert {computed for _, computed in seen} == {dtype}, precision


def test_the_trainers_autocast_wrapper_is_what_own_forward_takes_off(tmp_path):
    """The defect `own_forward` fixes: after `Trainer.train()` in bf16 the model's forward is accelerate's autocast
    wrapper, and the model computes other logits than its own forward does."""
    from transformers import DataCollatorWithPadding, Trainer

    from finetune_lab.config import ClassifyConfig

    model, tokenizer, encoded = tiny_classifier()
    with torch.no_grad():  # logits far from zero, so that bf16 rounds them visibly
        model.classifier.weight.normal_(std=50.0)
    arguments = training.training_arguments(tmp_path, ClassifyConfig(max_steps=1, batch_size=4, precision="bf16"), 0)
    collator = DataCollatorWithPadding(tokenizer)
    Trainer(model=model, args=arguments, train_dataset=encoded, data_collator=collator).train()
    batch = collator([encoded[i] for i in range(4)])
    model.eval()
    with torch.no_grad():
        wrapped, own = model(**batch).logits, type(model).forward(model, **batch).logits
        assert "_original_forward" in model.__dict__ and not torch.equal(wrapped, own)
        training.own_forward(model)
        assert "_original_forward" not in model.__dict__ and torch.equal(model(**batch).logits, own)


def test_fp16_on_a_cpu_would_train_in_fp32_without_a_word(tmp_path):
    """Why `precision=fp16` is refused without a GPU (`device.precision_problems`): the Trainer takes fp16=True on a
    CPU and trains in fp32, with no autocast wrapper and no GradScaler (torch 2.13, accelerate 1.15, transformers
    5.24). Should a later accelerate train in fp16 on a CPU, this fails and the refusal can go."""
    from transformers import DataCollatorWithPadding, Trainer

    from finetune_lab.config import ClassifyConfig

    model, tokenizer, encoded = tiny_classifier()
    seen = compute_dtypes(model)
    arguments = training.training_arguments(tmp_path, ClassifyConfig(max_steps=2, batch_size=4, precision="fp16"), 0)
    trainer = Trainer(model=model, args=arguments, train_dataset=encoded,
                      data_collator=DataCollatorWithPadding(tokenizer))
    trainer.train()
    assert arguments.fp16 and trainer.accelerator.mixed_precision == "fp16", "asked for fp16..."
    assert {dtype for in_training, dtype in seen if in_training} == {torch.float32}, "... computed in fp32"
    assert not trainer.accelerator.native_amp and trainer.accelerator.scaler is None
    assert "_original_forward" not in model.__dict__
