"""The verdict statistics on plain numbers: which configuration is better, and whether it counts."""

import statistics
from types import SimpleNamespace

from finetune_lab.report.verdicts import NOT_CONCLUSIVE, config_label, differing_params, seed_groups, verdicts


def fake_run(params: dict, metrics: dict, status: str = "FINISHED"):
    return SimpleNamespace(data=SimpleNamespace(params=params, metrics=metrics), info=SimpleNamespace(status=status))


def test_a_difference_larger_than_the_spread_names_the_better_configuration():
    groups = {"r4": [2.0, 2.1, 1.9], "r8": [1.0, 1.1, 0.9]}
    (line,) = verdicts(groups, "eval_loss", lower_is_better=True)
    spread = max(statistics.stdev(groups["r4"]), statistics.stdev(groups["r8"]))
    assert line == (f"r4 vs r8: eval_loss 2 vs 1 (difference +1) is larger than the seed-to-seed spread "
                    f"(largest std {spread:.3g}; 3 and 3 seeds): r8 is better")


def test_a_difference_within_the_spread_is_no_real_difference():
    (line,) = verdicts({"a": [0.80, 0.90], "b": [0.84, 0.70]}, "accuracy", lower_is_better=False)
    assert line.startswith("b vs a: accuracy 0.77 vs 0.85") and line.endswith("no real difference")
    assert "is not larger than the seed-to-seed spread" in line


def test_single_seeds_and_single_configurations_are_not_conclusive():
    (line,) = verdicts({"a": [1.0], "b": [2.0, 2.2]}, "eval_loss", lower_is_better=True)
    assert line.startswith("b vs a:") and line.endswith(NOT_CONCLUSIVE)
    assert verdicts({"a": [1.0, 2.0], "empty": []}, "eval_loss", True) == [
        "eval_loss: one configuration only, nothing to compare"]
    assert verdicts({"empty": []}, "eval_loss", True) == [] == verdicts({}, "eval_loss", True), "nothing measured"


def test_a_named_reference_is_compared_against_even_when_it_is_worse():
    lines = verdicts({"before": [3.0], "after-r1": [2.5], "after-r8": [2.0]}, "target_nll", True, reference="before")
    assert [line.split(":")[0] for line in lines] == ["after-r1 vs before", "after-r8 vs before"]


def test_seeds_and_provenance_do_not_split_a_configuration():
    runs = [fake_run({"learning_rate": "1e-3", "seed": "1", "dataset_digest": "x"}, {"accuracy": 0.8}),
            fake_run({"learning_rate": "1e-3", "seed": "2", "dataset_digest": "y"}, {"accuracy": 0.9}),
            fake_run({"learning_rate": "5e-3", "seed": "1", "dataset_digest": "x"}, {"accuracy": 0.7}),
            fake_run({"learning_rate": "5e-3", "seed": "2", "dataset_digest": "y"}, {"accuracy": 0.0}, "FAILED")]
    assert differing_params(runs) == ["dataset_digest", "learning_rate", "seed"]
    groups = seed_groups(runs, config_label(runs), "accuracy")
    assert groups == {"learning_rate=1e-3": [0.8, 0.9], "learning_rate=5e-3": [0.7]}, "failed runs are left out"
