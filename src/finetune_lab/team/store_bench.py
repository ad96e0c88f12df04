"""How fast a tracking store takes what a sweep logs: the latency of one training step's `log_batch` (what
`MlflowStepLogger` sends) and how many small runs per minute it records, one client alone and several at once.

    python -m finetune_lab.team.store_bench sqlite:///bench.db http://127.0.0.1:5000

A run here is what a sweep child sends besides its artifacts: created under a parent, 20 params, `STEPS` steps of
3 metrics one batch each, 8 summary metrics, ended. Credentials for a server come from the environment, as for
every entry point. Prints one Markdown table row per store.
"""

from __future__ import annotations

import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

STEPS = 20
RUNS_PER_CLIENT = 10
CONCURRENT_CLIENTS = 4
HEADER = ("| store | log_batch p50 (ms) | log_batch p95 (ms) | runs/min, 1 client | runs/min, "
          f"{CONCURRENT_CLIENTS} clients |\n|---|---|---|---|---|")


def one_run(client, experiment_id: str, parent_id: str, latencies: list[float]) -> None:
    from mlflow.entities import Metric, Param
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    run_id = client.create_run(experiment_id, tags={MLFLOW_PARENT_RUN_ID: parent_id}).info.run_id
    client.log_batch(run_id, params=[Param(f"param_{i}", str(i)) for i in range(20)])
    for step in range(1, STEPS + 1):
        now = int(time.time() * 1000)
        metrics = [Metric(key, 1.0 / step, now, step) for key in ("train_loss", "lr", "grad_norm")]
        started = time.perf_counter()
        client.log_batch(run_id, metrics=metrics)
        latencies.append(time.perf_counter() - started)
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(f"summary_{i}", float(i), now, 0) for i in range(8)])
    client.set_terminated(run_id)


def runs_per_minute(client, experiment_id: str, parent_id: str, clients: int, runs_per_client: int,
                    latencies: list[float]) -> float:
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for _ in pool.map(lambda _: one_run(client, experiment_id, parent_id, latencies),
                          range(clients * runs_per_client)):
            pass
    return clients * runs_per_client / (time.perf_counter() - started) * 60


def measure(uri: str, runs_per_client: int = RUNS_PER_CLIENT) -> str:
    """One Markdown row for the store at `uri`."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment_id = client.create_experiment(f"store-bench-{time.time_ns()}")
    parent_id = client.create_run(experiment_id).info.run_id
    one_run(client, experiment_id, parent_id, [])  # warm-up: connections, the store's caches
    latencies: list[float] = []
    alone = runs_per_minute(client, experiment_id, parent_id, 1, runs_per_client, latencies)
    together = runs_per_minute(client, experiment_id, parent_id, CONCURRENT_CLIENTS, runs_per_client, [])
    client.set_terminated(parent_id)
    cuts = statistics.quantiles(latencies, n=20)
    store = "mlflow server (basic-auth) on PostgreSQL" if uri.startswith("http") else uri.split(":")[0]
    return f"| {store} | {cuts[9] * 1000:.1f} | {cuts[18] * 1000:.1f} | {alone:.0f} | {together:.0f} |"


def main(uris: list[str]) -> None:
    print(HEADER)
    for uri in uris:
        print(measure(uri), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
