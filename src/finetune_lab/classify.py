"""Experiment: fine-tune a sequence classifier, evaluate it on the held-out split, log everything.

Recipe: prepare (validate config, data and model spec together) → tokenize once → train → predict →
metrics, confusion matrix, report, predictions table.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlflow
import numpy as np
from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding, set_seed

from finetune_lab import data as data_lib
from finetune_lab import metrics as metrics_lib
from finetune_lab import models, plots, registry, tracking, training
from finetune_lab.config import ClassifyConfig, InputError, as_dict
from finetune_lab.data import TEST, TRAIN

# Held-out fraction for local files without a `split` column.
TEST_FRACTION = 0.2


@dataclass
class Prepared:
    data: data_lib.LoadedData
    source: models.ModelSource
    classes: list[int]
    label_names: list[str]


def prepare(config: ClassifyConfig, config_problems: list[str]) -> Prepared:
    """Load and check data and model spec; raise InputError with every problem found, config's included."""
    problems = list(config_problems)
    data, data_problems = data_lib.load(config.dataset, config.seed, TEST_FRACTION, targets=config.label_column)
    problems += data_problems
    classes: list[int] = []
    if data is not None and not data_problems:
        column_problems = data_lib.check_columns(
            data, {"text_column": config.text_column, "label_column": config.label_column}
        )
        problems += column_problems
        if not column_problems:
            problems += data_lib.check_text(data, "text_column", config.text_column)
            classes, label_problems = data_lib.check_labels(data, "label_column", config.label_column)
            problems += label_problems
    source = None
    if config.model != models.TINY:
        source, model_problems = models.resolve(config.model)
        problems += model_problems
    if problems:
        raise InputError(problems)
    train_split = data_lib.limit(data.splits[TRAIN], config.max_train_samples, config.seed)
    test_split = data_lib.limit(data.splits[TEST], config.max_eval_samples, config.seed)
    data.splits = data_lib.datasets.DatasetDict({TRAIN: train_split, TEST: test_split})
    if source is None:
        source = models.tiny("classifier", list(train_split[config.text_column]), config.seed, len(classes))
    feature = train_split.features.get(config.label_column)
    names = list(getattr(feature, "names", None) or [str(c) for c in classes])
    return Prepared(data, source, classes, names)


def _tokenize(prepared: Prepared, tokenizer, config: ClassifyConfig):
    def encode(batch):
        encoded = tokenizer(batch[config.text_column], truncation=True, max_length=config.max_length)
        encoded["labels"] = [int(label) for label in batch[config.label_column]]
        encoded["length"] = [len(ids) for ids in encoded["input_ids"]]
        return encoded

    columns = prepared.data.splits[TRAIN].column_names
    return prepared.data.splits.map(encode, batched=True, remove_columns=columns, desc="tokenize")


def _log_predictions(texts, labels, probabilities, label_names) -> None:
    predictions = probabilities.argmax(axis=-1)
    table = {
        "text": list(texts),
        "label": [int(x) for x in labels],
        "prediction": [int(x) for x in predictions],
        "score": [float(p[k]) for p, k in zip(probabilities, predictions)],
    }
    for k in range(probabilities.shape[-1]):
        table[f"prob_{k}"] = [float(x) for x in probabilities[:, k]]
    mlflow.log_table(table, "predictions.json")
    matrix = metrics_lib.confusion(labels, predictions, label_names)
    mlflow.log_dict(matrix, "confusion_matrix.json")
    plots.log_figure(metrics_lib.confusion_figure(matrix), "confusion_matrix.png")
    mlflow.log_dict(metrics_lib.report(labels, predictions, label_names), "classification_report.json")


def run(config: ClassifyConfig, config_problems: list[str] | None = None) -> dict:
    """Run the experiment inside one MLflow run; return the run id and headline metrics."""
    with tracking.experiment_run(config.experiment, config.run_name) as active:
        tracking.log_config(as_dict(config))
        prepared = prepare(config, config.validate() if config_problems is None else config_problems)
        tracking.log_params(
            {
                **models.source_params(prepared.source),
                **tracking.environment_params(),
                "num_labels": len(prepared.classes),
                "train_examples": len(prepared.data.splits[TRAIN]),
                "eval_examples": len(prepared.data.splits[TEST]),
                "dataset_digest": prepared.data.digest,
            }
        )
        data_lib.log_inputs(prepared.data)
        set_seed(config.seed)  # a pretrained encoder gets a freshly initialised head: make it reproducible
        model, tokenizer = models.load(
            prepared.source,
            AutoModelForSequenceClassification,
            num_labels=len(prepared.classes),
            **models.model_kwargs(frozen_base=False),
        )
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        tokenized = _tokenize(prepared, tokenizer, config)
        with tracking.scratch_dir("classify") as scratch:
            trainer = training.make_trainer(
                model, tokenizer, scratch, tokenized[TRAIN],
                DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8 if training.on_cuda() else None),
                learning_rate=config.learning_rate, epochs=config.epochs, batch_size=config.batch_size,
                seed=config.seed,
            )
            training.train(trainer)
            output = trainer.predict(tokenized[TEST], metric_key_prefix="eval")
        probabilities = metrics_lib.softmax(np.asarray(output.predictions, dtype=np.float64))
        labels = np.asarray(output.label_ids)
        headline = {
            **metrics_lib.classification_metrics(labels, probabilities),
            "eval_loss": float(output.metrics["eval_loss"]),
        }
        mlflow.log_metrics(headline)
        texts = prepared.data.splits[TEST][config.text_column]
        _log_predictions(texts, labels, probabilities, prepared.label_names)
        notes = []
        if config.register_as:
            result = register(config, prepared, model, tokenizer, texts[:3], headline["eval_loss"])
            notes.append(f"registered {result['model_uri']} (champion {result['decision']})")
        return {"run_id": active.info.run_id, "metrics": headline, "notes": notes, "ui": tracking.ui_hint()}


def register(config: ClassifyConfig, prepared: Prepared, model, tokenizer, check_texts: list[str],
             eval_loss: float) -> dict:
    """Register the fine-tuned classifier after checking that its reload gives the same logits."""
    truncation = {"truncation": True, "max_length": config.max_length}
    candidate = registry.Candidate(
        log=lambda: registry.log_classifier_model(model, tokenizer, config.max_length, check_texts[0]),
        check_texts=check_texts,
        expected_logits=registry.reference_logits(model, tokenizer, check_texts, **truncation),
        eval_loss=eval_loss,
        eval_set_digest=prepared.data.tracked[TEST].digest,
        tags={"run_id": mlflow.active_run().info.run_id, "dataset_digest": prepared.data.digest,
              "base_model": prepared.source.spec},
    )
    return registry.register_verified(config.register_as, candidate)
