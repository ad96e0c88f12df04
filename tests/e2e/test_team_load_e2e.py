"""The team's tracking server under load and a fault: eight sweeps started at once from separate processes, and the
server (MLflow and PostgreSQL) stopped for a minute while they train, then started again. MLflow's retries carry
the sweeps over the outage: every process ends well, every run is terminal, and every child's metric history holds
every step it trained."""

from __future__ import annotations

import subprocess
import sys
import time

from conftest import REPO
from test_team_server_e2e import member_env

SWEEPS = 8
MAX_STEPS = 4
SWEEP = ["--model", "tiny", "--dataset", "sample_chat", "--ranks", "2,4", "--seeds", "1", "--max-steps",
         str(MAX_STEPS), "--batch-size", "8", "--max-length", "48", "--experiment", "load"]
OUTAGE_S = 60
TERMINAL = {"FINISHED", "FAILED", "KILLED"}


def children_training(client, experiment_id: str) -> int:
    """Children that have logged at least one training step."""
    runs = client.search_runs([experiment_id], filter_string="metrics.train_loss > -1")
    return sum("mlflow.parentRunId" in r.data.tags for r in runs)


def test_eight_sweeps_at_once_ride_out_a_minute_without_the_server(team_server, tmp_path):
    erin = team_server.add_user("erin")
    as_erin = team_server.client("erin")
    experiment_id = as_erin.create_experiment("load")
    sweeps = [subprocess.Popen([sys.executable, str(REPO / "entrypoints" / "lora_sweep.py"), *SWEEP, "--run-name",
                                f"sweep-{i}"], cwd=tmp_path, env=member_env(erin), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True) for i in range(SWEEPS)]
    try:
        deadline = time.monotonic() + 600
        while children_training(as_erin, experiment_id) < 2:
            ended = [sweep.communicate()[0][-3000:] for sweep in sweeps if sweep.poll() is not None]
            assert not ended, "a sweep ended before the outage:\n" + "\n".join(ended)
            assert time.monotonic() < deadline, "no sweep got to train"
            time.sleep(2)
        team_server.stop()  # mid-sweep: MLflow and PostgreSQL both gone
        assert team_server.processes() == []
        stopped_at = time.monotonic()
        time.sleep(OUTAGE_S)
        team_server.start()
        outage_s = time.monotonic() - stopped_at
        outputs = [sweep.communicate(timeout=900)[0] for sweep in sweeps]
    finally:
        for sweep in sweeps:
            sweep.kill()
    assert [s.returncode for s in sweeps] == [0] * SWEEPS, "\n".join(o[-2000:] for o in outputs)
    assert outage_s >= OUTAGE_S

    runs = as_erin.search_runs([experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert sorted(r.info.run_name for r in parents) == [f"sweep-{i}" for i in range(SWEEPS)]
    assert len(children) == 2 * SWEEPS
    assert {r.info.status for r in runs} == {"FINISHED"}, "nothing left RUNNING, nothing lost to the outage"
    for child in children:
        for key in ("train_loss", "lr", "grad_norm"):
            steps = [m.step for m in as_erin.get_metric_history(child.info.run_id, key)]
            assert sorted(steps) == list(range(1, MAX_STEPS + 1)), (child.info.run_name, key, steps)
        assert {"eval_loss", "adapter_size_bytes"} <= child.data.metrics.keys()
    for parent in parents:
        assert parent.data.metrics["failed_children"] == 0
