"""One owner for the MLflow runs of an invocation.

`experiment_run` reuses the run that `mlflow run` created (MLFLOW_RUN_ID) or starts one in the experiment (created
if missing, also when parallel launches race to create it), tags it with the kind of experiment that made it, turns
on system metrics, and ends it: FINISHED; FAILED with a one-line `error` tag and the traceback as an artifact; or
KILLED when SIGTERM / Ctrl-C stops the process (`signals`). `child_run` does the same for nested runs (sweep
children), also in a worker process that fills a child run the driver made (`create_child_run`); `end_run_by_id`
ends one that another process left open (a worker that died, a child an earlier attempt left RUNNING); `reopened_run`
for a finished or interrupted run that is resumed. Nothing else in the package starts or ends runs (but
`store_bench`, which measures a store with runs of its own making).

When the tracking server stays unreachable longer than MLflow's own retries, `go_offline` makes every later call
of this process fail at once instead of retrying for minutes each: the experiment keeps its results locally
(`spool`) and tells the user how to resume.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import mlflow
import yaml
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.tracking.context import registry as context_registry
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME, MLFLOW_USER
from mlflow.utils.uri import is_databricks_uri, is_http_uri

from finetune_lab import console, signals
from finetune_lab.contract import CONFIG_ARTIFACT, ERROR_TAG, ERROR_TRACEBACK, FAILED, FINISHED, KILLED, KIND_TAG
from finetune_lab.errors import MAX_LINE_CHARS, InputError, one_line, problem

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
UI_PORT = 5000
# The experiment-kind tag the MLflow UI writes (no Python constant exists), and its model-training value.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"
# Attempts at getting-or-creating an experiment that parallel launches may be creating at the same moment.
EXPERIMENT_ATTEMPTS = 5

logger = logging.getLogger(__name__)


def configure() -> str:
    """Honour MLFLOW_TRACKING_URI; otherwise the sqlite store in the working directory (artifacts in ./mlruns)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    mlflow.set_tracking_uri(uri)
    return uri


# ---------------------------------------------------------------------------------------------- outages
class TrackingUnreachable(RuntimeError):
    """The tracking server stayed unreachable past MLflow's retries; the message says what was kept and how to
    resume."""


class _Offline:
    error: str = ""
    saved: dict[str, str | None] = {}


# Once the server is known to be gone, every request fails at once (MLflow reads these on every call).
FAIL_FAST = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}


def unreachable(error: BaseException) -> bool:
    """Whether `error` says the tracking server could not be reached (after MLflow's own retries): refused or
    timed-out connections, or 5xx answers from a proxy in front of it."""
    import requests

    if isinstance(error, (requests.exceptions.ConnectionError, requests.exceptions.Timeout)):
        return True
    text = str(error)
    return isinstance(error, MlflowException) and text.startswith("API request to") and bool(
        re.search(r"failed with (timeout )?exception|failed with error code 5\d\d", text))


def go_offline(error: BaseException) -> None:
    """The server is gone for longer than the retries: from now on, until the invocation's run is over, every
    request fails at once rather than retrying for minutes."""
    if _Offline.error:
        return
    _Offline.error = one_line(error)
    _Offline.saved = {name: os.environ.get(name) for name in FAIL_FAST}
    os.environ.update(FAIL_FAST)
    logger.warning("tracking server unreachable; training goes on unlogged: %s", _Offline.error)


def offline() -> str:
    """Why the tracking server is considered gone ("" while it answers)."""
    return _Offline.error


@contextlib.contextmanager
def _online_at_first() -> Iterator[None]:
    """Each invocation starts with the server considered reachable and leaves MLflow's retry settings as it found
    them."""
    _Offline.error, _Offline.saved = "", {}
    try:
        yield
    finally:
        for name, value in _Offline.saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        _Offline.error, _Offline.saved = "", {}


# ---------------------------------------------------------------------------------------------- accounts
def credentials() -> dict[str, str]:
    """This process's credentials for a tracking server with accounts (MLflow basic-auth): from the environment
    or ~/.mlflow/credentials, as MLflow reads them; as environment variables, for a worker process elsewhere."""
    from mlflow.utils.credentials import read_mlflow_creds

    found = read_mlflow_creds()
    given = {"MLFLOW_TRACKING_USERNAME": found.username, "MLFLOW_TRACKING_PASSWORD": found.password,
             "MLFLOW_TRACKING_TOKEN": os.environ.get("MLFLOW_TRACKING_TOKEN")}
    return {name: value for name, value in given.items() if value}


@contextlib.contextmanager
def _refused_access(experiment: str) -> Iterator[None]:
    """A tracking server that refuses the credentials, or a write into `experiment`, as one line for the user
    (`InputError`), raised before anything is created (the first requests are the ones refused)."""
    try:
        yield
    except MlflowException as error:
        uri, user = mlflow.get_tracking_uri(), credentials().get("MLFLOW_TRACKING_USERNAME", "")
        if error.error_code == "UNAUTHENTICATED":
            who = f"user {user!r} with this MLFLOW_TRACKING_PASSWORD" if user else "a request without credentials"
            raise InputError([problem("MLFLOW_TRACKING_USERNAME", f"the tracking server {uri} refuses {who}: set "
                                      "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to your account's "
                                      "(its administrator makes one)")]) from None
        if error.error_code == "PERMISSION_DENIED":
            raise InputError([problem("experiment", f"user {user!r} may not write into experiment {experiment!r} on "
                                      f"{uri}: ask its owner or the server's administrator for EDIT permission, or "
                                      "choose another experiment")]) from None
        raise


# ---------------------------------------------------------------------------------------------- runs
def ensure_experiment(name: str) -> str:
    """The id of experiment `name`, created if missing. Parallel launches race to create a new experiment; the
    loser's create fails with RESOURCE_ALREADY_EXISTS (and mlflow.set_experiment then quietly leaves the run in
    `Default`), so look again instead."""
    client = MlflowClient()
    for attempt in range(EXPERIMENT_ATTEMPTS):
        found = client.get_experiment_by_name(name)
        if found is not None:
            if found.lifecycle_stage != "active":
                raise InputError([problem("experiment", f"{name!r} is deleted; restore it (`mlflow experiments "
                                                        f"restore --experiment-id {found.experiment_id}`) or choose "
                                                        "another name")])
            return found.experiment_id
        try:
            return client.create_experiment(name)
        except MlflowException as error:
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        time.sleep(0.05 * (attempt + 1))
    raise RuntimeError(f"experiment {name!r} could be neither found nor created in {EXPERIMENT_ATTEMPTS} attempts")


def _record_failure(error_text: str, trace: str) -> None:
    """The `error` tag and the traceback artifact on the active run; the store itself may be what failed."""
    try:
        mlflow.set_tag(ERROR_TAG, error_text)
        if trace:
            mlflow.log_text(trace, ERROR_TRACEBACK)
    except Exception as failure:  # noqa: BLE001 - an unreachable or read-only store must not hide the error
        if unreachable(failure):
            go_offline(failure)
        logger.warning("could not record the error on run %s: %s", mlflow.active_run().info.run_id,
                       one_line(failure))


def _end(status: str, error_text: str = "", trace: str = "") -> None:
    """End the active run with `status`; a signal arriving meanwhile waits until the run is ended. With the
    tracking server gone (`offline`) the run only leaves the stack: it stays RUNNING in the store until `resume`
    closes it."""
    with signals.deferred():
        if status == FINISHED:
            mlflow.end_run(status)
            return
        if not offline():
            _record_failure(error_text, trace)
        run_id = mlflow.active_run().info.run_id
        try:
            mlflow.end_run(status)  # takes the run off the stack first, then tells the store
        except Exception as failure:  # noqa: BLE001 - the error that ended the run matters more
            if not offline():
                logger.warning("run %s could not be marked %s (it stays RUNNING in the store until `resume` closes "
                               "it): %s", run_id, status, one_line(failure))


@contextlib.contextmanager
def _failing_on_error(run: mlflow.ActiveRun) -> Iterator[mlflow.ActiveRun]:
    try:
        yield run
    except KeyboardInterrupt as stop:
        _end(KILLED, str(stop) if isinstance(stop, signals.Terminated) else "interrupted by the user")
        raise
    except BaseException as error:  # noqa: BLE001 - record every failure on the run, then re-raise
        user_mistake = isinstance(error, InputError)  # its lines say it all: no traceback
        _end(FAILED, one_line(error), "" if user_mistake else traceback.format_exc())
        raise
    else:
        _end(FINISHED)


@contextlib.contextmanager
def experiment_run(kind: str, experiment: str, run_name: str = "") -> Iterator[mlflow.ActiveRun]:
    """The invocation's run, tagged with its `kind` (see `contract`): the one `mlflow run` created, or a new one
    in `experiment`. Within it SIGTERM and SIGINT end the open runs KILLED (`signals`)."""
    configure()
    console.quiet_libraries()
    mlflow.enable_system_metrics_logging()
    # `mlflow run` created the run (and chose its experiment) before our process started. Take the id out of
    # the environment while we hold the run: start_run() would otherwise resume it for every nested child too.
    launched_run_id = os.environ.pop("MLFLOW_RUN_ID", None)
    try:
        with signals.terminating(), _online_at_first():
            with _refused_access(experiment):
                if launched_run_id:
                    run = mlflow.start_run(run_id=launched_run_id)
                else:
                    mlflow.set_experiment(experiment_id=ensure_experiment(experiment))
                    run = mlflow.start_run(run_name=run_name or None)
            if launched_run_id:
                if run_name:
                    mlflow.set_tag(MLFLOW_RUN_NAME, run_name)
                # `mlflow run` tags its run with the login of this machine; a run made here (and its children)
                # is tagged with the tracking server's account, as MLflow does: the same user on both
                account = credentials().get("MLFLOW_TRACKING_USERNAME")
                if account:
                    mlflow.set_tag(MLFLOW_USER, account)
            with _failing_on_error(run) as active:
                mlflow.set_tag(KIND_TAG, kind)
                mark_model_training(run.info.experiment_id)
                yield active
    finally:
        if launched_run_id:
            os.environ["MLFLOW_RUN_ID"] = launched_run_id


@contextlib.contextmanager
def child_run(run_name: str, parent_run_id: str | None = None, run_id: str = "") -> Iterator[mlflow.ActiveRun]:
    """A nested run under the active one (or, in a process that holds no run, under `parent_run_id`), or the run
    `create_child_run` made for it when `run_id` is given (a worker process); FAILED with an `error` tag if its
    body raises."""
    run = mlflow.start_run(run_id=run_id or None, run_name=run_name, nested=True,
                           parent_run_id=None if run_id else parent_run_id)
    with _failing_on_error(run) as active:
        yield active


def create_child_run(run_name: str) -> str:
    """A child of the active run, made here with the tags `start_run(nested=True)` would give it in this process
    (parent, name, user, source, git commit), for a worker process to fill with `child_run(run_name, run_id)`."""
    parent = mlflow.active_run()
    tags = context_registry.resolve_tags({MLFLOW_PARENT_RUN_ID: parent.info.run_id, MLFLOW_RUN_NAME: run_name})
    return MlflowClient().create_run(parent.info.experiment_id, tags=tags, run_name=run_name).info.run_id


def end_run_by_id(run_id: str, status: str, error: str) -> None:
    """End a run another process was filling (a worker that died, an interrupted child, a child an earlier attempt
    left RUNNING) with its `error` tag."""
    client = MlflowClient()
    client.set_tag(run_id, ERROR_TAG, error[:MAX_LINE_CHARS])
    client.set_terminated(run_id, status)


def configure_worker(tracking_uri: str, credentials: dict[str, str]) -> None:
    """In a worker process: log into the driver's tracking store as the driver's user (`credentials`), with system
    metrics like every run here."""
    console.quiet_libraries()
    os.environ.update(credentials)
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.enable_system_metrics_logging()


@contextlib.contextmanager
def reopened_run(run_id: str) -> Iterator[mlflow.ActiveRun]:
    """Run `run_id` made active again (RUNNING, its earlier `error` tag removed) on top of the invocation's own run,
    so that new children nest under it; ended like any other run."""
    run = mlflow.start_run(run_id=run_id, nested=True)
    if ERROR_TAG in run.data.tags:
        mlflow.delete_tag(ERROR_TAG)
    with _failing_on_error(run) as active:
        yield active


def set_or_clear_tag(key: str, value: str) -> None:
    """Tag the active run with `value`, or remove the tag (left by an earlier attempt of a resumed run) if empty."""
    if value:
        mlflow.set_tag(key, value)
    elif key in MlflowClient().get_run(mlflow.active_run().info.run_id).data.tags:
        mlflow.delete_tag(key)


def log_table(frame, artifact_file: str) -> None:
    """A table in `mlflow.log_table`'s format (and UI tag), replacing any earlier one of that name: log_table
    appends to an existing table, which would double the rows of a resumed parent's summary."""
    mlflow.log_text(frame.to_json(orient="split", index=False, date_format="iso"), artifact_file)
    tags = MlflowClient().get_run(mlflow.active_run().info.run_id).data.tags
    logged = json.loads(tags.get("mlflow.loggedArtifacts", "[]"))
    entry = {"path": artifact_file, "type": "table"}
    if entry not in logged:
        mlflow.set_tag("mlflow.loggedArtifacts", json.dumps([*logged, entry]))


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


def write_shared(write: Callable[[], object]) -> None:
    """`write()`, tried once more if the store refuses it. Runs starting together in one experiment write the same
    rows into it (its kind tag, a dataset logged as input); on PostgreSQL all but the first insert of such a row fail
    on its key, and the second try finds the row and updates or reuses it."""
    try:
        write()
    except MlflowException as error:
        if error.error_code != "BAD_REQUEST":  # an unreachable server was already retried by MLflow itself
            raise
        logger.debug("the store refused a shared write, trying again: %s", one_line(error))
        write()


def mark_model_training(experiment_id: str) -> None:
    """Tag the experiment as a model-training one (the tag the MLflow UI itself writes), unless it says otherwise.
    The 3.17 UI picks its GenAI / Model training view from a global switch instead, which `ui_page`'s query sets."""
    client = MlflowClient()
    if EXPERIMENT_KIND_TAG not in client.get_experiment(experiment_id).tags:
        write_shared(lambda: client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND))


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
