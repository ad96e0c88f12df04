"""The classifier sweep in-process: a signal leaves a partial table and `resume` finishes it; a collapsed child is
never best; bad grids are one line each before any model loads."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from support.checks import assert_metrics_match_predictions
from support.paths import REPO, entrypoint
from support.store import download_json, load_table, parent_and_children, runs_of, top_level

from finetune_lab import health
from finetune_lab.contract import KIND_TAG
from finetune_lab.experiments import classify_sweep

ARGS = ["--model", "tiny", "--dataset", "sample", "--epochs", "1", "--seeds", "1", "--max-length", "32",
        "--batch-size", "32", "--max-train-samples", "128", "--max-eval-samples", "32", "--experiment", "clf-stop"]


def sweep_cli(*args: str):
    return CliRunner().invoke(entrypoint("classify_sweep").main, [*ARGS, *args])


@pytest.mark.slow  # two sweeps, one stopped by a signal: the sweeps' own SIGTERM and resume path
def test_sigterm_leaves_a_partial_table_and_resume_finishes_it(client, tmp_path, sigterm_at_second_child):
    rates = ("--learning-rates", "1e-3,5e-4,2e-4")
    assert sweep_cli(*rates).exit_code == 143  # the first child finished, the second killed, the third not run
    parent, _ = parent_and_children(runs_of(client, "clf-stop"))
    assert parent.info.status == "KILLED" and parent.data.tags["error"] == "terminated by SIGTERM"
    table = load_table(client, parent.info.run_id, "comparison_table.json", tmp_path / "stopped")
    assert list(table["status"]) == ["FINISHED", "KILLED", "NOT_RUN"]
    assert parent.data.tags["best_run_id"] == table["run_id"][0], "the summary covers what finished"

    sigterm_at_second_child.disarm()
    resumed = sweep_cli(*rates, "--resume", "latest")
    assert resumed.exit_code == 0, resumed.output
    parent = client.get_run(parent.info.run_id)
    assert parent.info.status == "FINISHED"
    table = load_table(client, parent.info.run_id, "comparison_table.json", tmp_path / "resumed")
    assert list(zip(table["status"], table["reused"])) == [("FINISHED", True), ("FINISHED", False),
                                                           ("FINISHED", False)]
    assert [r.data.tags[KIND_TAG] for r in runs_of(client, "clf-stop") if KIND_TAG in r.data.tags] == [
        "classify_sweep", "resume"]


@pytest.mark.slow  # trains repeatedly: a classifier sweep
def test_a_collapsed_child_is_never_best(client, monkeypatch):
    """A child whose model collapsed has the best accuracy of the sweep here, and still ends FAILED, not best."""
    original = health.check

    def collapse_the_fast_one(steps, eval_loss, classes, metrics):
        import mlflow

        params = mlflow.tracking.MlflowClient().get_run(mlflow.active_run().info.run_id).data.params
        if float(params["learning_rate"]) == 1e-3:
            metrics["accuracy"] = 1.0
            raise health.TrainingCollapsed("training collapsed (made so by the test)", metrics)
        original(steps, eval_loss, classes, metrics)

    monkeypatch.setattr(health, "check", collapse_the_fast_one)
    result = sweep_cli("--learning-rates", "1e-3,5e-4", "--experiment", "collapse")
    assert result.exit_code == 0, result.output
    runs = {r.info.run_name: r for r in runs_of(client, "collapse")}
    assert runs["lr0.001-ep1-seed1"].info.status == "FAILED"
    (parent,) = top_level(runs.values())
    assert parent.data.tags["best_run_id"] == runs["lr0.0005-ep1-seed1"].info.run_id
    assert parent.data.metrics["failed_children"] == 1


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--learning-rates", ""], "error: learning_rates: must list at least one learning rate, like 2e-5,4e-5"),
        (["--learning-rates", "-1e-5,2e-5"], "error: learning_rates: must be numbers > 0, got -1e-05,2e-05"),
        (["--learning-rates", "2e-5,x"], "error: learning_rates: must be a comma list of numbers like 2e-5,4e-5"),
        (["--learning-rates", "2e-5,2e-5"], "error: learning_rates: lists 2e-05 more than once"),
        (["--epochs", "1,2", "--max-steps", "5"], "error: epochs: compares nothing when max_steps > 0"),
        (["--seeds", ""], "error: seeds: must list at least one integer"),
        (["--executor", "spark"], "error: executor: must be one of local, ray"),
        (["--label-column", "stars"], "error: label_column: column 'stars' not in the dataset"),
        (["--register-as", "team/clf"], "error: register_as: Invalid model name 'team/clf'. Names cannot contain '/'"),
        (["--learning-rates", "1e-3,2e-3", "--epochs", "1,2", "--seeds", "1,2", "--max-children", "6"],
         "error: max_children: the grid has 8 children (2 learning_rates x 2 epochs x 2 seeds), more than "
         "max_children=6"),
    ],
)
def test_bad_sweep_input_is_one_line_before_training(client, no_weights_loaded, args, expected):
    outcome = CliRunner().invoke(entrypoint("classify_sweep").main, [*ARGS, *args])
    assert outcome.exit_code == 2, outcome.output
    assert expected in outcome.output and "Traceback" not in outcome.output
    (run,) = runs_of(client, "clf-stop")
    assert run.info.status == "FAILED" and expected.split(": ", 2)[2][:20] in run.data.tags["error"]


def test_the_workload_pickles_for_ray_workers():
    import pickle

    from finetune_lab.config import ClassifySweepConfig

    config = ClassifySweepConfig(model="tiny", dataset="sample", learning_rates=(1e-3,), seeds=(1,))
    prepared = classify_sweep.DESIGN.prepare(config, 1)
    workload = classify_sweep.ClassifySweepWorkload(config, prepared, {}, "")
    received = pickle.loads(pickle.dumps(workload))
    assert received.prepared.data.digest == prepared.data.digest
    assert received.prepared.data.splits["test"]["text"] == prepared.data.splits["test"]["text"]


def test_grid_and_data_problems_are_reported_together_once(client, no_weights_loaded):
    outcome = CliRunner().invoke(entrypoint("classify_sweep").main,
                                 [*ARGS, "--learning-rates", "-1e-5", "--label-column", "stars", "--batch-size", "0"])
    errors = [line for line in outcome.output.splitlines() if line.startswith("error:")]
    assert outcome.exit_code == 2 and len(errors) == 3, outcome.output
    assert [e.split(":")[1].strip() for e in errors] == ["batch_size", "learning_rates", "label_column"]


@pytest.fixture
def three_classes(tmp_path):
    """The embedded reviews with a third class: every third review is labelled 2 (in both splits)."""
    import pandas as pd

    frame = pd.read_csv(REPO / "data" / "sample" / "sentiment.csv")
    frame.loc[frame.index % 3 == 0, "label"] = 2
    path = tmp_path / "three.csv"
    frame.to_csv(path, index=False)
    return path


@pytest.mark.slow  # trains repeatedly: a classifier sweep of four children
def test_a_sweep_over_three_classes_ends_with_its_best_child_and_confusion_matrix(client, tmp_path, three_classes):
    result = sweep_cli("--dataset", str(three_classes), "--learning-rates", "1e-3,5e-3", "--seeds", "1,2",
                       "--max-train-samples", "96", "--max-eval-samples", "48", "--experiment", "three")
    assert result.exit_code == 0, result.output
    runs = runs_of(client, "three")
    parent, children = parent_and_children(runs)
    children = {r.info.run_id: r for r in children}
    assert parent.info.status == "FINISHED" and len(children) == 4
    assert {c.info.status for c in children.values()} == {"FINISHED"} and parent.data.params["num_labels"] == "3"
    for child in children.values():
        table = load_table(client, child.info.run_id, "predictions.json", tmp_path / child.info.run_id)
        assert_metrics_match_predictions(child.data.metrics, table)
    best = children[parent.data.tags["best_run_id"]]
    same_configuration = [c.data.metrics["accuracy"] for c in children.values()
                          if c.data.params["learning_rate"] == best.data.params["learning_rate"]]
    assert parent.data.metrics["best_accuracy"] == best.data.metrics["accuracy"] == max(same_configuration)
    # what the verdict compares: the configuration's mean over its seeds, named apart from its best child's score
    assert parent.data.metrics["best_configuration_accuracy_mean"] == pytest.approx(sum(same_configuration) / 2)
    assert f"best_configuration_accuracy_mean {sum(same_configuration) / 2:.4f}" in " ".join(result.output.split())
    matrix = download_json(client, parent.info.run_id, "best_confusion_matrix.json", tmp_path / "parent")
    assert matrix == download_json(client, best.info.run_id, "confusion_matrix.json", tmp_path / "best")
    assert len(matrix["matrix"]) == 3 and sum(map(sum, matrix["matrix"])) == 48
