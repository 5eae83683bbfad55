"""Fused updates of an accumulator: every statistic of one activation in one or two launches, in place.

`dense_scan` + `torch.bincount` in `measure/stats.py` are the reference; these give the same
numbers (bit for bit, except the float sums, whose order of addition differs) without writing anything
per element: a scan (`scan.py`: CUDA C++ for bf16 rows it can take, else Triton), then the fold
(`fold.py`) unless the CUDA scan folded the update itself, and where the Triton scan runs on bf16 the
CUDA histogram (`histogram.py`). `gated_update` makes a SwiGLU MLP's product in the pass that scans its
gate.

Nothing synchronises with the host. Triton is optional: `available()` says whether the kernels can run
on a tensor (Triton installed and the tensor on CUDA, or Triton's interpreter switched on with
TRITON_INTERPRET=1 before Triton is imported, which runs them on CPU tensors for tests). Only
long-standing Triton features are used (masked loads and stores, reductions, atomics, while loops), so
that the Triton bundled with older PyTorch builds them too. MAXACT_CARD_CUDA_SCAN=0 and
MAXACT_CARD_CUDA_HIST=0 turn the CUDA kernels off; MAXACT_CARD_SCAN_FOLD=0 keeps the Triton fold after
the CUDA scan.

`SiteStats` reaches the kernels through this module alone (imported on its first CUDA update, so
CPU-only runs never import Triton): `__all__` is what it calls.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable

import torch

from maxact_card.kernels import nvrtc
from maxact_card.kernels.fold import fold, topk_block
from maxact_card.kernels.histogram import cuda_abs_histogram, cuda_histogram_ready
from maxact_card.kernels.nvrtc import INTERPRET, on_device, stream_of
from maxact_card.kernels.row_medians import row_medians, row_medians_kernel
from maxact_card.kernels.scan import (
    CudaScanShape,
    ScanConfig,
    available,
    cuda_scan_kernel,
    cuda_scan_shape,
    launch_cuda_scan,
    launch_triton_scan,
    scan_config,
    scan_folds,
    scan_shape_for,
)
from maxact_card.kernels.workspace import (
    Accumulator,
    Scan,
    as_rows,
    flat,
    forget_scratch,
    persistent_scratch,
    workspace_for,
)
from maxact_card.switches import switched_off

scans: Counter[str] = Counter()
"""Updates each scan has run in this process: "cuda" (the CUDA scan, the gated one included) and
"triton". A bf16 model on CUDA should show only the first; the second is its fallback where a CUDA
kernel could not be built (`nvrtc.built`), and the path of other dtypes and widths."""


class HistogramCounted(RuntimeError):
    """A fused update failed after the CUDA scan had added the batch's histogram into the accumulator:
    whoever redoes the update must not count the histogram again (its other fields the scan touched
    are maxima, which a second pass leaves as they are)."""


def fused_update(acc: Accumulator, x: torch.Tensor, mask: torch.Tensor, token_index: torch.Tensor,
                 sample_index: torch.Tensor, input_ids: torch.Tensor, *,
                 config: ScanConfig | CudaScanShape | None = None) -> Scan:
    """Fold a [B, T, H] activation into `acc` in place: a scan, then the fold (and, where the Triton scan
    runs on bf16, the CUDA histogram).

    The caller checks `available(x)`. `acc`'s tensors must be contiguous, on x's device, with the
    dtypes `Accumulator` gives them; mask is bool [B, T]. For massive sites the median |a| of the new
    top-K entries is left to the caller (`Scan.source` says which rows they are). `config` forces a
    block shape: a ScanConfig runs the Triton scan, a CudaScanShape the CUDA scan with its threads per
    row and rows per block.
    """
    width = x.shape[-1]
    x2 = as_rows(x)
    n_rows = x2.shape[0]
    device = x2.device
    if isinstance(config, CudaScanShape):
        shape, cfg = cuda_scan_shape(x2, config.group, config.rows), scan_config(width, x2.element_size())
    else:
        shape = cuda_scan_shape(x2) if config is None else None
        cfg = config or scan_config(width, x2.element_size())
    folds = shape is not None and scan_folds(acc.top_k)
    found = cuda_scan_kernel(device, shape, acc.massive, n_rows, fold=folds) if shape is not None else None
    kernel, shape = found if found is not None else (None, None)
    n_parts = shape.blocks * shape.rows if shape is not None else cfg.programs(n_rows)
    stream = stream_of(device)
    ws = workspace_for(device, stream, n_rows, n_parts, acc.top_k, topk_block(acc.top_k))
    scanned = False  # the CUDA scan ran: acc.hist holds this batch
    hist, counters = persistent_scratch(device, stream)
    flat_mask, flat_tokens = flat(mask).view(torch.uint8), flat(token_index)
    try:
        with on_device(device):
            # the |a| histogram: the CUDA scan adds it into acc.hist itself; the Triton scan counts it
            # into the private histograms, which the fold's first programs sum, unless the CUDA
            # histogram kernel counts it apart after the fold
            counted_apart = False
            if kernel is not None:
                assert shape is not None
                launch_cuda_scan(kernel, shape, x2, x.shape[-2], flat_mask, flat_tokens, sample_index, acc, ws, stream,
                                 fold=(counters, flat(input_ids)) if folds else None)
                scanned = True
                if folds:
                    scans["cuda"] += 1
                    return ws.scan
            else:
                counted_apart = cuda_histogram_ready(x2)
                launch_triton_scan(cfg, x2, x.shape[-2], flat_mask, flat_tokens, sample_index, acc, ws, hist,
                                   count_hist=not counted_apart)
            fold(acc, ws, hist, counters, n_parts, width, n_rows, input_ids, stream,
                 sum_private=kernel is None and not counted_apart)
            if counted_apart:  # after the scan, so a failed scan leaves the histogram untouched
                cuda_abs_histogram(x2, flat_mask.view(torch.bool), acc.hist)
    except Exception as exc:
        forget_scratch()
        _after_scan(exc, scanned)
        raise
    scans["cuda" if kernel is not None else "triton"] += 1
    return ws.scan


def gated_update(acc: Accumulator, g: torch.Tensor, up: torch.Tensor, mask: torch.Tensor, token_index: torch.Tensor,
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
    g2, up2 = as_rows(g), as_rows(up)
    if up2.stride(0) % 8 or up2.data_ptr() % 16:
        return None
    shape = cuda_scan_shape(g2, gated=True) if shape is None else cuda_scan_shape(g2, shape.group, shape.rows)
    if shape is None:
        return None
    n_rows, device = g2.shape[0], g2.device
    folds = scan_folds(acc.top_k)
    found = cuda_scan_kernel(device, shape, acc.massive, n_rows, gated=True, fold=folds)
    if found is None:
        return None
    kernel, shape = found
    n_parts = shape.blocks * shape.rows
    stream = stream_of(device)
    ws = workspace_for(device, stream, n_rows, n_parts, acc.top_k, topk_block(acc.top_k))
    hist, counters = persistent_scratch(device, stream)
    flat_mask, flat_tokens = flat(mask).view(torch.uint8), flat(token_index)
    out = torch.empty(g.shape, dtype=g.dtype, device=device)
    scanned = False
    try:
        with on_device(device):
            launch_cuda_scan(kernel, shape, g2, g.shape[-2], flat_mask, flat_tokens, sample_index, acc, ws, stream,
                             up2, out.view(-1, width), fold=(counters, flat(input_ids)) if folds else None)
            scanned = True
            if not folds:
                fold(acc, ws, hist, counters, n_parts, width, n_rows, input_ids, stream, sum_private=False)
    except Exception as exc:
        forget_scratch()
        _after_scan(exc, scanned)
        raise
    scans["cuda"] += 1
    return out, ws.scan


def prebuild(device: torch.device, sites: list[tuple[int, bool, bool, int]]) -> None:
    """Start building, on background threads, the CUDA kernels that bf16 updates of these sites will
    launch: (width, massive, gated, top_k) each, `gated` for a SwiGLU gate read by `gated_update`.
    Returns at once; an update that comes first waits for its kernel (`nvrtc.built`). Off CUDA, or
    with the CUDA scan switched off, nothing is built."""
    if device.type != "cuda" or INTERPRET or switched_off("MAXACT_CARD_CUDA_SCAN"):
        return
    jobs: dict[tuple[object, ...], Callable[[], object]] = {}
    for width, massive, gated, top_k in sites:
        shape = scan_shape_for(width, gated=gated)
        if shape is None:
            continue
        key = (shape.group, shape.rows, shape.vec, massive, gated, scan_folds(top_k))
        jobs.setdefault(key, functools.partial(cuda_scan_kernel, device, shape, massive, 1, gated=gated,
                                               fold=key[-1]))
    if any(massive for _, massive, _, _ in sites):
        jobs[("row_medians",)] = functools.partial(row_medians_kernel, device)
    nvrtc.prebuild(list(jobs.values()))


def _after_scan(exc: Exception, scanned: bool) -> None:
    """Raise HistogramCounted for a failure after the CUDA scan (out of memory aside: the batch loop
    rolls the whole batch back)."""
    if scanned and not isinstance(exc, torch.OutOfMemoryError):
        raise HistogramCounted(f"the update failed after its scan: {exc!r}") from exc


__all__ = ["INTERPRET", "HistogramCounted", "available", "forget_scratch", "fused_update", "gated_update",
           "prebuild", "row_medians", "row_medians_kernel", "scans"]
