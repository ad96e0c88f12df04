"""`mlflow run . -e classify_sweep` end to end on a tiny model: a parent and one `classify` record per learning rate
(x epochs x seed), all on the same data; the parent's table, summary, figures and verdict checked against the
children; the best configuration's classifier registered."""

from __future__ import annotations

import html
import math
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pandas as pd
import pytest
from scipy import stats
from support.checks import assert_metrics_match_predictions
from support.launch import launch_in_own_store
from support.store import download_json, load_table, parent_and_children

from finetune_lab.contract import CONFIG_DIGEST_TAG, DATA_DIGEST_TAG

SWEEP = {"model": "tiny", "dataset": "sample", "learning_rates": "1e-3,2e-4", "epochs": 1, "seeds": 1,
         "max_length": 32, "batch_size": 32, "max_train_samples": 128, "max_eval_samples": 64,
         "register_as": "sentiment-sweep"}
HEADLINE = ["accuracy", "precision", "recall", "f1", "roc_auc", "eval_loss"]
CHILD_ARTIFACTS = {"predictions.json", "confusion_matrix.json", "confusion_matrix.png", "classification_report.json",
                   "config.yaml", "classifier"}

# One worker runs this module (`-n 2 --dist loadgroup`): its tests share one launch.
pytestmark = pytest.mark.xdist_group("classify_sweep_e2e")


@pytest.fixture(scope="module")
def swept(tmp_path_factory, empty_store):
    launched = launch_in_own_store(tmp_path_factory.mktemp("classify_sweep"), empty_store, "classify_sweep", SWEEP,
                                   "clf-sweep")
    assert launched.result.returncode == 0, launched.result.stderr[-3000:]
    runs = launched.runs()
    parent, children = parent_and_children(runs)
    return SimpleNamespace(launched=launched, client=launched.client, parent=parent, children=children)


def test_each_child_is_a_complete_classify_record_on_the_same_data(swept, tmp_path):
    client, parent, children = swept.client, swept.parent, swept.children
    assert parent.info.status == "FINISHED" and len(children) == 2
    assert sorted(r.info.run_name for r in children) == ["lr0.0002-ep1-seed1", "lr0.001-ep1-seed1"]
    assert sorted(float(c.data.params["learning_rate"]) for c in children) == [2e-4, 1e-3]
    texts = []
    for child in children:
        params, metrics = child.data.params, child.data.metrics
        assert child.info.status == "FINISHED" and child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert float(params["epochs"]) == 1.0 and params["seed"] == "1" and params["register_as"] == ""
        for name in [*HEADLINE, "train_runtime_s", "train_samples_per_s", "peak_rss_mb"]:
            assert math.isfinite(metrics[name]), name
        assert len(client.get_metric_history(child.info.run_id, "train_loss")) == 4, "128 examples / 32 per step"
        assert CHILD_ARTIFACTS <= {a.path for a in client.list_artifacts(child.info.run_id)}
        table = load_table(client, child.info.run_id, "predictions.json", tmp_path / child.info.run_id)
        assert_metrics_match_predictions(metrics, table)
        texts.append(list(table["text"]))
        # The same data and held-out split as the parent's, whatever the child's settings.
        assert params["dataset_digest"] == parent.data.params["dataset_digest"]
        assert child.data.tags[DATA_DIGEST_TAG] == parent.data.tags[DATA_DIGEST_TAG]
        assert child.data.tags[CONFIG_DIGEST_TAG] == parent.data.tags[CONFIG_DIGEST_TAG]
        assert params["dataset_digest"] in {i.dataset.digest for i in child.inputs.dataset_inputs}
    assert texts[0] == texts[1] and len(texts[0]) == 64, "every child predicts the same held-out examples"


def test_the_parent_table_summary_and_verdict_come_from_the_children(swept, tmp_path):
    client, parent = swept.client, swept.parent
    by_id = {c.info.run_id: c for c in swept.children}
    table = load_table(client, parent.info.run_id, "comparison_table.json", tmp_path)
    assert list(table.columns[:3]) == ["learning_rate", "epochs", "seed"] and set(table["status"]) == {"FINISHED"}
    for row in table.to_dict("records"):
        child = by_id[row["run_id"]]
        assert row["learning_rate"] == pytest.approx(float(child.data.params["learning_rate"]))
        for name in HEADLINE:
            assert row[name] == pytest.approx(child.data.metrics[name], abs=1e-9), name
    summary = load_table(client, parent.info.run_id, "configuration_summary.json", tmp_path)
    assert len(summary) == 2 and set(summary["seeds"]) == {1}
    for row in summary.to_dict("records"):
        (child,) = [c for c in swept.children if float(c.data.params["learning_rate"]) == row["learning_rate"]]
        for name in HEADLINE:
            assert row[f"{name}_mean"] == pytest.approx(child.data.metrics[name], abs=1e-9), name
            assert pd.isna(row[f"{name}_std"]), "one seed: no spread"

    best = by_id[parent.data.tags["best_run_id"]]
    assert best.data.metrics["accuracy"] == max(c.data.metrics["accuracy"] for c in swept.children)
    assert float(parent.data.tags["best_learning_rate"]) == float(best.data.params["learning_rate"])
    assert parent.data.metrics["best_accuracy"] == pytest.approx(best.data.metrics["accuracy"])
    assert download_json(client, parent.info.run_id, "best_confusion_matrix.json", tmp_path / "parent") == \
        download_json(client, best.info.run_id, "confusion_matrix.json", tmp_path / "best")
    assert parent.data.metrics["failed_children"] == 0
    assert {"metrics_by_configuration.png", "best_confusion_matrix.png", "verdicts.txt", "verdicts.json"} <= {
        a.path for a in client.list_artifacts(parent.info.run_id)}


def test_the_verdict_is_mcnemars_test_on_the_childrens_predictions(swept, tmp_path):
    """One seed each: the held-out test decides, on the 64 examples both children predicted; recomputed from their
    predictions tables."""
    client, parent = swept.client, swept.parent
    record = download_json(client, parent.info.run_id, "verdicts.json", tmp_path / "parent")
    text = Path(client.download_artifacts(parent.info.run_id, "verdicts.txt", str(tmp_path))).read_text()
    (verdict,) = record["verdicts"]
    assert text.splitlines() == record["lines"] == [verdict["line"]] and parent.data.tags["verdict"] == verdict["line"]
    best = parent.data.tags["best_run_id"]
    (other,) = [c for c in swept.children if c.info.run_id != best]
    right = {run_id: (lambda t: (t["label"] == t["prediction"]).to_numpy())(
        load_table(client, run_id, "predictions.json", tmp_path / run_id)) for run_id in (best, other.info.run_id)}
    only_other = int((right[other.info.run_id] & ~right[best]).sum())
    discordant = only_other + int((~right[other.info.run_id] & right[best]).sum())
    expected = stats.binomtest(only_other, discordant, 0.5).pvalue if discordant else 1.0
    assert verdict["seeds"] is None and verdict["decided_by"] == "held_out" and verdict["comparisons"] == 1
    assert verdict["held_out"]["test"] == "mcnemar_exact" and verdict["held_out"]["n"] == [64]
    assert verdict["held_out"]["p_value"] == pytest.approx(expected) == verdict["adjusted_p"]
    assert f"single seed: training noise unmeasured; held-out McNemar p = {expected:.2g} over 64 examples" in \
        verdict["line"]
    assert verdict["shown"] == (expected < 0.05) and record["best_shown_better"] == verdict["shown"]
    assert parent.data.tags["best_shown_better"] == str(verdict["shown"]).lower()


def test_the_best_configuration_is_registered_and_predicts_what_its_run_logged(swept, tmp_path):
    client, parent = swept.client, swept.parent
    (version,) = client.search_model_versions("name='sentiment-sweep'")
    assert version.tags["run_id"] == parent.data.tags["best_run_id"]
    assert parent.data.metrics["registry_reload_max_logit_diff"] == 0.0
    logged = load_table(client, version.tags["run_id"], "predictions.json", tmp_path)
    mlflow.set_tracking_uri(swept.launched.uri)
    served = mlflow.pyfunc.load_model("models:/sentiment-sweep@champion").predict(list(logged["text"][:8]))
    assert list(served["label"]) == list(logged["prediction"][:8])
    assert served["prob_1"].to_numpy() == pytest.approx(logged["prob_1"][:8].to_numpy(), abs=1e-5)


def test_the_report_shows_the_sweep_with_its_verdict(swept, tmp_path):
    from finetune_lab.report.render import write
    from finetune_lab.report.sections import build
    from finetune_lab.report.store import Artifacts

    markdown, _ = write(build(swept.client, ["clf-sweep"], Artifacts(swept.client, tmp_path)), tmp_path / "report")
    text = markdown.read_text()
    assert "Classifier sweep" in text and swept.parent.info.run_id[:8] in text and "Other runs" not in text
    assert f"- **verdict** {html.escape(swept.parent.data.tags['verdict'], quote=False)}" in text


BF16_SWEEP = {**SWEEP, "learning_rates": "1e-3", "precision": "bf16", "register_as": "sentiment-sweep-bf16"}


@pytest.mark.xdist_group("classify_sweep_bf16_e2e")
def test_a_bf16_sweep_registers_its_best_classifier_against_the_logits_its_child_gave(tmp_path_factory,
                                                                                       empty_store):
    """bf16 on a CPU, what a GPU with bf16 runs: the child's reference (taken when it trained, from the model's own
    forward) and the reload of its logged classifier compare equal, exactly; served, the classifier predicts what
    the child logged up to bf16's rounding (the child evaluated under bf16 autocast)."""
    launched = launch_in_own_store(tmp_path_factory.mktemp("classify_sweep_bf16"), empty_store, "classify_sweep",
                                   BF16_SWEEP, "clf-sweep-bf16")
    assert launched.result.returncode == 0, launched.result.stderr[-3000:]
    runs = launched.runs()
    parent, (child,) = parent_and_children(runs)
    assert parent.info.status == child.info.status == "FINISHED"
    assert parent.data.params["effective_precision"] == child.data.params["effective_precision"] == "bf16"
    (version,) = launched.client.search_model_versions("name='sentiment-sweep-bf16'")
    assert version.tags["run_id"] == child.info.run_id and version.tags["reload_device"] == "cpu float32"
    assert parent.data.metrics["registry_reload_max_logit_diff"] == 0.0 == parent.data.metrics[
        "registry_reload_tolerance"]
    logged = load_table(launched.client, child.info.run_id, "predictions.json", launched.folder)
    mlflow.set_tracking_uri(launched.uri)
    served = mlflow.pyfunc.load_model("models:/sentiment-sweep-bf16@champion").predict(list(logged["text"]))
    assert served["prob_1"].to_numpy() == pytest.approx(logged["prob_1"].to_numpy(), abs=1e-3)
