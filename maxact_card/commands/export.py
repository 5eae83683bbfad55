"""`maxact-card export`: the files quantization tools load, from a results file, without the model."""

from __future__ import annotations

import enum
import sys
from pathlib import Path
from typing import Annotated

import typer

from maxact_card.commands._common import examples_epilog, handle_errors
from maxact_card.export import FORMATS, export

EXAMPLES = [
    "maxact-card export results.json --format smoothquant --out act_scales.pt",
    "maxact-card export results.json --format kv-scales --per-head",
    "maxact-card export results.json --format input-scales --scheme int8",
    "maxact-card export results.json --format outliers --out outliers.json",
]

HELP = """Write an export of RESULTS (and the per-channel companion beside it) for a quantization tool.

Formats: """ + "; ".join(f"{f.name} ({f.file_name}): {f.summary}" for f in FORMATS.values()) + """.
Nothing is measured: every export is derived from the results. Exit 0 written, 2 bad input (a results
file that lacks what the format needs says what to measure)."""

ExportFormatName = enum.Enum("ExportFormatName", {name.replace("-", "_"): name for name in FORMATS}, type=str)  # type: ignore[misc]


class Scheme(str, enum.Enum):
    """The number format of input-scales."""

    fp8 = "fp8"
    int8 = "int8"


ResultsArg = Annotated[Path, typer.Argument(help="Results JSON written by `maxact-card measure --out`.",
                                            metavar="RESULTS", show_default=False)]
ExportFormatOpt = Annotated[ExportFormatName, typer.Option(  # type: ignore[valid-type]
    "--format", help="What to write.", envvar="MAXACT_CARD_EXPORT_FORMAT", show_default=False)]
ExportOutOpt = Annotated[Path | None, typer.Option(
    "--out", help="Where to write it (default: the format's file name beside RESULTS).",
    envvar="MAXACT_CARD_EXPORT_OUT", show_default=False)]
SchemeOpt = Annotated[Scheme, typer.Option(
    "--scheme", help="input-scales: fp8 (amax/448, E4M3) or int8 (amax/127).", envvar="MAXACT_CARD_EXPORT_SCHEME")]
PerHeadOpt = Annotated[bool, typer.Option(
    "--per-head", help="kv-scales: one scale per KV head (compressed-tensors' attn_head strategy) instead of one "
    "per layer.", envvar="MAXACT_CARD_EXPORT_PER_HEAD")]


@handle_errors
def export_cmd(
    results: ResultsArg,
    fmt: ExportFormatOpt,
    out: ExportOutOpt = None,
    scheme: SchemeOpt = Scheme.fp8,
    per_head: PerHeadOpt = False,
) -> None:
    from maxact_card.documents import load_results
    from maxact_card.errors import UsageError

    name = fmt.value
    options: dict[str, object] = {}
    if name == "input-scales":
        options["scheme"] = scheme.value
    elif scheme is not Scheme.fp8:
        raise UsageError("--scheme applies to --format input-scales only")
    if name == "kv-scales":
        options["per_head"] = per_head
    elif per_head:
        raise UsageError("--per-head applies to --format kv-scales only")
    written = export(load_results(results), results, name, out, **options)
    sys.stdout.write(f"{written}\n")
    sys.stdout.flush()


def register(app: typer.Typer) -> None:
    """Add `export` to the app."""
    app.command("export", help=HELP, short_help="Write SmoothQuant, KV-cache or input scales, or an outlier map.",
                epilog=examples_epilog(EXAMPLES))(export_cmd)
