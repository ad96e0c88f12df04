"""The `report` entry point: read the runs of some experiments back from the tracking store and write one
side-by-side report, `report.md` (images next to it) and `report.html` (one file, images embedded), logged as
the artifacts of the report's own run. No training.

Recipe: find each experiment's runs (`store`) → sort the top-level runs by the kind their experiment tagged
them with → per kind a table of runs, figures and one verdict line per comparison (`sections`, `verdicts`) →
render markdown and HTML (`render`).
"""

from __future__ import annotations

from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from finetune_lab import contract, tracking
from finetune_lab.config import ReportConfig
from finetune_lab.errors import raise_if_any
from finetune_lab.report.render import IMAGES, Bullets, write
from finetune_lab.report.sections import build
from finetune_lab.report.store import Artifacts
from finetune_lab.schema import as_params


def write_report(config: ReportConfig) -> dict:
    """Build the report inside its own MLflow run and log it as that run's artifacts."""
    with tracking.experiment_run(contract.REPORT, config.experiment, config.run_name) as active:
        tracking.log_config(as_params(config))
        raise_if_any(config.problems())
        client = MlflowClient()
        with tracking.scratch_dir("report") as scratch:
            blocks = build(client, config.experiment_list, Artifacts(client, scratch), skip_run_id=active.info.run_id)
        markdown, page = write(blocks, Path(config.output))
        mlflow.log_artifact(str(markdown))
        mlflow.log_artifact(str(page))
        mlflow.log_artifacts(str(markdown.parent / IMAGES), IMAGES)
        found = [e for e in config.experiment_list if client.get_experiment_by_name(e) is not None]
        summary = {"experiments_found": len(found), "experiments_missing": len(config.experiment_list) - len(found),
                   "verdicts": sum(len(b.items) for b in blocks if isinstance(b, Bullets))}
        mlflow.log_metrics(summary)
        return {"run_id": active.info.run_id, "metrics": summary,
                "notes": [f"report: {markdown.resolve()}", f"        {page.resolve()}"],
                "ui": tracking.ui_hint(active.info.experiment_id)}
