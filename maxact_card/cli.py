"""The `maxact-card` command line: parse, build, call one core function, map errors to exit codes."""

from __future__ import annotations

import typer

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

    for name in ("measure", "render", "validate", "publish", "check", "diff"):
        try:
            module = importlib.import_module(f"maxact_card.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"maxact_card.commands.{name}":
                raise
            continue
        module.register(app)


_register()


def main() -> None:
    """Console-script entry point."""
    app()
