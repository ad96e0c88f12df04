"""The team's tracking server (`make server`: PostgreSQL, proxied artifacts, accounts): every entry point runs
against it with a member's credentials; wrong or missing credentials, or a write into someone else's experiment,
stop with one line before anything is created; no password lands in the database, the artifacts or any log; a
stopped and restarted server still holds every run. The entry points run in this process (their click commands,
with the member's environment): `mlflow run` against the server is what the Ray cluster test launches."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from support.paths import REPO

from finetune_lab.entry_points import ENTRY_POINTS

# On the team's server (the session's `team_server`): `make test-team`; its tests share the worker that holds it.
pytestmark = [pytest.mark.team, pytest.mark.xdist_group("team_server")]

# Each entry point once, as small as it goes (generate answers with the adapter the sweep registered).
SMALLEST_RUNS = [
    ("classify", {"model": "tiny", "dataset": "sample", "max_steps": 2, "batch_size": 8, "max_length": 32}),
    ("classify_sweep", {"model": "tiny", "dataset": "sample", "learning_rates": "1e-3", "epochs": 1, "seeds": 1,
                        "max_steps": 2, "batch_size": 8, "max_length": 32}),
    ("lora_sweep", {"model": "tiny", "dataset": "sample_chat", "ranks": "2", "seeds": "1", "max_steps": 2,
                    "batch_size": 8, "max_length": 48, "register_as": "team-adapter"}),
    ("generate", {"model_uri": "models:/team-adapter@champion", "max_new_tokens": 4}),
    ("retrain_probe", {"model": "tiny", "dataset": "sample_chat", "max_steps": 2, "batch_size": 8, "max_length": 48,
                       "max_new_tokens": 4}),
    ("bench", {"tiny": "true", "workloads": "classify", "variants": "baseline,project"}),
    ("report", {"experiments": "team"}),
]


def mlflow_run(entry: str, params: dict, env: dict, cwd: Path, experiment: str = "team"):
    command = [sys.executable, "-m", "mlflow", "run", str(REPO), "-e", entry, "--env-manager", "local",
               "--experiment-name", experiment]
    for key, value in params.items():
        command += ["-P", f"{key}={value}"]
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=600, env=member_env(env))


def member_env(env: dict) -> dict:
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    inherited = {k: v for k, v in os.environ.items()
                 if not k.startswith(("MLFLOW_TRACKING_", "MLFLOW_EXPERIMENT_", "MLFLOW_RUN_ID"))}
    return {**inherited, "PATH": path, **env}


def refused_with_one_line(result, expected: str) -> None:
    assert result.exit_code == 2, result.output[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], result.output[-2000:]
    assert "Traceback" not in result.output and "training" not in result.output, result.output[-2000:]


def test_members_run_every_entry_point_and_nothing_else_gets_in(team_server, as_member, caplog, tmp_path):
    alice, bob = team_server.add_user("alice"), team_server.add_user("bob")
    outputs = []
    assert sorted(entry for entry, _ in SMALLEST_RUNS) == sorted(row.name for row in ENTRY_POINTS)
    for entry, params in SMALLEST_RUNS:
        result = as_member(entry, params, alice)
        outputs.append(result.output)
        assert result.exit_code == 0, f"{entry}: {result.output[-3000:]}"
    as_alice = team_server.client("alice")
    experiment = as_alice.get_experiment_by_name("team")
    assert experiment.artifact_location.startswith("mlflow-artifacts:"), "artifacts go through the server's proxy"
    runs = as_alice.search_runs([experiment.experiment_id])
    assert len(runs) >= len(SMALLEST_RUNS) and {r.info.status for r in runs} == {"FINISHED"}
    assert {r.data.tags["mlflow.user"] for r in runs} == {"alice"}
    adapter = as_alice.download_artifacts(
        next(r for r in runs if r.data.tags.get("mlflow.parentRunId") and "lora_r" in r.data.params).info.run_id,
        "adapter", str(tmp_path / "adapter"))
    assert (Path(adapter) / "adapter_model.safetensors").is_file()

    # Wrong or missing credentials, or bob writing into alice's experiment: one line, nothing created.
    before = {r.info.run_id for r in runs}
    tiny = {"model": "tiny", "dataset": "sample", "max_steps": 1}
    wrong = {**alice, "MLFLOW_TRACKING_PASSWORD": "not-" + alice["MLFLOW_TRACKING_PASSWORD"]}
    refused_with_one_line(as_member("classify", tiny, wrong, "ghost"), "MLFLOW_TRACKING_USERNAME: the tracking server")
    missing = {"MLFLOW_TRACKING_URI": team_server.url}
    refused_with_one_line(as_member("classify", tiny, missing, "ghost"), "refuses a request without")
    bobs = as_member("classify", tiny, bob)
    refused_with_one_line(bobs, "experiment: user 'bob' may not write into experiment 'team'")
    outputs.append(bobs.output)
    # `mlflow run` itself creates the run first: MLflow refuses bob there, with its own message
    refused = mlflow_run("classify", {"model": "tiny", "dataset": "sample", "max_steps": 1}, bob, tmp_path)
    assert refused.returncode != 0 and "403" in refused.stderr.splitlines()[-1]
    assert as_alice.get_experiment_by_name("ghost") is None
    assert {r.info.run_id for r in as_alice.search_runs([experiment.experiment_id])} == before
    # ... until alice's experiment is shared with him (docs/team.md)
    team_server.grant("bob", experiment.experiment_id, "EDIT")
    shared = team_server.client("bob").create_run(experiment.experiment_id)
    team_server.client("bob").set_terminated(shared.info.run_id)

    # No password anywhere: the database, the artifacts, the server's and the runs' output, params and tags.
    passwords = [p for p in team_server.passwords.values()]
    records = [team_server.database_dump(), team_server.log.read_text(), caplog.text, *outputs]
    for path in (team_server.data_dir / "artifacts").rglob("*"):
        if path.is_file():
            records.append(path.read_bytes().decode("utf-8", "replace"))
    for run in as_alice.search_runs([experiment.experiment_id]):
        records.append(repr(run.data.params) + repr(run.data.tags))
    for password in passwords:
        assert not any(password in record for record in records)
    assert "admin" in records[0] and "alice" in records[0], "the dump holds the accounts (their hashes only)"

    # Stopped and started again: every run, its metrics and artifacts are still there.
    kept = {r.info.run_id: (r.info.status, r.data.metrics) for r in as_alice.search_runs([experiment.experiment_id])}
    team_server.stop()
    assert team_server.processes() == [], "no server or PostgreSQL process is left"
    team_server.start()
    again = {r.info.run_id: (r.info.status, r.data.metrics) for r in as_alice.search_runs([experiment.experiment_id])}
    assert again == kept
    assert Path(as_alice.download_artifacts(next(iter(kept)), "", str(tmp_path / "again"))).is_dir()
