"""The median |a| of chosen rows of bf16 activations in CUDA C++ (`maxact_row_median_bf16`,
`cuda/row_medians.cu`): the median of each new top-K token of a massive site, where Sun et al.'s ratio
is read.

In torch that is an index_select, abs, median, clamp and where per update, 0.13 to 0.25 ms of host time
(`bench/bench_stats.py --summary-only`); with a residual and an embedding site per layer, this one launch
takes their place. A radix select over the 15 magnitude bits of a bf16 (their order is the order of |a|):
a 256-bin count of the high 8 bits finds the bin that holds the lower median's rank, then a 128-bin count
of the low 7 bits within it.
"""

from __future__ import annotations

import ctypes
from typing import Any

import torch

from maxact_card.kernels.nvrtc import INTERPRET, driver_function, launch, on_device, stream_of
from maxact_card.switches import switched_off

_row_median: dict[str, Any] = {"kernels": {}, "failed": False}


def row_medians_kernel(device: torch.device) -> Any:
    """The kernel's driver handle on `device`, built on first use; None where it cannot be."""
    return driver_function(_row_median, device, ("row_medians.cu",), "maxact_row_median_bf16")


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
    func = row_medians_kernel(x2.device)
    if func is None:
        return False
    values = (ctypes.c_void_p(x2.data_ptr()), ctypes.c_longlong(x2.stride(0)), ctypes.c_int(x2.shape[-1]),
              ctypes.c_void_p(source.data_ptr()), ctypes.c_void_p(median.data_ptr()))
    try:
        with on_device(x2.device):
            launch(func, source.numel(), 256, stream_of(x2.device), values)
    except RuntimeError:  # a launch the driver refused did nothing: torch takes this and later updates
        _row_median["failed"] = True
        return False
    return True
