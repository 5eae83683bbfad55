"""The `maxact-card` command line: parse, build, call one core function, map errors to exit codes."""

from __future__ import annotations

import sys

import typer
import typer.main

from maxact_card.errors import EXIT_RUNTIME, EXIT_USAGE

app = typer.Typer(
    name="maxact-card",
    help="Measure a model's maximum activations, gate a release on them, and publish them in the model card.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        from maxact_card import __version__

        print(f"maxact-card {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Measure a model's maximum activations, gate a release on them, and publish them in the model card."""


def _register() -> None:
    import importlib

    for name in ("measure", "render", "validate", "publish", "check", "diff", "export"):
        try:
            module = importlib.import_module(f"maxact_card.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"maxact_card.commands.{name}":
                raise
            continue
        module.register(app)


_register()


def _usage_error(exc: BaseException) -> bool:
    """Click's usage errors (a missing argument, an unknown option or command, a bad value), whichever
    Click Typer runs on (its own copy from 0.26 on): they carry an exit code of 2 and a message."""
    return getattr(exc, "exit_code", None) == EXIT_USAGE and callable(getattr(exc, "format_message", None))


def main() -> None:
    """Run the command line: usage errors are one line, like every error. The console script and
    `python -m maxact_card` call this through `maxact_card.__main__`, which reports a Ctrl-C."""
    try:
        code = typer.main.get_command(app).main(prog_name="maxact-card", standalone_mode=False)
    except Exception as exc:
        if not _usage_error(exc):
            if type(exc).__name__ == "Abort":  # Click's name for Ctrl-C or end of input at a prompt
                print("error: interrupted", file=sys.stderr)
                sys.exit(EXIT_RUNTIME)
            raise
        if type(exc).__name__ == "NoArgsIsHelpError":  # a bare `maxact-card`: the help, as it is
            print(exc.format_message(), file=sys.stderr)  # type: ignore[attr-defined]
            sys.exit(EXIT_USAGE)
        ctx = getattr(exc, "ctx", None)
        where = ctx.command_path if ctx is not None else "maxact-card"
        message = exc.format_message().rstrip(".")  # type: ignore[attr-defined]
        print(f"error: {message}; see `{where} --help`", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    sys.exit(code if isinstance(code, int) else 0)
