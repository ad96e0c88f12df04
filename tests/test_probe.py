"""The retraining probe in-process on a tiny Llama: the measurements, the step count from real batches, where
each `after` starts from, the runs and tables it logs, and bad input rejected before training."""

from __future__ import annotations

import math

import datasets
import pytest
import torch
from click.testing import CliRunner
from support.paths import entrypoint
from support.store import children_of, runs_of

from finetune_lab import causal_lm, lora, metrics, prompts
from finetune_lab.config import ProbeConfig
from finetune_lab.contract import PROBE_COMPARISON_TABLE
from finetune_lab.data import TEST, TRAIN
from finetune_lab.experiments import probe
from finetune_lab.packing import TokenBudgetBatchSampler


def tiny_probe(**overrides) -> ProbeConfig:
    settings = dict(model="tiny", dataset="sample_chat", max_steps=3, batch_size=8, max_length=48,
                    learning_rate=1e-2, max_new_tokens=8, experiment="probe-unit")
    return ProbeConfig(**{**settings, **overrides})


@pytest.fixture(scope="module")
def tiny_setup():
    """Prepared data, base model, tokenizer and tokenized splits of `tiny_probe()`."""
    config = tiny_probe()
    prepared = causal_lm.prepare(config, (config.rank,), config.seed, rank_param="rank")
    base, tokenizer = causal_lm.load_base(prepared.source, "fp32")
    return config, base, tokenizer, causal_lm.tokenize(prepared.data.splits, tokenizer, config)


def test_mean_token_nll_is_the_models_own_loss_on_the_target(tiny_setup):
    config, base, tokenizer, _ = tiny_setup
    encoded = prompts.encode_pair(tokenizer, config.probe_input, config.new_output, prompt_format="plain",
                                  loss_on="output", max_length=10_000)
    base.eval()
    with torch.no_grad():
        expected = base(input_ids=torch.tensor([encoded["input_ids"]]), labels=torch.tensor([encoded["labels"]])).loss
    assert metrics.mean_token_nll(base, encoded["input_ids"], encoded["labels"]) == pytest.approx(float(expected))
    # Only the target (+ EOS) counts: masking one more target token changes the value.
    prompt_len = encoded["labels"].count(prompts.IGNORE_INDEX)
    fewer = [prompts.IGNORE_INDEX] * (prompt_len + 1) + encoded["labels"][prompt_len + 1:]
    assert metrics.mean_token_nll(base, encoded["input_ids"], fewer) != pytest.approx(float(expected))


def test_rouge_l_is_the_longest_common_subsequence_f1():
    reference = "I am doing well, thank you for asking!"
    assert metrics.rouge_l(reference, reference) == pytest.approx(1.0)
    assert metrics.rouge_l("", reference) == 0.0
    # LCS "i am well" = 3 of the reply's 3 words and of the reference's 8: F1 = 2 * 1 * 3/8 / (1 + 3/8).
    assert metrics.rouge_l("I am well", reference) == pytest.approx(2 * 3 / 8 / (1 + 3 / 8))


def trained_rows(kwargs) -> list[list[int]]:
    """The examples in a training forward's batch: the unpadded rows, or the blocks of packed rows (a block
    starts where position_ids restart at 0)."""
    if "attention_mask" in kwargs:
        return [ids[mask.bool()].tolist() for ids, mask in zip(kwargs["input_ids"], kwargs["attention_mask"])]
    rows = []
    for ids, positions in zip(kwargs["input_ids"].tolist(), kwargs["position_ids"].tolist()):
        starts = [i for i, p in enumerate(positions) if p == 0] + [len(positions)]
        rows += [ids[s:e] for s, e in zip(starts, starts[1:])]
    return rows


@pytest.mark.parametrize("batching", [{}, *(pytest.param(b, marks=pytest.mark.slow)  # a probe each (trains twice)
                                      for b in ({"packing": "on"}, {"packing": "on", "batch_tokens": 1024}))])
def test_steps_that_saw_the_new_example_are_counted_from_the_batches_trained_on(tiny_setup, tracking_uri, batching):
    """The collator's count against an independent one: the training-mode forwards the model actually ran,
    padded or packed, by example count or by token budget."""
    import mlflow

    config, base, tokenizer, tokenized = tiny_setup
    new_row = probe.new_example_row(tokenizer, config)
    marker = new_row[0]["input_ids"]
    train = datasets.concatenate_datasets([tokenized[TRAIN], new_row.select([0] * 40)])
    # Stop mid-epoch (one batch is built ahead): 7 batches of 8 from 343 + 40 rows. A token budget groups
    # examples by length, so the 40 copies share a few batches: stop right after the first of them.
    steps = 7
    if "batch_tokens" in batching:
        order = list(TokenBudgetBatchSampler(train["length"], batching["batch_tokens"], True, config.seed))
        steps = next(i for i, batch in enumerate(order) if max(batch) >= len(tokenized[TRAIN])) + 1
        assert steps < len(order)
    config = tiny_probe(max_steps=steps, **batching)
    forwards = []

    def count_rows(module, args, kwargs):
        if module.training:
            forwards.append(sum(row == marker for row in trained_rows(kwargs)))

    mlflow.set_experiment("probe-unit")
    with mlflow.start_run() as run, lora.adapter(base, config, config.rank, config.seed) as model:
        hook = model.register_forward_pre_hook(count_rows, with_kwargs=True)
        recorder = probe.BatchRecorder(causal_lm.collator(tokenizer, config), marker)
        try:
            fitted = causal_lm.fit(model, tokenizer, train, tokenized[TEST], config, config.seed, run.info.run_id,
                                   "[1/1] recorded", collate=recorder)
        finally:
            hook.remove()
    assert int(fitted.metrics["train_steps"]) == len(forwards) == steps
    assert len(recorder.counts) > steps, "the dataloader built one batch ahead"
    assert sum(forwards) > 0, "40 copies in 383 rows: these batches should include some"
    assert recorder.exposure(steps) == {"new_example_step_fraction": sum(1 for n in forwards if n) / steps,
                                        "new_example_copies_seen": float(sum(forwards))}


@pytest.mark.slow  # trains repeatedly: a probe (before, after)
def test_one_repeats_value_logs_before_and_after_and_their_comparison(client, tmp_path):
    from support.store import load_table

    result = probe.run(tiny_probe(new_example_repeats=4))
    runs = runs_of(client, "probe-unit")
    parent = client.get_run(result["run_id"])
    children = {r.info.run_name: r for r in children_of(runs, result["run_id"])}
    assert set(children) == {"before", "after"}
    assert all(r.info.status == "FINISHED" for r in [parent, *children.values()])
    before, after = children["before"].data, children["after"].data
    assert (before.params["new_example_repeats"], after.params["new_example_repeats"]) == ("0", "4")
    assert int(after.params["train_examples"]) == int(before.params["train_examples"]) + 4
    assert before.metrics["new_example_step_fraction"] == 0.0

    logged = parent.data.metrics
    for name in ("target_nll", "target_nll_new_input", "rouge_l", "eval_loss"):
        assert logged[f"{name}_before"] == before.metrics[name] and logged[f"{name}_after"] == after.metrics[name]
    assert logged["target_nll_drop"] == pytest.approx(before.metrics["target_nll"] - after.metrics["target_nll"])
    assert logged["forgetting"] == pytest.approx(after.metrics["eval_loss"] - before.metrics["eval_loss"])
    assert all(math.isfinite(v) for v in logged.values())
    assert parent.data.tags["reply_before"] == before.params["reply"]
    assert parent.data.tags["reply_after"] == after.params["reply"]
    assert logged["replies_differ"] == float(before.params["reply"] != after.params["reply"])

    table = load_table(client, result["run_id"], PROBE_COMPARISON_TABLE, tmp_path)
    assert table["repeats"].tolist() == [4] and table.loc[0, "reply_after"] == after.params["reply"]
    assert table.loc[0, "target_nll_after"] == pytest.approx(after.metrics["target_nll"])
    assert table.loc[0, "after_run_id"] == children["after"].info.run_id
    assert not {"target_nll_vs_repeats.png", "similarity_vs_repeats.png"} & {
        a.path for a in client.list_artifacts(result["run_id"])}


def training_digest(run) -> str:
    (logged,) = [i.dataset for i in run.inputs.dataset_inputs
                 if any(t.key == "mlflow.data.context" and t.value == "training" for t in i.tags)]
    return logged.digest


def test_each_stage_logs_the_training_data_it_used(client):
    """`after` trains on the train split plus the copies: its logged training input must say so."""
    import mlflow.data
    import pandas as pd

    from finetune_lab import data

    config = tiny_probe(new_example_repeats=3)
    result = probe.run(config)
    parent = client.get_run(result["run_id"])
    children = {r.info.run_name: r for r in children_of(runs_of(client, "probe-unit"), result["run_id"])}
    assert training_digest(children["before"]) == training_digest(parent) == parent.data.params["dataset_digest"]
    train = data.load(config.dataset, config.seed, config.eval_fraction)[0].splits[TRAIN].to_pandas()
    copies = pd.DataFrame({"input": [config.new_input] * 3, "output": [config.new_output] * 3})
    augmented = pd.concat([train[["input", "output"]], copies], ignore_index=True)
    assert training_digest(children["after"]) == mlflow.data.from_pandas(augmented).digest != training_digest(parent)


@pytest.mark.slow  # trains repeatedly: a probe per mode
@pytest.mark.parametrize("mode", ["continue", "from_scratch"])
def test_every_after_starts_from_the_same_saved_state(client, monkeypatch, mode):
    """continue: each repeats value starts from the trained `before` adapter (not the previous value's result);
    from_scratch: from the fresh adapter `before` started from."""
    starts, ends = [], []
    original = causal_lm.fit

    def record_states(model, *args, **kwargs):
        starts.append(lora.adapter_state(model))
        fitted = original(model, *args, **kwargs)
        ends.append(lora.adapter_state(model))
        return fitted

    monkeypatch.setattr(causal_lm, "fit", record_states)
    probe.run(tiny_probe(repeats_sweep=(1, 3), mode=mode))
    assert len(starts) == 3  # before, after-r1, after-r3
    expected = ends[0] if mode == "continue" else starts[0]
    for state in starts[1:]:
        assert state.keys() == expected.keys()
        assert all(torch.equal(state[k], expected[k]) for k in state)
    assert not all(torch.equal(ends[1][k], ends[2][k]) for k in ends[1]), "the two afters trained differently"


ALL_AT_ONCE = (
    ["--probe-input", "  ", "--new-output", "", "--new-example-repeats", "0", "--mode", "restart",
     "--max-new-tokens", "0"],
    ["error: probe_input: must not be empty", "error: new_output: must not be empty",
     "error: new_example_repeats: must be >= 1, got 0",
     "error: mode: must be one of continue, from_scratch, got 'restart'", "error: max_new_tokens: must be >= 1"],
)


@pytest.mark.parametrize(
    "args, expected",
    [
        ALL_AT_ONCE,
        (["--repeats-sweep", "4,x"], ["error: repeats_sweep: must be a comma list of integers like 4,8,16"]),
        (["--repeats-sweep", "4,-1"], ["error: repeats_sweep: must be integers >= 0, got 4,-1"]),
        (["--repeats-sweep", "4,4"], ["error: repeats_sweep: lists 4 more than once"]),
        (["--rank", "128"], ["error: rank: [128] exceed the model's hidden size 64"]),
    ],
)
def test_bad_probe_input_is_reported_line_by_line_before_training(client, no_weights_loaded, args, expected):
    outcome = CliRunner().invoke(entrypoint("retrain_probe").main,
                                 ["--model", "tiny", "--dataset", "sample_chat", "--experiment", "bad", *args])
    assert outcome.exit_code == 2, outcome.output
    errors = [line for line in outcome.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == len(expected) and all(any(e.startswith(x) for e in errors) for x in expected), errors
    (run,) = runs_of(client, "bad")
    assert run.info.status == "FAILED" and all(x.removeprefix("error: ") in run.data.tags["error"] for x in expected)
