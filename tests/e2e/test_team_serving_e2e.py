"""The champion served the way a deployer serves it: `mlflow models serve -m models:/NAME@champion --env-manager uv`,
the model pulled from the team's server with a member's credentials, in an environment uv builds from the model's
own requirements alone (no finetune-lab, no project venv). `/invocations` answers what the registered model
predicts in this process: labels and probabilities from a classifier, a generated reply from an adapter."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import mlflow
import psutil
import pytest
import requests
from support.team_server import free_port

from finetune_lab import registry

# On a team's server of its own (the `team_server` fixture on another worker): building the serving environments is
# the longest of the team's tests, and the worker holding the others would run it after them.
pytestmark = [pytest.mark.team, pytest.mark.xdist_group("team_serving")]

PROMPT = "Hello, how are you?"
REVIEWS = ["a wonderful, moving film", "dull and far too long"]
START_TIMEOUT_S = 600  # a new machine downloads the environment's packages first
# What a deployer's `pip config list` may say, and the uv setting that says the same (uv reads no pip config).
UV_OF_PIP = {"index-url": "UV_DEFAULT_INDEX", "extra-index-url": "UV_EXTRA_INDEX_URL", "find-links": "UV_FIND_LINKS",
             "constraint": "UV_CONSTRAINT", "cert": "SSL_CERT_FILE"}
PIP_SCOPES = (":env:", "install", "global")  # pip's precedence: its environment variables, then the config files


def uv_settings_of_pip() -> dict[str, str]:
    """The package sources pip on this machine is configured with, as uv settings: built from the default index
    alone, the environment would resolve `torch==...` to its multi-GB CUDA build where pip is set up for another.
    pip takes the best version from all its indexes; uv, by default, only from the first that has the package."""
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                            check=True).stdout.splitlines()
    found = {}
    for line in listed:
        key, _, value = line.partition("=")
        scope, _, name = key.rpartition(".")
        if name in UV_OF_PIP and scope in PIP_SCOPES:
            found.setdefault(name, []).append((PIP_SCOPES.index(scope), value.strip().strip("'\"")))
    settings = {UV_OF_PIP[name]: min(values)[1] for name, values in found.items()}
    if "UV_FIND_LINKS" in settings:
        settings["UV_FIND_LINKS"] = ",".join(settings["UV_FIND_LINKS"].split())  # uv: a comma-separated list
    if {"UV_EXTRA_INDEX_URL", "UV_FIND_LINKS"} & settings.keys():
        settings["UV_INDEX_STRATEGY"] = "unsafe-best-match"
    return settings


REGISTRATIONS = {
    "served-classifier": ("classify", {"model": "tiny", "dataset": "sample", "max_steps": 2, "batch_size": 8,
                                       "max_length": 32}),
    # enough steps for the tiny model's greedy reply not to be empty
    "served-adapter": ("lora_sweep", {"model": "tiny", "dataset": "sample_chat", "ranks": "8", "seeds": "1",
                                      "max_steps": 12, "learning_rate": 1e-2, "batch_size": 8, "max_length": 48}),
}


@contextlib.contextmanager
def serving(names: list[str], member: dict[str, str]) -> Iterator[dict[str, tuple[int, Path]]]:
    """`mlflow models serve --env-manager uv` of each model's champion at once (uv builds their environments from
    one cache), as `member`; yields each one's port and the environment it runs in."""
    envs = Path(tempfile.mkdtemp(prefix="finetune_lab_envs_"))
    bin_dir = str(Path(sys.executable).parent)  # uv and mlflow, as `make install` put them
    environment = {name: value for name, value in os.environ.items()
                   if not name.startswith(("MLFLOW_", "UV_", "PYTHON", "VIRTUAL_ENV"))}
    # the model's Python is the one that logged it, this one: never a download
    environment.update(member, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", MLFLOW_ENV_ROOT=str(envs),
                       UV_PYTHON_DOWNLOADS="never", **uv_settings_of_pip())
    servers = {}
    try:
        for name in names:
            port, log = free_port(), envs.parent / f"{envs.name}-{name}.log"
            with open(log, "w") as output:
                servers[name] = (subprocess.Popen(
                    [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{name}@{registry.CHAMPION}",
                     "--env-manager", "uv", "--port", str(port)], env=environment, stdout=output,
                    stderr=subprocess.STDOUT, start_new_session=True), port, log)
        deadline = time.monotonic() + START_TIMEOUT_S
        for process, port, log in servers.values():
            while not answers(port):
                assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-5000:]
                time.sleep(1)
        yield {name: (port, environment_of(process, envs)) for name, (process, port, _) in servers.items()}
    finally:
        for process, _, log in servers.values():
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(60)
            log.unlink()
        shutil.rmtree(envs, ignore_errors=True)


def answers(port: int) -> bool:
    try:
        return requests.get(f"http://127.0.0.1:{port}/ping", timeout=5).ok
    except requests.RequestException:
        return False


def environment_of(process: subprocess.Popen, envs: Path) -> Path:
    """The virtual environment the model's server runs in (MLflow starts it there, as its child; its executable is
    the environment's link to the base interpreter, so the command line says where)."""
    [python] = [Path(p.cmdline()[0]) for p in psutil.Process(process.pid).children(recursive=True)
                if envs in Path(p.cmdline()[0]).parents]
    return python.parent.parent


def invoke(port: int, body: dict) -> list:
    answer = requests.post(f"http://127.0.0.1:{port}/invocations", json=body, timeout=120)
    assert answer.ok, answer.text
    return answer.json()["predictions"]


def test_the_champions_serve_from_environments_of_their_own(team_server, as_member):
    ivan, june = team_server.add_user("ivan"), team_server.add_user("june")  # june only reads, as a deployer
    for name, (entry, params) in REGISTRATIONS.items():
        result = as_member(entry, {**params, "register_as": name}, ivan, "served")
        assert result.exit_code == 0, result.output[-3000:]

    with team_server.as_user("june", team_server.passwords["june"]):
        classifier = mlflow.pyfunc.load_model("models:/served-classifier@champion").predict(REVIEWS)
        [expected_reply] = mlflow.pyfunc.load_model("models:/served-adapter@champion").predict(
            [PROMPT], params={"max_new_tokens": 12})
    with serving(list(REGISTRATIONS), june) as served:
        labels = invoke(served["served-classifier"][0], {"inputs": REVIEWS})
        [reply] = invoke(served["served-adapter"][0], {"inputs": [PROMPT], "params": {"max_new_tokens": 12}})
        for name, (_, environment) in served.items():
            assert Path(sys.prefix) not in (environment, *environment.parents), "not the project's environment"
            python = str(environment / "bin" / "python")
            assert subprocess.run([python, "-c", "import finetune_lab"], capture_output=True).returncode != 0
            listed = subprocess.run([str(Path(sys.executable).parent / "uv"), "pip", "list", "--python", python],
                                    capture_output=True, text=True, check=True).stdout.split()
            assert "finetune-lab" not in listed and {"mlflow", "torch", "transformers"} <= set(listed)
            assert ("peft" in listed) == (name == "served-adapter"), "each model brings what it imports, no more"

    # The classifier: a label, its name and the probabilities, as the model predicts in the project's environment.
    assert [p["label"] for p in labels] == list(classifier["label"])
    assert [p["label_name"] for p in labels] == list(classifier["label_name"])
    for answer, (_, row) in zip(labels, classifier.iterrows()):
        assert answer["prob_0"] + answer["prob_1"] == pytest.approx(1.0)
        assert [answer["prob_0"], answer["prob_1"]] == pytest.approx([row["prob_0"], row["prob_1"]], abs=1e-6)
        assert answer["score"] == max(answer["prob_0"], answer["prob_1"])
    # The adapter: the same greedy reply.
    assert reply and reply == expected_reply
