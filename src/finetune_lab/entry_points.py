"""The MLproject's entry points, one row each: the single source of `MLproject`, the `entrypoints/` scripts,
`docs/parameters.md` and the Names table of `docs/architecture.md` (`make generate` writes them all from this table:
`project_files`), and of the tests that go over every entry point.

Adding an entry point: a config in `config.py`, the experiment's module with its `run(config)`, a row here, then
`make generate`. Light on purpose: the scripts' `--help` imports it, so it names the experiment by `module:function`
and imports nothing heavy.

The team's tracking server (`python -m finetune_lab.team.server`) is built by the same `cli.command` but has no row:
it is not an MLproject entry point (nobody `mlflow run`s a server), makes no run, so has no kind nor default
experiment, and its options are documented with the server (docs/team.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from finetune_lab import contract
from finetune_lab.config import (
    BenchConfig,
    ClassifyConfig,
    ClassifySweepConfig,
    GenerateConfig,
    LoraSweepConfig,
    ProbeConfig,
    ReportConfig,
)


@dataclass(frozen=True)
class EntryPoint:
    """One entry point: `mlflow run . -e <name>` runs `python entrypoints/<name>.py`, which builds `config` from its
    options and calls `run`."""

    name: str
    """The MLproject's entry point and the script `entrypoints/<name>.py`."""
    config: type
    """Its configuration dataclass: the options, their types, defaults and `--help` (the field docstrings)."""
    run: str
    """The experiment, as `module:function`, imported only once the options are parsed."""
    kind: str
    """The `finetune_lab.kind` tag of the runs it makes (a `contract` name: the report groups runs by it)."""

    @property
    def experiment(self) -> str:
        """The MLflow experiment it records into when called directly: the config's default, stated there once."""
        return self.config().experiment


ENTRY_POINTS = (
    EntryPoint("classify", ClassifyConfig, "finetune_lab.experiments.classify:run", contract.CLASSIFICATION),
    EntryPoint("classify_sweep", ClassifySweepConfig, "finetune_lab.experiments.classify_sweep:run",
               contract.CLASSIFY_SWEEP),
    EntryPoint("lora_sweep", LoraSweepConfig, "finetune_lab.experiments.lora_sweep:run", contract.LORA_SWEEP),
    EntryPoint("retrain_probe", ProbeConfig, "finetune_lab.experiments.probe:run", contract.PROBE),
    EntryPoint("generate", GenerateConfig, "finetune_lab.experiments.generate:run", contract.GENERATE),
    EntryPoint("bench", BenchConfig, "finetune_lab.experiments.bench:run", contract.BENCH),
    EntryPoint("report", ReportConfig, "finetune_lab.report:write_report", contract.REPORT),
)


def named(name: str) -> EntryPoint:
    """The row of entry point `name`."""
    return next(row for row in ENTRY_POINTS if row.name == name)
