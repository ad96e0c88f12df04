"""`mlflow run <repo> -e ENTRY --env-manager local`, the way users launch an entry point."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from mlflow.tracking import MlflowClient

from support.paths import REPO
from support.store import create_experiment, runs_of

TIMEOUT_S = 900


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


def run_entry(client: MlflowClient, folder: Path, entry: str, params: dict, experiment: str,
              **env_changes: str | None) -> subprocess.CompletedProcess:
    """`mlflow run` of `entry` from `folder`, its environment changed by `env_changes` (None removes a name)."""
    command, env = mlflow_run_command(client, folder, entry, params, experiment)
    for name, value in env_changes.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return subprocess.run(command, capture_output=True, text=True, cwd=folder, env=env, timeout=TIMEOUT_S)


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
    result = run_entry(client, folder, entry, params, experiment, MLFLOW_TRACKING_URI=uri, MLFLOW_RUN_ID=None)
    return Launched(result, uri, client, folder, experiment)


def invoke_as(monkeypatch, entry: str, params: dict, env: dict, experiment: str):
    """An entry point's click command run in this process with a member's environment (what they export) and
    nothing of anyone else's credentials."""
    from click.testing import CliRunner

    from support.paths import entrypoint

    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    args = ["--experiment", experiment]
    for key, value in params.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return CliRunner().invoke(entrypoint(entry).main, args)
