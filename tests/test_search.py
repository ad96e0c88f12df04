"""The search (`search=asha`) without training: its config rules (one line each, before any model loads), the space
it samples, where its rungs fall and what Optuna decides there, the study rebuilt from the trials an earlier attempt
finished, the search table and the best trial. End to end on tiny models: tests/e2e/test_search_e2e.py."""

from __future__ import annotations

import math

import pytest
from click.testing import CliRunner
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState
from support.paths import entrypoint

from finetune_lab import contract
from finetune_lab.config import ClassifySweepConfig, LoraSweepConfig
from finetune_lab.contract import FAILED, FINISHED, KILLED
from finetune_lab.experiments import classify_sweep, lora_sweep, search, sweep
from finetune_lab.schema import LogRange, as_params, from_strings

CLASSIFY = ["--model", "tiny", "--dataset", "sample", "--experiment", "bad-search"]
LORA = ["--model", "tiny", "--dataset", "sample_chat", "--experiment", "bad-search"]


@pytest.mark.parametrize("entry, args, expected", [
    ("classify_sweep", ["--search", "asha", "--trials", "0"], "error: trials: must be >= 1, got 0"),
    ("classify_sweep", ["--search", "nosuch"], "error: search: must be one of grid, asha, got 'nosuch'"),
    ("classify_sweep", ["--search", "asha", "--sampler", "grid"], "error: sampler: must be one of tpe, random"),
    ("classify_sweep", ["--search", "asha", "--learning-rates", "1e-3:1e-5"],
     "error: learning_rates: the range 0.001:1e-05 needs 0 < LO < HI, like 1e-5:1e-3"),
    ("classify_sweep", ["--search", "asha", "--learning-rates", "0:1e-3"],
     "error: learning_rates: the range 0:0.001 needs 0 < LO < HI"),
    ("classify_sweep", ["--search", "asha", "--learning-rates", "1e-5:x"],
     "error: learning_rates: must be a comma list of numbers like 2e-5,4e-5, or a range LO:HI like 1e-5:1e-3"),
    ("classify_sweep", ["--search", "asha", "--reduction", "1"], "error: reduction: must be >= 2"),
    ("classify_sweep", ["--search", "asha", "--rungs", "0"], "error: rungs: must be >= 1, got 0"),
    ("classify_sweep", ["--learning-rates", "1e-5:1e-3"],
     "error: learning_rates: the range 1e-05:0.001 is sampled by search=asha only: give a comma list for the grid"),
    ("classify_sweep", ["--search", "asha", "--trials", "3", "--confirm-seeds", "1,2", "--confirm-top", "4"],
     "error: confirm_top: 4 is more than the 3 trials"),
    ("classify_sweep", ["--search", "asha", "--seeds", "1,2"],
     "error: seeds: search=asha trains each trial with one seed, got 1,2: give one, and confirm_seeds for more"),
    ("classify_sweep", ["--confirm-seeds", "1,1"], "error: confirm_seeds: lists 1 more than once"),
    ("classify_sweep", ["--search", "asha", "--trials", "90", "--confirm-seeds", "1,2,3", "--confirm-top", "5"],
     "error: max_children: the search has 105 children (90 trials, then 5 confirm_top x 3 confirm_seeds), more than "
     "max_children=100"),
    ("lora_sweep", ["--learning-rates", "1e-4,1e-3"],
     "error: learning_rates: a LoRA grid trains at learning_rate: give one there, or -P search=asha to search these"),
    ("lora_sweep", ["--search", "asha", "--learning-rates", "1e-3:1e-3"],
     "error: learning_rates: the range 0.001:0.001 needs 0 < LO < HI"),
])
def test_bad_search_input_is_one_line_before_any_model_loads(client, no_weights_loaded, entry, args, expected):
    outcome = CliRunner().invoke(entrypoint(entry).main, [*(CLASSIFY if entry == "classify_sweep" else LORA), *args])
    assert outcome.exit_code == 2, outcome.output
    errors = [line for line in outcome.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(expected), errors


def test_a_range_is_kept_as_given_and_logged_as_lo_hi():
    config = from_strings(ClassifySweepConfig, {"search": "asha", "learning_rates": "1e-5:1e-3"})
    assert config.learning_rates == LogRange(1e-5, 1e-3) and config.problems() == []
    assert as_params(config)["learning_rates"] == "1e-05:0.001"
    assert as_params(from_strings(ClassifySweepConfig, {"learning_rates": "1e-5,2e-5"}))["learning_rates"] == \
        "1e-05,2e-05"


def test_the_space_is_a_choice_per_list_and_a_log_uniform_range():
    classify = search.distributions(classify_sweep.DESIGN.space(
        ClassifySweepConfig(search="asha", learning_rates=LogRange(1e-5, 1e-3), epochs=(1.0, 2.0))))
    assert classify == {"learning_rate": FloatDistribution(1e-5, 1e-3, log=True),
                        "epochs": CategoricalDistribution([1.0, 2.0])}
    config = LoraSweepConfig(search="asha", methods="lora,dora", ranks=(4, 8), learning_rates=(1e-4, 1e-3))
    lora = search.distributions(lora_sweep.design(config).space(config))
    assert lora == {"method": CategoricalDistribution(["lora", "dora"]), "rank": CategoricalDistribution([4, 8]),
                    "learning_rate": CategoricalDistribution([1e-4, 1e-3])}
    fixed = LoraSweepConfig(search="asha", learning_rate=3e-4)
    assert lora_sweep.design(fixed).space(fixed)["learning_rate"] == (3e-4,), "no list: the one learning rate"
    assert lora_sweep.design(config).axes == ["method", "rank", "learning_rate"]
    assert lora_sweep.design(LoraSweepConfig()) is lora_sweep.DESIGN


def test_sampled_values_stay_in_the_space_and_spread_log_uniformly():
    config = ClassifySweepConfig(search="asha", sampler="random", trials=200, learning_rates=LogRange(1e-5, 1e-3),
                                 epochs=(1.0, 2.0), max_children=1000)
    searcher = search.Searcher(config, classify_sweep.DESIGN, [])
    rates, epochs = [], set()
    for spec in searcher.trials(200):
        rates.append(spec.settings["learning_rate"])
        epochs.add(spec.settings["epochs"])
        assert spec.name == f"t{spec.number}-{classify_sweep.child_label(rates[-1], spec.settings['epochs'])}-seed42"
        searcher.tell(sweep.ChildOutcome(spec, "", FINISHED, {"accuracy": 0.5}))
    assert all(1e-5 <= r <= 1e-3 for r in rates) and epochs == {1.0, 2.0}
    below = sum(r < 1e-4 for r in rates) / len(rates)
    assert 0.35 < below < 0.65, "log-uniform: as many below the geometric middle as above"


@pytest.mark.parametrize("budget, reduction, rungs, expected", [
    (64, 3, 2, [(0, 8), (1, 22)]),  # 64/9 = 7.1 and 64/3 = 21.3, rounded up to a whole step
    (8, 2, 2, [(0, 2), (1, 4)]),
    (9, 3, 2, [(0, 1), (1, 3)]),
    (4, 3, 3, [(0, 1), (1, 1), (2, 2)]),  # rungs on one step share it
    (1, 3, 2, []),  # no rung before the end of training
])
def test_rungs_are_the_budget_divided_by_powers_of_the_reduction(budget, reduction, rungs, expected):
    assert search.rung_steps(budget, reduction, rungs) == expected


def host(reduction: int = 2, maximize: bool = True) -> search.StudyHost:
    import optuna

    study = optuna.create_study(direction="maximize" if maximize else "minimize",
                                pruner=optuna.pruners.SuccessiveHalvingPruner(min_resource=1,
                                                                              reduction_factor=reduction))
    return search.StudyHost(study, {"x": (1, 2, 3)}, reduction)


def test_a_trial_goes_on_past_a_rung_only_in_the_top_one_over_reduction_of_it():
    """Optuna's successive halving at our rungs: promoted when among the best 1/reduction of the trials that
    reached the rung (the best one while fewer than `reduction` have)."""
    study = host(reduction=2)
    decisions = []
    for value in (0.5, 0.4, 0.6, 0.45, 0.55):
        number, _ = study.ask()
        decisions.append(study.report(number, 0, value))
    # 0.5 first; 0.4 < 0.5; 0.6 best; 0.45 not in the top 2 of 4; 0.55 in the top 2 of 5 (0.6, 0.55)
    assert decisions == [False, True, False, True, False]
    number, _ = study.ask()
    assert study.report(number, 0, 0.7) is False and study.report(number, 1, 0.1) is False, "first at rung 1"
    number, _ = study.ask()
    assert study.report(number, 0, 0.8) is False and study.report(number, 1, 0.05) is True


def trial(number: int, status: str, accuracy: float | None, heldout: list[tuple[int, float]], budget: int = 8,
          stopped: bool = False, rate: float = 1e-3) -> sweep.ChildOutcome:
    settings = {"learning_rate": rate, "epochs": 1.0}
    spec = search.TrialSpec(search.trial_label(number, classify_sweep.DESIGN.label(settings)),
                            tuple(settings.items()), 1, number=number, reduction=2, rungs=2, objective="accuracy")
    metrics = {contract.BUDGET_METRIC: budget, contract.EARLY_STOPPED_TAG: float(stopped),
               "train_steps": heldout[-1][0] if stopped else budget, **({"accuracy": accuracy} if accuracy else {})}
    return sweep.ChildOutcome(spec, f"run{number}", status, metrics if status == FINISHED else {}, heldout=heldout)


KEPT = [trial(0, FINISHED, 0.75, [(2, 0.6), (4, 0.7)]), trial(1, FINISHED, 0.5, [(2, 0.5)], stopped=True),
        trial(3, KILLED, None, [(2, 0.65)]), trial(4, FAILED, None, [])]


def test_the_study_is_rebuilt_from_the_trials_an_earlier_attempt_left():
    config = ClassifySweepConfig(search="asha", learning_rates=LogRange(1e-4, 1e-2), trials=8, reduction=2,
                                 seeds=(1,))
    searcher = search.Searcher(config, classify_sweep.DESIGN, KEPT)
    trials = searcher.study.get_trials()
    assert [(t.number, t.state) for t in trials] == [
        (0, TrialState.COMPLETE), (1, TrialState.PRUNED), (2, TrialState.FAIL), (3, TrialState.FAIL),
        (4, TrialState.FAIL)], "numbered as they were: 2 left no run, 3 was stopped by a signal, 4 failed"
    assert trials[0].value == 0.75 and trials[0].intermediate_values == {1: 0.6, 2: 0.7}
    assert trials[0].system_attrs == {"completed_rung_0": 0.6, "completed_rung_1": 0.7}
    assert trials[1].params == {"learning_rate": 1e-3, "epochs": 1.0} and trials[1].intermediate_values == {1: 0.5}
    assert [search.is_done(t) for t in KEPT] == [True, True, False, True], "the killed trial is sampled again"
    # The pruner goes on from the rebuilt record: at rung 0, 0.55 is not in the top half of 0.6, 0.5, 0.55.
    new = next(searcher.trials(1))
    assert new.number == 5 and new.name.startswith("t5-lr")
    assert new.judge("report", new.number, 0, 0.55) is True
    assert search.Searcher(config, classify_sweep.DESIGN, []).study.get_trials() == []


def test_the_search_table_and_the_best_trial_come_from_the_trials():
    trials = [*KEPT[:2], trial(2, FINISHED, 0.8, [(2, 0.62), (4, 0.72)], rate=2e-3), KEPT[3]]
    table = search.search_table(trials, classify_sweep.DESIGN)
    assert list(table["state"]) == ["completed", "stopped early", "completed", FAILED]
    assert list(table["rungs"][:2]) == ["step 2: 0.6; step 4: 0.7", "step 2: 0.5"]
    assert list(table["train_steps"][:3]) == [8, 2, 8] and list(table["learning_rate"][:3]) == [1e-3, 1e-3, 2e-3]
    assert search.best_trial(trials, classify_sweep.DESIGN) is trials[2]
    assert search.best_trial([trials[1]], classify_sweep.DESIGN) is None, "a stopped trial never counts as best"
    assert [search.state_of(t) for t in trials] == ["COMPLETE", "PRUNED", "COMPLETE", "FAIL"]


def test_the_confirmation_retrains_the_best_configurations_with_its_seeds():
    trials = [trial(0, FINISHED, 0.75, [], rate=1e-3), trial(1, FINISHED, 0.8, [], rate=2e-3),
              trial(2, FINISHED, 0.7, [], rate=3e-3)]
    config = ClassifySweepConfig(search="asha", confirm_seeds=(5, 6), confirm_top=2)
    planned = sweep.confirm_plan(config, classify_sweep.DESIGN, trials)
    assert [p.name for p in planned] == ["lr0.002-ep1-seed5", "lr0.001-ep1-seed5", "lr0.002-ep1-seed6",
                                         "lr0.001-ep1-seed6"]
    assert not any(math.isnan(p.settings["learning_rate"]) for p in planned)


@pytest.mark.parametrize("stopped", [True, False])
def test_a_trial_stopped_at_a_rung_is_not_judged_by_its_last_steps(client, monkeypatch, stopped):
    """A trial the study stops at a rung ends with its record, never FAILED by the divergence rule over its last
    steps (a lr-1e-3 MiniLM trial stopped at step 8 of 64 had a last batch loss of 1.5 after 0.69, and 0.81 held-out
    accuracy); a trial that trains its full budget is judged as every run is."""
    import mlflow

    from finetune_lab import health
    from finetune_lab.experiments import classify

    monkeypatch.setattr(health, "diagnose", lambda steps, eval_loss, classes: "diverged (made so by the test)")
    config = ClassifySweepConfig(model="tiny", dataset="sample", max_length=32, batch_size=16, max_train_samples=128,
                                 max_eval_samples=32, experiment="stopped")
    child = config.child(1e-3, 1.0, 1, "trial")
    spec = search.TrialSpec("t0", (("learning_rate", 1e-3), ("epochs", 1.0)), 1, number=0, reduction=2, rungs=2,
                            objective="accuracy", judge=lambda method, number, rung, value: stopped)
    watch = search.TrialWatch(spec)
    mlflow.set_experiment("stopped")
    with mlflow.start_run():
        prepared = classify.prepare(child)
        if not stopped:
            with pytest.raises(health.TrainingCollapsed):
                classify.train_and_log(child, prepared, watch=watch)
            return
        trained = classify.train_and_log(child, prepared, watch=watch)
    assert trained.fitted.stopped_early and trained.fitted.metrics["train_steps"] == 2 and watch.stopped
    assert watch.budget == 8 and [step for step, _ in watch.heldout] == [2]


def test_measuring_at_the_rungs_leaves_training_as_it_would_be(client):
    """A trial that trains its full budget trains exactly as a child of the same configuration and seed: measuring
    the held-out split at its rungs draws from the random generator (a DataLoader's seed), which would otherwise
    change every later dropout mask (a minilm-l6 trial ended at accuracy 0.869, its confirmation with the same seed
    at 0.844)."""
    import mlflow

    from finetune_lab.experiments import classify

    config = ClassifySweepConfig(model="tiny", dataset="sample", max_length=32, batch_size=16, max_train_samples=128,
                                 max_eval_samples=32, experiment="rungs")
    child = config.child(1e-3, 1.0, 1, "trial")
    spec = search.TrialSpec("t0", (("learning_rate", 1e-3), ("epochs", 1.0)), 1, number=0, reduction=2, rungs=2,
                            objective="accuracy", judge=lambda *args: False)
    mlflow.set_experiment("rungs")
    losses, logits = [], []
    for watch in (search.TrialWatch(spec), None):
        with mlflow.start_run():
            fitted = classify.train_and_log(child, classify.prepare(child), watch=watch).fitted
        losses.append([entry["loss"] for entry in fitted.steps])
        logits.append(fitted.logits)
    assert len(losses[0]) == 8 and losses[0] == losses[1] and (logits[0] == logits[1]).all()
