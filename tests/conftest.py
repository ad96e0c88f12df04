"""Shared fixtures: an isolated sqlite tracking store per test, offline Hub, a per-session model cache,
and `mlflow_run` to launch an entry point the way users do."""

from __future__ import annotations

import contextlib
import gc
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from finetune_lab import heap

# The test modules import the training stack: collected with the collector paused, which then skips what they made
# (finetune_lab/heap.py says what that saves).
_collecting = contextlib.ExitStack()
_collecting.enter_context(heap.long_lived())

import mlflow  # noqa: E402
import pytest  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# Tests never reach the Hub: a missing model or dataset must fail fast, not after minutes of retries.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_finish(session):
    _collecting.close()


def pytest_sessionfinish(session):
    _collecting.close()  # not collected in this process (xdist's controller)
    # pytest's last full collection would walk every object the session made: minutes on these machines.
    gc.freeze()


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """The slow tier (`pytest -m "not slow"` skips it): everything under tests/e2e (real `mlflow run` launches) and
    every test that starts Ray or a tracking server. With `--dist loadgroup` (`make test`), the tests on the team's
    server run one after another on one worker (one server for them), and so do the tests that start a local Ray
    instance: two on two cores only slow each other down."""
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if "e2e" in item.path.parts or {"local_ray", "server", "team_server"} & fixtures:
            item.add_marker(pytest.mark.slow)
        if "e2e" in item.path.parts and "team_server" in fixtures:
            item.add_marker(pytest.mark.team)  # `make test-team` runs only these
        if "team_server" in fixtures:
            # the tests on the team's tracking server (a session fixture: one per worker) share one worker
            item.add_marker(pytest.mark.xdist_group("team_server"))
        elif "local_ray" in fixtures:
            item.add_marker(pytest.mark.xdist_group("ray"))
        elif item.get_closest_marker("xdist_group") is None:
            # a module's tests on one worker, so that its module-scoped fixtures (a store of runs) are built once
            item.add_marker(pytest.mark.xdist_group(item.path.stem))
        if getattr(config.option, "loadgroup", False):
            # pytest-xdist 3.8 tells its scheduler the group by writing `item._nodeid`, which pytest 9 no longer
            # reads (the id lives in `item._id`): without this, every group is silently spread over both workers.
            from _pytest.nodeid import NodeId

            item._id = NodeId.parse(f"{item.nodeid}@{item.get_closest_marker('xdist_group').args[0]}")


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory) -> Path:
    """Tiny models are rebuilt per session; offline models reuse the user's cache unless overridden."""
    cache = tmp_path_factory.mktemp("finetune_lab_cache")
    os.environ["FINETUNE_LAB_CACHE"] = str(cache)
    return cache


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory) -> Path:
    """A sqlite store with MLflow's schema, made once: creating the tables and running the migrations takes
    seconds, copying the file takes milliseconds."""
    path = tmp_path_factory.mktemp("store") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def tracking_uri(tmp_path, monkeypatch, empty_store) -> str:
    shutil.copy(empty_store, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    # A new experiment's artifacts go to ./mlruns of the working directory: keep them out of the user's.
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    # mlflow.set_experiment() in an in-process run exports this; a later `mlflow run --experiment-name` refuses it.
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    # ... and remembers it in-process: an experiment id of the previous test's store means nothing in this one.
    monkeypatch.setattr(mlflow.tracking.fluent, "_active_experiment_id", None)
    mlflow.set_tracking_uri(uri)
    return uri


@pytest.fixture
def client(tracking_uri) -> MlflowClient:
    return MlflowClient(tracking_uri)


def create_experiment(client: MlflowClient, name: str, tmp_path: Path) -> str:
    """Experiment with artifacts under tmp_path (the sqlite default would be ./mlruns in the repo)."""
    existing = client.get_experiment_by_name(name)
    if existing:
        return existing.experiment_id
    return client.create_experiment(name, artifact_location=(tmp_path / "artifacts" / name).as_uri())


@pytest.fixture
def mlflow_run(client, tmp_path):
    """Run `mlflow run <repo> -e ENTRY --env-manager local -P k=v ...`; return the CompletedProcess."""

    def launch(entry: str, params: dict, experiment: str = "e2e") -> subprocess.CompletedProcess:
        command, env = mlflow_run_command(client, tmp_path, entry, params, experiment)
        return subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=900)

    return launch


def mlflow_run_command(client: MlflowClient, tmp_path: Path, entry: str, params: dict,
                       experiment: str) -> tuple[list[str], dict[str, str]]:
    """The `mlflow run` command line and environment for an entry point (its experiment created first)."""
    create_experiment(client, experiment, tmp_path)
    command = [sys.executable, "-m", "mlflow", "run", str(REPO), "-e", entry, "--env-manager", "local",
               "--experiment-name", experiment]
    for key, value in params.items():
        command += ["-P", f"{key}={value}"]
    # The MLproject's `python` must be this interpreter, whichever venv runs the tests.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_EXPERIMENT_ID"}
    env["PATH"] = path
    return command, env


@dataclass
class Launched:
    """An entry point launched once with `mlflow run` into a store of its own, for the tests of a module that only
    read what it logged."""

    result: subprocess.CompletedProcess
    uri: str
    client: MlflowClient
    folder: Path
    experiment: str

    def runs(self):
        return runs_of(self.client, self.experiment)


def launch_in_own_store(folder: Path, empty_store: Path, entry: str, params: dict, experiment: str) -> Launched:
    """`mlflow run` of `entry` into a sqlite store in `folder` (a module-scoped fixture's: the function-scoped
    `tracking_uri` cannot serve one)."""
    shutil.copy(empty_store, folder / "mlflow.db")
    return launch_in_store_of(folder, entry, params, experiment)


def launch_in_store_of(folder: Path, entry: str, params: dict, experiment: str) -> Launched:
    """`mlflow run` of `entry` into the sqlite store in `folder` that an earlier launch made (`generate` from the
    model that one registered)."""
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = MlflowClient(uri)
    command, env = mlflow_run_command(client, folder, entry, params, experiment)
    env["MLFLOW_TRACKING_URI"] = uri
    env.pop("MLFLOW_RUN_ID", None)
    result = subprocess.run(command, capture_output=True, text=True, cwd=folder, env=env, timeout=900)
    return Launched(result, uri, client, folder, experiment)


def assert_metrics_match_predictions(metrics: dict, table) -> None:
    """The headline metrics of a classification run (of any number of classes), recomputed independently from its
    logged predictions table."""
    import numpy as np
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support, roc_auc_score

    labels, predictions = table["label"].to_numpy(), table["prediction"].to_numpy()
    classes = sum(1 for column in table.columns if column.startswith("prob_"))
    probabilities = table[[f"prob_{k}" for k in range(classes)]].to_numpy()
    assert np.array_equal(predictions, probabilities.argmax(axis=1))
    assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    binary = classes == 2
    precision, recall, f1, _ = precision_recall_fscore_support(labels, predictions, zero_division=0,
                                                               average="binary" if binary else "macro")
    assert metrics["accuracy"] == pytest.approx(accuracy_score(labels, predictions), abs=1e-9)
    assert metrics["precision"] == pytest.approx(precision, abs=1e-9)
    assert metrics["recall"] == pytest.approx(recall, abs=1e-9)
    assert metrics["f1"] == pytest.approx(f1, abs=1e-9)
    if set(labels) != set(range(classes)):
        assert "roc_auc" not in metrics, "undefined where a class is missing from the held-out labels"
    elif binary:
        assert metrics["roc_auc"] == pytest.approx(roc_auc_score(labels, probabilities[:, 1]), abs=1e-6)
    else:
        assert metrics["roc_auc"] == pytest.approx(roc_auc_score(labels, probabilities, multi_class="ovr"), abs=1e-6)
    own_label = probabilities[np.arange(len(labels)), labels]
    assert metrics["eval_loss"] == pytest.approx(-np.log(own_label).mean(), rel=1e-6)


def adapter_on_base(client: MlflowClient, run_id: str, base_path: str, folder: Path, dtype=None):
    """The adapter run `run_id` logged, on its base loaded afresh from `base_path` in `dtype` (default fp32), in
    eval mode, with the tokenizer logged with it: how a user reloads it, independently of the project's code."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter_dir = client.download_artifacts(run_id, "adapter", str(folder / run_id))
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype or torch.float32)
    return PeftModel.from_pretrained(base, adapter_dir).eval(), AutoTokenizer.from_pretrained(adapter_dir)


def greedy_reply(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """The greedy reply to `prompt` in the `plain` format (`prompt` + newline)."""
    import torch

    encoded = tokenizer(f"{prompt}\n", add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(output[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True).strip()


@pytest.fixture
def no_weights_loaded(monkeypatch):
    """Fail the test if any model's weights are loaded (every loader ends in PreTrainedModel.from_pretrained,
    whichever module imports it under whichever name)."""
    from transformers import PreTrainedModel

    def refuse(cls, *args, **kwargs):
        raise AssertionError(f"{cls.__name__} weights were loaded before the input was validated")

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(refuse))


def runs_of(client: MlflowClient, experiment: str):
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"experiment {experiment!r} was not created"
    return client.search_runs([found.experiment_id], order_by=["attributes.start_time ASC"])


def download_json(client: MlflowClient, run_id: str, path: str, tmp_path: Path):
    import json

    local = client.download_artifacts(run_id, path, str(tmp_path))
    return json.loads(Path(local).read_text())


def load_table(client: MlflowClient, run_id: str, path: str, tmp_path: Path):
    """A `mlflow.log_table` artifact as a pandas DataFrame."""
    import pandas as pd

    table = download_json(client, run_id, path, tmp_path)
    return pd.DataFrame(table["data"], columns=table["columns"])


def entrypoint(name: str):
    """Import `entrypoints/<name>.py` (a script, not a package) to drive its click command in-process."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"entrypoint_{name}", REPO / "entrypoints" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def local_ray(monkeypatch):
    """Settings for a local Ray instance started by the code under test: its own short temp folder (Ray's socket
    paths must stay under 107 bytes), no auth token written into ~/.ray, no usage stats, no RAY_ADDRESS. Yields
    the folder; whatever of that instance is still alive at the end is killed (tests assert there is none)."""
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    monkeypatch.setenv("RAY_TMPDIR", str(folder))
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    yield folder
    import psutil

    left = ray_processes(folder)
    for process in left:
        process.kill()
    psutil.wait_procs(left, timeout=10)
    shutil.rmtree(folder, ignore_errors=True)


def ray_processes(folder: Path) -> list:
    """Live processes of the Ray instance whose temp folder is `folder`: they inherit RAY_TMPDIR from the driver
    that started it, or (Ray's agents, started with an environment of their own) hold its log files open. Nobody
    else's Ray processes do either; the driver itself (this process) is not counted."""
    import psutil

    found = []
    for process in psutil.process_iter():
        try:
            if (process.pid != os.getpid() and process.status() != psutil.STATUS_ZOMBIE
                    and of_ray_instance(process, folder)):
                found.append(process)
        except (psutil.Error, OSError):
            continue
    return found


def of_ray_instance(process, folder: Path) -> bool:
    """Whether `process` belongs to the Ray instance whose temp folder is `folder` (see `ray_processes`)."""
    if process.environ().get("RAY_TMPDIR") == str(folder):
        return True
    fds = Path(f"/proc/{process.pid}/fd")
    return any(os.readlink(fd).startswith(f"{folder}/") for fd in fds.iterdir())


def ray_left_behind(folder: Path, grace_s: float = 30.0) -> list[str]:
    """Processes of that Ray instance still alive after `grace_s` (shutdown takes a moment to reach them all)."""
    import time

    deadline = time.monotonic() + grace_s
    while (left := ray_processes(folder)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return [" ".join(p.cmdline()) or p.name() for p in left]
class Trigger:
    """A test's switch: armed until disarmed."""

    armed = True

    def disarm(self) -> None:
        self.armed = False


@pytest.fixture
def sigterm_at_second_child(monkeypatch) -> Trigger:
    """SIGTERM to this very process at the second logged step of the second child of a sweep (while armed), from
    inside training, the way `kill` would deliver it."""
    from finetune_lab import training

    original, children, trigger = training.MlflowStepLogger.on_log, [], Trigger()

    def on_log(self, args, state, control, logs=None, **kwargs):
        original(self, args, state, control, logs=logs, **kwargs)
        if self.run_id not in children:
            children.append(self.run_id)
        if trigger.armed and len(children) == 2 and state.global_step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(training.MlflowStepLogger, "on_log", on_log)
    return trigger


@pytest.fixture
def as_member(monkeypatch, tmp_path):
    """Run an entry point's click command in this process with a member's environment (what they export)."""
    from click.testing import CliRunner
    from mlflow.tracking import fluent
    from mlflow.tracking._tracking_service import utils

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(utils, "_tracking_uri", None)  # this process's earlier stores mean nothing here
    monkeypatch.setattr(fluent, "_active_experiment_id", None)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)

    def invoke(entry: str, params: dict, env: dict, experiment: str = "team"):
        for name in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            monkeypatch.delenv(name, raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        args = ["--experiment", experiment]
        for key, value in params.items():
            args += [f"--{key.replace('_', '-')}", str(value)]
        return CliRunner().invoke(entrypoint(entry).main, args)

    return invoke


@pytest.fixture(scope="session")
def team_server():
    """One team's tracking server (`finetune_lab.team.server`: PostgreSQL, proxied artifacts, accounts) for the
    session's tests, each with accounts and experiments of its own; stopped, and whatever it started killed, at the end.
    Its folder is not under pytest's: PostgreSQL runs as another user (when tests run as root) and a later pytest
    session makes pytest's folders private again."""
    import tempfile

    from team_server import TeamServer

    folder = Path(tempfile.mkdtemp(prefix="finetune_lab_team_"))
    server = TeamServer(folder / "server")
    server.data_dir.mkdir()
    try:
        server.start()
        yield server
    finally:
        server.stop()
        server.kill_everything()
        shutil.rmtree(folder, ignore_errors=True)
