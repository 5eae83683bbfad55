"""On-device statistics of activations, written as mergeable monoids.

Every accumulator here keeps its state in tensors on the device of the activations it reads,
updates without synchronising with the host, and merges with another accumulator of the same
shape exactly (max/min/sum/concatenate-then-select), so batches, resumed runs and processes
combine into the same answer whatever the order.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

# The |a| histogram's keys and the massive thresholds are defined beside the kernels that share them
# (that module is plain torch: importing it never imports Triton).
from maxact_card.kernels.encoding import (
    HIST_BINS,
    HIST_FINE_BINS,
    HIST_MIN_EXP,
    HIST_NONFINITE,
    HIST_OCTAVES,
    HIST_OVERFLOW,
    HIST_UNDERFLOW,
    KEY_OFFSET,
    KEY_SHIFT,
    MASSIVE_ABS,
    MASSIVE_RATIO,
    PAD_KEY,
    abs_hist_keys,
    count_keys,
)
from maxact_card.switches import switched_off


def _bf16_from_bits(bits: torch.Tensor) -> torch.Tensor:
    return bits.to(torch.int16).view(torch.bfloat16).to(torch.float64)


def hist_bin_bounds() -> tuple[torch.Tensor, torch.Tensor]:
    """Lower and upper |a| bounds of every bin (float64 [HIST_BINS], CPU); the non-finite bin is NaN."""
    fine = torch.arange(HIST_FINE_BINS, dtype=torch.int32)
    low_bits = (fine + KEY_OFFSET) << KEY_SHIFT
    lower = torch.empty(HIST_BINS, dtype=torch.float64)
    upper = torch.empty(HIST_BINS, dtype=torch.float64)
    lower[1 : HIST_FINE_BINS + 1] = _bf16_from_bits(low_bits)
    upper[1 : HIST_FINE_BINS + 1] = _bf16_from_bits(low_bits + (1 << KEY_SHIFT))
    lower[HIST_UNDERFLOW], upper[HIST_UNDERFLOW] = 0.0, 2.0**HIST_MIN_EXP
    lower[HIST_OVERFLOW], upper[HIST_OVERFLOW] = 2.0 ** (HIST_MIN_EXP + HIST_OCTAVES), torch.inf
    lower[HIST_NONFINITE] = upper[HIST_NONFINITE] = torch.nan
    return lower, upper


def hist_bin_values() -> torch.Tensor:
    """The representative |a| of each bin: the geometric middle; 0 for underflow, the bound for overflow."""
    lower, upper = hist_bin_bounds()
    values = torch.sqrt(lower * upper)
    values[HIST_UNDERFLOW] = 0.0
    values[HIST_OVERFLOW] = lower[HIST_OVERFLOW]
    return values


def nonfinite_count(counts: torch.Tensor) -> torch.Tensor:
    """How many inf/NaN elements a histogram holds (a 0-dim tensor, no host sync)."""
    return counts[..., HIST_NONFINITE]


def hist_quantile(counts: torch.Tensor, q: float) -> float:
    """The q-quantile of |a| over the finite elements of a histogram, within 2% relative error.

    Returns nan for an empty histogram. Runs on the host: call it once, at the end of a run.
    """
    finite = counts[:HIST_NONFINITE].to(torch.float64).cpu()
    total = float(finite.sum())
    if total <= 0:
        return float("nan")
    cumulative = torch.cumsum(finite, 0)
    # the smallest bin whose cumulative count reaches q of the total (rank ceil(q * n))
    rank = max(1.0, q * total)
    index = int(torch.searchsorted(cumulative, torch.tensor([rank], dtype=torch.float64) - 1e-9).item())
    index = min(index, finite.numel() - 1)
    return float(hist_bin_values()[index])


# --- the per-site accumulator -------------------------------------------------------------------
_KEY_LOW = 0xFFFFFFFF


def dense_scan(x: torch.Tensor, mask: torch.Tensor, massive: bool) -> tuple[torch.Tensor | None, ...]:
    """Every full-tensor reduction one update needs, as few reads of `x` as the backend allows.

    Per token: extremes with their channels, sum and sum of squares (one reduction over the hidden
    dimension); per channel: max|a| over valid tokens (one reduction over tokens); per element: the
    histogram key, with padding sent to a NaN bin (one pointwise pass). Under torch.compile each
    group becomes one kernel. A token holding inf/NaN is not valid: it is left out of maxima and
    moments and counted instead, so it never poses as a maximum.
    """
    tok_max, arg_max = x.max(dim=-1)
    tok_min, arg_min = x.min(dim=-1)
    tok_max = tok_max.float()
    tok_min = tok_min.float()
    valid = mask & torch.isfinite(tok_max) & torch.isfinite(tok_min)
    positive = tok_max >= -tok_min
    tok_abs = torch.where(positive, tok_max, -tok_min)
    tok_signed = torch.where(positive, tok_max, tok_min)
    tok_channel = torch.where(positive, arg_max, arg_min)
    tok_sum = x.sum(dim=-1, dtype=torch.float32)
    tok_sq = torch.linalg.vector_norm(x, ord=2, dim=-1, dtype=torch.float32).square()
    channel_max = torch.linalg.vector_norm(
        torch.where(valid.unsqueeze(-1), x, 0).reshape(-1, x.shape[-1]), ord=torch.inf, dim=0
    ).float()
    keys = torch.where(mask.unsqueeze(-1), abs_hist_keys(x), PAD_KEY)
    # Sun et al.'s ratio test without sorting: |a| > 1000 x (lower) median |a| of the token holds
    # exactly when more than half the token's channels lie below |a| / 1000.
    below = (x.abs() < (tok_abs / MASSIVE_RATIO).unsqueeze(-1)).sum(dim=-1) if massive else None
    return tok_max, tok_min, tok_abs, tok_signed, tok_channel, valid, tok_sum, tok_sq, channel_max, keys, below


_COMPILE = {"on": False}
_compiled_scan = dense_scan


def _scan(x: torch.Tensor, mask: torch.Tensor, massive: bool) -> tuple[torch.Tensor | None, ...]:
    if _COMPILE["on"] and x.is_cuda:
        try:
            return _compiled_scan(x, mask, massive)
        except Exception:  # noqa: BLE001 - a compiler failure costs speed, never the run
            _COMPILE["on"] = False
    return dense_scan(x, mask, massive)


def use_compile(enabled: bool) -> None:
    """Fuse the dense scan with torch.compile on CUDA (the same arithmetic, fewer passes over memory)."""
    global _compiled_scan
    _COMPILE["on"] = enabled
    if enabled and _compiled_scan is dense_scan:
        _compiled_scan = torch.compile(dense_scan, dynamic=True)


# The fused kernels (`maxact_card.kernels.update`) replace the scan, the histogram and the small
# reductions on CUDA: two launches per update. They are imported on the first CUDA update, so CPU-only
# runs never import Triton. MAXACT_CARD_KERNELS=0 keeps the reference path; a kernel that fails to build
# or launch costs speed, never the run: the update falls back to the reference path and stays there.
# On CPU tensors they run only when asked for with use_kernels(True) and they were imported under
# Triton's interpreter (tests).
_KERNELS: dict[str, Any] = {"on": None, "module": None, "error": None}
_REFERENCE_UPDATES = [0]  # updates run (or finished) by the reference path in this process


def updates_by_path() -> dict[str, int]:
    """Statistic updates this process has run, by the code that ran them: "cuda" and "triton" (the
    fused kernels' scans, `kernels.update.scans`) and "torch" (the reference path, which also
    finishes an update whose kernel failed). Differences of two readings are what a pass ran."""
    module = sys.modules.get("maxact_card.kernels.update")
    scans = module.scans if module is not None else {}
    return {"cuda": scans.get("cuda", 0), "triton": scans.get("triton", 0), "torch": _REFERENCE_UPDATES[0]}


def use_kernels(enabled: bool | None) -> None:
    """Use the fused Triton kernels where they can run; None: the default (on unless MAXACT_CARD_KERNELS=0)."""
    _KERNELS["on"] = enabled
    _KERNELS["error"] = None


def _kernel_module(x: torch.Tensor) -> Any:
    """`maxact_card.kernels.update` when it can fold `x`, else None (host-side checks only)."""
    on = _KERNELS["on"]
    if x.is_cuda:
        if on is None:
            on = not switched_off("MAXACT_CARD_KERNELS")
        if not on:
            return None
        module = _KERNELS["module"]
        if module is None:
            try:
                from maxact_card.kernels import update as module
            except Exception as exc:  # noqa: BLE001 - no Triton, or a broken one: the reference path
                _KERNELS["on"], _KERNELS["error"] = False, repr(exc)
                return None
            _KERNELS["module"] = module
    else:
        module = sys.modules.get("maxact_card.kernels.update")
        if on is not True or module is None or not module.INTERPRET:
            return None
    return module if module.available(x) else None


def prebuild_kernels(device: torch.device, sites: Sequence[tuple[int, bool, bool, int]] = ()) -> None:
    """Start building, on background threads, the CUDA kernels that bf16 updates of `sites` will
    launch ((width, massive, gated, top_k) each, as `kernels.update.prebuild` takes them); with no
    sites, build only the one every massive site needs, whatever its width, which pays the
    compiler's first-use cost beside whatever the caller does next (loading the model). Returns at
    once; off CUDA, or with the kernels off, nothing happens."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return
    # nvrtc imports torch and ctypes only: Triton comes in with `update`, on the building thread
    from maxact_card.kernels import nvrtc

    def start() -> None:
        module = _kernel_module(torch.empty((1, 8), dtype=torch.bfloat16, device=device))
        if module is None:
            return
        if sites:
            module.prebuild(device, list(sites))
        else:
            nvrtc.page_in_compiler()
            module.row_medians_kernel(device)

    nvrtc.prebuild([start])


def _kernels_failed(kernels: Any, exc: Exception) -> bool:
    """Turn the kernels off after `exc` and say whether the failed update had counted its histogram.

    Only the scan may have run: its fields are maxima, which the reference path that finishes the
    update can apply a second time without changing them, and the histogram (the CUDA scan adds it
    itself: `kernels.HistogramCounted`), which it must then not count again.
    """
    kernels.forget_scratch()
    _KERNELS["on"], _KERNELS["error"] = False, repr(exc)
    return isinstance(exc, kernels.HistogramCounted)


def gated_update(acc: SiteStats, g: torch.Tensor, up: torch.Tensor, ctx: BatchContext) -> torch.Tensor | None:
    """silu(g) * up of a SwiGLU MLP with the gate's statistics folded into `acc` in the same pass over
    g (`kernels.gated_update`). Returns the product, or None where that cannot run (off CUDA, not
    bf16, a kernel that failed before the scan): then nothing was updated, and the caller computes
    the product and updates `acc` as usual. A failure after the scan is finished here, by the
    reference path, the histogram (which the scan counted) left out."""
    if not g.is_cuda or acc.max.device != g.device:
        return None
    kernels = _kernel_module(g)
    if kernels is None:
        return None
    if ctx.mask.device != g.device:
        ctx = ctx.on(g.device)
    if not acc._fusable(g, ctx):
        return None
    try:
        done = kernels.gated_update(acc, g, up, ctx.mask, ctx.token_index, ctx.sample_index, ctx.input_ids)
    except torch.OutOfMemoryError:
        raise  # the batch loop rolls the batch back, splits it and retries
    except Exception as exc:  # noqa: BLE001 - see _KERNELS
        if not _kernels_failed(kernels, exc):
            return None
        # the product was made and the histogram counted: the rest of the update by the reference path
        acc._reference_update(g, ctx, count_hist=False)
        return torch.nn.functional.silu(g) * up
    if done is None:
        return None
    out, scan = done
    if acc.massive:
        acc._fused_medians(g, scan.source, kernels)
    return out


def _row_medians(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The (lower) median |a| of the given token rows of x [..., H], float32."""
    return x.reshape(-1, x.shape[-1]).index_select(0, rows).abs().median(dim=-1).values.float()


class BatchContext:
    """What every hook of one forward pass needs to know about the batch (all tensors on device).

    mask: [B, T] bool, False on padding. token_index: [B, T] int64, the position of each token in
    the whole run (sample offset + position), used to order ties and to locate maxima later.
    sample_index: [B] int64, the index of each row's sample in the run.
    """

    __slots__ = ("_on", "input_ids", "mask", "sample_index", "token_index")

    def __init__(self, mask: torch.Tensor, token_index: torch.Tensor, sample_index: torch.Tensor,
                 input_ids: torch.Tensor) -> None:
        self.mask = mask
        self.token_index = token_index
        self.sample_index = sample_index
        self.input_ids = input_ids
        self._on: dict[torch.device, BatchContext] = {mask.device: self}

    def on(self, device: torch.device) -> BatchContext:
        """The same context with its tensors on `device` (a model sharded over GPUs), cached."""
        ctx = self._on.get(device)
        if ctx is None:
            ctx = BatchContext(self.mask.to(device), self.token_index.to(device),
                               self.sample_index.to(device), self.input_ids.to(device))
            self._on[device] = ctx
        return ctx


class SiteStats:
    """Mergeable statistics of one site's activations, kept on the device.

    Fields and how they merge (MERGE_OPS) are what a distributed all-reduce or a resumed run uses:
    everything is a MAX, MIN or SUM except the top-K, which merges by concatenation and selection.
    The top-K holds whole tokens (each token's largest |a| and the channel that carries it), keyed
    by the float32 bits of |a| in the high 32 bits and the complement of the token's run index in
    the low 32 bits: comparing keys orders by |a| and breaks ties towards the earlier token, so the
    result does not depend on batching. The global maximum and its location are the top-1 entry.
    """

    MERGE_OPS: ClassVar[dict[str, str]] = {
        "max": "max", "min": "min", "channel_max": "max", "count": "sum", "sum": "sum", "sumsq": "sum",
        "hist": "sum", "nonfinite_tokens": "sum", "massive_tokens": "sum",
        "sample_max": "max", "topk_key": "topk", "topk_value": "topk", "topk_channel": "topk",
        "topk_token_id": "topk", "topk_median": "topk",
    }

    def __init__(self, width: int, num_samples: int, device: torch.device | str, *, top_k: int = 16,
                 massive: bool = False) -> None:
        dev = torch.device(device)
        self.width = width
        self.top_k = top_k
        self.massive = massive
        # Every field is a view into one buffer per dtype, filled on the host and copied over in one
        # go: three copies per site rather than a fill kernel per field (hundreds of sites per model).
        f32 = torch.zeros(2 + width + num_samples + 2 * top_k)
        f32[0], f32[1] = -torch.inf, torch.inf
        i64 = torch.zeros(3 + HIST_BINS + 3 * top_k, dtype=torch.int64)
        i64[3 + HIST_BINS : 3 + HIST_BINS + top_k] = -1
        f32, i64, f64 = (t.to(dev) for t in (f32, i64, torch.zeros(2, dtype=torch.float64)))
        # every path that changes a field writes into these views, so the three buffers always hold
        # the whole state: a snapshot before each batch is three copies (`storages`)
        self._storages = (f32, i64, f64)
        self.max, self.min = f32[0], f32[1]
        self.channel_max = f32[2 : 2 + width]
        self.sample_max = f32[2 + width : 2 + width + num_samples]
        self.topk_value = f32[2 + width + num_samples : 2 + width + num_samples + top_k]
        self.topk_median = f32[2 + width + num_samples + top_k :]  # median |a| of each top-K token (massive sites)
        self.count, self.nonfinite_tokens, self.massive_tokens = i64[0], i64[1], i64[2]
        self.hist = i64[3 : 3 + HIST_BINS]
        self.topk_key = i64[3 + HIST_BINS : 3 + HIST_BINS + top_k]
        self.topk_channel = i64[3 + HIST_BINS + top_k : 3 + HIST_BINS + 2 * top_k]
        self.topk_token_id = i64[3 + HIST_BINS + 2 * top_k :]
        self.sum, self.sumsq = f64[0], f64[1]

    # -- update ------------------------------------------------------------------------------------
    def update(self, x: torch.Tensor, ctx: BatchContext) -> None:
        """Fold a [B, T, H] activation into the statistics: no host synchronisation, no Python loops."""
        if x.device != self.max.device:
            x = x.to(self.max.device)
        if ctx.mask.device != x.device:
            ctx = ctx.on(x.device)
        kernels = _kernel_module(x)
        if kernels is not None and self._fusable(x, ctx):
            try:
                scan = kernels.fused_update(self, x, ctx.mask, ctx.token_index, ctx.sample_index, ctx.input_ids)
            except torch.OutOfMemoryError:
                raise  # the batch loop rolls the batch back, splits it and retries
            except Exception as exc:  # noqa: BLE001 - see _KERNELS
                self._reference_update(x, ctx, count_hist=not _kernels_failed(kernels, exc))
                return
            if self.massive:
                self._fused_medians(x, scan.source, kernels)
            return
        self._reference_update(x, ctx)

    def _reference_update(self, x: torch.Tensor, ctx: BatchContext, *, count_hist: bool = True) -> None:
        """`update` by the reference path (compiled or eager torch); x and ctx on this device."""
        _REFERENCE_UPDATES[0] += 1
        mask = ctx.mask
        tok_max, tok_min, tok_abs, tok_signed, tok_channel, valid, tok_sum, tok_sq, channel_max, keys, below = _scan(
            x, mask, self.massive
        )
        self.nonfinite_tokens += (mask & ~valid).sum()
        torch.maximum(self.max, torch.where(valid, tok_max, -torch.inf).amax(), out=self.max)
        torch.minimum(self.min, torch.where(valid, tok_min, torch.inf).amin(), out=self.min)
        abs_valid = torch.where(valid, tok_abs, 0.0)
        self.sample_max.scatter_reduce_(0, ctx.sample_index, abs_valid.amax(dim=1), reduce="amax")
        assert tok_channel is not None
        self._update_topk(x, abs_valid, tok_signed, tok_channel, valid, ctx)
        torch.maximum(self.channel_max, channel_max, out=self.channel_max)
        self.sum += torch.where(valid, tok_sum, 0.0).sum(dtype=torch.float64)
        self.sumsq += torch.where(valid, tok_sq, 0.0).sum(dtype=torch.float64)
        self.count += valid.sum() * x.shape[-1]
        if count_hist:
            self.hist += count_keys(keys)
        if below is not None:
            hit = valid & (tok_abs > MASSIVE_ABS) & (below >= (x.shape[-1] - 1) // 2 + 1)
            self.massive_tokens += hit.sum()

    def _fusable(self, x: torch.Tensor, ctx: BatchContext) -> bool:
        """Whether the fused kernels may update this accumulator in place (host-side checks only).

        The fields need no check: every path that sets them (construction, `_select_topk`,
        `load_state_dict`) leaves them contiguous, with the dtypes construction gave them, on this
        accumulator's device.
        """
        if x.dim() != 3 or x.numel() == 0 or x.shape[-1] != self.width or self.top_k < 1 \
                or self.topk_key.numel() != self.top_k:
            return False
        shape = x.shape[:-1]
        if ctx.mask.shape != shape or ctx.token_index.shape != shape or ctx.input_ids.shape != shape:
            return False
        return ctx.mask.dtype == torch.bool and ctx.sample_index.dtype == torch.int64

    def _fused_medians(self, x: torch.Tensor, source: torch.Tensor, kernels: Any) -> None:
        """The median |a| of the top-K entries the fused update took from `x` (source: their rows, or -1):
        one CUDA launch for bf16 (`kernels.row_medians`), else torch."""
        if kernels.row_medians(x.reshape(-1, x.shape[-1]), source, self.topk_median):
            return
        median = _row_medians(x, source.clamp(min=0))
        torch.where(source >= 0, median, self.topk_median, out=self.topk_median)

    def _update_topk(self, x: torch.Tensor, abs_valid: torch.Tensor, signed: torch.Tensor,
                     channel: torch.Tensor, valid: torch.Tensor, ctx: BatchContext) -> None:
        """Merge this batch's largest tokens (each with the channel of its extreme) into the top-K."""
        bits = abs_valid.contiguous().view(torch.int32).to(torch.int64)
        key = torch.where(valid, (bits << 32) | (_KEY_LOW - ctx.token_index.reshape(valid.shape)), -1).reshape(-1)
        top_key, idx = key.topk(min(self.top_k, key.numel()))
        value = signed.reshape(-1).index_select(0, idx)
        top_channel = channel.reshape(-1).index_select(0, idx)
        if self.massive:
            # The median |a| of each candidate token, for Sun et al.'s ratio at the top tokens: the
            # final top-K does not depend on batching, so neither does the largest ratio read there.
            median = _row_medians(x, idx)
        else:
            median = torch.zeros_like(value)
        self._select_topk(
            torch.cat([self.topk_key, top_key]),
            torch.cat([self.topk_value, value]),
            torch.cat([self.topk_channel, top_channel]),
            torch.cat([self.topk_token_id, ctx.input_ids.reshape(-1).index_select(0, idx)]),
            torch.cat([self.topk_median, median]),
        )

    def _select_topk(self, key: torch.Tensor, value: torch.Tensor, channel: torch.Tensor,
                     token: torch.Tensor, median: torch.Tensor) -> None:
        """The top-K of the candidates, written into the fields (which the candidates must not be views of)."""
        top, idx = key.topk(self.top_k)
        self.topk_key.copy_(top)
        torch.index_select(value, 0, idx, out=self.topk_value)
        torch.index_select(channel, 0, idx, out=self.topk_channel)
        torch.index_select(token, 0, idx, out=self.topk_token_id)
        torch.index_select(median, 0, idx, out=self.topk_median)

    # -- monoid --------------------------------------------------------------------------------------
    def merge(self, other: SiteStats) -> SiteStats:
        """A new accumulator holding both; exact and associative, a fresh accumulator is its identity."""
        out = SiteStats(self.width, self.sample_max.numel(), self.max.device, top_k=self.top_k,
                        massive=self.massive)
        state = {}
        for name, op in self.MERGE_OPS.items():
            a, b = getattr(self, name), getattr(other, name).to(self.max.device)
            if op == "max":
                state[name] = torch.maximum(a, b)
            elif op == "min":
                state[name] = torch.minimum(a, b)
            elif op == "sum":
                state[name] = a + b
        for name in ("max", "min", "channel_max", "count", "sum", "sumsq", "hist", "nonfinite_tokens",
                     "massive_tokens", "sample_max"):
            getattr(out, name).copy_(state[name])
        out._select_topk(
            torch.cat([self.topk_key, other.topk_key.to(self.max.device)]),
            torch.cat([self.topk_value, other.topk_value.to(self.max.device)]),
            torch.cat([self.topk_channel, other.topk_channel.to(self.max.device)]),
            torch.cat([self.topk_token_id, other.topk_token_id.to(self.max.device)]),
            torch.cat([self.topk_median, other.topk_median.to(self.max.device)]),
        )
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every field, for checkpoints and collectives (the live tensors, not copies)."""
        return {name: getattr(self, name) for name in self.MERGE_OPS}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copy every field in (moved to this accumulator's device and the field's dtype); shapes must match."""
        for name in self.MERGE_OPS:
            current, value = getattr(self, name), state[name]
            if value.shape != current.shape:
                raise ValueError(f"field {name!r} has shape {tuple(value.shape)}, expected {tuple(current.shape)}")
            current.copy_(value)

    def storages(self) -> tuple[torch.Tensor, ...]:
        """The buffers every field is a view of: copying them copies the whole state, and copying
        them back restores it (the batch loop's snapshot)."""
        return self._storages
