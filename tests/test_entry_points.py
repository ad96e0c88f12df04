"""The table of entry points is where each entry point's kind is declared: every kind in it is a name of
`contract` (which the report reads), and the run each experiment opens carries its row's kind."""

import contextlib
import importlib

import pytest

from finetune_lab import contract, tracking
from finetune_lab.entry_points import ENTRY_POINTS, named

# The kinds `contract` names for the report; `resume` is the kind of a resumed sweep's invocation, no entry point's.
CONTRACT_KINDS = {contract.CLASSIFICATION, contract.CLASSIFY_SWEEP, contract.LORA_SWEEP, contract.PROBE,
                  contract.GENERATE, contract.REPORT, contract.BENCH}


class Opened(Exception):
    """Raised where the experiment's run would start: the test needs only its kind."""


def test_every_kind_of_contract_is_one_entry_points():
    assert sorted(row.kind for row in ENTRY_POINTS) == sorted(CONTRACT_KINDS)
    assert len({row.name for row in ENTRY_POINTS}) == len(ENTRY_POINTS)
    assert named("lora_sweep").kind == contract.LORA_SWEEP, "the store's name for it since before the classifier sweep"


@pytest.mark.parametrize("row", ENTRY_POINTS, ids=lambda row: row.name)
def test_each_experiment_opens_its_run_with_its_rows_kind(row, monkeypatch):
    opened = []

    @contextlib.contextmanager
    def experiment_run(kind, experiment, run_name=""):
        opened.append((kind, experiment))
        raise Opened
        yield

    monkeypatch.setattr(tracking, "experiment_run", experiment_run)
    module, function = row.run.split(":")
    with pytest.raises(Opened):
        getattr(importlib.import_module(module), function)(row.config())
    assert opened == [(row.kind, row.experiment)]
