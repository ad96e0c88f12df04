"""`finetune_lab.team.server` refuses to start without an administrator's password of its own, keeps it off every
command line and file it writes, and starts MLflow with accounts and proxied artifacts on 127.0.0.1 unless told
otherwise."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import PERMISSION_DENIED, UNAUTHENTICATED

from finetune_lab import tracking
from finetune_lab.errors import InputError
from finetune_lab.schema import from_strings
from finetune_lab.team import server
from finetune_lab.team.server import ServerConfig

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


def test_the_password_error_names_where_the_password_came_from(tmp_path, monkeypatch):
    monkeypatch.setenv(server.PASSWORD_VARIABLE, "short")
    [line] = server.admin_password(ServerConfig(data_dir=str(tmp_path)))[1]
    assert line.startswith(f"{server.PASSWORD_VARIABLE}: the password in {server.PASSWORD_VARIABLE} is shorter")
    monkeypatch.delenv(server.PASSWORD_VARIABLE)
    (tmp_path / "admin_password").write_text("short")
    (tmp_path / "admin_password").chmod(0o600)
    [line] = server.admin_password(ServerConfig(data_dir=str(tmp_path)))[1]
    assert line.startswith(f"admin_password_file: the password in {tmp_path / 'admin_password'} is shorter")


def test_the_server_answers_the_names_given_and_its_own_check():
    """MLflow refuses a Host header outside --allowed-hosts: the address the wrapper checks the server on is added
    to the names given (the documented team command never started without it)."""
    documented = ServerConfig(host="0.0.0.0", port=5000, allowed_hosts="mlflow.lab.example,mlflow.lab.example:5000")
    assert server.url_of(documented) == "http://127.0.0.1:5000"
    assert server.allowed_hosts(documented) == "mlflow.lab.example,mlflow.lab.example:5000,127.0.0.1:5000"
    command = server.server_command(documented, Path("artifacts"))
    assert command[command.index("--allowed-hosts") + 1] == server.allowed_hosts(documented)
    # no names: MLflow's default (localhost and private addresses) holds the loopback check ...
    assert "--allowed-hosts" not in server.server_command(ServerConfig(host="0.0.0.0"), Path("artifacts"))
    assert server.allowed_hosts(ServerConfig()) == ""
    # ... not a public address the server listens on alone
    assert server.allowed_hosts(ServerConfig(host="203.0.113.7", port=5000)) == "203.0.113.7:5000"
    assert server.allowed_hosts(ServerConfig(host="::1", port=5000, allowed_hosts="a")) == "a,[::1]:5000"


@pytest.mark.parametrize(("host", "names", "warned"), [("0.0.0.0", "", True), ("::", "", True),
                                                        ("203.0.113.7", "", True), ("0.0.0.0", "lab", False),
                                                        ("127.0.0.1", "", False), ("localhost", "", False)])
def test_a_server_open_to_other_machines_without_names_warns_in_one_line(host, names, warned):
    warning = server.host_warning(ServerConfig(host=host, port=5001, allowed_hosts=names))
    assert bool(warning) == warned
    if warned:
        assert "\n" not in warning and warning.startswith(f"warning: --host {host} without --allowed-hosts")
        assert warning.endswith("add --allowed-hosts NAME,NAME:5001 with the names members use")


def test_a_taken_port_is_refused_before_anything_starts(tmp_path, monkeypatch):
    monkeypatch.setenv(server.PASSWORD_VARIABLE, PASSWORD)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(InputError) as refused:
            server.serve(ServerConfig(data_dir=str(tmp_path / "server"), port=port, host="0.0.0.0"))
    assert refused.value.problems == [f"port: {port} is in use by {psutil.Process().name()} (pid {os.getpid()}): "
                                      "stop it, or choose another --port"]
    assert not (tmp_path / "server").exists(), "nothing started, nothing made"


def test_a_host_of_another_machine_is_refused(tmp_path):
    [line] = server.port_taken(ServerConfig(host="203.0.113.7", port=5000))
    assert line.startswith("host: cannot listen on 203.0.113.7 port 5000: ")


FAKE_MLFLOW = "import time; time.sleep(120)"
# A process whose command line names finetune_lab.team.server, starting a child as the wrapper does (the child's
# arguments in FAKE_CHILD: in its own command line they would make it look like an MLflow server itself).
FAKE_WRAPPER = ("import json, os, subprocess, sys, time; subprocess.Popen([sys.executable, '-c', "
                "*json.loads(os.environ['FAKE_CHILD'])], start_new_session=True); time.sleep(120)")


def test_a_server_left_running_is_named_with_what_to_do(tmp_path):
    """A real process with the command line of an MLflow server of the folder, whose wrapper is gone."""
    artifacts = str(tmp_path / "artifacts")
    left = subprocess.Popen([sys.executable, "-c", FAKE_MLFLOW, "server", "--artifacts-destination", artifacts],
                            start_new_session=True)
    try:
        assert server.still_running(tmp_path) == [
            f"data_dir: a server of {tmp_path} that was killed left MLflow (process group {left.pid}) running: stop "
            f"it (`kill -- -{left.pid}`), then start again"]
        subprocess.run(["bash", "-c", f"kill -- -{left.pid}"], check=True)
        left.wait(10)
        assert server.still_running(tmp_path) == []
    finally:
        left.kill()


@pytest.mark.parametrize("child", [
    [FAKE_MLFLOW, "server", "--artifacts-destination", "{data_dir}/artifacts"],  # its MLflow server
    [f"{FAKE_MLFLOW}  # from finetune_lab.team.server import guard", "{data_dir}"],  # its guard, before MLflow starts
], ids=["mlflow", "guard"])
def test_a_server_already_running_is_named(tmp_path, child):
    child = json.dumps([part.format(data_dir=tmp_path) for part in child])
    wrapper = subprocess.Popen([sys.executable, "-c", FAKE_WRAPPER, "finetune_lab.team.server"],
                               env={**os.environ, "FAKE_CHILD": child})
    try:
        deadline = time.monotonic() + 30
        while not (found := server.still_running(tmp_path)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert found == [f"data_dir: {tmp_path} is already served by finetune_lab.team.server (pid {wrapper.pid}): "
                         f"use that server, or stop it (Ctrl-C where it runs, or `kill {wrapper.pid}`) first"]
    finally:
        for process in psutil.Process(wrapper.pid).children():
            os.killpg(process.pid, signal.SIGKILL)
        wrapper.kill()
        wrapper.wait()


def test_nothing_in_the_servers_folder_is_readable_by_others(tmp_path):
    """Also what an older start left readable; PostgreSQL's folder is PostgreSQL's."""
    (tmp_path / "artifacts" / "1" / "run").mkdir(parents=True, mode=0o755)
    (tmp_path / "artifacts" / "1" / "run" / "model.bin").write_bytes(b"weights")
    (tmp_path / "artifacts" / "1" / "run" / "model.bin").chmod(0o644)
    (tmp_path / "postgres").mkdir(mode=0o750)
    (tmp_path / "postgres" / "PG_VERSION").write_text("16")
    (tmp_path / "postgres" / "PG_VERSION").chmod(0o640)
    for folder in (tmp_path / "artifacts", tmp_path / "artifacts" / "1"):
        folder.chmod(0o755)
    server.make_private(tmp_path, own_postgres=True)
    modes = {str(p.relative_to(tmp_path)): oct(p.stat().st_mode & 0o777) for p in tmp_path.rglob("*")}
    assert oct(tmp_path.stat().st_mode & 0o777) == ("0o711" if os.geteuid() == 0 else "0o700")
    assert modes == {"artifacts": "0o700", "artifacts/1": "0o700", "artifacts/1/run": "0o700",
                     "artifacts/1/run/model.bin": "0o600", "postgres": "0o750", "postgres/PG_VERSION": "0o640"}
    server.make_private(tmp_path, own_postgres=False)
    assert oct(tmp_path.stat().st_mode & 0o777) == "0o700"


def test_a_server_failure_is_one_line_without_a_run(monkeypatch):
    """The tracking server has no run to keep a traceback in: its error line does not send the user to one."""
    from click.testing import CliRunner

    from finetune_lab.cli import command

    def fail(config):
        raise RuntimeError("mlflow server exited with status 1 (its log is above)")

    monkeypatch.setattr(server, "serve", fail)
    outcome = CliRunner().invoke(command(ServerConfig, "finetune_lab.team.server:serve", "server", records_runs=False))
    assert outcome.exit_code == 1
    [line] = [line for line in outcome.output.splitlines() if line.startswith("error:")]
    assert line.startswith("error: RuntimeError: mlflow server exited with status 1") and "failed run" not in line
