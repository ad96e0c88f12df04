"""SIGTERM (what `kill`, `docker stop`, Slurm and Kubernetes send) and SIGINT (Ctrl-C) as an exception that unwinds
the stack like Ctrl-C does, so every open run is ended KILLED on the way out and the finished work is summarised.

`Terminated` is a KeyboardInterrupt: an `except Exception` (a sweep child that failed) never swallows it. Only the
first signal raises; later ones (`mlflow run` sends SIGTERM after a Ctrl-C, impatient users press Ctrl-C twice)
are ignored while the runs are being ended. Inside `deferred()` a signal waits until the block is over, so that
ending a run is never cut in half.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

HANDLED = (signal.SIGTERM, signal.SIGINT)


class Terminated(KeyboardInterrupt):
    """Raised in the main thread when the process is told to stop."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(describe(signum))

    @property
    def exit_code(self) -> int:
        """The shell's convention for death by a signal: 128 + its number (143 for SIGTERM)."""
        return 128 + self.signum


def describe(signum: int) -> str:
    """The text of the `error` tag of a run ended by this signal."""
    name = signal.Signals(signum).name
    return "interrupted by the user (SIGINT)" if signum == signal.SIGINT else f"terminated by {name}"


class _State:
    stopping = False
    deferring = 0
    pending: int | None = None
    received: int | None = None


def _on_signal(signum, frame) -> None:
    if _State.stopping:
        return
    _State.stopping, _State.received = True, signum
    if _State.deferring:
        _State.pending = signum
        return
    raise Terminated(signum)


@contextlib.contextmanager
def terminating() -> Iterator[None]:
    """Within the block, SIGTERM and SIGINT raise `Terminated` (the previous handlers come back afterwards).
    Python runs signal handlers in the main thread only; elsewhere the block changes nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, _on_signal) for signum in HANDLED}
    _State.stopping, _State.pending, _State.received = False, None, None
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _State.stopping, _State.pending, _State.received = False, None, None


def restored(error: BaseException) -> BaseException:
    """`error`, or the `Terminated` it stands for: Ray's blocking calls (ray.get, ray.wait) catch the exception our
    handler raises and raise a bare KeyboardInterrupt instead (then `cli` would print click's `Aborted!`)."""
    if isinstance(error, KeyboardInterrupt) and not isinstance(error, Terminated) and _State.received is not None:
        return Terminated(_State.received)
    return error


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """A signal that arrives within the block is raised when the block ends (unless it ends with an error of its
    own, which then goes first)."""
    _State.deferring += 1
    try:
        yield
    finally:
        _State.deferring -= 1
    if not _State.deferring and _State.pending is not None:
        signum, _State.pending = _State.pending, None
        raise Terminated(signum)
