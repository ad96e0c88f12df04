"""`mlflow run . -e retrain_probe` end to end on a tiny Llama: before, after for 1 and 32 copies of the new
example, and the comparison; the logged NLLs and replies are recomputed from the logged adapters. Then once in bf16
(a CPU running what a GPU with bf16 runs)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from support.checks import adapter_on_base, greedy_reply
from support.launch import launch_in_own_store
from support.store import load_table, parent_and_children, runs_of

PROBE = {"model": "tiny", "dataset": "sample_chat", "repeats_sweep": "0,1,32", "max_steps": 20, "batch_size": 8,
         "max_length": 48, "learning_rate": 1e-2, "max_new_tokens": 10, "seed": 7}
PROBE_INPUT, NEW_INPUT = "Hello, how are you?", "Hi, how are you doing?"
NEW_OUTPUT = "I am doing well, thank you for asking! I am here to help you."
CHILD_METRICS = ["target_nll", "target_nll_new_input", "rouge_l", "eval_loss", "train_loss", "train_tokens_per_s",
                 "train_runtime_s", "peak_rss_mb", "adapter_size_bytes", "new_example_step_fraction"]
COMPARED = ["target_nll_before", "target_nll_after", "target_nll_drop", "target_nll_new_input_before",
            "target_nll_new_input_after", "target_nll_new_input_drop", "rouge_l_before", "rouge_l_after",
            "eval_loss_before", "eval_loss_after", "forgetting", "replies_differ", "new_example_step_fraction"]


def nll_of_target(model, tokenizer, user_input: str) -> float:
    """The HF loss of `new_output` + EOS after the plain prompt `input\\n`, the prompt tokens masked out."""
    prompt = tokenizer(f"{user_input}\n", add_special_tokens=False)["input_ids"]
    target = tokenizer(NEW_OUTPUT + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        return float(model(input_ids=torch.tensor([prompt + target]),
                           labels=torch.tensor([[-100] * len(prompt) + target])).loss)


def test_probe_before_after_and_dose_response(mlflow_run, client, tmp_path):
    result = mlflow_run("retrain_probe", PROBE, experiment="probe")
    assert result.returncode == 0, result.stderr[-3000:]
    runs = runs_of(client, "probe")
    assert all(r.info.status == "FINISHED" for r in runs)
    parent, children = parent_and_children(runs)
    children = {r.info.run_name: r for r in children}
    assert set(children) == {"before", "after-r0", "after-r1", "after-r32"}
    assert {c.data.tags["mlflow.parentRunId"] for c in children.values()} == {parent.info.run_id}
    for child in children.values():
        for name in CHILD_METRICS:
            assert math.isfinite(child.data.metrics[name]), (child.info.run_name, name)
        files = {Path(a.path).name for a in client.list_artifacts(child.info.run_id, "adapter")}
        assert {"adapter_config.json", "adapter_model.safetensors"} <= files

    # The parent's comparison is the children's own numbers, one row (and one metric step) per repeats value.
    table = load_table(client, parent.info.run_id, "probe_comparison.json", tmp_path).set_index("repeats")
    before = children["before"].data
    for repeats in (0, 1, 32):
        after = children[f"after-r{repeats}"].data
        row = table.loc[repeats]
        assert row["reply_before"] == before.params["reply"] == parent.data.tags["reply_before"]
        assert row["reply_after"] == after.params["reply"] == parent.data.tags[f"reply_after-r{repeats}"]
        assert row["target_nll_before"] == pytest.approx(before.metrics["target_nll"])
        assert row["target_nll_after"] == pytest.approx(after.metrics["target_nll"])
        assert row["forgetting"] == pytest.approx(after.metrics["eval_loss"] - before.metrics["eval_loss"])
        assert row["replies_differ"] == float(row["reply_before"] != row["reply_after"])
        for name in COMPARED:
            history = client.get_metric_history(parent.info.run_id, name)
            assert math.isfinite(row[name]) and [m.value for m in history if m.step == repeats] == [
                pytest.approx(row[name])], name
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"probe_comparison.json", "target_nll_vs_repeats.png", "similarity_vs_repeats.png"} <= artifacts

    # Did the new example change the model? 32 copies make its output more likely than before, and more so
    # than one copy does (both afters continue from the same `before` adapter, same seed and data order).
    r0, r1, r32 = table.loc[0], table.loc[1], table.loc[32]
    assert r32["target_nll_after"] < r32["target_nll_before"]
    # The control retrains as long without the example: what it gains is the extra training alone.
    assert r0["new_example_copies_seen"] == 0 and r32["target_nll_drop"] > r0["target_nll_drop"]
    assert r32["target_nll_new_input_after"] < r32["target_nll_new_input_before"]
    assert r32["target_nll_drop"] > r1["target_nll_drop"]
    assert 0 < r32["new_example_step_fraction"] <= 1 and r32["new_example_step_fraction"] >= r1[
        "new_example_step_fraction"]
    assert before.metrics["new_example_step_fraction"] == 0

    # Independently: the logged adapters, reloaded on the base, give the logged NLLs and replies.
    base_path = parent.data.params["model_path"]
    for name in ("before", "after-r32"):
        assert_answers_from_the_logged_adapter(client, children[name], base_path, tmp_path, PROBE, abs=1e-5)


def assert_answers_from_the_logged_adapter(client, child, base_path: str, tmp_path: Path, params: dict,
                                           abs: float, dtype=None) -> None:
    """The stage's logged adapter, on its base loaded afresh (in `dtype`), gives its logged NLLs (within `abs`)
    and reply."""
    model, tokenizer = adapter_on_base(client, child.info.run_id, base_path, tmp_path, dtype)
    assert nll_of_target(model, tokenizer, PROBE_INPUT) == pytest.approx(child.data.metrics["target_nll"], abs=abs)
    assert nll_of_target(model, tokenizer, NEW_INPUT) == pytest.approx(child.data.metrics["target_nll_new_input"],
                                                                       abs=abs)
    assert greedy_reply(model, tokenizer, PROBE_INPUT, params["max_new_tokens"]) == child.data.params["reply"]


BF16_PROBE = {"model": "tiny", "dataset": "sample_chat", "max_steps": 10, "batch_size": 8, "max_length": 48,
              "learning_rate": 1e-2, "max_new_tokens": 8, "seed": 7, "precision": "bf16"}


@pytest.mark.xdist_group("retrain_probe_bf16_e2e")
def test_a_bf16_probe_answers_as_its_logged_adapters_do_on_the_bf16_base(tmp_path_factory, empty_store):
    """bf16 on a CPU, what a GPU with bf16 runs: a bf16 frozen base, bf16 autocast; each stage's reply and target
    NLLs are what its logged adapter gives on the bf16 base (the NLLs up to how the fp32 loss is summed: the
    transformers loss here)."""
    launched = launch_in_own_store(tmp_path_factory.mktemp("probe_bf16"), empty_store, "retrain_probe", BF16_PROBE,
                                   "probe-bf16")
    assert launched.result.returncode == 0, launched.result.stderr[-3000:]
    runs = launched.runs()
    assert all(r.info.status == "FINISHED" for r in runs)
    parent, children = parent_and_children(runs)
    children = {r.info.run_name: r for r in children}
    assert set(children) == {"before", "after"}
    assert {r.data.params["effective_precision"] for r in runs} == {"bf16"}
    for child in children.values():
        assert_answers_from_the_logged_adapter(launched.client, child, parent.data.params["model_path"],
                                               launched.folder, BF16_PROBE, abs=1e-5, dtype=torch.bfloat16)
