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

from maxact_card.errors import EXIT_RUNTIME, EXIT_USAGE, INTERRUPTS, MaxactError, UsageError
from maxact_card.measure.distributed import EXIT_FILE_ENV, record_exit

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


#: Where a Hub token can come from besides --token; huggingface_hub reads the first two itself.
TOKEN_VARIABLES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "MAXACT_CARD_TOKEN")


def clean_token(token: str | None, *, source: str) -> str | None:
    """`token` without surrounding white space (a pasted `hf_...\\n`), None when empty.

    A token with a space, control or non-ASCII character inside cannot be sent as an HTTP header:
    the client would fail with an error that quotes the header, token and all. It is bad input,
    and the message names where it came from, never the token.
    """
    if token is None or not token.strip():
        return None
    stripped = token.strip()
    if not all(33 <= ord(ch) <= 126 for ch in stripped):
        raise UsageError(
            f"the Hub token from {source} holds a space, control or non-ASCII character",
            hint="copy the token again from the Hub's settings page",
        )
    return stripped


def _secrets(kwargs: dict[str, Any]) -> list[str]:
    """Every token this process may send, as given and as cleaned, longest first."""
    found = {kwargs.get("token") or ""} | {os.environ.get(name, "") for name in TOKEN_VARIABLES}
    hub = sys.modules.get("huggingface_hub")
    if hub is not None:
        try:
            found.add(hub.get_token() or "")
        except Exception:  # noqa: BLE001 - an unreadable token file holds nothing to hide
            pass
    found |= {value.strip() for value in found}
    return sorted((value for value in found if len(value) >= 8), key=len, reverse=True)


def redact(text: str, secrets: list[str]) -> str:
    """`text` with every secret replaced by `hf_***`."""
    for secret in secrets:
        text = text.replace(secret, "hf_***")
    return text


def _mapped(func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    def report(line: str) -> None:
        if os.environ.get("RANK", "0") != "0" and os.environ.get(EXIT_FILE_ENV):
            return  # the other processes of a --gpus launch: rank 0 says it once
        if INTERRUPTS:  # a library's error for what was a Ctrl-C: say what happened
            print("error: interrupted", file=sys.stderr)
            raise typer.Exit(EXIT_RUNTIME)
        secrets = _secrets(kwargs)
        if _debug():
            print(redact(traceback.format_exc(), secrets), end="", file=sys.stderr)
        print(redact(line, secrets), file=sys.stderr)

    try:
        if "token" in kwargs:
            kwargs["token"] = clean_token(kwargs["token"], source="--token (or MAXACT_CARD_TOKEN)")
            for name in TOKEN_VARIABLES[:2]:
                clean_token(os.environ.get(name), source=name)
        return func(*args, **kwargs)
    except typer.Exit:
        raise
    except MaxactError as exc:
        report(f"error: {exc.line()}")
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        raise typer.Exit(EXIT_RUNTIME) from None
    except MemoryError:
        print("error: out of memory; use fewer --samples, a smaller --max-seq-len or a larger device", file=sys.stderr)
        raise typer.Exit(EXIT_RUNTIME) from None
    except Exception as exc:  # noqa: BLE001 - the last line of defence: one line, exit 3
        report(
            f"error: unexpected {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}; "
            "rerun with MAXACT_CARD_DEBUG=1 for the traceback and report it"
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
