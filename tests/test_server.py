"""`finetune_lab.server` refuses to start without an administrator's password of its own, keeps it off every command
line and file it writes, and starts MLflow with accounts and proxied artifacts on 127.0.0.1 unless told otherwise."""

from __future__ import annotations

import os

import pytest
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import PERMISSION_DENIED, UNAUTHENTICATED

from finetune_lab import server, tracking
from finetune_lab.config import ServerConfig, from_strings
from finetune_lab.errors import InputError

PASSWORD = "a-long-enough-password"


@pytest.fixture
def no_password_in_environment(monkeypatch):
    monkeypatch.delenv(server.PASSWORD_VARIABLE, raising=False)


def test_no_password_no_server(tmp_path, no_password_in_environment, monkeypatch):
    config = ServerConfig(data_dir=str(tmp_path))
    with pytest.raises(InputError) as refused:
        server.serve(config)
    [line] = refused.value.problems
    assert line.startswith("admin_password_file: no administrator password (there is no default)")
    assert str(tmp_path / "admin_password") in line and server.PASSWORD_VARIABLE in line
    assert not (tmp_path / "postgres").exists(), "nothing started"


def test_the_password_file_must_be_private_and_long_enough(tmp_path, no_password_in_environment):
    path = tmp_path / "admin_password"
    path.write_text(PASSWORD + "\n")
    path.chmod(0o644)
    config = ServerConfig(data_dir=str(tmp_path))
    assert server.admin_password(config) == ("", [f"admin_password_file: {path} is readable by others: chmod 600 "
                                                  f"{path}"])
    path.chmod(0o600)
    assert server.admin_password(config) == (PASSWORD, [])
    path.write_text("short")
    [line] = server.admin_password(config)[1]
    assert "shorter than 12 characters" in line


def test_the_environment_wins_over_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv(server.PASSWORD_VARIABLE, PASSWORD + "-from-env")
    assert server.admin_password(ServerConfig(data_dir=str(tmp_path))) == (PASSWORD + "-from-env", [])


def test_mlflow_is_started_with_accounts_and_proxied_artifacts_on_localhost(tmp_path):
    command = server.server_command(ServerConfig(), tmp_path / "artifacts")
    assert command[command.index("--host") + 1] == "127.0.0.1"
    assert command[command.index("--app-name") + 1] == "basic-auth"
    assert command[command.index("--artifacts-destination") + 1] == str(tmp_path / "artifacts")
    assert "--serve-artifacts" in command


def test_the_auth_configuration_is_private_and_holds_no_password(tmp_path):
    config = ServerConfig(default_permission="NO_PERMISSIONS")
    path = server.auth_config(config, "postgresql+psycopg://u@h/mlflow", tmp_path)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    text = path.read_text()
    assert "default_permission = NO_PERMISSIONS" in text and "database_uri = postgresql+psycopg://u@h/mlflow" in text
    assert "admin_password" not in text and "auth_cache_ttl_seconds = 60" in text


def test_a_database_url_gets_the_psycopg_driver():
    config = ServerConfig(database_url="postgresql://lab@db.example:5432/mlflow")
    assert server.database_uri(config, None) == "postgresql+psycopg://lab@db.example:5432/mlflow"


def test_server_config_problems():
    config = from_strings(ServerConfig, {"port": "0", "default_permission": "WRITE", "database_url": "mysql://x",
                                         "workers": "0"})
    assert [line.split(":")[0] for line in config.problems()] == ["port", "database_url", "default_permission",
                                                                  "workers"]


@pytest.mark.parametrize(("code", "expected"), [
    (UNAUTHENTICATED, "MLFLOW_TRACKING_USERNAME: the tracking server http://lab:5000 refuses user 'bob' with this "
                        "MLFLOW_TRACKING_PASSWORD"),
    (PERMISSION_DENIED, "experiment: user 'bob' may not write into experiment 'shared' on http://lab:5000"),
])
def test_refused_credentials_are_one_line_for_the_user(code, expected, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "bob")
    monkeypatch.setattr(mlflow, "get_tracking_uri", lambda: "http://lab:5000")
    with pytest.raises(InputError) as refused, tracking._refused_access("shared"):
        raise MlflowException("API request failed", error_code=code)
    [line] = refused.value.problems
    assert line.startswith(expected)


def test_a_worker_gets_the_drivers_credentials(monkeypatch):
    import mlflow

    monkeypatch.setattr(mlflow, "set_tracking_uri", lambda uri: None)  # this process's store stays the tests'
    monkeypatch.setattr(mlflow, "enable_system_metrics_logging", lambda: None)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    monkeypatch.delenv("MLFLOW_TRACKING_TOKEN", raising=False)
    handed = tracking.credentials()
    assert handed == {"MLFLOW_TRACKING_USERNAME": "alice", "MLFLOW_TRACKING_PASSWORD": PASSWORD}
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME")
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
    tracking.configure_worker("http://lab:5000", handed)
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == PASSWORD


def test_a_password_other_than_the_accounts_is_refused(monkeypatch):
    """MLflow sets the administrator's password on the first start only and ignores it later: a start with another
    one must not look as if it had changed it."""
    import requests

    class Answer:
        def __init__(self, status: int):
            self.status_code, self.ok = status, status == 200

        def raise_for_status(self):
            pass

    asked = []

    def get(url, **kwargs):
        asked.append((url.rsplit("/", 1)[-1], kwargs.get("auth")))
        return Answer(200 if url.endswith("/health") else 401)

    class Serving:
        def poll(self):
            return None

    monkeypatch.setattr(requests, "get", get)
    with pytest.raises(InputError) as refused:
        server.wait_until_serving("http://127.0.0.1:5000", Serving(), "admin", PASSWORD)
    assert refused.value.problems == ["admin_password_file: this is not the password of account 'admin' (set on "
                                      "the server's first start); give that one"]
    assert asked == [("health", None), ("get", ("admin", PASSWORD))]
