"""`mlflow run . -e classify` end to end on a tiny model, read back from the tracking store; once in bf16 (a CPU
running what a GPU with bf16 runs) with its registration."""

from __future__ import annotations

import math

import mlflow
import pandas as pd
import pytest
from click.testing import CliRunner
from sklearn.metrics import confusion_matrix
from support.checks import assert_metrics_match_predictions
from support.launch import launch_in_own_store
from support.paths import REPO, entrypoint
from support.store import download_json, load_table, runs_of

from finetune_lab.data import SAMPLES

TINY_SAMPLE = {"model": "tiny", "dataset": "sample", "max_length": 64, "learning_rate": 1e-3, "batch_size": 32}

HEADLINE = ["accuracy", "precision", "recall", "f1", "roc_auc", "eval_loss"]
SPEED_MEMORY = ["train_runtime_s", "train_samples_per_s", "train_tokens_per_s", "peak_rss_mb"]
ARTIFACTS = ["confusion_matrix.png", "confusion_matrix.json", "classification_report.json", "predictions.json",
             "config.yaml"]


def test_classify_logs_everything_and_metrics_match_predictions(mlflow_run, client, tmp_path):
    result = mlflow_run("classify", TINY_SAMPLE, experiment="clf")
    assert result.returncode == 0, result.stderr[-3000:]

    runs = runs_of(client, "clf")
    assert len(runs) == 1, "one MLflow run per invocation"
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.info.run_id in result.stdout, "the entry point prints the run id"

    metrics, params = run.data.metrics, run.data.params
    for name in HEADLINE + SPEED_MEMORY:
        assert name in metrics and math.isfinite(metrics[name]), name
    assert metrics["train_tokens_per_s"] > 0 and metrics["peak_rss_mb"] > 100
    loss_history = client.get_metric_history(run.info.run_id, "train_loss")
    assert len(loss_history) > 1 and len({m.step for m in loss_history}) == len(loss_history)
    assert client.get_metric_history(run.info.run_id, "lr"), "the per-step learning rate"
    assert "learning_rate" not in metrics, "`learning_rate` is the param (the configured peak), not a metric"

    for key in ["model", "dataset", "learning_rate", "epochs", "batch_size", "max_length", "seed", "model_path",
                "model_revision", "device", "torch_version", "transformers_version", "peft_version", "git_commit",
                "dataset_digest", "train_examples", "eval_examples"]:
        assert key in params, key
    assert params["device"] == "cpu" and params["train_examples"] == "500" and params["eval_examples"] == "160"
    inputs = {i.dataset.digest for i in run.inputs.dataset_inputs}
    assert params["dataset_digest"] in inputs

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert set(ARTIFACTS) <= artifacts, artifacts

    # Recompute every headline metric independently from the logged predictions table.
    table = load_table(client, run.info.run_id, "predictions.json", tmp_path)
    assert len(table) == 160 and list(table.columns[:4]) == ["text", "label", "prediction", "score"]
    # Every row is one held-out example: its text carries its own label in the source file (lengths vary from
    # 5 to 40 words, so a length-grouped evaluation order would pair texts with other rows' labels).
    source = pd.read_csv(SAMPLES["sample"])
    held_out = source[source["split"] == "test"]
    assert held_out["text"].str.split().str.len().nunique() > 10
    assert sorted(table["text"]) == sorted(held_out["text"])
    assert table["label"].tolist() == [dict(zip(held_out["text"], held_out["label"]))[t] for t in table["text"]]
    assert_metrics_match_predictions(metrics, table)
    labels, predictions = table["label"].to_numpy(), table["prediction"].to_numpy()

    matrix = download_json(client, run.info.run_id, "confusion_matrix.json", tmp_path)
    assert matrix["matrix"] == confusion_matrix(labels, predictions, labels=[0, 1]).tolist()
    assert matrix["labels"] == ["negative", "positive"], "the embedded set's class names (data/sample/README.md)"
    report = download_json(client, run.info.run_id, "classification_report.json", tmp_path)
    assert report["accuracy"] == pytest.approx(metrics["accuracy"])


def test_bad_input_through_mlflow_run_fails_the_run_with_every_problem(mlflow_run, client):
    result = mlflow_run(
        "classify",
        {"model": "tiny", "dataset": "sample", "learning_rate": "fast", "epochs": 0, "batch_size": 0,
         "label_column": "stars"},
        experiment="bad",
    )
    # The entry point exits 2 (the unit tests call it directly); `mlflow run` exits 1 for every failed run: the
    # page of failures says both.
    assert result.returncode == 1
    assert "`error: field: problem` per problem, exit 2 (1 under `mlflow run`)" in (
        REPO / "docs" / "failures.md").read_text()
    for line in ["error: learning_rate: must be a finite number, got 'fast'", "error: epochs: must be > 0",
                 "error: batch_size: must be >= 1", "error: label_column: column 'stars' not in the dataset"]:
        assert line in result.stderr
    assert "Traceback" not in result.stderr
    (run,) = runs_of(client, "bad")
    assert run.info.status == "FAILED"
    assert "learning_rate" in run.data.tags["error"] and "label_column" in run.data.tags["error"]


def test_course_report_configurations_are_two_comparable_runs(client, monkeypatch):
    """The course report's two experiments (lr 4e-5, then lr 4e-5 with 2 epochs) called directly, `experiment`
    honoured."""
    runner = CliRunner()
    base = ["--model", "tiny", "--dataset", "sample", "--max-train-samples", "64", "--max-eval-samples", "32",
            "--max-length", "32", "--experiment", "seed-repro", "--learning-rate", "4e-5"]
    for extra in ([], ["--epochs", "2"]):
        outcome = runner.invoke(entrypoint("classify").main, base + extra, catch_exceptions=False)
        assert outcome.exit_code == 0, outcome.output
    runs = runs_of(client, "seed-repro")
    assert [r.info.status for r in runs] == ["FINISHED", "FINISHED"]
    first, second = (r.data.params for r in runs)
    differing = {k for k in first if first[k] != second.get(k)}
    assert {"epochs"} <= differing and "learning_rate" not in differing
    assert float(first["learning_rate"]) == 4e-5 and float(second["epochs"]) == 2.0
    assert runs[1].data.metrics["train_steps"] == 2 * runs[0].data.metrics["train_steps"]


BF16 = {"model": "tiny", "dataset": "sample", "max_length": 32, "batch_size": 32, "max_train_samples": 128,
        "max_eval_samples": 64, "learning_rate": 1e-3, "precision": "bf16", "register_as": "sentiment-bf16"}


@pytest.mark.xdist_group("classify_bf16_e2e")
def test_a_bf16_classifier_registers_and_serves_what_its_run_predicted(tmp_path_factory, empty_store):
    """bf16 on a CPU, what a GPU with bf16 runs: training and evaluation under bf16 autocast, the weights fp32. The
    reference for the registry is the model's own forward (fp32, as the registered copy computes): exactly equal on
    a CPU. Served, it predicts the logged held-out predictions up to bf16's rounding."""
    launched = launch_in_own_store(tmp_path_factory.mktemp("classify_bf16"), empty_store, "classify", BF16,
                                   "clf-bf16")
    assert launched.result.returncode == 0, launched.result.stderr[-3000:]
    (run,) = launched.runs()
    assert run.info.status == "FINISHED" and run.data.params["effective_precision"] == "bf16"
    (version,) = launched.client.search_model_versions("name='sentiment-bf16'")
    assert version.tags["run_id"] == run.info.run_id and version.tags["reload_device"] == "cpu float32"
    assert float(version.tags["reload_max_logit_diff"]) == 0.0 == float(version.tags["reload_tolerance"])
    table = load_table(launched.client, run.info.run_id, "predictions.json", launched.folder)
    assert_metrics_match_predictions(run.data.metrics, table)
    mlflow.set_tracking_uri(launched.uri)
    served = mlflow.pyfunc.load_model("models:/sentiment-bf16@champion").predict(list(table["text"]))
    assert served["prob_1"].to_numpy() == pytest.approx(table["prob_1"].to_numpy(), abs=1e-3)
