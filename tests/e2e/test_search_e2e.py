"""`search=asha` end to end on tiny models: a LoRA search in one process (trials stopped at rungs, the record of
every trial, the parent's table, figure and sums, the confirmation and its verdict, the report), and a classifier
search on Ray workers stopped by SIGTERM, then resumed in one process without training a finished trial again."""

from __future__ import annotations

import json
import signal
import subprocess
from types import SimpleNamespace

import psutil
import pytest
from support.launch import launch_in_own_store, mlflow_run_command
from support.ray_processes import ray_left_behind
from support.store import load_table, parent_and_children, runs_of
from test_lora_sweep_e2e import wait_for

from finetune_lab.contract import EARLY_STOPPED_TAG, TRIAL_PARAMS_TAG, TRIAL_TAG

LORA = {"model": "tiny", "dataset": "sample_chat", "methods": "lora,dora", "ranks": "2,4", "search": "asha",
        "learning_rates": "1e-3:1e-1", "trials": 5, "max_steps": 8, "reduction": 2, "rungs": 2, "batch_size": 8,
        "max_length": 48, "seeds": 1, "confirm_seeds": "1,2", "confirm_top": 2}
RUNGS = {2: 0, 4: 1}  # step → rung: 8 / 2**2 and 8 / 2

pytestmark = pytest.mark.xdist_group("search_e2e")


@pytest.fixture(scope="module")
def lora_search(tmp_path_factory, empty_store):
    launched = launch_in_own_store(tmp_path_factory.mktemp("lora_search"), empty_store, "lora_sweep", LORA,
                                   "lora-search")
    assert launched.result.returncode == 0, launched.result.stderr[-3000:]
    runs = launched.runs()
    parent, children = parent_and_children(runs)
    trials = sorted((r for r in children if TRIAL_TAG in r.data.tags), key=lambda r: int(r.data.tags[TRIAL_TAG]))
    confirmed = [r for r in children if TRIAL_TAG not in r.data.tags]
    return SimpleNamespace(client=launched.client, parent=parent, trials=trials, confirmed=confirmed,
                           output=launched.result.stdout)


def rung_values(client, run) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run.info.run_id, "rung_eval_loss")}


def test_every_trial_is_a_child_with_its_sampled_values_and_its_held_out_loss_at_each_rung(lora_search):
    client, trials = lora_search.client, lora_search.trials
    assert [int(t.data.tags[TRIAL_TAG]) for t in trials] == [0, 1, 2, 3, 4]
    for run in trials:
        params, metrics = run.data.params, run.data.metrics
        sampled = json.loads(run.data.tags[TRIAL_PARAMS_TAG])
        assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == lora_search.parent.info.run_id
        assert params["method"] == sampled["method"] in ("lora", "dora") and params["lora_method"] == sampled["method"]
        assert int(params["rank"]) == int(params["lora_r"]) == sampled["rank"] in (2, 4)
        assert float(params["learning_rate"]) == pytest.approx(sampled["learning_rate"])
        assert 1e-3 <= sampled["learning_rate"] <= 1e-1
        rungs = rung_values(client, run)
        stopped = run.data.tags[EARLY_STOPPED_TAG] == "true"
        assert metrics["budget_steps"] == 8
        if stopped:  # FINISHED, and its train_steps say where it stopped: at its last rung
            assert metrics["train_steps"] == max(rungs) < 8
        else:
            assert metrics["train_steps"] == 8 and sorted(rungs) == [2, 4]
        assert set(rungs) <= set(RUNGS) and len(client.get_metric_history(run.info.run_id, "train_loss")) >= 2
    assert any(t.data.tags[EARLY_STOPPED_TAG] == "true" for t in trials), "5 trials at reduction 2 stop some"


def test_a_trial_goes_on_past_a_rung_only_in_the_top_half_of_the_trials_that_reached_it(lora_search):
    """The stops replayed from the logged values with the rule of asynchronous successive halving (trials in turn,
    one at a time): at each rung a trial must be among the best max(1, n // 2) of the n trials that reached it."""
    reached: dict[int, list[float]] = {0: [], 1: []}
    for run in lora_search.trials:
        stop = False
        for step, value in sorted(rung_values(lora_search.client, run).items()):
            competing = sorted([*reached[RUNGS[step]], value])
            reached[RUNGS[step]].append(value)
            stop = value > competing[max(1, len(competing) // 2) - 1]
        assert stop == (run.data.tags[EARLY_STOPPED_TAG] == "true"), run.info.run_name


def test_the_parent_records_the_search(lora_search, tmp_path):
    client, parent, trials = lora_search.client, lora_search.parent, lora_search.trials
    metrics, tags = parent.data.metrics, parent.data.tags
    table = load_table(client, parent.info.run_id, "search_table.json", tmp_path)
    assert list(table["trial"]) == [0, 1, 2, 3, 4] and list(table["run_id"]) == [t.info.run_id for t in trials]
    for row, run in zip(table.to_dict("records"), trials):
        assert row["train_steps"] == run.data.metrics["train_steps"]
        assert row["eval_loss"] == pytest.approx(run.data.metrics["eval_loss"])
        assert row["state"] == ("stopped early" if run.data.tags[EARLY_STOPPED_TAG] == "true" else "completed")
        assert row["method"] == run.data.params["method"]
    stopped = [t for t in trials if t.data.tags[EARLY_STOPPED_TAG] == "true"]
    assert metrics["trials_finished"] == 5 and metrics["trials_stopped_early"] == len(stopped)
    assert metrics["trial_steps_trained"] == sum(t.data.metrics["train_steps"] for t in trials) < 5 * 8
    assert metrics["trial_steps_full_budget"] == 5 * 8
    completed = [t for t in trials if t not in stopped]
    best = min(completed, key=lambda t: t.data.metrics["eval_loss"])
    assert tags["best_trial_run_id"] == best.info.run_id and metrics["best_trial_number"] == int(
        best.data.tags[TRIAL_TAG])
    assert metrics["best_trial_eval_loss"] == pytest.approx(best.data.metrics["eval_loss"])
    assert tags["best_trial_method"] == best.data.params["method"]
    assert "search_curves.png" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert "(stopped early at step" in lora_search.output and "best trial: t" in lora_search.output


def test_the_best_configurations_are_confirmed_over_seeds_and_judged(lora_search, tmp_path):
    client, parent, trials, confirmed = (lora_search.client, lora_search.parent, lora_search.trials,
                                         lora_search.confirmed)
    completed = sorted((t for t in trials if t.data.tags[EARLY_STOPPED_TAG] == "false"),
                       key=lambda t: t.data.metrics["eval_loss"])
    def configuration(run):
        return run.data.params["lora_method"], run.data.params["lora_r"], float(run.data.params["learning_rate"])

    assert len(confirmed) == 4 and {configuration(c) for c in confirmed} == {configuration(t) for t in completed[:2]}
    assert sorted(c.data.params["seed"] for c in confirmed) == ["1", "1", "2", "2"]
    assert all(c.data.metrics["train_steps"] == 8 and EARLY_STOPPED_TAG not in c.data.tags for c in confirmed)
    table = load_table(client, parent.info.run_id, "comparison_table.json", tmp_path)
    assert set(table["run_id"]) == {c.info.run_id for c in confirmed}, "the summary covers the confirmation only"
    assert parent.data.tags["best_run_id"] in set(table["run_id"])
    assert "2 and 2 seeds" in parent.data.tags["verdict"]
    trained = sum(r.data.metrics["train_steps"] for r in [*trials, *confirmed])
    assert parent.data.metrics["child_train_steps_sum"] == trained


def test_the_report_has_a_section_for_the_search(lora_search, tmp_path):
    from finetune_lab.report.render import write
    from finetune_lab.report.sections import build
    from finetune_lab.report.store import Artifacts

    client = lora_search.client
    markdown, _ = write(build(client, ["lora-search"], Artifacts(client, tmp_path)), tmp_path / "report")
    text = markdown.read_text()
    assert f"Search {lora_search.parent.info.run_name}" in text and "ASHA over 5 trials (tpe sampler" in text
    assert f"the trials trained {int(lora_search.parent.data.metrics['trial_steps_trained'])} steps of the 40" in text
    assert "stopped early" in text and "search_curves" in text and lora_search.parent.data.tags["verdict"] in text
    assert "LoRA rank sweep" not in text


CLASSIFY = {"model": "tiny", "dataset": "sample", "search": "asha", "learning_rates": "1e-4:1e-2", "trials": 6,
            "epochs": 1, "seeds": 1, "max_length": 32, "batch_size": 16, "max_train_samples": 128,
            "max_eval_samples": 32, "reduction": 2}


@pytest.mark.xdist_group("ray")  # two Ray instances on two cores only slow each other down
def test_a_search_on_ray_stopped_by_sigterm_resumes_without_training_a_trial_twice(client, tmp_path, local_ray,
                                                                                  mlflow_run):
    """Two Ray workers train the trials (the study in a Ray actor); SIGTERM to the entry point while trials train:
    those that finished stay, those training end KILLED, the parent records the trials so far. `resume=latest` in
    one process rebuilds the study from the store and trains only the missing trials, numbered after the others."""
    command, env = mlflow_run_command(client, tmp_path, "classify_sweep",
                                      {**CLASSIFY, "executor": "ray", "workers": 2}, "search-stop")
    launched = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
    try:
        experiment_id = client.get_experiment_by_name("search-stop").experiment_id

        def trials_finished_and_training():
            trials = [r for r in client.search_runs([experiment_id]) if TRIAL_TAG in r.data.tags]
            finished = [r for r in trials if r.info.status == "FINISHED"]
            return len(finished) >= 2 and any(r.info.status == "RUNNING" for r in trials)

        wait_for(trials_finished_and_training, 600, "two trials to finish and another to train")
        (entry_point,) = [p for p in psutil.Process(launched.pid).children(recursive=True)
                          if any(part.endswith("classify_sweep.py") for part in p.cmdline())]
        entry_point.send_signal(signal.SIGTERM)
        output, _ = launched.communicate(timeout=300)
    finally:
        if launched.poll() is None:
            launched.kill()
    assert launched.returncode != 0 and "error: terminated by SIGTERM" in output, output[-3000:]
    assert ray_left_behind(local_ray) == []
    runs = runs_of(client, "search-stop")
    assert not [r for r in runs if r.info.status == "RUNNING"]
    parent, _ = parent_and_children(runs)
    assert parent.data.tags["error"] == "terminated by SIGTERM"
    before = {r.info.run_id: r for r in runs if TRIAL_TAG in r.data.tags}
    finished = {int(r.data.tags[TRIAL_TAG]): r.info.run_id for r in before.values() if r.info.status == "FINISHED"}
    assert len(finished) >= 2 and any(r.info.status == "KILLED" for r in before.values())
    for run_id in finished.values():  # a Ray worker logged the rungs
        assert sorted(m.step for m in client.get_metric_history(run_id, "rung_accuracy")) == [2, 4]
    table = load_table(client, parent.info.run_id, "search_table.json", tmp_path / "stopped")
    assert set(finished.values()) <= set(table["run_id"])

    resumed = mlflow_run("classify_sweep", {**CLASSIFY, "resume": "latest"}, experiment="search-stop")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    parent = client.get_run(parent.info.run_id)
    assert parent.info.status == "FINISHED" and parent.data.metrics["trials_finished"] == 6
    trials = [r for r in runs_of(client, "search-stop") if TRIAL_TAG in r.data.tags and r.info.status == "FINISHED"]
    numbers = [int(r.data.tags[TRIAL_TAG]) for r in trials]
    assert len(trials) == 6 and len(set(numbers)) == 6, "six trials, none trained twice"
    assert {n: r.info.run_id for n, r in zip(numbers, trials) if n in finished} == finished, "kept, not retrained"
    assert min(n for n in numbers if n not in finished) > max(int(r.data.tags[TRIAL_TAG]) for r in before.values())
    table = load_table(client, parent.info.run_id, "search_table.json", tmp_path / "resumed")
    assert sorted(table["trial"]) == sorted(numbers)
    assert set(table[table["reused"]]["run_id"]) == set(finished.values())
