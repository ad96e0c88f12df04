"""Resuming an experiment in its own parent run: which parent (`latest`, or a run id), whether it was made with the
same config and data (refused, in one line saying what differs, if not), which of its children finished and can be
reused, and closing the children that an earlier attempt left RUNNING (killed with SIGKILL, or stranded by a
tracking outage).

Parents and children carry two tags for this (`contract.CONFIG_DIGEST_TAG`, `contract.DATA_DIGEST_TAG`): a digest
of every config field that changes what is trained (not `resume`, `run_name`, `experiment`, `register_as`,
`max_children`, nor where the children train: `executor`, `workers`, `cpus_per_worker`), and the
digests of the train and held-out splits as used.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator

import mlflow
import yaml
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

from finetune_lab import tracking
from finetune_lab.contract import (
    CONFIG_ARTIFACT,
    CONFIG_DIGEST_TAG,
    DATA_DIGEST_TAG,
    FINISHED,
    KILLED,
    KIND_TAG,
    RESUMED_TAG,
    RUNNING,
)
from finetune_lab.data import LoadedData
from finetune_lab.errors import InputError, problem
from finetune_lab.schema import as_params

LATEST = "latest"
# Fields that do not change what is trained: a resume may differ in them (a sweep begun on Ray workers may be
# finished in one process, and the other way round).
IGNORED_FIELDS = ("resume", "run_name", "experiment", "register_as", "executor", "workers", "cpus_per_worker",
                  "max_children")
# How far back `latest` looks among an experiment's parent runs.
LATEST_WINDOW = 200


def _trained_fields(config) -> dict:
    return {k: v for k, v in as_params(config).items() if k not in IGNORED_FIELDS}


def config_digest(config) -> str:
    return hashlib.sha256(json.dumps(_trained_fields(config), sort_keys=True, default=str).encode()).hexdigest()[:16]


def data_digest(data: LoadedData) -> str:
    """The train split's digest and the held-out split's, as `train/eval`."""
    return f"{data.digest}/{data.eval_digest}"


def marks(config, data: LoadedData) -> dict[str, str]:
    """The tags that say what a parent or child was made with."""
    return {CONFIG_DIGEST_TAG: config_digest(config), DATA_DIGEST_TAG: data_digest(data)}


def _refuse(message: str) -> InputError:
    return InputError([problem("resume", message)])


def config_differences(run: Run, config) -> str:
    """The trained fields in which `run`'s logged config differs from `config`, as `field old (now new)`."""
    try:
        with tracking.scratch_dir("resume") as scratch:
            path = MlflowClient().download_artifacts(run.info.run_id, CONFIG_ARTIFACT, str(scratch))
            logged = yaml.safe_load(open(path, encoding="utf-8")) or {}
    except (MlflowException, OSError):
        return f"its {CONFIG_ARTIFACT} could not be read"
    current = _trained_fields(config)
    changed = [f"{k} {logged.get(k)!r} (now {v!r})" for k, v in current.items() if logged.get(k) != v]
    return ", ".join(changed) or "its config digest differs"


def _parents(experiment_id: str, kind: str, skip_run_id: str) -> list[Run]:
    """The experiment's parent runs of `kind`, newest first."""
    found = MlflowClient().search_runs([experiment_id], filter_string=f"tags.`{KIND_TAG}` = '{kind}'",
                                       order_by=["attributes.start_time DESC"], max_results=LATEST_WINDOW)
    return [r for r in found if r.info.run_id != skip_run_id and MLFLOW_PARENT_RUN_ID not in r.data.tags]


def find_parent(config, kind: str, invocation: Run, data: LoadedData) -> Run:
    """The parent run `config.resume` names, checked against `config` and `data`; InputError (field `resume`) with
    what differs otherwise. `invocation`: this invocation's own run (its experiment is where `latest` looks)."""
    client = MlflowClient()
    digest = config_digest(config)
    if config.resume == LATEST:
        parents = _parents(invocation.info.experiment_id, kind, invocation.info.run_id)
        same = [r for r in parents if r.data.tags.get(CONFIG_DIGEST_TAG) == digest]
        if not same:
            resumable = [r for r in parents if CONFIG_DIGEST_TAG in r.data.tags]
            if not resumable:
                raise _refuse(f"no {kind} parent run to resume in this experiment (id {invocation.info.experiment_id})")
            newest = resumable[0]
            raise _refuse(f"no {kind} parent run in this experiment was made with this config; the newest, "
                          f"{newest.info.run_id}, differs: {config_differences(newest, config)}")
        parent = same[0]
    else:
        try:
            parent = client.get_run(config.resume)
        except MlflowException:
            raise _refuse(f"no run {config.resume} in the tracking store {tracking.configure()}") from None
        if parent.data.tags.get(KIND_TAG) != kind or MLFLOW_PARENT_RUN_ID in parent.data.tags:
            raise _refuse(f"run {config.resume} is not the parent run of a {kind} "
                          f"(its kind: {parent.data.tags.get(KIND_TAG, 'none')})")
        if CONFIG_DIGEST_TAG not in parent.data.tags:
            raise _refuse(f"run {config.resume} records no config digest: it stopped before its data was checked, "
                          "or was made by a version without resume; start a new run")
        if parent.data.tags[CONFIG_DIGEST_TAG] != digest:
            raise _refuse(f"run {config.resume} was made with a different config: {config_differences(parent, config)}")
    logged, current = parent.data.tags.get(DATA_DIGEST_TAG, ""), data_digest(data)
    if logged != current:
        raise _refuse(f"the data differs from run {parent.info.run_id}'s: train/eval digests {logged or 'none'} "
                      f"(now {current})")
    return parent


def children(parent_run_id: str) -> list[Run]:
    """Every child run of the parent, oldest first."""
    return MlflowClient().search_runs(
        [MlflowClient().get_run(parent_run_id).info.experiment_id],
        filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_run_id}'", order_by=["attributes.start_time ASC"],
        max_results=10_000)


def finished_children(parent_run_id: str, tags: dict[str, str]) -> dict[str, Run]:
    """Run name → the newest FINISHED child of the parent that carries `tags` (the same config and data)."""
    reusable = {}
    for child in children(parent_run_id):
        if child.info.status == FINISHED and all(child.data.tags.get(k) == v for k, v in tags.items()):
            reusable[child.data.tags.get(MLFLOW_RUN_NAME, child.info.run_name)] = child
    return reusable


def close_stranded(parent_run_id: str, by_run_id: str) -> list[str]:
    """End KILLED, with an `error` tag, the parent's children still RUNNING from an earlier attempt; their names."""
    closed = []
    for child in children(parent_run_id):
        if child.info.status == RUNNING:
            tracking.end_run_by_id(child.info.run_id, KILLED, "left RUNNING by an attempt that stopped without "
                                   f"ending it (SIGKILL or a tracking outage); closed by run {by_run_id}")
            closed.append(child.info.run_name)
    return closed


@contextlib.contextmanager
def parent_run(config, kind: str, invocation: mlflow.ActiveRun, data: LoadedData) -> Iterator[mlflow.ActiveRun]:
    """The run that holds the experiment's children, tagged with what they are made with: the invocation's own run,
    or with `config.resume` the earlier parent (checked by `find_parent`), reopened on top of it, its children left
    RUNNING closed first. The invocation's run then records which parent it resumed."""
    mlflow.set_tags(marks(config, data))
    if not config.resume:
        yield invocation
        return
    earlier = find_parent(config, kind, MlflowClient().get_run(invocation.info.run_id), data)
    mlflow.set_tag(RESUMED_TAG, earlier.info.run_id)
    with tracking.reopened_run(earlier.info.run_id) as parent:
        close_stranded(parent.info.run_id, invocation.info.run_id)
        yield parent


def note(parent: mlflow.ActiveRun, invocation: mlflow.ActiveRun) -> list[str]:
    """A line for the user when `parent` was resumed, none otherwise."""
    if parent.info.run_id == invocation.info.run_id:
        return []
    return [f"resumed {parent.info.run_id} (the run of this attempt: {invocation.info.run_id})"]
