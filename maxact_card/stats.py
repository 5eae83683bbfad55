"""On-device statistics of activations, written as mergeable monoids.

Every accumulator here keeps its state in tensors on the device of the activations it reads,
updates without synchronising with the host, and merges with another accumulator of the same
shape exactly (max/min/sum/concatenate-then-select), so batches, resumed runs and processes
combine into the same answer whatever the order.
"""

from __future__ import annotations

import torch

# |a| histogram: the key of a value is the bit pattern of |a| as bfloat16 without its sign bit.
# Bin k then spans one bf16 step, a relative width of at most 2**-7 (0.8%), so a quantile read at
# a bin's geometric middle is within 0.4% of the bin's values, and within 0.8% of the true float32
# value once bf16 rounding (0.4%) is added: well inside the 2% the report promises. Reading the
# bits of a bf16 activation costs one integer pass, with no log or division.
# Keys of inf and NaN fall in the bins whose exponent bits are all ones, so the histogram also
# counts non-finite elements exactly, at no extra cost.
HIST_SHIFT = 0
HIST_BINS = 1 << (15 - HIST_SHIFT)
_NONFINITE_FIRST_KEY = 0x7F80 >> HIST_SHIFT
_PAD_KEY = HIST_BINS - 1  # a NaN bit pattern


def abs_hist_keys(x: torch.Tensor) -> torch.Tensor:
    """Histogram keys (int16 in [0, HIST_BINS)) of |x|, elementwise; x of any float dtype."""
    if x.dtype != torch.bfloat16:
        x = x.to(torch.bfloat16)
    keys = x.contiguous().view(torch.int16) & 0x7FFF
    return keys >> HIST_SHIFT if HIST_SHIFT else keys


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


# --- the per-site accumulator -------------------------------------------------------------------

# Sun et al. 2024, "Massive activations in large language models": an activation is massive when
# |a| > 100 and |a| > 1000 x the median |a| of its token's hidden vector.
MASSIVE_ABS = 100.0
MASSIVE_RATIO = 1000.0

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
    keys = torch.where(mask.unsqueeze(-1), abs_hist_keys(x), _PAD_KEY)
    median = x.abs().median(dim=-1).values.float() if massive else None
    return tok_max, tok_min, tok_abs, tok_signed, tok_channel, valid, tok_sum, tok_sq, channel_max, keys, median


_COMPILE = {"on": False}
_compiled_scan = dense_scan


def use_compile(enabled: bool) -> None:
    """Fuse the dense scan with torch.compile on CUDA (the same arithmetic, fewer passes over memory)."""
    global _compiled_scan
    _COMPILE["on"] = enabled
    if enabled and _compiled_scan is dense_scan:
        _compiled_scan = torch.compile(dense_scan, dynamic=True)


class BatchContext:
    """What every hook of one forward pass needs to know about the batch (all tensors on device).

    mask: [B, T] bool, False on padding. token_index: [B, T] int64, the position of each token in
    the whole run (sample offset + position), used to order ties and to locate maxima later.
    sample_index: [B] int64, the index of each row's sample in the run.
    """

    __slots__ = ("mask", "token_index", "sample_index", "input_ids", "_on")

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

    MERGE_OPS = {
        "max": "max", "min": "min", "channel_max": "max", "count": "sum", "sum": "sum", "sumsq": "sum",
        "hist": "sum", "nonfinite_tokens": "sum", "massive_tokens": "sum", "massive_ratio": "max",
        "sample_max": "max", "topk_key": "topk", "topk_value": "topk", "topk_channel": "topk",
        "topk_token_id": "topk",
    }

    def __init__(self, width: int, num_samples: int, device: torch.device | str, *, top_k: int = 16,
                 massive: bool = False) -> None:
        dev = torch.device(device)
        self.width = width
        self.top_k = top_k
        self.massive = massive
        self.max = torch.full((), -torch.inf, device=dev)
        self.min = torch.full((), torch.inf, device=dev)
        self.channel_max = torch.zeros(width, device=dev)
        self.count = torch.zeros((), dtype=torch.int64, device=dev)
        self.sum = torch.zeros((), dtype=torch.float64, device=dev)
        self.sumsq = torch.zeros((), dtype=torch.float64, device=dev)
        self.hist = torch.zeros(HIST_BINS, dtype=torch.int64, device=dev)
        self.nonfinite_tokens = torch.zeros((), dtype=torch.int64, device=dev)
        self.massive_tokens = torch.zeros((), dtype=torch.int64, device=dev)
        self.massive_ratio = torch.zeros((), device=dev)
        self.sample_max = torch.zeros(num_samples, device=dev)
        self.topk_key = torch.full((top_k,), -1, dtype=torch.int64, device=dev)
        self.topk_value = torch.zeros(top_k, device=dev)
        self.topk_channel = torch.zeros(top_k, dtype=torch.int64, device=dev)
        self.topk_token_id = torch.zeros(top_k, dtype=torch.int64, device=dev)

    # -- update ------------------------------------------------------------------------------------
    def update(self, x: torch.Tensor, ctx: BatchContext) -> None:
        """Fold a [B, T, H] activation into the statistics: no host synchronisation, no Python loops."""
        if x.device != self.max.device:
            x = x.to(self.max.device)
        if ctx.mask.device != x.device:
            ctx = ctx.on(x.device)
        mask = ctx.mask
        scan = _compiled_scan if _COMPILE["on"] and x.is_cuda else dense_scan
        tok_max, tok_min, tok_abs, tok_signed, tok_channel, valid, tok_sum, tok_sq, channel_max, keys, median = scan(
            x, mask, self.massive
        )
        self.nonfinite_tokens += (mask & ~valid).sum()
        torch.maximum(self.max, torch.where(valid, tok_max, -torch.inf).amax(), out=self.max)
        torch.minimum(self.min, torch.where(valid, tok_min, torch.inf).amin(), out=self.min)
        abs_valid = torch.where(valid, tok_abs, 0.0)
        self.sample_max.scatter_reduce_(0, ctx.sample_index, abs_valid.amax(dim=1), reduce="amax")
        self._update_topk(abs_valid, tok_signed, tok_channel, valid, ctx)
        torch.maximum(self.channel_max, channel_max, out=self.channel_max)
        self.sum += torch.where(valid, tok_sum, 0.0).sum(dtype=torch.float64)
        self.sumsq += torch.where(valid, tok_sq, 0.0).sum(dtype=torch.float64)
        self.count += valid.sum() * x.shape[-1]
        hist = torch.bincount(keys.reshape(-1), minlength=HIST_BINS)
        hist[_PAD_KEY] -= (mask.numel() - mask.sum()) * x.shape[-1]
        self.hist += hist
        if median is not None:
            ratio = tok_abs / median.clamp_min(torch.finfo(torch.float32).tiny)
            hit = valid & (tok_abs > MASSIVE_ABS) & (ratio > MASSIVE_RATIO)
            self.massive_tokens += hit.sum()
            torch.maximum(self.massive_ratio, torch.where(valid, ratio, 0.0).amax(), out=self.massive_ratio)

    def _update_topk(self, abs_valid: torch.Tensor, signed: torch.Tensor, channel: torch.Tensor,
                     valid: torch.Tensor, ctx: BatchContext) -> None:
        bits = abs_valid.contiguous().view(torch.int32).to(torch.int64)
        key = torch.where(valid, (bits << 32) | (_KEY_LOW - ctx.token_index), -1).reshape(-1)
        k = min(self.top_k, key.numel())
        top_key, idx = key.topk(k)
        cand_key = torch.cat([self.topk_key, top_key])
        cand_value = torch.cat([self.topk_value, signed.reshape(-1)[idx]])
        cand_channel = torch.cat([self.topk_channel, channel.reshape(-1)[idx]])
        cand_token = torch.cat([self.topk_token_id, ctx.input_ids.reshape(-1)[idx]])
        self._select_topk(cand_key, cand_value, cand_channel, cand_token)

    def _select_topk(self, key: torch.Tensor, value: torch.Tensor, channel: torch.Tensor,
                     token: torch.Tensor) -> None:
        self.topk_key, idx = key.topk(self.top_k)
        self.topk_value = value[idx]
        self.topk_channel = channel[idx]
        self.topk_token_id = token[idx]

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
                     "massive_tokens", "massive_ratio", "sample_max"):
            setattr(out, name, state[name])
        out._select_topk(
            torch.cat([self.topk_key, other.topk_key.to(self.max.device)]),
            torch.cat([self.topk_value, other.topk_value.to(self.max.device)]),
            torch.cat([self.topk_channel, other.topk_channel.to(self.max.device)]),
            torch.cat([self.topk_token_id, other.topk_token_id.to(self.max.device)]),
        )
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every field, for checkpoints and collectives."""
        return {name: getattr(self, name) for name in self.MERGE_OPS}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Replace every field (tensors are moved to this accumulator's device)."""
        for name in self.MERGE_OPS:
            setattr(self, name, state[name].to(self.max.device))
