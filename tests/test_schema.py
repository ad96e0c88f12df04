"""The machinery of the configs: strings coerced to the fields' types and logged back as given, every problem
reported once, a docstring read for every field, a config composed of others' fields."""

from dataclasses import fields
from typing import get_type_hints

import pytest

from finetune_lab.config import BENCH_PARTS, BenchConfig, ClassifyConfig, LoraSweepConfig, ProbeConfig
from finetune_lab.entry_points import ENTRY_POINTS
from finetune_lab.schema import as_params, field_docs, from_strings
from finetune_lab.team.server import ServerConfig


def test_strings_are_coerced_to_field_types():
    config = from_strings(ClassifyConfig, {"learning_rate": "4e-5", "epochs": "2", "batch_size": "8.0"})
    assert config.problems() == []
    assert config.learning_rate == 4e-5 and config.epochs == 2.0 and config.batch_size == 8
    assert config.model == "distilbert-base-uncased" and config.dataset == "imdb"


def test_every_problem_is_reported_once_and_names_its_field():
    config = from_strings(
        ClassifyConfig,
        {"learning_rate": "-1", "epochs": "x", "batch_size": "1.5", "max_length": "4", "seed": "nan", "colour": "red"},
    )
    named = sorted(p.split(":", 1)[0] for p in config.problems())
    assert named == ["batch_size", "colour", "epochs", "learning_rate", "max_length", "seed"]


@pytest.mark.parametrize("config_class", [*(row.config for row in ENTRY_POINTS), ServerConfig],
                         ids=lambda config_class: config_class.__name__)
def test_every_field_has_a_docstring(config_class):
    docs = field_docs(config_class)
    assert {f.name for f in fields(config_class)} == set(docs)
    assert all(doc.strip() for doc in docs.values())


def test_integer_lists_are_parsed_once_into_tuples():
    config = from_strings(LoraSweepConfig, {"ranks": " 4, 8,16 ", "seeds": "0,1"})
    assert config.ranks == (4, 8, 16) and config.seeds == (0, 1) and config.problems() == []
    assert as_params(config)["ranks"] == "4,8,16", "logged as the text it was given as"
    assert from_strings(ProbeConfig, {"repeats_sweep": ""}).repeats_list == (1,)
    assert from_strings(ProbeConfig, {"repeats_sweep": "0,4"}).repeats_list == (0, 4)


@pytest.mark.parametrize("given, parsed, logged", [("true", True, "true"), ("False", False, "false"),
                                                   ("yes", True, "true"), ("0", False, "false")])
def test_booleans_are_logged_as_mlflow_run_logs_them(given, parsed, logged):
    config = from_strings(BenchConfig, {"tiny": given})
    assert config.tiny is parsed and config.problems() == []
    assert as_params(config)["tiny"] == logged, "the MLproject's default and -P values are true / false"


def test_the_bench_takes_the_workloads_fields_under_a_prefix_with_their_type_docstring_and_rules():
    docs, hints, defaults = field_docs(BenchConfig), get_type_hints(BenchConfig), BenchConfig()
    for part in BENCH_PARTS:
        part_docs, part_hints = field_docs(part.config), get_type_hints(part.config)
        for name in part.fields:
            assert part_docs[name] in docs[part.prefix + name] and hints[part.prefix + name] == part_hints[name]
        derived = from_strings(BenchConfig, {f"{part.prefix}max_length": "100", "seed": "7"}).derive(part.name)
        seed = as_params(derived).get("seed", as_params(derived).get("seeds"))
        assert type(derived) is part.config and derived.max_length == 100 and str(seed) == "7"
        assert derived.model == getattr(defaults, f"{part.prefix}model") and derived.problems() == []
    assert not {f.name for f in fields(BenchConfig)} & {"model", "dataset", "max_length", "ranks", "target_modules"}
