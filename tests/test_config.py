from dataclasses import fields

import pytest

from finetune_lab.config import ClassifyConfig, GenerateConfig, ProbeConfig, ReportConfig, SweepConfig, field_docs, from_strings, parse_int_list


def test_strings_are_coerced_to_field_types():
    config, problems = from_strings(ClassifyConfig, {"learning_rate": "4e-5", "epochs": "2", "batch_size": "8.0"})
    assert problems == []
    assert config.learning_rate == 4e-5 and config.epochs == 2.0 and config.batch_size == 8
    assert config.model == "distilbert-base-uncased" and config.dataset == "imdb"


def test_every_problem_is_reported_once_and_names_its_field():
    _, problems = from_strings(
        ClassifyConfig,
        {"learning_rate": "-1", "epochs": "x", "batch_size": "1.5", "max_length": "4", "seed": "nan", "colour": "red"},
    )
    named = sorted(p.split(":", 1)[0] for p in problems)
    assert named == ["batch_size", "colour", "epochs", "learning_rate", "max_length", "seed"]


@pytest.mark.parametrize("config_class", [ClassifyConfig, SweepConfig, ProbeConfig, GenerateConfig, ReportConfig])
def test_every_field_has_a_docstring(config_class):
    docs = field_docs(config_class)
    assert {f.name for f in fields(config_class)} == set(docs)
    assert all(doc.strip() for doc in docs.values())


def test_int_lists():
    assert parse_int_list("ranks", " 4, 8,16 ") == ([4, 8, 16], [])
    assert parse_int_list("seeds", "0,1", minimum=0) == ([0, 1], [])
    assert parse_int_list("ranks", "0,1")[1] == ["ranks: must be a comma list of positive integers like 4,8,16, got '0,1'"]
    assert parse_int_list("ranks", "")[1]


def test_alpha_modes():
    ratio = SweepConfig()
    assert [ratio.alpha_for(r) for r in (4, 32)] == [8.0, 64.0]  # same scale alpha/r = 2 at every rank
    fixed = SweepConfig(lora_alpha=16)
    assert [fixed.alpha_for(r) / r for r in (4, 32)] == [4.0, 0.5]
    _, problems = from_strings(SweepConfig, {"lora_alpha": "0", "alpha_per_rank": "0", "eval_fraction": "0.6",
                                             "prompt_format": "xml", "target_modules": "q_proj,,v_proj"})
    assert sorted(p.split(":")[0] for p in problems) == ["alpha_per_rank", "eval_fraction", "prompt_format",
                                                           "target_modules"]
