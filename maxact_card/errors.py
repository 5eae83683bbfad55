"""Typed errors. The core raises these; only the CLI maps them to exit codes and one line of text."""

from __future__ import annotations


class MaxactError(Exception):
    """Base class: a message that says what was wrong and what to do, and the exit code it maps to."""

    exit_code = 3

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def line(self) -> str:
        """The one line the CLI prints: what was wrong, then what to do."""
        return f"{self.message}; {self.hint}" if self.hint else self.message


class UsageError(MaxactError):
    """Bad input or usage: a missing path, a malformed file, an unknown option value (exit 2)."""

    exit_code = 2


class SchemaError(UsageError):
    """A document failed JSON-schema validation (exit 2)."""


class RuntimeFailure(MaxactError):
    """The run itself failed: out of memory, the Hub unreachable, a broken device (exit 3)."""

    exit_code = 3


class GateFailed(MaxactError):
    """A release gate or validation check failed (exit 1)."""

    exit_code = 1


EXIT_PASS = 0
EXIT_GATE = 1
EXIT_USAGE = 2
EXIT_RUNTIME = 3


#: Ctrl-C presses seen by the command line's handler (`maxact_card.__main__`). Libraries turn an
#: interrupt into errors of their own (transformers reports one during a lazy import as a missing
#: module), so whatever error a run ends with, an interrupt seen on the way is what it reports.
INTERRUPTS: list[int] = []
