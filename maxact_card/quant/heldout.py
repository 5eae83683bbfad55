"""The held-out error of every scale policy, as a mergeable monoid.

A `QuantAccumulator` reads held-out activations inside forward hooks, quantizes them under every
policy at once and keeps only sums and a histogram on the device, so batches, resumed runs and
processes merge exactly by addition.

Whole-tensor SQNR alone is fooled by massive activations: a few tokens carrying 10^4 carry almost
all the energy, so max-abs scaling can score a passable SQNR while every ordinary token is
quantized to zero. The accumulator therefore also keeps a histogram of per-token SQNR, and a
policy passes only if both the whole-tensor and the per-token figures do.

Output is JSON-friendly: infinities and NaNs never leave `result()` or `summarize()`; where a
figure is undefined it is None, and where it is unbounded it is capped (see `SQNR_CAP_DB` and the
token-SQNR range).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from maxact_card.errors import UsageError
from maxact_card.quant.schemes import (
    FAIL,
    INT8_QMAX,
    PASS,
    POLICY_ORDER,
    QMAX,
    RECOMMENDATION_ORDER,
    SQNR_CAP_DB,
    STATIC_POLICIES,
    TOKEN_SQNR_BINS,
    TOKEN_SQNR_LOW_DB,
    TOKEN_SQNR_STEP_DB,
    QuantPolicy,
    Thresholds,
    quantize_fp8_e4m3,
    quantize_int8,
)

_P = len(POLICY_ORDER)
_DYNAMIC_ROW = POLICY_ORDER.index(QuantPolicy.INT8_DYNAMIC_TOKEN)

# field -> (dtype, shape); the per-policy fields have one row per POLICY_ORDER entry
_FIELDS: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {
    "signal": (torch.float64, ()),  # sum x^2
    "abs_sum": (torch.float64, ()),  # sum |x|
    "elements": (torch.int64, ()),  # unmasked elements
    "noise": (torch.float64, (_P,)),  # sum (x - xq)^2
    "abs_error": (torch.float64, (_P,)),  # sum |x - xq|
    "clipped": (torch.int64, (_P,)),  # elements with |x| > clip
    "token_sqnr_hist": (torch.int64, (_P, TOKEN_SQNR_BINS)),  # tokens per SQNR bin
}


def token_errors(x: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per token: signal energy, sum |x|, and per policy ([P, B, T]) noise energy, sum |error|, clipped count.

    `scales` holds one scale per policy in POLICY_ORDER (the dynamic policy's entry is unused).
    Everything is reduced over the hidden dimension here, so masking happens on [B, T] values.
    Under torch.compile each policy's quantize-and-reduce chain becomes one pass over `x`.
    """
    x = x.to(torch.float32)
    abs_x = x.abs()
    signal_tok = x.square().sum(-1)
    noise_rows, abs_error_rows, clipped_rows = [], [], []
    for i, policy in enumerate(POLICY_ORDER):
        if policy is QuantPolicy.INT8_DYNAMIC_TOKEN:
            amax = abs_x.amax(-1, keepdim=True)
            # an all-zero token quantizes to zeros under any positive scale
            scale: torch.Tensor = torch.where(amax > 0, amax / INT8_QMAX, 1.0)
            clipped_rows.append(torch.zeros(x.shape[:-1], dtype=torch.int64, device=x.device))
        else:
            scale = scales[i]
            clipped_rows.append((abs_x > QMAX[policy] * scale).sum(-1))
        if policy is QuantPolicy.FP8_E4M3_STATIC:
            error = x - quantize_fp8_e4m3(x, scale)
        else:
            error = x - quantize_int8(x, scale)
        noise_rows.append(error.square().sum(-1))
        abs_error_rows.append(error.abs().sum(-1))
    return (signal_tok, abs_x.sum(-1), torch.stack(noise_rows), torch.stack(abs_error_rows),
            torch.stack(clipped_rows))


_COMPILE = {"on": False}
_compiled_token_errors = token_errors


def _token_errors(x: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, ...]:
    if _COMPILE["on"] and x.is_cuda:
        try:
            return _compiled_token_errors(x, scales)
        except Exception:  # noqa: BLE001 - a compiler failure costs speed, never the run
            _COMPILE["on"] = False
    return token_errors(x, scales)


def use_compile(enabled: bool) -> None:
    """Fuse the per-policy error passes with torch.compile on CUDA (same arithmetic, fewer passes)."""
    global _compiled_token_errors
    _COMPILE["on"] = enabled
    if enabled and _compiled_token_errors is token_errors:
        _compiled_token_errors = torch.compile(token_errors, dynamic=True)


class QuantAccumulator:
    """Per site, on the device: the held-out error of every policy, mergeable.

    The state is sums and a histogram only, so `merge` is elementwise addition (associative,
    commutative up to float64 rounding, exact for the counts) and a fresh accumulator is its
    identity. Token counts are read off the histogram rather than kept beside it.
    """

    # How each state field combines across batches, resumes and processes (torch.distributed:
    # ReduceOp.SUM for all of them).
    MERGE_OPS: dict[str, str] = {name: "sum" for name in _FIELDS}

    def __init__(
        self,
        scales: Mapping[QuantPolicy, float],
        *,
        device: torch.device | str,
        thresholds: Thresholds = Thresholds(),
    ) -> None:
        """`scales` holds a positive finite scale for every static policy (see `static_scales`)."""
        self.scales = _check_scales(scales)
        self.thresholds = thresholds
        self._state = {
            name: torch.zeros(shape, dtype=dtype, device=device) for name, (dtype, shape) in _FIELDS.items()
        }
        # the device the state landed on: "cuda" becomes "cuda:0", so comparisons with x.device hold
        self.device = self._state["noise"].device
        # copied here, once: a host-to-device copy inside `update` would synchronise with the host
        self._scale_vec = torch.tensor([float(self.scales.get(p, 1.0)) for p in POLICY_ORDER],
                                       dtype=torch.float32, device=self.device)

    def update(self, x: torch.Tensor, mask: torch.Tensor) -> None:
        """Add held-out activations x [B, T, H] under mask [B, T] (False = padding, never counted).

        Evaluates every policy in this one call without synchronising with the host. Each
        statistic is reduced over the hidden dimension first and masked per token afterwards,
        so padding, even inf or NaN there, never reaches a sum.
        """
        if x.dim() != 3 or tuple(mask.shape) != tuple(x.shape[:2]):
            raise UsageError(
                f"expected activations [B, T, H] and a mask [B, T], got {tuple(x.shape)} and {tuple(mask.shape)}",
                hint="pass the hooked hidden states and the attention mask of the batch",
            )
        if x.device != self.device or mask.device != self.device:
            raise UsageError(
                f"activations on {x.device} and mask on {mask.device}, accumulator on {self.device}",
                hint="build the accumulator on the device of the hooked module",
            )
        mask = mask.to(torch.bool)
        hidden = x.shape[-1]
        signal_tok, abs_tok, noise_tok, abs_error_tok, clipped_tok = _token_errors(x, self._scale_vec)
        state = self._state
        state["signal"] += torch.where(mask, signal_tok, 0).sum(dtype=torch.float64)
        state["abs_sum"] += torch.where(mask, abs_tok, 0).sum(dtype=torch.float64)
        state["elements"] += mask.sum(dtype=torch.int64) * hidden
        state["noise"] += torch.where(mask, noise_tok, 0).sum((1, 2), dtype=torch.float64)
        state["abs_error"] += torch.where(mask, abs_error_tok, 0).sum((1, 2), dtype=torch.float64)
        state["clipped"] += torch.where(mask, clipped_tok, 0).sum((1, 2))

        # Per-token SQNR as a difference of logs, so no ratio overflows. Zero noise gives +inf
        # (the overflow bin), NaN activations give NaN (the underflow bin); all-zero tokens are
        # left out through `counted`.
        sqnr = 10.0 * (torch.log10(signal_tok) - torch.log10(noise_tok))
        position = torch.floor((sqnr - TOKEN_SQNR_LOW_DB) / TOKEN_SQNR_STEP_DB) + 1
        position = torch.nan_to_num(position, nan=0.0, posinf=TOKEN_SQNR_BINS - 1, neginf=0.0)
        bins = position.clamp(0, TOKEN_SQNR_BINS - 1).to(torch.int64).reshape(_P, -1)
        counted = (mask & (signal_tok > 0)).reshape(1, -1).to(torch.int64).expand(_P, -1)
        state["token_sqnr_hist"].scatter_add_(1, bins, counted)

    def merge(self, other: QuantAccumulator) -> QuantAccumulator:
        """A new accumulator holding both; neither operand changes."""
        if other.scales != self.scales or other.thresholds != self.thresholds:
            raise UsageError(
                "cannot merge accumulators built with different scales or thresholds",
                hint="merge only accumulators of the same site and run",
            )
        merged = QuantAccumulator(self.scales, device=self.device, thresholds=self.thresholds)
        for name, value in self._state.items():
            merged._state[name] = value + other._state[name].to(self.device)
        return merged

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The state tensors (on the device; copies), every one merged by `MERGE_OPS` (sum)."""
        return {name: value.clone() for name, value in self._state.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Replace the state with `state` (as `state_dict` returns it): a rollback or a resume."""
        for name in _FIELDS:
            self._state[name] = state[name].to(self.device)

    @classmethod
    def from_state_dict(
        cls,
        state: Mapping[str, torch.Tensor],
        scales: Mapping[QuantPolicy, float],
        *,
        device: torch.device | str | None = None,
        thresholds: Thresholds = Thresholds(),
    ) -> QuantAccumulator:
        """Rebuild an accumulator from `state_dict()`; scales and thresholds are not part of the state."""
        if set(state) != set(_FIELDS):
            raise UsageError(
                f"accumulator state has fields {sorted(state)}, expected {sorted(_FIELDS)}",
                hint="resume only from a state written by this version of maxact-card",
            )
        if device is None:
            device = state["noise"].device
        accumulator = cls(scales, device=device, thresholds=thresholds)
        for name, (dtype, shape) in _FIELDS.items():
            value = state[name]
            if value.dtype != dtype or tuple(value.shape) != shape:
                raise UsageError(
                    f"accumulator field {name!r} is {value.dtype} {tuple(value.shape)}, expected {dtype} {shape}",
                    hint="resume only from a state written by this version of maxact-card",
                )
            accumulator._state[name] = value.detach().to(accumulator.device).clone()
        return accumulator

    def result(self) -> dict[str, dict[str, Any]]:
        """Per policy, the figures and verdict of everything seen; host side, once, at the end.

        sqnr_db is capped at SQNR_CAP_DB (zero noise); per-token quantiles are the lower edge of
        their 0.25 dB bin, clamped to [-60, 140] dB. A figure with nothing to measure (no
        elements, no non-zero token) is None, and a site with no elements fails.
        """
        state = {name: value.detach().cpu() for name, value in self._state.items()}
        signal = float(state["signal"])
        abs_sum = float(state["abs_sum"])
        elements = int(state["elements"])
        out: dict[str, dict[str, Any]] = {}
        for row, policy in enumerate(POLICY_ORDER):
            noise = float(state["noise"][row])
            abs_error = float(state["abs_error"][row])
            hist = state["token_sqnr_hist"][row]
            tokens = int(hist.sum())
            below = int(hist[: self._threshold_bins()].sum())
            share_below = below / tokens if tokens else 0.0
            sqnr = _sqnr_db(signal, noise) if elements else None
            passes = (
                sqnr is not None
                and sqnr >= self.thresholds.min_sqnr_db
                # compared as a ratio of counts, so 99 of 100 meets a 0.99 share exactly
                and ((tokens - below) / tokens if tokens else 1.0) >= self.thresholds.min_token_share
            )
            scale = None if policy is QuantPolicy.INT8_DYNAMIC_TOKEN else self.scales[policy]
            out[policy.value] = {
                "scale": scale,
                "clip": None if scale is None else scale * QMAX[policy],
                "sqnr_db": sqnr,
                "rel_rmse": _ratio(noise, signal, math.sqrt) if elements else None,
                "rel_mae": _ratio(abs_error, abs_sum) if elements else None,
                "clip_rate": int(state["clipped"][row]) / elements if elements else None,
                "token_sqnr_median_db": _token_quantile(hist, 0.5),
                "token_sqnr_p05_db": _token_quantile(hist, 0.05),
                "token_share_below": share_below,
                "tokens": tokens,
                "verdict": PASS if passes else FAIL,
            }
        return out

    def _threshold_bins(self) -> int:
        """How many leading histogram bins lie wholly below min_token_sqnr_db (it is on the grid)."""
        return 1 + round((self.thresholds.min_token_sqnr_db - TOKEN_SQNR_LOW_DB) / TOKEN_SQNR_STEP_DB)


def _check_scales(scales: Mapping[QuantPolicy, float]) -> dict[QuantPolicy, float]:
    checked: dict[QuantPolicy, float] = {}
    for key, value in scales.items():
        policy = QuantPolicy(key)
        if policy is QuantPolicy.INT8_DYNAMIC_TOKEN:
            continue  # its scales are computed per token
        if not (math.isfinite(value) and value > 0):
            raise UsageError(f"scale of {policy.value} must be positive and finite, not {value}")
        checked[policy] = float(value)
    missing = [p.value for p in STATIC_POLICIES if p not in checked]
    if missing:
        raise UsageError(f"no scale for {', '.join(missing)}", hint="build the scales with static_scales()")
    return checked


def _sqnr_db(signal: float, noise: float) -> float | None:
    if math.isnan(signal) or math.isnan(noise) or math.isinf(noise):
        return None
    if noise <= 0:
        return SQNR_CAP_DB
    if signal <= 0:
        return None  # noise without signal cannot happen for these quantizers; say nothing
    return min(10.0 * math.log10(signal / noise), SQNR_CAP_DB)


def _ratio(numerator: float, denominator: float, transform: Any = None) -> float | None:
    """numerator / denominator (optionally transformed); 0 when both are 0, None when undefined."""
    if numerator == 0 and denominator == 0:
        return 0.0
    if not (denominator > 0 and math.isfinite(denominator) and math.isfinite(numerator)):
        return None
    value = numerator / denominator
    return transform(value) if transform else value


def _token_quantile(hist: torch.Tensor, q: float) -> float | None:
    """The lower edge of the bin holding the q-quantile of per-token SQNR, clamped to [-60, 140]."""
    total = int(hist.sum())
    if total == 0:
        return None
    rank = max(1, math.ceil(q * total - 1e-9))
    index = int(torch.searchsorted(torch.cumsum(hist, 0), torch.tensor([rank])))
    return max(TOKEN_SQNR_LOW_DB, TOKEN_SQNR_LOW_DB + (index - 1) * TOKEN_SQNR_STEP_DB)


def summarize(per_site: Mapping[str, Mapping[str, Mapping[str, Any]]], *, peak_site: str | None = None) -> dict:
    """Combine per-site `result()` dicts into one verdict per policy and a recommendation.

    A policy passes iff it passes at every site. Its worst site is a failing site if it has one,
    and among those the one with the lowest whole-tensor SQNR (then the lowest token p05, then
    the name); `worst_sqnr_db` and `worst_token_sqnr_p05_db` are each the minimum over all sites.
    `recommended` is the first passing policy of RECOMMENDATION_ORDER, or None. With `peak_site`
    (the site of the largest activation) the summary also repeats each policy's figures there.
    """
    if not per_site:
        raise UsageError("no sites to summarize", hint="measure at least one site")
    if peak_site is not None and peak_site not in per_site:
        raise UsageError(f"peak site {peak_site!r} is not among the measured sites")
    policies: dict[str, dict[str, Any]] = {}
    for policy in POLICY_ORDER:
        rows = []
        for site, results in per_site.items():
            if policy.value not in results:
                raise UsageError(f"site {site!r} has no result for {policy.value}", hint="re-run the measurement")
            rows.append((site, results[policy.value]))

        def badness(row: tuple[str, Mapping[str, Any]]) -> tuple[bool, float, float, str]:
            site, figures = row
            return (
                figures["verdict"] == PASS,
                _or_minus_inf(figures.get("sqnr_db")),
                _or_minus_inf(figures.get("token_sqnr_p05_db")),
                site,
            )

        worst_site, _ = min(rows, key=badness)
        failing = sum(1 for _, figures in rows if figures["verdict"] != PASS)
        policies[policy.value] = {
            "verdict": PASS if failing == 0 else FAIL,
            "worst_site": worst_site,
            "worst_sqnr_db": _min_known(figures.get("sqnr_db") for _, figures in rows),
            "worst_token_sqnr_p05_db": _min_known(figures.get("token_sqnr_p05_db") for _, figures in rows),
            "failing_sites": failing,
        }
    recommended = next((p.value for p in RECOMMENDATION_ORDER if policies[p.value]["verdict"] == PASS), None)
    peak = None
    if peak_site is not None:
        peak = {
            "site": peak_site,
            "policies": {
                policy.value: {
                    key: per_site[peak_site][policy.value].get(key)
                    for key in ("sqnr_db", "token_sqnr_p05_db", "verdict")
                }
                for policy in POLICY_ORDER
            },
        }
    return {"policies": policies, "recommended": recommended, "peak_site": peak}


def _or_minus_inf(value: float | None) -> float:
    return -math.inf if value is None else float(value)


def _min_known(values: Any) -> float | None:
    known = [float(v) for v in values if v is not None]
    return min(known) if known else None
