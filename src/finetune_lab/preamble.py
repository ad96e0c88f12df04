"""The start of every experiment's run, written once: the config logged first (so that even a run that fails
validation shows what it was asked), the permission to register checked (`register_as`), data and model prepared
and checked, where they came from and the data as used logged (model source, environment, digest, sizes, the splits
as MLflow inputs), then the run that holds the experiment's children: the invocation's own, or with `resume` the
earlier parent reopened (`resume.parent_run`)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import mlflow

from finetune_lab import data as data_lib
from finetune_lab import device, models, registry, resume, tracking
from finetune_lab.config import Registering, Resumable, TrainingSetup, problems_that_stop_loading
from finetune_lab.data import TEST, TRAIN
from finetune_lab.errors import field_of, raise_if_any
from finetune_lab.schema import as_params

AnyPrepared = TypeVar("AnyPrepared")


@dataclass
class Begun(Generic[AnyPrepared]):
    """An experiment's run after its preamble."""

    prepared: AnyPrepared
    """What `prepare` returned: checked data (`data`) and model source (`source`)."""
    parent: mlflow.ActiveRun
    """The run that holds the children: the invocation's own, or the earlier parent it resumes."""
    invocation: mlflow.ActiveRun

    @property
    def notes(self) -> list[str]:
        """A line for the user when an earlier parent was resumed, none otherwise."""
        return resume.note(self.parent, self.invocation)


def log_config(config) -> None:
    """On the active run: the config as params and `config.yaml`, and for a training config the precision it
    trains in in this process (`effective_precision`: `auto` resolved for this device)."""
    tracking.log_config(as_params(config))
    if isinstance(config, TrainingSetup):
        tracking.log_params({"effective_precision": device.training_precision(config.precision)})


def log_sources(prepared, params: dict[str, Any] | None = None) -> None:
    """On the active run: where the model came from, the environment, the data's digest and sizes as used, `params`,
    and the splits as MLflow inputs. `prepared` holds `source` (models.ModelSource) and `data` (data.LoadedData)."""
    data = prepared.data
    tracking.log_params({**models.source_params(prepared.source), **tracking.environment_params(),
                         "dataset_digest": data.digest, "train_examples": len(data.splits[TRAIN]),
                         "eval_examples": len(data.splits[TEST]), **(params or {})})
    data_lib.log_inputs(data)


@contextlib.contextmanager
def begin(config, kind: str, prepare: Callable[[], AnyPrepared],
          params: Callable[[AnyPrepared], dict[str, Any]] = lambda prepared: {}) -> Iterator[Begun[AnyPrepared]]:
    """The preamble in the active run (the invocation's), for an experiment of `kind`: log the config, refuse it if a
    seed is bad (nothing can be loaded with it), check the permission to register (`register_as`), `prepare()`
    (which raises InputError with every problem), log the sources with `params(prepared)`; then, for a `Resumable`
    config, the parent run tagged with what its children are made with (`resume.parent_run`), else the invocation's
    run itself."""
    invocation = mlflow.active_run()
    log_config(config)
    raise_if_any(problems_that_stop_loading(config))
    if isinstance(config, Registering) and config.register_as and "register_as" not in map(field_of,
                                                                                            config.problems()):
        registry.check_may_register(config.register_as)  # before anything is loaded or trained
    prepared = prepare()
    log_sources(prepared, params(prepared))
    if not isinstance(config, Resumable):
        yield Begun(prepared, invocation, invocation)
        return
    with resume.parent_run(config, kind, invocation, prepared.data) as parent:
        yield Begun(prepared, parent, invocation)
