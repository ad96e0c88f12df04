"""A team's tracking server in one command (`make server`): `mlflow server` with its runs in PostgreSQL, its artifacts
proxied (`--artifacts-destination`, so clients need no access to the storage) and MLflow's basic-auth app on.

PostgreSQL is the server's own (started from the `pgserver` wheel in `<data_dir>/postgres`, reached over a Unix
socket only), or an existing database given by URL. The administrator's password comes from
MLFLOW_AUTH_ADMIN_PASSWORD or a file the user made (readable by its owner only); without one nothing starts. It
reaches MLflow through the environment, never a command line, file or log. Runs, accounts and artifacts live in
`<data_dir>` (or the database), readable by its owner only: stopping the server (Ctrl-C, SIGTERM) loses nothing, the
next start finds them.

What it starts dies with it, however it dies: a guard process (`guard`) that outlives this one only by the time it
takes stops MLflow and PostgreSQL when this process is gone, SIGKILL included. A start refuses, before PostgreSQL
starts, when a server of `<data_dir>` is still running or another program holds the port, saying what to do.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from finetune_lab import signals
from finetune_lab.errors import InputError, problem, raise_if_any
from finetune_lab.schema import Config, check

PASSWORD_VARIABLE = "MLFLOW_AUTH_ADMIN_PASSWORD"
PASSWORD_FILE = "admin_password"
# MLflow's own rule for account passwords (mlflow.utils.validation._validate_password).
MIN_PASSWORD_CHARS = 12
DATABASE = "mlflow"
DRIVER = "postgresql+psycopg"  # psycopg 3 (the `server` extra), not SQLAlchemy's default psycopg2
START_TIMEOUT_S = 120
STOP_TIMEOUT_S = 30
# Everything the server writes is its owner's alone (artifacts, the auth configuration, the session key).
PRIVATE_UMASK = 0o077
# Started as root, `pgserver` runs PostgreSQL as this system user, which must pass through `<data_dir>`.
POSTGRES_SYSTEM_USER = "pgserver"
PERMISSIONS = ("READ", "EDIT", "MANAGE", "NO_PERMISSIONS")
# This module by name (`python -m` runs it as `__main__`): how its processes and its guard are recognised.
MODULE = "finetune_lab.team.server"


@dataclass
class ServerConfig(Config):
    """A team's MLflow tracking server: runs in PostgreSQL, artifacts proxied, accounts with MLflow's basic-auth."""

    host: str = "127.0.0.1"
    """Interface to listen on (0.0.0.0 = every one; then also set allowed_hosts)."""
    port: int = 5000
    """Port to listen on."""
    data_dir: str = "server"
    """Folder of the server's own PostgreSQL data, artifacts and auth configuration (kept across restarts)."""
    database_url: str = ""
    """An existing PostgreSQL database instead of the server's own: postgresql://user@host/db (password: PGPASSWORD)."""
    admin_username: str = "admin"
    """The administrator account, created on the first start."""
    admin_password_file: str = ""
    """File with the administrator's password (empty = <data_dir>/admin_password); MLFLOW_AUTH_ADMIN_PASSWORD wins."""
    default_permission: str = "READ"
    """What every account may do in an experiment it was not granted (READ, EDIT, MANAGE or NO_PERMISSIONS)."""
    allowed_hosts: str = ""
    """Host names the server answers to, comma list (empty = MLflow's default: localhost and private addresses)."""
    workers: int = 4
    """Server worker processes."""
    auth_cache_s: int = 60
    """Seconds a server worker trusts a checked password (0 = hash it on every request, as MLflow does by default)."""

    def validate(self) -> list[str]:
        problems = super().validate()
        check(problems, self, "host", lambda v: bool(v.strip()), "must not be empty")
        check(problems, self, "port", lambda v: 1 <= v <= 65535, "must be a port number 1..65535")
        check(problems, self, "data_dir", lambda v: bool(v.strip()), "must not be empty")
        check(problems, self, "database_url", lambda v: not v or re.match(r"postgres(ql)?(\+psycopg)?://", v),
              "must be empty (the server's own PostgreSQL) or a postgresql:// URL")
        check(problems, self, "admin_username", lambda v: bool(v.strip()), "must not be empty")
        check(problems, self, "default_permission", lambda v: v in PERMISSIONS,
              f"must be one of {', '.join(PERMISSIONS)}")
        check(problems, self, "workers", lambda v: v >= 1, "must be >= 1")
        check(problems, self, "auth_cache_s", lambda v: v >= 0, "must be >= 0 (0 = no cache)")
        return problems


def password_file(config: ServerConfig) -> Path:
    return Path(config.admin_password_file or Path(config.data_dir) / PASSWORD_FILE).expanduser()


def password_field() -> str:
    """Where the administrator's password comes from, as an error line names it."""
    return PASSWORD_VARIABLE if os.environ.get(PASSWORD_VARIABLE) else "admin_password_file"


def admin_password(config: ServerConfig) -> tuple[str, list[str]]:
    """The administrator's password (from the environment, else its file) and the problems with it."""
    path = password_file(config)
    fix = (f"put one of at least {MIN_PASSWORD_CHARS} characters in {path} (`umask 077; openssl rand -base64 24 "
           f"> {path}`) or set {PASSWORD_VARIABLE}")
    if os.environ.get(PASSWORD_VARIABLE):
        password, source = os.environ[PASSWORD_VARIABLE], PASSWORD_VARIABLE
    elif path.is_file():
        if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            return "", [problem("admin_password_file", f"{path} is readable by others: chmod 600 {path}")]
        password, source = path.read_text(encoding="utf-8").strip(), str(path)
    else:
        return "", [problem("admin_password_file", f"no administrator password (there is no default): {fix}")]
    if len(password) < MIN_PASSWORD_CHARS:
        return "", [problem(password_field(), f"the password in {source} is shorter than {MIN_PASSWORD_CHARS} "
                                              f"characters: {fix}")]
    return password, []


def database_uri(config: ServerConfig, postgres) -> str:
    """The SQLAlchemy URL of the runs' database, with the psycopg 3 driver."""
    url = config.database_url or postgres.get_uri(DATABASE)
    return DRIVER + url[url.index("://"):]


# ---------------------------------------------------------------------------------------------- the data folder
def postgres_runs_as_own_user() -> bool:
    """Started as root, pgserver runs PostgreSQL as a system user of its own."""
    return os.geteuid() == 0


def top_mode(own_postgres: bool) -> int:
    """The mode of `data_dir`: 0711 when the server's own PostgreSQL runs as a user of its own, who must pass
    through it on the way to `data_dir/postgres`; 0700 otherwise."""
    return 0o711 if own_postgres and postgres_runs_as_own_user() else 0o700


def make_private(data_dir: Path, own_postgres: bool) -> None:
    """Nothing in `data_dir` readable by other local users: `data_dir` itself `top_mode`, folders 0700, files 0600
    (also what an older start left readable). PostgreSQL's own folder is left to PostgreSQL (0700, its user's)."""
    data_dir.chmod(top_mode(own_postgres))
    postgres = data_dir / "postgres"
    for folder, subfolders, files in os.walk(data_dir):
        here = Path(folder)
        subfolders[:] = [name for name in subfolders if here / name != postgres]
        for name in subfolders:
            _restrict(here / name, 0o700)
        for name in files:
            _restrict(here / name, 0o600)


def _restrict(path: Path, mode: int) -> None:
    if path.lstat().st_mode & 0o077:
        path.chmod(mode)


def start_postgres(data_dir: Path):
    """The server's own PostgreSQL on `data_dir/postgres` (made on the first start), its `mlflow` database made if
    missing. `stop_postgres` stops it: pgserver's own clean-up stops it only on the last of the handles it lists in
    `.handle_pids.json`, where a killed process's stays forever."""
    import pgserver

    postgres = pgserver.get_server(data_dir / "postgres", cleanup_mode=None)
    # pgserver opened `data_dir` (and the folders above it) to everyone on the way: passing through is enough
    data_dir.chmod(top_mode(own_postgres=True))
    if DATABASE not in postgres.psql("SELECT datname FROM pg_database;"):
        postgres.psql(f"CREATE DATABASE {DATABASE};")
    return postgres


def running_postgres(pgdata: Path) -> int | None:
    """The pid of the PostgreSQL serving `pgdata`, or None."""
    from pgserver.utils import PostmasterInfo

    info = PostmasterInfo.read_from_pgdata(pgdata) if pgdata.is_dir() else None
    return info.pid if info is not None and info.is_running() else None


def stop_postgres(pgdata: Path) -> None:
    """Stop the PostgreSQL serving `pgdata` (fast: open sessions are ended), if one does."""
    from pgserver._commands import pg_ctl

    if running_postgres(pgdata) is not None:
        user = POSTGRES_SYSTEM_USER if postgres_runs_as_own_user() else None
        with contextlib.suppress(subprocess.CalledProcessError):  # it stopped meanwhile
            pg_ctl(["-w", "-m", "fast", "stop"], pgdata=pgdata, user=user)


def auth_config(config: ServerConfig, database: str, data_dir: Path) -> Path:
    """MLflow basic-auth's configuration: accounts in the runs' database, no password in it (the environment
    carries it); readable by its owner only, as a database URL may name a user. A checked password is trusted for
    `auth_cache_s` per worker: hashing it (PBKDF2) on every request costs more than the request itself."""
    path = data_dir / "basic_auth.ini"
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_text(f"[mlflow]\ndefault_permission = {config.default_permission}\ndatabase_uri = {database}\n"
                    f"admin_username = {config.admin_username}\nauth_cache_ttl_seconds = {config.auth_cache_s}\n"
                    "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n", encoding="utf-8")
    return path


def session_key(data_dir: Path) -> str:
    """The key that signs the UI's sessions and CSRF tokens, made on the first start and kept (a new one would log
    every browser out)."""
    import secrets

    path = data_dir / "session_key"
    if not path.is_file():
        path.touch(mode=0o600)
        path.write_text(secrets.token_urlsafe(32), encoding="utf-8")
    return path.read_text(encoding="utf-8").strip()


# ---------------------------------------------------------------------------------------------- addresses
def url_of(config: ServerConfig) -> str:
    """Where this machine reaches the server (the wrapper's own check, the line it prints)."""
    host = "127.0.0.1" if config.host in ("0.0.0.0", "::") else config.host
    return f"http://[{host}]:{config.port}" if ":" in host else f"http://{host}:{config.port}"


def is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def allowed_hosts(config: ServerConfig) -> str:
    """The Host headers MLflow answers to: the names given, and the address of `url_of`, which the wrapper checks
    the server on (MLflow refused its own check otherwise). Empty: MLflow's default (localhost and private
    addresses), which holds `url_of` for a server on every interface or a loopback address."""
    given = [name.strip() for name in config.allowed_hosts.split(",") if name.strip()]
    own = url_of(config).split("://", 1)[1]
    if not given and is_loopback(own.rsplit(":", 1)[0].strip("[]")):
        return ""
    return ",".join(dict.fromkeys([*given, own]))


def host_warning(config: ServerConfig) -> str:
    """One line for a server reachable from other machines that answers to no name of this one ("" otherwise)."""
    if config.allowed_hosts.strip() or is_loopback(config.host):
        return ""
    return (f"warning: --host {config.host} without --allowed-hosts: MLflow answers only requests addressed to "
            f"localhost or a private address (10.*, 172.16-31.*, 192.168.*) and refuses this machine's name and "
            f"public address (403): add --allowed-hosts NAME,NAME:{config.port} with the names members use")


def server_command(config: ServerConfig, artifacts: Path) -> list[str]:
    command = [sys.executable, "-m", "mlflow", "server", "--host", config.host, "--port", str(config.port),
               "--workers", str(config.workers), "--serve-artifacts", "--artifacts-destination", str(artifacts),
               "--app-name", "basic-auth"]
    if allowed_hosts(config):
        command += ["--allowed-hosts", allowed_hosts(config)]
    return command


# ---------------------------------------------------------------------------------------------- before starting
def still_running(data_dir: Path) -> list[str]:
    """One line saying what to do when a server of `data_dir` is still running: another wrapper's (found by its
    MLflow server or its guard), or what a killed one left behind (MLflow, PostgreSQL); nothing otherwise."""
    import psutil

    artifacts, groups, wrappers = str(data_dir / "artifacts"), set(), set()
    for process in psutil.process_iter(["cmdline", "ppid"]):
        command = process.info["cmdline"] or []
        mlflow = "server" in command and "--artifacts-destination" in command and artifacts in command
        guard = str(data_dir) in command and any(f"{MODULE} import guard" in part for part in command)
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if mlflow:
                groups.add(os.getpgid(process.pid))
            if (mlflow or guard) and MODULE in " ".join(psutil.Process(process.info["ppid"]).cmdline()):
                wrappers.add(process.info["ppid"])
    if wrappers:
        pids = " ".join(map(str, sorted(wrappers)))
        return [problem("data_dir", f"{data_dir} is already served by {MODULE} (pid {pids}): use that "
                                    f"server, or stop it (Ctrl-C where it runs, or `kill {pids}`) first")]
    postgres = running_postgres(data_dir / "postgres")
    left = [f"MLflow (process group {group})" for group in sorted(groups)]
    left += [f"PostgreSQL (pid {postgres})"] if postgres else []
    if not left:
        return []
    kills = "; ".join([*(f"kill -- -{group}" for group in sorted(groups)), *([f"kill {postgres}"] if postgres else [])])
    return [problem("data_dir", f"a server of {data_dir} that was killed left {' and '.join(left)} running: stop "
                                f"{'it' if len(left) == 1 else 'them'} (`{kills}`), then start again")]


def port_taken(config: ServerConfig) -> list[str]:
    """One line when `config.port` cannot be listened on (another program holds it; not an address here)."""
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is free
        try:
            probe.bind((config.host, config.port))
        except OSError as error:
            if error.errno != errno.EADDRINUSE:
                return [problem("host", f"cannot listen on {config.host} port {config.port}: {error.strerror}")]
            holder = listener(config.port)
            return [problem("port", f"{config.port} is in use by {holder or 'another program'}: stop it, or choose "
                                    "another --port")]
    return []


def listener(port: int) -> str:
    """The program listening on TCP `port` ("" if not visible to this user)."""
    import psutil

    with contextlib.suppress(psutil.Error):
        for connection in psutil.net_connections(kind="tcp"):
            if connection.status == psutil.CONN_LISTEN and connection.laddr.port == port and connection.pid:
                return f"{psutil.Process(connection.pid).name()} (pid {connection.pid})"
    return ""


# ---------------------------------------------------------------------------------------------- the guard
def guard(data_dir: str) -> None:
    """The guard process's body. Its standard input is a pipe from the wrapper, which writes the process group of
    each server it starts; the pipe's end means the wrapper is gone (it stopped, or it was killed: the kernel closes
    the pipe either way). Then stop what it left: MLflow's process groups, PostgreSQL."""
    groups = [int(line) for line in sys.stdin]
    stopped = ["MLflow"] if any([stop_group(group) for group in groups]) else []  # a list: stop every group
    pgdata = Path(data_dir) / "postgres"
    if running_postgres(pgdata) is not None:
        stop_postgres(pgdata)
        stopped.append("PostgreSQL")
    if stopped:
        print(f"{MODULE} is gone: stopped the {' and '.join(stopped)} it left running", file=sys.stderr,
              flush=True)


@contextlib.contextmanager
def guarded(data_dir: Path) -> Iterator[subprocess.Popen]:
    """A guard process for this wrapper's servers (`guard`), in a session of its own so that the signals meant for
    the wrapper's (Ctrl-C in its terminal, `kill` of its process group) leave it alone; ended with the block."""
    body = f"import sys; from {MODULE} import guard; guard(sys.argv[1])"
    # -W ignore: importing pgserver warns about XDG_RUNTIME_DIR, which the wrapper has said already
    process = subprocess.Popen([sys.executable, "-W", "ignore", "-c", body, str(data_dir)], stdin=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        yield process
    finally:
        process.stdin.close()
        process.wait()


def group_alive(group: int) -> bool:
    """Whether process group `group` has a live (not zombie) member."""
    import psutil

    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if os.getpgid(process.pid) == group and process.status() != psutil.STATUS_ZOMBIE:
                return True
    return False


def stop_group(group: int) -> bool:
    """Stop process group `group` (a server and its workers), politely first; whether it was running."""
    if not group_alive(group):
        return False
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while group_alive(group):
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGKILL)
            break
        time.sleep(0.2)
    return True


def stop(process: subprocess.Popen) -> None:
    """The server and its workers (its own process group)."""
    if process.poll() is None:
        stop_group(process.pid)
    process.wait()


# ---------------------------------------------------------------------------------------------- serving
def wait_until_serving(url: str, process: subprocess.Popen, username: str, password: str) -> None:
    """Until the server answers; then check that the administrator's password is the account's (it is set on
    the first start only: a different one later would be silently ignored by MLflow)."""
    import requests

    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"mlflow server exited with status {process.returncode} (its log is above)")
        try:
            if requests.get(f"{url}/health", timeout=5).ok:
                break
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"mlflow server did not answer on {url} within {START_TIMEOUT_S} s")
        time.sleep(0.5)
    answer = requests.get(f"{url}/api/2.0/mlflow/users/get", params={"username": username},
                          auth=(username, password), timeout=30)
    if answer.status_code == 401:
        raise InputError([problem(password_field(), f"this is not the password of account {username!r} (set on "
                                                    "the server's first start); give that one")])
    answer.raise_for_status()


@contextlib.contextmanager
def private_files() -> Iterator[None]:
    """Files and folders made by this process and its children readable by their owner only."""
    previous = os.umask(PRIVATE_UMASK)
    try:
        yield
    finally:
        os.umask(previous)


def serve(config: ServerConfig) -> None:
    """Start PostgreSQL (unless `database_url`) and the tracking server; serve until SIGTERM / Ctrl-C, then stop
    both. Refuses first, saying what to do, when a server of `data_dir` still runs or the port is taken."""
    problems = config.problems()
    password, password_problems = admin_password(config)
    raise_if_any([*problems, *password_problems])
    data_dir = Path(config.data_dir).expanduser().resolve()
    raise_if_any(still_running(data_dir) or port_taken(config))  # a server left running holds the port too
    if host_warning(config):
        print(host_warning(config), file=sys.stderr, flush=True)
    artifacts = data_dir / "artifacts"
    with private_files(), signals.terminating(), guarded(data_dir) as guard_process:
        artifacts.mkdir(parents=True, exist_ok=True)
        make_private(data_dir, own_postgres=not config.database_url)
        postgres = None
        try:
            postgres = None if config.database_url else start_postgres(data_dir)
            database = database_uri(config, postgres)
            environment = {**os.environ, "MLFLOW_BACKEND_STORE_URI": database, PASSWORD_VARIABLE: password,
                           "MLFLOW_FLASK_SERVER_SECRET_KEY": session_key(data_dir),
                           # MLflow's background jobs serve GenAI features (trace scoring, archival): 8 idle
                           # processes here, unless asked for
                           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": os.environ.get(
                               "MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false"),
                           "MLFLOW_AUTH_CONFIG_PATH": str(auth_config(config, database, data_dir))}
            process = subprocess.Popen(server_command(config, artifacts), env=environment, start_new_session=True)
            guard_process.stdin.write(f"{process.pid}\n")
            guard_process.stdin.flush()
            try:
                wait_until_serving(url_of(config), process, config.admin_username, password)
                where = "its own PostgreSQL in " + str(data_dir / "postgres") if postgres else "the given PostgreSQL"
                print(f"MLflow tracking server on {url_of(config)}: runs in {where}, artifacts in {artifacts}, "
                      f"accounts on (administrator: {config.admin_username}). Ctrl-C stops it.", flush=True)
                process.wait()
                raise RuntimeError(f"mlflow server exited with status {process.returncode} (its log is above)")
            finally:
                stop(process)
        except signals.Terminated:
            print("Tracking server stopped; everything it holds is kept for the next start.", flush=True)
        finally:
            if postgres is not None:
                stop_postgres(data_dir / "postgres")


def main() -> None:
    from finetune_lab.cli import command

    command(ServerConfig, f"{MODULE}:serve", "server", records_runs=False)()


if __name__ == "__main__":
    main()
