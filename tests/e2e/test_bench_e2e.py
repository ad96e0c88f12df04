"""`mlflow run . -e bench -P tiny=true` end to end: one parent, a child per workload x variant, the sweep's own
children under the project variants, and every number of the table consistent with what the runs logged.
Never a timing: the figures are checked against each other and against the runs they summarise."""

from __future__ import annotations

import math
import re
import statistics

import pytest
import torch
from support.launch import launch_in_own_store
from support.store import children_of, load_table, parent_and_children, runs_of
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from finetune_lab import contract
from finetune_lab.experiments import bench

VARIANTS = ["baseline", "project", "project_large"]
PEAK_TFLOPS = 2.0


def linear_params(model_path: str, loader) -> int:
    model = loader.from_pretrained(model_path)
    return sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear))


def table_rows(markdown: str) -> dict[tuple[str, str], list[str]]:
    """(workload, variant) → the row's cells, header and separator skipped."""
    lines = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in markdown.strip().splitlines()]
    assert len(lines[0]) == 3 + len(bench.COLUMNS)
    return {(cells[0], cells[1]): cells for cells in lines[2:]}


def number(cell: str) -> float:
    return float(re.sub(r"[×%\s]", "", cell))


def test_bench_logs_consistent_variants_and_prints_their_table(mlflow_run, client, tmp_path):
    output = tmp_path / "bench.md"
    result = mlflow_run("bench", {"tiny": "true", "peak_tflops": PEAK_TFLOPS, "output": output}, experiment="bench")
    assert result.returncode == 0, result.stderr[-3000:]
    runs = runs_of(client, "bench")
    parent, _ = parent_and_children(runs)
    assert parent.data.tags[contract.KIND_TAG] == contract.BENCH and parent.info.status == "FINISHED"
    # No GPU to warm up here; the precision the device trains in is on record (its peak is what MFU is measured by).
    assert parent.data.metrics["bench_device_warmup_s"] == 0 and parent.data.params["effective_precision"] == "fp32"
    variants = {r.info.run_name: r for r in children_of(runs, parent.info.run_id)}
    assert set(variants) == {f"{w}:{v}" for w in ("classify", "lora_sweep") for v in VARIANTS}
    assert all(r.info.status == "FINISHED" for r in runs)
    metrics = {name: r.data.metrics for name, r in variants.items()}

    for name, logged in metrics.items():
        for metric in contract.BENCH_METRICS + list(contract.BENCH_RATIOS.values()) + ["bench_mfu"]:
            assert metric in logged and math.isfinite(logged[metric]), (name, metric)
        assert logged["bench_tokens_per_s"] == pytest.approx(logged["bench_tokens"] / logged["bench_train_s"])
        assert logged["bench_wall_tokens_per_s"] == pytest.approx(logged["bench_tokens"] / logged["bench_wall_s"])
        assert logged["bench_examples_per_s"] == pytest.approx(logged["bench_examples"] / logged["bench_train_s"])
        assert logged["bench_wall_s"] > logged["bench_train_s"]
        assert logged["bench_mfu"] == pytest.approx(
            logged["bench_flops_per_token"] * logged["bench_steady_tokens_per_s"] / (PEAK_TFLOPS * 1e12))
        workload = name.split(":")[0]
        for speed, ratio in contract.BENCH_RATIOS.items():
            assert logged[ratio] == pytest.approx(logged[speed] / metrics[f"{workload}:baseline"][speed])
            assert parent.data.metrics[f"{name.replace(':', '/')}/{ratio}"] == logged[ratio]

    # The same work for every variant of a workload: every example trained once (per rank), the same real tokens.
    for workload, examples in (("classify", 64), ("lora_sweep", 4 * 32)):
        trained = {(metrics[f"{workload}:{v}"]["bench_examples"], metrics[f"{workload}:{v}"]["bench_tokens"])
                   for v in VARIANTS}
        assert len(trained) == 1 and trained.pop()[0] == examples, (workload, trained)
        # Every variant logs its steps the same way (the baseline too), and what that cost its training loop.
        assert all(metrics[f"{workload}:{v}"]["bench_logging_ms_per_step"] > 0 for v in VARIANTS)
        assert all(metrics[f"{workload}:{v}"]["bench_logging_flush_s"] >= 0 for v in VARIANTS)
    # classify: 64 examples in 4 steps of 16 (2 of 32 in project_large); the synthetic texts are 32 to 64 tokens.
    for variant, batch in (("baseline", 16), ("project", 16), ("project_large", 32)):
        logged = metrics[f"classify:{variant}"]
        assert logged["bench_steps"] == 64 / batch
        assert 32 * logged["bench_examples"] <= logged["bench_tokens"] <= 64 * logged["bench_examples"]
    project = variants["classify:project"].data
    assert project.metrics["bench_tokens"] == project.metrics["train_tokens"], "the entry point's own record"
    assert project.metrics["bench_train_s"] == project.metrics["train_runtime_s"]
    linear = linear_params(project.params["model_path"], AutoModelForSequenceClassification)
    layers_hidden = 2 * 32  # the tiny DistilBERT
    assert project.metrics["bench_flops_per_token"] == pytest.approx(
        6 * linear + 12 * layers_hidden * project.metrics["bench_attended_tokens"])

    # lora_sweep, project variants: the sweep's own parent record and its four children under the variant run.
    for variant in ("project", "project_large"):
        run = variants[f"lora_sweep:{variant}"]
        children = children_of(runs, run.info.run_id)
        assert sorted(int(c.data.params["lora_r"]) for c in children) == [4, 8, 16, 32]
        child = [c.data.metrics for c in children]
        logged = run.data.metrics
        assert logged["bench_tokens"] == sum(c["train_tokens"] for c in child)
        assert logged["bench_train_s"] == pytest.approx(sum(c["train_runtime_s"] for c in child))
        assert logged["child_train_s_sum"] == pytest.approx(logged["bench_train_s"])
        assert logged["bench_wall_s"] >= logged["sweep_wall_s"] > logged["child_train_s_sum"]
        assert logged["bench_steps"] == sum(c["train_steps"] for c in child)
        assert logged["bench_step_ms_median"] == pytest.approx(statistics.median(c["train_step_ms_median"]
                                                                                 for c in child))
        linear = linear_params(run.data.params["model_path"], AutoModelForCausalLM)
        flops = [4 * linear + 6 * c["trainable_params"] + 12 * 2 * 64 * logged["bench_attended_tokens"]
                 for c in child]
        assert logged["bench_flops_per_token"] == pytest.approx(
            sum(f * c["train_tokens"] for f, c in zip(flops, child)) / logged["bench_tokens"])
    assert variants["lora_sweep:project_large"].data.params["batch_tokens"] == "512"
    assert metrics["lora_sweep:baseline"]["bench_steps"] == 4 * 32 / 8 == metrics["lora_sweep:project"]["bench_steps"]
    assert metrics["lora_sweep:project_large"]["bench_steps"] < 4 * 32 / 8, "512-token batches hold more than 8"

    # The table: printed, logged, written to `output`, every cell the logged value as shown.
    markdown = client.download_artifacts(parent.info.run_id, contract.BENCH_TABLE, str(tmp_path))
    markdown = open(markdown).read()
    assert markdown in result.stdout and output.read_text() == markdown
    rows = table_rows(markdown)
    assert set(rows) == {tuple(name.split(":")) for name in variants}
    for (workload, variant), cells in rows.items():
        logged = metrics[f"{workload}:{variant}"]
        for (_, metric), cell in zip(bench.COLUMNS, cells[3:]):
            if metric in logged:
                assert number(cell) == pytest.approx(logged[metric] * (100 if metric == "bench_mfu" else 1),
                                                     rel=0.01, abs=0.06), (workload, variant, metric)
            else:
                assert cell == "–", (workload, variant, metric)
    results = load_table(client, parent.info.run_id, contract.BENCH_RESULTS, tmp_path)
    for row in results.itertuples():
        assert row.run_id == variants[f"{row.workload}:{row.variant}"].info.run_id
        assert row.bench_tokens_per_s == pytest.approx(metrics[f"{row.workload}:{row.variant}"]["bench_tokens_per_s"])


@pytest.mark.xdist_group("bench_bf16_e2e")
def test_bench_in_bf16_runs_the_project_in_bf16_against_the_fp32_baseline(tmp_path_factory, empty_store):
    """`-P precision=bf16` on a CPU: the project's variants train in bf16 (a bf16 LoRA base), the baseline stays the
    fp32 reference, every variant trains the same examples and logs its steps the same way."""
    launched = launch_in_own_store(tmp_path_factory.mktemp("bench_bf16"), empty_store, "bench",
                                   {"tiny": "true", "precision": "bf16", "variants": "baseline,project"},
                                   "bench-bf16")
    assert launched.result.returncode == 0, launched.result.stderr[-3000:]
    runs = launched.runs()
    assert all(r.info.status == "FINISHED" for r in runs)
    parent, _ = parent_and_children(runs)
    assert parent.data.params["effective_precision"] == "bf16" and parent.data.metrics["failed_variants"] == 0
    variants = {r.info.run_name: r for r in children_of(runs, parent.info.run_id)}
    assert set(variants) == {f"{w}:{v}" for w in ("classify", "lora_sweep") for v in ("baseline", "project")}
    sweep_children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == variants[
        "lora_sweep:project"].info.run_id]
    assert len(sweep_children) == 4
    for run in [variants["classify:project"], variants["lora_sweep:project"], *sweep_children]:
        assert run.data.params["effective_precision"] == "bf16", run.info.run_name
    for workload, examples in (("classify", 64), ("lora_sweep", 4 * 32)):
        baseline, project = (variants[f"{workload}:{v}"].data for v in ("baseline", "project"))
        assert baseline.params["effective_precision"] == "fp32"
        assert baseline.metrics["bench_examples"] == project.metrics["bench_examples"] == examples
        assert baseline.metrics["bench_tokens"] == project.metrics["bench_tokens"]
        assert baseline.metrics["bench_logging_ms_per_step"] > 0 and project.metrics["bench_logging_ms_per_step"] > 0
    steps = launched.client.get_metric_history(variants["classify:baseline"].info.run_id, "train_loss")
    assert [m.step for m in steps] == [1, 2, 3, 4], "the baseline's steps, logged as the project's are"
