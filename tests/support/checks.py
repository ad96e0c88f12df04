"""Independent recomputations: a classification run's metrics from its logged predictions, and an adapter reloaded
on its base the way a user does it, without the project's code."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient


def assert_metrics_match_predictions(metrics: dict, table) -> None:
    """The headline metrics of a classification run (of any number of classes), recomputed independently from its
    logged predictions table."""
    import numpy as np
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support, roc_auc_score

    labels, predictions = table["label"].to_numpy(), table["prediction"].to_numpy()
    classes = sum(1 for column in table.columns if column.startswith("prob_"))
    probabilities = table[[f"prob_{k}" for k in range(classes)]].to_numpy()
    assert np.array_equal(predictions, probabilities.argmax(axis=1))
    assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    binary = classes == 2
    precision, recall, f1, _ = precision_recall_fscore_support(labels, predictions, zero_division=0,
                                                               average="binary" if binary else "macro")
    assert metrics["accuracy"] == pytest.approx(accuracy_score(labels, predictions), abs=1e-9)
    assert metrics["precision"] == pytest.approx(precision, abs=1e-9)
    assert metrics["recall"] == pytest.approx(recall, abs=1e-9)
    assert metrics["f1"] == pytest.approx(f1, abs=1e-9)
    if set(labels) != set(range(classes)):
        assert "roc_auc" not in metrics, "undefined where a class is missing from the held-out labels"
    elif binary:
        assert metrics["roc_auc"] == pytest.approx(roc_auc_score(labels, probabilities[:, 1]), abs=1e-6)
    else:
        assert metrics["roc_auc"] == pytest.approx(roc_auc_score(labels, probabilities, multi_class="ovr"), abs=1e-6)
    own_label = probabilities[np.arange(len(labels)), labels]
    assert metrics["eval_loss"] == pytest.approx(-np.log(own_label).mean(), rel=1e-6)


def adapter_on_base(client: MlflowClient, run_id: str, base_path: str, folder: Path, dtype=None):
    """The adapter run `run_id` logged, on its base loaded afresh from `base_path` in `dtype` (default fp32), in
    eval mode, with the tokenizer logged with it: how a user reloads it, independently of the project's code."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter_dir = client.download_artifacts(run_id, "adapter", str(folder / run_id))
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype or torch.float32)
    return PeftModel.from_pretrained(base, adapter_dir).eval(), AutoTokenizer.from_pretrained(adapter_dir)


def greedy_reply(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """The greedy reply to `prompt` in the `plain` format (`prompt` + newline)."""
    import torch

    encoded = tokenizer(f"{prompt}\n", add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(output[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True).strip()
