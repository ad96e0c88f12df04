"""Bad user input, reported as one line per problem, each naming the parameter and the fix."""

from __future__ import annotations


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
