"""`mlflow run . -e lora_sweep -P methods=...` end to end on a tiny Llama: one child per method (at one rank), each
logging what a rank child logs plus its method; the base untouched between children (PiSSA and OLoRA change it
while they train); every logged adapter reproduces its child's held-out loss on the untouched base; the best one
registered and answering through `generate`."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner
from scipy import stats
from support.launch import launch_in_own_store
from support.paths import entrypoint
from support.store import download_json, load_table, parent_and_children

from finetune_lab import causal_lm, lora, models, training
from finetune_lab.config import LoraSweepConfig

METHODS = ["pissa", "olora", "dora", "rslora", "lora"]
SWEEP = {"model": "tiny", "dataset": "sample_chat", "methods": ",".join(METHODS), "ranks": 2, "seeds": 1,
         "max_steps": 4, "batch_size": 8, "max_length": 48, "learning_rate": 1e-3, "register_as": "methods"}
NAMES = {"pissa": "pissa-r2-seed1", "olora": "olora-r2-seed1", "dora": "dora-r2-seed1", "rslora": "rslora-r2-seed1",
         "lora": "r2-seed1"}

# One worker runs this module (`-n 2 --dist loadgroup`): its tests share one launch.
pytestmark = pytest.mark.xdist_group("lora_methods_e2e")


@pytest.fixture(scope="module")
def swept(tmp_path_factory, empty_store):
    launched = launch_in_own_store(tmp_path_factory.mktemp("lora_methods"), empty_store, "lora_sweep", SWEEP,
                                   "methods")
    assert launched.result.returncode == 0, launched.result.stderr[-3000:]
    runs = launched.runs()
    parent, children = parent_and_children(runs)
    children = {r.data.params["lora_method"]: r for r in children}
    return SimpleNamespace(launched=launched, client=launched.client, parent=parent, children=children)


def test_one_child_per_method_with_the_record_of_a_rank_child(swept, tmp_path):
    client, children = swept.client, swept.children
    assert sorted(children) == sorted(METHODS)
    for method, child in children.items():
        assert child.info.status == "FINISHED" and child.info.run_name == NAMES[method]
        assert child.data.params["lora_r"] == "2"
        for name in ["eval_loss", "train_loss", "trainable_params", "adapter_size_bytes", "train_step_ms_median",
                     "peak_rss_mb"]:
            assert math.isfinite(child.data.metrics[name]), (method, name)
    metrics = {m: c.data.metrics for m, c in children.items()}
    assert metrics["dora"]["trainable_params"] > metrics["lora"]["trainable_params"], "DoRA adds magnitude vectors"
    assert metrics["rslora"]["trainable_params"] == metrics["lora"]["trainable_params"]
    assert float(children["rslora"].data.params["lora_scale"]) == pytest.approx(4 / math.sqrt(2)), "alpha / sqrt(r)"
    assert float(children["lora"].data.params["lora_scale"]) == 2.0
    for method in ("pissa", "olora"):
        # logged converted to a plain LoRA adapter of twice the rank, applied to the untouched base
        folder = client.download_artifacts(children[method].info.run_id, "adapter", str(tmp_path / method))
        settings = json.loads((Path(folder) / "adapter_config.json").read_text())
        assert settings["r"] == 4 and settings["init_lora_weights"] is True
        assert metrics[method]["adapter_conversion_max_logit_diff"] <= 1e-3

    # Every child starts from the base model's output (B = 0, DoRA's magnitudes at the weights' norms): equal first
    # losses for one seed prove that PiSSA and OLoRA, trained before them, left the base as it was. PiSSA / OLoRA
    # start from it too (residual weights + their adapter), up to the dropout on their non-zero adapter's input.
    first = {m: client.get_metric_history(c.info.run_id, "train_loss")[0] for m, c in children.items()}
    assert {f.step for f in first.values()} == {1}
    for method in METHODS:
        close = {"rel": 1e-3} if method in ("pissa", "olora") else {"abs": 1e-6}
        assert first[method].value == pytest.approx(first["lora"].value, **close), method


def test_the_parent_groups_by_method_and_rank_and_compares_methods(swept, tmp_path):
    client, parent = swept.client, swept.parent
    by_id = {c.info.run_id: c for c in swept.children.values()}
    table = load_table(client, parent.info.run_id, "comparison_table.json", tmp_path)
    assert list(table.columns[:3]) == ["method", "rank", "seed"] and list(table["method"]) == METHODS
    for row in table.to_dict("records"):
        child = by_id[row["run_id"]]
        assert child.data.params["lora_method"] == row["method"]
        for name in ["eval_loss", "trainable_params", "adapter_size_bytes", "train_step_ms_median"]:
            assert row[name] == pytest.approx(child.data.metrics[name]), name
    summary = load_table(client, parent.info.run_id, "rank_summary.json", tmp_path)
    assert sorted(summary["method"]) == sorted(METHODS) and set(summary["rank"]) == {2}
    best = by_id[parent.data.tags["best_run_id"]]
    assert best.data.metrics["eval_loss"] == min(c.data.metrics["eval_loss"] for c in swept.children.values())
    assert parent.data.tags["best_method"] == best.data.params["lora_method"]
    assert {"methods_by_rank.png", "loss_vs_rank.png", "rank_summary.json"} <= {
        a.path for a in client.list_artifacts(parent.info.run_id)}


def test_one_seed_each_the_methods_are_compared_on_the_held_out_examples(swept, tmp_path):
    """Four comparisons with the best method at rank 2, each the paired t-test of the per-example held-out losses
    the children logged (one seed: training's noise unmeasured), Holm-adjusted over the four; recomputed here."""
    client, parent = swept.client, swept.parent
    lines = Path(client.download_artifacts(parent.info.run_id, "verdicts.txt", str(tmp_path))).read_text().splitlines()
    record = download_json(client, parent.info.run_id, "verdicts.json", tmp_path / "record")
    assert lines == record["lines"] and len(lines) == len(METHODS) - 1
    assert all(line.startswith("rank 2: method=") and "single seed: training noise unmeasured; held-out paired t p = "
               in line for line in lines)
    best = parent.data.tags["best_method"]
    assert record["best_configuration"] == f"method={best}" and parent.data.tags["verdict"] == lines[0]
    losses = {method: np.array([np.nan if x is None else x for x in download_json(
        client, child.info.run_id, "held_out_losses.json", tmp_path / method)["loss"]], dtype=float)
        for method, child in swept.children.items()}
    raw = {}
    for verdict in record["verdicts"]:
        method = verdict["configuration"].removeprefix("method=")
        both = np.isfinite(losses[method]) & np.isfinite(losses[best])  # examples whose targets were cut: no loss
        expected = stats.ttest_rel(losses[method][both], losses[best][both])
        assert verdict["held_out"]["p_value"] == pytest.approx(expected.pvalue), method
        assert verdict["held_out"]["ci95"] == pytest.approx(list(expected.confidence_interval(0.95)))
        assert verdict["decided_by"] == "held_out" and verdict["family"] == "rank 2" and verdict["comparisons"] == 4
        raw[method] = expected.pvalue
    ranked = sorted(raw, key=raw.get)
    holm = {}
    for rank, method in enumerate(ranked):
        holm[method] = max([min(1.0, (len(ranked) - rank) * raw[method]), *(holm[m] for m in ranked[:rank])])
    for verdict in record["verdicts"]:
        assert verdict["adjusted_p"] == pytest.approx(holm[verdict["configuration"].removeprefix("method=")])
    assert record["best_shown_better"] == record["verdicts"][0]["shown"]
    assert parent.data.tags["best_shown_better"] == str(record["best_shown_better"]).lower()


def test_every_logged_adapter_gives_its_held_out_loss_on_the_untouched_base(swept, tmp_path):
    """Each method's adapter as logged, on a base loaded afresh: the held-out loss its child logged."""
    client, parent = swept.client, swept.parent
    config = LoraSweepConfig(**{**{k: v for k, v in SWEEP.items() if k not in ("methods", "ranks", "seeds")},
                            "ranks": (2,), "seeds": (1,)})
    source = models.ModelSource("tiny", parent.data.params["model_path"], "")
    prepared = causal_lm.prepare(config, config.ranks, 1)
    base, tokenizer = causal_lm.load_base(source, "fp32")
    held_out = causal_lm.tokenize(prepared.data.splits, tokenizer, config)["test"]
    for method, child in swept.children.items():
        folder = client.download_artifacts(child.info.run_id, "adapter", str(tmp_path / method))
        with lora.loaded(base, folder) as model:
            losses = training.example_losses(model, held_out, causal_lm.collator(tokenizer, config),
                                             training.eval_batch_size(config), "fp32")
        assert losses.mean == pytest.approx(child.data.metrics["eval_loss"], abs=1e-5), method
        record = download_json(client, child.info.run_id, "held_out_losses.json", tmp_path / f"{method}-record")
        assert record["eval_set_digest"] == parent.data.tags["finetune_lab.data_digest"].split("/")[1]
        assert record["target_tokens"] == list(losses.targets)
        assert [x for x in record["loss"]] == pytest.approx(list(losses.per_example), abs=1e-5), method


def test_the_best_adapter_is_registered_and_generates(swept, monkeypatch):
    client, parent = swept.client, swept.parent
    (version,) = client.search_model_versions("name='methods'")
    assert version.tags["method"] == parent.data.tags["best_method"]
    assert version.tags["run_id"] == parent.data.tags["best_run_id"]
    assert parent.data.metrics["registry_reload_max_logit_diff"] == 0.0
    monkeypatch.setenv("MLFLOW_TRACKING_URI", swept.launched.uri)
    monkeypatch.chdir(swept.launched.folder)
    answered = CliRunner().invoke(entrypoint("generate").main, ["--model-uri", "models:/methods@champion",
                                                                "--max-new-tokens", "5", "--experiment", "gen"])
    assert answered.exit_code == 0, answered.output
    assert "reply:" in answered.output


def test_the_report_shows_each_method_and_rank(swept, tmp_path):
    from finetune_lab.report.render import write
    from finetune_lab.report.sections import build
    from finetune_lab.report.store import Artifacts

    markdown, _ = write(build(swept.client, ["methods"], Artifacts(swept.client, tmp_path)), tmp_path / "report")
    text = markdown.read_text()
    for label in ("pissa-r2", "olora-r2", "dora-r2", "rslora-r2"):
        assert f"| {label} |" in text, label
    record = download_json(swept.client, swept.parent.info.run_id, "verdicts.json", tmp_path / "record")
    assert [line.removeprefix("- **verdict** ") for line in text.splitlines() if line.startswith("- **verdict**")] \
        == record["lines"], "the parent's lines"
