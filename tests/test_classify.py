"""`classify` in-process: the compiled path trains on bucketed lengths with one graph per bucket, counts its
compile time, and evaluates eagerly in dataset order."""

from __future__ import annotations

import random

import pandas as pd
import pytest
import torch

from finetune_lab import classify, training
from finetune_lab.config import ClassifyConfig


@pytest.fixture
def reviews(tmp_path) -> str:
    """Texts of 1 to 150 words (the embedded set's all fit one 64-token bucket), labelled by a word."""
    rng = random.Random(0)
    words = "good bad film plot actor scene music long short great dull fine".split()
    rows = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 150))) for _ in range(190)]
    frame = pd.DataFrame({"text": rows, "label": [int("good" in r) for r in rows]})
    path = tmp_path / "reviews.csv"
    frame.to_csv(path, index=False)
    return str(path)


def tiny_classify(dataset: str, **overrides) -> ClassifyConfig:
    settings = dict(model="tiny", dataset=dataset, max_length=160, batch_size=16, max_steps=6, learning_rate=1e-3,
                    experiment="classify-unit")
    return ClassifyConfig(**{**settings, **overrides})


def run_recording_shapes(monkeypatch, config: ClassifyConfig) -> tuple[dict, list[tuple], list[tuple]]:
    """Run the experiment; return its result and the input shapes of the training and evaluation forwards."""
    shapes = {True: [], False: []}
    original = training.make_trainer

    def record(model, *args, **kwargs):
        model.register_forward_pre_hook(
            lambda module, a, kw: shapes[module.training].append(tuple(kw["input_ids"].shape)), with_kwargs=True)
        return original(model, *args, **kwargs)

    monkeypatch.setattr(training, "make_trainer", record)
    return classify.run(config), shapes[True], shapes[False]


def test_compiled_training_uses_one_graph_per_length_bucket(client, monkeypatch, reviews):
    monkeypatch.setattr(training, "COMPILE_BACKEND", "eager")  # the graphs, without minutes of inductor on CPU
    # One epoch of 152 examples in batches of 9: 16 full batches (length-grouped), and a last one of 8 to drop.
    config = tiny_classify(reviews, compile="on", batch_size=9, max_steps=0)
    result, trained, evaluated = run_recording_shapes(monkeypatch, config)
    metrics = client.get_run(result["run_id"]).data.metrics
    assert len(trained) == 16 and all(rows == 9 for rows, _ in trained), "one batch size: the last is dropped"
    buckets = {length for _, length in trained}
    assert all(length % training.BUCKET_TOKENS == 0 for length in buckets)
    assert metrics["compiled_graphs"] == len(buckets) >= 2, "one graph per bucket, and the data spans several"
    assert 0 < metrics["compile_s"] <= metrics["warmup_s"] < metrics["train_runtime_s"]
    # Evaluation is eager and dynamically padded: its shapes compile nothing, and every held-out row is predicted.
    assert sum(rows for rows, _ in evaluated) == 38
    assert any(length % training.BUCKET_TOKENS for _, length in evaluated)


def test_uncompiled_training_pads_dynamically_and_reports_no_compile_time(client, monkeypatch, reviews):
    result, trained, _ = run_recording_shapes(monkeypatch, tiny_classify(reviews, compile="off"))
    metrics = client.get_run(result["run_id"]).data.metrics
    assert any(length % training.BUCKET_TOKENS for _, length in trained)
    assert "compile_s" not in metrics and "compiled_graphs" not in metrics
    assert metrics["warmup_s"] >= 0 and metrics["train_step_ms_median"] > 0


def test_compile_auto_is_on_only_with_cuda():
    assert training.switch("auto") == torch.cuda.is_available()
    assert training.switch("on") and not training.switch("off")


@pytest.mark.parametrize("value", ["yes", ""])
def test_compile_must_be_auto_on_or_off(value):
    assert ClassifyConfig(compile=value).problems() == [f"compile: must be one of auto, on, off, got {value!r}"]
