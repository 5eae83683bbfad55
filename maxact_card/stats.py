"""On-device statistics of activations, written as mergeable monoids.

Every accumulator here keeps its state in tensors on the device of the activations it reads,
updates without synchronising with the host, and merges with another accumulator of the same
shape exactly (max/min/sum/concatenate-then-select), so batches, resumed runs and processes
combine into the same answer whatever the order.
"""

from __future__ import annotations

import torch

# |a| histogram: the key of a value is the bit pattern of |a| as bfloat16 without its sign bit,
# shifted right by one. Bin k then spans two bf16 steps, a relative width of 2**-6 (1.6%), so a
# quantile read at a bin's geometric middle is within 0.8% of the bin's values, and within 1.2%
# of the true float32 value once bf16 rounding (0.4%) is added: inside the 2% the report promises.
# Keys of inf and NaN fall in the bins whose exponent bits are all ones, so the histogram also
# counts non-finite elements exactly, at no extra cost.
HIST_SHIFT = 1
HIST_BINS = 1 << (15 - HIST_SHIFT)
_NONFINITE_FIRST_KEY = 0x7F80 >> HIST_SHIFT


def abs_hist_keys(x: torch.Tensor) -> torch.Tensor:
    """Histogram keys (int64 in [0, HIST_BINS)) of |x|, elementwise; x of any float dtype."""
    bits = x.to(torch.bfloat16).view(torch.int16).to(torch.int32)
    return ((bits & 0x7FFF) >> HIST_SHIFT).to(torch.int64)


def _bf16_from_bits(bits: torch.Tensor) -> torch.Tensor:
    return bits.to(torch.int16).view(torch.bfloat16).to(torch.float64)


def hist_bin_bounds() -> tuple[torch.Tensor, torch.Tensor]:
    """Lower and upper |a| bounds of every bin (float64 [HIST_BINS], CPU); non-finite bins are inf/nan."""
    keys = torch.arange(HIST_BINS, dtype=torch.int32)
    lower = _bf16_from_bits(keys << HIST_SHIFT)
    upper_bits = ((keys + 1) << HIST_SHIFT).clamp(max=0x7F80)
    upper = _bf16_from_bits(upper_bits)
    return lower, upper


def hist_bin_values() -> torch.Tensor:
    """The representative |a| of each bin: the geometric middle (the arithmetic one for the zero bin)."""
    lower, upper = hist_bin_bounds()
    mid = torch.sqrt(lower * upper)
    return torch.where(lower > 0, mid, (lower + upper) / 2)


def nonfinite_count(counts: torch.Tensor) -> torch.Tensor:
    """How many inf/NaN elements a histogram holds (a 0-dim tensor, no host sync)."""
    return counts[..., _NONFINITE_FIRST_KEY:].sum(-1)


def hist_quantile(counts: torch.Tensor, q: float) -> float:
    """The q-quantile of |a| over the finite elements of a histogram, within 2% relative error.

    Returns nan for an empty histogram. Runs on the host: call it once, at the end of a run.
    """
    finite = counts[:_NONFINITE_FIRST_KEY].to(torch.float64).cpu()
    total = float(finite.sum())
    if total <= 0:
        return float("nan")
    cumulative = torch.cumsum(finite, 0)
    # the smallest bin whose cumulative count reaches q of the total (rank ceil(q * n))
    rank = max(1.0, q * total)
    index = int(torch.searchsorted(cumulative, torch.tensor([rank], dtype=torch.float64) - 1e-9).item())
    index = min(index, finite.numel() - 1)
    return float(hist_bin_values()[index])
