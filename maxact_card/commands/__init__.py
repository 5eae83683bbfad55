"""One module per command group; `maxact_card.cli` registers them on the Typer app."""
