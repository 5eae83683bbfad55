"""Fused kernels for `SiteStats.update`: every statistic of one activation in one or two launches.

`dense_scan` + `torch.bincount` in `stats.py` are the reference; these kernels give the same
numbers (bit for bit, except the float sums, whose order of addition differs) without writing
anything per element:

1. A scan, one of two:
   - `maxact_scan_bf16` (CUDA C++, compiled at run time by NVRTC through torch; bf16 rows 16-byte
     aligned, width divisible by 8): one read of the tensor. A group of threads holds a row in
     registers; two reductions give its extremes, moments, validity, the first channel of its
     extreme and (massive sites) the channels below |a|max/1000. The |a| histogram is counted in
     shared memory, the column maxima stay in registers over all the rows a block takes, and both
     reach memory once per block (the histogram straight into the int64 counts). Padding rows are
     not read.
   - `_scan_kernel` (Triton; other dtypes and widths, and Triton's CPU interpreter in the tests):
     one program per block of rows reads it twice (the second pass from L2, once validity and
     extremes are known); column maxima by atomics per block of rows; the histogram by atomics into
     private copies, or by the CUDA `maxact_abs_hist_bf16` kernel for bf16.
   Both write, per row, the extremes, moments, flags, first extreme channel and top-K key (|a| bits
   high, complement of the token's run index low; -1 where the row is not valid), and per block
   partial sums and counts; the sample maxima take an atomic max per row.
2. `_fold_kernel` (Triton): after the Triton scan, the first programs add the private histograms
   into the int64 counts and zero them; the others each take 1,024 rows and stage the largest keys
   that beat the stored K-th entry, and the last of them to finish (a ticket counter) folds the
   partials into the scalar statistics in a fixed order (so sums are deterministic), merges the
   staged keys and merges them into the top-K in place. The CUDA scan does this work itself where
   the top-K is at most 16 (`scan_folds`): each row whose key beats the stored K-th is staged as
   it is scanned, and the scan's last block to finish adds the partials in a fixed order and
   merges the staged rows, one warp-wide bitonic merge of 32 at a time, into the top-K.

Nothing synchronises with the host. Triton is optional: `available()` says whether the kernels can
run on a tensor (Triton installed and the tensor on CUDA, or Triton's interpreter switched on with
TRITON_INTERPRET=1 before Triton is imported, which runs them on CPU tensors for tests). Only
long-standing Triton features are used (masked loads and stores, reductions, atomics, while
loops), so that the Triton bundled with older PyTorch builds them too. MAXACT_CARD_CUDA_SCAN=0 and
MAXACT_CARD_CUDA_HIST=0 turn the CUDA kernels off; MAXACT_CARD_SCAN_FOLD=0 keeps the Triton fold after
the CUDA scan.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from maxact_card.measure.stats import (
    _KEY_OFFSET,
    HIST_BINS,
    HIST_NONFINITE,
    HIST_OVERFLOW,
    MASSIVE_ABS,
    MASSIVE_RATIO,
    abs_hist_counts,
)
from maxact_card.switches import switched_off

if TYPE_CHECKING:
    from maxact_card.measure.stats import SiteStats

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = None
    tl = None

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
"""Whether the kernels run on Triton's CPU interpreter (fixed when this module is imported)."""

# A private histogram: HIST_BINS counters, padding to a multiple of 8, then 32 spare counters that
# take the atomic add of every element that counts nowhere (padding, zeros, past the last channel),
# one per lane of a warp so that they land in one cache line: an unconditional atomic add is cheaper
# than a branch around each one. Spare counters are zeroed by the fold and never read.
HIST_SPARE = 4104
HIST_STRIDE = HIST_SPARE + 32
_FINE_BIAS = _KEY_OFFSET - 1  # key = (bf16 |a| bits >> 1) - _FINE_BIAS, clamped, as `abs_hist_keys`
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def available(x: torch.Tensor) -> bool:
    """Whether the fused kernels can fold `x` (Triton importable, and `x` on CUDA or the interpreter on)."""
    if triton is None or x.dtype not in _DTYPES:
        return False
    return INTERPRET or x.is_cuda


@dataclass(frozen=True)
class ScanConfig:
    """Block shape of the scan kernel: rows per program, channels per step, warps per program."""

    block_n: int
    block_h: int
    num_warps: int


def _pow2_floor(n: int) -> int:
    return 1 << (max(n, 1).bit_length() - 1)


def scan_config(width: int, itemsize: int) -> ScanConfig:
    """The default block shape for rows of `width` elements.

    Tiles of 4,096 elements (32 per thread with 4 warps, so the four running per-row statistics stay
    in registers): steps of up to 1,024 channels, and as many rows per program as fill the tile (at
    most 16). The fastest shape of `bench/bench_stats.py --sweep` on an H100 for [16384, 4096]
    (4 rows x 1,024: 0.61 ms against 1.15 ms for 4 x 512 with 8 warps) and within 1% of the fastest
    for [16384, 12288].
    """
    block_h = max(16, min(1024, 1 << max(width - 1, 0).bit_length()))
    block_n = max(1, min(16, 4096 // block_h))
    num_warps = 4 if block_n * block_h >= 2048 else 2
    return ScanConfig(block_n, block_h, num_warps)


# --- the kernels ------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _load_tile(x_ptr, offsets, ok, IS_BF16: tl.constexpr, EVICT: tl.constexpr):  # type: ignore[no-untyped-def]
        """x as float32; bf16 arrives as its int16 bits (widened by hand: exact everywhere, subnormals too)."""
        if IS_BF16:
            raw = tl.load(x_ptr + offsets, mask=ok, other=0, eviction_policy=EVICT)
            v = (raw.to(tl.int32) << 16).to(tl.float32, bitcast=True)
        else:
            v = tl.load(x_ptr + offsets, mask=ok, other=0.0, eviction_policy=EVICT).to(tl.float32)
        return v

    # Sizes that change from batch to batch are not specialised on (a value divisible by 16, or
    # equal to 1, would otherwise compile a variant of its own); the row stride and the width are,
    # since they decide whether loads are vectorised.
    @triton.jit(do_not_specialize=["n_rows", "tokens_per_row", "hist_copies", "n_parts"])
    def _scan_kernel(  # type: ignore[no-untyped-def]
        x_ptr, row_stride, n_rows, width, tokens_per_row,
        mask_ptr, token_ptr, sample_ptr,
        channel_max_ptr, sample_max_ptr, hist_ptr, hist_copies,
        row_f_ptr, row_i_ptr, row_key_ptr, part_f_ptr, part_i_ptr, n_parts,
        FINE_BIAS: tl.constexpr, OVERFLOW: tl.constexpr, NONFINITE: tl.constexpr,
        HIST_STRIDE: tl.constexpr, HIST_SPARE: tl.constexpr, MASSIVE_ABS: tl.constexpr, MASSIVE_RATIO: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, MASSIVE: tl.constexpr, IS_BF16: tl.constexpr,
        HIST: tl.constexpr,
    ):
        pid = tl.program_id(0)
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < n_rows
        in_mask = (tl.load(mask_ptr + rows, mask=row_ok, other=0) != 0) & row_ok
        row_off = rows.to(tl.int64)[:, None] * row_stride
        lanes = tl.arange(0, BLOCK_H)

        # pass 1: per-row extremes and moments, running per lane and reduced once at the end. NaN
        # propagates through the lane extremes, so a lane holding inf or NaN shows it at the end:
        # a row is valid when its max and min are finite, as in dense_scan.
        hi = tl.full([BLOCK_N, BLOCK_H], float("-inf"), tl.float32)
        lo = tl.full([BLOCK_N, BLOCK_H], float("inf"), tl.float32)
        total = tl.zeros([BLOCK_N, BLOCK_H], tl.float32)
        total_sq = tl.zeros([BLOCK_N, BLOCK_H], tl.float32)
        for start in range(0, width, BLOCK_H):
            cols = start + lanes
            col_ok = cols < width
            ok = row_ok[:, None] & col_ok[None, :]
            v = _load_tile(x_ptr, row_off + cols[None, :], ok, IS_BF16, "evict_last")
            hi = tl.maximum(hi, tl.where(col_ok[None, :], v, float("-inf")), propagate_nan=tl.PropagateNan.ALL)
            lo = tl.minimum(lo, tl.where(col_ok[None, :], v, float("inf")), propagate_nan=tl.PropagateNan.ALL)
            total += v
            total_sq += v * v
        # `hi < inf` is false for inf and NaN; a lane that saw no channel keeps -inf / +inf
        lane_bad = ~(hi < float("inf")) | ~(lo > float("-inf"))
        valid = in_mask & (tl.max(lane_bad.to(tl.int32), axis=1) == 0)
        tok_max = tl.max(hi, axis=1)
        tok_min = tl.min(lo, axis=1)
        tok_sum = tl.sum(total, axis=1)
        tok_sq = tl.sum(total_sq, axis=1)
        positive = tok_max >= -tok_min
        tok_abs = tl.abs(tl.where(positive, tok_max, -tok_min))  # +0, not -0, for a row of -0
        abs_bits = tok_abs.to(tl.int32, bitcast=True)
        # the fp32 quotient, correctly rounded: a float64 quotient rounded again to fp32 is exact
        # (53 >= 2 * 24 + 2 bits), where a plain fp32 `/` may be compiled to an approximate divide.
        # Its bits, as |a| < threshold is compared on bits in pass 2.
        threshold = (tok_abs.to(tl.float64) / MASSIVE_RATIO).to(tl.float32).to(tl.int32, bitcast=True)

        # pass 2, on the bits of |a| (non-negative floats order as ints): column maxima over valid
        # rows, the histogram over masked rows, the massive test
        under = tl.zeros([BLOCK_N, BLOCK_H], tl.int32)
        below = tl.zeros([BLOCK_N, BLOCK_H], tl.int32)
        # the first channel holding the row's signed extreme (the one the top-K reports)
        extreme = tl.where(positive, tok_max, tok_min)
        first = tl.full([BLOCK_N, BLOCK_H], 2147483647, tl.int32)
        hist_row = hist_ptr + (pid % hist_copies) * HIST_STRIDE
        for start in range(0, width, BLOCK_H):
            cols = start + lanes
            col_ok = cols < width
            ok = row_ok[:, None] & col_ok[None, :]
            offsets = row_off + cols[None, :]
            if IS_BF16:
                raw = tl.load(x_ptr + offsets, mask=ok, other=0, eviction_policy="evict_first").to(tl.int32)
                v = (raw << 16).to(tl.float32, bitcast=True)
                half = raw & 0x7FFF
                bits = half << 16
                bf = half
            else:
                v = tl.load(x_ptr + offsets, mask=ok, other=0.0, eviction_policy="evict_first").to(tl.float32)
                bits = v.to(tl.int32, bitcast=True) & 0x7FFFFFFF
                # to bf16, to nearest even; inf/NaN are sorted out below
                bf = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            first = tl.minimum(first, tl.where(ok & (v == extreme[:, None]), cols[None, :], 2147483647))
            # the block's column maxima, then one atomic per column that beats the stored value:
            # the stored maxima only grow, so a stale read costs an extra atomic, never a loss
            block_max = tl.max(tl.where(valid[:, None], bits, 0), axis=0)
            current = tl.load(channel_max_ptr + cols, mask=col_ok, other=0)
            tl.atomic_max(channel_max_ptr + cols, block_max, mask=col_ok & (block_max > current), sem="relaxed")
            if HIST:
                # the key of `abs_hist_keys`: exponent and top mantissa bits of the bf16 |a|, clamped;
                # inf/NaN, and finite values that round to inf in bf16, are NONFINITE
                fine = tl.minimum(tl.maximum((bf >> 1) - FINE_BIAS, 0), OVERFLOW)
                key = tl.where((bits >= 0x7F800000) | (bf >= 0x7F80), NONFINITE, fine)
                counted = in_mask[:, None] & ok
                # zeros (and anything below the range) are common: counted here, not by atomics
                under += (counted & (key == 0)).to(tl.int32)
                spare = HIST_SPARE + (cols % 32)[None, :]
                tl.atomic_add(hist_row + tl.where(counted & (key != 0), key, spare), 1, sem="relaxed")
            if MASSIVE:
                below += ((bits < threshold[:, None]) & ok).to(tl.int32)
        if HIST:
            tl.atomic_add(hist_row, tl.sum(tl.sum(under, axis=1), axis=0), sem="relaxed")

        # per row: what the top-K and the tests read
        n = n_rows
        tl.store(row_f_ptr + rows, tok_max, mask=row_ok)
        tl.store(row_f_ptr + n + rows, tok_min, mask=row_ok)
        tl.store(row_f_ptr + 2 * n + rows, tok_sum, mask=row_ok)
        tl.store(row_f_ptr + 3 * n + rows, tok_sq, mask=row_ok)
        n_below = tl.sum(below, axis=1)
        tl.store(row_i_ptr + rows, valid.to(tl.int32), mask=row_ok)
        tl.store(row_i_ptr + n + rows, n_below, mask=row_ok)
        tl.store(row_i_ptr + 2 * n + rows, tl.min(first, axis=1), mask=row_ok)
        massive_hit = valid & (tok_abs > MASSIVE_ABS) & (n_below >= (width - 1) // 2 + 1)

        # the top-K key: |a| bits high, complement of the run index low; -1 for rows that are not valid
        token = tl.load(token_ptr + rows, mask=row_ok, other=0)
        key = (abs_bits.to(tl.int64) << 32) | (4294967295 - token)
        tl.store(row_key_ptr + rows, tl.where(valid, key, -1), mask=row_ok)
        sample = tl.load(sample_ptr + rows // tokens_per_row, mask=valid, other=0)
        tl.atomic_max(sample_max_ptr + sample, abs_bits, mask=valid, sem="relaxed")

        # per program: partial scalars, folded in a fixed order by _fold_kernel
        tl.store(part_f_ptr + pid, tl.sum(tl.where(valid, tok_sum, 0.0).to(tl.float64), axis=0))
        tl.store(part_f_ptr + n_parts + pid, tl.sum(tl.where(valid, tok_sq, 0.0).to(tl.float64), axis=0))
        tl.store(part_f_ptr + 2 * n_parts + pid, tl.max(tl.where(valid, tok_max, float("-inf")), axis=0))
        tl.store(part_f_ptr + 3 * n_parts + pid, tl.min(tl.where(valid, tok_min, float("inf")), axis=0))
        tl.store(part_i_ptr + pid, tl.sum(valid.to(tl.int32), axis=0))
        tl.store(part_i_ptr + n_parts + pid, tl.sum((in_mask & ~valid).to(tl.int32), axis=0))
        tl.store(part_i_ptr + 2 * n_parts + pid, tl.sum(massive_hit.to(tl.int32), axis=0))

    @triton.jit
    def _take_largest(keys, rows, lanes, picked, picked_row, slot, top_k):  # type: ignore[no-untyped-def]
        """Merge the largest of `keys` (with their `rows`) into the unsorted list `picked` of `top_k`.

        Keys are unique where >= 0 and -1 where empty; a key enters while it beats the smallest held
        entry, largest first, so at most top_k + 1 reductions of each kind run.
        """
        held = tl.where(slot < top_k, picked, 9223372036854775807)
        low, low_at = tl.min(held, axis=0, return_indices=True)
        best, best_at = tl.max(keys, axis=0, return_indices=True)
        while best > low:
            here = slot == low_at
            picked = tl.where(here, best, picked)
            picked_row = tl.where(here, tl.sum(tl.where(lanes == best_at, rows, 0), axis=0), picked_row)
            keys = tl.where(lanes == best_at, -1, keys)
            held = tl.where(slot < top_k, picked, 9223372036854775807)
            low, low_at = tl.min(held, axis=0, return_indices=True)
            best, best_at = tl.max(keys, axis=0, return_indices=True)
        return picked, picked_row

    # Nothing is specialised on an argument's value or alignment (the fields of a SiteStats are views
    # at any offset), so one compiled kernel serves every call with the same constants: `_fold`
    # launches it again without Triton's binding of 30 arguments (see there).
    @triton.jit(do_not_specialize=["hist_copies", "hist_programs", "n_parts", "width", "n_rows", "top_k"],
                do_not_specialize_on_alignment=[
                    "hist_ptr", "counts_ptr", "ticket_ptr", "part_f_ptr", "part_i_ptr", "max_ptr", "min_ptr",
                    "count_ptr", "sum_ptr", "sumsq_ptr", "nonfinite_ptr", "massive_ptr", "row_f_ptr", "row_i_ptr",
                    "row_key_ptr", "stage_key_ptr", "stage_row_ptr", "ids_ptr", "topk_key_ptr", "topk_value_ptr",
                    "topk_channel_ptr", "topk_token_ptr", "topk_median_ptr", "source_ptr"])
    def _fold_kernel(  # type: ignore[no-untyped-def]
        hist_ptr, hist_copies, hist_programs, counts_ptr, ticket_ptr,
        part_f_ptr, part_i_ptr, n_parts, width,
        max_ptr, min_ptr, count_ptr, sum_ptr, sumsq_ptr, nonfinite_ptr, massive_ptr,
        row_f_ptr, row_i_ptr, row_key_ptr, stage_key_ptr, stage_row_ptr, ids_ptr, n_rows,
        topk_key_ptr, topk_value_ptr, topk_channel_ptr, topk_token_ptr, topk_median_ptr, top_k, source_ptr,
        N_BINS: tl.constexpr, HIST_STRIDE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_B: tl.constexpr,
        BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        pid = tl.program_id(0)
        if pid < hist_programs:
            # the private histograms into the counts, then back to zero (spare counters too)
            bins = pid * BLOCK_B + tl.arange(0, BLOCK_B)
            bin_ok = bins < N_BINS
            acc = tl.zeros([BLOCK_B], tl.int64)
            for c0 in range(0, hist_copies, BLOCK_C):
                copies = c0 + tl.arange(0, BLOCK_C)
                at = hist_ptr + copies[:, None] * HIST_STRIDE + bins[None, :]
                ok = (copies < hist_copies)[:, None] & (bins < HIST_STRIDE)[None, :]
                part = tl.load(at, mask=ok & bin_ok[None, :], other=0)
                acc += tl.sum(part.to(tl.int64), axis=0)
                tl.store(at, tl.zeros([BLOCK_C, BLOCK_B], tl.int32), mask=ok)
            old = tl.load(counts_ptr + bins, mask=bin_ok, other=0)
            tl.store(counts_ptr + bins, old + acc, mask=bin_ok)
        else:
            # top-K, in parallel: each program keeps the largest keys of its block of rows that beat
            # the stored K-th entry, and stages them; the last program to finish merges the stages
            block = pid - hist_programs
            n_blocks = tl.num_programs(0) - hist_programs
            slot = tl.arange(0, BLOCK_K)
            lanes = tl.arange(0, BLOCK_R)
            r = block * BLOCK_R + lanes
            keys = tl.load(row_key_ptr + r, mask=r < n_rows, other=-1)
            keys = tl.where(keys > tl.load(topk_key_ptr + top_k - 1), keys, -1)
            picked, picked_row = _take_largest(keys, r, lanes, tl.full([BLOCK_K], -1, tl.int64),
                                               tl.zeros([BLOCK_K], tl.int32), slot, top_k)
            tl.store(stage_key_ptr + block * BLOCK_K + slot, picked)
            tl.store(stage_row_ptr + block * BLOCK_K + slot, picked_row)
            tl.debug_barrier()  # every thread's stores are issued before the ticket is taken
            ticket = tl.atomic_add(ticket_ptr, 1, sem="acq_rel")
            if ticket == n_blocks - 1:
                tl.store(ticket_ptr, 0)  # for the next update
                # scalars: the per-program partials of the scan in a fixed order
                p_lanes = tl.arange(0, BLOCK_P)
                s = tl.zeros([BLOCK_P], tl.float64)
                sq = tl.zeros([BLOCK_P], tl.float64)
                hi = tl.full([BLOCK_P], float("-inf"), tl.float32)
                lo = tl.full([BLOCK_P], float("inf"), tl.float32)
                n_valid = tl.zeros([BLOCK_P], tl.int64)
                n_bad = tl.zeros([BLOCK_P], tl.int64)
                n_massive = tl.zeros([BLOCK_P], tl.int64)
                for p0 in range(0, n_parts, BLOCK_P):
                    p = p0 + p_lanes
                    ok = p < n_parts
                    s += tl.load(part_f_ptr + p, mask=ok, other=0.0)
                    sq += tl.load(part_f_ptr + n_parts + p, mask=ok, other=0.0)
                    hi = tl.maximum(hi, tl.load(part_f_ptr + 2 * n_parts + p, mask=ok, other=float("-inf")).to(tl.float32))
                    lo = tl.minimum(lo, tl.load(part_f_ptr + 3 * n_parts + p, mask=ok, other=float("inf")).to(tl.float32))
                    n_valid += tl.load(part_i_ptr + p, mask=ok, other=0).to(tl.int64)
                    n_bad += tl.load(part_i_ptr + n_parts + p, mask=ok, other=0).to(tl.int64)
                    n_massive += tl.load(part_i_ptr + 2 * n_parts + p, mask=ok, other=0).to(tl.int64)
                tl.store(sum_ptr, tl.load(sum_ptr) + tl.sum(s, axis=0))
                tl.store(sumsq_ptr, tl.load(sumsq_ptr) + tl.sum(sq, axis=0))
                tl.store(max_ptr, tl.maximum(tl.load(max_ptr), tl.max(hi, axis=0)))
                tl.store(min_ptr, tl.minimum(tl.load(min_ptr), tl.min(lo, axis=0)))
                tl.store(count_ptr, tl.load(count_ptr) + tl.sum(n_valid, axis=0) * width)
                tl.store(nonfinite_ptr, tl.load(nonfinite_ptr) + tl.sum(n_bad, axis=0))
                tl.store(massive_ptr, tl.load(massive_ptr) + tl.sum(n_massive, axis=0))

                # the staged keys of every block (volatile: other programs of this launch wrote them)
                picked = tl.full([BLOCK_K], -1, tl.int64)
                picked_row = tl.zeros([BLOCK_K], tl.int32)
                for s0 in range(0, n_blocks * BLOCK_K, BLOCK_R):
                    at = s0 + lanes
                    ok = at < n_blocks * BLOCK_K
                    keys = tl.load(stage_key_ptr + at, mask=ok, other=-1, volatile=True)
                    rows = tl.load(stage_row_ptr + at, mask=ok, other=0, volatile=True)
                    picked, picked_row = _take_largest(keys, rows, lanes, picked, picked_row, slot, top_k)

                # merge with the stored top-K (sorted, descending): every entry's rank in the union
                # (>= for the new ones: were a key ever in both, the stored one would rank first)
                new = picked >= 0
                row = picked_row
                t_max = tl.load(row_f_ptr + row, mask=new, other=0.0)
                t_min = tl.load(row_f_ptr + n_rows + row, mask=new, other=0.0)
                value = tl.where(t_max >= -t_min, t_max, t_min)
                channel = tl.load(row_i_ptr + 2 * n_rows + row, mask=new, other=0)
                token_id = tl.load(ids_ptr + row, mask=new, other=0)
                in_k = slot < top_k
                old_key = tl.load(topk_key_ptr + slot, mask=in_k, other=-1)
                old_value = tl.load(topk_value_ptr + slot, mask=in_k, other=0.0)
                old_channel = tl.load(topk_channel_ptr + slot, mask=in_k, other=0)
                old_token = tl.load(topk_token_ptr + slot, mask=in_k, other=0)
                old_median = tl.load(topk_median_ptr + slot, mask=in_k, other=0.0)
                rank_old = slot + tl.sum((new[None, :] & (picked[None, :] > old_key[:, None])).to(tl.int32), axis=1)
                rank_new = (tl.sum((new[None, :] & (picked[None, :] > picked[:, None])).to(tl.int32), axis=1)
                            + tl.sum((in_k[None, :] & (old_key[None, :] >= picked[:, None])).to(tl.int32), axis=1))
                tl.debug_barrier()  # every thread has read the old top-K before any writes it
                keep_old = in_k & (rank_old < top_k)
                tl.store(topk_key_ptr + rank_old, old_key, mask=keep_old)
                tl.store(topk_value_ptr + rank_old, old_value, mask=keep_old)
                tl.store(topk_channel_ptr + rank_old, old_channel, mask=keep_old)
                tl.store(topk_token_ptr + rank_old, old_token, mask=keep_old)
                tl.store(topk_median_ptr + rank_old, old_median, mask=keep_old)
                tl.store(source_ptr + rank_old, tl.full([BLOCK_K], -1, tl.int64), mask=keep_old)
                keep_new = new & (rank_new < top_k)
                tl.store(topk_key_ptr + rank_new, picked, mask=keep_new)
                tl.store(topk_value_ptr + rank_new, value, mask=keep_new)
                tl.store(topk_channel_ptr + rank_new, channel.to(tl.int64), mask=keep_new)
                tl.store(topk_token_ptr + rank_new, token_id, mask=keep_new)
                tl.store(topk_median_ptr + rank_new, tl.zeros([BLOCK_K], tl.float32), mask=keep_new)
                tl.store(source_ptr + rank_new, row.to(tl.int64), mask=keep_new)


# --- the |a| histogram of bf16 activations, in CUDA C++ -------------------------------------------
# Global atomics, one per element, are what the Triton scan spends most of its time on. A block-private
# histogram in shared memory (4,099 x 4 bytes) takes those adds at shared-memory speed and is flushed
# with one global add per non-empty bin. Measured on an H100 for [16384, 4096] bf16 (bench/bench_stats.py):
# 0.054 ms, about one read of the tensor; combining equal keys of a warp first (__match_any_sync) was ten
# times slower, and two copies per block gained nothing. Triton (3.6) has no shared-memory atomics, so
# this kernel is CUDA C++ compiled at run time by NVRTC through torch; where that is not possible the
# Triton scan counts the histogram itself.
# The histogram key of `abs_hist_keys` from the 15 magnitude bits of a bf16, for both CUDA sources.
_CUDA_KEY_SOURCE = f"""
#define NBINS {HIST_BINS}
#define FINE_BIAS {_FINE_BIAS}
#define OVERFLOW {HIST_OVERFLOW}
#define NONFINITE {HIST_NONFINITE}

__device__ __forceinline__ unsigned maxact_key(unsigned a) {{
    if (a >= 0x7F80u) return NONFINITE;
    int fine = (int)(a >> 1) - FINE_BIAS;
    return (unsigned)(fine < 0 ? 0 : (fine > OVERFLOW ? OVERFLOW : fine));
}}
"""
_HIST_CUDA_SOURCE = r"""
#define SPARE NBINS

__device__ __forceinline__ void maxact_add(unsigned* h, unsigned key) {
    atomicAdd(&h[key], 1u);
}

// rows [blockIdx.x, n_rows) step gridDim.x; row r counts when mask[r]; x holds bf16 bits.
// vec: rows are 16-byte aligned with a width divisible by 8 (one uint4 load per 8 elements).
extern "C" __global__ void maxact_abs_hist_bf16(const unsigned short* __restrict__ x, int row_stride,
                                                 int n_rows, int width, const unsigned char* __restrict__ mask,
                                                 unsigned long long* __restrict__ counts, int vec) {
    __shared__ unsigned h[NBINS + 1];
    for (int i = threadIdx.x; i <= NBINS; i += blockDim.x) h[i] = 0u;
    __syncthreads();
    for (int row = blockIdx.x; row < n_rows; row += gridDim.x) {
        if (!mask[row]) continue;  // the same for every thread of the block
        const unsigned short* r = x + (long long)row * row_stride;
        if (vec) {
            const uint4* r4 = reinterpret_cast<const uint4*>(r);
            int n4 = width >> 3;
            int steps = (n4 + blockDim.x - 1) / blockDim.x;  // every lane of a warp iterates alike
            for (int s = 0; s < steps; ++s) {
                int c = s * blockDim.x + threadIdx.x;
                uint4 v = c < n4 ? __ldcs(r4 + c) : make_uint4(0, 0, 0, 0);
                unsigned w[4] = {v.x, v.y, v.z, v.w};
                #pragma unroll
                for (int j = 0; j < 4; ++j) {
                    maxact_add(h, c < n4 ? maxact_key(w[j] & 0x7FFFu) : SPARE);
                    maxact_add(h, c < n4 ? maxact_key((w[j] >> 16) & 0x7FFFu) : SPARE);
                }
            }
        } else {
            int steps = (width + blockDim.x - 1) / blockDim.x;
            for (int s = 0; s < steps; ++s) {
                int c = s * blockDim.x + threadIdx.x;
                maxact_add(h, c < width ? maxact_key(r[c] & 0x7FFFu) : SPARE);
            }
        }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < NBINS; i += blockDim.x) {
        unsigned v = h[i];
        if (v) atomicAdd(counts + i, (unsigned long long)v);
    }
}
"""
_HIST_BLOCK = 512
_cuda_hist: dict[str, Any] = {"kernels": {}, "failed": False}


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _compile(index: int, source: str, name: str) -> Any:
    """NVRTC-compile `source` (after the shared key prelude) and load kernel `name` on CUDA device `index`."""
    with torch.cuda.device(index):
        return torch.cuda._compile_kernel(_CUDA_KEY_SOURCE + source, name)


def _built(table: dict[str, Any], key: Any, build: Callable[[], Any]) -> Any:
    """`table`'s entry for `key`, built on first use; None once any build has failed (no NVRTC, an old
    torch), which leaves the work to the Triton kernels for the rest of the process."""
    if table["failed"]:
        return None
    entry = table["kernels"].get(key)
    if entry is None:
        try:
            entry = build()
        except Exception:  # noqa: BLE001 - see the docstring
            table["failed"] = True
            return None
        table["kernels"][key] = entry
    return entry


def _cuda_hist_kernel(device: torch.device) -> Any:
    """The NVRTC histogram kernel loaded on `device` (a CUDA module belongs to one device's context),
    or None where it cannot be built (then Triton counts)."""
    if switched_off("MAXACT_CARD_CUDA_HIST"):
        return None
    index = _device_index(device)
    return _built(_cuda_hist, index, lambda: _compile(index, _HIST_CUDA_SOURCE, "maxact_abs_hist_bf16"))


def cuda_histogram_ready(x2: torch.Tensor) -> bool:
    """Whether `cuda_abs_histogram` can count these rows (bf16 on CUDA, the kernel built)."""
    if x2.dtype != torch.bfloat16 or not x2.is_cuda or INTERPRET or x2.stride(-1) != 1:
        return False
    return _cuda_hist_kernel(x2.device) is not None


def cuda_abs_histogram(x2: torch.Tensor, mask: torch.Tensor, counts: torch.Tensor) -> None:
    """Add the |a| histogram of bf16 rows `x2` [N, H] under `mask` [N] into int64 `counts`.

    If the launch fails, this batch is counted by torch instead (and later ones by the Triton
    scan), so a histogram is never left short.
    """
    try:
        _launch_cuda_hist(x2, mask, counts)
    except Exception:  # noqa: BLE001 - see the docstring
        _cuda_hist["failed"] = True
        counts += abs_hist_counts(x2, mask)


_sm_count: dict[int, int] = {}
_driver: dict[str, Any] = {}


def _cu_launch(func: Any, grid: int, block: int, stream: int, values: tuple[Any, ...]) -> None:
    """cuLaunchKernel on a 1-D grid with the ctypes `values` as arguments. The driver library and its
    function are looked up once: torch's helper opens the library anew on every call, which costs more
    host time than the launch."""
    launch = _driver.get("launch")
    if launch is None:
        launch = torch.cuda._utils._get_gpu_runtime_library().cuLaunchKernel
        launch.argtypes = [ctypes.c_void_p] + [ctypes.c_uint] * 6 + [ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p,
                                                                      ctypes.c_void_p]
        launch.restype = ctypes.c_int
        _driver["launch"] = launch
    params = (ctypes.c_void_p * len(values))(*(ctypes.addressof(v) for v in values))
    status = launch(func, grid, 1, 1, block, 1, 1, 0, stream, params, None)
    if status != 0:
        raise RuntimeError(f"cuLaunchKernel returned {status}")


def _launch_cuda_hist(x2: torch.Tensor, mask: torch.Tensor, counts: torch.Tensor) -> None:
    """One launch of the histogram kernel through the driver, on the current stream of x2's device.

    torch's own launcher for these kernels builds its argument array anew on every call (about
    0.15 ms of host time); with hundreds of sites per forward pass that host time, not the GPU,
    set the pace for small models. This passes the same seven arguments straight to the driver.
    """
    kernel = _cuda_hist_kernel(x2.device)
    n_rows, width = x2.shape
    vec = int(width % 8 == 0 and x2.stride(0) % 8 == 0 and x2.data_ptr() % 16 == 0)
    grid = max(1, min(n_rows, 4 * _sms(x2.device)))
    func = getattr(kernel, "func", None)
    if func is None:  # another torch: its own launcher
        kernel(grid=(grid, 1, 1), block=(_HIST_BLOCK, 1, 1),
               args=[x2.view(torch.int16), int(x2.stride(0)), int(n_rows), int(width), mask.view(torch.uint8),
                     counts, vec])
        return
    values = (ctypes.c_void_p(x2.data_ptr()), ctypes.c_int(x2.stride(0)), ctypes.c_int(n_rows), ctypes.c_int(width),
              ctypes.c_void_p(mask.data_ptr()), ctypes.c_void_p(counts.data_ptr()), ctypes.c_int(vec))
    _cu_launch(func, grid, _HIST_BLOCK, _stream_of(x2.device), values)


# --- the whole scan of bf16 activations, in CUDA C++ ----------------------------------------------
# The Triton scan reads each tile twice (the second pass needs the row's validity and extremes), loads
# the stored column maxima once per block of a few rows, and leaves the histogram to another kernel:
# about 1.7 reads of the tensor plus one more for the histogram. Here one block takes rows in turn and
# holds each row in registers (at most VEC 16-byte vectors per thread), so the tensor is read once:
# extremes, moments and validity by two block reductions; the histogram in shared memory; the column
# maxima stay in registers across all the block's rows and reach memory once per block. Padding rows
# are not read at all. The per-row and per-block outputs are those of the Triton scan, so the same
# fold follows (the histogram this kernel adds itself).
# Each element costs about 8 instructions (counted in the SASS for sm_90): two bf16 values are
# handled per 32-bit word wherever the hardware has paired instructions: extremes
# (max.NaN/min.NaN.bf16x2, which also carry an inf or NaN through to the validity test), column
# maxima (max.bf16x2 of magnitudes) and the massive count (set.lt.bf16x2 on Hopper, a compare per
# value before it). A value's histogram key is a shift, a mask and one clamp (VIADDMNMX.RELU on
# Hopper), with inf and NaN counted as overflow and moved to their own key by the rare rows that
# hold them. The first channel of a row's extreme is looked for only by the threads whose own
# extreme it is. At the end each block adds its non-empty counters straight into the int64
# histogram, so the fold has no private histograms to sum for this scan.
# The gated variant scans a SwiGLU MLP's gate and writes silu(gate) * up as it goes (up's rows are
# loaded ahead like the gate's), so the gate is read once for both: on an H100, [16384, 12288] bf16,
# 0.56 ms against 0.44 ms for the product alone and 0.22 ms for the scan alone. Folding the
# product's statistics into the same pass as well was tried: with a second site's column maxima in
# registers it ran slower than the gated kernel and a scan of the product (0.87 against 0.78 ms).
# bf16 pairs in 32-bit words, for the scan and the gated product (no % formatting here)
_BF16_CUDA_SOURCE = r"""
__device__ __forceinline__ unsigned bf2_max_nan(unsigned a, unsigned b) {
    unsigned d; asm("max.NaN.bf16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b)); return d;
}
__device__ __forceinline__ unsigned bf2_min_nan(unsigned a, unsigned b) {
    unsigned d; asm("min.NaN.bf16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b)); return d;
}
__device__ __forceinline__ unsigned bf2_max(unsigned a, unsigned b) {
    unsigned d; asm("max.bf16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b)); return d;
}
// how many of a word's two magnitudes lie below t16 (bf16 bits, the same in both halves), times 16
__device__ __forceinline__ int below16(unsigned a2, unsigned t2) {
#if __CUDA_ARCH__ >= 900
    unsigned m; asm("set.lt.u32.bf16x2 %0, %1, %2;" : "=r"(m) : "r"(a2), "r"(t2)); return __popc(m);
#else
    return (((a2 & 0xFFFFu) < (t2 & 0xFFFFu)) + ((a2 >> 16) < (t2 & 0xFFFFu))) << 4;
#endif
}
__device__ __forceinline__ float lo_of(unsigned w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float hi_of(unsigned w) { return __uint_as_float(w & 0xFFFF0000u); }
// two floats rounded to bf16 (to nearest, ties to even) in one word, lo in the low half
__device__ __forceinline__ unsigned bf2_round(float lo, float hi) {
    unsigned d; asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo)); return d;
}
// silu(g) * u for two bf16 pairs, rounded as eager torch rounds them: silu in float32 (as ATen's
// kernel writes it, x / (1 + exp(-x))) to bf16, then the product in float32 to bf16
__device__ __forceinline__ unsigned silu_mul2(unsigned g, unsigned u) {
    const float g0 = lo_of(g), g1 = hi_of(g);
    const unsigned s = bf2_round(g0 / (1.0f + expf(-g0)), g1 / (1.0f + expf(-g1)));
    return bf2_round(lo_of(s) * lo_of(u), hi_of(s) * hi_of(u));
}
__device__ __forceinline__ uint4 silu_mul8(uint4 g, uint4 u) {
    return make_uint4(silu_mul2(g.x, u.x), silu_mul2(g.y, u.y), silu_mul2(g.z, u.z), silu_mul2(g.w, u.w));
}
"""
_SILU_MUL_CUDA_SOURCE = r"""
// silu(g) * u alone, for a gated MLP none of whose sites is read: contiguous bf16, n8 vectors of 8
extern "C" __global__ void __launch_bounds__(256) maxact_silu_mul_bf16(
        const uint4* __restrict__ g, const uint4* __restrict__ u, uint4* __restrict__ out, long long n8) {
    for (long long i = blockIdx.x * 256LL + threadIdx.x; i < n8; i += gridDim.x * 256LL) {
        out[i] = silu_mul8(__ldcs(g + i), __ldcs(u + i));
    }
}
"""
_SCAN_CUDA_SOURCE = r"""
#define THREADS %(threads)d
#define ROWS %(rows)d
#define GROUP (THREADS / ROWS)
#define GROUP_WARPS (GROUP / 32)
#define VEC %(vec)d
#define MASSIVE %(massive)d
#define MASSIVE_ABS %(massive_abs)sf
#define MASSIVE_RATIO %(massive_ratio)s
// GATED: x is a SwiGLU MLP's gate; the kernel also writes silu(x) * up to out, for every row
#define GATED %(gated)d
#define TABLE ((NBINS + 3) / 4 * 4)
#define FULL 0xFFFFFFFFu
// FOLD: the last block to finish folds the update into the accumulator (top_k <= 16)
#define FOLD %(fold)d
#define WARPS (THREADS / 32)
// threads per block, and for a folding scan the blocks an SM must hold at once: as many as the scan
// without its fold holds (given for that scan, a minimum of 1 lets ptxas take more registers)
#define LAUNCH_BOUNDS %(launch_bounds)s

// count a value into its histogram key, given its magnitude bits >> 1 as a byte offset (times 4): the
// key's clamp is one instruction on Hopper (VIADDMNMX.RELU). An inf or a NaN counts as overflow here;
// the rows that hold one move it to the non-finite key afterwards.
__device__ __forceinline__ void count(unsigned* h, unsigned off) {
    off = (unsigned)max(min((int)off - 4 * FINE_BIAS, 4 * OVERFLOW), 0);
    atomicAdd(reinterpret_cast<unsigned*>(reinterpret_cast<char*>(h) + off), 1u);
}
// how many of a word's two values are inf or NaN
__device__ __forceinline__ int nonfinite2(unsigned w) {
    return ((w & 0x7FFFu) >= 0x7F80u) + ((w & 0x7FFF0000u) >= 0x7F800000u);
}

#if FOLD
// one compare-exchange of a warp-wide bitonic network on (key, row) pairs, keys unique but for -1
__device__ __forceinline__ void exchange(long long& k, int& r, int j, bool take_max) {
    const long long pk = __shfl_xor_sync(FULL, k, j);
    const int pr = __shfl_xor_sync(FULL, r, j);
    if (take_max ? pk > k : pk < k) { k = pk; r = pr; }
}
// merge the 32 pairs of the lanes (one each) into the warp's list: its 16 largest keys, lane i holding
// the i-th (-1 where fewer): the pairs sorted largest first, their 16 largest reversed into lanes
// 16..31 beside the list (a bitonic sequence), then merged
__device__ __forceinline__ void merge_into(long long& lk, int& lr, long long k, int r, int lane) {
    #pragma unroll
    for (int kk = 2; kk <= 32; kk <<= 1) {
        #pragma unroll
        for (int j = kk >> 1; j > 0; j >>= 1) exchange(k, r, j, !(lane & j) == !(lane & kk));
    }
    const long long ck = __shfl_sync(FULL, k, 31 - lane);
    const int cr = __shfl_sync(FULL, r, 31 - lane);
    if (lane >= 16) { lk = ck; lr = cr; }
    #pragma unroll
    for (int j = 16; j > 0; j >>= 1) exchange(lk, lr, j, !(lane & j));
    if (lane >= 16) lk = -1;
}
// merge pairs [0, n) of (keys, rows) into the warp's list, 32 at a time by the warps in turn from
// `first`, skipping any 32 of which none beats the list's 16th key. GLOBAL: the pairs are in global
// memory, written by other blocks (read through L2); else in shared memory.
template <bool GLOBAL>
__device__ __forceinline__ void merge_all(long long& lk, int& lr, const long long* keys, const int* rows, int n,
                                          int first, int step, int lane) {
    for (int c0 = first; c0 < n; c0 += step) {
        const int i = c0 + lane;
        const long long k = i >= n ? -1LL : GLOBAL ? __ldcg(keys + i) : keys[i];
        const int r = i >= n ? 0 : GLOBAL ? __ldcg(rows + i) : rows[i];
        if (__any_sync(FULL, k > __shfl_sync(FULL, lk, 15))) merge_into(lk, lr, k, r, lane);
    }
}
#endif

// this thread's vectors of row r of src (zeros past the last row, and where `live_row` is false)
#define LOAD_VECS(dst, src, stride, r, live_row)                                             \
    do {                                                                                     \
        const bool live = (r) < n_rows && (live_row);                                        \
        const uint4* r4 = reinterpret_cast<const uint4*>(src + (long long)(r) * (stride));   \
        _Pragma("unroll")                                                                    \
        for (int j = 0; j < VEC; ++j) {                                                      \
            const int c = j * GROUP + t;                                                     \
            dst[j] = live && c < n4 ? __ldcs(r4 + c) : make_uint4(0u, 0u, 0u, 0u);          \
        }                                                                                    \
    } while (0)
// x's row r: the statistics never read padding, so it is not loaded, except by a gated scan,
// which writes the product of padding rows too
#define LOAD_ROW(dst, r) LOAD_VECS(dst, x, row_stride, r, GATED || mask[(r) < n_rows ? (r) : 0])

// A block takes ROWS rows at a time, one per group of GROUP threads: rows [blockIdx.x * ROWS + g,
// n_rows) step gridDim.x * ROWS for group g. Rows are 16-byte aligned, their width divisible by 8.
// Partials are per group: part index blockIdx.x * ROWS + g, of gridDim.x * ROWS.
extern "C" __global__ void __launch_bounds__(LAUNCH_BOUNDS) maxact_scan_bf16(
        const unsigned short* __restrict__ x, int row_stride, int n_rows, int width, int tokens_per_row,
        const unsigned char* __restrict__ mask, const long long* __restrict__ token,
        const long long* __restrict__ sample, unsigned* __restrict__ channel_max, unsigned* __restrict__ sample_max,
        unsigned long long* __restrict__ counts, float* __restrict__ row_f, int* __restrict__ row_i,
        long long* __restrict__ row_key, double* __restrict__ part_f, int* __restrict__ part_i,
        const unsigned short* __restrict__ up, int up_stride, unsigned short* __restrict__ out, int out_stride,
        unsigned* __restrict__ counters, long long* __restrict__ stage_key, int* __restrict__ stage_row,
        const long long* __restrict__ ids, float* __restrict__ acc_max, float* __restrict__ acc_min,
        long long* __restrict__ acc_count, double* __restrict__ acc_sum, double* __restrict__ acc_sumsq,
        long long* __restrict__ acc_nonfinite, long long* __restrict__ acc_massive, long long* __restrict__ topk_key,
        float* __restrict__ topk_value, long long* __restrict__ topk_channel, long long* __restrict__ topk_token,
        float* __restrict__ topk_median, long long* __restrict__ source, int top_k) {
    __shared__ __align__(16) unsigned h[TABLE];
    __shared__ float w_hi[THREADS / 32], w_lo[THREADS / 32], w_s[THREADS / 32], w_sq[THREADS / 32];
    __shared__ int w_bad[THREADS / 32], w_first[THREADS / 32], w_below[THREADS / 32];
    const float inf = __int_as_float(0x7F800000);
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = tid / GROUP, t = tid %% GROUP, w0 = g * GROUP_WARPS;
    const int n4 = width >> 3, n_parts = gridDim.x * ROWS, step = gridDim.x * ROWS;
    for (int i = tid; i < TABLE / 4; i += THREADS) reinterpret_cast<uint4*>(h)[i] = make_uint4(0u, 0u, 0u, 0u);
    unsigned cmax[VEC * 4];  // magnitudes, two bf16 per register
    #pragma unroll
    for (int j = 0; j < VEC * 4; ++j) cmax[j] = 0u;
    double p_sum = 0.0, p_sq = 0.0;
    float p_hi = -inf, p_lo = inf;
    int p_valid = 0, p_bad = 0, p_massive = 0;
    __syncthreads();
    // the next rows of the block are loaded while these are worked on
    uint4 v[VEC], next[VEC];
    LOAD_ROW(next, blockIdx.x * ROWS + g);
#if GATED
    uint4 uv[VEC], unext[VEC];  // up's rows, loaded ahead like x's
    LOAD_VECS(unext, up, up_stride, blockIdx.x * ROWS + g, true);
#endif
    for (int base = blockIdx.x * ROWS; base < n_rows; base += step) {
        const int row = base + g;
        const bool counted = row < n_rows && mask[row];
        #pragma unroll
        for (int j = 0; j < VEC; ++j) v[j] = next[j];
        LOAD_ROW(next, row + step);
#if GATED
        #pragma unroll
        for (int j = 0; j < VEC; ++j) uv[j] = unext[j];
        LOAD_VECS(unext, up, up_stride, row + step, true);
        if (row < n_rows) {
            uint4* o4 = reinterpret_cast<uint4*>(out + (long long)row * out_stride);
            #pragma unroll
            for (int j = 0; j < VEC; ++j) {
                const int c = j * GROUP + t;
                if (c < n4) o4[c] = silu_mul8(v[j], uv[j]);
            }
        }
#endif
        bool any = false;  // the same for the whole block
        #pragma unroll
        for (int q = 0; q < ROWS; ++q) any |= base + q < n_rows && mask[base + q < n_rows ? base + q : 0];
        if (!any) {  // padding only: nothing counted
            if (t == 0 && row < n_rows) {
                for (int q = 0; q < 4; ++q) row_f[q * n_rows + row] = 0.f;
                for (int q = 0; q < 3; ++q) row_i[q * n_rows + row] = 0;
                row_key[row] = -1;
            }
            continue;
        }
        // the extremes start at the largest finite bf16, so a thread with no values marks nothing bad
        unsigned hi2 = 0xFF7FFF7Fu, lo2 = 0x7F7F7F7Fu;
        float s_even = 0.f, s_odd = 0.f, sq_even = 0.f, sq_odd = 0.f;
        #pragma unroll
        for (int j = 0; j < VEC; ++j) {
            if (counted && j * GROUP + t < n4) {
                const unsigned w[4] = {v[j].x, v[j].y, v[j].z, v[j].w};
                #pragma unroll
                for (int k = 0; k < 4; ++k) {
                    hi2 = bf2_max_nan(hi2, w[k]);
                    lo2 = bf2_min_nan(lo2, w[k]);
                    const float f0 = lo_of(w[k]), f1 = hi_of(w[k]);
                    s_even += f0; s_odd += f1;
                    sq_even = fmaf(f0, f0, sq_even); sq_odd = fmaf(f1, f1, sq_odd);
                    count(h, (w[k] << 1) & 0xFFFCu);
                    count(h, (w[k] >> 15) & 0xFFFCu);
                }
            }
        }
        unsigned bad = nonfinite2(hi2) + nonfinite2(lo2) != 0;
        const float t_hi = fmaxf(lo_of(hi2), hi_of(hi2)), t_lo = fminf(lo_of(lo2), hi_of(lo2));
        float hi = t_hi, lo = t_lo, s = s_even + s_odd, sq = sq_even + sq_odd;
        // every lane of a butterfly ends with the same value, so the order of addition is fixed
        #pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            hi = fmaxf(hi, __shfl_xor_sync(FULL, hi, o));
            lo = fminf(lo, __shfl_xor_sync(FULL, lo, o));
            s += __shfl_xor_sync(FULL, s, o);
            sq += __shfl_xor_sync(FULL, sq, o);
        }
        bad = __any_sync(FULL, bad);
        if (lane == 0) { w_hi[warp] = hi; w_lo[warp] = lo; w_s[warp] = s; w_sq[warp] = sq; w_bad[warp] = bad; }
        __syncthreads();
        hi = w_hi[w0]; lo = w_lo[w0]; s = w_s[w0]; sq = w_sq[w0]; bad = w_bad[w0];
        #pragma unroll
        for (int q = 1; q < GROUP_WARPS; ++q) {
            hi = fmaxf(hi, w_hi[w0 + q]); lo = fminf(lo, w_lo[w0 + q]); s += w_s[w0 + q]; sq += w_sq[w0 + q];
            bad |= w_bad[w0 + q];
        }
        const bool valid = counted && !bad;
        const bool positive = hi >= -lo;
        const float tabs = fabsf(positive ? hi : lo);  // +0, not -0, for a row of -0
        const float ext = positive ? hi : lo;
        int first = 0x7FFFFFFF, below = 0;
        if (valid) {
            #pragma unroll
            for (int j = 0; j < VEC; ++j) {
                if (j * GROUP + t < n4) {
                    const unsigned w[4] = {v[j].x, v[j].y, v[j].z, v[j].w};
                    #pragma unroll
                    for (int k = 0; k < 4; ++k) cmax[j * 4 + k] = bf2_max(cmax[j * 4 + k], w[k] & 0x7FFF7FFFu);
                }
            }
#if MASSIVE
            // |a| < tabs / ratio, compared as bits: a << 16 < thr for a bf16 magnitude a exactly when
            // a < ceil(thr / 65536)
            const unsigned thr = __float_as_uint((float)((double)tabs / MASSIVE_RATIO));
            const unsigned t16 = (thr + 0xFFFFu) >> 16, t2 = t16 | (t16 << 16);
            #pragma unroll
            for (int j = 0; j < VEC; ++j) {
                if (j * GROUP + t < n4) {
                    const unsigned w[4] = {v[j].x, v[j].y, v[j].z, v[j].w};
                    #pragma unroll
                    for (int k = 0; k < 4; ++k) below += below16(w[k] & 0x7FFF7FFFu, t2);
                }
            }
            below >>= 4;
#endif
        }
        if (counted && bad) {  // its inf and NaN were counted as overflow: move them
            int n = 0;
            #pragma unroll
            for (int j = 0; j < VEC; ++j) {
                if (j * GROUP + t < n4) {
                    const unsigned w[4] = {v[j].x, v[j].y, v[j].z, v[j].w};
                    #pragma unroll
                    for (int k = 0; k < 4; ++k) n += nonfinite2(w[k]);
                }
            }
            if (n) { atomicSub(&h[OVERFLOW], (unsigned)n); atomicAdd(&h[NONFINITE], (unsigned)n); }
        }
        // only a thread whose own extreme is the row's holds the row's first channel of it
        if (counted && (positive ? t_hi : t_lo) == ext) {
            #pragma unroll
            for (int j = 0; j < VEC; ++j) {
                const int c = j * GROUP + t;
                if (c < n4) {
                    const unsigned w[4] = {v[j].x, v[j].y, v[j].z, v[j].w};
                    #pragma unroll
                    for (int k = 0; k < 8; ++k) {
                        const unsigned word = w[k >> 1];
                        if (first == 0x7FFFFFFF && (k & 1 ? hi_of(word) : lo_of(word)) == ext) first = c * 8 + k;
                    }
                }
            }
        }
        #pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            first = min(first, __shfl_xor_sync(FULL, first, o));
            below += __shfl_xor_sync(FULL, below, o);
        }
        if (lane == 0) { w_first[warp] = first; w_below[warp] = below; }
        __syncthreads();
        if (t == 0 && row < n_rows) {
            for (int q = 1; q < GROUP_WARPS; ++q) { first = min(first, w_first[w0 + q]); below += w_below[w0 + q]; }
            long long key = -1;
            if (counted) {
                row_f[row] = hi; row_f[n_rows + row] = lo; row_f[2 * n_rows + row] = s; row_f[3 * n_rows + row] = sq;
                row_i[row] = valid; row_i[n_rows + row] = below; row_i[2 * n_rows + row] = first;
            } else {
                for (int q = 0; q < 4; ++q) row_f[q * n_rows + row] = 0.f;
                for (int q = 0; q < 3; ++q) row_i[q * n_rows + row] = 0;
            }
            if (valid) {
                key = ((long long)__float_as_uint(tabs) << 32) | (0xFFFFFFFFLL - token[row]);
                atomicMax(sample_max + sample[row / tokens_per_row], __float_as_uint(tabs));
                p_sum += (double)s; p_sq += (double)sq;
                p_hi = fmaxf(p_hi, hi); p_lo = fminf(p_lo, lo);
                p_valid += 1;
                p_massive += (tabs > MASSIVE_ABS) && (below >= (width - 1) / 2 + 1);
            } else if (counted) {
                p_bad += 1;
            }
            row_key[row] = key;
#if FOLD
            // staged for the top-K when its key beats the stored K-th (only the last block writes that)
            if (key > topk_key[top_k - 1]) {
                const unsigned at = atomicAdd(counters + 1, 1u);
                stage_key[at] = key; stage_row[at] = row;
            }
#endif
        }
    }
    __syncthreads();
    // the table into the int64 histogram: one add per non-empty counter
    for (int i = tid; i < TABLE / 4; i += THREADS) {
        const uint4 c4 = reinterpret_cast<const uint4*>(h)[i];
        if (c4.x | c4.y | c4.z | c4.w) {
            const unsigned c[4] = {c4.x, c4.y, c4.z, c4.w};
            #pragma unroll
            for (int q = 0; q < 4; ++q) {
                if (c[q]) atomicAdd(counts + 4 * i + q, (unsigned long long)c[q]);
            }
        }
    }
    // the column maxima, skipping the atomic where the stored value is already as large
    #pragma unroll
    for (int j = 0; j < VEC; ++j) {
        const int c = j * GROUP + t;
        if (c < n4) {
            #pragma unroll
            for (int k = 0; k < 4; ++k) {
                const int col = c * 8 + 2 * k;
                const unsigned even = cmax[j * 4 + k] << 16, odd = cmax[j * 4 + k] & 0xFFFF0000u;
                if (even > channel_max[col]) atomicMax(channel_max + col, even);
                if (odd > channel_max[col + 1]) atomicMax(channel_max + col + 1, odd);
            }
        }
    }
    if (t == 0) {
        const int b = blockIdx.x * ROWS + g;
        part_f[b] = p_sum; part_f[n_parts + b] = p_sq; part_f[2 * n_parts + b] = (double)p_hi;
        part_f[3 * n_parts + b] = (double)p_lo;
        part_i[b] = p_valid; part_i[n_parts + b] = p_bad; part_i[2 * n_parts + b] = p_massive;
    }
#if FOLD
    // The fold: the last block to take a ticket adds the partials, in a fixed order, and merges the
    // staged rows into the stored top-K (the Triton fold's work, without a launch of its own). The
    // other blocks' rows, partials and staged keys are read through L2 (__ldcg), after the fences.
    __shared__ unsigned last;
    __threadfence();
    __syncthreads();
    if (tid == 0) last = atomicAdd(counters, 1u) == gridDim.x - 1;
    __syncthreads();
    if (!last) return;
    __threadfence();
    double f_s = 0.0, f_sq = 0.0;
    float f_hi = -inf, f_lo = inf;
    long long f_valid = 0, f_bad = 0, f_massive = 0;
    for (int p = tid; p < n_parts; p += THREADS) {
        f_s += __ldcg(part_f + p); f_sq += __ldcg(part_f + n_parts + p);
        f_hi = fmaxf(f_hi, (float)__ldcg(part_f + 2 * n_parts + p));
        f_lo = fminf(f_lo, (float)__ldcg(part_f + 3 * n_parts + p));
        f_valid += __ldcg(part_i + p); f_bad += __ldcg(part_i + n_parts + p); f_massive += __ldcg(part_i + 2 * n_parts + p);
    }
    #pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        f_s += __shfl_xor_sync(FULL, f_s, o); f_sq += __shfl_xor_sync(FULL, f_sq, o);
        f_hi = fmaxf(f_hi, __shfl_xor_sync(FULL, f_hi, o)); f_lo = fminf(f_lo, __shfl_xor_sync(FULL, f_lo, o));
        f_valid += __shfl_xor_sync(FULL, f_valid, o); f_bad += __shfl_xor_sync(FULL, f_bad, o);
        f_massive += __shfl_xor_sync(FULL, f_massive, o);
    }
    // the histogram's table is free now: the warps' sums, then their top-K lists, go there
    double* m_f = reinterpret_cast<double*>(h);                      // [2][WARPS]
    long long* m_i = reinterpret_cast<long long*>(m_f + 2 * WARPS);  // [3][WARPS]
    long long* m_key = m_i + 3 * WARPS;                              // [WARPS][16]
    int* m_row = reinterpret_cast<int*>(m_key + 16 * WARPS);         // [WARPS][16]
    if (lane == 0) {
        m_f[warp] = f_s; m_f[WARPS + warp] = f_sq; w_hi[warp] = f_hi; w_lo[warp] = f_lo;
        m_i[warp] = f_valid; m_i[WARPS + warp] = f_bad; m_i[2 * WARPS + warp] = f_massive;
    }
    // each warp's 16 largest staged keys
    const int n_staged = (int)__ldcg(counters + 1);
    long long lk = -1;
    int lr = 0;
    merge_all<true>(lk, lr, stage_key, stage_row, n_staged, warp * 32, THREADS, lane);
    if (lane < 16) { m_key[warp * 16 + lane] = lk; m_row[warp * 16 + lane] = lr; }
    __syncthreads();
    if (warp != 0) return;
    if (lane == 0) {
        for (int q = 1; q < WARPS; ++q) {
            f_s += m_f[q]; f_sq += m_f[WARPS + q]; f_hi = fmaxf(f_hi, w_hi[q]); f_lo = fminf(f_lo, w_lo[q]);
            f_valid += m_i[q]; f_bad += m_i[WARPS + q]; f_massive += m_i[2 * WARPS + q];
        }
        *acc_sum += f_s; *acc_sumsq += f_sq; *acc_max = fmaxf(*acc_max, f_hi); *acc_min = fminf(*acc_min, f_lo);
        *acc_count += f_valid * width; *acc_nonfinite += f_bad; *acc_massive += f_massive;
        counters[0] = 0u; counters[1] = 0u;  // for the next update
    }
    merge_all<false>(lk, lr, m_key + 16, m_row + 16, 16 * (WARPS - 1), 0, 32, lane);
    // the union of the stored top-K (lanes 0..15: slot = lane) and the new list (lanes 16..31: the
    // list's entry lane - 16), each entry ranked as the Triton fold ranks it
    const bool is_old = lane < 16, in_k = is_old && lane < top_k;
    const long long new_key = __shfl_sync(FULL, lk, lane & 15);
    const int new_row = __shfl_sync(FULL, lr, lane & 15);
    const long long old_key = in_k ? topk_key[lane] : -1LL;
    const float old_value = in_k ? topk_value[lane] : 0.f, old_median = in_k ? topk_median[lane] : 0.f;
    const long long old_channel = in_k ? topk_channel[lane] : 0LL, old_token = in_k ? topk_token[lane] : 0LL;
    const long long mine = is_old ? old_key : new_key;
    int rank = is_old ? lane : 0;
    #pragma unroll
    for (int q = 0; q < 16; ++q) {
        const long long o = __shfl_sync(FULL, old_key, q), n = __shfl_sync(FULL, lk, q);
        rank += is_old ? (n >= 0 && n > mine) : (n > mine) + (q < top_k && o >= mine);
    }
    __syncwarp();  // every lane has read the stored top-K before any lane writes it
    if (in_k && rank < top_k) {
        topk_key[rank] = old_key; topk_value[rank] = old_value; topk_channel[rank] = old_channel;
        topk_token[rank] = old_token; topk_median[rank] = old_median; source[rank] = -1;
    } else if (!is_old && new_key >= 0 && rank < top_k) {
        const float t_max = __ldcg(row_f + new_row), t_min = __ldcg(row_f + n_rows + new_row);
        topk_key[rank] = new_key; topk_value[rank] = t_max >= -t_min ? t_max : t_min;
        topk_channel[rank] = __ldcg(row_i + 2 * n_rows + new_row); topk_token[rank] = ids[new_row];
        topk_median[rank] = 0.f; source[rank] = new_row;
    }
#endif
}
"""
_SCAN_MAX_GROUP = 512
_SCAN_ROW_THREADS = 256
_SCAN_MAX_VEC = 16  # rows of up to 65,536 bf16
_cuda_scan: dict[str, Any] = {"kernels": {}, "failed": False}


@dataclass(frozen=True)
class CudaScanShape:
    """One CUDA scan launch: threads per row, rows per block at a time, 16-byte vectors per thread
    and row, and blocks."""

    group: int
    rows: int
    vec: int
    blocks: int

    @property
    def threads(self) -> int:
        return self.group * self.rows


def cuda_scan_shape(x2: torch.Tensor, group: int | None = None, rows: int | None = None, *,
                    gated: bool = False) -> CudaScanShape | None:
    """How the CUDA scan would run over bf16 rows `x2` [N, H], or None where it cannot (then Triton scans).

    Needs bf16 on CUDA, rows 16-byte aligned with a width divisible by 8, at most 65,536 wide.
    Unless given: 4 to 8 vectors per thread (32 to 512 threads per row), and as many rows at a time
    as make blocks of 256 threads (narrow rows share a block, and its two synchronisations per step):
    the shapes of `bench/bench_stats.py --cuda-sweep` on an H100 for widths 2,048 (64 x 4, 0.063 ms
    per [16384, H] update with the fold), 4,096 (128 x 2, 0.089 ms), 6,144 (128 x 2, 0.123 ms) and
    12,288 (256 x 1, 0.222 ms), each the fastest or within 5% of it. Blocks are left at 0:
    `_cuda_scan_kernel` sets them to as many as run at once on every SM (the kernel's occupancy).
    A gated scan (`gated_update`) holds up's rows in registers too, so its rows are split finer: 2 to
    4 vectors per thread.
    """
    if (x2.dtype != torch.bfloat16 or not x2.is_cuda or INTERPRET or _cuda_scan["failed"]
            or switched_off("MAXACT_CARD_CUDA_SCAN")):
        return None
    n_rows, width = x2.shape
    if width % 8 or x2.stride(-1) != 1 or x2.stride(0) % 8 or x2.data_ptr() % 16 or n_rows == 0:
        return None
    n4 = width // 8
    if group is None:
        group = min(_SCAN_MAX_GROUP, max(32, _pow2_floor(n4 // (2 if gated else 4))))
    if rows is None:
        rows = max(1, _SCAN_ROW_THREADS // group)
    vec = -(-n4 // group)
    if vec > _SCAN_MAX_VEC or group % 32 or group * rows > 1024:
        return None
    return CudaScanShape(group, rows, vec, 0)


_SCAN_FOLD_K = 16  # the largest top-K a folding CUDA scan merges (one warp's list)


def scan_folds(acc: SiteStats) -> bool:
    """Whether a CUDA scan of `acc`'s site folds the update itself (its last block does the Triton
    fold's work, saving that kernel's launch: top_k <= 16, unless MAXACT_CARD_SCAN_FOLD=0)."""
    return acc.top_k <= _SCAN_FOLD_K and not switched_off("MAXACT_CARD_SCAN_FOLD")


def _sms(device: torch.device) -> int:
    index = _device_index(device)
    sms = _sm_count.get(index)
    if sms is None:
        sms = _sm_count[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return sms


def _scan_entry(device: torch.device, shape: CudaScanShape, massive: bool, gated: bool,
                fold: bool) -> tuple[Any, int] | None:
    """The NVRTC scan kernel of this shape loaded on `device` and how many of its blocks an SM holds
    at once, built on first use; None where it cannot be built."""
    index = _device_index(device)

    def build() -> tuple[Any, int]:
        # The fold's code would take registers enough to cost the scan a block per SM (80 against 92
        # to 99 per thread for 2,048- and 4,096-wide rows on an H100), and the scan is most of the
        # time: a folding scan is held to the occupancy of the scan without its fold.
        bounds = "THREADS"
        if fold:
            apart = _scan_entry(device, shape, massive, gated, False)
            if apart is None:
                raise RuntimeError("the scan without its fold could not be built")
            bounds += f", {apart[1]}"
        source = _BF16_CUDA_SOURCE + _SCAN_CUDA_SOURCE % {
            "threads": shape.threads, "rows": shape.rows, "vec": shape.vec,
            "massive": int(massive),
            "massive_abs": repr(float(MASSIVE_ABS)), "massive_ratio": repr(float(MASSIVE_RATIO)),
            "gated": int(gated), "fold": int(fold), "launch_bounds": bounds,
        }
        kernel = _compile(index, source, "maxact_scan_bf16")
        if getattr(kernel, "func", None) is None:
            raise RuntimeError("no driver handle to launch the kernel with")
        per_sm = ctypes.c_int(0)
        status = torch.cuda._utils._get_gpu_runtime_library().cuOccupancyMaxActiveBlocksPerMultiprocessor(
            ctypes.byref(per_sm), kernel.func, shape.threads, ctypes.c_size_t(0))
        if status != 0 or per_sm.value < 1:
            raise RuntimeError(f"occupancy query returned {status}")
        return kernel, per_sm.value

    return _built(_cuda_scan, (index, shape.group, shape.rows, shape.vec, massive, gated, fold), build)


def _cuda_scan_kernel(device: torch.device, shape: CudaScanShape, massive: bool,
                      n_rows: int, gated: bool = False, fold: bool = False) -> tuple[Any, CudaScanShape] | None:
    """The NVRTC scan kernel of this shape loaded on `device` and the launch's full shape (as many
    blocks as run at once on every SM), or None where it cannot be built. `gated`: the variant that
    writes silu(x) * up as it scans; `fold`: the variant whose last block folds the update into the
    accumulator (`scan_folds`)."""
    entry = _scan_entry(device, shape, massive, gated, fold)
    if entry is None:
        return None
    kernel, per_sm = entry
    resident = per_sm * _sms(device)
    return kernel, CudaScanShape(shape.group, shape.rows, shape.vec, max(1, min(-(-n_rows // shape.rows), resident)))


def _launch_cuda_scan(kernel: Any, shape: CudaScanShape, x2: torch.Tensor, tokens_per_row: int, mask: torch.Tensor,
                      token_index: torch.Tensor, sample_index: torch.Tensor, acc: SiteStats, ws: _Workspace,
                      stream: int, up2: torch.Tensor | None = None, out2: torch.Tensor | None = None,
                      fold: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """One launch of a CUDA scan; `fold`, for a kernel built to fold: its counters and the batch's
    token ids (flat)."""
    n_rows, width = x2.shape
    ptr = ctypes.c_void_p
    values: tuple[Any, ...] = (
              ptr(x2.data_ptr()), ctypes.c_int(x2.stride(0)), ctypes.c_int(n_rows), ctypes.c_int(width),
              ctypes.c_int(tokens_per_row), ptr(mask.data_ptr()), ptr(token_index.data_ptr()),
              ptr(sample_index.data_ptr()), ptr(acc.channel_max.data_ptr()), ptr(acc.sample_max.data_ptr()),
              ptr(acc.hist.data_ptr()), ptr(ws.scan.row_f.data_ptr()),
              ptr(ws.scan.row_i.data_ptr()), ptr(ws.row_key.data_ptr()), ptr(ws.part_f.data_ptr()),
              ptr(ws.part_i.data_ptr()),
              ptr(0 if up2 is None else up2.data_ptr()), ctypes.c_int(0 if up2 is None else up2.stride(0)),
              ptr(0 if out2 is None else out2.data_ptr()), ctypes.c_int(0 if out2 is None else out2.stride(0)))
    if fold is None:
        values += (ptr(0),) * 17 + (ctypes.c_int(0),)
    else:
        counters, ids = fold
        values += tuple(ptr(t.data_ptr()) for t in (
            counters, ws.stage_key, ws.stage_row, ids, acc.max, acc.min, acc.count, acc.sum, acc.sumsq,
            acc.nonfinite_tokens, acc.massive_tokens, acc.topk_key, acc.topk_value, acc.topk_channel,
            acc.topk_token_id, acc.topk_median, ws.scan.source)) + (ctypes.c_int(acc.top_k),)
    _cu_launch(kernel.func, shape.blocks, shape.threads, stream, values)


# --- the host side ----------------------------------------------------------------------------------
_HIST_COPIES_CUDA = 64  # private histograms: a bin is shared by 1/64 of the programs
_HIST_COPIES_CPU = 2
_BLOCK_R = 1024  # rows per top-K selection program of the fold
_scratch: dict[Any, tuple[torch.Tensor, torch.Tensor]] = {}


_RAW_STREAM = getattr(torch._C, "_cuda_getCurrentRawStream", None)  # CUDA builds of torch


def _stream_of(device: torch.device) -> int:
    """The handle of `device`'s current stream (0 off CUDA): scratch is kept per stream. Read raw, as
    Triton's launcher reads it: `torch.cuda.current_stream` builds a Stream object, 9 us per call."""
    if device.type != "cuda":
        return 0
    if _RAW_STREAM is not None:
        return int(_RAW_STREAM(_device_index(device)))
    return torch.cuda.current_stream(device).cuda_stream


def _persistent_scratch(device: torch.device, stream: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The private histograms and the fold's two counters of `device`'s current stream, zeroed: the
    ticket (the Triton fold's, and a folding CUDA scan's) and the rows a folding scan staged.

    Every fold leaves them at zero again, so one allocation serves every update.
    """
    key = (device, _stream_of(device) if stream is None else stream)
    pair = _scratch.get(key)
    if pair is None:
        copies = _HIST_COPIES_CUDA if device.type == "cuda" else _HIST_COPIES_CPU
        buf = torch.zeros(copies * HIST_STRIDE + 2, dtype=torch.int32, device=device)
        pair = _scratch[key] = (buf[:-2].view(copies, HIST_STRIDE), buf[-2:])
    return pair


@dataclass(frozen=True)
class Scan:
    """What one update left behind, for the caller and for tests (nothing here costs a launch).

    row_f: [4, N] float32, per row: max, min, sum, sum of squares. row_i: [3, N] int32, per row:
    valid (0/1), channels below |a|max/1000 (massive sites; 0 elsewhere), the first channel holding
    the row's signed extreme. source: [top_k] int64, the row each top-K entry came from in this
    batch, -1 for older entries. They live in a workspace that the next update of the same shape on
    the same stream reuses: read them (or enqueue what reads them) before that.
    """

    row_f: torch.Tensor
    row_i: torch.Tensor
    source: torch.Tensor


class HistogramCounted(RuntimeError):
    """A fused update failed after the CUDA scan had added the batch's histogram into the accumulator:
    whoever redoes the update must not count the histogram again (its other fields the scan touched
    are maxima, which a second pass leaves as they are)."""


@dataclass(frozen=True)
class _Workspace:
    scan: Scan
    row_key: torch.Tensor
    part_f: torch.Tensor
    part_i: torch.Tensor
    stage_key: torch.Tensor
    stage_row: torch.Tensor


_workspaces: dict[Any, _Workspace] = {}
_MAX_WORKSPACES = 16


def _workspace(device: torch.device, stream: int, n_rows: int, n_parts: int, top_k: int, block_k: int) -> _Workspace:
    """Per-row, per-program and staging buffers for one update, kept for the next of the same shape.

    Every site of a batch has the same rows, so one set serves a whole forward pass: no allocator
    calls per update. Updates on one stream run in order, so reuse never races.
    """
    key = (device, stream, n_rows, n_parts, top_k)
    ws = _workspaces.get(key)
    if ws is None:
        if len(_workspaces) >= _MAX_WORKSPACES:
            _workspaces.clear()
        # staged top-K candidates: block_k per program of the Triton fold, or any row for a folding scan
        n_stage = max(triton.cdiv(n_rows, _BLOCK_R) * block_k, n_rows)
        ws = _workspaces[key] = _Workspace(
            Scan(torch.empty(4, n_rows, dtype=torch.float32, device=device),
                 torch.empty(3, n_rows, dtype=torch.int32, device=device),
                 torch.empty(top_k, dtype=torch.int64, device=device)),
            torch.empty(n_rows, dtype=torch.int64, device=device),
            torch.empty(4, n_parts, dtype=torch.float64, device=device),
            torch.empty(3, n_parts, dtype=torch.int32, device=device),
            torch.empty(n_stage, dtype=torch.int64, device=device),
            torch.empty(n_stage, dtype=torch.int32, device=device),
        )
    return ws


def _forget_scratch() -> None:
    """Drop the persistent scratch: after a failed launch it may hold counts that nobody folded."""
    _scratch.clear()
    _workspaces.clear()


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1) if t.is_contiguous() else t.contiguous().reshape(-1)


def fused_update(acc: SiteStats, x: torch.Tensor, mask: torch.Tensor, token_index: torch.Tensor,
                 sample_index: torch.Tensor, input_ids: torch.Tensor, *,
                 config: ScanConfig | CudaScanShape | None = None) -> Scan:
    """Fold a [B, T, H] activation into `acc` in place: a scan, then the fold (and, where the Triton scan
    runs on bf16, the CUDA histogram).

    The caller checks `available(x)`. `acc`'s tensors must be contiguous, on x's device, with the
    dtypes `SiteStats` gives them; mask is bool [B, T]. For massive sites the median |a| of the new
    top-K entries is left to the caller (`Scan.source` says which rows they are). `config` forces a
    block shape: a ScanConfig runs the Triton scan, a CudaScanShape the CUDA scan with its threads per
    row and rows per block.
    """
    width = x.shape[-1]
    x2 = _rows(x)
    n_rows = x2.shape[0]
    device = x2.device
    if isinstance(config, CudaScanShape):
        shape, cfg = cuda_scan_shape(x2, config.group, config.rows), scan_config(width, x2.element_size())
    else:
        shape = cuda_scan_shape(x2) if config is None else None
        cfg = config or scan_config(width, x2.element_size())
    folds = shape is not None and scan_folds(acc)
    found = _cuda_scan_kernel(device, shape, acc.massive, n_rows, fold=folds) if shape is not None else None
    kernel, shape = found if found is not None else (None, None)
    n_parts = shape.blocks * shape.rows if shape is not None else triton.cdiv(n_rows, cfg.block_n)
    is_bf16 = x2.dtype == torch.bfloat16
    stream = _stream_of(device)
    ws = _workspace(device, stream, n_rows, n_parts, acc.top_k, _block_k(acc))
    data = x2.view(torch.int16) if is_bf16 else x2
    scanned = False  # the CUDA scan ran: acc.hist holds this batch
    hist, counters = _persistent_scratch(device, stream)
    flat_mask, flat_tokens = _flat(mask).view(torch.uint8), _flat(token_index)
    try:
        with _on(device):
            # the |a| histogram: the CUDA scan adds it into acc.hist itself; the Triton scan counts it
            # into the private histograms, which the fold's first programs sum, unless the CUDA
            # histogram kernel counts it apart after the fold
            counted_apart = False
            if kernel is not None:
                assert shape is not None
                _launch_cuda_scan(kernel, shape, x2, x.shape[-2], flat_mask, flat_tokens, sample_index, acc, ws, stream,
                                  fold=(counters, _flat(input_ids)) if folds else None)
                scanned = True
                if folds:
                    return ws.scan
            else:
                counted_apart = cuda_histogram_ready(x2)
                _scan_kernel[(n_parts,)](
                    data, x2.stride(0), n_rows, width, x.shape[-2],
                    flat_mask, flat_tokens, sample_index,
                    acc.channel_max.view(torch.int32), acc.sample_max.view(torch.int32), hist, hist.shape[0],
                    ws.scan.row_f, ws.scan.row_i, ws.row_key, ws.part_f, ws.part_i, n_parts,
                    FINE_BIAS=_FINE_BIAS, OVERFLOW=HIST_OVERFLOW, NONFINITE=HIST_NONFINITE,
                    HIST_STRIDE=HIST_STRIDE, HIST_SPARE=HIST_SPARE, MASSIVE_ABS=MASSIVE_ABS,
                    MASSIVE_RATIO=MASSIVE_RATIO, BLOCK_N=cfg.block_n, BLOCK_H=cfg.block_h, MASSIVE=acc.massive,
                    IS_BF16=is_bf16, HIST=not counted_apart, num_warps=cfg.num_warps,
                )
            _fold(acc, ws, hist, counters, n_parts, width, n_rows, input_ids, stream,
                  sum_private=kernel is None and not counted_apart)
            if counted_apart:  # after the scan, so a failed scan leaves the histogram untouched
                cuda_abs_histogram(x2, flat_mask.view(torch.bool), acc.hist)
    except Exception as exc:
        _forget_scratch()
        _after_scan(exc, scanned)
        raise
    return ws.scan


def gated_update(acc: SiteStats, g: torch.Tensor, up: torch.Tensor, mask: torch.Tensor, token_index: torch.Tensor,
                 sample_index: torch.Tensor, input_ids: torch.Tensor, *,
                 shape: CudaScanShape | None = None) -> tuple[torch.Tensor, Scan] | None:
    """silu(g) * up for a SwiGLU MLP, with the statistics of its gate `g` folded into `acc` in the same
    pass: the gate is read once where apart the product kernel and the scan would each read it.
    Returns the product ([B, T, I] bf16, rounded as eager torch rounds it) and the `Scan`, or None
    where the CUDA scan cannot run this (then nothing ran).

    g and up are [B, T, I] bf16 on one CUDA device; `acc` is checked by the caller as for
    `fused_update`. `shape` forces threads per row and rows per block.
    """
    if up.shape != g.shape or up.dtype != g.dtype or up.device != g.device:
        return None
    width = g.shape[-1]
    g2, up2 = _rows(g), _rows(up)
    if up2.stride(0) % 8 or up2.data_ptr() % 16:
        return None
    shape = cuda_scan_shape(g2, gated=True) if shape is None else cuda_scan_shape(g2, shape.group, shape.rows)
    if shape is None:
        return None
    n_rows, device = g2.shape[0], g2.device
    folds = scan_folds(acc)
    found = _cuda_scan_kernel(device, shape, acc.massive, n_rows, gated=True, fold=folds)
    if found is None:
        return None
    kernel, shape = found
    n_parts = shape.blocks * shape.rows
    stream = _stream_of(device)
    ws = _workspace(device, stream, n_rows, n_parts, acc.top_k, _block_k(acc))
    hist, counters = _persistent_scratch(device, stream)
    flat_mask, flat_tokens = _flat(mask).view(torch.uint8), _flat(token_index)
    out = torch.empty(g.shape, dtype=g.dtype, device=device)
    scanned = False
    try:
        with _on(device):
            _launch_cuda_scan(kernel, shape, g2, g.shape[-2], flat_mask, flat_tokens, sample_index, acc, ws, stream,
                              up2, out.view(-1, width), fold=(counters, _flat(input_ids)) if folds else None)
            scanned = True
            if not folds:
                _fold(acc, ws, hist, counters, n_parts, width, n_rows, input_ids, stream, sum_private=False)
    except Exception as exc:
        _forget_scratch()
        _after_scan(exc, scanned)
        raise
    return out, ws.scan


def _after_scan(exc: Exception, scanned: bool) -> None:
    """Raise HistogramCounted for a failure after the CUDA scan (out of memory aside: the batch loop
    rolls the whole batch back)."""
    if scanned and not isinstance(exc, torch.OutOfMemoryError):
        raise HistogramCounted(f"the update failed after its scan: {exc!r}") from exc


_silu_mul: dict[str, Any] = {"kernels": {}, "failed": False}

# The median |a| of each new top-K token of a massive site (Sun et al.'s ratio is read there). In torch
# that is an index_select, abs, median, clamp and where per update, 0.13 to 0.25 ms of host time
# (`bench/bench_stats.py --summary-only`); with a residual and an embedding site per layer, this one
# launch takes their place. A radix select over the
# 15 magnitude bits of a bf16 (their order is the order of |a|): a 256-bin count of the high 8 bits
# finds the bin that holds the lower median's rank, then a 128-bin count of the low 7 bits within it.
_MEDIAN_CUDA_SOURCE = r"""
__device__ __forceinline__ unsigned maxact_pick(const unsigned* h, unsigned* rank) {
    unsigned b = 0, k = *rank;
    while (h[b] <= k) { k -= h[b]; ++b; }
    *rank = k;
    return b;
}

// for each top-K entry i that came from this batch (src[i] >= 0), the lower median of the |a| of row
// src[i] of x into median[i], as torch's median gives it: NaN where the row holds a NaN
extern "C" __global__ void __launch_bounds__(256) maxact_row_median_bf16(
        const unsigned short* __restrict__ x, long long row_stride, int width,
        const long long* __restrict__ src, float* __restrict__ median) {
    __shared__ unsigned h[256];
    __shared__ unsigned s_hi, s_rank;
    const long long r = src[blockIdx.x];
    if (r < 0) return;  // the same for the whole block
    const unsigned short* row = x + r * row_stride;
    h[threadIdx.x] = 0u;
    __syncthreads();
    int nan = 0;
    for (int c = threadIdx.x; c < width; c += 256) {
        const unsigned a = row[c] & 0x7FFFu;
        nan |= a > 0x7F80u;
        atomicAdd(&h[a >> 7], 1u);
    }
    if (__syncthreads_or(nan)) {
        if (threadIdx.x == 0) median[blockIdx.x] = __int_as_float(0x7FC00000);
        return;
    }
    if (threadIdx.x == 0) { s_rank = (unsigned)(width - 1) / 2; s_hi = maxact_pick(h, &s_rank); }
    __syncthreads();
    const unsigned hi = s_hi;
    if (threadIdx.x < 128) h[threadIdx.x] = 0u;
    __syncthreads();
    for (int c = threadIdx.x; c < width; c += 256) {
        const unsigned a = row[c] & 0x7FFFu;
        if ((a >> 7) == hi) atomicAdd(&h[a & 0x7Fu], 1u);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        unsigned rank = s_rank;
        median[blockIdx.x] = __uint_as_float(((hi << 7) | maxact_pick(h, &rank)) << 16);
    }
}
"""
_row_median: dict[str, Any] = {"kernels": {}, "failed": False}


def _driver_function(table: dict[str, Any], device: torch.device, source: str, name: str) -> Any:
    """The driver handle of NVRTC kernel `name` from `source`, loaded on `device` once (`_built`), or
    None where it cannot be built or torch gives no handle to launch it with."""
    index = _device_index(device)
    kernel = _built(table, index, lambda: _compile(index, source, name))
    return getattr(kernel, "func", None)


def row_medians(x2: torch.Tensor, source: torch.Tensor, median: torch.Tensor) -> bool:
    """For each entry i with source[i] >= 0, the lower median |a| of row source[i] of bf16 rows `x2`
    [N, H] into float32 `median[i]` (what `x2[source[i]].abs().median()` gives, NaN included); the
    other entries are left as they are. False, with nothing done, where this kernel cannot run it
    (then the caller's torch does)."""
    if (x2.dtype != torch.bfloat16 or not x2.is_cuda or INTERPRET or x2.stride(-1) != 1 or x2.shape[-1] == 0
            or source.dtype != torch.int64 or median.dtype != torch.float32 or source.shape != median.shape
            or not source.is_contiguous() or not median.is_contiguous() or source.device != x2.device
            or median.device != x2.device or switched_off("MAXACT_CARD_CUDA_SCAN")):
        return False
    if source.numel() == 0:
        return True
    func = _driver_function(_row_median, x2.device, _MEDIAN_CUDA_SOURCE, "maxact_row_median_bf16")
    if func is None:
        return False
    values = (ctypes.c_void_p(x2.data_ptr()), ctypes.c_longlong(x2.stride(0)), ctypes.c_int(x2.shape[-1]),
              ctypes.c_void_p(source.data_ptr()), ctypes.c_void_p(median.data_ptr()))
    try:
        with _on(x2.device):
            _cu_launch(func, source.numel(), 256, _stream_of(x2.device), values)
    except RuntimeError:  # a launch the driver refused did nothing: torch takes this and later updates
        _row_median["failed"] = True
        return False
    return True


def silu_mul(g: torch.Tensor, up: torch.Tensor) -> torch.Tensor | None:
    """silu(g) * up in one pass, rounded as eager torch rounds it, for a SwiGLU MLP whose sites are not
    read (contiguous bf16 of one shape on CUDA); None where this kernel cannot run it."""
    if (g.dtype != torch.bfloat16 or up.dtype != g.dtype or up.shape != g.shape or not g.is_cuda
            or up.device != g.device or INTERPRET or switched_off("MAXACT_CARD_CUDA_SCAN")
            or not g.is_contiguous() or not up.is_contiguous() or g.numel() % 8
            or g.data_ptr() % 16 or up.data_ptr() % 16):
        return None
    func = _driver_function(_silu_mul, g.device, _BF16_CUDA_SOURCE + _SILU_MUL_CUDA_SOURCE, "maxact_silu_mul_bf16")
    if func is None:
        return None
    out = torch.empty_like(g)
    n8 = g.numel() // 8
    grid = max(1, min(-(-n8 // 256), 8 * _sms(g.device)))
    values = (ctypes.c_void_p(g.data_ptr()), ctypes.c_void_p(up.data_ptr()), ctypes.c_void_p(out.data_ptr()),
              ctypes.c_longlong(n8))
    with _on(g.device):
        _cu_launch(func, grid, 256, _stream_of(g.device), values)
    return out


def _rows(x: torch.Tensor) -> torch.Tensor:
    """`x` as rows [N, H] with unit stride along them."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _on(device: torch.device) -> contextlib.AbstractContextManager[object]:
    """Triton launches on the current device: a model sharded over GPUs updates sites on others.
    Nothing to switch (the common case) costs no context manager of torch's."""
    if device.type != "cuda" or device.index is None or device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device)


def _block_k(acc: SiteStats) -> int:
    return max(16, triton.next_power_of_2(acc.top_k))


# The fold's compiled kernel per device and BLOCK_K, for launches after the first. JITFunction's own
# launch binds and specialises each of the 30 arguments anew: about 70 us of host time per update on
# the H100 machine's host, against about 41 through the compiled kernel's launcher, and a model has
# hundreds of updates per batch (an update's whole host time: 0.134 against 0.174 ms at width
# 2,048, `bench/bench_stats.py --summary-only`). That launcher (CompiledKernel's `[grid](*args,
# stream=)`) is the same in Triton 3.6 and 3.9, the versions around which this is enabled.
_FOLD_RELAUNCH = triton is not None and (3, 6) <= tuple(int(v) for v in triton.__version__.split(".")[:2]) < (3, 10)
# keyed by (device index, BLOCK_K); "failed" turns the relaunch off for the process, as for the CUDA kernels
_fold_compiled: dict[str, Any] = {"kernels": {}, "failed": not _FOLD_RELAUNCH}


def _fold(acc: SiteStats, ws: _Workspace, hist: torch.Tensor, counters: torch.Tensor, n_parts: int, width: int,
          n_rows: int, input_ids: torch.Tensor, stream: int, *, sum_private: bool) -> None:
    """The fold of one scan into `acc` on `stream`, the device's current one (sum_private: the scan
    counted into the private histograms; the ticket is the first of `counters`)."""
    block_b, block_k = 512, _block_k(acc)
    hist_programs = triton.cdiv(HIST_STRIDE, block_b) if sum_private else 0
    grid = (hist_programs + triton.cdiv(n_rows, _BLOCK_R),)
    args = (
        hist, hist.shape[0], hist_programs, acc.hist, counters,
        ws.part_f, ws.part_i, n_parts, width,
        acc.max, acc.min, acc.count, acc.sum, acc.sumsq, acc.nonfinite_tokens, acc.massive_tokens,
        ws.scan.row_f, ws.scan.row_i, ws.row_key, ws.stage_key, ws.stage_row, _flat(input_ids), n_rows,
        acc.topk_key, acc.topk_value, acc.topk_channel, acc.topk_token_id, acc.topk_median, acc.top_k,
        ws.scan.source,
    )
    device = hist.device
    relaunch = device.type == "cuda" and not _fold_compiled["failed"] and not INTERPRET and n_rows < 2**31
    key = (_device_index(device), block_k) if relaunch else None
    compiled = _fold_compiled["kernels"].get(key) if key is not None else None
    if compiled is not None:
        try:
            # the constants in the kernel's order, as the first launch bound them
            compiled[(grid[0], 1, 1)](*args, HIST_BINS, HIST_STRIDE, 16, block_b, 1024, _BLOCK_R, block_k,
                                      stream=stream)
            return
        except (TypeError, ValueError, IndexError):  # the arguments were refused before any launch
            _fold_compiled["kernels"].clear()
            _fold_compiled["failed"] = True
    launched = _fold_kernel[grid](
        *args,
        N_BINS=HIST_BINS, HIST_STRIDE=HIST_STRIDE, BLOCK_C=16, BLOCK_B=block_b,
        BLOCK_P=1024, BLOCK_R=_BLOCK_R, BLOCK_K=block_k, num_warps=4,
    )
    if key is not None and callable(getattr(launched, "__getitem__", None)) and hasattr(launched, "function"):
        _fold_compiled["kernels"][key] = launched


__all__ = ["HIST_STRIDE", "INTERPRET", "HistogramCounted", "Scan", "ScanConfig", "available", "fused_update", "gated_update",
           "row_medians", "scan_config", "silu_mul"]
