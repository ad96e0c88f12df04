"""The team's server started the way docs/team.md says a team does (`make server SERVER_ARGS="--host 0.0.0.0
--allowed-hosts NAME,NAME:PORT"`), then killed with SIGKILL: nothing of it keeps listening, and the same command
starts it again with every experiment, account and artifact. A start refuses before PostgreSQL starts, in one line
saying what to do, when a server of its folder is still running or another program holds the port; a stop stops
PostgreSQL whatever pgserver's list of handles says. Nothing in the server's folder is readable by other users."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import requests
from support.team_server import TeamServer

from finetune_lab.cli import INPUT_ERROR_EXIT
from finetune_lab.team import server as server_lib
from finetune_lab.team.server import ServerConfig

pytestmark = pytest.mark.team
NAME = "mlflow.lab.example"
GONE_WITHIN_S = 60


@pytest.fixture
def documented_server():
    """`make server` with --host 0.0.0.0 and the names members use, in a folder of its own (PostgreSQL's user must
    pass through it: not under pytest's private folders)."""
    folder = Path(tempfile.mkdtemp(prefix="finetune_lab_crash_"))
    team = TeamServer(folder / "server", make=True)
    team.args += ["--host", "0.0.0.0", "--allowed-hosts", f"{NAME},{NAME}:{team.port}"]
    try:
        yield team
    finally:
        team.stop()
        team.kill_everything()
        shutil.rmtree(folder, ignore_errors=True)


def listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def gone(team: TeamServer) -> list[str]:
    """What of the server still runs or listens after `GONE_WITHIN_S` (the guard stops it in a few seconds)."""
    deadline = time.monotonic() + GONE_WITHIN_S
    while (team.processes() or listening(team.port)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return team.processes() + ([f"something listens on {team.port}"] if listening(team.port) else [])


def refused_start(team: TeamServer) -> list[str]:
    """A start that is expected to refuse, for bad input: its `error:` lines."""
    process, offset = team.launch()
    process.wait(60)
    output = team.log.read_text()[offset:]
    assert "[Makefile:" in output and f"server] Error {INPUT_ERROR_EXIT}" in output, output[-3000:]
    return [line for line in output.splitlines() if line.startswith("error:")]


def warnings_of(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("warning:")]


def private(data_dir: Path) -> list[str]:
    """Every file and folder in the server's folder that another local user could read or list (PostgreSQL's socket
is a socket's usual 0777: its folder, 0700, is what keeps others out)."""
    open_to_others = []
    top = 0o711 if os.geteuid() == 0 else 0o700  # PostgreSQL's own user passes through (started as root)
    if data_dir.stat().st_mode & 0o777 != top:
        open_to_others.append(f"{data_dir} {oct(data_dir.stat().st_mode & 0o777)}")
    for path in data_dir.rglob("*"):
        mode = path.lstat().st_mode
        if (stat.S_ISREG(mode) or stat.S_ISDIR(mode)) and mode & 0o077:
            open_to_others.append(f"{path} {oct(path.stat().st_mode & 0o777)}")
    return open_to_others


def test_the_documented_server_survives_a_kill_and_refuses_to_start_twice(documented_server, tmp_path):
    team = documented_server
    assert warnings_of(team.start()) == [], "the names members use are given: nothing to warn about"
    # The names members use are answered; others are still refused (MLflow's DNS-rebinding protection).
    url = f"{team.url}/api/2.0/mlflow/experiments/search"
    as_named = requests.get(url, params={"max_results": 1}, headers={"Host": f"{NAME}:{team.port}"}, auth=team.admin)
    assert as_named.status_code == 200, as_named.text
    assert requests.get(url, headers={"Host": "elsewhere.example"}, auth=team.admin).status_code == 403

    # An account, an experiment, a run with an artifact.
    team.add_user("dana")
    as_dana = team.client("dana")
    experiment_id = as_dana.create_experiment("kept")
    run = as_dana.create_run(experiment_id)
    (tmp_path / "notes.txt").write_text("kept across a crash")
    as_dana.log_artifact(run.info.run_id, str(tmp_path / "notes.txt"))
    as_dana.set_terminated(run.info.run_id)
    assert private(team.data_dir) == []

    # SIGKILL of the wrapper: its guard stops MLflow and PostgreSQL.
    killed = team.wrapper()
    killed.send_signal(signal.SIGKILL)
    assert gone(team) == []
    assert "finetune_lab.team.server is gone: stopped the MLflow and PostgreSQL it left running" in team.log.read_text()
    handles = json.loads((team.data_dir / "postgres" / ".handle_pids.json").read_text())
    assert killed.pid in handles, "pgserver still lists the killed process as a handle"
    team.process.wait(30)

    # The same command starts it again, with everything it held.
    team.start()
    assert as_dana.get_experiment_by_name("kept").experiment_id == experiment_id
    assert [r.info.run_id for r in as_dana.search_runs([experiment_id])] == [run.info.run_id]
    again = Path(as_dana.download_artifacts(run.info.run_id, "notes.txt", str(tmp_path / "again")))
    assert again.read_text() == "kept across a crash"
    assert private(team.data_dir) == []

    # The guard killed too: MLflow and PostgreSQL are left running. A start says so before starting anything.
    guard = [p for p in team.wrapper().children() if "guard" in " ".join(p.cmdline())]
    assert len(guard) == 1
    guard[0].kill()
    team.wrapper().kill()
    team.process.wait(30)
    left_postgres = team.postmaster_pid
    assert listening(team.port) and psutil.pid_exists(left_postgres)
    errors = refused_start(team)
    assert len(errors) == 1, errors
    expected = (f"error: data_dir: a server of {team.data_dir} that was killed left MLflow (process group "
                f"{team.mlflow_group}) and PostgreSQL (pid {left_postgres}) running: stop them (`kill -- "
                f"-{team.mlflow_group}; kill {left_postgres}`), then start again")
    assert errors[0] == expected
    # ... and what it says to do is enough
    subprocess.run(["bash", "-c", re.search(r"`(.*)`", errors[0]).group(1)], check=True)
    assert gone(team) == []

    # Another program on the port: refused before PostgreSQL starts.
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # the server's connections may be in TIME_WAIT
        holder.bind(("127.0.0.1", team.port))
        holder.listen()
        errors = refused_start(team)
    assert errors == [f"error: port: {team.port} is in use by {psutil.Process().name()} (pid "
                                      f"{os.getpid()}): stop it, or choose another --port"], errors
    assert server_lib.running_postgres(team.data_dir / "postgres") is None

    # Every interface without the names members use: one line of warning. A stop (SIGTERM) stops everything,
    # PostgreSQL too, though pgserver lists dead processes as its handles.
    team.args = team.args[:team.args.index("--allowed-hosts")]
    assert warnings_of(team.start()) == [server_lib.host_warning(ServerConfig(host="0.0.0.0", port=team.port))]
    assert {killed.pid} <= set(json.loads((team.data_dir / "postgres" / ".handle_pids.json").read_text()))
    team.stop()
    assert gone(team) == []
