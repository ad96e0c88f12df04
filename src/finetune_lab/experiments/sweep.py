"""Sweeps: one parent run, one child run per configuration x seed, every child on the same data and held-out split;
then a comparison table, a summary per configuration (mean ± std over seeds), figures, verdicts and the best child
on the parent, and optionally its registration. The machinery every sweep shares; what a sweep trains and shows is
its `Design` (`lora_sweep`: LoRA methods x ranks; `classify_sweep`: learning rates x epochs).

Recipe: prepare (config, data, model, architecture checks) → plan the children (`ChildSpec`) → with `resume`,
reopen the earlier parent and keep the children it finished with the same config and data → build what the children
share once (the design's workload) → train the others through an executor (`executors`: in this process, or on Ray
workers; a failing child is recorded and the sweep goes on; a signal or a tracking outage stops it) → summarise
every planned child, also on the way down after a signal → register the best.
"""

from __future__ import annotations

import abc
import contextlib
import numbers
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import datasets
import mlflow
import pandas as pd
from mlflow.tracking import MlflowClient

from finetune_lab import contract, executors, held_out, preamble, registry, resume, tracking, verdicts
from finetune_lab.config import Sweeping
from finetune_lab.contract import FAILED, FINISHED, KILLED, NOT_RUN
from finetune_lab.errors import one_line
from finetune_lab.schema import LogRange

# The unfinished children the `failed_children` tag names, and how much of each one's error it shows.
TAGGED_FAILURES = 5
TAGGED_ERROR_CHARS = 150


@dataclass(frozen=True)
class ChildSpec:
    """One child run the sweep plans."""

    label: str
    """Its configuration as tables and run names show it, like `r8` or `lr4e-05-ep2`."""
    setting: tuple[tuple[str, Any], ...]
    """Its configuration's values as (table column, value), in the table's order."""
    seed: int
    position: str = ""
    """Its place in the sweep, like `[2/4]`, for the console."""

    @property
    def settings(self) -> dict[str, Any]:
        return dict(self.setting)

    @property
    def name(self) -> str:
        return f"{self.label}-seed{self.seed}"

    def failed(self, run_id: str, error: str, status: str = FAILED) -> ChildOutcome:
        """The outcome of this child when it could not finish where it was sent (e.g. its worker died)."""
        return ChildOutcome(self, run_id, status, error=error)


def portable(splits: datasets.DatasetDict) -> datasets.DatasetDict:
    """The splits with their rows in memory, for a workload pickled for worker processes, maybe on other machines:
    a Dataset read from cache files pickles as their paths, which another machine does not have."""
    return datasets.DatasetDict({name: split.flatten_indices(keep_in_memory=True) if split.cache_files else split
                                 for name, split in splits.items()})


def plan(configurations: list[tuple[str, dict[str, Any]]], seeds: tuple[int, ...]) -> list[ChildSpec]:
    """Every child of the sweep, in the order they run: seed by seed, each of the (label, settings)
    `configurations` in turn."""
    grid = [(label, tuple(settings.items()), seed) for seed in seeds for label, settings in configurations]
    return [ChildSpec(label, setting, seed, f"[{k}/{len(grid)}]")
            for k, (label, setting, seed) in enumerate(grid, start=1)]


@dataclass
class ChildOutcome:
    spec: ChildSpec
    run_id: str
    status: str
    """FINISHED, FAILED, KILLED, or NOT_RUN (the sweep stopped before it started)."""
    metrics: dict[str, float] = field(default_factory=dict)
    curve: list[tuple[int, float]] = field(default_factory=list)
    error: str = ""
    reference: registry.Reference | None = None
    """The trained model's logits on the registry's check texts (only when registering, and trained now)."""
    reused: bool = False
    """Finished by an earlier attempt of the parent (`resume`), not trained now."""
    heldout: list[tuple[int, float]] = field(default_factory=list)
    """(step, objective on the held-out split) at each rung it reached (a search's trial)."""

    @property
    def seed(self) -> int:
        return self.spec.seed

    @property
    def settings(self) -> dict[str, Any]:
        return self.spec.settings

    @property
    def name(self) -> str:
        return self.spec.name


def _status_in_store(run_id: str) -> str:
    """How the store ended a run ("" if it cannot tell)."""
    if not run_id or tracking.offline():
        return ""
    return MlflowClient().get_run(run_id).info.status


@contextlib.contextmanager
def recorded(outcome: ChildOutcome) -> Iterator[ChildOutcome]:
    """Around one child's training in its trainer: a failure (OOM, NaN loss, a collapsed model, anything) is kept
    in `outcome` (FAILED unless the block set it FINISHED) and the sweep goes on; a signal or a tracking outage
    raises executors.Stopped with it."""
    try:
        yield outcome
    except KeyboardInterrupt as stop:
        outcome.status, outcome.error = _status_in_store(outcome.run_id) or KILLED, str(stop)
        raise executors.Stopped([outcome], stop) from stop
    except tracking.TrackingUnreachable as lost:
        raise executors.Stopped([outcome], lost) from lost
    except Exception as error:  # noqa: BLE001 - record it and go on with the sweep
        if tracking.offline() or tracking.unreachable(error):
            tracking.go_offline(error)
            raise executors.Stopped([outcome], tracking.TrackingUnreachable(f"{outcome.name} had not finished "
                                                                            "training")) from error
        outcome.error = one_line(error)


class Design(abc.ABC):
    """What one kind of sweep brings to the shared machinery: its grid, its preparation and children, the columns
    and objective of its tables, its figures and its registration."""

    kind: str
    """The parent run's kind (`contract.KIND_TAG`)."""
    table_metrics: list[str]
    """The comparison table's metric columns, in order."""
    summary_metrics: list[str]
    """Averaged over seeds per configuration in the summary."""
    objective: str
    """The metric that picks the best configuration (its mean over seeds) and its best child."""
    lower_is_better: bool
    summary_artifact: str
    """The summary's file name on the parent."""
    axes: list[str]
    """The table columns that name a configuration, as `configurations` sets them."""

    @abc.abstractmethod
    def configurations(self, config: Sweeping) -> list[tuple[str, dict[str, Any]]]:
        """The grid: (label, {table column: value}) per configuration, in the order they run."""

    @abc.abstractmethod
    def label(self, settings: dict[str, Any]) -> str:
        """A configuration's name in run names and tables, from its values ({table column: value})."""

    @abc.abstractmethod
    def space(self, config: Sweeping) -> dict[str, tuple | LogRange]:
        """What a search samples: table column → its choices (a tuple) or a log-uniform range."""

    @abc.abstractmethod
    def prepare(self, config: Sweeping, split_seed: int):
        """Check config, data and model together (InputError with every problem); return what was prepared, with
        `data` (data.LoadedData) and `source` (models.ModelSource)."""

    def preamble_params(self, prepared) -> dict[str, Any]:
        """Params of the parent beyond the sources, the environment and the data's sizes and digest."""
        return {}

    @abc.abstractmethod
    def workload(self, config: Sweeping, prepared, marks: dict[str, str], parent_run_id: str):
        """What every child shares, sent once to each process that trains children; its `make_trainer()` gives the
        trainer of that process: `trainer(spec, run_id="") -> ChildOutcome` (see `executors`)."""

    def record_kept(self, workload, specs: list[ChildSpec]) -> dict[str, ChildOutcome]:
        """The planned children whose results were kept on this machine during a tracking outage, recorded now as
        child runs: name → outcome (none, unless the design keeps results)."""
        return {}

    def verdict_groups(self, table: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
        """The families of configurations a verdict compares: (title, their rows of the table); one family of all
        by default."""
        return [("", table)]

    @abc.abstractmethod
    def log_figures(self, summary: pd.DataFrame, children: list[ChildOutcome], best: pd.Series) -> None:
        """The parent's figures (and charts) of the finished children."""

    @abc.abstractmethod
    def register(self, workload, prepared, best: ChildOutcome) -> dict:
        """Register the best child's model after a verified reload; registry.register_verified's result."""

    def plan(self, config: Sweeping) -> list[ChildSpec]:
        return plan(self.configurations(config), config.seeds)


def train_children(config: Sweeping, make_trainer, specs: Iterable[ChildSpec], count: int | None = None,
                   on_end: Callable[[ChildOutcome], None] = lambda outcome: None
                   ) -> tuple[list[ChildOutcome], BaseException | None]:
    """Train `specs` (a list, or an iterator of `count` made one at a time when each can start) where the config
    says (`executors`), until a signal or a tracking outage stops it; `on_end` is told each outcome as it ends,
    before the next spec is taken. Returns an outcome per spec taken (per spec of a list: NOT_RUN for those never
    started), in order, and what stopped it (None if nothing did)."""
    ended: dict[str, ChildOutcome] = {}
    taken: list[ChildSpec] = []
    stop: BaseException | None = None

    def taking() -> Iterator[ChildSpec]:
        for spec in specs:
            taken.append(spec)
            yield spec

    try:
        for outcome in executors.run_children(config, make_trainer, taking(), len(specs) if count is None else count):
            ended[outcome.name] = outcome
            on_end(outcome)
    except executors.Stopped as stopped:
        ended.update({outcome.name: outcome for outcome in stopped.outcomes})
        stop = stopped.cause
    except KeyboardInterrupt as between_children:
        stop = between_children
    planned = specs if isinstance(specs, list) else taken
    return [ended.get(spec.name) or ChildOutcome(spec, "", NOT_RUN, error=f"not run: {stop}") for spec in planned], stop


def train_planned(config: Sweeping, design: Design, workload, specs: list[ChildSpec], parent_run_id: str,
                  marks: dict[str, str]) -> tuple[list[ChildOutcome], list[ChildOutcome], BaseException | None]:
    """`specs` reused when the parent already finished them with the same config and data, recorded when kept on
    disk during an outage, trained otherwise: (their outcomes in order, those trained now, what stopped it)."""
    done = reused_children(parent_run_id, specs, marks)
    done.update(design.record_kept(workload, [s for s in specs if s.name not in done]))
    trained, stop = train_children(config, workload.make_trainer, [s for s in specs if s.name not in done])
    outcomes = {**done, **{c.name: c for c in trained}}
    return [outcomes[s.name] for s in specs], trained, stop


def reused_children(parent_run_id: str, specs: list[ChildSpec], marks: dict[str, str]) -> dict[str, ChildOutcome]:
    """The planned children that the parent already finished with the same config and data, read back from the
    store: name → outcome."""
    finished = resume.finished_children(parent_run_id, marks)
    client, reused = MlflowClient(), {}
    for spec in specs:
        if spec.name in finished:
            run = finished[spec.name]
            history = client.get_metric_history(run.info.run_id, "train_loss")
            reused[spec.name] = ChildOutcome(spec, run.info.run_id, FINISHED, dict(run.data.metrics),
                                             sorted((m.step, m.value) for m in history), reused=True)
    return reused


def confirm_plan(config: Sweeping, design: Design, children: list[ChildOutcome]) -> list[ChildSpec]:
    """`confirm_seeds` x the best `confirm_top` configurations among `children` (by their mean objective over the
    seeds that finished, at full budget), best first."""
    table = comparison_table(children, [design.objective])
    if not (table["status"] == FINISHED).any():
        return []
    summary = contract.summarise(table, design.axes, [design.objective])
    ranked = summary.sort_values(f"{design.objective}_mean", ascending=design.lower_is_better, kind="stable")
    best = [{axis: _plain(row[axis]) for axis in design.axes} for _, row in ranked.head(config.confirm_top).iterrows()]
    return plan([(design.label(settings), settings) for settings in best], config.confirm_seeds)


def comparison_table(children: list[ChildOutcome], metrics: list[str]) -> pd.DataFrame:
    """One row per planned child: its configuration, seed, `metrics`, status and run."""
    rows = [{**c.settings, "seed": c.seed, **{m: c.metrics.get(m) for m in metrics}, "status": c.status,
             "reused": c.reused, "run_id": c.run_id, "error": c.error} for c in children]
    return pd.DataFrame(rows)


def best_child(table: pd.DataFrame, summary: pd.DataFrame, design: Design) -> pd.Series:
    """The configuration with the best mean objective over its finished seeds, and its child with the best
    objective."""
    pick = "idxmin" if design.lower_is_better else "idxmax"
    mean = summary[f"{design.objective}_mean"]
    best = summary.loc[getattr(mean, pick)(), design.axes]
    finished = table[(table["status"] == FINISHED) & (table[design.axes] == best.values).all(axis=1)]
    return finished.loc[getattr(finished[design.objective].astype(float), pick)()]


def best_configuration_mean_name(design: Design) -> str:
    """The parent's metric of the best configuration's mean objective over its seeds (what the verdicts compare),
    named apart from `best_<objective>`, its best child's score."""
    return f"best_configuration_{design.objective}_mean"


def best_configuration_mean(summary: pd.DataFrame, best: pd.Series, design: Design) -> float:
    """The mean objective over the finished seeds of the configuration of `best`."""
    rows = summary[(summary[design.axes] == best[design.axes].values).all(axis=1)]
    return float(rows[f"{design.objective}_mean"].iloc[0])


def configuration_label(row, axes: list[str], table: pd.DataFrame) -> str:
    """A configuration named by its values on `axes` (those that take one value in the whole table left out)."""
    varying = [a for a in axes if table[a].nunique() > 1] or axes
    return ", ".join(f"{a}={row[a]}" for a in varying)


def held_out_by_configuration(table: pd.DataFrame, design: Design, records: held_out.Records
                               ) -> dict[str, verdicts.HeldOut]:
    """Each configuration's per-example held-out values, its finished seeds' records pooled (`held_out.Records`),
    where every one of them logged its record on the same examples."""
    finished = table[table["status"] == FINISHED]
    run_ids: dict[str, list[str]] = {}
    for _, row in finished.iterrows():
        run_ids.setdefault(configuration_label(row, design.axes, table), []).append(row["run_id"])
    pooled = {name: records.pooled(ids) for name, ids in run_ids.items()}
    return {name: values for name, values in pooled.items() if values is not None}


def verdict_families(table: pd.DataFrame, design: Design, best: pd.Series | None = None,
                     held_out_values: dict[str, verdicts.HeldOut] | None = None) -> list[verdicts.Family]:
    """The verdicts over the finished children, a family per `design.verdict_groups` (`verdicts.family`: Holm within
    it): each configuration's mean objective over its seeds against the best's (the configuration of `best` where
    the family holds it, so that a tie names the same best), with the paired test on `held_out_values`
    (configuration → its pooled record) where both sides have one. The family of `best` first, and in each the
    runner-up's verdict first: the first verdict says whether the best is shown ahead of the runner-up."""
    reference = "" if best is None else configuration_label(best, design.axes, table)
    families = []
    for title, rows in design.verdict_groups(table[table["status"] == FINISHED]):
        groups: dict[str, list[float]] = {}
        for _, row in rows.iterrows():
            groups.setdefault(configuration_label(row, design.axes, table), []).append(float(row[design.objective]))
        families.append((reference not in groups, verdicts.family(groups, design.objective, design.lower_is_better,
                                                                  reference, held_out_values, title)))
    return [found for _, found in sorted(families, key=lambda pair: pair[0])]


def log_verdicts(table: pd.DataFrame, design: Design, best: pd.Series) -> list[str]:
    """On the parent: the verdicts (`verdict_families`, each configuration's seeds' held-out records read back from
    the store) as `verdicts.txt` and, with their numbers, `verdicts.json`; the first line as the tag `verdict`, and
    whether it shows the best ahead as the tag `best_shown_better`. Returns the lines."""
    families = verdict_families(table, design, best, held_out_by_configuration(table, design, held_out.Records()))
    lines = [line for found in families for line in found.lines()]
    shown = bool(families and families[0].verdicts and families[0].verdicts[0].shown)
    mlflow.log_text("\n".join(lines) + "\n", contract.VERDICTS_TEXT)
    mlflow.log_dict({"objective": design.objective, "lower_is_better": design.lower_is_better,
                     "best_configuration": configuration_label(best, design.axes, table), "best_shown_better": shown,
                     "lines": lines, "verdicts": [record for found in families for record in found.records()]},
                    contract.VERDICTS_RECORD)
    tracking.set_or_clear_tag("verdict", lines[0] if lines else "")
    mlflow.set_tag(contract.BEST_SHOWN_BETTER_TAG, str(shown).lower())
    return lines


def failures_note(unfinished: list[ChildOutcome]) -> str:
    """The `failed_children` tag: the first few children that did not finish, with their errors cut short, and where
    every child's status and error is (a tag holds a few thousand characters; a grid may stop thousands of
    children); "" when every child finished."""
    if not unfinished:
        return ""
    named = "; ".join(f"{c.name}: {c.status} {c.error[:TAGGED_ERROR_CHARS]}" for c in unfinished[:TAGGED_FAILURES])
    more = len(unfinished) - TAGGED_FAILURES
    return (named + (f"; and {more:,} more" if more > 0 else "")
            + f" (every child's status and error: {contract.COMPARISON_TABLE})")


def log_summary(children: list[ChildOutcome], design: Design) -> dict | None:
    """On the parent run: the comparison table of every planned child (with its status), the children that did not
    finish; and over the finished ones the summary per configuration, figures, verdicts, the best configuration's
    mean objective and its best child. None if none finished."""
    table = comparison_table(children, design.table_metrics)
    tracking.log_table(table, contract.COMPARISON_TABLE)
    unfinished = [c for c in children if c.status != FINISHED]
    mlflow.log_metric("failed_children", len(unfinished))
    tracking.set_or_clear_tag("failed_children", failures_note(unfinished))
    if len(unfinished) == len(children):
        return None
    summary = contract.summarise(table, design.axes, design.summary_metrics)
    tracking.log_table(summary, design.summary_artifact)
    best = best_child(table, summary, design)
    lines = log_verdicts(table, design, best)
    design.log_figures(summary, children, best)
    mean = {best_configuration_mean_name(design): best_configuration_mean(summary, best, design)}
    mlflow.log_metrics({**{f"best_{axis}": float(best[axis]) for axis in design.axes
                           if isinstance(best[axis], numbers.Number)},
                        **mean, f"best_{design.objective}": float(best[design.objective])})
    mlflow.set_tags({**{f"best_{axis}": str(best[axis]) for axis in design.axes}, "best_run_id": best["run_id"]})
    return {"table": table, "summary": summary, "best": best, "best_configuration_mean": mean, "verdicts": lines}


def _plain(value):
    """A numpy scalar (a table cell) as the Python value it holds."""
    return value.item() if hasattr(value, "item") else value


def _outage_message(stop: BaseException, parent_run_id: str) -> str:
    return (f"the tracking server {mlflow.get_tracking_uri()} is unreachable; {stop}. When it is back, resume with "
            f"`-P resume={parent_run_id}` (`--resume {parent_run_id}` when called directly): it records what was "
            f"kept and trains only what is missing. The last error: {tracking.offline()[:200]}")


def summarised(stop: BaseException | None, parent_run_id: str, summarise: Callable[[], Any]) -> Any:
    """`summarise()` the children that ended, also on the way down after a signal (`stop`, raised then, so that every
    open run ends KILLED); after a tracking outage nothing more can be logged: say how to go on instead."""
    if isinstance(stop, tracking.TrackingUnreachable):
        raise tracking.TrackingUnreachable(_outage_message(stop, parent_run_id)) from stop
    try:
        return summarise()
    finally:
        if stop is not None:
            raise stop


def register_best(config: Sweeping, design: Design, workload, prepared, best: ChildOutcome) -> list[str]:
    """With `register_as`: register `best`'s model; the line that says so (none otherwise)."""
    if not config.register_as:
        return []
    result = design.register(workload, prepared, best)
    return [f"registered {result['model_uri']} (champion {result['decision']})"]


def log_effort(started: float, trained: list[ChildOutcome]) -> None:
    """On the parent: `sweep_wall_s` (since `started`), and the training time and steps of the children trained
    now (`child_train_s_sum`, `child_train_steps_sum`)."""
    mlflow.log_metrics({"sweep_wall_s": time.perf_counter() - started,
                        "child_train_s_sum": sum(c.metrics.get("train_runtime_s", 0.0) for c in trained),
                        "child_train_steps_sum": sum(c.metrics.get("train_steps", 0.0) for c in trained)})


def child_notes(children: list[ChildOutcome], objective: str) -> list[str]:
    """A line per child for the console: its name, status, and objective or error."""
    width = max(len(c.name) for c in children) + 1
    return [f"  {c.name:<{width}} {c.status:<9} "
            + (f"{objective} {c.metrics[objective]:.4f}" if c.status == FINISHED else c.error)
            + (" (finished earlier, reused)" if c.reused else "") for c in children]


def finish(parent_run_id: str, config: Sweeping, design: Design, workload, prepared, children: list[ChildOutcome],
           trained: list[ChildOutcome], stop: BaseException | None, started: float) -> dict:
    """After the children: the summary over `children` (also on the way down after a signal, which is raised
    then), the registration of the best, and the effort (`log_effort`) of those `trained` now."""
    outcome = summarised(stop, parent_run_id, lambda: log_summary(children, design))
    if outcome is None:
        raise RuntimeError(f"all {len(children)} child runs failed; first error: {children[0].error}")
    best = outcome["best"]
    registered = register_best(config, design, workload, prepared,
                               next(c for c in children if c.run_id == best["run_id"]))
    log_effort(started, trained)
    return {
        "run_id": parent_run_id,
        "metrics": {**{f"best_{axis}": _plain(best[axis]) for axis in design.axes},
                    **outcome["best_configuration_mean"], f"best_{design.objective}": float(best[design.objective])},
        "children": children,
        "notes": ["children:", *child_notes(children, design.objective), *outcome["verdicts"],
                  f"best child run: {best['run_id']}", *registered],
    }


def sweep_children(parent: mlflow.ActiveRun, config: Sweeping, design: Design, prepared, marks: dict[str, str],
                   started: float) -> dict:
    """Every planned child of `parent`, then with `confirm_seeds` the best configurations again with those seeds:
    each reused when the parent already finished it with the same config and data, recorded when kept on disk
    during an outage, trained otherwise; then the summary over them all, the registration, and the effort."""
    parent_run_id = parent.info.run_id
    workload = design.workload(config, prepared, marks, parent_run_id)
    specs = design.plan(config)
    children, trained, stop = train_planned(config, design, workload, specs, parent_run_id, marks)
    if stop is None and config.confirm_seeds:
        planned = {s.name for s in specs}
        confirm = [s for s in confirm_plan(config, design, children) if s.name not in planned]
        confirmed, trained_now, stop = train_planned(config, design, workload, confirm, parent_run_id, marks)
        children, trained = children + confirmed, trained + trained_now
    return finish(parent_run_id, config, design, workload, prepared, children, trained, stop, started)


# How a sweep trains its children in the parent run and summarises them (`sweep_children` for a grid).
SweepChildren = Callable[[mlflow.ActiveRun, Sweeping, Design, Any, dict[str, str], float], dict]


def execute(config: Sweeping, design: Design, children: SweepChildren = sweep_children) -> dict:
    """The whole sweep inside the active run: the parent of its children (with `resume`: the run that reopens the
    earlier parent). Validate, train the children through the executor (`children`), summarise, register. Return
    the parent's id, the best child, the children and notes."""
    started = time.perf_counter()
    # The held-out split (and the tiny model) come from the first seed: identical for every child.
    split_seed = config.seeds[0] if config.seeds else 0
    with preamble.begin(config, design.kind, lambda: design.prepare(config, split_seed),
                        lambda prepared: {"split_seed": split_seed, **design.preamble_params(prepared)}) as begun:
        prepared = begun.prepared
        result = children(begun.parent, config, design, prepared, resume.marks(config, prepared.data), started)
    result["notes"][:0] = begun.notes
    return result


def run(config: Sweeping, design: Design, children: SweepChildren = sweep_children) -> dict:
    """The whole sweep inside one parent run (with `resume`: inside the earlier parent, reopened, under a run of
    its own); return the parent's id, the best child and the notes."""
    kind = contract.RESUME if config.resume else design.kind
    with tracking.experiment_run(kind, config.experiment, config.run_name) as invocation:
        result = execute(config, design, children)
        return {"run_id": result["run_id"], "metrics": result["metrics"], "notes": result["notes"],
                "ui": tracking.ui_hint(invocation.info.experiment_id)}
