"""A team's tracking server for tests: `python -m finetune_lab.team.server` (PostgreSQL from pgserver, proxied
artifacts, basic-auth), or `make server` as docs/team.md starts it, on a free port and a folder of the test's, started
and stopped the way a user does, with accounts made through MLflow's own auth client. Everything it started is found
again (`processes`) to prove it is gone."""

from __future__ import annotations

import contextlib
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil

from support.paths import REPO
from support.processes import command_lines

READY_LINE = "MLflow tracking server on"
START_TIMEOUT_S = 180


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class TeamServer:
    def __init__(self, data_dir: Path, workers: int = 2, make: bool = False):
        self.data_dir, self.make = data_dir, make
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.admin = ("admin", secrets.token_urlsafe(18))
        self.passwords = {self.admin[0]: self.admin[1]}
        self.log = data_dir.parent / f"{data_dir.name}.log"
        self.args = ["--data-dir", str(data_dir), "--port", str(self.port), "--workers", str(workers)]
        """The server's options (SERVER_ARGS of `make server`)."""
        self.process: subprocess.Popen | None = None
        self.postmaster_pid: int | None = None
        self.mlflow_group: int | None = None

    def command(self) -> list[str]:
        if not self.make:
            return [sys.executable, "-m", "finetune_lab.team.server", *self.args]
        # the install step is this test's own environment: taken as done (-o), with its interpreter
        return ["make", "-C", str(REPO), "-o", ".venv/.installed", "server", f"PY={sys.executable}",
                f"SERVER_ARGS={shlex.join(self.args)}"]

    def launch(self) -> tuple[subprocess.Popen, int]:
        """The server's command started in a session of its own, its output appended to the log; returns the
        process and where its output begins in the log."""
        environment = {**os.environ, "MLFLOW_AUTH_ADMIN_PASSWORD": self.admin[1]}
        for name in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            environment.pop(name, None)
        offset = self.log.stat().st_size if self.log.exists() else 0  # a restart appends to the log
        with open(self.log, "a") as log:
            return subprocess.Popen(self.command(), env=environment, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True), offset

    def start(self) -> str:
        """Start it and wait until it serves; returns what this start printed."""
        self.process, offset = self.launch()
        deadline = time.monotonic() + START_TIMEOUT_S
        while READY_LINE not in self.log.read_text()[offset:]:
            assert self.process.poll() is None, f"the server exited: {self.log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"the server did not start: {self.log.read_text()[-3000:]}"
            time.sleep(0.5)
        from pgserver.utils import PostmasterInfo

        self.postmaster_pid = PostmasterInfo.read_from_pgdata(self.data_dir / "postgres").pid
        [mlflow] = [p for p in self.own() if "mlflow" in p.cmdline() and "server" in p.cmdline()]
        self.mlflow_group = os.getpgid(mlflow.pid)
        return self.log.read_text()[offset:]

    def wrapper(self) -> psutil.Process:
        """The `finetune_lab.team.server` process (`make`'s child, when started with make)."""
        started = psutil.Process(self.process.pid)
        if not self.make:
            return started
        [wrapper] = [p for p in started.children() if "finetune_lab.team.server" in p.cmdline()]
        return wrapper

    def stop(self) -> None:
        """SIGTERM, as Ctrl-C or `kill` would; the process group is killed only if that fails (and the test
        asserting `processes() == []` then fails too)."""
        if self.process is None:
            return
        try:
            if self.process.poll() is None:
                self.wrapper().send_signal(signal.SIGTERM)
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.process = None

    def own(self) -> list[psutil.Process]:
        """Live processes this server started: its own and its guard's, mlflow's (and its workers', its process
        group), PostgreSQL's."""
        found = []
        for process in psutil.process_iter():
            try:
                if process.status() == psutil.STATUS_ZOMBIE:
                    continue
                if (str(self.data_dir) in " ".join(process.cmdline())
                        or (self.postmaster_pid is not None and self.postmaster_pid in (process.pid, process.ppid()))
                        or (self.mlflow_group is not None and os.getpgid(process.pid) == self.mlflow_group)):
                    found.append(process)
            except (psutil.Error, ProcessLookupError):
                continue
        return found

    def processes(self) -> list[str]:
        """The command lines of `own`."""
        return command_lines(self.own())

    def kill_everything(self) -> None:
        """The finaliser's last resort: every process group of `own`."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        for process in self.own():
            try:
                os.killpg(os.getpgid(process.pid), signal.SIGKILL)
            except (psutil.Error, ProcessLookupError):
                continue

    # ------------------------------------------------------------------------------------------ accounts
    def add_user(self, username: str) -> dict[str, str]:
        """A new account made by the administrator (as docs/team.md shows); returns the user's environment."""
        password = secrets.token_urlsafe(18)
        with self.as_user(*self.admin):
            from mlflow.server import get_app_client

            get_app_client("basic-auth", tracking_uri=self.url).create_user(username, password)
        self.passwords[username] = password
        return self.env(username)

    def grant(self, username: str, experiment_id: str, permission: str) -> None:
        with self.as_user(*self.admin):
            from mlflow.server import get_app_client

            get_app_client("basic-auth", tracking_uri=self.url).grant_user_permission(
                username, "experiment", experiment_id, permission)

    def env(self, username: str) -> dict[str, str]:
        """What a member sets."""
        return {"MLFLOW_TRACKING_URI": self.url, "MLFLOW_TRACKING_USERNAME": username,
                "MLFLOW_TRACKING_PASSWORD": self.passwords[username]}

    @contextlib.contextmanager
    def as_user(self, username: str, password: str) -> Iterator[None]:
        """MLflow's calls in this process made as `username` (it reads the credentials on every request)."""
        saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
        os.environ.update({"MLFLOW_TRACKING_USERNAME": username, "MLFLOW_TRACKING_PASSWORD": password})
        try:
            yield
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

    def client(self, username: str):
        """An MlflowClient acting as `username` (credentials are read from the environment per request)."""
        from mlflow.tracking import MlflowClient

        return _UserClient(MlflowClient(self.url), self, username)

    def database_dump(self) -> str:
        """Every table of the runs' (and accounts') database, as SQL text."""
        from pgserver._commands import POSTGRES_BIN_PATH
        from pgserver.utils import PostmasterInfo

        uri = PostmasterInfo.read_from_pgdata(self.data_dir / "postgres").get_uri(database="mlflow")
        return subprocess.run([str(POSTGRES_BIN_PATH / "pg_dump"), "--data-only", uri], capture_output=True,
                              text=True, check=True).stdout


class _UserClient:
    """Every call of the wrapped MlflowClient made with one user's credentials."""

    def __init__(self, client, server: TeamServer, username: str):
        self._client, self._server, self._username = client, server, username

    def __getattr__(self, name):
        method = getattr(self._client, name)

        def call(*args, **kwargs):
            with self._server.as_user(self._username, self._server.passwords[self._username]):
                return method(*args, **kwargs)

        return call


@contextlib.contextmanager
def running() -> Iterator[TeamServer]:
    """A started server, stopped and everything it started killed at the end. Its folder is not under pytest's:
    PostgreSQL runs as another user (when tests run as root) and a later pytest session makes pytest's folders
    private again."""
    import shutil
    import tempfile

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
