"""A team's tracking server in one command (`make server`): `mlflow server` with its runs in PostgreSQL, its artifacts
proxied (`--artifacts-destination`, so clients need no access to the storage) and MLflow's basic-auth app on.

PostgreSQL is the server's own (started from the `pgserver` wheel in `<data_dir>/postgres`, reached over a Unix
socket only), or an existing database given by URL. The administrator's password comes from
MLFLOW_AUTH_ADMIN_PASSWORD or a file the user made (readable by its owner only); without one nothing starts. It
reaches MLflow through the environment, never a command line, file or log. Runs, accounts and artifacts live in
`<data_dir>` (or the database): stopping the server (Ctrl-C, SIGTERM) loses nothing, the next start finds them.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

from finetune_lab import signals
from finetune_lab.config import ServerConfig
from finetune_lab.errors import InputError, problem, raise_if_any

PASSWORD_VARIABLE = "MLFLOW_AUTH_ADMIN_PASSWORD"
PASSWORD_FILE = "admin_password"
# MLflow's own rule for account passwords (mlflow.utils.validation._validate_password).
MIN_PASSWORD_CHARS = 12
DATABASE = "mlflow"
DRIVER = "postgresql+psycopg"  # psycopg 3 (the `server` extra), not SQLAlchemy's default psycopg2
START_TIMEOUT_S = 120
STOP_TIMEOUT_S = 30


def password_file(config: ServerConfig) -> Path:
    return Path(config.admin_password_file or Path(config.data_dir) / PASSWORD_FILE).expanduser()


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
        return "", [problem("admin_password_file", f"the password in {source} is shorter than {MIN_PASSWORD_CHARS} "
                                                   f"characters: {fix}")]
    return password, []


def database_uri(config: ServerConfig, postgres) -> str:
    """The SQLAlchemy URL of the runs' database, with the psycopg 3 driver."""
    url = config.database_url or postgres.get_uri(DATABASE)
    return DRIVER + url[url.index("://"):]


def start_postgres(data_dir: Path):
    """The server's own PostgreSQL on `data_dir/postgres` (made on the first start), its `mlflow` database made if
    missing; stopped when this process exits."""
    import pgserver

    postgres = pgserver.get_server(data_dir / "postgres", cleanup_mode="stop")
    if DATABASE not in postgres.psql("SELECT datname FROM pg_database;"):
        postgres.psql(f"CREATE DATABASE {DATABASE};")
    return postgres


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


def server_command(config: ServerConfig, artifacts: Path) -> list[str]:
    command = [sys.executable, "-m", "mlflow", "server", "--host", config.host, "--port", str(config.port),
               "--workers", str(config.workers), "--serve-artifacts", "--artifacts-destination", str(artifacts),
               "--app-name", "basic-auth"]
    if config.allowed_hosts:
        command += ["--allowed-hosts", config.allowed_hosts]
    return command


def url_of(config: ServerConfig) -> str:
    host = "127.0.0.1" if config.host in ("0.0.0.0", "::") else config.host
    return f"http://{host}:{config.port}"


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
        raise InputError([problem("admin_password_file", f"this is not the password of account {username!r} "
                                                         "(set on the server's first start); give that one")])
    answer.raise_for_status()


def stop(process: subprocess.Popen) -> None:
    """The server and its workers (its own process group), politely first."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def serve(config: ServerConfig) -> None:
    """Start PostgreSQL (unless `database_url`) and the tracking server; serve until SIGTERM / Ctrl-C, then stop
    both."""
    problems = config.problems()
    password, password_problems = admin_password(config)
    raise_if_any([*problems, *password_problems])
    data_dir = Path(config.data_dir).expanduser().resolve()
    artifacts = data_dir / "artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    postgres = None
    with signals.terminating():
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
                postgres.cleanup()


def main() -> None:
    from finetune_lab.cli import command

    command(ServerConfig, "finetune_lab.server:serve", "server")()


if __name__ == "__main__":
    main()
