"""Reading a tracking store back: experiments, runs, a sweep's parent and children, JSON and table artifacts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mlflow.entities import Run
    from mlflow.tracking import MlflowClient

PARENT_TAG = "mlflow.parentRunId"


def create_experiment(client: MlflowClient, name: str, tmp_path: Path) -> str:
    """Experiment with artifacts under tmp_path (the sqlite default would be ./mlruns in the repo)."""
    existing = client.get_experiment_by_name(name)
    if existing:
        return existing.experiment_id
    return client.create_experiment(name, artifact_location=(tmp_path / "artifacts" / name).as_uri())


def runs_of(client: MlflowClient, experiment: str) -> list[Run]:
    """The experiment's runs, oldest first."""
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"experiment {experiment!r} was not created"
    return client.search_runs([found.experiment_id], order_by=["attributes.start_time ASC"])


def top_level(runs: list[Run]) -> list[Run]:
    """The runs nested under none (a sweep's parent, a single run)."""
    return [r for r in runs if PARENT_TAG not in r.data.tags]


def children_of(runs: list[Run], parent_id: str | None = None) -> list[Run]:
    """The runs nested directly under run `parent_id`; under any run when it is None."""
    return [r for r in runs if (r.data.tags.get(PARENT_TAG) == parent_id if parent_id else PARENT_TAG in r.data.tags)]


def parent_and_children(runs: list[Run]) -> tuple[Run, list[Run]]:
    """The one top-level run among `runs` (it fails unless there is exactly one) and the nested ones."""
    (parent,) = top_level(runs)
    return parent, children_of(runs)


def download_json(client: MlflowClient, run_id: str, path: str, tmp_path: Path):
    local = client.download_artifacts(run_id, path, str(tmp_path))
    return json.loads(Path(local).read_text())


def load_table(client: MlflowClient, run_id: str, path: str, tmp_path: Path):
    """A `mlflow.log_table` artifact as a pandas DataFrame."""
    import pandas as pd

    table = download_json(client, run_id, path, tmp_path)
    return pd.DataFrame(table["data"], columns=table["columns"])
