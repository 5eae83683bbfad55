"""Activation quantization: which static scales the calibration statistics give, and how well they
hold on held-out data.

- `schemes.py`: the INT8 and FP8 scale policies, their thresholds, the scales they choose from the
  running max|a| and the |a| histogram, and the quantizers;
- `heldout.py`: the held-out pass, a mergeable accumulator of each policy's error, and the summary
  and verdicts the results carry.

The names below are the package's interface.
"""

from maxact_card.quant.heldout import QuantAccumulator, summarize, token_errors, use_compile
from maxact_card.quant.schemes import (
    FAIL,
    FP8_E4M3_MAX,
    INT8_QMAX,
    PASS,
    POLICY_ORDER,
    QMAX,
    RECOMMENDATION_ORDER,
    SQNR_CAP_DB,
    STATIC_POLICIES,
    TOKEN_SQNR_BINS,
    TOKEN_SQNR_HIGH_DB,
    TOKEN_SQNR_LOW_DB,
    TOKEN_SQNR_STEP_DB,
    QuantPolicy,
    Thresholds,
    quantize_fp8_e4m3,
    quantize_int8,
    static_scales,
)

__all__ = [
    "FAIL",
    "FP8_E4M3_MAX",
    "INT8_QMAX",
    "QMAX",
    "PASS",
    "POLICY_ORDER",
    "QuantAccumulator",
    "QuantPolicy",
    "RECOMMENDATION_ORDER",
    "SQNR_CAP_DB",
    "STATIC_POLICIES",
    "TOKEN_SQNR_BINS",
    "TOKEN_SQNR_HIGH_DB",
    "TOKEN_SQNR_LOW_DB",
    "TOKEN_SQNR_STEP_DB",
    "Thresholds",
    "quantize_fp8_e4m3",
    "quantize_int8",
    "static_scales",
    "summarize",
    "token_errors",
    "use_compile",
]
