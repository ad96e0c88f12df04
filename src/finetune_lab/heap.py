"""The cyclic garbage collector around what lives as long as the process: the training stack's modules (over half
a million objects once torch, transformers, datasets and MLflow are imported) and a loaded base. Each full collection
walks every object it tracks; on the 2-core machines this lab is tested on, full collections took 38 of a tiny LoRA
sweep's 74 s, nearly all of them while the stack was being imported (docs/performance.md)."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def long_lived() -> Iterator[None]:
    """Make the process's long-lived objects inside: the collector is paused meanwhile, and afterwards told to skip
    everything made so far (`gc.freeze`), so later collections walk only what training makes."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if was_enabled:
            gc.enable()
