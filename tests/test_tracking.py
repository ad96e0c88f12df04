import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import BAD_REQUEST
from support.paths import REPO

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


def test_experiments_are_marked_as_model_training(client, monkeypatch):
    """Our own experiments and the one `mlflow run` chose both get the tag; a kind someone set is kept."""
    kind = tracking.EXPERIMENT_KIND_TAG
    for tags, expected in (({}, "custom_model_development"), ({kind: "genai_development"}, "genai_development")):
        chosen = client.create_experiment(f"chosen-{expected}", tags=tags)
        monkeypatch.setenv("MLFLOW_RUN_ID", client.create_run(chosen).info.run_id)
        with tracking.experiment_run("test", "ignored"):
            pass
        assert client.get_experiment(chosen).tags[kind] == expected
    monkeypatch.delenv("MLFLOW_RUN_ID")
    with tracking.experiment_run("test", "ours") as run:
        pass
    assert client.get_experiment(run.info.experiment_id).tags[kind] == "custom_model_development"


def test_a_run_starting_alongside_others_in_a_new_experiment_accepts_the_tag_they_wrote(client, monkeypatch):
    """Runs started at once in a new experiment all find it untagged; on PostgreSQL all but the first write of the
    tag fail on its key (the store says BAD_REQUEST). The write is tried once more; a store that keeps refusing fails
    the run."""
    kind = tracking.EXPERIMENT_KIND_TAG
    write_tag, writes = MlflowClient.set_experiment_tag, []

    def another_run_wins_the_race(self, experiment_id, key, value):
        writes.append(key)
        if len(writes) == 1:
            write_tag(self, experiment_id, key, value)  # the other run's insert lands first
            raise MlflowException('duplicate key value violates unique constraint "experiment_tag_pk"',
                                  error_code=BAD_REQUEST)
        write_tag(self, experiment_id, key, value)

    monkeypatch.setattr(MlflowClient, "set_experiment_tag", another_run_wins_the_race)
    with tracking.experiment_run("test", "started-together") as run:
        pass
    assert writes == [kind, kind]
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).tags[kind] == "custom_model_development"

    def the_store_refuses(self, experiment_id, key, value):
        writes.append(key)
        raise MlflowException("the store is read-only", error_code=BAD_REQUEST)

    monkeypatch.setattr(MlflowClient, "set_experiment_tag", the_store_refuses)
    writes.clear()
    with pytest.raises(MlflowException, match="read-only"), tracking.experiment_run("test", "refused"):
        pass
    assert writes == [kind, kind]
    [refused] = client.search_runs([client.get_experiment_by_name("refused").experiment_id])
    assert refused.info.status == "FAILED" and "read-only" in refused.data.tags["error"]


def test_the_ui_hint_works_as_printed(client, monkeypatch):
    """A local store: a command that runs without an activated venv (the executable's path), on 127.0.0.1, and the
    runs page in the Model training view. A tracking server: its own URL, no command."""
    page = "#/experiments/7/runs?workflowType=machine_learning"
    command, url = tracking.ui_hint("7").split(": ", 1)[1].split("\n")
    executable, *arguments = command.split()
    assert os.access(executable, os.X_OK) and os.path.samefile(Path(executable).parent, Path(sys.executable).parent)
    assert arguments == ["ui", "--backend-store-uri", mlflow.get_tracking_uri(), "--host", "127.0.0.1", "--port",
                         "5000"]
    assert url.strip() == f"then open http://127.0.0.1:5000/{page}"
    monkeypatch.setattr(mlflow, "get_tracking_uri", lambda: "http://tracking.example:5000/")
    assert tracking.ui_hint("7") == f"See the runs in the MLflow UI: http://tracking.example:5000/{page}"


@pytest.mark.parametrize("uri, expected", [
    ("sqlite:///runs.db", 'mlflow ui --backend-store-uri "sqlite:///runs.db" --host 127.0.0.1 --port 5000'),
    ("http://tracking.example:5000", "The runs are on a tracking server: open http://tracking.example:5000"),
])
def test_make_ui_serves_the_store_locally_or_points_to_the_server(uri, expected):
    venv = Path(sys.executable).parent.parent
    dry_run = [] if uri.startswith("http") else ["-n"]  # never start a server here: show the command it would run
    made = subprocess.run(["make", "-s", *dry_run, "-o", f"{venv}/.installed", "ui", f"VENV={venv}",
                           f"MLFLOW_TRACKING_URI={uri}"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    assert expected in made.stdout


def test_a_lost_race_to_create_the_experiment_still_lands_the_run_in_it(client, monkeypatch):
    """Parallel launches into a new experiment: another process creates it between our look and our create (the
    store then answers RESOURCE_ALREADY_EXISTS). mlflow.set_experiment would quietly leave the run in `Default`."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS
    from mlflow.tracking._tracking_service.client import TrackingServiceClient

    original = TrackingServiceClient.create_experiment  # under both MlflowClient and mlflow.set_experiment

    def created_by_another_launch_first(self, name, *args, **kwargs):
        original(self, name, *args, **kwargs)
        raise MlflowException(f"Experiment(name={name}) already exists. Error: (sqlite3.IntegrityError) UNIQUE "
                              "constraint failed: experiments.workspace, experiments.name",
                              error_code=RESOURCE_ALREADY_EXISTS)

    monkeypatch.setattr(TrackingServiceClient, "create_experiment", created_by_another_launch_first)
    with tracking.experiment_run("test", "raced") as run:
        pass
    assert run.info.experiment_id == client.get_experiment_by_name("raced").experiment_id != "0"


def test_an_unexpected_error_is_one_line_for_the_user_and_a_traceback_on_the_run(client, monkeypatch, tmp_path):
    """Disk full during training: one `error:` line naming the error and where its traceback is, no traceback on the
    terminal; the run ends FAILED with the error tag and the traceback as an artifact."""
    import re
    from pathlib import Path

    from click.testing import CliRunner
    from support.paths import entrypoint
    from support.store import runs_of

    from finetune_lab import training

    def disk_full(trainer):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(training, "train", disk_full)
    outcome = CliRunner().invoke(entrypoint("classify").main, ["--model", "tiny", "--dataset", "sample",
                                                               "--max-train-samples", "32", "--experiment", "crash"])
    assert outcome.exit_code == 1 and "Traceback" not in outcome.output
    (line,) = re.findall(r"error: .*", outcome.output)
    assert line.startswith("error: OSError: [Errno 28] No space left on device (full traceback: ")
    kept = Path(re.search(r"full traceback: (\S+),", line).group(1))
    assert "Traceback" in kept.read_text() and "disk_full" in kept.read_text()
    (run,) = runs_of(client, "crash")
    assert run.info.status == "FAILED" and run.data.tags["error"] == "OSError: [Errno 28] No space left on device"
    logged = Path(client.download_artifacts(run.info.run_id, "error_traceback.txt", str(tmp_path))).read_text()
    assert "in disk_full" in logged and "No space left on device" in logged


def test_a_store_that_fails_while_recording_the_error_does_not_hide_it(client, monkeypatch):
    def read_only(*args, **kwargs):
        raise mlflow.exceptions.MlflowException("(sqlite3.OperationalError) attempt to write a readonly database")

    with pytest.raises(ValueError, match="the real problem"):
        with tracking.experiment_run("test", "read-only") as run:
            monkeypatch.setattr(mlflow, "log_text", read_only)
            raise ValueError("the real problem")
    assert mlflow.active_run() is None, "the run left the stack all the same"
    assert client.get_run(run.info.run_id).info.status == "FAILED"
