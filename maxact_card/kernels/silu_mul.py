"""silu(g) * up of a SwiGLU MLP in one pass over bf16, in CUDA C++ (`maxact_silu_mul_bf16`,
`cuda/silu_mul.cu` after the bf16 helpers of `cuda/bf16.cuh`), for an MLP none of whose sites is read
(where the gate is read, the gated scan makes the product: `update.gated_update`).

Rounded as eager torch rounds it: silu in float32 (as ATen's kernel writes it, x / (1 + exp(-x))) to
bf16, then the product in float32 to bf16, so a swapped MLP gives eager's bits.
"""

from __future__ import annotations

import ctypes
from typing import Any

import torch

from maxact_card.kernels.nvrtc import INTERPRET, driver_function, launch, on_device, sms, stream_of
from maxact_card.switches import switched_off

_silu_mul: dict[str, Any] = {"kernels": {}, "failed": False}


def silu_mul(g: torch.Tensor, up: torch.Tensor) -> torch.Tensor | None:
    """silu(g) * up in one pass, rounded as eager torch rounds it, for a SwiGLU MLP whose sites are not
    read (contiguous bf16 of one shape on CUDA); None where this kernel cannot run it."""
    if (g.dtype != torch.bfloat16 or up.dtype != g.dtype or up.shape != g.shape or not g.is_cuda
            or up.device != g.device or INTERPRET or switched_off("MAXACT_CARD_CUDA_SCAN")
            or not g.is_contiguous() or not up.is_contiguous() or g.numel() % 8
            or g.data_ptr() % 16 or up.data_ptr() % 16):
        return None
    func = driver_function(_silu_mul, g.device, ("bf16.cuh", "silu_mul.cu"), "maxact_silu_mul_bf16")
    if func is None:
        return None
    out = torch.empty_like(g)
    n8 = g.numel() // 8
    grid = max(1, min(-(-n8 // 256), 8 * sms(g.device)))
    values = (ctypes.c_void_p(g.data_ptr()), ctypes.c_void_p(up.data_ptr()), ctypes.c_void_p(out.data_ptr()),
              ctypes.c_longlong(n8))
    with on_device(g.device):
        launch(func, grid, 256, stream_of(g.device), values)
    return out
