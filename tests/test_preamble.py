"""The preamble every experiment starts with: a seed that nothing can be split, shuffled or built with is reported,
named, before anything is loaded."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from support.paths import entrypoint
from support.store import runs_of

# Each with another mistake, reported with the seed's.
CLASSIFIER = ["--model", "tiny", "--dataset", "sample", "--batch-size", "0"]
CAUSAL_LM = ["--model", "tiny", "--dataset", "sample_chat", "--batch-size", "0"]
RULE = "must be in 0..4294967295"


@pytest.fixture
def nothing_loaded(monkeypatch, no_weights_loaded):
    """Fail the test if any data is read (the data are split and shuffled with the seed)."""
    from finetune_lab import data

    def refuse(*args, **kwargs):
        raise AssertionError("the data were loaded before the seed was checked")

    monkeypatch.setattr(data, "load", refuse)


@pytest.mark.parametrize(
    "entry, args, expected",
    [
        ("classify", [*CLASSIFIER, "--seed", "-1"], f"seed: {RULE}, got -1"),
        ("classify", [*CLASSIFIER, "--seed", "4294967296"], f"seed: {RULE}, got 4294967296"),
        ("classify_sweep", [*CLASSIFIER, "--seeds", "-1"], f"seeds: {RULE}, got -1"),
        ("classify_sweep", [*CLASSIFIER, "--seeds", "1,4294967296"], f"seeds: {RULE}, got 1,4294967296"),
        ("lora_sweep", [*CAUSAL_LM, "--seeds", "-1"], f"seeds: {RULE}, got -1"),
        ("retrain_probe", [*CAUSAL_LM, "--seed", "-1"], f"seed: {RULE}, got -1"),
        ("bench", ["--tiny", "true", "--lora-batch-size", "0", "--seed", "-1"], f"seed: {RULE}, got -1"),
    ],
)
def test_a_seed_out_of_range_is_one_line_naming_it_before_anything_is_loaded(client, nothing_loaded, entry, args,
                                                                            expected):
    outcome = CliRunner().invoke(entrypoint(entry).main, [*args, "--experiment", "seeds"])
    assert outcome.exit_code == 2, outcome.output
    errors = [line for line in outcome.output.splitlines() if line.startswith("error: ")]
    field = expected.split(":")[0]
    assert [line for line in errors if line.split(":")[1].strip() in ("seed", "seeds")] == [f"error: {expected}"]
    assert any("batch_size: must be >= 1" in line for line in errors), "the config's other problems too"
    (run,) = runs_of(client, "seeds")
    assert run.info.status == "FAILED" and f"{field}: {RULE}" in run.data.tags["error"]
