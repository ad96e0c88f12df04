"""Which runs the report treats as one configuration: seeds and provenance do not split one."""

from types import SimpleNamespace

from finetune_lab.report.configurations import config_label, differing_params, seed_groups


def fake_run(params: dict, metrics: dict, status: str = "FINISHED"):
    return SimpleNamespace(data=SimpleNamespace(params=params, metrics=metrics), info=SimpleNamespace(status=status))


def test_seeds_and_provenance_do_not_split_a_configuration():
    runs = [fake_run({"learning_rate": "1e-3", "seed": "1", "dataset_digest": "x"}, {"accuracy": 0.8}),
            fake_run({"learning_rate": "1e-3", "seed": "2", "dataset_digest": "y"}, {"accuracy": 0.9}),
            fake_run({"learning_rate": "5e-3", "seed": "1", "dataset_digest": "x"}, {"accuracy": 0.7}),
            fake_run({"learning_rate": "5e-3", "seed": "2", "dataset_digest": "y"}, {"accuracy": 0.0}, "FAILED"),
            fake_run({"learning_rate": "5e-3", "seed": "3", "dataset_digest": "y"}, {})]
    assert differing_params(runs) == ["dataset_digest", "learning_rate", "seed"]
    groups = seed_groups(runs, config_label(runs), "accuracy")
    assert groups == {"learning_rate=1e-3": runs[:2], "learning_rate=5e-3": [runs[2]]}, \
        "failed runs and runs without the metric are left out"
