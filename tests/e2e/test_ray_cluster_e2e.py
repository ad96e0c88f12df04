"""A real Ray cluster of two nodes (`ray start --head`, then `ray start --address` for a worker node) with token
authentication, as docs/team.md starts one: `lora_sweep -P executor=ray` with RAY_ADDRESS (the GCS address, then the
`ray://` client address) trains its children on the worker node, which log over HTTP into the team's tracking
server; the record has the shape of a local run, the adapters come back through the server's artifact proxy, no
password reaches Ray's logs, and no Ray process is left afterwards."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from support.ray_processes import ray_left_behind, ray_processes
from support.store import load_table, top_level
from support.team_server import free_port
from test_team_server_e2e import mlflow_run

# On the team's server (the session's `team_server`): `make test-team`; its tests share the worker that holds it.
pytestmark = [pytest.mark.team, pytest.mark.xdist_group("team_server")]

SWEEP = {"model": "tiny", "dataset": "sample_chat", "ranks": "2,4", "seeds": "1", "max_steps": 3, "batch_size": 8,
         "max_length": 48, "learning_rate": 1e-3}
ON_WORKERS = {"executor": "ray", "workers": 2, "cpus_per_worker": 1}
RAY = str(Path(sys.executable).parent / "ray")
# MLflow's system metrics: sampled by a timer thread, so which of them a short run got depends on the machine's load
SAMPLED = "system/"
# What training computed, as opposed to timed or sampled: equal wherever the child trained
COMPUTED = ("train_loss", "lr", "grad_norm", "train_steps", "train_examples", "train_tokens", "eval_loss",
            "eval_perplexity", "trainable_params", "adapter_size_bytes")


class RayCluster:
    """A head that offers no CPU (so every sweep worker lands on the node that joined) and a worker node of 2 CPUs,
    each a `ray start --block` process in a session of its own; the token in a private file, shared by all."""

    def __init__(self):
        self.folder = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # Ray's socket paths stay < 107 bytes
        self.token = self.folder / "auth_token"
        self.token.write_text(secrets.token_hex(32))
        self.token.chmod(0o600)
        self.port, self.client_port = free_port(), free_port()
        self.address, self.client_address = f"127.0.0.1:{self.port}", f"ray://127.0.0.1:{self.client_port}"
        self.nodes: list[subprocess.Popen] = []

    def env(self) -> dict[str, str]:
        """What every node and the driver need: token mode and the cluster's token."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token), "RAY_USAGE_STATS_ENABLED": "0",
                "RAY_TMPDIR": str(self.folder)}

    def start_node(self, *args: str) -> None:
        log = open(self.folder / f"node{len(self.nodes)}.log", "w")  # noqa: SIM115 - closed with the process
        self.nodes.append(subprocess.Popen([RAY, "start", "--block", "--disable-usage-stats", *args],
                                           env={**os.environ, **self.env()}, stdout=log, stderr=subprocess.STDOUT,
                                           start_new_session=True))

    def start(self) -> None:
        self.start_node("--head", f"--port={self.port}", f"--ray-client-server-port={self.client_port}",
                        "--num-cpus=0", "--include-dashboard=false", f"--temp-dir={self.folder}",
                        "--node-ip-address=127.0.0.1")
        self.wait_for(nodes=1, text="Active:")
        self.start_node(f"--address={self.address}", "--num-cpus=2", f"--temp-dir={self.folder}",
                        "--node-ip-address=127.0.0.1")
        self.wait_for(nodes=2, text="/2.0 CPU")

    def wait_for(self, nodes: int, text: str, timeout_s: float = 180) -> None:
        """Until `ray status` (with the token) shows the nodes and `text`."""
        deadline = time.monotonic() + timeout_s
        while True:
            status = subprocess.run([RAY, "status", f"--address={self.address}"], capture_output=True, text=True,
                                    env={**os.environ, **self.env()})
            if status.returncode == 0 and status.stdout.count(" node_") >= nodes and text in status.stdout:
                return
            for node in self.nodes:
                assert node.poll() is None, (self.folder / "node0.log").read_text()[-3000:]
            assert time.monotonic() < deadline, status.stdout + status.stderr
            time.sleep(1)

    def stop(self) -> None:
        """Each node's `ray start --block` stops its node on SIGTERM; its process group is killed if it does not."""
        for node in reversed(self.nodes):
            node.send_signal(signal.SIGTERM)
        for node in self.nodes:
            try:
                node.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(node.pid, signal.SIGKILL)
                node.wait()


@pytest.fixture
def ray_cluster():
    cluster = RayCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        for process in ray_processes(cluster.folder):
            process.kill()
        import shutil

        shutil.rmtree(cluster.folder, ignore_errors=True)


def adapter_config(path: Path) -> dict:
    """PEFT writes `target_modules` from a set: its order changes from one process to the next."""
    config = json.loads(path.read_text())
    return {**config, "target_modules": sorted(config["target_modules"])}


def sweep_record(client, experiment: str, tmp_path: Path) -> dict:
    """What a sweep recorded, without what says where and when it ran: every child's params, tags, metrics, loss
    history and adapter bytes (downloaded through the server's artifact proxy), the parent's summary and table."""
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id])
    [parent] = top_level(runs)
    table = load_table(client, parent.info.run_id, "comparison_table.json", tmp_path / "table")
    record = {"parent": {
        "status": parent.info.status,
        "summary": {k: parent.data.metrics[k] for k in ("best_rank", "best_eval_loss", "failed_children")},
        "artifacts": sorted(a.path for a in client.list_artifacts(parent.info.run_id)),
        "table": table[["rank", "seed", "status", "eval_loss", "train_loss", "trainable_params",
                        "adapter_size_bytes"]].to_dict("list")}}
    for child in runs:
        if child.data.tags.get("mlflow.parentRunId") != parent.info.run_id:
            continue
        adapter = Path(client.download_artifacts(child.info.run_id, "adapter", str(tmp_path / child.info.run_id)))
        record[child.info.run_name] = {
            "status": child.info.status,
            "executor": {k: child.data.params[k] for k in ON_WORKERS},
            "params": {k: v for k, v in child.data.params.items() if k not in ON_WORKERS},
            "tags": {k: v for k, v in child.data.tags.items() if k != "mlflow.parentRunId"},
            "metric_names": sorted(k for k in child.data.metrics if not k.startswith(SAMPLED)),
            # the values too: one thread each way (the driver's OMP_NUM_THREADS=1, a worker of 1 CPU)
            "values": {k: child.data.metrics[k] for k in COMPUTED},
            "train_loss": [(m.step, m.value) for m in client.get_metric_history(child.info.run_id, "train_loss")],
            "adapter": {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in adapter.iterdir()
                        if f.name != "adapter_config.json"},
            "adapter_config": adapter_config(adapter / "adapter_config.json")}
    return record


def test_a_sweep_on_a_two_node_cluster_logs_into_the_server(team_server, ray_cluster, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # as on a worker of 1 CPU, so the values compare too
    carol = team_server.add_user("carol")
    local = mlflow_run("lora_sweep", SWEEP, carol, tmp_path, experiment="cluster-local")
    assert local.returncode == 0, local.stderr[-3000:]
    expected = sweep_record(team_server.client("carol"), "cluster-local", tmp_path / "local")
    assert sorted(expected) == ["parent", "r2-seed1", "r4-seed1"]
    assert {record["status"] for record in expected.values()} == {"FINISHED"}

    outputs = []
    for name, address in (("cluster", ray_cluster.address), ("cluster-client", ray_cluster.client_address)):
        spread = mlflow_run("lora_sweep", {**SWEEP, **ON_WORKERS}, {**carol, **ray_cluster.env(),
                                                                      "RAY_ADDRESS": address}, tmp_path, name)
        outputs.append(spread.stdout + spread.stderr)
        assert spread.returncode == 0, spread.stderr[-3000:]
        assert "[ray] r2-seed1 FINISHED" in spread.stderr and "[ray] r4-seed1 FINISHED" in spread.stderr
        got = sweep_record(team_server.client("carol"), name, tmp_path / name)
        assert got["parent"] == expected["parent"], address
        for child in ("r2-seed1", "r4-seed1"):
            assert got[child].pop("executor") == {"executor": "ray", "workers": "2", "cpus_per_worker": "1"}
            assert got[child] == {k: v for k, v in expected[child].items() if k != "executor"}, (address, child)

    # The token is what lets a node or a driver in: without it the cluster refuses.
    stranger = {k: v for k, v in {**os.environ, **ray_cluster.env()}.items() if k != "RAY_AUTH_TOKEN_PATH"}
    refused = subprocess.run([RAY, "status", f"--address={ray_cluster.address}"], capture_output=True, text=True,
                             env={**stranger, "RAY_AUTH_TOKEN": secrets.token_hex(32)})
    assert refused.returncode != 0 and "token" in refused.stderr.lower(), refused.stderr[-2000:]
    logs = [p.read_bytes().decode("utf-8", "replace") for p in ray_cluster.folder.rglob("*")
            if p.is_file() and p.stat().st_size < 50_000_000 and p.name != "auth_token"]
    assert logs and not any(team_server.passwords["carol"] in text for text in logs + outputs)

    ray_cluster.stop()
    assert ray_left_behind(ray_cluster.folder) == [], "every Ray process of the cluster is gone"
