"""The team's tracking server under load and a fault: eight sweeps started at once from separate processes, and the
server (MLflow and PostgreSQL) stopped for a minute while they train, then started again. MLflow's retries carry
the sweeps over the outage: every process ends well, every run is terminal, and every child's metric history holds
every step it trained. And runs starting at the same moment in a new experiment, which all write its kind tag and
their datasets into it at once."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import mlflow
import pytest
from mlflow import MlflowClient
from support import mlflow_state
from support.paths import REPO
from support.store import children_of, top_level
from test_team_server_e2e import member_env

from finetune_lab import data, tracking

# On the team's server (the session's `team_server`): `make test-team`; its tests share the worker that holds it.
pytestmark = [pytest.mark.team, pytest.mark.xdist_group("team_server")]

SWEEPS = 8
MAX_STEPS = 4
SWEEP = ["--model", "tiny", "--dataset", "sample_chat", "--ranks", "2,4", "--seeds", "1", "--max-steps",
         str(MAX_STEPS), "--batch-size", "8", "--max-length", "48", "--experiment", "load"]
OUTAGE_S = 60
TERMINAL = {"FINISHED", "FAILED", "KILLED"}
# Runs starting at the same moment in a new experiment, in rounds: without a second try of their shared writes,
# 4 of 10 such rounds of 8 had a run fail on PostgreSQL with a duplicate key.
RUNS_TOGETHER, ROUNDS = 8, 10


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
    parents = top_level(runs)
    children = children_of(runs)
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


def start_a_run_with_the_others(experiment_id: str, all_started: threading.Barrier, splits: data.LoadedData,
                                failures: list[str]) -> None:
    """What every entry point writes into its experiment as its run starts, the moment the other runs do."""
    try:
        with mlflow.start_run(experiment_id=experiment_id):  # the active run is the thread's own
            all_started.wait()
            tracking.mark_model_training(experiment_id)
            data.log_inputs(splits)
    except Exception as error:  # noqa: BLE001 - collected for the test's assertion
        failures.append(f"experiment {experiment_id}: {error}")


def test_runs_starting_together_in_a_new_experiment_all_record_its_tag_and_their_datasets(team_server, monkeypatch):
    mlflow_state.forget(monkeypatch)  # this process's earlier stores mean nothing here
    for key, value in team_server.add_user("frank").items():
        monkeypatch.setenv(key, value)
    chat, _ = data.load("sample_chat", seed=0, test_fraction=0.1)
    client, failures = MlflowClient(), []
    for round_ in range(ROUNDS):
        experiment_id = client.create_experiment(f"together-{round_}")
        all_started = threading.Barrier(RUNS_TOGETHER)
        threads = [threading.Thread(target=start_a_run_with_the_others, args=(experiment_id, all_started, chat,
                                                                               failures))
                   for _ in range(RUNS_TOGETHER)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert client.get_experiment(experiment_id).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
        runs = client.search_runs([experiment_id])
        assert len(runs) == RUNS_TOGETHER
        for run in runs:
            logged = {i.tags[0].value: i.dataset.digest for i in run.inputs.dataset_inputs}
            assert logged == {"training": chat.digest, "evaluation": chat.eval_digest}, failures
    assert failures == []
