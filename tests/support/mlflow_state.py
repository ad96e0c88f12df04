"""MLflow's in-process state, forgotten between tests: the one place the tests touch MLflow's internals.

Why: MLflow keeps, per process, the tracking URI of the last `mlflow.set_tracking_uri` and the experiment of the
last `mlflow.set_experiment` (which it also exports as MLFLOW_EXPERIMENT_ID). A test that points this process at a
new store must not inherit either: an experiment id of the previous test's store means nothing in this one, and a
later `mlflow run --experiment-name` refuses an exported MLFLOW_EXPERIMENT_ID. MLflow has no public call to forget
them, so this sets its private module globals (names as of mlflow 3.17.2, `mlflow/tracking/fluent.py` and
`mlflow/tracking/_tracking_service/utils.py`; a newer MLflow that renames them makes `monkeypatch.setattr` fail
loudly here, not silently elsewhere)."""

from __future__ import annotations

import pytest


def forget(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process's tracking URI, active experiment and exported run/experiment ids, cleared for this test
    (monkeypatch restores them after it)."""
    from mlflow.tracking import fluent
    from mlflow.tracking._tracking_service import utils

    monkeypatch.setattr(utils, "_tracking_uri", None)
    monkeypatch.setattr(fluent, "_active_experiment_id", None)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
