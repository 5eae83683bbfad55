"""What every command shares: option aliases, output formats, error → exit-code mapping."""

from __future__ import annotations

import enum
import functools
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from maxact_card.distributed import record_exit
from maxact_card.errors import EXIT_RUNTIME, EXIT_USAGE, MaxactError

F = TypeVar("F", bound=Callable[..., Any])


class OutputFormat(str, enum.Enum):
    """What stdout carries."""

    text = "text"
    json = "json"
    markdown = "markdown"


FormatOpt = Annotated[
    OutputFormat, typer.Option("--format", help="What stdout carries.", envvar="MAXACT_CARD_FORMAT")
]
RevisionOpt = Annotated[
    str | None,
    typer.Option("--revision", help="Branch, tag, commit sha or refs/pr/N on the Hub.", envvar="MAXACT_CARD_REVISION"),
]
TokenOpt = Annotated[
    str | None,
    typer.Option(
        "--token",
        help="Hub token (default: HF_TOKEN or the cached login). Never printed or stored.",
        envvar="MAXACT_CARD_TOKEN",
        show_default=False,
    ),
]
OutOpt = Annotated[
    Path | None, typer.Option("--out", help="Where to write the result file.", envvar="MAXACT_CARD_OUT")
]


def examples_epilog(examples: list[str]) -> str:
    """The "Examples:" block of a command's help, each example on its own line as typed.

    Click re-wraps help paragraphs to the terminal; a paragraph that starts with `\\b` is printed as
    written, so a long example keeps its shell continuation lines instead of breaking mid-option.
    Examples are written to fit 80 columns.
    """
    lines = [line for example in examples for line in example.splitlines()]
    return "Examples:\n\n\b\n" + "\n".join(f"  {line}" for line in lines)


def stderr_console() -> Console:
    """Diagnostics and progress go to stderr, plain when stderr is not a terminal."""
    return Console(stderr=True, highlight=False, soft_wrap=True)


def _debug() -> bool:
    return os.environ.get("MAXACT_CARD_DEBUG", "") not in ("", "0", "false")


def handle_errors(func: F) -> F:
    """Map typed errors to one line on stderr and their exit code; unexpected ones to exit 3."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            result = _mapped(func, *args, **kwargs)
        except typer.Exit as exc:
            record_exit(exc.exit_code)
            raise
        record_exit(0)
        return result

    return wrapper  # type: ignore[return-value]


def _mapped(func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    try:
        return func(*args, **kwargs)
    except typer.Exit:
        raise
    except MaxactError as exc:
        if _debug():
            traceback.print_exc()
        print(f"error: {exc.line()}", file=sys.stderr)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        raise typer.Exit(EXIT_RUNTIME) from None
    except MemoryError:
        print("error: out of memory; use fewer --samples, a smaller --max-seq-len or a larger device", file=sys.stderr)
        raise typer.Exit(EXIT_RUNTIME) from None
    except Exception as exc:  # noqa: BLE001 - the last line of defence: one line, exit 3
        if _debug():
            traceback.print_exc()
        name = type(exc).__name__
        print(
            f"error: unexpected {name}: {str(exc).splitlines()[0] if str(exc) else ''}; "
            "rerun with MAXACT_CARD_DEBUG=1 for the traceback and report it",
            file=sys.stderr,
        )
        raise typer.Exit(EXIT_RUNTIME) from None


__all__ = [
    "EXIT_USAGE",
    "FormatOpt",
    "OutOpt",
    "OutputFormat",
    "RevisionOpt",
    "TokenOpt",
    "examples_epilog",
    "handle_errors",
    "stderr_console",
]
