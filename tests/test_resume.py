"""`resume`: an interrupted sweep goes on in its own parent run, reusing the children it finished with the same config
and data and rerunning the killed, failed and missing ones; a different config or data is refused, saying what
differs; a reused child registers after its logged adapter is checked."""

from __future__ import annotations

import shutil

import mlflow
import pytest
import torch
from click.testing import CliRunner
from support.paths import entrypoint
from support.store import children_of, load_table, runs_of

from finetune_lab import lora, prompts
from finetune_lab.config import LoraSweepConfig, ProbeConfig
from finetune_lab.contract import KIND_TAG, RESUMED_TAG
from finetune_lab.data import SAMPLES
from finetune_lab.experiments import lora_sweep, probe

ARGS = ["--model", "tiny", "--ranks", "2,4,8", "--seeds", "3", "--max-steps", "4", "--batch-size", "8",
        "--max-length", "48", "--learning-rate", "1e-2", "--experiment", "resume"]


def sweep_cli(*args: str):
    return CliRunner().invoke(entrypoint("lora_sweep").main, [*ARGS, *args])


@pytest.mark.slow  # trains repeatedly: a sweep stopped by SIGTERM, then resumed
def test_resume_reruns_only_the_children_that_did_not_finish(client, tmp_path, sigterm_at_second_child):
    chat = tmp_path / "chat.jsonl"
    shutil.copy(SAMPLES["sample_chat"], chat)
    assert sweep_cli("--dataset", str(chat)).exit_code == 143  # r2 finished, r4 killed, r8 never started
    (parent,) = runs_of(client, "resume")[:1]
    first = {r.data.tags["mlflow.runName"]: r for r in children_of(runs_of(client, "resume"))}
    assert {name: r.info.status for name, r in first.items()} == {"r2-seed3": "FINISHED", "r4-seed3": "KILLED"}

    sigterm_at_second_child.disarm()
    resumed = sweep_cli("--dataset", str(chat), "--resume", "latest")
    assert resumed.exit_code == 0, resumed.output
    assert f"resumed {parent.info.run_id}" in resumed.output

    runs = runs_of(client, "resume")
    assert not [r for r in runs if r.info.status == "RUNNING"]
    (attempt,) = [r for r in runs if r.data.tags.get(KIND_TAG) == "resume"]
    assert attempt.data.tags[RESUMED_TAG] == parent.info.run_id and attempt.info.status == "FINISHED"
    parent = client.get_run(parent.info.run_id)
    assert parent.info.status == "FINISHED" and "error" not in parent.data.tags
    children = children_of(runs, parent.info.run_id)
    assert sorted((r.data.tags["mlflow.runName"], r.info.status) for r in children) == [
        ("r2-seed3", "FINISHED"), ("r4-seed3", "FINISHED"), ("r4-seed3", "KILLED"), ("r8-seed3", "FINISHED")]
    assert [r.info.run_id for r in children if r.data.tags["mlflow.runName"] == "r2-seed3"] == [
        first["r2-seed3"].info.run_id], "the finished child is reused, not trained again"

    table = load_table(client, parent.info.run_id, "comparison_table.json", tmp_path)
    assert list(zip(table["rank"], table["status"], table["reused"])) == [
        (2, "FINISHED", True), (4, "FINISHED", False), (8, "FINISHED", False)]
    finished = {r.data.tags["mlflow.runName"]: r for r in children if r.info.status == "FINISHED"}
    for row in table.itertuples():
        child = finished[f"r{row.rank}-seed3"]
        assert row.run_id == child.info.run_id and row.eval_loss == pytest.approx(child.data.metrics["eval_loss"])
    summary = load_table(client, parent.info.run_id, "rank_summary.json", tmp_path)
    assert list(summary["rank"]) == [2, 4, 8] and list(summary["seeds"]) == [1, 1, 1]
    assert parent.data.tags["best_run_id"] in set(table["run_id"]) and "failed_children" not in parent.data.tags

    # Refused, saying what differs; the parent is left as it was, the attempt's own run ends FAILED.
    other_config = sweep_cli("--dataset", str(chat), "--resume", "latest", "--learning-rate", "0.001")
    assert other_config.exit_code == 2
    assert (f"error: resume: no sweep parent run in this experiment was made with this config; the newest, "
            f"{parent.info.run_id}, differs: learning_rate 0.01 (now 0.001)") in other_config.output
    chat.write_text(chat.read_text().replace('"output": "', '"output": "Well, ', 1))
    other_data = sweep_cli("--dataset", str(chat), "--resume", parent.info.run_id)
    assert other_data.exit_code == 2
    assert f"error: resume: the data differs from run {parent.info.run_id}'s: train/eval digests" in other_data.output
    not_a_parent = sweep_cli("--dataset", str(chat), "--resume", first["r2-seed3"].info.run_id)
    assert "is not the parent run of a sweep" in not_a_parent.output
    after = runs_of(client, "resume")
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"
    assert len(children_of(after, parent.info.run_id)) == 4
    refused = [r for r in after if r.data.tags.get(KIND_TAG) == "resume" and r.info.run_id != attempt.info.run_id]
    assert len(refused) == 3 and all(r.info.status == "FAILED" and "resume:" in r.data.tags["error"] for r in refused)


@pytest.mark.slow  # trains repeatedly: a sweep, then its resume registers
def test_a_reused_child_registers_after_its_logged_adapter_is_checked(client, monkeypatch):
    """Resuming a finished sweep trains nothing; registering its best child (not in memory) checks the registered
    model against the logged adapter, which holds exactly the logits the trained model had."""
    prompt, in_memory = "Hello, how are you?", {}
    original = lora.log_adapter

    def capture(model, tokenizer, *args, **kwargs):
        model.eval()
        with torch.no_grad():
            text = prompts.prompt_text(tokenizer, prompt, "plain")
            in_memory[mlflow.active_run().info.run_id] = model(**tokenizer(text, return_tensors="pt")).logits
        return original(model, tokenizer, *args, **kwargs)

    monkeypatch.setattr(lora, "log_adapter", capture)
    config = LoraSweepConfig(model="tiny", dataset="sample_chat", ranks=(2,), seeds=(3,), max_steps=4, batch_size=8,
                         max_length=48, learning_rate=1e-2, experiment="resume-register")
    first = lora_sweep.run(config)
    (child_id,) = in_memory
    second = lora_sweep.run(LoraSweepConfig(**{**config.__dict__, "resume": first["run_id"], "register_as": "resumed"}))
    assert second["run_id"] == first["run_id"] and len(in_memory) == 1, "nothing was trained again"
    version = client.get_model_version_by_alias("resumed", "champion")
    assert version.tags["run_id"] == child_id and float(version.tags["reload_max_logit_diff"]) == 0.0
    registered = mlflow.pyfunc.load_model("models:/resumed@champion").unwrap_python_model()
    text = prompts.prompt_text(registered.tokenizer, prompt, "plain")
    assert torch.equal(registered.logits(text), in_memory[child_id])


@pytest.mark.slow  # trains repeatedly: a probe stopped, then resumed
def test_a_resumed_probe_continues_from_the_logged_before_adapter(client, monkeypatch):
    """`after` failed; resume reads `before` back (its reply, measures and trained adapter) and trains only `after`,
    which then measures exactly what an uninterrupted probe's `after` measures."""
    settings = dict(model="tiny", dataset="sample_chat", max_steps=3, batch_size=8, max_length=48,
                    learning_rate=1e-2, max_new_tokens=4)
    reference = probe.run(ProbeConfig(**settings, experiment="probe-reference"))
    original, measured = probe.measure, []

    def fail_after_measuring_before(*args, **kwargs):
        measured.append(1)
        if len(measured) == 2:
            raise RuntimeError("injected failure in the after stage")
        return original(*args, **kwargs)

    monkeypatch.setattr(probe, "measure", fail_after_measuring_before)
    with pytest.raises(RuntimeError, match="injected failure"):
        probe.run(ProbeConfig(**settings, experiment="probe-resume"))
    monkeypatch.setattr(probe, "measure", original)
    resumed = probe.run(ProbeConfig(**settings, experiment="probe-resume", resume="latest"))

    runs = runs_of(client, "probe-resume")
    stages = sorted((r.data.tags["mlflow.runName"], r.info.status) for r in runs
                    if r.data.tags.get("mlflow.parentRunId") == resumed["run_id"])
    assert stages == [("after", "FAILED"), ("after", "FINISHED"), ("before", "FINISHED")]
    assert client.get_run(resumed["run_id"]).info.status == "FINISHED"
    for name in ("target_nll_before", "target_nll_after", "rouge_l_after", "replies_differ"):
        assert resumed["metrics"][name] == pytest.approx(reference["metrics"][name], rel=1e-6), name


def test_where_the_children_train_and_the_grid_s_bound_are_not_part_of_the_config_a_resume_compares():
    from finetune_lab import resume
    from finetune_lab.config import LoraSweepConfig

    local = resume.config_digest(LoraSweepConfig())
    assert resume.config_digest(LoraSweepConfig(executor="ray", workers=2, cpus_per_worker=2, run_name="x")) == local
    assert resume.config_digest(LoraSweepConfig(max_children=1000)) == local
    assert resume.config_digest(LoraSweepConfig(learning_rate=1e-3)) != local
