"""The environment switches that turn a fast path off: for comparison runs, and as an escape hatch.

Every switch is on when unset; `0`, `false` or `off` turns it off. None changes a result: each one
chooses between two paths that compute the same statistics (bit for bit, except float sums whose
order of addition differs), so a user who suspects a fast path can rerun without it and compare.
`SWITCHES` below is the one list of them; `docs/switches.md` is written from it (a test keeps the
two equal), and `switched_off` refuses a name that is not in it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Switch:
    """One switch: what turning it off does, and the module that reads it."""

    name: str
    off: str
    module: str


SWITCHES: dict[str, Switch] = {
    s.name: s
    for s in (
        Switch("MAXACT_CARD_FUSE", "runs the model's own rotary, norm and SwiGLU forwards instead of the "
               "fused ones", "maxact_card.model.fusion"),
        Switch("MAXACT_CARD_GATED", "keeps each SwiGLU MLP's own forward instead of the kernel that takes "
               "the gate's statistics while computing silu(gate) * up", "maxact_card.model.fusion"),
        Switch("MAXACT_CARD_OVERLAP", "updates the statistics in line on the forward's stream instead of on "
               "a side stream that overlaps the next layer", "maxact_card.measure.loop"),
        Switch("MAXACT_CARD_MASKLESS", "always passes the attention mask, even where a probe showed the model "
               "gives the same activations without it", "maxact_card.measure.loop"),
        Switch("MAXACT_CARD_COMPILE", "keeps the reference statistics and the held-out quantizers eager "
               "instead of compiled with torch.compile", "maxact_card.measure.loop"),
        Switch("MAXACT_CARD_KERNELS", "keeps the reference statistics path (PyTorch) instead of the fused "
               "Triton and CUDA kernels", "maxact_card.measure.stats"),
        Switch("MAXACT_CARD_CUDA_SCAN", "uses the Triton scan instead of the CUDA one for bf16 rows (and the "
               "PyTorch row medians and silu * mul)", "maxact_card.kernels.scan"),
        Switch("MAXACT_CARD_CUDA_HIST", "counts the histogram of absolute values with Triton atomics instead of the CUDA "
               "histogram kernel", "maxact_card.kernels.histogram"),
        Switch("MAXACT_CARD_SCAN_FOLD", "runs the Triton fold after the CUDA scan instead of letting the scan "
               "fold the top-K and the sums itself", "maxact_card.kernels.scan"),
    )
}


def _known(name: str) -> str:
    if name not in SWITCHES:
        raise KeyError(f"{name} is not a switch; see maxact_card.switches.SWITCHES")
    return name


def switched_off(name: str) -> bool:
    """Whether environment variable `name`, one of `SWITCHES`, turns its path off."""
    return os.environ.get(_known(name), "1") in ("0", "false", "off")


@contextlib.contextmanager
def turned_off(name: str) -> Iterator[None]:
    """Switch `name` off for the block (the other side of a comparison run), then put it back as it was."""
    before = os.environ.get(_known(name))
    os.environ[name] = "0"
    try:
        yield
    finally:
        if before is None:
            del os.environ[name]
        else:
            os.environ[name] = before


def markdown_table() -> str:
    """The switches as the Markdown table of docs/switches.md."""
    rows = ["| variable | set to 0, it | read in |", "| --- | --- | --- |"]
    rows += [f"| `{s.name}` | {s.off} | `{s.module}` |" for s in SWITCHES.values()]
    return "\n".join(rows) + "\n"
