from dataclasses import fields

from finetune_lab.config import ClassifyConfig, field_docs, from_strings


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


def test_every_field_has_a_docstring():
    docs = field_docs(ClassifyConfig)
    assert {f.name for f in fields(ClassifyConfig)} == set(docs)
    assert all(doc.strip() for doc in docs.values())
