"""Processes described for a test's message."""

from __future__ import annotations


def command_lines(processes) -> list[str]:
    """Each live process's command line (its name when it has none); one that exited since it was found (a zombie,
    or gone) is left out: it no longer runs."""
    import psutil

    described = []
    for process in processes:
        try:
            described.append(" ".join(process.cmdline()) or process.name())
        except psutil.Error:
            continue
    return described
