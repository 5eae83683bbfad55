"""The scan of an activation's rows, the first half of a fused update, in one of two kernels:

- `maxact_scan_bf16` (CUDA C++, `cuda/scan.cu`, compiled at run time by NVRTC; bf16 rows 16-byte
  aligned, width divisible by 8): one read of the tensor. A group of threads holds a row in
  registers; two reductions give its extremes, moments, validity, the first channel of its extreme
  and (massive sites) the channels below |a|max/1000. The |a| histogram is counted in shared memory,
  the column maxima stay in registers over all the rows a block takes, and both reach memory once per
  block (the histogram straight into the int64 counts). Padding rows are not read. Where the top-K is
  at most 16 (`scan_folds`) the scan folds the update itself: each row whose key beats the stored
  K-th is staged as it is scanned, and the scan's last block to finish adds the partials in a fixed
  order and merges the staged rows, one warp-wide bitonic merge of 32 at a time, into the top-K.
- `_scan_kernel` (Triton; other dtypes and widths, and Triton's CPU interpreter in the tests): one
  program per block of rows reads it twice (the second pass from L2, once validity and extremes are
  known); column maxima by atomics per block of rows; the histogram by atomics into private copies
  (`workspace.HIST_STRIDE`), or by the CUDA histogram kernel (`histogram.py`) for bf16.

Both write, per row, the extremes, moments, flags, first extreme channel and top-K key (|a| bits high,
complement of the token's run index low; -1 where the row is not valid), and per block partial sums and
counts (`workspace.Workspace`); the sample maxima take an atomic max per row. The Triton fold
(`fold.py`) follows, unless the CUDA scan folded.

The Triton scan reads each tile twice, loads the stored column maxima once per block of a few rows, and
leaves the histogram to another kernel: about 1.7 reads of the tensor plus one more for the histogram.
In the CUDA scan one block takes rows in turn and holds each row in registers (at most VEC 16-byte
vectors per thread), so the tensor is read once. Each element costs about 8 instructions (counted in the
SASS for sm_90): two bf16 values are handled per 32-bit word wherever the hardware has paired
instructions: extremes (max.NaN/min.NaN.bf16x2, which also carry an inf or NaN through to the validity
test), column maxima (max.bf16x2 of magnitudes) and the massive count (set.lt.bf16x2 on Hopper, a
compare per value before it). A value's histogram key is a shift, a mask and one clamp (VIADDMNMX.RELU
on Hopper), with inf and NaN counted as overflow and moved to their own key by the rare rows that hold
them. The first channel of a row's extreme is looked for only by the threads whose own extreme it is.
At the end each block adds its non-empty counters straight into the int64 histogram, so the fold has no
private histograms to sum for this scan.

The gated variant scans a SwiGLU MLP's gate and writes silu(gate) * up as it goes (up's rows are loaded
ahead like the gate's), so the gate is read once for both: on an H100, [16384, 12288] bf16, 0.56 ms
against 0.44 ms for the product alone and 0.22 ms for the scan alone. Folding the product's statistics
into the same pass as well was tried: with a second site's column maxima in registers it ran slower
than the gated kernel and a scan of the product (0.87 against 0.78 ms).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Any

import torch

from maxact_card.kernels.encoding import FINE_BIAS, HIST_NONFINITE, HIST_OVERFLOW, MASSIVE_ABS, MASSIVE_RATIO
from maxact_card.kernels.nvrtc import (
    INTERPRET,
    built,
    compile_kernel,
    cuda_source,
    device_index,
    launch,
    program,
    sms,
)
from maxact_card.kernels.workspace import HIST_SPARE, HIST_STRIDE, Accumulator, Workspace
from maxact_card.switches import switched_off

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = None
    tl = None

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def available(x: torch.Tensor) -> bool:
    """Whether the fused kernels can fold `x` (Triton importable, and `x` on CUDA or the interpreter on)."""
    if triton is None or x.dtype not in _DTYPES:
        return False
    return INTERPRET or x.is_cuda


# --- the Triton scan ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ScanConfig:
    """Block shape of the scan kernel: rows per program, channels per step, warps per program."""

    block_n: int
    block_h: int
    num_warps: int

    def programs(self, n_rows: int) -> int:
        """The programs of a launch over `n_rows` rows."""
        return -(-n_rows // self.block_n)


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


def launch_triton_scan(cfg: ScanConfig, x2: torch.Tensor, tokens_per_row: int, mask: torch.Tensor,
                       token_index: torch.Tensor, sample_index: torch.Tensor, acc: Accumulator, ws: Workspace,
                       hist: torch.Tensor, *, count_hist: bool) -> None:
    """One launch of the Triton scan over rows `x2` [N, H] (mask as uint8 and token_index, flat), on the
    current device; the histogram into the private histograms `hist` where `count_hist`."""
    n_rows, width = x2.shape
    n_parts = cfg.programs(n_rows)
    is_bf16 = x2.dtype == torch.bfloat16
    _scan_kernel[(n_parts,)](
        x2.view(torch.int16) if is_bf16 else x2, x2.stride(0), n_rows, width, tokens_per_row,
        mask, token_index, sample_index,
        acc.channel_max.view(torch.int32), acc.sample_max.view(torch.int32), hist, hist.shape[0],
        ws.scan.row_f, ws.scan.row_i, ws.row_key, ws.part_f, ws.part_i, n_parts,
        FINE_BIAS=FINE_BIAS, OVERFLOW=HIST_OVERFLOW, NONFINITE=HIST_NONFINITE,
        HIST_STRIDE=HIST_STRIDE, HIST_SPARE=HIST_SPARE, MASSIVE_ABS=MASSIVE_ABS,
        MASSIVE_RATIO=MASSIVE_RATIO, BLOCK_N=cfg.block_n, BLOCK_H=cfg.block_h, MASSIVE=acc.massive,
        IS_BF16=is_bf16, HIST=count_hist, num_warps=cfg.num_warps,
    )


# --- the CUDA scan ------------------------------------------------------------------------------------
# The variant's parameters, as #defines ahead of cuda/scan.cu, with the macros derived from them
_SCAN_DEFINES = """\
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
    `cuda_scan_kernel` sets them to as many as run at once on every SM (the kernel's occupancy).
    A gated scan (`gated_update`) holds up's rows in registers too, so its rows are split finer: 2 to
    4 vectors per thread.
    """
    if (x2.dtype != torch.bfloat16 or not x2.is_cuda or INTERPRET or _cuda_scan["failed"]
            or switched_off("MAXACT_CARD_CUDA_SCAN")):
        return None
    n_rows, width = x2.shape
    if x2.stride(-1) != 1 or x2.stride(0) % 8 or x2.data_ptr() % 16 or n_rows == 0:
        return None
    return scan_shape_for(width, group, rows, gated=gated)


def scan_shape_for(width: int, group: int | None = None, rows: int | None = None, *,
                   gated: bool = False) -> CudaScanShape | None:
    """`cuda_scan_shape` for bf16 rows `width` wide that are 16-byte aligned: the shape follows
    from the width alone (which `prebuild` relies on, to build the kernels before any tensor)."""
    if width % 8 or width <= 0:
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


def scan_folds(top_k: int) -> bool:
    """Whether a CUDA scan into a top-K of `top_k` folds the update itself (its last block does the
    Triton fold's work, saving that kernel's launch: top_k <= 16, unless MAXACT_CARD_SCAN_FOLD=0)."""
    return top_k <= _SCAN_FOLD_K and not switched_off("MAXACT_CARD_SCAN_FOLD")


def _scan_entry(device: torch.device, shape: CudaScanShape, massive: bool, gated: bool,
                fold: bool) -> tuple[Any, int] | None:
    """The NVRTC scan kernel of this shape loaded on `device` and how many of its blocks an SM holds
    at once, built on first use; None where it cannot be built."""
    index = device_index(device)

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
        defines = _SCAN_DEFINES % {
            "threads": shape.threads, "rows": shape.rows, "vec": shape.vec,
            "massive": int(massive),
            "massive_abs": repr(float(MASSIVE_ABS)), "massive_ratio": repr(float(MASSIVE_RATIO)),
            "gated": int(gated), "fold": int(fold), "launch_bounds": bounds,
        }
        source = program(cuda_source("bf16.cuh"), defines, cuda_source("scan.cu"))
        kernel = compile_kernel(index, source, "maxact_scan_bf16")
        if getattr(kernel, "func", None) is None:
            raise RuntimeError("no driver handle to launch the kernel with")
        per_sm = ctypes.c_int(0)
        status = torch.cuda._utils._get_gpu_runtime_library().cuOccupancyMaxActiveBlocksPerMultiprocessor(
            ctypes.byref(per_sm), kernel.func, shape.threads, ctypes.c_size_t(0))
        if status != 0 or per_sm.value < 1:
            raise RuntimeError(f"occupancy query returned {status}")
        return kernel, per_sm.value

    return built(_cuda_scan, (index, shape.group, shape.rows, shape.vec, massive, gated, fold), build)


def cuda_scan_kernel(device: torch.device, shape: CudaScanShape, massive: bool,
                      n_rows: int, gated: bool = False, fold: bool = False) -> tuple[Any, CudaScanShape] | None:
    """The NVRTC scan kernel of this shape loaded on `device` and the launch's full shape (as many
    blocks as run at once on every SM), or None where it cannot be built. `gated`: the variant that
    writes silu(x) * up as it scans; `fold`: the variant whose last block folds the update into the
    accumulator (`scan_folds`)."""
    entry = _scan_entry(device, shape, massive, gated, fold)
    if entry is None:
        return None
    kernel, per_sm = entry
    resident = per_sm * sms(device)
    return kernel, CudaScanShape(shape.group, shape.rows, shape.vec, max(1, min(-(-n_rows // shape.rows), resident)))


def launch_cuda_scan(kernel: Any, shape: CudaScanShape, x2: torch.Tensor, tokens_per_row: int, mask: torch.Tensor,
                     token_index: torch.Tensor, sample_index: torch.Tensor, acc: Accumulator, ws: Workspace,
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
    launch(kernel.func, shape.blocks, shape.threads, stream, values)

