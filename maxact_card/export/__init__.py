"""Exports: the files quantization tools load, derived from a results file (and its per-channel
companion) alone, without running the model. One module per format; this table names them.

| format | file | what it holds | who loads it |
| --- | --- | --- | --- |
| smoothquant | maxact-act-scales.pt | {Linear: float32 [in_features]} max|a| per input channel | SmoothQuant's `smooth_lm` |
| kv-scales | maxact-kv-scales.safetensors | `{attention}.k_scale`, `.v_scale` (`.q_scale`), FP8 E4M3 | FP8 KV-cache checkpoints (vLLM) |
| input-scales | maxact-input-scales.safetensors | `{Linear}.input_scale`, static FP8 or INT8 | static W8A8 / FP8 checkpoints |
| outliers | maxact-outliers.json | per layer and site the largest channels and the tokens that carry them | people, scripts |
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from maxact_card.documents import atomic_write, check_writable
from maxact_card.errors import UsageError

if TYPE_CHECKING:
    from maxact_card.export.inputs import Inputs


@dataclass(frozen=True)
class ExportFormat:
    """One export format: its name, its default file name and the module that builds it."""

    name: str
    file_name: str
    module: str
    summary: str
    # the measure option a run needs for this export, and what it measures (None: any run will do)
    needs: tuple[str, str] | None = None


FORMATS: dict[str, ExportFormat] = {
    f.name: f
    for f in (
        ExportFormat("smoothquant", "maxact-act-scales.pt", "smoothquant",
                     "per Linear layer, max|a| of each input channel (SmoothQuant's act_scales)",
                     ("--gemm-inputs", "the input of every Linear layer")),
        ExportFormat("kv-scales", "maxact-kv-scales.safetensors", "kv_scales",
                     "per attention layer, the FP8 E4M3 KV-cache scales k_scale and v_scale (and q_scale)",
                     ("--kv-cache", "the keys and values of the KV cache")),
        ExportFormat("input-scales", "maxact-input-scales.safetensors", "input_scales",
                     "per Linear layer, a static activation scale (input_scale), FP8 or INT8",
                     ("--gemm-inputs", "the input of every Linear layer")),
        ExportFormat("outliers", "maxact-outliers.json", "outliers",
                     "per layer and site, the largest channels and the tokens that carry them"),
    )
}


def parse_formats(spec: str | Iterable[str] | None, *, option: str = "--exports") -> tuple[str, ...]:
    """`smoothquant,kv-scales` → the format names, in the order given, each once; an unknown name is
    bad input (UsageError naming `option`)."""
    if spec is None:
        return ()
    words = spec.split(",") if isinstance(spec, str) else list(spec)
    names: list[str] = []
    for word in (w.strip() for w in words):
        if not word:
            continue
        if word not in FORMATS:
            raise UsageError(f"{option}: unknown export format {word!r}", hint=f"use one of {', '.join(FORMATS)}")
        if word not in names:
            names.append(word)
    return tuple(names)


def file_names(formats: Iterable[str]) -> dict[str, str]:
    """format → default file name, for what was exported: the card's section links these files."""
    return {name: FORMATS[name].file_name for name in formats}


def build(inputs: Inputs, fmt: str, **options: Any) -> bytes:
    """The bytes of the export `fmt` of `inputs` (checked results and companion); bad input raises
    UsageError (exit 2)."""
    if fmt not in FORMATS:
        raise UsageError(f"unknown export format {fmt!r}", hint=f"use one of {', '.join(FORMATS)}")
    module = importlib.import_module(f"maxact_card.export.{FORMATS[fmt].module}")
    data: bytes = module.build(inputs, **options)
    return data


def export(results: dict[str, Any], results_path: Path, fmt: str, out: Path | None = None, **options: Any) -> Path:
    """Write the export `fmt` of `results` (read from `results_path`, whose companion lies beside it)
    to `out` (default: the format's file name beside the results), atomically; returns the path."""
    from maxact_card.export.inputs import Inputs

    target = Path(out) if out is not None else Path(results_path).parent / FORMATS[fmt].file_name
    check_writable(target, "--out")
    data = build(Inputs.read(results, results_path), fmt, **options)
    atomic_write(target, data)
    return target
