"""The processes of a local Ray instance, found through its temp folder (Ray's own shutdown is checked by the tests:
none may be left behind)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from support.processes import command_lines


def ray_processes(folder: Path) -> list:
    """Live processes of the Ray instance whose temp folder is `folder`: they inherit RAY_TMPDIR from the driver
    that started it, or (Ray's agents, started with an environment of their own) hold its log files open. Nobody
    else's Ray processes do either; the driver itself (this process) is not counted."""
    import psutil

    found = []
    for process in psutil.process_iter():
        try:
            if (process.pid != os.getpid() and process.status() != psutil.STATUS_ZOMBIE
                    and of_ray_instance(process, folder)):
                found.append(process)
        except (psutil.Error, OSError):
            continue
    return found


def of_ray_instance(process, folder: Path) -> bool:
    """Whether `process` belongs to the Ray instance whose temp folder is `folder` (see `ray_processes`): its
    environment, or its open files read from /proc (Linux only, as are the tests that start Ray)."""
    if process.environ().get("RAY_TMPDIR") == str(folder):
        return True
    fds = Path(f"/proc/{process.pid}/fd")
    return any(os.readlink(fd).startswith(f"{folder}/") for fd in fds.iterdir())


def ray_left_behind(folder: Path, grace_s: float = 30.0) -> list[str]:
    """Processes of that Ray instance still alive after `grace_s` (shutdown takes a moment to reach them all)."""
    deadline = time.monotonic() + grace_s
    while (left := ray_processes(folder)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return command_lines(left)


def kill_ray_processes(folder: Path) -> None:
    """The fixture's last resort: whatever of that instance is still alive, killed."""
    import psutil

    left = ray_processes(folder)
    for process in left:
        process.kill()
    psutil.wait_procs(left, timeout=10)


def isolate_ray(monkeypatch) -> Path:
    """Settings for a local Ray instance started by the code under test: its own short temp folder (Ray's socket
    paths must stay under 107 bytes), no auth token written into ~/.ray, no usage stats, no RAY_ADDRESS."""
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    monkeypatch.setenv("RAY_TMPDIR", str(folder))
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return folder
