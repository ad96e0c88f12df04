"""`mlflow run . -e lora_sweep` end to end on a tiny Llama: parent + one child per rank x seed."""

from __future__ import annotations

import math
import re
import signal
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pandas as pd
import psutil
import pytest
import torch
from scipy import stats
from support.checks import adapter_on_base, greedy_reply
from support.launch import launch_in_own_store, launch_in_store_of, mlflow_run_command
from support.store import children_of, download_json, load_table, parent_and_children, runs_of, top_level
from transformers import AutoModelForCausalLM

from finetune_lab import device

SWEEP = {"model": "tiny", "dataset": "sample_chat", "ranks": "2,4", "seeds": "1,2", "max_steps": 6, "batch_size": 8,
         "max_length": 64, "learning_rate": 1e-3}
CHILD_METRICS = ["train_loss", "eval_loss", "eval_perplexity", "train_tokens_per_s", "train_runtime_s", "peak_rss_mb",
                 "adapter_size_bytes", "trainable_params"]
CHILD_PARAMS = ["lora_r", "lora_alpha", "lora_scale", "target_modules", "seed", "trainable_percent"]


def expected_trainable(model_path: str, rank: int) -> int:
    """LoRA adds A (r x d_in) and B (d_out x r) to every targeted linear layer: r * (d_in + d_out) each."""
    base = AutoModelForCausalLM.from_pretrained(model_path)
    head = base.get_output_embeddings()
    return sum(rank * (m.in_features + m.out_features) for m in base.modules()
               if isinstance(m, torch.nn.Linear) and m is not head)


def test_sweep_parent_children_metrics_and_summary(mlflow_run, client, tmp_path):
    result = mlflow_run("lora_sweep", SWEEP, experiment="sweep")
    assert result.returncode == 0, result.stderr[-3000:]
    runs = runs_of(client, "sweep")
    parents = top_level(runs)
    children = children_of(runs)
    assert len(parents) == 1 and len(children) == 4
    parent = parents[0]
    assert all(r.info.status == "FINISHED" for r in runs)
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert sorted((int(c.data.params["lora_r"]), int(c.data.params["seed"])) for c in children) == [
        (2, 1), (2, 2), (4, 1), (4, 2)]

    for child in children:
        metrics, params = child.data.metrics, child.data.params
        for name in CHILD_METRICS:
            assert name in metrics and math.isfinite(metrics[name]), name
        for name in CHILD_PARAMS:
            assert name in params, name
        assert metrics["eval_perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]))
        rank = int(params["lora_r"])
        # default alpha_per_rank=2: alpha = 2r, the same scale 2 at every rank
        assert float(params["lora_alpha"]) == 2 * rank and float(params["lora_scale"]) == 2.0
        assert metrics["trainable_params"] == expected_trainable(parent.data.params["model_path"], rank)
        assert "trainable_params" not in params, "a metric only: the compare view lists it once"
        files = {Path(a.path).name for a in client.list_artifacts(child.info.run_id, "adapter")}
        assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= files
        assert "model.safetensors" not in files, "the adapter folder must not hold base weights"
        weights = client.list_artifacts(child.info.run_id, "adapter")
        size = next(a.file_size for a in weights if a.path.endswith("adapter_model.safetensors"))
        assert metrics["adapter_size_bytes"] == size
        assert len(client.get_metric_history(child.info.run_id, "train_loss")) >= 2

    by_key = {(int(c.data.params["lora_r"]), int(c.data.params["seed"])): c for c in children}
    assert by_key[(4, 1)].data.metrics["trainable_params"] == 2 * by_key[(2, 1)].data.metrics["trainable_params"]
    # Every child starts from a fresh adapter (B = 0) on the same base and the same data order for its seed, so
    # the loss of the first step is the base model's and equal across ranks: a leftover adapter would change it.
    for seed in (1, 2):
        first = [client.get_metric_history(by_key[(r, seed)].info.run_id, "train_loss")[0] for r in (2, 4)]
        assert first[0].step == first[1].step == 1
        assert first[0].value == pytest.approx(first[1].value, abs=1e-6)

    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"comparison_table.json", "rank_summary.json", "loss_vs_rank.png", "memory_vs_rank.png",
            "loss_curves.png"} <= artifacts
    table = load_table(client, parent.info.run_id, "comparison_table.json", tmp_path)
    assert len(table) == 4 and set(table["status"]) == {"FINISHED"}
    for row in table.itertuples():
        assert row.eval_loss == pytest.approx(client.get_run(row.run_id).data.metrics["eval_loss"])

    # The per-rank summary is the mean / std of the children's own logged metrics.
    summary = load_table(client, parent.info.run_id, "rank_summary.json", tmp_path).set_index("rank")
    logged = pd.DataFrame([{"rank": int(c.data.params["lora_r"]), "eval_loss": c.data.metrics["eval_loss"],
                            "train_loss": c.data.metrics["train_loss"]} for c in children])
    for rank, group in logged.groupby("rank"):
        assert summary.loc[rank, "seeds"] == 2
        assert summary.loc[rank, "eval_loss_mean"] == pytest.approx(group["eval_loss"].mean())
        # log_table writes JSON with 10 decimals: a tiny spread keeps fewer significant digits
        assert summary.loc[rank, "eval_loss_std"] == pytest.approx(group["eval_loss"].std(ddof=1), abs=1e-10)
        assert summary.loc[rank, "train_loss_mean"] == pytest.approx(group["train_loss"].mean())
    best_rank = int(summary["eval_loss_mean"].idxmin())
    assert parent.data.tags["best_rank"] == str(best_rank) and parent.data.metrics["best_rank"] == best_rank
    best_run = client.get_run(parent.data.tags["best_run_id"])
    assert int(best_run.data.params["lora_r"]) == best_rank
    assert parent.data.metrics["failed_children"] == 0

    # The verdict: Welch's test on the two ranks' eval losses over their seeds decides; the paired test on the
    # children's per-example held-out losses, each rank's seeds averaged, is beside it. Both recomputed here.
    other_rank = ({2, 4} - {best_rank}).pop()
    record = download_json(client, parent.info.run_id, "verdicts.json", tmp_path / "verdicts")
    (verdict,) = record["verdicts"]
    assert verdict["configuration"] == f"rank={other_rank}" and verdict["reference"] == f"rank={best_rank}"
    losses = {rank: [c.data.metrics["eval_loss"] for c in children if int(c.data.params["lora_r"]) == rank]
              for rank in (2, 4)}
    welch = stats.ttest_ind(losses[other_rank], losses[best_rank], equal_var=False)
    assert verdict["seeds"]["p_value"] == pytest.approx(welch.pvalue) and verdict["decided_by"] == "seeds"
    assert verdict["seeds"]["ci95"] == pytest.approx(list(welch.confidence_interval(0.95)))
    pooled = {rank: np.mean([[np.nan if x is None else x for x in download_json(
        client, c.info.run_id, "held_out_losses.json", tmp_path / c.info.run_id)["loss"]]
        for c in children if int(c.data.params["lora_r"]) == rank], axis=0) for rank in (2, 4)}
    both = np.isfinite(pooled[2]) & np.isfinite(pooled[4])
    paired = stats.ttest_rel(pooled[other_rank][both], pooled[best_rank][both])
    assert verdict["held_out"]["p_value"] == pytest.approx(paired.pvalue) and verdict["held_out"]["n"] == [
        int(both.sum())]
    assert verdict["shown"] == (welch.pvalue < 0.05) and record["lines"] == [verdict["line"]]
    assert parent.data.tags["verdict"] == verdict["line"]
    assert parent.data.tags["best_shown_better"] == str(verdict["shown"]).lower()
    for child in children:  # eval_loss is the token-weighted mean of the child's per-example losses
        logged = download_json(client, child.info.run_id, "held_out_losses.json", tmp_path / child.info.run_id)
        counted = [(loss, n) for loss, n in zip(logged["loss"], logged["target_tokens"]) if n]
        assert sum(loss * n for loss, n in counted) / sum(n for _, n in counted) == pytest.approx(
            child.data.metrics["eval_loss"], rel=1e-6)
    # The sweep's whole wall time, and the part of it the children spent training.
    child_train = sum(c.data.metrics["train_runtime_s"] for c in children)
    assert parent.data.metrics["child_train_s_sum"] == pytest.approx(child_train)
    assert parent.data.metrics["sweep_wall_s"] > child_train


def wait_for(condition, timeout_s: float, what: str):
    """Poll `condition()` until it returns something truthy; fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_sigterm_under_mlflow_run_keeps_the_error_tag_and_the_finished_children(client, tmp_path):
    """`kill <pid>` of the entry point that `mlflow run` started, while its second child trains: the child ends
    KILLED with the metrics of every step it trained (they are written asynchronously: flushed on the way out),
    the parent summarises what finished; MLflow's wrapper then overwrites the parent's KILLED with FAILED
    (mlflow 3.17.2), but our `error` tag stays."""
    params = {**SWEEP, "ranks": "2,4,8", "seeds": "1", "max_steps": 40}
    command, env = mlflow_run_command(client, tmp_path, "lora_sweep", params, "sigterm-e2e")
    launched = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
    try:
        experiment_id = client.get_experiment_by_name("sigterm-e2e").experiment_id

        def second_child_training():
            runs = client.search_runs([experiment_id])
            children = children_of(runs)
            running = [r for r in children if r.info.status == "RUNNING" and "train_loss" in r.data.metrics]
            return running and any(r.info.status == "FINISHED" for r in children) and running[0]

        training_child = wait_for(second_child_training, 600, "the second child to train")
        (entry_point,) = [p for p in psutil.Process(launched.pid).children(recursive=True)
                          if any(part.endswith("lora_sweep.py") for part in p.cmdline())]
        killed_at_ms = int(time.time() * 1000)
        entry_point.send_signal(signal.SIGTERM)
        output, _ = launched.communicate(timeout=300)
    finally:
        if launched.poll() is None:
            launched.kill()
    assert launched.returncode != 0, output[-3000:]
    assert "error: terminated by SIGTERM" in output

    runs = runs_of(client, "sigterm-e2e")
    assert not [r for r in runs if r.info.status == "RUNNING"]
    parent, _ = parent_and_children(runs)
    assert parent.info.status == "FAILED", "mlflow run's wrapper turns a KILLED parent into FAILED"
    assert parent.data.tags["error"] == "terminated by SIGTERM"
    killed = client.get_run(training_child.info.run_id)
    assert killed.info.status == "KILLED" and killed.data.tags["error"] == "terminated by SIGTERM"
    stopped = re.search(r"training stopped at step (\d+) of 40; its step metrics are logged up to step (\d+)", output)
    assert stopped, output[-3000:]
    reached, logged = int(stopped[1]), int(stopped[2])
    seen_at_kill = max(m.step for m in client.get_metric_history(training_child.info.run_id, "train_loss")
                       if m.timestamp <= killed_at_ms)
    assert reached - 1 <= logged <= reached and logged >= seen_at_kill, (reached, logged, seen_at_kill)
    history = client.get_metric_history(training_child.info.run_id, "train_loss")
    assert sorted(m.step for m in history) == list(range(1, logged + 1)), "every step up to the kill, once"
    table = load_table(client, parent.info.run_id, "comparison_table.json", tmp_path)
    assert len(table) == 3 and "FINISHED" in set(table["status"]) and "KILLED" in set(table["status"])
    assert parent.data.tags["best_run_id"] in set(table[table["status"] == "FINISHED"]["run_id"])



# bf16 on a CPU: what a GPU with bf16 runs (a bf16 frozen base, bf16 autocast), registered, then answered by
# `generate` from the registry; in an xdist group of its own (its launches share nothing with the tests above).
BF16_SWEEP = {"model": "tiny", "dataset": "sample_chat", "ranks": 2, "seeds": 7, "max_steps": 12, "batch_size": 8,
              "max_length": 48, "learning_rate": 1e-2, "precision": "bf16", "register_as": "chat-bf16"}
BF16_GENERATE = {"model_uri": "models:/chat-bf16@champion", "prompt": "Hello, how are you?", "max_new_tokens": 8,
                 "precision": "bf16"}


@pytest.fixture(scope="module")
def bf16_registered(tmp_path_factory, empty_store):
    """The bf16 sweep with its registration, then `generate` from the registered adapter in the same store."""
    swept = launch_in_own_store(tmp_path_factory.mktemp("lora_bf16"), empty_store, "lora_sweep", BF16_SWEEP,
                                "sweep-bf16")
    assert swept.result.returncode == 0, swept.result.stderr[-3000:]
    runs = swept.runs()
    parent, (child,) = parent_and_children(runs)
    answered = launch_in_store_of(swept.folder, "generate", BF16_GENERATE, "generate-bf16")
    return SimpleNamespace(swept=swept, answered=answered, client=swept.client, parent=parent, child=child)


@pytest.mark.xdist_group("lora_sweep_bf16_e2e")
def test_a_bf16_sweep_registers_an_adapter_that_serves_as_its_reference_computed(bf16_registered, tmp_path):
    client, parent, child = bf16_registered.client, bf16_registered.parent, bf16_registered.child
    assert parent.info.status == child.info.status == "FINISHED"
    assert parent.data.params["effective_precision"] == child.data.params["effective_precision"] == "bf16"
    (version,) = client.search_model_versions("name='chat-bf16'")
    # The reference came from the bf16 base the child trained on, the reload was made in bf16: equal, exactly.
    assert version.tags["reload_device"] == "cpu bfloat16" and version.tags["run_id"] == child.info.run_id
    assert float(version.tags["reload_max_logit_diff"]) == 0.0 == float(version.tags["reload_tolerance"])

    # Served in bf16 it computes what the logged adapter on the bf16 base computes; on a CPU by default, in fp32.
    model, tokenizer = adapter_on_base(client, child.info.run_id, parent.data.params["model_path"], tmp_path,
                                       torch.bfloat16)
    text = f"{BF16_GENERATE['prompt']}\n"
    with torch.no_grad():
        expected = model(**tokenizer(text, return_tensors="pt")).logits.float()
    mlflow.set_tracking_uri(bf16_registered.swept.uri)
    with device.serving_on("cpu", "bf16"):
        served = mlflow.pyfunc.load_model("models:/chat-bf16@champion").unwrap_python_model()
    assert served.model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert torch.equal(served.logits(text), expected)
    with device.serving_on("cpu", "auto"):
        served = mlflow.pyfunc.load_model("models:/chat-bf16@champion").unwrap_python_model()
    assert served.model.get_input_embeddings().weight.dtype == torch.float32


@pytest.mark.xdist_group("lora_sweep_bf16_e2e")
def test_generate_answers_from_the_bf16_adapter_in_bf16(bf16_registered, tmp_path):
    answered = bf16_registered.answered
    assert answered.result.returncode == 0, answered.result.stderr[-3000:]
    (run,) = answered.runs()
    assert run.info.status == "FINISHED" and run.data.params["effective_precision"] == "bf16"
    model, tokenizer = adapter_on_base(bf16_registered.client, bf16_registered.child.info.run_id,
                                       bf16_registered.parent.data.params["model_path"], tmp_path, torch.bfloat16)
    reply = greedy_reply(model, tokenizer, BF16_GENERATE["prompt"], BF16_GENERATE["max_new_tokens"])
    assert reply and run.data.tags["reply"] == reply
