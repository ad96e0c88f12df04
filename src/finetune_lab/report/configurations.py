"""Which runs the report treats as one configuration: runs that differ only in their seed (and where their inputs
came from) are one; it is labelled by the params that differ between the runs. Pure functions over logged runs."""

from __future__ import annotations

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


def seed_groups(runs: list[Run], name: Callable[[Run], str], metric: str) -> dict[str, list[Run]]:
    """The finished runs that logged `metric`, per configuration (runs that differ only in their seed share a
    name)."""
    groups: dict[str, list[Run]] = {}
    for logged in runs:
        if logged.info.status == FINISHED and metric in logged.data.metrics:
            groups.setdefault(name(logged), []).append(logged)
    return groups
