"""`classify` in-process: the compiled path builds a bounded number of graphs (one for every sequence length, or
one per bucket length), counts them and its compile time, and evaluates eagerly in dataset order."""

from __future__ import annotations

import random

import pandas as pd
import pytest
import torch

from finetune_lab import training
from finetune_lab.config import ClassifyConfig
from finetune_lab.experiments import classify


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
    """Run the experiment; return its result and the input shapes of the training batches (as collated: a hook in
    the compiled forward would make the graph depend on them) and of the evaluation forwards."""
    trained, evaluated = [], []
    original = training.make_trainer

    def record(model, tokenizer, output_dir, dataset, collator, *args, **kwargs):
        def collate(features):
            batch = collator(features)
            trained.append(tuple(batch["input_ids"].shape))
            return batch

        model.register_forward_pre_hook(
            lambda module, a, kw: None if module.training else evaluated.append(tuple(kw["input_ids"].shape)),
            with_kwargs=True)
        return original(model, tokenizer, output_dir, dataset, collate, *args, **kwargs)

    monkeypatch.setattr(training, "make_trainer", record)
    return classify.run(config), trained, evaluated


# inductor on a CPU compiles for tens of seconds: the default (dynamic) in the fast tier, buckets in the slow one
@pytest.mark.parametrize("shapes", ["dynamic", pytest.param("buckets", marks=pytest.mark.slow)])
def test_compiled_training_builds_a_bounded_number_of_graphs(client, monkeypatch, reviews, shapes):
    """Graph counts only: compiling with the `eager` backend builds the same graphs as inductor without its minutes
    on a CPU; which shapes train faster is a GPU measurement (`bench`)."""
    monkeypatch.setattr(training, "COMPILE_BACKEND", "eager")
    # One epoch of 152 examples in batches of 9: 16 full batches (length-grouped), and a last one of 8 to drop.
    config = tiny_classify(reviews, compile="on", compile_shapes=shapes, batch_size=9, max_steps=0)
    result, trained, evaluated = run_recording_shapes(monkeypatch, config)
    metrics = client.get_run(result["run_id"]).data.metrics
    assert len(trained) == 16 and all(rows == 9 for rows, _ in trained), "one batch size: the last is dropped"
    lengths = {length for _, length in trained}
    if shapes == "dynamic":
        assert len(lengths) >= 8 and metrics["compile_graphs"] == 1, "one graph for every length"
    else:
        assert lengths == {64, 128, 160} and metrics["compile_graphs"] == len(lengths), "one graph per bucket"
    assert 0 < metrics["compile_s"] <= metrics["warmup_s"] < metrics["train_runtime_s"]
    # Evaluation is eager and dynamically padded: its shapes compile nothing, and every held-out row is predicted.
    assert sum(rows for rows, _ in evaluated) == 38
    assert {length for _, length in evaluated} - {64, 128, 160}


def test_uncompiled_training_pads_dynamically_and_reports_no_compile_time(client, monkeypatch, reviews):
    result, trained, _ = run_recording_shapes(monkeypatch, tiny_classify(reviews, compile="off"))
    metrics = client.get_run(result["run_id"]).data.metrics
    assert {length for _, length in trained} - {64, 128, 160}
    assert "compile_s" not in metrics and "compile_graphs" not in metrics
    assert metrics["warmup_s"] >= 0 and metrics["train_step_ms_median"] > 0


def test_bucket_lengths_are_powers_of_two_up_to_max_length():
    assert training.bucket_lengths(512) == [64, 128, 256, 512] and training.bucket_lengths(160) == [64, 128, 160]
    assert training.bucket_lengths(64) == [64] and training.bucket_lengths(32) == [32]
    assert training.graph_budget("buckets", 512) == 4 and training.graph_budget("dynamic", 512) == 1


def test_compile_auto_is_on_only_with_cuda():
    assert training.switch("auto") == torch.cuda.is_available()
    assert training.switch("on") and not training.switch("off")


@pytest.mark.parametrize("value", ["yes", ""])
def test_compile_must_be_auto_on_or_off(value):
    assert ClassifyConfig(compile=value).problems() == [f"compile: must be one of auto, on, off, got {value!r}"]
    assert ClassifyConfig(compile_shapes=value).problems() == [
        f"compile_shapes: must be one of dynamic, buckets, got {value!r}"]
