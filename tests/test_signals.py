"""SIGTERM in the middle of a sweep, called directly: every run ends KILLED with the signal named, the parent
summarises the child that finished and lists the others, and the process exits 143."""

from __future__ import annotations

import os
import signal
import time

import pytest
from click.testing import CliRunner
from support.paths import entrypoint
from support.store import load_table, parent_and_children, runs_of

from finetune_lab import signals

SWEEP_ARGS = ["--model", "tiny", "--dataset", "sample_chat", "--ranks", "2,4,8", "--seeds", "3", "--max-steps", "4",
              "--batch-size", "8", "--max-length", "48", "--learning-rate", "1e-2", "--experiment", "sigterm"]


@pytest.mark.slow  # trains repeatedly: a sweep, stopped by SIGTERM at its second child
def test_sigterm_ends_every_run_killed_and_keeps_the_finished_work(client, tmp_path, sigterm_at_second_child):
    previous = signal.getsignal(signal.SIGTERM)
    outcome = CliRunner().invoke(entrypoint("lora_sweep").main, SWEEP_ARGS)
    assert outcome.exit_code == 128 + signal.SIGTERM, outcome.output
    assert "error: terminated by SIGTERM" in outcome.output and "Traceback" not in outcome.output
    assert signal.getsignal(signal.SIGTERM) is previous, "the handler is ours only while the runs are open"

    runs = runs_of(client, "sigterm")
    assert not [r for r in runs if r.info.status == "RUNNING"], "no run may stay RUNNING"
    parent, children = parent_and_children(runs)
    children = {r.data.params["lora_r"]: r for r in children}
    assert parent.info.status == "KILLED" and parent.data.tags["error"] == "terminated by SIGTERM"
    assert set(children) == {"2", "4"}, "the third child never started"
    assert children["2"].info.status == "FINISHED"
    assert children["4"].info.status == "KILLED" and children["4"].data.tags["error"] == "terminated by SIGTERM"

    # The parent summarised on the way down: every planned child, with its status; the best of the finished.
    table = load_table(client, parent.info.run_id, "comparison_table.json", tmp_path)
    assert list(zip(table["rank"], table["status"])) == [(2, "FINISHED"), (4, "KILLED"), (8, "NOT_RUN")]
    assert table.loc[0, "run_id"] == children["2"].info.run_id and table.loc[1, "run_id"] == children["4"].info.run_id
    assert table.loc[0, "eval_loss"] == pytest.approx(children["2"].data.metrics["eval_loss"])
    summary = load_table(client, parent.info.run_id, "rank_summary.json", tmp_path)
    assert list(summary["rank"]) == [2]
    assert parent.data.tags["best_run_id"] == children["2"].info.run_id
    assert parent.data.metrics["failed_children"] == 2


def test_a_second_signal_waits_until_the_run_is_ended():
    """Ending a run must not be cut in half: within `deferred` the signal is held, then raised."""
    with signals.terminating():
        with pytest.raises(signals.Terminated) as raised:
            with signals.deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                finished_the_block = True
        assert finished_the_block and raised.value.exit_code == 143


def test_a_signal_that_a_library_turned_into_a_bare_keyboard_interrupt_is_restored():
    """Ray's blocking calls catch what our handler raises and raise a bare KeyboardInterrupt (click then printed
    `Aborted!` and the runs' error tags lost the signal); `restored` gives back the signal's Terminated."""
    with signals.terminating():
        try:
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)
            except signals.Terminated:
                raise KeyboardInterrupt from None  # what ray.get does
        except KeyboardInterrupt as bare:
            restored = signals.restored(bare)
    assert isinstance(restored, signals.Terminated) and restored.exit_code == 143
    assert str(restored) == "terminated by SIGTERM"
    other = ValueError("x")
    assert signals.restored(other) is other and type(signals.restored(KeyboardInterrupt())) is KeyboardInterrupt
