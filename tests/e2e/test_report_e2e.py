"""`mlflow run . -e report` end to end on a store holding one tiny classification run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from support.store import create_experiment, runs_of

from finetune_lab.config import ClassifyConfig
from finetune_lab.experiments import classify


def test_report_entry_point_reports_the_logged_metrics(mlflow_run, client, tmp_path):
    create_experiment(client, "clf", tmp_path)
    classify.run(ClassifyConfig(model="tiny", dataset="sample", max_train_samples=32, max_eval_samples=16,
                                max_length=32, experiment="clf"))
    os.environ.pop("MLFLOW_EXPERIMENT_ID", None)  # set by mlflow.set_experiment; `mlflow run` would reject it
    (trained,) = runs_of(client, "clf")
    output = tmp_path / "reports"
    result = mlflow_run("report", {"experiments": "clf,nowhere", "output": output}, experiment="reports")
    assert result.returncode == 0, result.stderr[-3000:]

    (run,) = runs_of(client, "reports")
    assert run.info.status == "FINISHED" and run.info.run_id in result.stdout
    assert run.data.params["experiments"] == "clf,nowhere"
    markdown = (output / "report.md").read_text()
    html = (output / "report.html").read_text()
    assert "## Experiment `nowhere`\n\nNot found in the tracking store." in markdown
    header, _, row = markdown.split("### Classification runs (1)\n\n", 1)[1].splitlines()[:3]
    cells = dict(zip(header.strip("| ").split(" | "), row.strip("| ").split(" | ")))
    assert cells["run id"] == trained.info.run_id[:8]
    for metric in ("accuracy", "f1", "roc_auc", "eval_loss", "peak_rss_mb", "train_runtime_s"):
        assert float(cells[metric]) == pytest.approx(trained.data.metrics[metric], rel=1e-5), metric
    assert "- **verdict** accuracy: one configuration only, nothing to compare" in markdown
    assert html.count('src="data:image/png;base64,') == 1 and "src=\"http" not in html
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"report.md", "report.html", "report_images"} <= artifacts
    logged = client.download_artifacts(run.info.run_id, "report.html", str(tmp_path / "logged"))
    assert Path(logged).read_text() == html
