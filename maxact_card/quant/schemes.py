"""Activation-quantization scale policies: static per-tensor INT8 (max, percentile and MSE clips),
dynamic per-token INT8, and FP8 E4M3; the scales calibration statistics give them, and the quantizers.

Calibration statistics (the running max|a| and the |a| histogram of `measure/stats.py`) give each
static policy one scale per site, on the host, once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

import torch

from maxact_card.errors import UsageError
from maxact_card.measure.stats import HIST_BINS, hist_bin_values, hist_quantile


class QuantPolicy(str, Enum):
    """An activation-quantization scheme; the value is the name used in results and policy files."""

    INT8_STATIC_MAXABS = "int8-static-maxabs"
    INT8_STATIC_PERCENTILE = "int8-static-percentile"
    INT8_STATIC_MSE = "int8-static-mse"
    INT8_DYNAMIC_TOKEN = "int8-dynamic-per-token"
    FP8_E4M3_STATIC = "fp8-e4m3-static"


# The accumulator evaluates every policy, always in this order (the row order of its state).
POLICY_ORDER: tuple[QuantPolicy, ...] = tuple(QuantPolicy)
STATIC_POLICIES: tuple[QuantPolicy, ...] = tuple(p for p in POLICY_ORDER if p is not QuantPolicy.INT8_DYNAMIC_TOKEN)

# Preference among passing policies, cheapest to serve first. Static per-tensor scales come before
# dynamic per-token ones, which need a max reduction and a rescale of every token at run time.
# Among static ones the serving cost is the same, so the order is by robustness: FP8 E4M3 keeps a
# relative precision over its whole range (and is native on Hopper/Ada tensor cores); then INT8
# clips chosen to fit the bulk (MSE, then percentile) before max-abs, which wastes its codes on
# the outliers. A policy only reaches `recommended` if it passes at every site anyway.
RECOMMENDATION_ORDER: tuple[QuantPolicy, ...] = (
    QuantPolicy.FP8_E4M3_STATIC,
    QuantPolicy.INT8_STATIC_MSE,
    QuantPolicy.INT8_STATIC_PERCENTILE,
    QuantPolicy.INT8_STATIC_MAXABS,
    QuantPolicy.INT8_DYNAMIC_TOKEN,
)

INT8_QMAX = 127
FP8_E4M3_MAX = 448.0
QMAX: dict[QuantPolicy, float] = {
    QuantPolicy.INT8_STATIC_MAXABS: INT8_QMAX,
    QuantPolicy.INT8_STATIC_PERCENTILE: INT8_QMAX,
    QuantPolicy.INT8_STATIC_MSE: INT8_QMAX,
    QuantPolicy.INT8_DYNAMIC_TOKEN: INT8_QMAX,
    QuantPolicy.FP8_E4M3_STATIC: FP8_E4M3_MAX,
}

# A clip of zero (a site that was all zeros in calibration) would make x / scale NaN; this floor
# keeps the scale a normal float32 even after division by 448, so GPUs that flush subnormals to
# zero still divide by a positive number.
_MIN_CLIP = 1e-30

# Whole-tensor SQNR of an exact quantization (zero noise) is infinite; reported as this cap.
SQNR_CAP_DB = 200.0

# Per-token SQNR histogram: 0.25 dB bins from -60 dB to +140 dB, plus an underflow bin (index 0,
# below -60 dB, and tokens whose SQNR is NaN) and an overflow bin (index -1, at or above +140 dB,
# and tokens quantized without any error). Bin k in 1..800 holds [-60 + (k-1)/4, -60 + k/4) dB.
TOKEN_SQNR_LOW_DB = -60.0
TOKEN_SQNR_HIGH_DB = 140.0
TOKEN_SQNR_STEP_DB = 0.25
_TOKEN_SQNR_INNER = round((TOKEN_SQNR_HIGH_DB - TOKEN_SQNR_LOW_DB) / TOKEN_SQNR_STEP_DB)
TOKEN_SQNR_BINS = _TOKEN_SQNR_INNER + 2

PASS = "PASS"
FAIL = "FAIL"


@dataclass(frozen=True)
class Thresholds:
    """What a policy must reach at a site to pass.

    `min_token_sqnr_db` must lie on the per-token histogram's grid (a multiple of 0.25 dB between
    -60 and +140), so that the share of tokens below it is counted exactly, not interpolated.
    """

    min_sqnr_db: float = 20.0
    min_token_sqnr_db: float = 20.0
    min_token_share: float = 0.99

    def __post_init__(self) -> None:
        if not math.isfinite(self.min_sqnr_db):
            raise UsageError(f"min_sqnr_db must be finite, not {self.min_sqnr_db}", hint="give a number of dB")
        steps = (self.min_token_sqnr_db - TOKEN_SQNR_LOW_DB) / TOKEN_SQNR_STEP_DB
        if not (math.isfinite(steps) and 0 <= steps <= _TOKEN_SQNR_INNER and steps == round(steps)):
            raise UsageError(
                f"min_token_sqnr_db {self.min_token_sqnr_db} is not on the per-token SQNR grid",
                hint=f"use a multiple of {TOKEN_SQNR_STEP_DB} dB between {TOKEN_SQNR_LOW_DB} and {TOKEN_SQNR_HIGH_DB}",
            )
        if not 0.0 <= self.min_token_share <= 1.0:
            raise UsageError(
                f"min_token_share must be a share between 0 and 1, not {self.min_token_share}",
                hint="for example 0.99",
            )


def static_scales(
    max_abs: float, hist_counts: torch.Tensor, clip_quantile: float = 0.999
) -> dict[QuantPolicy, float]:
    """The scales of the static policies from one site's calibration statistics (no data pass).

    `max_abs` is the calibrated running max|a|, `hist_counts` the int64 |a| histogram of
    `measure/stats.py` (length HIST_BINS). Runs on the host, once per site. Every scale is positive and
    finite: an all-zero site gets a tiny scale, and an empty histogram falls back to max-abs.
    """
    if not (math.isfinite(max_abs) and max_abs >= 0):
        raise UsageError(
            f"calibrated max|a| must be finite and non-negative, not {max_abs}",
            hint="non-finite activations cannot be given a quantization scale; report them instead",
        )
    if hist_counts.dim() != 1 or hist_counts.numel() != HIST_BINS:
        raise UsageError(
            f"calibration histogram has shape {tuple(hist_counts.shape)}, expected ({HIST_BINS},)",
            hint="pass the counts of the |a| histogram built with maxact_card.measure.stats",
        )
    if not 0.0 < clip_quantile <= 1.0:
        raise UsageError(f"clip quantile must be in (0, 1], not {clip_quantile}", hint="for example 0.999")

    max_clip = max(max_abs, _MIN_CLIP)
    percentile_clip = hist_quantile(hist_counts, clip_quantile)
    if not math.isfinite(percentile_clip):
        percentile_clip = max_clip  # empty histogram: nothing to clip against
    # a quantile is read at its bin's middle, which may sit just above the true max
    percentile_clip = min(max(percentile_clip, _MIN_CLIP), max_clip)
    mse_clip = _mse_clip(max_clip, hist_counts)
    return {
        QuantPolicy.INT8_STATIC_MAXABS: max_clip / INT8_QMAX,
        QuantPolicy.INT8_STATIC_PERCENTILE: percentile_clip / INT8_QMAX,
        QuantPolicy.INT8_STATIC_MSE: mse_clip / INT8_QMAX,
        QuantPolicy.FP8_E4M3_STATIC: max_clip / FP8_E4M3_MAX,
    }


def _mse_clip(max_clip: float, hist_counts: torch.Tensor) -> float:
    """The INT8 clip with the least expected squared error over the histogram.

    Candidates are every bin value of the histogram up to max|a| (a 1.6% relative grid, empty
    bins included: the best clip often lies in the gap between the bulk and an outlier) and max|a|.
    A value m above the clip c costs (m - c)^2. One below costs the rounding noise Δ^2/12 with
    Δ = c/127, except that one below Δ/2 rounds to zero and costs m^2: with massive activations
    the bulk sits there under a max-abs clip, and Δ^2/12 would overstate its error many times.
    Prefix sums make every candidate O(log bins).
    """
    values = hist_bin_values()
    counts = hist_counts.detach().to("cpu", torch.float64)
    keep = torch.isfinite(values) & (counts > 0)
    m = values[keep].clamp(max=max_clip)  # bin middles may sit just above the true max
    n = counts[keep]
    if m.numel() == 0:
        return max_clip
    zero = torch.zeros(1, dtype=torch.float64)
    cum_n = torch.cat([zero, torch.cumsum(n, 0)])
    cum_m = torch.cat([zero, torch.cumsum(n * m, 0)])
    cum_m2 = torch.cat([zero, torch.cumsum(n * m * m, 0)])

    grid = values[torch.isfinite(values) & (values > 0) & (values < max_clip)]
    c = torch.cat([grid, torch.tensor([max_clip], dtype=torch.float64)])
    delta = c / INT8_QMAX
    below = torch.searchsorted(m, c, right=True)  # bins with m <= c
    dead = torch.searchsorted(m, delta / 2)  # bins with m < Δ/2
    n_above = cum_n[-1] - cum_n[below]
    clip_cost = (cum_m2[-1] - cum_m2[below]) - 2 * c * (cum_m[-1] - cum_m[below]) + c * c * n_above
    dead_cost = cum_m2[dead]
    round_cost = (cum_n[below] - cum_n[dead]) * delta * delta / 12
    cost = clip_cost.clamp(min=0) + dead_cost + round_cost
    return float(c[int(torch.argmin(cost))])


def _promote(x: torch.Tensor) -> torch.Tensor:
    """Half-precision activations are quantized in float32; float64 stays as it is."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def quantize_int8(x: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """Symmetric INT8 fake quantization: clamp(round(x / scale), -127, 127) * scale.

    Rounds half to even. `scale` is a float or a tensor broadcasting against x (per token:
    [..., 1]). Returns float32 (float64 for float64 input).
    """
    x = _promote(x)
    return (x / scale).round().clamp(-INT8_QMAX, INT8_QMAX) * scale


def quantize_fp8_e4m3(x: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """FP8 E4M3 fake quantization: x / scale saturated to ±448, rounded to the nearest E4M3 value.

    Rounding is torch's float32 -> float8_e4m3fn cast: round to nearest, ties to even, with
    subnormals (multiples of 2^-9). Saturating first matters: the cast itself is free to turn
    values beyond 448 into NaN (the format has no infinity). Returns float32 (float64 stays).
    """
    x = _promote(x)
    y = (x / scale).to(torch.float32).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX)
    return y.to(torch.float8_e4m3fn).to(x.dtype) * scale
