"""Fused kernels for `SiteStats.update`: every statistic of one activation in one or two launches.

One op per module; import what you need from it (importing this package imports nothing):

- `update`: the dispatch `SiteStats` calls (`fused_update`, `gated_update`, `available`): a scan, then
  the fold unless the scan folded itself.
- `scan`: the scan of an activation's rows, in Triton and (bf16) in CUDA C++, with its launches.
- `fold`: the Triton fold of a scan into the accumulator: scalars, private histograms, top-K merge.
- `histogram`: the |a| histogram of bf16 rows in CUDA C++, beside the Triton scan.
- `row_medians`: the median |a| of the new top-K rows of a massive site, in CUDA C++.
- `silu_mul`: a SwiGLU MLP's product in CUDA C++, rounded as eager torch rounds it.
- `workspace`: the accumulator's fields (`Accumulator`), the per-update buffers, the persistent scratch.
- `nvrtc`: compiling the CUDA C++ at run time and launching it; streams and devices.
- `encoding`: the histogram's keys and the massive thresholds, shared with the statistics (`measure/stats.py`).
- `cuda/`: the CUDA C++ sources (`nvrtc.program` joins a kernel's pieces).

Only `scan` and `fold` import Triton (`update` through them): `encoding` above all never does.
"""
