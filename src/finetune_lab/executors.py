"""Where a sweep's children train: the seam between the experiment and the processes that do the work.

The sweep hands over its `children` (each with a `name` and `failed(run_id, error, status)`, which makes the
outcome of a child that could not finish; a list, or an iterator that makes each child when a worker is free to take
it, as a search asks its next trial then) and `make_trainer`, a picklable factory of
`trainer(child, run_id="") -> outcome` that loads what the children share (the frozen base) once per process.
Outcomes come back as children end; a signal (or, in this process, a tracking outage) raises `Stopped` with the
outcomes of the children it stopped mid-way.

- `local`: one trainer in this process, the children one after another.
- `ray`: one Ray actor per worker (one GPU each when the cluster has GPUs, else `cpus_per_worker` CPUs), each
  with its own trainer; a worker that has loaded it and is free takes the next child. Each child logs into the
  driver's tracking store, in a child run the driver made when it handed the child out, so the record is the
  same as `local`'s. A child whose worker dies ends FAILED with its `error` tag and the others go on; a worker
  that cannot start takes no child, and children left with no worker end FAILED. Without RAY_ADDRESS a local
  Ray instance is started for the sweep; with it the cluster is joined, and its workers must reach the
  tracking server (`problems` says so before any model is loaded). Ray is shut down (or left) at the end.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import mlflow

from finetune_lab import heap, signals, tracking
from finetune_lab.config import Sweeping
from finetune_lab.contract import FAILED, KILLED
from finetune_lab.errors import InputError, one_line, problem

RAY = "ray"


class Stopped(Exception):
    """A signal or a tracking outage stopped the children; `outcomes` are those of the children it stopped
    mid-way, `cause` what stopped them."""

    def __init__(self, outcomes: list, cause: BaseException):
        super().__init__(str(cause))
        self.outcomes, self.cause = outcomes, cause


# Tracking URIs that a worker on another machine can reach; an `mlflow server` also proxies the artifacts.
SERVER_SCHEMES = ("http", "https", "databricks")
INSTALL_RAY = 'pip install -e ".[ray]" (or make install)'


def problems(config: Sweeping) -> list[str]:
    """What stops `config.executor` on this machine, found before any model is loaded."""
    if config.executor != RAY:
        return []
    if importlib.util.find_spec("ray") is None:
        return [problem("executor", f"executor=ray needs Ray, which is not installed: {INSTALL_RAY}")]
    address = cluster_address()
    found = []
    uri = mlflow.get_tracking_uri()
    if address and urlparse(uri).scheme not in SERVER_SCHEMES:
        found.append(problem(
            "executor", f"the Ray cluster at RAY_ADDRESS={address} cannot reach the local tracking store {uri}: run "
                        f"`mlflow server --backend-store-uri <database> --artifacts-destination <store>` and set "
                        f"MLFLOW_TRACKING_URI=http://<server>:5000"))
    if address.startswith("ray://") and importlib.util.find_spec("grpc") is None:
        found.append(problem("executor", f"RAY_ADDRESS={address} connects through Ray Client, which needs grpcio: "
                                         f"{INSTALL_RAY}"))
    return found


def cluster_address() -> str:
    """The Ray cluster to join (RAY_ADDRESS), or "" for a local instance started for the sweep."""
    address = os.environ.get("RAY_ADDRESS", "").strip()
    return "" if address == "local" else address


def run_children(config: Sweeping, make_trainer: Callable[[], Callable], children: Iterable,
                 count: int | None = None) -> Iterator:
    """Each child's outcome as it ends, trained where `config.executor` says. `children`: a list, or an iterator of
    `count` children, each taken from it only when it can start."""
    count = len(children) if count is None else count
    if not count:
        return
    if config.executor == RAY:
        yield from _ray_children(config, make_trainer, iter(children), count)
        return
    trainer = make_trainer()
    for child in children:
        yield trainer(child)


class ChildWorker:
    """The body of one Ray actor: the driver's tracking store, one trainer (base loaded once), children in turn."""

    def __init__(self, shared_make_trainer: list, tracking_uri: str, credentials: dict[str, str], threads: int):
        import ray
        import torch

        torch.set_num_threads(threads)  # its CPUs, whatever OMP_NUM_THREADS the worker inherited
        tracking.configure_worker(tracking_uri, credentials)
        # Fetched here, not passed resolved: reading it imports the training stack, which (like the base) lives as
        # long as the worker.
        with heap.long_lived():
            self.trainer = ray.get(shared_make_trainer[0])()

    def ready(self) -> bool:
        """Answers once the base is loaded (or fails as the worker could not start)."""
        return True

    def train(self, child, run_id: str):
        return self.trainer(child, run_id)


def worker_capacity(nodes: list[dict[str, Any]], cpus_per_worker: int) -> tuple[int, bool]:
    """How many workers the cluster's live nodes hold (`ray.nodes()`), and whether each takes a GPU (when the
    cluster has any). A worker's CPUs (and GPU) must be on one node."""
    alive = [node["Resources"] for node in nodes if node["Alive"]]
    gpus = any(resources.get("GPU", 0) >= 1 for resources in alive)
    capacity = 0
    for resources in alive:
        fits = int(resources.get("CPU", 0)) // cpus_per_worker
        capacity += min(fits, int(resources.get("GPU", 0))) if gpus else fits
    return capacity, gpus


def _ray_children(config: Sweeping, make_trainer, children: Iterator, count: int) -> Iterator:
    import ray  # the optional extra; `problems` checked that it is installed

    address = cluster_address()
    settings = {"log_to_driver": False, "logging_level": "WARNING"}
    # ray.init makes SIGTERM exit the driver at once; ours first ends every open run KILLED and summarises.
    on_sigterm = signal.getsignal(signal.SIGTERM)
    if address:
        # A cluster elsewhere gets this package's code with the job; its nodes need the same packages installed.
        ray.init(address=address, runtime_env={"py_modules": [str(Path(__file__).parent)]}, **settings)
    else:
        ray.init(address="local", num_cpus=config.workers * config.cpus_per_worker or None,
                 include_dashboard=False, **settings)
    if on_sigterm is not None:
        signal.signal(signal.SIGTERM, on_sigterm)
    workers = []
    try:
        workers = _start_workers(ray, config, make_trainer, count)
        yield from _hand_out(ray, workers, children, count)
    finally:
        # Killed first: on a cluster that outlives the sweep, and on a busy machine, a worker left to notice the
        # driver's end on its own lingers (one whose base failed to load stayed over 30 s).
        try:
            for worker in workers:
                ray.kill(worker)
        finally:
            ray.shutdown()  # even when the cluster is gone and a kill cannot reach it


def _start_workers(ray, config: Sweeping, make_trainer, children: int) -> list:
    capacity, gpus = worker_capacity(ray.nodes(), config.cpus_per_worker)
    need = f"{config.cpus_per_worker} CPU{'s' if config.cpus_per_worker > 1 else ''}" + (" and 1 GPU" if gpus else "")
    if capacity == 0:
        raise InputError([problem("cpus_per_worker", f"no node of the Ray cluster has {need} for one worker")])
    if config.workers > capacity:
        raise InputError([problem("workers", f"{config.workers} workers of {need} asked for, the Ray cluster "
                                             f"holds {capacity}")])
    count = min(config.workers or capacity, children)
    worker = ray.remote(ChildWorker).options(num_cpus=config.cpus_per_worker, num_gpus=1 if gpus else 0,
                                             max_restarts=0)
    # Sent to the object store once, read by every worker; inside a list, so that the worker gets the reference and
    # reads it when it chooses.
    shared = ray.put(make_trainer)
    # The credentials travel as an argument, not in a runtime_env, which Ray shows in its dashboard and state API.
    return [worker.remote([shared], mlflow.get_tracking_uri(), tracking.credentials(), config.cpus_per_worker)
            for _ in range(count)]


def _hand_out(ray, workers: list, children: Iterator, count: int) -> Iterator:
    """The `count` children to ready workers until none is left, each taken from `children` when a worker is free
    for it; outcomes as they end. A child's run is made when a worker that has loaded the base takes it (so it
    starts when its training does); a worker that dies fails its child and takes no more; children left when no
    worker is, fail."""
    from ray.exceptions import RayError, RayTaskError

    left, idle, running, run_ids = count, [], {}, {}
    starting = {worker.ready.remote(): worker for worker in workers}
    lost, ended = "", 0
    try:
        while running or (left and (idle or starting)):
            while left and idle:
                child, worker, left = next(children), idle.pop(0), left - 1
                # A signal while its run is made and handed out waits until the run is known here to end it.
                with signals.deferred():
                    run_ids[child.name] = tracking.create_child_run(child.name)
                    running[worker.train.remote(child, run_ids[child.name])] = (worker, child)
            [done], _ = ray.wait([*starting, *running], num_returns=1)
            if done in starting:
                worker = starting.pop(done)
                try:
                    ray.get(done)
                    idle.append(worker)
                except RayError as error:  # its base did not load (the error comes last in the message)
                    lost = f"could not start: {str(error).strip().splitlines()[-1]}"
                continue
            worker, child = running.pop(done)
            try:
                outcome = ray.get(done)
                idle.append(worker)
            except RayTaskError as error:  # raised past the trainer (not an Exception); the worker lives on
                idle.append(worker)
                outcome = _failed(child, run_ids[child.name], one_line(error.cause or error))
            except RayError as error:  # the worker died (killed, out of memory, node lost)
                lost = f"died: {one_line(error)}"
                outcome = _failed(child, run_ids[child.name], f"its Ray worker {lost}")
            ended += 1
            print(f"[ray] {outcome.name} {outcome.status} ({ended}/{count})", file=sys.stderr, flush=True)
            yield outcome
        for child in children:  # every worker is gone
            yield _failed(child, tracking.create_child_run(child.name),
                          f"no Ray worker left to train it (the last one {lost})")
    except BaseException as caught:  # interrupted (or the caller stopped early): the children training end KILLED
        error = signals.restored(caught)
        stopped = _kill_and_end(ray, workers, list(running), [(c, run_ids[c.name]) for _, c in running.values()],
                                "interrupted before it ended" + (f": {error}" if str(error) else ""))
        if isinstance(error, KeyboardInterrupt):  # a signal: the sweep summarises what ended, then stops
            raise Stopped(stopped, error) from caught
        raise


def _kill_and_end(ray, workers: list, tasks: list, unended: list, reason: str) -> list:
    """Kill the workers, then end KILLED the runs of the children not yet ended; their outcomes. The workers go
    first: one still taking its child would reopen the run (RUNNING again) after it is ended here; their `tasks`
    end once they are gone."""
    for worker in workers:
        ray.kill(worker)
    if tasks:
        ray.wait(tasks, num_returns=len(tasks), timeout=30)
    stopped = []
    for child, run_id in unended:
        tracking.end_run_by_id(run_id, KILLED, reason)
        stopped.append(child.failed(run_id, reason, KILLED))
    return stopped


def _failed(child, run_id: str, error: str):
    tracking.end_run_by_id(run_id, FAILED, error)
    return child.failed(run_id, error)
