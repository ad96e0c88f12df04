"""`mlflow run . -e lora_sweep -P executor=ray` on a local Ray instance (2 workers of 1 CPU) records the same sweep
as `executor=local`: the same children, params, tags, metrics, adapter weights and parent summary."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from conftest import load_table, ray_left_behind, runs_of
from test_lora_sweep_e2e import SWEEP

# Whatever says how the children ran; everything else must be equal.
EXECUTOR_PARAMS = {"executor", "workers", "cpus_per_worker"}


def adapter_config(path: Path) -> dict:
    """PEFT writes `target_modules` from a set: its order changes from one process to the next."""
    config = json.loads(path.read_text())
    return {**config, "target_modules": sorted(config["target_modules"])}


def sweep_record(client, experiment: str, tmp_path: Path) -> tuple:
    runs = runs_of(client, experiment)
    [parent] = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = {}
    for child in runs:
        if child.data.tags.get("mlflow.parentRunId") == parent.info.run_id:
            key = (int(child.data.params["lora_r"]), int(child.data.params["seed"]))
            adapter = Path(client.download_artifacts(child.info.run_id, "adapter", str(tmp_path / child.info.run_id)))
            children[key] = {
                "status": child.info.status,
                "name": child.info.run_name,
                "params": {k: v for k, v in child.data.params.items() if k not in EXECUTOR_PARAMS},
                "executor": {k: child.data.params[k] for k in EXECUTOR_PARAMS},
                "tags": {k: v for k, v in child.data.tags.items() if k != "mlflow.parentRunId"},
                "metrics": child.data.metrics,
                "train_loss_steps": [(m.step, m.value) for m in client.get_metric_history(child.info.run_id,
                                                                                         "train_loss")],
                "adapter": {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in adapter.iterdir()
                            if f.name != "adapter_config.json"},
                "adapter_config": adapter_config(adapter / "adapter_config.json"),
            }
    table = load_table(client, parent.info.run_id, "comparison_table.json", tmp_path / experiment)
    return parent, children, table


def test_ray_workers_record_the_same_sweep_as_local(mlflow_run, client, tmp_path, local_ray, monkeypatch):
    # A sum over threads depends on how many there are: one thread each way (a Ray worker of 1 CPU has one),
    # so that equal numbers can be asked for, not just close ones.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    local = mlflow_run("lora_sweep", SWEEP, experiment="local")
    assert local.returncode == 0, local.stderr[-3000:]
    spread = mlflow_run("lora_sweep", {**SWEEP, "executor": "ray", "workers": 2, "cpus_per_worker": 1},
                        experiment="ray")
    assert spread.returncode == 0, spread.stderr[-3000:]
    assert ray_left_behind(local_ray) == [], "the Ray instance must be shut down with the sweep"

    local_parent, local_children, local_table = sweep_record(client, "local", tmp_path)
    ray_parent, ray_children, ray_table = sweep_record(client, "ray", tmp_path)
    assert sorted(ray_children) == sorted(local_children) == [(2, 1), (2, 2), (4, 1), (4, 2)]
    for key, expected in local_children.items():
        got = ray_children[key]
        assert got["status"] == expected["status"] == "FINISHED"
        assert got["executor"] == {"executor": "ray", "workers": "2", "cpus_per_worker": "1"}
        assert got["name"] == expected["name"] and got["params"] == expected["params"]
        assert got["tags"] == expected["tags"]  # run name, user, source, git commit, no error
        assert got["metrics"]["eval_loss"] == expected["metrics"]["eval_loss"], key
        assert got["metrics"]["trainable_params"] == expected["metrics"]["trainable_params"], key
        assert got["train_loss_steps"] == expected["train_loss_steps"], key
        assert got["metrics"].keys() == expected["metrics"].keys()
        assert got["adapter"] == expected["adapter"], "the same adapter weights and tokenizer, byte for byte"
        assert got["adapter_config"] == expected["adapter_config"]

    assert ray_parent.info.status == local_parent.info.status == "FINISHED"
    for name in ("best_rank", "best_eval_loss", "failed_children"):
        assert ray_parent.data.metrics[name] == local_parent.data.metrics[name], name
    columns = ["rank", "seed", "status", "eval_loss", "train_loss", "trainable_params", "adapter_size_bytes"]
    assert ray_table[columns].equals(local_table[columns]), "the same comparison table, in the same order"
    artifacts = {a.path for a in client.list_artifacts(ray_parent.info.run_id)}
    assert artifacts == {a.path for a in client.list_artifacts(local_parent.info.run_id)}
    assert "[ray] r2-seed1 FINISHED" in spread.stderr
