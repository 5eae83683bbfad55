"""The memory a fused update works in: the accumulator it folds into, the buffers one update leaves for
the next of its shape, and the scratch every update of a stream shares (left zeroed by each fold).

Nothing here is allocated per update: every site of a batch has the same rows, so one set of buffers
serves a whole forward pass, and updates on one stream run in order, so reuse never races.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from maxact_card.kernels.nvrtc import stream_of


class Accumulator(Protocol):
    """What a fused update folds into, in place (`SiteStats` is one): every tensor contiguous, on the
    activation's device, with the dtype given here; the top-K sorted by key, largest first."""

    top_k: int
    massive: bool  # whether the update counts massive tokens
    max: torch.Tensor  # float32 [], the largest value of a valid row
    min: torch.Tensor  # float32 []
    count: torch.Tensor  # int64 [], the elements of valid rows
    sum: torch.Tensor  # float64 []
    sumsq: torch.Tensor  # float64 []
    nonfinite_tokens: torch.Tensor  # int64 [], masked rows holding inf or NaN
    massive_tokens: torch.Tensor  # int64 []
    channel_max: torch.Tensor  # float32 [H], the largest |a| of each channel over valid rows
    sample_max: torch.Tensor  # float32 [samples], the largest |a| of each sample
    hist: torch.Tensor  # int64 [HIST_BINS], the |a| histogram of masked rows
    topk_key: torch.Tensor  # int64 [top_k]: |a| bits high, complement of the token's run index low; -1 empty
    topk_value: torch.Tensor  # float32 [top_k], the row's signed extreme
    topk_channel: torch.Tensor  # int64 [top_k], the first channel holding it
    topk_token_id: torch.Tensor  # int64 [top_k]
    topk_median: torch.Tensor  # float32 [top_k], the row's median |a| (massive sites)


# A private histogram: HIST_BINS counters, padding to a multiple of 8, then 32 spare counters that
# take the atomic add of every element that counts nowhere (padding, zeros, past the last channel),
# one per lane of a warp so that they land in one cache line: an unconditional atomic add is cheaper
# than a branch around each one. Spare counters are zeroed by the fold and never read.
HIST_SPARE = 4104
HIST_STRIDE = HIST_SPARE + 32
_HIST_COPIES_CUDA = 64  # private histograms: a bin is shared by 1/64 of the programs
_HIST_COPIES_CPU = 2
BLOCK_R = 1024  # rows per top-K selection program of the Triton fold, each staging block_k keys
_scratch: dict[Any, tuple[torch.Tensor, torch.Tensor]] = {}


def persistent_scratch(device: torch.device, stream: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The private histograms and the fold's two counters of `device`'s current stream, zeroed: the
    ticket (the Triton fold's, and a folding CUDA scan's) and the rows a folding scan staged.

    Every fold leaves them at zero again, so one allocation serves every update.
    """
    key = (device, stream_of(device) if stream is None else stream)
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


@dataclass(frozen=True)
class Workspace:
    scan: Scan
    row_key: torch.Tensor
    part_f: torch.Tensor
    part_i: torch.Tensor
    stage_key: torch.Tensor
    stage_row: torch.Tensor


_workspaces: dict[Any, Workspace] = {}
_MAX_WORKSPACES = 16


def workspace_for(device: torch.device, stream: int, n_rows: int, n_parts: int, top_k: int,
                  block_k: int) -> Workspace:
    """Per-row, per-program and staging buffers for one update, kept for the next of the same shape."""
    key = (device, stream, n_rows, n_parts, top_k)
    ws = _workspaces.get(key)
    if ws is None:
        if len(_workspaces) >= _MAX_WORKSPACES:
            _workspaces.clear()
        # staged top-K candidates: block_k per program of the Triton fold, or any row for a folding scan
        n_stage = max(-(-n_rows // BLOCK_R) * block_k, n_rows)
        ws = _workspaces[key] = Workspace(
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


def forget_scratch() -> None:
    """Drop the persistent scratch: after a failed launch it may hold counts that nobody folded."""
    _scratch.clear()
    _workspaces.clear()


def flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1) if t.is_contiguous() else t.contiguous().reshape(-1)


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """`x` as rows [N, H] with unit stride along them."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()
