"""`store_bench` records the runs it times, completely, and reports one row per store."""

from __future__ import annotations

from mlflow.tracking import MlflowClient
from support.store import children_of

from finetune_lab.team import store_bench


def test_every_timed_run_is_recorded_whole(tracking_uri):
    uri = tracking_uri
    row = store_bench.measure(uri, runs_per_client=1)
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[0] == "sqlite" and all(float(cell) > 0 for cell in cells[1:])
    client = MlflowClient(uri)
    [experiment] = [e for e in client.search_experiments() if e.name.startswith("store-bench-")]
    runs = client.search_runs([experiment.experiment_id])
    children = children_of(runs)
    # the warm-up run, then 1 alone and 1 x 4 together
    assert len(children) == 1 + 1 + store_bench.CONCURRENT_CLIENTS
    assert {r.info.status for r in runs} == {"FINISHED"}
    for child in children:
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "train_loss")]
        assert sorted(steps) == list(range(1, store_bench.STEPS + 1))
        assert len(child.data.params) == 20 and len(child.data.metrics) == 3 + 8
