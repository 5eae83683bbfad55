"""The fold, the second half of a fused update after the Triton scan (or after a CUDA scan whose top-K is
larger than it merges itself): `_fold_kernel` (Triton).

Its first programs add the scan's private histograms into the int64 counts and zero them (none where
the histogram was counted apart). The others each take 1,024 rows (`workspace.BLOCK_R`) and stage the
largest keys that beat the stored K-th entry, and the last of them to finish (a ticket counter) folds the
scan's per-block partials into the scalar statistics in a fixed order (so sums are deterministic),
merges the staged keys and merges them into the top-K in place. Nothing synchronises with the host.
"""

from __future__ import annotations

from typing import Any

import torch

from maxact_card.kernels.encoding import HIST_BINS
from maxact_card.kernels.nvrtc import INTERPRET, device_index
from maxact_card.kernels.workspace import BLOCK_R, HIST_STRIDE, Accumulator, Workspace, flat

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = None
    tl = None

if triton is not None:

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

    # Nothing is specialised on an argument's value or alignment (an accumulator's fields are views
    # at any offset), so one compiled kernel serves every call with the same constants: `fold`
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


def topk_block(top_k: int) -> int:
    """The fold's BLOCK_K for a top-K of `top_k`: the width of a program's list of staged keys."""
    return max(16, triton.next_power_of_2(top_k))


# The fold's compiled kernel per device and BLOCK_K, for launches after the first. JITFunction's own
# launch binds and specialises each of the 30 arguments anew: about 70 us of host time per update on
# the H100 machine's host, against about 41 through the compiled kernel's launcher, and a model has
# hundreds of updates per batch (an update's whole host time: 0.134 against 0.174 ms at width
# 2,048, `bench/bench_stats.py --summary-only`). That launcher (CompiledKernel's `[grid](*args,
# stream=)`) is the same in Triton 3.6 and 3.9, the versions around which this is enabled.
_FOLD_RELAUNCH = triton is not None and (3, 6) <= tuple(int(v) for v in triton.__version__.split(".")[:2]) < (3, 10)
# keyed by (device index, BLOCK_K); "failed" turns the relaunch off for the process, as for the CUDA kernels
_fold_compiled: dict[str, Any] = {"kernels": {}, "failed": not _FOLD_RELAUNCH}


def fold(acc: Accumulator, ws: Workspace, hist: torch.Tensor, counters: torch.Tensor, n_parts: int, width: int,
         n_rows: int, input_ids: torch.Tensor, stream: int, *, sum_private: bool) -> None:
    """The fold of one scan into `acc` on `stream`, the device's current one (sum_private: the scan
    counted into the private histograms; the ticket is the first of `counters`)."""
    block_b, block_k = 512, topk_block(acc.top_k)
    hist_programs = triton.cdiv(HIST_STRIDE, block_b) if sum_private else 0
    grid = (hist_programs + triton.cdiv(n_rows, BLOCK_R),)
    args = (
        hist, hist.shape[0], hist_programs, acc.hist, counters,
        ws.part_f, ws.part_i, n_parts, width,
        acc.max, acc.min, acc.count, acc.sum, acc.sumsq, acc.nonfinite_tokens, acc.massive_tokens,
        ws.scan.row_f, ws.scan.row_i, ws.row_key, ws.stage_key, ws.stage_row, flat(input_ids), n_rows,
        acc.topk_key, acc.topk_value, acc.topk_channel, acc.topk_token_id, acc.topk_median, acc.top_k,
        ws.scan.source,
    )
    device = hist.device
    relaunch = device.type == "cuda" and not _fold_compiled["failed"] and not INTERPRET and n_rows < 2**31
    key = (device_index(device), block_k) if relaunch else None
    compiled = _fold_compiled["kernels"].get(key) if key is not None else None
    if compiled is not None:
        try:
            # the constants in the kernel's order, as the first launch bound them
            compiled[(grid[0], 1, 1)](*args, HIST_BINS, HIST_STRIDE, 16, block_b, 1024, BLOCK_R, block_k,
                                      stream=stream)
            return
        except (TypeError, ValueError, IndexError):  # the arguments were refused before any launch
            _fold_compiled["kernels"].clear()
            _fold_compiled["failed"] = True
    launched = _fold_kernel[grid](
        *args,
        N_BINS=HIST_BINS, HIST_STRIDE=HIST_STRIDE, BLOCK_C=16, BLOCK_B=block_b,
        BLOCK_P=1024, BLOCK_R=BLOCK_R, BLOCK_K=block_k, num_warps=4,
    )
    if key is not None and callable(getattr(launched, "__getitem__", None)) and hasattr(launched, "function"):
        _fold_compiled["kernels"][key] = launched

