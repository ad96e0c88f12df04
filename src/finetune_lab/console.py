"""What a run prints: one line per phase (`[2/4] r8-seed42: training 150 steps`) and the training progress bars,
not the libraries' chatter: the Trainer's log dict on every step, MLflow's system-metrics notices, pickling and
schema advice, transformers' load report of a new classification head (replaced by one line that says it is expected), a
deprecation warning raised inside transformers, progress bars of sub-second loads and downloads."""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator

# MLflow's log lines that advise or narrate rather than report (pyfunc logging with a Python object; the check of
# the input example against the signature, which fails loudly if it fails).
_MLFLOW_NOTICES = ("Passing a Python object as `python_model`", "Validating input example against model signature")


class _DropMessages(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


class _DropLoadReport(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in record.getMessage()


_quiet = False


def quiet_libraries() -> None:
    """Silence the chatter described above; warnings and errors that matter still show. The warning filters are
    set on every call (re-adding one replaces it; a caller such as pytest may have reset them), the rest once."""
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    # MLflow's advice, when it records a dataset, that integer columns (our labels) cannot hold missing values.
    warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer column", category=UserWarning)
    global _quiet
    if _quiet:
        return
    _quiet = True
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
    logging.getLogger("mlflow.pyfunc").addFilter(_DropMessages(_MLFLOW_NOTICES))
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # loading / writing weights: sub-second bars; the Trainer's stays


@contextlib.contextmanager
def without_load_report() -> Iterator[None]:
    """Hide transformers' load report (a table of missing / unexpected weights) for the block: the caller says what
    it means in one line. Only this record is dropped; lowering the logger's level would switch on other messages."""
    logger = logging.getLogger("transformers.modeling_utils")
    report_filter = _DropLoadReport()
    logger.addFilter(report_filter)
    try:
        yield
    finally:
        logger.removeFilter(report_filter)


def say(line: str) -> None:
    """One line of the run's own narration, on stdout next to the progress bars."""
    print(line, flush=True)
