"""Which configuration is better, and does the difference count? Pure functions over logged values.

Runs that differ only in their seed are one configuration. A verdict compares the mean of a metric over seeds
between two configurations: the difference counts when it is larger than the seed-to-seed spread (the larger of
the two standard deviations over seeds); with a single seed on either side it says "single seed: not
conclusive".
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

from mlflow.entities import Run

from finetune_lab.contract import FINISHED

# Params that identify where a run's inputs came from rather than how it was configured: they may differ with
# the seed (a split's digest, a tiny model built per seed) or the checkout.
PROVENANCE_PARAMS = {"model_path", "model_revision", "dataset_digest", "git_commit", "run_name", "experiment"}
# Params that configure nothing the runs measured: what to do with the result, and the settings of a registered
# model that earlier versions logged as params of its run.
NOT_CONFIG_PARAMS = PROVENANCE_PARAMS | {"register_as", "base_spec", "base_path", "base_revision"}
SEED_PARAMS = {"seed", "split_seed"}
NOT_CONCLUSIVE = "single seed: not conclusive"


def verdicts(groups: dict[str, list[float]], metric: str, lower_is_better: bool, reference: str = "") -> list[str]:
    """One line per configuration against `reference` (default: the best mean): is the difference of the means
    over seeds larger than the seed-to-seed spread (the larger of the two standard deviations)?"""
    groups = {name: values for name, values in groups.items() if values}
    if not groups:  # nothing was measured (no run finished): nothing to say
        return []
    if len(groups) < 2:
        return [f"{metric}: one configuration only, nothing to compare"]
    means = {name: statistics.fmean(values) for name, values in groups.items()}
    if reference not in groups:
        reference = (min if lower_is_better else max)(means, key=means.get)
    lines = []
    for name, values in groups.items():
        if name == reference:
            continue
        difference = means[name] - means[reference]
        head = (f"{name} vs {reference}: {metric} {means[name]:.4g} vs {means[reference]:.4g} "
                f"(difference {difference:+.3g})")
        if min(len(values), len(groups[reference])) < 2:
            lines.append(f"{head}; {NOT_CONCLUSIVE}")
            continue
        spread = max(statistics.stdev(values), statistics.stdev(groups[reference]))
        larger = abs(difference) > spread
        better = name if (difference < 0) == lower_is_better else reference
        lines.append(f"{head} is {'' if larger else 'not '}larger than the seed-to-seed spread (largest std "
                     f"{spread:.3g}; {len(values)} and {len(groups[reference])} seeds): "
                     + (f"{better} is better" if larger else "no real difference"))
    return lines


def differing_params(runs: list[Run]) -> list[str]:
    """Params whose value is not the same in every run (a param missing from a run counts as differing)."""
    names = sorted(set().union(*(r.data.params for r in runs))) if runs else []
    return [n for n in names if len({r.data.params.get(n) for r in runs}) > 1]


def config_label(runs: list[Run]) -> Callable[[Run], str]:
    """Label a run by the params that differ between `runs`, seeds and provenance left out."""
    keys = [p for p in differing_params(runs) if p not in SEED_PARAMS | NOT_CONFIG_PARAMS]

    def name(logged: Run) -> str:
        return ", ".join(f"{k}={logged.data.params.get(k, '')}" for k in keys) or "same config"

    return name


def seed_groups(runs: list[Run], name: Callable[[Run], str], metric: str) -> dict[str, list[float]]:
    """The metric's values per configuration (runs that differ only in their seed share a name); finished runs
    only."""
    groups: dict[str, list[float]] = {}
    for logged in runs:
        if logged.info.status == FINISHED and metric in logged.data.metrics:
            groups.setdefault(name(logged), []).append(logged.data.metrics[metric])
    return groups
