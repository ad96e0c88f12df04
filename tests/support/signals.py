"""A SIGTERM delivered to the test's own process from inside training, the way `kill` would deliver it."""

from __future__ import annotations

import os
import signal


class Trigger:
    """A test's switch: armed until disarmed."""

    armed = True

    def disarm(self) -> None:
        self.armed = False


def sigterm_at_second_child(monkeypatch) -> Trigger:
    """SIGTERM to this very process at the second logged step of the second child of a sweep (while armed)."""
    from finetune_lab import training

    original, children, trigger = training.MlflowStepLogger.on_log, [], Trigger()

    def on_log(self, args, state, control, logs=None, **kwargs):
        original(self, args, state, control, logs=logs, **kwargs)
        if self.run_id not in children:
            children.append(self.run_id)
        if trigger.armed and len(children) == 2 and state.global_step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(training.MlflowStepLogger, "on_log", on_log)
    return trigger
