"""Search (`search=asha`): `trials` configurations sampled from a sweep's space by Optuna (TPE, or at random), each
trained through the sweep's executors and evaluated on the held-out split at rungs of its budget, and stopped there
unless in the top 1/`reduction` of the trials that reached that rung (Optuna's SuccessiveHalvingPruner: asynchronous
successive halving). Then, with `confirm_seeds`, the best `confirm_top` configurations retrained at full budget with
those seeds, summarised and judged by the shared sweep machinery (`sweep.finish`).

Rungs: a trial of budget B (its training steps: `epochs` or `max_steps`) is measured at B / reduction^k steps,
k = rungs..1 (rounded up to a whole step). To Optuna a rung is one step of its own: rung i (0 = the lowest) is
reported at step reduction^i, with `min_resource=1`, so that the pruner's promotion points are exactly the rungs
whatever B is.

Where the study lives: with `executor=local`, in this process; with `executor=ray`, in one Ray actor (`StudyHost`)
made when the first trial is handed out, which the driver asks for trials and tells their ends, and the workers ask at
their rungs whether to go on: one study, never copied. Its state is the tracking store: every trial is a child run
tagged with its number and sampled values, and logs its held-out objective at each rung by step; `resume` rebuilds
the study from those runs (`optuna.trial.create_trial` + `study.add_trial`), keeps every trial that finished, and
samples only the ones still missing.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import mlflow
import pandas as pd
import torch
from mlflow.tracking import MlflowClient
from transformers import TrainerCallback

from finetune_lab import contract, executors, plots, resume, signals, tracking
from finetune_lab.config import ASHA, Sweeping
from finetune_lab.contract import FAILED, FINISHED
from finetune_lab.experiments import sweep
from finetune_lab.experiments.sweep import ChildOutcome, ChildSpec, Design
from finetune_lab.schema import LogRange

COMPLETED, STOPPED = "completed", "stopped early"
# TPE samples the first 1/TPE_RANDOM_SHARE of the trials at random before its model takes over (at least 2, at
# most Optuna's default 10: with that default a search of 10 trials or fewer would be random throughout).
TPE_RANDOM_SHARE = 4


def rung_steps(budget: int, reduction: int, rungs: int) -> list[tuple[int, int]]:
    """(Optuna's rung index, training step) of every rung below a budget of `budget` steps, lowest first: rung
    index i at budget / reduction^(rungs - i), rounded up to a whole step; a rung that would not come before the
    end of training is none."""
    found = [(index, math.ceil(budget / reduction ** (rungs - index))) for index in range(rungs)]
    return [(index, step) for index, step in found if step < budget]


def distributions(space: dict[str, tuple | LogRange]) -> dict:
    """Optuna's distributions of a design's space: a tuple is a choice, a LogRange a log-uniform range."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    return {name: FloatDistribution(values.low, values.high, log=True) if isinstance(values, LogRange)
            else CategoricalDistribution(list(values)) for name, values in space.items()}


def trial_label(number: int, label: str) -> str:
    """A trial's name in run names and tables: `t3-lr0.000123-ep1`."""
    return f"t{number}-{label}"


@dataclass(frozen=True)
class TrialSpec(ChildSpec):
    """One trial of a search: a child with its number in the study, how its rungs are laid, and whom it asks at
    each rung whether to go on."""

    number: int = 0
    reduction: int = 3
    rungs: int = 2
    objective: str = ""
    judge: Callable | None = field(default=None, compare=False, repr=False)
    """`judge("report", number, rung index, value)` → whether to stop (the study's `StudyHost.report`)."""


class StudyHost:
    """The study of one search and the trials it has handed out: the only place its decisions are made (in the
    driver, or in a Ray actor that the driver and the workers call)."""

    def __init__(self, study, space: dict[str, tuple | LogRange], reduction: int):
        self.study, self.distributions, self.reduction = study, distributions(space), reduction
        self.running: dict[int, Any] = {}

    def ask(self) -> tuple[int, dict[str, Any]]:
        trial = self.study.ask(self.distributions)
        self.running[trial.number] = trial
        return trial.number, trial.params

    def report(self, number: int, rung: int, value: float) -> bool:
        """Record the trial's value at `rung`; whether it stops there (not in the top 1/reduction of that rung)."""
        trial = self.running[number]
        trial.report(value, self.reduction ** rung)
        return trial.should_prune()

    def tell(self, number: int, state: str, value: float | None = None) -> None:
        from optuna.trial import TrialState

        self.study.tell(self.running.pop(number), value, TrialState[state])


class InProcess:
    """Calls a StudyHost in this process."""

    def __init__(self, host: StudyHost):
        self.host = host

    def __call__(self, method: str, *args):
        return getattr(self.host, method)(*args)


class InActor:
    """Calls a StudyHost living in a Ray actor (picklable: a worker gets it with its trial)."""

    def __init__(self, handle):
        self.handle = handle

    def __call__(self, method: str, *args):
        import ray

        try:
            return ray.get(getattr(self.handle, method).remote(*args))
        except KeyboardInterrupt as stop:  # a signal, which ray.get turns into a bare KeyboardInterrupt
            raise signals.restored(stop) from None


class TrialWatch:
    """A trial's watch on its training (`training.Watch`): at each rung, its held-out objective measured, logged by
    step and reported to the study, which may stop it there; what it saw, for its outcome."""

    def __init__(self, spec: TrialSpec):
        self.spec = spec
        self.budget = 0
        self.heldout: list[tuple[int, float]] = []
        self.stopped = False

    def __call__(self, measure: Callable) -> TrainerCallback:
        return _Rungs(self, measure)

    def record(self, outcome: ChildOutcome) -> None:
        """Into the trial's run and `outcome`: whether it stopped at a rung, its full budget, its rung values."""
        mlflow.set_tag(contract.EARLY_STOPPED_TAG, str(self.stopped).lower())
        mlflow.log_metric(contract.BUDGET_METRIC, self.budget)
        outcome.heldout = list(self.heldout)
        outcome.metrics[contract.BUDGET_METRIC] = float(self.budget)
        outcome.metrics[contract.EARLY_STOPPED_TAG] = float(self.stopped)


class _Rungs(TrainerCallback):
    def __init__(self, watch: TrialWatch, measure: Callable):
        self.watch, self.measure, self.at = watch, measure, {}

    def on_train_begin(self, args, state, control, **kwargs):
        spec = self.watch.spec
        self.watch.budget = state.max_steps
        for index, step in rung_steps(state.max_steps, spec.reduction, spec.rungs):
            self.at.setdefault(step, []).append(index)
        mlflow.set_tags({contract.TRIAL_TAG: str(spec.number), contract.TRIAL_PARAMS_TAG: json.dumps(spec.settings)})
        tracking.log_params(spec.settings)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        indices = self.at.get(state.global_step)
        if not indices:
            return
        spec = self.watch.spec
        with torch.random.fork_rng():  # measuring draws from the generator (a DataLoader's seed): training must not
            value = float(self.measure(model)[spec.objective])  # see it, or a trial would train apart from a child
        self.watch.heldout.append((state.global_step, value))
        mlflow.log_metric(contract.rung_metric(spec.objective), value, step=state.global_step)
        if any(spec.judge("report", spec.number, index, value) for index in indices):
            self.watch.stopped = control.should_training_stop = True


def watch(spec: ChildSpec) -> TrialWatch | None:
    """The watch of a trial (`TrialSpec`); None for a child of a grid or a confirmation."""
    return TrialWatch(spec) if isinstance(spec, TrialSpec) else None


def state_of(outcome: ChildOutcome) -> str:
    """A trial's end as the study sees it: COMPLETE, PRUNED (stopped at a rung) or FAIL."""
    if outcome.status != FINISHED:
        return "FAIL"
    return "PRUNED" if outcome.metrics.get(contract.EARLY_STOPPED_TAG) else "COMPLETE"


class Searcher:
    """The study of a search (rebuilt from the trials `kept` from earlier attempts), placed where the trials train
    when the first one is asked for, and the trials it hands out."""

    def __init__(self, config: Sweeping, design: Design, kept: list[ChildOutcome]):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.config, self.design, self.space = config, design, design.space(config)
        seed = config.seeds[0] + len(kept)  # a resumed study samples past the trials it has
        sampler = (optuna.samplers.RandomSampler(seed=seed) if config.sampler == "random" else
                   optuna.samplers.TPESampler(seed=seed,
                                                 n_startup_trials=min(10, max(2, config.trials // TPE_RANDOM_SHARE))))
        self.study = optuna.create_study(
            direction="minimize" if design.lower_is_better else "maximize", sampler=sampler,
            pruner=optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=config.reduction))
        for trial in rebuilt(kept, self.space, config, design.objective):
            self.study.add_trial(trial)
        self.call: Callable | None = None

    def placed(self) -> Callable:
        """Whom to call: the study here, or (executor=ray, Ray being up) in an actor it moves into."""
        if self.call is None:
            settings = (self.study, self.space, self.config.reduction)
            if self.config.executor == executors.RAY:
                import ray

                self.call = InActor(ray.remote(StudyHost).options(num_cpus=0, max_restarts=0).remote(*settings))
            else:
                self.call = InProcess(StudyHost(*settings))
            self.study = None  # from now on only where it was placed
        return self.call

    def trials(self, count: int) -> Iterator[TrialSpec]:
        """`count` trials, each sampled when it can start (after the study was told every trial that ended)."""
        for k in range(1, count + 1):
            call = self.placed()
            number, params = call("ask")
            yield TrialSpec(trial_label(number, self.design.label(params)), tuple(params.items()),
                            self.config.seeds[0], f"[trial {k}/{count}]", number=number,
                            reduction=self.config.reduction, rungs=self.config.rungs,
                            objective=self.design.objective, judge=call)

    def tell(self, outcome: ChildOutcome) -> None:
        state = state_of(outcome)
        self.placed()("tell", outcome.spec.number, state,
                      outcome.metrics.get(self.design.objective) if state == "COMPLETE" else None)


def rung_values(outcome: ChildOutcome, config: Sweeping) -> dict[int, float]:
    """A trial's held-out values by Optuna's rung index (rungs that fell on one step share its value)."""
    budget = int(outcome.metrics.get(contract.BUDGET_METRIC, 0))
    indices: dict[int, list[int]] = {}
    for index, step in rung_steps(budget, config.reduction, config.rungs):
        indices.setdefault(step, []).append(index)
    return {index: value for step, value in outcome.heldout for index in indices.get(step, [])}


def rebuilt(kept: list[ChildOutcome], space: dict, config: Sweeping, objective: str) -> list:
    """The trials of earlier attempts as Optuna's frozen trials, numbered as they were (a number with no run left:
    a failed trial without values): values at each rung as intermediate values and as the pruner's record of the
    rungs they completed, the final value of those that completed."""
    from optuna.trial import TrialState, create_trial

    by_number = {outcome.spec.number: outcome for outcome in kept}
    frozen = []
    for number in range(max(by_number, default=-1) + 1):
        outcome = by_number.get(number)
        if outcome is None:
            frozen.append(create_trial(state=TrialState.FAIL))
            continue
        state, values = TrialState[state_of(outcome)], rung_values(outcome, config)
        frozen.append(create_trial(
            state=state, params=outcome.settings, distributions=distributions(space),
            value=outcome.metrics[objective] if state == TrialState.COMPLETE else None,
            intermediate_values={config.reduction ** index: value for index, value in values.items()},
            system_attrs={f"completed_rung_{index}": value for index, value in values.items()}))
    return frozen


def kept_trials(parent_run_id: str, marks: dict[str, str], design: Design, config: Sweeping) -> list[ChildOutcome]:
    """The trials earlier attempts of the parent made with the same config and data, read back from the store (the
    newest run of each number): those that finished (completed, stopped at a rung, or failed) and those stopped by a
    signal, which are sampled again."""
    client, found = MlflowClient(), {}
    for run in resume.children(parent_run_id):
        tags = run.data.tags
        if contract.TRIAL_TAG in tags and all(tags.get(k) == v for k, v in marks.items()):
            found[int(tags[contract.TRIAL_TAG])] = run
    kept = []
    for number, run in sorted(found.items()):
        settings = json.loads(run.data.tags[contract.TRIAL_PARAMS_TAG])
        spec = TrialSpec(trial_label(number, design.label(settings)), tuple(settings.items()), config.seeds[0],
                         number=number, reduction=config.reduction, rungs=config.rungs, objective=design.objective)
        metrics = dict(run.data.metrics)
        metrics[contract.EARLY_STOPPED_TAG] = float(run.data.tags.get(contract.EARLY_STOPPED_TAG) == "true")
        history = client.get_metric_history(run.info.run_id, contract.rung_metric(design.objective))
        kept.append(ChildOutcome(spec, run.info.run_id, run.info.status, metrics,
                                 error=run.data.tags.get(contract.ERROR_TAG, ""), reused=True,
                                 heldout=sorted((m.step, m.value) for m in history)))
    return kept


def is_done(outcome: ChildOutcome) -> bool:
    """Whether a trial counts as done: it finished or failed (one stopped by a signal is sampled again)."""
    return outcome.status in (FINISHED, FAILED)


def search_table(trials: list[ChildOutcome], design: Design) -> pd.DataFrame:
    """One row per trial: its number, sampled values, seed, state, steps trained beside its budget, the objective
    at its end and at each rung, status and run."""
    rows = []
    for trial in trials:
        early = trial.metrics.get(contract.EARLY_STOPPED_TAG)
        rows.append({"trial": trial.spec.number, **trial.settings, "seed": trial.seed,
                     "state": (STOPPED if early else COMPLETED) if trial.status == FINISHED else trial.status,
                     "train_steps": trial.metrics.get("train_steps"),
                     contract.BUDGET_METRIC: trial.metrics.get(contract.BUDGET_METRIC),
                     design.objective: trial.metrics.get(design.objective),
                     "rungs": "; ".join(f"step {step}: {value:.4g}" for step, value in trial.heldout),
                     "reused": trial.reused, "run_id": trial.run_id, "error": trial.error})
    return pd.DataFrame(rows)


def best_trial(trials: list[ChildOutcome], design: Design) -> ChildOutcome | None:
    """The trial with the best objective among those that trained their full budget (None if none did)."""
    completed = [t for t in trials if state_of(t) == "COMPLETE"]
    pick = min if design.lower_is_better else max
    return pick(completed, key=lambda t: t.metrics[design.objective]) if completed else None


def log_search(trials: list[ChildOutcome], design: Design) -> ChildOutcome | None:
    """On the parent: the search table, the objective against steps for every trial, how many trials finished and
    were stopped early, the steps they trained beside their full budgets, and the best trial with its values."""
    table = search_table(trials, design)
    tracking.log_table(table, contract.SEARCH_TABLE)
    measured = [t for t in trials if contract.BUDGET_METRIC in t.metrics]
    mlflow.log_metrics({"trials_finished": sum(t.status == FINISHED for t in trials),
                        "trials_stopped_early": sum(state_of(t) == "PRUNED" for t in trials),
                        "trial_steps_trained": sum(t.metrics.get("train_steps", 0.0) for t in measured),
                        "trial_steps_full_budget": sum(t.metrics[contract.BUDGET_METRIC] for t in measured)})
    curves = {t.spec.label: [*t.heldout, *([(int(t.metrics["train_steps"]), t.metrics[design.objective])]
                                           if state_of(t) == "COMPLETE" else [])] for t in measured}
    plots.log_figure(plots.search_curves(curves, {t.spec.label for t in trials if state_of(t) == "PRUNED"},
                                         design.objective, sorted({s for t in trials for s, _ in t.heldout})),
                     contract.SEARCH_CURVES_FIGURE)
    best = best_trial(trials, design)
    if best is not None:
        mlflow.log_metrics({"best_trial_number": best.spec.number,
                            f"best_trial_{design.objective}": best.metrics[design.objective]})
        mlflow.set_tags({"best_trial_run_id": best.run_id,
                         **{f"best_trial_{axis}": str(value) for axis, value in best.settings.items()}})
    return best


def trial_notes(trials: list[ChildOutcome], objective: str) -> list[str]:
    """The console's lines of the trials: each one's name, status and objective, and where it stopped."""
    lines = sweep.child_notes(trials, objective)
    return ["trials:", *(line + (f" (stopped early at step {int(t.metrics['train_steps'])})"
                                 if state_of(t) == "PRUNED" else "") for line, t in zip(lines, trials))]


def search_children(parent: mlflow.ActiveRun, config: Sweeping, design: Design, prepared, marks: dict[str, str],
                    started: float) -> dict:
    """The trials of the search (those finished by earlier attempts kept, the rest sampled and trained), their
    record on the parent, then with `confirm_seeds` the confirmation children and the sweep's summary over them
    (`sweep.finish`); otherwise the best trial is the sweep's best."""
    parent_run_id = parent.info.run_id
    workload = design.workload(config, prepared, marks, parent_run_id)
    kept = kept_trials(parent_run_id, marks, design, config)
    done = [t for t in kept if is_done(t)]
    searcher = Searcher(config, design, kept)
    count = config.trials - len(done)
    trained, stop = sweep.train_children(config, workload.make_trainer, searcher.trials(count), count, searcher.tell)
    trials = sorted([*done, *trained], key=lambda t: t.spec.number)
    best = sweep.summarised(stop, parent_run_id, lambda: log_search(trials, design))
    if best is None:
        raise RuntimeError(f"none of the {len(trials)} trials trained its full budget; first error: "
                           f"{next((t.error for t in trials if t.error), 'none')}")
    notes = [*trial_notes(trials, design.objective), f"best trial: {best.name}, {design.objective} "
             f"{best.metrics[design.objective]:.4f} (run {best.run_id})"]
    if config.confirm_seeds:
        confirm = sweep.confirm_plan(config, design, [t for t in trials if state_of(t) == "COMPLETE"])
        children, confirmed, stop = sweep.train_planned(config, design, workload, confirm, parent_run_id, marks)
        result = sweep.finish(parent_run_id, config, design, workload, prepared, children, trained + confirmed, stop,
                              started)
        result["notes"][:0] = notes
        return result
    mlflow.log_metric(f"best_{design.objective}", best.metrics[design.objective])
    mlflow.set_tags({"best_run_id": best.run_id, **{f"best_{axis}": str(v) for axis, v in best.settings.items()}})
    registered = sweep.register_best(config, design, workload, prepared, best)
    sweep.log_effort(started, trained)
    return {"run_id": parent_run_id,
            "metrics": {**{f"best_{axis}": value for axis, value in best.settings.items()},
                        f"best_{design.objective}": best.metrics[design.objective]},
            "children": trials, "notes": [*notes, *registered]}


def run(config: Sweeping, design: Design) -> dict:
    """The sweep as `config.search` says: every configuration of a grid (`sweep.run`), or a search."""
    return sweep.run(config, design, search_children if config.search == ASHA else sweep.sweep_children)
