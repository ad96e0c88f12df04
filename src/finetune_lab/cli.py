"""Turn an experiment config dataclass into a click command: one `--option` per field, help from the
field docstrings with each field's type and default, every value taken as a string and validated by the config (so
all mistakes are reported together, one line each, instead of click stopping at the first).

Nothing heavy is imported here: the experiment itself (torch, transformers, mlflow) is imported only once the
options are parsed, so `--help` answers at once."""

from __future__ import annotations

import importlib
import os
import sys
import tempfile
import time
import traceback
from dataclasses import fields
from pathlib import Path
from typing import get_type_hints

import click

from finetune_lab import heap
from finetune_lab.config import FloatList, FloatSpace, IntList, as_params, field_docs, from_strings
from finetune_lab.errors import InputError, one_line
from finetune_lab.signals import Terminated

# Exit status for bad user input (click's usage errors use the same).
INPUT_ERROR_EXIT = 2
# Exit status for anything else that went wrong (the shell's 128 + N is used for death by signal N).
FAILURE_EXIT = 1
# What --help shows for each field type; click itself never converts (the config does, reporting every problem).
METAVARS = {str: "TEXT", int: "INTEGER", float: "FLOAT", bool: "true|false", IntList: "INT,INT,...",
            FloatList: "FLOAT,FLOAT,...", FloatSpace: "FLOAT,FLOAT,...|LO:HI"}


def _experiment(target: str):
    """The function `module:function` names, imported now."""
    module, function = target.split(":")
    return getattr(importlib.import_module(module), function)


def command(config_cls: type, run: str, name: str, records_runs: bool = True) -> click.Command:
    """A click command that builds `config_cls` from its options and calls `run(config)`, where `run` names the
    experiment's function as `module:function`; the config carries what failed to parse, so `run` reports it
    together with every other problem. `records_runs`: `run` ends a run FAILED with the traceback as its artifact
    (the experiments do; the tracking server has no run)."""
    docs, defaults, hints = field_docs(config_cls), as_params(config_cls()), get_type_hints(config_cls)

    def callback(**raw):
        config = from_strings(config_cls, raw)
        try:
            with heap.long_lived():
                experiment = _experiment(run)
            result = experiment(config)
        except InputError as error:
            for line in error.problems:
                click.echo(f"error: {line}", err=True)
            sys.exit(INPUT_ERROR_EXIT)
        except Terminated as stop:
            click.echo(f"error: {stop}: the open runs were ended KILLED with an `error` tag (`mlflow run` then "
                       "marks its own run FAILED); what finished is summarised on the parent run", err=True)
            sys.exit(stop.exit_code)
        except Exception as error:  # noqa: BLE001 - one line for the user, the traceback kept in a file
            from finetune_lab.contract import ERROR_TRACEBACK

            also = f", and in the failed run's artifact {ERROR_TRACEBACK}" if records_runs else ""
            click.echo(f"error: {one_line(error)} (full traceback: {keep_traceback(error)}{also})", err=True)
            sys.exit(FAILURE_EXIT)
        if result is not None:  # the tracking server returns nothing when stopped
            print_summary(result)

    params = [
        click.Option(
            [f"--{f.name.replace('_', '-')}", f.name],
            type=str,
            metavar=METAVARS[hints[f.name]],
            default=str(defaults[f.name]),
            show_default=True,
            help=docs.get(f.name, ""),
        )
        for f in fields(config_cls)
    ]
    return click.Command(name, callback=callback, params=params, help=(config_cls.__doc__ or "").strip())


def keep_traceback(error: BaseException) -> Path:
    """Write the traceback of `error` to a file of its own in the temporary folder; return its path."""
    folder = Path(tempfile.gettempdir()) / "finetune_lab"
    folder.mkdir(exist_ok=True)
    path = folder / f"traceback-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.txt"
    path.write_text("".join(traceback.format_exception(error)), encoding="utf-8")
    return path


def print_summary(result: dict) -> None:
    click.echo(f"\nrun_id: {result['run_id']}")
    metrics = result.get("metrics", {})
    width = max([28, *(len(key) + 1 for key in metrics)])
    for key, value in metrics.items():
        click.echo(f"  {key:<{width}} {value:.4f}" if isinstance(value, float) else f"  {key:<{width}} {value}")
    for line in result.get("notes", []):
        click.echo(line)
    click.echo(result["ui"])
