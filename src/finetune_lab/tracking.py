"""One owner for the MLflow run of an invocation.

`experiment_run` reuses the run that `mlflow run` created (MLFLOW_RUN_ID) or starts one, tags it with the kind
of experiment that made it, turns on system metrics, and on any exception tags the run with a one-line `error`
and ends it FAILED. `child_run` does the same for nested runs (sweep children), also in a worker process that
fills a child run the driver made (`create_child_run`, `end_run_by_id`). Nothing else in the package starts or
ends runs.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

import mlflow
import yaml
from mlflow.tracking import MlflowClient
from mlflow.tracking.context import registry as context_registry
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME
from mlflow.utils.uri import is_databricks_uri, is_http_uri

from finetune_lab import console
from finetune_lab.contract import CONFIG_ARTIFACT, ERROR_TAG, KIND_TAG

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
UI_PORT = 5000
# The experiment-kind tag the MLflow UI writes (no Python constant exists), and its model-training value.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"
MAX_TAG_CHARS = 5000


def configure() -> str:
    """Honour MLFLOW_TRACKING_URI; otherwise the sqlite store in the working directory (artifacts in ./mlruns)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    mlflow.set_tracking_uri(uri)
    return uri


def one_line(error: BaseException) -> str:
    """The error as a single line for the run's `error` tag."""
    text = " ".join(str(error).split())
    return (f"{type(error).__name__}: {text}" if text else type(error).__name__)[:MAX_TAG_CHARS]


@contextlib.contextmanager
def _failing_on_error(run: mlflow.ActiveRun) -> Iterator[mlflow.ActiveRun]:
    try:
        yield run
    except KeyboardInterrupt:
        mlflow.set_tag(ERROR_TAG, "interrupted by the user")
        mlflow.end_run("KILLED")
        raise
    except BaseException as error:  # noqa: BLE001 - record every failure on the run, then re-raise
        mlflow.set_tag(ERROR_TAG, one_line(error))
        mlflow.end_run("FAILED")
        raise
    else:
        mlflow.end_run("FINISHED")


@contextlib.contextmanager
def experiment_run(kind: str, experiment: str, run_name: str = "") -> Iterator[mlflow.ActiveRun]:
    """The invocation's run, tagged with its `kind` (see `contract`): the one `mlflow run` created, or a new one
    in `experiment`."""
    configure()
    console.quiet_libraries()
    mlflow.enable_system_metrics_logging()
    # `mlflow run` created the run (and chose its experiment) before our process started. Take the id out of
    # the environment while we hold the run: start_run() would otherwise resume it for every nested child too.
    launched_run_id = os.environ.pop("MLFLOW_RUN_ID", None)
    try:
        if launched_run_id:
            run = mlflow.start_run(run_id=launched_run_id)
            if run_name:
                mlflow.set_tag("mlflow.runName", run_name)
        else:
            mlflow.set_experiment(experiment)
            run = mlflow.start_run(run_name=run_name or None)
        with _failing_on_error(run) as active:
            mlflow.set_tag(KIND_TAG, kind)
            mark_model_training(run.info.experiment_id)
            yield active
    finally:
        if launched_run_id:
            os.environ["MLFLOW_RUN_ID"] = launched_run_id


@contextlib.contextmanager
def child_run(run_name: str, run_id: str = "") -> Iterator[mlflow.ActiveRun]:
    """A nested run under the active one, or (in a worker process) the run `create_child_run` made for it;
    FAILED with an `error` tag if its body raises."""
    run = mlflow.start_run(run_id=run_id or None, run_name=run_name, nested=True)
    with _failing_on_error(run) as active:
        yield active


def create_child_run(run_name: str) -> str:
    """A child of the active run, made here with the tags `start_run(nested=True)` would give it in this process
    (parent, name, user, source, git commit), for a worker process to fill with `child_run(run_name, run_id)`."""
    parent = mlflow.active_run()
    tags = context_registry.resolve_tags({MLFLOW_PARENT_RUN_ID: parent.info.run_id, MLFLOW_RUN_NAME: run_name})
    return MlflowClient().create_run(parent.info.experiment_id, tags=tags, run_name=run_name).info.run_id


def end_run_by_id(run_id: str, status: str, error: str) -> None:
    """End a run another process was filling (a worker that died, an interrupted child) with its `error` tag."""
    client = MlflowClient()
    client.set_tag(run_id, ERROR_TAG, error[:MAX_TAG_CHARS])
    client.set_terminated(run_id, status)


def configure_worker(tracking_uri: str) -> None:
    """In a worker process: log into the driver's tracking store, with system metrics like every run here."""
    console.quiet_libraries()
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.enable_system_metrics_logging()


def log_params(params: dict[str, Any]) -> None:
    """Log params not yet on the active run (`mlflow run` already logged the -P values verbatim)."""
    run = mlflow.active_run()
    existing = MlflowClient().get_run(run.info.run_id).data.params
    fresh = {k: ("" if v is None else v) for k, v in params.items() if k not in existing}
    if fresh:
        mlflow.log_params(fresh)


def log_config(config_dict: dict[str, Any], artifact_name: str = CONFIG_ARTIFACT) -> None:
    """Every effective config value as params, and the whole config as a YAML artifact."""
    log_params(config_dict)
    mlflow.log_text(yaml.safe_dump(config_dict, sort_keys=False), artifact_name)


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment_params() -> dict[str, str]:
    """Device and library versions, so runs from different machines stay comparable."""
    import peft
    import torch
    import transformers

    if torch.cuda.is_available():
        device = f"cuda:{torch.cuda.get_device_name(0)}"
    else:
        device = "cpu"
    return {
        "device": device,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "peft_version": peft.__version__,
        "mlflow_version": mlflow.__version__,
        "git_commit": git_commit(),
    }


@contextlib.contextmanager
def scratch_dir(prefix: str) -> Iterator[Path]:
    """A temporary folder for files on their way into the run's artifacts."""
    with tempfile.TemporaryDirectory(prefix=f"finetune_lab_{prefix}_") as path:
        yield Path(path)


def mark_model_training(experiment_id: str) -> None:
    """Tag the experiment as a model-training one (the tag the MLflow UI itself writes), unless it says otherwise.
    The 3.17 UI picks its GenAI / Model training view from a global switch instead, which `ui_page`'s query sets."""
    client = MlflowClient()
    if EXPERIMENT_KIND_TAG not in client.get_experiment(experiment_id).tags:
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)


def ui_page(experiment_id: str) -> str:
    """The experiment's runs in the UI's Model training view (the UI opens in its GenAI view otherwise)."""
    return f"#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def mlflow_command() -> str:
    """The `mlflow` executable next to this interpreter (relative to the working directory when inside it), so the
    printed command works without activating the virtual environment."""
    beside = Path(sys.executable).parent / "mlflow"
    if not beside.is_file():
        return "mlflow"
    return os.path.relpath(beside) if beside.is_relative_to(Path.cwd()) else str(beside)


def ui_hint(experiment_id: str) -> str:
    """How to see the runs, as printed at the end of every entry point: a tracking server's own UI, or the command
    that starts one on this machine's store, and the page to open."""
    uri = mlflow.get_tracking_uri()
    if is_databricks_uri(uri):
        return "See the runs in your Databricks workspace (Experiments)."
    if is_http_uri(uri):
        return f"See the runs in the MLflow UI: {uri.rstrip('/')}/{ui_page(experiment_id)}"
    return (f"See the runs in the MLflow UI: {mlflow_command()} ui --backend-store-uri {uri} --host 127.0.0.1 "
            f"--port {UI_PORT}\n  then open http://127.0.0.1:{UI_PORT}/{ui_page(experiment_id)}")
