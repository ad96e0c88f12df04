import mlflow
import pytest

from finetune_lab import tracking
from finetune_lab.contract import KIND_TAG


def test_reuses_the_launched_run_and_nests_children_under_it(client, monkeypatch):
    """Under `mlflow run`, MLFLOW_RUN_ID names our run; children must be new runs, not that run resumed."""
    launched = client.create_run(client.create_experiment("launched")).info.run_id
    monkeypatch.setenv("MLFLOW_RUN_ID", launched)
    with tracking.experiment_run("test", "ignored", run_name="named") as parent:
        assert parent.info.run_id == launched
        with tracking.child_run("child") as child:
            child_id = child.info.run_id
    assert child_id != launched
    assert client.get_run(child_id).data.tags["mlflow.parentRunId"] == launched
    assert client.get_run(launched).info.status == "FINISHED"
    assert client.get_run(launched).data.tags["mlflow.runName"] == "named"
    assert client.get_run(launched).data.tags[KIND_TAG] == "test", "the report sorts runs by this tag"
    assert client.get_experiment_by_name("ignored") is None


def test_an_error_ends_the_run_failed_with_a_one_line_tag(client):
    with pytest.raises(ValueError):
        with tracking.experiment_run("test", "errors") as run:
            raise ValueError("bad\nthing   happened")
    finished = client.get_run(run.info.run_id)
    assert finished.info.status == "FAILED" and finished.data.tags["error"] == "ValueError: bad thing happened"


def test_a_failing_child_leaves_the_parent_running(client):
    with tracking.experiment_run("test", "children") as parent:
        with pytest.raises(RuntimeError):
            with tracking.child_run("doomed") as child:
                raise RuntimeError("oom")
        assert mlflow.active_run().info.run_id == parent.info.run_id
    assert client.get_run(child.info.run_id).info.status == "FAILED"
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"


def test_log_params_keeps_values_mlflow_run_already_logged(client):
    with tracking.experiment_run("test", "params") as run:
        mlflow.log_param("learning_rate", "2e-5")  # as `mlflow run` logs the -P value, verbatim
        tracking.log_params({"learning_rate": 2e-05, "model_path": "/x"})
    assert client.get_run(run.info.run_id).data.params == {"learning_rate": "2e-5", "model_path": "/x"}
