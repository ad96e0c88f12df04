"""Reading runs back from the tracking store: an experiment's top-level runs and their children, each run's kind
(the tag the experiment set), and its artifacts."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from finetune_lab import held_out
from finetune_lab.contract import KIND_TAG

OTHER = "other"


@dataclass
class ExperimentRuns:
    name: str
    top: list[Run] = field(default_factory=list)
    children: dict[str, list[Run]] = field(default_factory=dict)
    """Parent run id → its child runs, oldest first."""

    def children_of(self, parent: Run) -> list[Run]:
        return self.children.get(parent.info.run_id, [])


def read_experiment(client: MlflowClient, name: str, skip_run_id: str) -> ExperimentRuns | None:
    """All active runs of experiment `name` (oldest first), top-level runs apart from children; None if missing."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        return None
    found, token = ExperimentRuns(name), None
    while True:
        page = client.search_runs([experiment.experiment_id], max_results=1000, page_token=token,
                                  order_by=["attributes.start_time ASC"])
        for logged in page:
            if logged.info.run_id == skip_run_id:
                continue
            parent = logged.data.tags.get(MLFLOW_PARENT_RUN_ID)
            if parent:
                found.children.setdefault(parent, []).append(logged)
            else:
                found.top.append(logged)
        token = page.token
        if not token:
            return found


def kind_of(logged: Run) -> str:
    """The experiment that made a top-level run (`contract.KIND_TAG`); runs made elsewhere are `other`."""
    return logged.data.tags.get(KIND_TAG, OTHER)


def label(logged: Run) -> str:
    return logged.info.run_name or logged.info.run_id[:8]


class Artifacts:
    """Top-level artifacts of runs, downloaded into a scratch folder; None where a run lacks one. The per-example
    held-out records of runs (`records`) come through `held_out`, as the sweeps and the registry read them."""

    def __init__(self, client: MlflowClient, scratch: Path):
        self.client, self.scratch = client, scratch
        self.records = held_out.Records(client)
        """The runs' per-example held-out records, each read once per report."""

    def raw(self, logged: Run, path: str) -> bytes | None:
        """The bytes of a top-level artifact."""
        if path not in {a.path for a in self.client.list_artifacts(logged.info.run_id)}:
            return None
        local = self.client.download_artifacts(logged.info.run_id, path, str(self.scratch / logged.info.run_id))
        return Path(local).read_bytes()

    def json(self, logged: Run, path: str):
        data = self.raw(logged, path)
        return None if data is None else json.loads(data)

    def table(self, logged: Run, path: str) -> pd.DataFrame | None:
        """A `mlflow.log_table` artifact as a DataFrame."""
        table = self.json(logged, path)
        return None if table is None else pd.DataFrame(table["data"], columns=table["columns"])
