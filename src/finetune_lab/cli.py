"""Turn an experiment config dataclass into a click command: one `--option` per field, help from the
field docstrings, every value taken as a string and validated by the config (so all mistakes are
reported together, one line each, instead of click stopping at the first)."""

from __future__ import annotations

import os
import sys
import tempfile
import time
import traceback
from dataclasses import fields
from pathlib import Path
from typing import Callable

import click

from finetune_lab.config import as_params, field_docs, from_strings
from finetune_lab.contract import ERROR_TRACEBACK
from finetune_lab.errors import InputError, one_line
from finetune_lab.signals import Terminated

# Exit status for bad user input (click's usage errors use the same).
INPUT_ERROR_EXIT = 2
# Exit status for anything else that went wrong (the shell's 128 + N is used for death by signal N).
FAILURE_EXIT = 1


def command(config_cls: type, run: Callable[..., dict], name: str) -> click.Command:
    """A click command that builds `config_cls` from its options and calls `run(config)`; the config carries
    what failed to parse, so `run` reports it together with every other problem."""
    docs, defaults = field_docs(config_cls), as_params(config_cls())

    def callback(**raw):
        config = from_strings(config_cls, {k: v for k, v in raw.items() if v is not None})
        try:
            result = run(config)
        except InputError as error:
            for line in error.problems:
                click.echo(f"error: {line}", err=True)
            sys.exit(INPUT_ERROR_EXIT)
        except Terminated as stop:
            click.echo(f"error: {stop}: the open runs were ended KILLED with an `error` tag (`mlflow run` then "
                       "marks its own run FAILED); what finished is summarised on the parent run", err=True)
            sys.exit(stop.exit_code)
        except Exception as error:  # noqa: BLE001 - one line for the user, the traceback kept in a file
            click.echo(f"error: {one_line(error)} (full traceback: {keep_traceback(error)}, and in the failed "
                       f"run's artifact {ERROR_TRACEBACK})", err=True)
            sys.exit(FAILURE_EXIT)
        print_summary(result)

    params = [
        click.Option(
            [f"--{f.name.replace('_', '-')}", f.name],
            type=str,
            default=None,
            help=f"{docs.get(f.name, '')} [default: {defaults[f.name]!r}]",
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
    for key, value in result.get("metrics", {}).items():
        click.echo(f"  {key:<28} {value:.4f}" if isinstance(value, float) else f"  {key:<28} {value}")
    for line in result.get("notes", []):
        click.echo(line)
    click.echo(f"Compare runs in the MLflow UI: {result.get('ui', 'mlflow ui')}  (then open http://127.0.0.1:5000)")
