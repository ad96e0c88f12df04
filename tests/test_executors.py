"""Executors: the up-front checks, worker sizing, what travels to workers, and a Ray sweep whose worker dies or
cannot start, or that is stopped by SIGTERM (a local Ray instance, 2 CPUs). That the Ray record equals the local one:
tests/e2e/test_ray_cluster_e2e.py."""

from __future__ import annotations

import contextlib
import os
import pickle
import shutil
import signal
import sys
import threading
import time

import datasets
import psutil
import pytest
from click.testing import CliRunner
from support.paths import entrypoint
from support.ray_processes import of_ray_instance, ray_left_behind
from support.store import children_of, load_table, parent_and_children, runs_of
from test_sweep import tiny_sweep

from finetune_lab import causal_lm, executors, models
from finetune_lab.experiments import lora_sweep

REMOTE_REJECTED = ("error: executor: the Ray cluster at RAY_ADDRESS={address} cannot reach the local tracking store "
                   "{uri}: run `mlflow server --backend-store-uri <database> --artifacts-destination <store>` and "
                   "set MLFLOW_TRACKING_URI=http://<server>:5000")


def node(cpus: float, gpus: float = 0, alive: bool = True) -> dict:
    return {"Alive": alive, "Resources": {"CPU": cpus, **({"GPU": gpus} if gpus else {})}}


@pytest.mark.parametrize(
    "nodes, cpus_per_worker, expected",
    [
        ([node(2)], 1, (2, False)),
        ([node(8)], 3, (2, False)),
        ([node(3), node(3)], 2, (2, False)),  # a worker's CPUs are on one node: not 6 // 2 = 3
        ([node(16, gpus=8)], 1, (8, True)),  # one worker per GPU
        ([node(4, gpus=8)], 1, (4, True)),  # ... as long as each has its CPUs
        ([node(8), node(8, gpus=2)], 2, (2, True)),  # a CPU-only head takes no worker when there are GPUs
        ([node(8, alive=False), node(2)], 1, (2, False)),
    ],
)
def test_worker_capacity(nodes, cpus_per_worker, expected):
    assert executors.worker_capacity(nodes, cpus_per_worker) == expected


@pytest.mark.parametrize(
    "nodes, settings, expected",
    [
        ([node(2)], dict(workers=3), "workers: 3 workers of 1 CPU asked for, the Ray cluster holds 2"),
        ([node(8, gpus=2)], dict(workers=4, cpus_per_worker=2),
         "workers: 4 workers of 2 CPUs and 1 GPU asked for, the Ray cluster holds 2"),
        ([node(2), node(2)], dict(cpus_per_worker=4), "cpus_per_worker: no node of the Ray cluster has 4 CPUs for one "
                                                      "worker"),
    ],
)
def test_more_workers_than_the_cluster_holds_is_an_input_error(nodes, settings, expected):
    """Checked before any worker starts: an actor whose resources no node has would wait for ever."""
    from finetune_lab.errors import InputError

    class Cluster:  # the part of the `ray` module that sizing reads
        @staticmethod
        def nodes():
            return nodes

    with pytest.raises(InputError) as raised:
        executors._start_workers(Cluster, tiny_sweep(executor="ray", **settings), make_trainer=None, children=8)
    assert raised.value.problems == [expected]


@pytest.mark.parametrize("address", ["ray://head:10001", "10.0.0.5:6379"])
def test_a_remote_cluster_with_a_local_store_is_rejected_before_anything_starts(client, tracking_uri, no_weights_loaded,
                                                                                monkeypatch, address):
    import ray

    monkeypatch.setenv("RAY_ADDRESS", address)
    outcome = CliRunner().invoke(entrypoint("lora_sweep").main,
                                 ["--model", "tiny", "--dataset", "sample_chat", "--experiment", "remote",
                                  "--executor", "ray", "--batch-size", "1000"])
    assert outcome.exit_code == 2, outcome.output
    assert REMOTE_REJECTED.format(address=address, uri=tracking_uri) in outcome.output
    assert "error: batch_size: the train split has" in outcome.output, "reported with the other problems"
    assert not ray.is_initialized()
    [parent] = runs_of(client, "remote")
    assert parent.info.status == "FAILED" and "executor: the Ray cluster" in parent.data.tags["error"]


def test_a_remote_cluster_with_a_tracking_server_passes(monkeypatch, tracking_uri):
    import mlflow

    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    mlflow.set_tracking_uri("http://mlflow.example:5000")
    assert executors.problems(tiny_sweep(executor="ray")) == []
    mlflow.set_tracking_uri(tracking_uri)
    assert len(executors.problems(tiny_sweep(executor="ray"))) == 1
    assert executors.problems(tiny_sweep(executor="local")) == []


def test_ray_missing_is_one_line(client, no_weights_loaded, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails, as when it is not installed
    outcome = CliRunner().invoke(entrypoint("lora_sweep").main,
                                 ["--model", "tiny", "--dataset", "sample_chat", "--experiment", "noray",
                                  "--executor", "ray"])
    assert outcome.exit_code == 2, outcome.output
    errors = [line for line in outcome.output.splitlines() if line.startswith("error:")]
    assert errors == ['error: executor: executor=ray needs Ray, which is not installed: pip install -e ".[ray]" '
                      '(or make install)']


@pytest.mark.parametrize("args, expected", [
    (["--executor", "dask"], "error: executor: must be one of local, ray, got 'dask'"),
    (["--workers", "-1"], "error: workers: must be >= 0"),
    (["--cpus-per-worker", "0"], "error: cpus_per_worker: must be >= 1, got 0"),
])
def test_bad_executor_settings(client, no_weights_loaded, args, expected):
    outcome = CliRunner().invoke(entrypoint("lora_sweep").main,
                                 ["--model", "tiny", "--dataset", "sample_chat", "--experiment", "bad", *args])
    assert outcome.exit_code == 2 and expected in outcome.output, outcome.output


def test_the_workload_travels_with_its_rows_not_cache_file_paths(tmp_path):
    """A Dataset read from cache files pickles as their paths, which a worker on another machine does not have."""
    datasets.Dataset.from_dict({"input_ids": [[1, 2], [3, 4, 5]]}).save_to_disk(tmp_path / "saved")
    from_files = datasets.load_from_disk(str(tmp_path / "saved"))
    assert from_files.cache_files
    workload = lora_sweep.LoraSweepWorkload(tiny_sweep(), models.ModelSource("tiny", "/nowhere", ""),
                                   datasets.DatasetDict({"train": from_files}), [], {}, "", "")
    sent = pickle.dumps(workload)
    shutil.rmtree(tmp_path / "saved")
    received = pickle.loads(sent)
    assert received.tokenized["train"]["input_ids"] == [[1, 2], [3, 4, 5]]
    assert received.config == workload.config and workload.tokenized["train"].cache_files, "the sender is untouched"


@pytest.mark.slow  # starts a local Ray instance
@pytest.mark.xdist_group("ray")  # two Ray instances on two cores only slow each other down
def test_a_worker_that_dies_fails_only_its_child(client, local_ray, tmp_path):
    """SIGKILL one of the two workers while it trains: that child ends FAILED with its error, the other worker
    trains the rest, the parent lists the failure, and Ray is gone afterwards."""
    killed, stop = [], threading.Event()

    def kill_a_training_worker():
        # Ray's process title first (cheap, so that a busy machine still catches a short child training), then
        # whether it is this test's instance (another test's Ray may be running).
        while not stop.is_set():
            for process in psutil.process_iter(["cmdline"]):
                with contextlib.suppress(psutil.Error, OSError):
                    if ("ray::ChildWorker.train" in " ".join(process.info["cmdline"] or ())
                            and of_ray_instance(process, local_ray)):
                        os.kill(process.pid, signal.SIGKILL)
                        killed.append(process.pid)
                        return
            time.sleep(0.02)

    watcher = threading.Thread(target=kill_a_training_worker, daemon=True)
    watcher.start()
    try:
        result = lora_sweep.run(tiny_sweep(seeds=(1, 2), executor="ray", workers=2, max_steps=12, experiment="dies"))
    finally:
        stop.set()
        watcher.join()
    assert len(killed) == 1
    runs = {r.info.run_id: r for r in runs_of(client, "dies")}
    parent = runs.pop(result["run_id"])
    assert parent.info.status == "FINISHED"
    assert {r.data.tags["mlflow.parentRunId"] for r in runs.values()} == {parent.info.run_id}
    [failed] = [r for r in runs.values() if r.info.status == "FAILED"]
    assert failed.data.tags["error"].startswith("its Ray worker died: ActorDiedError")
    assert sorted(r.info.status for r in runs.values()) == ["FAILED", "FINISHED", "FINISHED", "FINISHED"]
    assert parent.data.metrics["failed_children"] == 1
    assert parent.data.tags["failed_children"].startswith(f"{failed.info.run_name}: FAILED its Ray worker died")
    table = load_table(client, parent.info.run_id, "comparison_table.json", tmp_path)
    assert sorted(zip(table["run_id"], table["status"])) == sorted((r.info.run_id, r.info.status)
                                                                   for r in runs.values())
    assert ray_left_behind(local_ray) == []


@pytest.mark.slow  # starts a local Ray instance
@pytest.mark.xdist_group("ray")  # two Ray instances on two cores only slow each other down
def test_workers_that_cannot_start_fail_every_child(client, local_ray, monkeypatch):
    """The base is gone when the workers load it: no worker ever takes a child, and every child ends FAILED with
    the reason, and so does the parent."""
    tokenize = causal_lm.tokenize

    def then_remove_the_base(splits, tokenizer, config):
        tokenized = tokenize(splits, tokenizer, config)
        shutil.rmtree(tokenizer.name_or_path)  # after the driver's checks and tokenizer, before any worker
        return tokenized

    monkeypatch.setattr(causal_lm, "tokenize", then_remove_the_base)
    with pytest.raises(RuntimeError, match=r"all 2 child runs failed; first error: no Ray worker left to train it "
                                           r"\(the last one could not start: OSError"):
        lora_sweep.run(tiny_sweep(ranks=(2,), seeds=(1, 2), executor="ray", workers=2, experiment="nostart"))
    runs = runs_of(client, "nostart")
    children = children_of(runs)
    assert len(children) == 2 and all(r.info.status == "FAILED" for r in children)
    for child in children:
        assert child.data.tags["error"].startswith("no Ray worker left to train it (the last one could not start: "
                                                   "OSError")
    assert ray_left_behind(local_ray) == []


@pytest.mark.slow  # starts a local Ray instance
@pytest.mark.xdist_group("ray")  # two Ray instances on two cores only slow each other down
def test_sigterm_during_a_ray_sweep_keeps_the_finished_work_and_ends_every_run(client, local_ray, monkeypatch,
                                                                               tmp_path):
    """SIGTERM to the driver while it makes the third child's run: that child, and any still training, end KILLED
    naming the signal; the parent summarises what finished and lists the others; no run stays RUNNING, and Ray is
    shut down."""
    from finetune_lab import signals, tracking

    create, tracking_ids = tracking.create_child_run, []

    def signal_at_the_third(name):  # the run exists, its id not yet returned: a search left such a run RUNNING
        run_id = create(name)
        tracking_ids.append(run_id)
        if len(tracking_ids) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return run_id

    monkeypatch.setattr(tracking, "create_child_run", signal_at_the_third)
    with pytest.raises(signals.Terminated):
        lora_sweep.run(tiny_sweep(seeds=(1, 2), executor="ray", workers=2, experiment="ray-sigterm"))
    runs = runs_of(client, "ray-sigterm")
    assert not [r for r in runs if r.info.status == "RUNNING"], "no run may stay RUNNING"
    parent, _ = parent_and_children(runs)
    assert parent.info.status == "KILLED" and parent.data.tags["error"] == "terminated by SIGTERM"
    table = load_table(client, parent.info.run_id, "comparison_table.json", tmp_path)
    statuses = dict(zip(table["run_id"], table["status"]))
    children = {r.info.run_id: r for r in children_of(runs)}
    third = children[tracking_ids[2]]
    assert third.info.status == "KILLED", "the run made as the signal came ends KILLED"
    # The first two finished or were still training (a worker that loads its base late leaves both to the other,
    # which takes the second once the first is done); the fourth never started.
    assert list(table["status"]).count("NOT_RUN") == 1 and "FINISHED" in set(table["status"])
    assert set(table["status"]) <= {"FINISHED", "KILLED", "NOT_RUN"}
    for run_id, child in children.items():
        assert statuses[run_id] == child.info.status
        if child.info.status == "KILLED":
            assert child.data.tags["error"] == "interrupted before it ended: terminated by SIGTERM"
    finished = [r.info.run_id for r in children.values() if r.info.status == "FINISHED"]
    assert parent.data.tags["best_run_id"] in finished
    assert ray_left_behind(local_ray) == []
