"""The encoding that the statistics (`measure/stats.py`) and the kernels share: the |a| histogram's keys,
and the thresholds of a massive activation. Plain torch: importing it never imports Triton.

|a| histogram. The key of a value comes from the bit pattern of |a| as bfloat16: its exponent and the top 6
bits of its mantissa, for |a| in [2**-32, 2**32), so 64 bins per octave of relative width at most 2**-6
(1.6%): a quantile read at a bin's geometric middle is within 0.8% of the bin's values, and within 1.2% of
the true value once bf16 rounding (0.4%) is added, well inside the 2% the report promises. Below the range
(zeros included) is one underflow bin, above it one overflow bin, inf and NaN one more, so non-finite
elements are counted exactly for free. 4,100 int64 counters fit in a GPU block's shared memory, which keeps
the histogram pass about ten times faster than a full 32,768-bin bf16 histogram that has to count in
global memory.
"""

from __future__ import annotations

import torch

HIST_MIN_EXP = -32
HIST_OCTAVES = 64
HIST_SUB_BITS = 6
HIST_FINE_BINS = HIST_OCTAVES << HIST_SUB_BITS  # the bins of [2**-32, 2**32)
HIST_UNDERFLOW = 0
HIST_OVERFLOW = HIST_FINE_BINS + 1
HIST_NONFINITE = HIST_FINE_BINS + 2
HIST_BINS = HIST_FINE_BINS + 3
PAD_KEY = HIST_BINS  # padding is counted in a bin past the end, then dropped
_BF16_BIAS = 127
KEY_OFFSET = (_BF16_BIAS + HIST_MIN_EXP) << HIST_SUB_BITS  # bf16 |a| bits >> KEY_SHIFT of the first fine bin
KEY_SHIFT = 7 - HIST_SUB_BITS
FINE_BIAS = KEY_OFFSET - 1  # key = (bf16 |a| bits >> 1) - FINE_BIAS, clamped, as `abs_hist_keys`


def abs_hist_keys(x: torch.Tensor) -> torch.Tensor:
    """Histogram keys (int16 in [0, HIST_BINS)) of |x|, elementwise; x of any float dtype."""
    if x.dtype != torch.bfloat16:
        x = x.to(torch.bfloat16)
    bits = x.contiguous().view(torch.int16) & 0x7FFF
    fine = ((bits >> KEY_SHIFT) - (KEY_OFFSET - 1)).clamp(HIST_UNDERFLOW, HIST_OVERFLOW)
    return torch.where(bits >= 0x7F80, HIST_NONFINITE, fine).to(torch.int16)


def count_keys(keys: torch.Tensor) -> torch.Tensor:
    """Histogram counts (int64 [HIST_BINS]) of keys, padding (`PAD_KEY`) dropped."""
    return torch.bincount(keys.reshape(-1).to(torch.int64), minlength=HIST_BINS + 1)[:HIST_BINS]


def abs_hist_counts(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Histogram counts of |x| [..., H] over the rows where mask [...] holds."""
    return count_keys(torch.where(mask.unsqueeze(-1), abs_hist_keys(x), PAD_KEY))


# Sun et al. 2024, "Massive activations in large language models": an activation is massive when
# |a| > 100 and |a| > 1000 x the median |a| of its token's hidden vector.
MASSIVE_ABS = 100.0
MASSIVE_RATIO = 1000.0
