"""The report's sections, one per kind of run: classification runs, sweeps, probes, resume attempts, bench runs,
anything else. Each section
is a list of blocks: tables of the logged values, figures, and the verdicts."""

from __future__ import annotations

import math
import re
import time

import mlflow
import pandas as pd
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from finetune_lab import contract, held_out, plots, verdicts
from finetune_lab.errors import InputError
from finetune_lab.report.configurations import (
    NOT_CONFIG_PARAMS,
    PROVENANCE_PARAMS,
    config_label,
    differing_params,
    seed_groups,
)
from finetune_lab.report.render import (
    Block,
    Bullets,
    Figure,
    Figures,
    Heading,
    Table,
    Text,
    cell,
    counted,
    number,
    png,
    short,
)
from finetune_lab.report.store import Artifacts, ExperimentRuns, kind_of, label, read_experiment


def run_table(runs: list[Run], metrics: list[str], first_params: tuple[str, ...] = (),
              hidden: tuple[str, ...] = ()) -> list[Block]:
    """Runs side by side: the params that differ between them (`hidden` ones left out), the metrics any of them
    logged, errors. A param named like a metric of these runs (`precision`: the compute precision asked for, and a
    classifier's precision; `train_examples`: in the data, and trained on) is headed `<name> (param)`."""
    differing = differing_params(runs)
    params = [p for p in first_params if p in differing]
    params += [p for p in differing if p not in NOT_CONFIG_PARAMS and p not in params and p not in hidden]
    shown = [m for m in metrics if any(m in r.data.metrics for r in runs)]
    measured = {m for r in runs for m in r.data.metrics}
    with_error = any(contract.ERROR_TAG in r.data.tags for r in runs)
    columns = ["run", "run id", "status", *(f"{p} (param)" if p in measured else p for p in params), *shown,
               *(["error"] if with_error else [])]
    rows = []
    for logged in runs:
        row = [label(logged), logged.info.run_id[:8], logged.info.status,
               *(logged.data.params.get(p, "") for p in params), *(number(logged.data.metrics.get(m)) for m in shown)]
        rows.append(row + ([short(logged.data.tags.get(contract.ERROR_TAG, ""))] if with_error else []))
    blocks: list[Block] = [Table(columns, rows)]
    provenance = [p for p in differing if p in PROVENANCE_PARAMS - {"run_name", "experiment"}]
    if provenance:
        blocks.append(Text(f"Also differing between these runs: {', '.join(provenance)}."))
    return blocks


def summary_table(summary: pd.DataFrame, columns: list[str]) -> Table:
    """The `columns` that name a configuration, seeds, then `mean ± std` per metric of a sweep summary (metrics
    without values left out)."""
    metrics = [c[: -len("_mean")] for c in summary.columns if c.endswith("_mean") and summary[c].notna().any()]
    rows = [[*(number(row[c]) for c in columns), number(row.get("seeds")),
             *(" ± ".join(filter(None, (number(row[f"{m}_mean"]), number(row.get(f"{m}_std"))))) for m in metrics)]
            for _, row in summary.iterrows()]
    return Table([*columns, "seeds", *metrics], rows)


def family_lines(runs_per_configuration: dict[str, list[Run]], metric: str, lower_is_better: bool,
                 records: held_out.Records | None, reference: str = "") -> list[str]:
    """The verdict lines of one family (`verdicts.family`, as a sweep's parent states them): each configuration's
    runs (its seeds) give the metric's values and, with `records` (for the metric the per-example held-out records
    measure: a classifier's accuracy, a language model's eval_loss), where every one of them logged its record on
    the same examples, their pooled held-out values for the paired test."""
    groups = {name: [r.data.metrics[metric] for r in runs] for name, runs in runs_per_configuration.items()}
    pooled = {name: records.pooled([r.info.run_id for r in runs]) for name, runs in runs_per_configuration.items()
              if records is not None}
    return verdicts.family(groups, metric, lower_is_better, reference,
                           {name: values for name, values in pooled.items() if values is not None}).lines()


def parent_verdicts(parent: Run, children: list[Run], artifacts: Artifacts, name, metric: str,
                    lower_is_better: bool) -> list[Block]:
    """A sweep's verdicts as its parent stated them (`verdicts.json`); for a parent without them (it logged none),
    the same statistics computed from its finished children (`name` labels a child's configuration), said so."""
    logged = artifacts.json(parent, contract.VERDICTS_RECORD)
    if logged is not None:
        return [Bullets(logged["lines"])] if logged["lines"] else []
    lines = family_lines(seed_groups(children, name, metric), metric, lower_is_better, artifacts.records)
    if not lines:
        return []
    return [Text(f"Verdicts computed from the children (the parent has no `{contract.VERDICTS_RECORD}`):"),
            Bullets(lines)]


def classification_runs(runs: list[Run], artifacts: Artifacts) -> list[Block]:
    """Classification runs side by side, and their confusion matrices."""
    blocks: list[Block] = [Heading(3, f"Classification runs ({len(runs)})"),
                           *run_table(runs, contract.CLASSIFY_METRICS)]
    matrices = []
    for logged in runs:
        matrix = artifacts.json(logged, contract.CONFUSION_MATRIX)
        if matrix:
            figure = plots.confusion_figure(matrix)
            figure.axes[0].set_title(label(logged))
            matrices.append(Figure(f"{label(logged)} ({logged.info.run_id[:8]})",
                                   f"confusion_matrix-{label(logged)}", png(figure)))
    if matrices:
        blocks += [Text("Confusion matrices on each run's evaluation split:"), Figures(matrices)]
    return blocks


def classification_section(runs: list[Run], artifacts: Artifacts) -> list[Block]:
    """Independent classification runs, and the verdicts on their accuracy (runs that differ only in their seed are
    one configuration)."""
    finished = [r for r in runs if r.info.status == contract.FINISHED]
    lines = family_lines(seed_groups(finished, config_label(finished), "accuracy"), "accuracy", False,
                         artifacts.records)
    return [*classification_runs(runs, artifacts), Bullets(lines)]


# A classifier sweep's configuration: its summary's columns → (the children's param, its type).
CLASSIFY_SWEEP_AXES = {"learning_rate": ("learning_rate", float), "epochs": ("epochs", float)}


def classify_sweep_section(parent: Run, children: list[Run], artifacts: Artifacts) -> list[Block]:
    """A classifier sweep: its best configuration and best child, the summary per configuration (mean ± std over
    seeds) with its figure, its verdicts, then its children as classification runs side by side."""
    tags, metrics = parent.data.tags, parent.data.metrics
    heading = Heading(3, f"Classifier sweep {label(parent)} ({parent.info.run_id[:8]}), status {parent.info.status}")
    if not children:
        return [heading, without_children(parent)]
    blocks: list[Block] = [heading]
    if "best_run_id" in tags:
        mean = metrics.get("best_configuration_accuracy_mean")
        blocks.append(Text(
            f"{counted(len(children), 'child run')}; best configuration (highest mean accuracy over its seeds): "
            + ", ".join(f"{axis}={number(float(tags[f'best_{axis}']))}" for axis in CLASSIFY_SWEEP_AXES)
            + ("" if mean is None else f", mean accuracy {number(mean)}")
            + f"; its best child {tags['best_run_id'][:8]}, accuracy {number(metrics.get('best_accuracy'))}."))
    summary = configuration_summary(parent, children, artifacts)
    if len(summary):
        blocks += [Text(f"Per configuration, mean ± std over seeds (`{contract.CONFIGURATION_SUMMARY}`):"),
                   summary_table(summary, list(CLASSIFY_SWEEP_AXES))]
    figure = artifacts.raw(parent, contract.METRICS_BY_CONFIGURATION_FIGURE)
    if figure is not None:
        blocks.append(Figures([Figure("metrics by configuration", f"metrics_by_configuration-{label(parent)}",
                                      figure)]))
    return [*blocks, *parent_verdicts(parent, children, artifacts, config_label(children), "accuracy", False),
            *classification_runs(children, artifacts)]


def sweep_summary(parent: Run, children: list[Run], artifacts: Artifacts, artifact: str,
                  axes: dict[str, tuple[str, type]], metrics: list[str]) -> pd.DataFrame:
    """A sweep's logged summary (`artifact`), or the same summary computed from its children if it lacks one: per
    configuration (`axes`: its columns → the children's param that holds each, and its type), the seeds that
    finished and the mean and std of `metrics` over them."""
    logged = artifacts.table(parent, artifact)
    if logged is not None:
        return logged
    rows = [{**{column: kind(c.data.params[param]) for column, (param, kind) in axes.items()},
             "status": c.info.status, **{m: c.data.metrics.get(m, math.nan) for m in metrics}}
            for c in children if all(param in c.data.params for param, _ in axes.values())]
    return contract.summarise(pd.DataFrame(rows), list(axes), metrics) if rows else pd.DataFrame()


def rank_summary(parent: Run, children: list[Run], artifacts: Artifacts) -> pd.DataFrame:
    """The LoRA sweep's per-rank summary (see `sweep_summary`)."""
    return sweep_summary(parent, children, artifacts, contract.RANK_SUMMARY, {"rank": ("lora_r", int)},
                         contract.SUMMARY_METRICS)


def configuration_summary(parent: Run, children: list[Run], artifacts: Artifacts) -> pd.DataFrame:
    """The classifier sweep's summary per learning rate and epochs (see `sweep_summary`)."""
    return sweep_summary(parent, children, artifacts, contract.CONFIGURATION_SUMMARY, CLASSIFY_SWEEP_AXES,
                         contract.CLASSIFY_SWEEP_SUMMARY_METRICS)


def without_children(parent: Run) -> Text:
    """A sweep's parent that has no child run: refused (its bad input, in its `error` tag), ended otherwise, or not
    that far yet. It has no table, figure or verdict."""
    error, status = parent.data.tags.get(contract.ERROR_TAG, ""), parent.info.status
    if error.startswith(f"{InputError.__name__}: "):
        return Text(f"Refused before any child ran: {error}")
    return Text(f"Ended {status} before any child ran: {error}" if error else f"No child run yet, status {status}.")


def sweep_section(parent: Run, children: list[Run], artifacts: Artifacts) -> list[Block]:
    tags = parent.data.tags
    heading = Heading(3, f"LoRA rank sweep {label(parent)} ({parent.info.run_id[:8]})")
    if not children:
        return [heading, without_children(parent)]
    blocks: list[Block] = [
        heading,
        Text(f"{counted(len(children), 'child run')}, status {parent.info.status}; best rank (lowest mean held-out "
             f"loss): {tags.get('best_rank', 'n/a')}, best child run {tags.get('best_run_id', 'n/a')[:8]}."),
    ]
    blocks += run_table(children, contract.SWEEP_CHILD_METRICS, first_params=("lora_r", "seed"))
    summary = rank_summary(parent, children, artifacts)
    if len(summary):
        sweep = label(parent)
        figures = [Figure("loss vs rank", f"loss_vs_rank-{sweep}", png(plots.loss_vs_rank(summary)))]
        memory = plots.memory_vs_rank(summary)
        if memory is not None:
            figures.append(Figure("memory vs rank", f"memory_vs_rank-{sweep}", png(memory)))
        x = "rank"
        if "method" in summary and summary["method"].nunique() > 1:  # a row per method and rank
            summary, x = summary.assign(configuration=[contract.lora_label(m, r) for m, r in
                                                       zip(summary["method"], summary["rank"])]), "configuration"
        blocks += [Text(f"Per rank, mean ± std over seeds (`{contract.RANK_SUMMARY}`):"),
                   summary_table(summary, [x]), Figures(figures)]
    return blocks + parent_verdicts(parent, children, artifacts, lambda r: contract.lora_label(
        r.data.params.get("lora_method", contract.DEFAULT_LORA_METHOD), r.data.params.get("lora_r")), "eval_loss", True)


# What a search's parent says about its kind of sweep: objective, and the summary its confirmation logs.
SEARCH_KINDS = {contract.CLASSIFY_SWEEP: ("accuracy", contract.CONFIGURATION_SUMMARY, contract.CLASSIFY_METRICS),
                contract.LORA_SWEEP: ("eval_loss", contract.RANK_SUMMARY, contract.SWEEP_CHILD_METRICS)}
# The search table's columns the report leaves out (the run id is shown short).
SEARCH_HIDDEN = ("run_id", "error", "reused")


def is_search(parent: Run) -> bool:
    """Whether a sweep's parent ran a search (`search=asha`) rather than a grid."""
    return parent.data.params.get("search") == "asha"


def search_section(parent: Run, children: list[Run], artifacts: Artifacts) -> list[Block]:
    """A search: how many trials, how many stopped early and the steps they trained beside their full budgets, the
    best trial, every trial (`search_table.json`) and the objective against steps; then the confirmation: its
    children, their summary per configuration and the verdicts the parent logged."""
    tags, metrics, params = parent.data.tags, parent.data.metrics, parent.data.params
    objective, summary_artifact, child_metrics = SEARCH_KINDS[kind_of(parent)]
    heading = Heading(3, f"Search {label(parent)} ({parent.info.run_id[:8]}), status {parent.info.status}")
    table = artifacts.table(parent, contract.SEARCH_TABLE)
    if table is None:
        return [heading, without_children(parent)]
    trained, full = metrics.get("trial_steps_trained"), metrics.get("trial_steps_full_budget")
    share = f" ({100 * trained / full:.0f} %)" if trained is not None and full else ""
    best = ", ".join(f"{k.removeprefix('best_trial_')}={v}" for k, v in sorted(tags.items())
                     if k.startswith("best_trial_") and k != "best_trial_run_id")
    stopped, best_value = number(metrics.get("trials_stopped_early")), number(metrics.get(f"best_trial_{objective}"))
    blocks: list[Block] = [heading, Text(
        f"ASHA over {counted(len(table), 'trial')} ({params.get('sampler', 'tpe')} sampler, reduction "
        f"{params.get('reduction', '3')}, {params.get('rungs', '2')} rungs): {stopped} stopped early; the trials "
        f"trained {number(trained)} steps of the {number(full)} they would have at full budget{share}. Best trial: "
        f"{best or 'none'}, {objective} {best_value}.")]
    shown = [c for c in table.columns if c not in SEARCH_HIDDEN]
    blocks.append(Table([*shown, "run id"], [[cell(row[c]) for c in shown] + [str(row["run_id"])[:8]]
                                             for _, row in table.iterrows()]))
    figure = artifacts.raw(parent, contract.SEARCH_CURVES_FIGURE)
    if figure is not None:
        blocks.append(Figures([Figure(f"held-out {objective} per trial", f"search_curves-{label(parent)}", figure)]))
    confirmed = [c for c in children if contract.TRIAL_TAG not in c.data.tags]
    if confirmed:
        blocks += [Text(f"Confirmation of the best configurations with seeds {params.get('confirm_seeds', '')}:"),
                   *run_table(confirmed, child_metrics, first_params=("seed",))]
        summary = artifacts.table(parent, summary_artifact)
        if summary is not None:
            axes = [c for c in summary.columns if c != "seeds" and not c.endswith(("_mean", "_std"))]
            blocks.append(summary_table(summary, axes))
        logged = artifacts.raw(parent, contract.VERDICTS_TEXT)
        if logged is not None:
            blocks.append(Bullets([line for line in logged.decode("utf-8").splitlines() if line]))
    return blocks


def probe_section(parent: Run, children: list[Run], artifacts: Artifacts) -> list[Block]:
    """The probe's child runs (`before`, `after` or `after-r<N>`), the before/after comparison and its figures."""
    params = parent.data.params
    # `mlflow run` logs the parent's -P values shell-quoted; the children hold the value as the code used it.
    probe_input = next((c.data.params["probe_input"] for c in children if "probe_input" in c.data.params),
                       params.get("probe_input", "n/a"))
    blocks: list[Block] = [
        Heading(3, f"Retraining probe {label(parent)} ({parent.info.run_id[:8]})"),
        Text(f"status {parent.info.status}; probe_input {probe_input!r}, mode "
             f"{params.get('mode', 'n/a')}, rank {params.get('rank', 'n/a')}, copies of the new example "
             f"{params.get('repeats', params.get('new_example_repeats', 'n/a'))}."),
    ]
    if children:
        blocks += run_table(children, contract.PROBE_CHILD_METRICS, first_params=("new_example_repeats",),
                            hidden=("reply",))
    comparison = artifacts.table(parent, contract.PROBE_COMPARISON_TABLE)
    if comparison is not None and "repeats" in comparison:
        blocks += [Text(f"Before / after retraining (`{contract.PROBE_COMPARISON_TABLE}`):"),
                   before_after_table(comparison)]
    else:
        compared = [r for r in [parent, *children] if any(m in r.data.metrics for m in contract.PROBE_METRICS)]
        if compared:
            blocks += [Text("Before / after retraining (metrics of the runs):"),
                       *run_table(compared, contract.PROBE_METRICS)]
    figures = [Figure(name.removesuffix(".png").replace("_", " "), f"{name.removesuffix('.png')}-{label(parent)}",
                      data) for name in contract.PROBE_FIGURES if (data := artifacts.raw(parent, name)) is not None]
    if figures:
        blocks.append(Figures(figures))
    return blocks


def before_after_table(comparison: pd.DataFrame) -> Table:
    """The probe's comparison turned around: one row per measure; `before`, then one column per repeats value.
    `<measure>_before` / `<measure>_after` pairs share a row; a change (drop, forgetting, ...) has no `before`."""
    columns = ["measure", "before", *(f"after (repeats={n})" for n in comparison["repeats"])]
    rows, seen = [], set()
    for column in comparison.columns:
        if column in ("repeats", "probe_input", "mode", "before_run_id", "after_run_id"):
            continue
        measure = re.sub(r"_(before|after)$", "", column)
        if measure in seen:
            continue
        seen.add(measure)
        before, after = comparison.get(f"{measure}_before"), comparison.get(f"{measure}_after", comparison[column])
        if measure == column:
            before = None
        rows.append([measure, "" if before is None else cell(before.iloc[0]), *(cell(v) for v in after)])
    return Table(columns, rows)


def probe_verdicts(parents: list[Run], found: ExperimentRuns, records: held_out.Records) -> list[Block]:
    """Each `after` child against `before`, over probe runs that differ only in their seed: on the target's NLL
    (did the new example become more likely?), and on the held-out loss (forgetting), with the paired test of the
    per-example held-out losses."""
    name = config_label(parents)
    by_config: dict[str, list[Run]] = {}
    for parent in parents:
        by_config.setdefault(name(parent), []).extend(found.children_of(parent))
    lines = []
    for config, stages in by_config.items():
        prefix = "" if len(by_config) == 1 else f"[{config}] "
        # the target's NLL is measured on one text: only the seeds can test it
        for metric, paired in (("target_nll", None), ("eval_loss", records)):
            lines += [prefix + line for line in family_lines(seed_groups(stages, label, metric), metric, True, paired,
                                                             reference=contract.BEFORE)]
    return [Bullets(lines)]


def resume_section(runs: list[Run], found: ExperimentRuns) -> list[Block]:
    """The invocations that resumed an earlier parent: which parent each resumed, and how it ended."""
    names = {logged.info.run_id: label(logged) for logged in found.top}
    rows = []
    for logged in runs:
        resumed = logged.data.tags.get(contract.RESUMED_TAG, "")
        rows.append([label(logged), logged.info.run_id[:8], logged.info.status,
                     f"{names.get(resumed, '?')} ({resumed[:8]})" if resumed else "",
                     short(logged.data.tags.get(contract.ERROR_TAG, ""))])
    return [Heading(3, f"Resume attempts ({len(runs)})"),
            Table(["run", "run id", "status", "resumed parent", "error"], rows)]


def bench_section(runs: list[Run]) -> list[Block]:
    """Bench runs side by side: every ratio against the reference baseline they logged (the baseline's own, 1 by
    definition, left out)."""
    ratios = sorted({m for r in runs for m in r.data.metrics
                     if m.endswith("_ratio") and "/baseline/" not in m})
    return [Heading(3, f"Bench runs ({len(runs)})"), *run_table(runs, ratios)]


def other_section(runs: list[Run]) -> list[Block]:
    return [Heading(3, f"Other runs ({len(runs)})"),
            *run_table(runs, ["eval_loss", "train_loss", *contract.MEMORY_METRICS, "train_runtime_s"])]


def parents_overview(kind: str, parents: list[Run], metrics: list[str]) -> list[Block]:
    """With several sweeps or probes in one experiment, their parent runs side by side first."""
    if len(parents) < 2:
        return []
    return [Heading(3, f"{kind} ({len(parents)} parent runs)"), *run_table(parents, metrics)]


def experiment_section(found: ExperimentRuns, artifacts: Artifacts) -> list[Block]:
    blocks: list[Block] = [Heading(2, f"Experiment `{found.name}`")]
    if not found.top:
        return blocks + [Text("No runs.")]
    by_kind: dict[str, list[Run]] = {}
    for logged in found.top:
        by_kind.setdefault(kind_of(logged), []).append(logged)
    if contract.CLASSIFICATION in by_kind:
        blocks += classification_section(by_kind[contract.CLASSIFICATION], artifacts)
    searches = [p for kind in SEARCH_KINDS for p in by_kind.get(kind, []) if is_search(p)]
    for parent in by_kind.get(contract.CLASSIFY_SWEEP, []):
        if parent not in searches:
            blocks += classify_sweep_section(parent, found.children_of(parent), artifacts)
    sweeps, probes = by_kind.get(contract.LORA_SWEEP, []), by_kind.get(contract.PROBE, [])
    sweeps = [p for p in sweeps if p not in searches]
    blocks += parents_overview("LoRA rank sweeps", sweeps, contract.SWEEP_PARENT_METRICS)
    for parent in sweeps:
        blocks += sweep_section(parent, found.children_of(parent), artifacts)
    blocks += parents_overview("Searches", searches, contract.SEARCH_PARENT_METRICS)
    for parent in searches:
        blocks += search_section(parent, found.children_of(parent), artifacts)
    blocks += parents_overview("Retraining probes", probes, contract.PROBE_METRICS)
    for parent in probes:
        blocks += probe_section(parent, found.children_of(parent), artifacts)
    if probes:
        blocks += probe_verdicts(probes, found, artifacts.records)
    if contract.RESUME in by_kind:
        blocks += resume_section(by_kind[contract.RESUME], found)
    if contract.BENCH in by_kind:
        blocks += bench_section(by_kind[contract.BENCH])
    others = [r for kind, runs in by_kind.items() if kind not in (contract.CLASSIFICATION, contract.CLASSIFY_SWEEP,
                                                                 contract.LORA_SWEEP, contract.PROBE, contract.RESUME,
                                                                 contract.BENCH)
              for r in runs]
    if others:
        blocks += other_section(others)
    return blocks


def build(client: MlflowClient, experiments: list[str], artifacts: Artifacts, skip_run_id: str = "") -> list[Block]:
    """The report's blocks for `experiments`, in the order given."""
    blocks: list[Block] = [
        Heading(1, "finetune-lab report"),
        Text(f"Generated {time.strftime('%Y-%m-%d %H:%M:%S %Z')} from `{mlflow.get_tracking_uri()}`. A verdict "
             "compares a configuration with the best: the difference of the means over seeds with its 95 % "
             "interval and Welch's p (with 2 or more seeds a side), and the paired test on the same held-out "
             "examples (McNemar's for classifiers, a paired t-test of per-example losses for language models); "
             "with several configurations the deciding p-values are Holm-adjusted. A difference is shown when the "
             "deciding test (across seeds when both sides have them, else the held-out one) gives p < 0.05."),
    ]
    for name in experiments:
        found = read_experiment(client, name, skip_run_id)
        if found is None:
            blocks += [Heading(2, f"Experiment `{name}`"), Text("Not found in the tracking store.")]
        else:
            blocks += experiment_section(found, artifacts)
    return blocks

