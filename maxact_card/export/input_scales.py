"""`input-scales`: a static activation scale per quantized Linear layer, `{Linear}.input_scale`.

The tensor name static FP8 / INT8 checkpoints carry for a Linear's activation scale (compressed-
tensors' `input_scale`, which vLLM's static-activation schemes load, one float32 per Linear). The
scale is amax / 448 for FP8 E4M3 (default) or amax / 127 for symmetric INT8, amax being the site's
max|a| over every measured token; each reader of a Linear-input site (q, k and v share the
attention input) gets its site's scale.
"""

from __future__ import annotations

import torch
from safetensors.torch import save

from maxact_card.errors import UsageError
from maxact_card.export.inputs import Inputs, static_scale
from maxact_card.quant.schemes import FP8_E4M3_MAX, INT8_QMAX

QMAX = {"fp8": FP8_E4M3_MAX, "int8": float(INT8_QMAX)}
WHAT = "the input-scales export"


def input_scales(inputs: Inputs, *, scheme: str = "fp8") -> dict[str, torch.Tensor]:
    """{`{Linear}.input_scale`: float32 scalar, amax / QMAX[scheme]}."""
    if scheme not in QMAX:
        raise UsageError(f"--scheme must be fp8 or int8, got {scheme!r}")
    qmax = QMAX[scheme]
    scales: dict[str, float] = {}
    for site in inputs.linear_sites(WHAT):
        scale = static_scale(site["max_abs"], qmax)
        for reader in site["readers"]:
            scales[f"{reader}.input_scale"] = max(scales.get(f"{reader}.input_scale", 0.0), scale)
    return {name: torch.tensor(value, dtype=torch.float32) for name, value in scales.items()}


def build(inputs: Inputs, *, scheme: str = "fp8") -> bytes:
    """The safetensors bytes of `input_scales`."""
    return save(input_scales(inputs, scheme=scheme),
                metadata={"producer": "maxact-card", "scheme": scheme, "qmax": f"{QMAX.get(scheme, 0):g}"})
