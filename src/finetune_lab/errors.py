"""Bad user input, reported as one line per problem, each naming the parameter and the fix."""

from __future__ import annotations

# An MLflow tag holds up to 5000 characters (sqlite store: 8000); an error line stays well within.
MAX_LINE_CHARS = 5000


class InputError(Exception):
    """Bad user input: every problem found, one line each."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


def problem(field: str, message: str) -> str:
    """Format one problem line so that every entry point reports alike: `field: message`."""
    return f"{field}: {message}"


def field_of(line: str) -> str:
    """The parameter a problem line names."""
    return line.split(":", 1)[0]


def raise_if_any(problems: list[str]) -> None:
    if problems:
        raise InputError(problems)


def one_line(error: BaseException) -> str:
    """The error as a single line (for the run's `error` tag and the user), at most MAX_LINE_CHARS long."""
    text = " ".join(str(error).split())
    return (f"{type(error).__name__}: {text}" if text else type(error).__name__)[:MAX_LINE_CHARS]
