"""A tracking server that goes away for longer than MLflow's retries while a sweep's child trains: the child finishes
training, its adapter is kept on local disk, the user gets one line saying where and how to resume; with the
server back, `resume` records the kept child without training it again, trains the rest, and closes what the
outage left RUNNING."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient
from support import tiers
from support.paths import entrypoint
from support.store import children_of, load_table

from finetune_lab import training
from finetune_lab.contract import RECOVERED_TAG

ARGS = ["--model", "tiny", "--dataset", "sample_chat", "--ranks", "2,4", "--seeds", "1", "--max-steps", "6",
        "--batch-size", "8", "--max-length", "48", "--learning-rate", "1e-2", "--experiment", "outage"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """`mlflow server` on 127.0.0.1 over a sqlite store and an artifact folder that outlive it."""

    def __init__(self, root: Path, empty_store: Path):
        self.root, self.port = root, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        shutil.copy(empty_store, root / "server.db")
        self.process = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{self.root / 'server.db'}",
             "--artifacts-destination", str(self.root / "artifacts"), "--host", "127.0.0.1", "--port",
             str(self.port), "--workers", "1"],
            stdout=open(self.root / "server.log", "a"), stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"{self.uri}/health", timeout=1)
                return
            time.sleep(0.3)
        raise AssertionError("the mlflow server did not start: " + (self.root / "server.log").read_text()[-2000:])

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=60)
        self.process = None


@pytest.fixture
def server(request, tmp_path, empty_store, monkeypatch):
    tiers.require_slow(request, "`mlflow server`")
    running = Server(tmp_path, empty_store)
    running.start()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", running.uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    # "Longer than the retries" without waiting minutes: no retries (the code under test fails fast the same way
    # once the default retries are spent). monkeypatch also restores what the sweep sets while offline.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "120")
    yield running
    running.stop()


@pytest.mark.slow  # starts `mlflow server`, stops it mid-sweep and starts it again
def test_an_outage_keeps_the_trained_adapter_and_resume_records_it(server, monkeypatch):
    original, children = training.MlflowStepLogger.on_log, []

    def server_dies_at_step_2_of_the_first_child(self, args, state, control, logs=None, **kwargs):
        original(self, args, state, control, logs=logs, **kwargs)
        if self.run_id not in children:
            children.append(self.run_id)
        if len(children) == 1 and state.global_step == 2:
            server.stop()

    monkeypatch.setattr(training.MlflowStepLogger, "on_log", server_dies_at_step_2_of_the_first_child)
    outage = CliRunner().invoke(entrypoint("lora_sweep").main, ARGS)
    assert outage.exit_code == 1, outage.output
    errors = re.findall(r"error: .*", outage.output)  # a progress bar may share the line
    assert len(errors) == 1 and "Traceback" not in outage.output
    parent_id = errors[0].split("-P resume=")[1].split("`")[0]
    # Where the README says: <FINETUNE_LAB_CACHE, by default ~/.cache/finetune_lab>/pending/<parent>/<child>
    kept = Path(os.environ["FINETUNE_LAB_CACHE"]) / "pending" / parent_id / "r2-seed1"
    assert f"r2-seed1 finished training; its adapter is kept in {kept}" in errors[0]
    assert f"the tracking server {server.uri} is unreachable" in errors[0]
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json"} <= {
        p.name for p in (kept / "adapter").iterdir()}
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "120", "the fail-fast settings end with the invocation"

    server.start()
    client = MlflowClient(server.uri)
    assert client.get_run(parent_id).info.status == "RUNNING", "the outage strands the runs"
    trained_again = []
    monkeypatch.setattr(training.MlflowStepLogger, "on_log",
                        lambda self, *a, **k: trained_again.append(self.run_id) or original(self, *a, **k))
    resumed = CliRunner().invoke(entrypoint("lora_sweep").main, [*ARGS, "--resume", parent_id])
    assert resumed.exit_code == 0, resumed.output

    experiment = client.get_experiment_by_name("outage").experiment_id
    runs = client.search_runs([experiment])
    assert not [r for r in runs if r.info.status == "RUNNING"], "resume closes what the outage left RUNNING"
    assert client.get_run(parent_id).info.status == "FINISHED"
    children = {(r.data.tags["mlflow.runName"], r.info.status): r for r in children_of(runs, parent_id)}
    assert sorted(children) == [("r2-seed1", "FINISHED"), ("r2-seed1", "KILLED"), ("r4-seed1", "FINISHED")]
    assert "closed by run" in children[("r2-seed1", "KILLED")].data.tags["error"]
    recorded = children[("r2-seed1", "FINISHED")]
    assert recorded.data.tags[RECOVERED_TAG] == str(kept) and not kept.exists()
    assert set(trained_again) == {children[("r4-seed1", "FINISHED")].info.run_id}, "the kept child is not retrained"
    # The recorded child holds what training measured: every logged step, the metrics, the adapter.
    assert [m.step for m in client.get_metric_history(recorded.info.run_id, "train_loss")] == list(range(1, 7))
    assert "eval_loss" in recorded.data.metrics and "grad_norm" in recorded.data.metrics
    weights = {Path(a.path).name: a.file_size for a in client.list_artifacts(recorded.info.run_id, "adapter")}
    assert weights["adapter_model.safetensors"] == recorded.data.metrics["adapter_size_bytes"]
    mlflow.set_tracking_uri(server.uri)
    table = load_table(client, parent_id, "comparison_table.json", Path(server.root))
    assert list(zip(table["rank"], table["status"], table["run_id"])) == [
        (2, "FINISHED", recorded.info.run_id), (4, "FINISHED", children[("r4-seed1", "FINISHED")].info.run_id)]
