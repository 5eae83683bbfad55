"""The |a| histogram of bf16 activations in CUDA C++ (`maxact_abs_hist_bf16`, `cuda/histogram.cu`), for
the rows the Triton scan takes (the CUDA scan counts its own).

Global atomics, one per element, are what the Triton scan spends most of its time on. A block-private
histogram in shared memory (4,099 x 4 bytes) takes those adds at shared-memory speed and is flushed with
one global add per non-empty bin. Measured on an H100 for [16384, 4096] bf16 (bench/bench_stats.py):
0.054 ms, about one read of the tensor; combining equal keys of a warp first (__match_any_sync) was ten
times slower, and two copies per block gained nothing. Triton (3.6) has no shared-memory atomics, so this
kernel is CUDA C++ compiled at run time by NVRTC through torch; where that is not possible the Triton scan
counts the histogram itself. MAXACT_CARD_CUDA_HIST=0 turns it off.
"""

from __future__ import annotations

import ctypes
from typing import Any

import torch

from maxact_card.kernels.encoding import abs_hist_counts
from maxact_card.kernels.nvrtc import (
    INTERPRET,
    built,
    compile_kernel,
    cuda_source,
    device_index,
    launch,
    program,
    sms,
    stream_of,
)
from maxact_card.switches import switched_off

_HIST_BLOCK = 512
_cuda_hist: dict[str, Any] = {"kernels": {}, "failed": False}


def _cuda_hist_kernel(device: torch.device) -> Any:
    """The NVRTC histogram kernel loaded on `device` (a CUDA module belongs to one device's context),
    or None where it cannot be built (then Triton counts)."""
    if switched_off("MAXACT_CARD_CUDA_HIST"):
        return None
    index = device_index(device)
    return built(_cuda_hist, index,
                 lambda: compile_kernel(index, program(cuda_source("histogram.cu")), "maxact_abs_hist_bf16"))


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


def _launch_cuda_hist(x2: torch.Tensor, mask: torch.Tensor, counts: torch.Tensor) -> None:
    """One launch of the histogram kernel through the driver, on the current stream of x2's device.

    torch's own launcher for these kernels builds its argument array anew on every call (about
    0.15 ms of host time); with hundreds of sites per forward pass that host time, not the GPU,
    set the pace for small models. This passes the same seven arguments straight to the driver.
    """
    kernel = _cuda_hist_kernel(x2.device)
    n_rows, width = x2.shape
    vec = int(width % 8 == 0 and x2.stride(0) % 8 == 0 and x2.data_ptr() % 16 == 0)
    grid = max(1, min(n_rows, 4 * sms(x2.device)))
    func = getattr(kernel, "func", None)
    if func is None:  # another torch: its own launcher
        kernel(grid=(grid, 1, 1), block=(_HIST_BLOCK, 1, 1),
               args=[x2.view(torch.int16), int(x2.stride(0)), int(n_rows), int(width), mask.view(torch.uint8),
                     counts, vec])
        return
    values = (ctypes.c_void_p(x2.data_ptr()), ctypes.c_int(x2.stride(0)), ctypes.c_int(n_rows), ctypes.c_int(width),
              ctypes.c_void_p(mask.data_ptr()), ctypes.c_void_p(counts.data_ptr()), ctypes.c_int(vec))
    launch(func, grid, _HIST_BLOCK, stream_of(x2.device), values)
