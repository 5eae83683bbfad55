"""Per-piece cost of one statistics update on one activation tensor, against a matmul of the same width.

    python bench/bench_stats.py --device cuda

Prints milliseconds per call for each piece of `SiteStats.update` and `QuantAccumulator.update`
on [tokens, width] bf16 tensors, so the expensive pieces show before and after a change.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from maxact_card import quant, stats  # noqa: E402


def bench(fn, device: torch.device, repeats: int = 20) -> float:  # type: ignore[no-untyped-def]
    for _ in range(3):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / repeats
    import time

    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t) * 1000 / repeats


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--widths", default="4096,12288")
    args = parser.parse_args()
    device = torch.device(args.device)
    for width in map(int, args.widths.split(",")):
        b, t = 8, args.tokens // 8
        x = torch.randn(b, t, width, device=device, dtype=torch.bfloat16)
        mask = torch.ones(b, t, dtype=torch.bool, device=device)
        mask[-1, t // 2:] = False
        w = torch.randn(width, width if width <= 4096 else 4096, device=device, dtype=torch.bfloat16)
        ctx = stats.BatchContext(mask, torch.arange(b * t, device=device).view(b, t), torch.arange(b, device=device),
                                 torch.zeros(b, t, dtype=torch.long, device=device))
        keys = stats.abs_hist_keys(x)
        acc = stats.SiteStats(width, 64, device)
        acc_m = stats.SiteStats(width, 64, device, massive=True)
        hist = torch.zeros(stats.HIST_BINS, dtype=torch.int64)
        hist[int(stats.abs_hist_keys(torch.tensor(1.0)))] = 1000
        qacc = quant.QuantAccumulator(quant.static_scales(8.0, hist, 0.999), device=device)
        pieces = {
            "matmul x@W (reference)": lambda: x @ w,
            "max+min with indices": lambda: (x.max(-1), x.min(-1)),
            "aminmax per token": lambda: torch.aminmax(x, dim=-1),
            "sum + norm per token": lambda: (x.sum(-1, dtype=torch.float32),
                                             torch.linalg.vector_norm(x, 2, -1, dtype=torch.float32)),
            "channel max (where+norm)": lambda: torch.linalg.vector_norm(
                torch.where(mask.unsqueeze(-1), x, 0).reshape(-1, width), ord=torch.inf, dim=0),
            "hist keys + where": lambda: torch.where(mask.unsqueeze(-1), stats.abs_hist_keys(x), 0),
            f"bincount {stats.HIST_BINS} bins": lambda: torch.bincount(keys.reshape(-1), minlength=stats.HIST_BINS),
            "bincount 4096 bins": lambda: torch.bincount((keys >> 3).reshape(-1), minlength=4096),
            "median |a| per token": lambda: x.abs().median(-1),
            "count |a| < max/1000 per token": lambda: (x.abs() < (x.amax(-1, keepdim=True).float() / 1000)).sum(-1),
            "topk over tokens": lambda: x.amax(-1).reshape(-1).topk(16),
            "SiteStats.update": lambda: acc.update(x, ctx),
            "SiteStats.update (massive)": lambda: acc_m.update(x, ctx),
            "QuantAccumulator.update": lambda: qacc.update(x, mask),
        }
        if device.type == "cuda":
            compiled = torch.compile(stats.dense_scan, dynamic=True)
            pieces["dense_scan compiled"] = lambda: compiled(x, mask, False)
            pieces["dense_scan eager"] = lambda: stats.dense_scan(x, mask, False)
        print(f"--- [{b}x{t}, {width}] bf16 on {device}")
        for name, fn in pieces.items():
            try:
                print(f"{name:32s} {bench(fn, device):8.3f} ms")
            except Exception as exc:  # noqa: BLE001 - report and go on
                print(f"{name:32s} failed: {type(exc).__name__}: {str(exc)[:120]}")


if __name__ == "__main__":
    main()
