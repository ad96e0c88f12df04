"""Experiment: fine-tune a sequence classifier, evaluate it on the held-out split, log everything.

Recipe: prepare (validate config, data and model spec together; limit the splits) → tokenize once → train
(compiled when `compile` says so, for a symbolic sequence length or a few bucket lengths) → predict the held-out
split in its own order →
metrics, confusion matrix, report, predictions table.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import mlflow
import numpy as np
import torch
from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding, set_seed

from finetune_lab import console, contract, device, health, models, plots, preamble, registry, tracking, training
from finetune_lab import data as data_lib
from finetune_lab import metrics as metrics_lib
from finetune_lab.config import ClassifyConfig
from finetune_lab.data import TEST, TRAIN
from finetune_lab.errors import problem, raise_if_any

# Held-out fraction for local files without a `split` column.
TEST_FRACTION = 0.2


@dataclass
class PreparedClassification:
    """Checked data and model source of a classification experiment, with the classes the labels name."""

    data: data_lib.LoadedData
    """The splits as used: limited by max_train_samples / max_eval_samples, with digests of what is left."""
    source: models.ModelSource
    classes: list[int]
    label_names: list[str]


def prepare(config: ClassifyConfig) -> PreparedClassification:
    """Load and check data and model spec; raise InputError with every problem found, config's and the device's
    included."""
    problems = [*config.problems(), *device.precision_problems(config.precision, device.detect())]
    data, data_problems = data_lib.load(config.dataset, config.seed, TEST_FRACTION, targets=config.label_column,
                                         max_text_chars=data_lib.text_limit(config.max_length))
    problems += data_problems
    classes: list[int] = []
    texts = None
    if data is not None and not data_problems:
        column_problems = data_lib.check_columns(
            data, {"text_column": config.text_column, "label_column": config.label_column}
        )
        problems += column_problems
        if not column_problems:
            problems += data_lib.check_text(data, "text_column", config.text_column)
            classes, label_problems = data_lib.check_labels(data, "label_column", config.label_column)
            problems += label_problems
            named = config.label_name_list
            if named and not label_problems and len(named) != len(classes):
                problems.append(problem("label_names", f"names {len(named)} classes, the data has {len(classes)} "
                                                       f"({', '.join(map(str, classes))})"))
        if not problems:
            data = data_lib.limit(data, {TRAIN: config.max_train_samples, TEST: config.max_eval_samples}, config.seed)
            texts = list(data.splits[TRAIN][config.text_column])
    source, model_problems = models.resolve(config.model, models.CLASSIFIER, texts, config.seed, len(classes))
    problems += model_problems
    if source is not None:
        problems += models.check_max_length(source, config.max_length)
    raise_if_any(problems)
    names = config.label_name_list or data_lib.label_names(data, config.label_column, classes)
    return PreparedClassification(data, source, classes, names)


def load_model(prepared: PreparedClassification, seed: int):
    """(model, tokenizer) with a classification head for the data's classes, named after them. A pretrained
    encoder has no such head: it is initialised from `seed` (reproducibly), which is said in one line instead of
    transformers' table of missing weights."""
    set_seed(seed)
    with console.without_load_report():
        (model, loading), tokenizer = models.load(
            prepared.source,
            AutoModelForSequenceClassification,
            num_labels=len(prepared.classes),
            id2label=dict(enumerate(prepared.label_names)),
            label2id={name: k for k, name in enumerate(prepared.label_names)},
            output_loading_info=True,  # the model comes back as (model, what was missing / unused)
            **models.model_kwargs(),
        )
    if loading["missing_keys"]:
        console.say(f"new classification head for {len(prepared.classes)} classes, initialised from seed {seed} "
                    f"({', '.join(sorted(loading['missing_keys']))}): expected, the pretrained model has none")
    if loading["unexpected_keys"]:
        console.say(f"{len(loading['unexpected_keys'])} weights of the pretrained model are not used by a classifier "
                    f"(its pretraining head): expected")
    return model, tokenizer


def tokenize(prepared: PreparedClassification, tokenizer, config: ClassifyConfig):
    """Texts → token ids (truncated to max_length), labels and lengths, every split once."""

    def encode(batch):
        encoded = tokenizer(batch[config.text_column], truncation=True, max_length=config.max_length)
        encoded["labels"] = [int(label) for label in batch[config.label_column]]
        encoded["length"] = [len(ids) for ids in encoded["input_ids"]]
        return encoded

    columns = prepared.data.splits[TRAIN].column_names
    return prepared.data.splits.map(encode, batched=True, remove_columns=columns, desc="tokenize")


def _log_predictions(texts, labels, probabilities, label_names) -> None:
    """The predictions table (row i: the i-th held-out example, its text, label and prediction) and what is
    computed from it."""
    predictions = probabilities.argmax(axis=-1)
    table = {
        "text": list(texts),
        "label": [int(x) for x in labels],
        "prediction": [int(x) for x in predictions],
        "score": [float(p[k]) for p, k in zip(probabilities, predictions)],
    }
    for k in range(probabilities.shape[-1]):
        table[f"prob_{k}"] = [float(x) for x in probabilities[:, k]]
    mlflow.log_table(table, contract.PREDICTIONS_TABLE)
    matrix = metrics_lib.confusion(labels, predictions, label_names)
    mlflow.log_dict(matrix, contract.CONFUSION_MATRIX)
    plots.log_figure(plots.confusion_figure(matrix), contract.CONFUSION_FIGURE)
    mlflow.log_dict(metrics_lib.report(labels, predictions, label_names), contract.CLASSIFICATION_REPORT)


def collators(tokenizer, config: ClassifyConfig) -> tuple:
    """(training, evaluation) collators. Padding is dynamic (to a multiple of 8 on CUDA, for tensor cores), except
    for a model compiled for `buckets`, which trains on a few padded lengths (`training.BucketPadding`)."""
    dynamic = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8 if training.on_cuda() else None)
    if training.switch(config.compile) and config.compile_shapes == training.BUCKETS:
        return training.BucketPadding(tokenizer, config.max_length), dynamic
    return dynamic, dynamic


@dataclass
class Fitted:
    """A trained classifier and what its training and held-out prediction gave."""

    metrics: dict[str, float]
    """Throughput, step times and peak memory of training."""
    steps: list[dict]
    """The Trainer's log entry of every logged step (step, loss, grad_norm, learning_rate)."""
    model: object
    tokenizer: object
    tokenized: object
    logits: np.ndarray
    """Row i: held-out example i."""
    stopped_early: bool = False
    """A watch stopped training before its last step (a search's rung)."""


def headline_metrics(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Accuracy, precision, recall, F1, ROC-AUC (where defined) and eval loss of held-out logits."""
    return {**metrics_lib.classification_metrics(labels, metrics_lib.softmax(logits)),
            "eval_loss": metrics_lib.cross_entropy(logits, labels)}


def held_out_metrics(model, tokenized_test, collator, batch_size: int, precision: str) -> dict[str, float]:
    """The headline metrics of `model` on the tokenized held-out split, computed in `precision`, now (e.g. in the
    middle of training)."""
    logits = training.predict_logits(model, tokenized_test, collator, batch_size, precision)
    return headline_metrics(logits, np.asarray(tokenized_test["labels"]))


def fit(config: ClassifyConfig, prepared: PreparedClassification, run_id: str, name: str = "classify",
        watch: training.Watch | None = None) -> Fitted:
    """Load the model, tokenize once, train (compiled when `compile` says so; per-step metrics into run `run_id`;
    `watch` measures the held-out split where it chooses, and may stop training) and predict the held-out split in
    its own order."""
    model, tokenizer = load_model(prepared, config.seed)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    tokenized = tokenize(prepared, tokenizer, config)
    train_collator, eval_collator = collators(tokenizer, config)
    compile_model = training.switch(config.compile)
    callbacks = [watch(lambda trained: held_out_metrics(trained, tokenized[TEST], eval_collator,
                                                        training.eval_batch_size(config),
                                                        device.training_precision(config.precision)))] if watch else []
    with tracking.scratch_dir("classify") as scratch:
        trainer = training.make_trainer(model, tokenizer, scratch, tokenized[TRAIN], train_collator, config,
                                        config.seed, run_id, f"[1/2] {name}", drop_last=compile_model,
                                        callbacks=callbacks)
        with (training.compiled(model, config.compile_shapes, config.max_length) if compile_model
              else contextlib.nullcontext()):
            metrics = training.train(trainer)
    console.say(f"[2/2] {name}: predicting the {len(tokenized[TEST])} held-out examples")
    # Row i of the logits is held-out example i: the predictions table pairs it with its own text.
    precision = device.training_precision(config.precision)
    logits = training.predict_logits(model, tokenized[TEST], eval_collator, training.eval_batch_size(config),
                                     precision)
    return Fitted(metrics, training.step_log(trainer), model, tokenizer, tokenized, logits,
                  training.stopped_early(trainer))


def preamble_params(prepared: PreparedClassification) -> dict[str, int]:
    """What a classifier's run records beyond the preamble's sources, environment and data sizes."""
    return {"num_labels": len(prepared.classes)}


@dataclass
class Trained:
    """A classifier trained and evaluated in the active run."""

    fitted: Fitted
    headline: dict[str, float]
    """Accuracy, precision, recall, F1, ROC-AUC and eval loss on the held-out split."""
    texts: list[str]
    """The held-out texts, in the order of the predictions."""


def train_and_log(config: ClassifyConfig, prepared: PreparedClassification, name: str = "classify",
                  watch: training.Watch | None = None) -> Trained:
    """Train and evaluate into the active run: training metrics, headline metrics, predictions table, confusion
    matrix and report (`name`: what the console calls it; `watch`: see `fit`). A collapsed classifier (a uniform
    guess after broken training) raises health.TrainingCollapsed after its record is logged, so that its run ends
    FAILED and it is never registered; one its watch stopped early is not judged (it is never registered)."""
    fitted = fit(config, prepared, mlflow.active_run().info.run_id, name, watch)
    mlflow.log_metrics(fitted.metrics)
    labels = np.asarray(fitted.tokenized[TEST]["labels"])
    probabilities = metrics_lib.softmax(fitted.logits)
    headline = headline_metrics(fitted.logits, labels)
    mlflow.log_metrics(headline)
    texts = prepared.data.splits[TEST][config.text_column]
    _log_predictions(texts, labels, probabilities, prepared.label_names)
    if not fitted.stopped_early:  # a model stopped mid-schedule is never registered: its last steps prove nothing
        health.check(fitted.steps, headline["eval_loss"], len(prepared.classes), headline)
    return Trained(fitted, headline, list(texts))


def execute(config: ClassifyConfig) -> dict:
    """The experiment inside the active run: the preamble (`preamble.begin`), train, evaluate and log everything;
    return the headline metrics, the training metrics and notes."""
    with preamble.begin(config, contract.CLASSIFICATION, lambda: prepare(config), preamble_params) as begun:
        prepared = begun.prepared
        trained = train_and_log(config, prepared)
        notes = []
        if config.register_as:
            result = register(config, prepared, trained.fitted.model, trained.fitted.tokenizer, trained.texts[:3],
                              trained.headline["eval_loss"])
            notes.append(f"registered {result['model_uri']} (champion {result['decision']})")
    return {"metrics": trained.headline, "training": trained.fitted.metrics, "notes": notes}


def run(config: ClassifyConfig) -> dict:
    """Run the experiment inside one MLflow run; return the run id and headline metrics."""
    with tracking.experiment_run(contract.CLASSIFICATION, config.experiment, config.run_name) as active:
        result = execute(config)
        return {"run_id": active.info.run_id, "metrics": result["metrics"], "notes": result["notes"],
                "ui": tracking.ui_hint(active.info.experiment_id)}


def eager_reference(model, tokenizer, texts: list[str], max_length: int) -> registry.Reference:
    """The classifier's logits on `texts` as the registry's reload check computes them (eager, truncated)."""
    with torch.compiler.set_stance("force_eager"):  # a compiled model's graphs would differ in the last bits
        return registry.reference(model, tokenizer, texts, truncation=True, max_length=max_length)


def register(config: ClassifyConfig, prepared: PreparedClassification, model, tokenizer, check_texts: list[str],
             eval_loss: float, trained_in: str = "", expected: registry.Reference | None = None) -> dict:
    """Register the fine-tuned classifier (logged into the active run) after checking that its reload gives the same
    logits as `expected` (default: the model's own). `trained_in`: the run that trained it (default: the active
    run)."""
    run_id = mlflow.active_run().info.run_id
    candidate = registry.Candidate(
        log=lambda: registry.log_classifier_model(model, tokenizer, config.max_length, check_texts[0]),
        check_texts=check_texts,
        expected=expected or eager_reference(model, tokenizer, check_texts, config.max_length),
        eval_loss=eval_loss,
        eval_set_digest=prepared.data.eval_digest,
        tags={"run_id": trained_in or run_id, "dataset_digest": prepared.data.digest,
              "base_model": prepared.source.spec},
    )
    return registry.register_verified(config.register_as, candidate, run_id)
