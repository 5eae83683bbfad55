"""Per-piece cost of one statistics update on one activation tensor, against a matmul of the same width.

    python bench/bench_stats.py --device cuda
    python bench/bench_stats.py --device cuda --sweep     # also time other block shapes of the scan
    python bench/bench_stats.py --device cuda --check     # fused vs reference, field by field, first
    python bench/bench_stats.py --device cuda --gated --widths 6144,12288   # a SwiGLU MLP's two sites

Prints milliseconds per call (on CUDA, device time of its kernels) for each piece of `SiteStats.update` and `QuantAccumulator.update`
on [tokens, width] bf16 tensors, so the expensive pieces show before and after a change; then a
summary: `SiteStats.update` through the fused kernels (maxact_card.kernels) against the reference
path (compiled dense_scan + bincount), a same-size matmul and one read of the tensor (amax), with
massive sites on and off. On CPU the kernel rows are skipped.

--gated treats each width as a SwiGLU MLP's intermediate size and times its product with the
statistics of its two sites (the gate and the down_proj input): eager silu * up then a scan of each
(what the hooks do), against the gated kernel that makes the product and takes the gate's
statistics in one pass (`update.gated_update`) then a scan of the product; and the product alone,
eager and as one kernel.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from maxact_card import quant  # noqa: E402
from maxact_card.measure import stats
from maxact_card.switches import turned_off  # noqa: E402


def bench(fn, device: torch.device, repeats: int = 20) -> float:  # type: ignore[no-untyped-def]
    """Milliseconds per call. On CUDA: the device time of the kernels a call runs (torch.profiler), so
    that host time between launches, which `host time per update` reports apart, does not count."""
    for _ in range(3):
        fn()
    if device.type == "cuda":
        from bench_overhead import kernel_times

        def run() -> None:
            for _ in range(repeats):
                fn()
            torch.cuda.synchronize(device)

        torch.cuda.synchronize(device)
        return sum(ms for ms, _ in kernel_times(run).values()) / repeats
    import time

    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t) * 1000 / repeats


def _fused_rows(x: torch.Tensor, ctx: stats.BatchContext, width: int, device: torch.device,
                sweep: bool, cuda_sweep: bool) -> dict[str, Any]:
    from maxact_card.kernels import histogram, scan
    from maxact_card.kernels.update import fused_update

    rows: dict[str, Any] = {}
    for massive in (False, True):
        tag = " (massive)" if massive else ""
        acc = stats.SiteStats(width, 64, device, massive=massive)
        rows[f"fused scan+fold{tag}"] = lambda acc=acc: fused_update(
            acc, x, ctx.mask, ctx.token_index, ctx.sample_index, ctx.input_ids)
    x2 = x.reshape(-1, width)
    if histogram.cuda_histogram_ready(x2):
        counts = torch.zeros(stats.HIST_BINS, dtype=torch.int64, device=device)
        rows["CUDA |a| histogram alone"] = lambda: histogram.cuda_abs_histogram(
            x2, ctx.mask.reshape(-1), counts)
    if sweep:
        acc = stats.SiteStats(width, 64, device)
        default = scan.scan_config(width, x.element_size())
        for block_n in (1, 2, 4, 8, 16):
            for block_h in (256, 512, 1024, 2048):
                for warps in (4, 8):
                    cfg = scan.ScanConfig(block_n, block_h, warps)
                    tile = block_n * block_h
                    if not 1024 <= tile <= 4096 or block_h > _next_pow2(width) or cfg == default:
                        continue
                    rows[f"  scan+fold n={block_n} h={block_h} w={warps}"] = lambda cfg=cfg: fused_update(
                        acc, x, ctx.mask, ctx.token_index, ctx.sample_index, ctx.input_ids, config=cfg)
        rows[f"  (default n={default.block_n} h={default.block_h} w={default.num_warps})"] = rows["fused scan+fold"]
    if cuda_sweep and scan.cuda_scan_shape(x2) is not None:
        acc = stats.SiteStats(width, 64, device)
        default = scan.cuda_scan_shape(x2)
        for group in (32, 64, 128, 256, 512):
            for per_block in (1, 2, 4, 8):
                if group * 8 * 16 < width or group * 8 > 4 * width or not 128 <= group * per_block <= 512:
                    continue
                shape = scan.CudaScanShape(group, per_block, 0, 0)
                mark = " (default)" if default and (default.group, default.rows) == (group, per_block) else ""
                rows[f"  CUDA scan+fold, {group} threads x {per_block} rows{mark}"] = (
                    lambda shape=shape: fused_update(acc, x, ctx.mask, ctx.token_index, ctx.sample_index,
                                                     ctx.input_ids, config=shape))
    return rows


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _update(acc: stats.SiteStats, x: torch.Tensor, ctx: stats.BatchContext, fused: bool) -> None:
    stats.use_kernels(fused)
    acc.update(x, ctx)


def summary(x: torch.Tensor, w: torch.Tensor, ctx: stats.BatchContext, width: int, device: torch.device,
            sweep: bool, cuda_sweep: bool = False) -> None:
    """The fused update against the reference path, a matmul and one read of x, as ms and ratios."""
    b, t = x.shape[:2]
    matmul = bench(lambda: x @ w, device)
    read = bench(lambda: x.amax(), device)
    print(f"--- summary [{b}x{t}, {width}] bf16 on {device}")
    print(f"{'matmul x@W':44s} {matmul:8.3f} ms")
    print(f"{'one read of x (amax)':44s} {read:8.3f} ms   {read / matmul:6.2f}x matmul")
    kernels_ok = device.type == "cuda"
    if kernels_ok:
        try:
            import triton  # noqa: F401
        except ImportError:
            kernels_ok = False
    for massive in (False, True):
        tag = " (massive)" if massive else ""
        stats.use_compile(device.type == "cuda")
        old = stats.SiteStats(width, 64, device, massive=massive)
        t_old = bench(lambda old=old: _update(old, x, ctx, False), device)
        print(f"{'SiteStats.update, reference path' + tag:44s} {t_old:8.3f} ms   {t_old / matmul:6.2f}x matmul")
        if not kernels_ok:
            print(f"{'SiteStats.update, fused kernels' + tag:44s}  skipped: needs CUDA and Triton")
            continue
        new = stats.SiteStats(width, 64, device, massive=massive)
        t_new = bench(lambda new=new: _update(new, x, ctx, True), device)
        print(f"{'SiteStats.update, fused kernels' + tag:44s} {t_new:8.3f} ms   {t_new / matmul:6.2f}x matmul"
              f"   {t_new / read:6.2f}x one read   {t_old / t_new:6.1f}x faster")
        from maxact_card.kernels import fold, row_medians

        with turned_off("MAXACT_CARD_SCAN_FOLD"):  # the Triton fold after the scan
            t_apart = bench(lambda new=new: _update(new, x, ctx, True), device)
        print(f"{'  ... with the Triton fold after the scan' + tag:44s} {t_apart:8.3f} ms   "
              f"(the scan's own fold: {t_new / t_apart:.2f}x the device time)")
        small, small_ctx = x[:1, :8], ctx_rows(ctx, 1, 8)
        host = stats.SiteStats(width, 64, device, massive=massive)

        def host_update(host=host, small=small, small_ctx=small_ctx) -> None:  # type: ignore[no-untyped-def]
            _update(host, small, small_ctx, True)

        t_host = host_time(host_update, device)
        print(f"{'  host time per update, [1x8] rows' + tag:44s} {t_host:8.3f} ms   (the GPU work is negligible)")
        # the same with the fold a launch of its own: relaunched, then through Triton's JITFunction
        with turned_off("MAXACT_CARD_SCAN_FOLD"):  # the Triton fold after the scan
            t_relaunch = host_time(host_update, device)
            with failed(fold._fold_compiled):  # the relaunch off
                t_jit = host_time(host_update, device)
        print(f"{'  ... with the Triton fold after the scan' + tag:44s} {t_relaunch:8.3f} ms   "
              f"(the scan's own fold: {t_host / t_relaunch:.2f}x the host time)")
        print(f"{'  ... and that fold launched by Triton' + tag:44s} {t_jit:8.3f} ms   "
              f"(the fold's relaunch: {t_relaunch / t_jit:.2f}x the host time)")
        if massive:
            # the same, with the top-K medians left to torch (as when their kernel cannot be built)
            with failed(row_medians._row_median):
                t_torch = host_time(host_update, device)
            print(f"{'  ... with the top-K medians by torch' + tag:44s} {t_torch:8.3f} ms   "
                  f"(median kernel: {t_host / t_torch:.2f}x the host time)")
    stats.use_kernels(None)
    if kernels_ok:
        for name, fn in _fused_rows(x, ctx, width, device, sweep, cuda_sweep).items():
            try:
                ms = bench(fn, device)
                print(f"{name:44s} {ms:8.3f} ms   {ms / read:6.2f}x one read")
            except Exception as exc:  # noqa: BLE001 - report and go on
                print(f"{name:44s} failed: {type(exc).__name__}: {str(exc)[:120]}")


@contextlib.contextmanager
def failed(table: dict[str, Any]) -> Iterator[None]:
    """A kernel table marked failed for the block (its fallback runs), then as it was."""
    before = table["failed"]
    table["failed"] = True
    try:
        yield
    finally:
        table["failed"] = before


def ctx_rows(ctx: stats.BatchContext, b: int, t: int) -> stats.BatchContext:
    """The context of the first b x t tokens."""
    return stats.BatchContext(ctx.mask[:b, :t], ctx.token_index[:b, :t], ctx.sample_index[:b], ctx.input_ids[:b, :t])


def host_time(fn, device: torch.device, repeats: int = 200) -> float:  # type: ignore[no-untyped-def]
    """Wall milliseconds per call when calls are queued back to back: the host's cost, where the device keeps up."""
    import time

    for _ in range(5):
        fn()
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize(device)
    return (time.perf_counter() - start) * 1000 / repeats


def host_profile(x: torch.Tensor, ctx: stats.BatchContext, width: int, device: torch.device) -> None:
    """The 20 functions with the most own host time over 200 fused updates of [1x8] rows (massive sites)."""
    import cProfile
    import pstats

    small, small_ctx = x[:1, :8], ctx_rows(ctx, 1, 8)
    acc = stats.SiteStats(width, 64, device, massive=True)
    host_time(lambda: _update(acc, small, small_ctx, True), device, repeats=10)
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(200):
        _update(acc, small, small_ctx, True)
    torch.cuda.synchronize(device)
    profiler.disable()
    print(f"--- host profile, width {width}, 200 massive updates (cProfile adds its own overhead)")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(20)


def check(x: torch.Tensor, ctx: stats.BatchContext, width: int, device: torch.device) -> bool:
    """Fused and reference updates of the same batches, compared field by field; True when equal."""
    xs = [x, x * 3, x.flip(0)]
    xs[1][1, 7, width // 2] = -9000.0
    xs[2][0, 3, 11] = float("inf")
    ok = True
    for massive in (False, True):
        accs = []
        for fused in (False, True):
            acc = stats.SiteStats(width, 64, device, massive=massive)
            for i, xi in enumerate(xs):
                shifted = stats.BatchContext(ctx.mask, ctx.token_index + i * ctx.mask.numel(), ctx.sample_index,
                                             ctx.input_ids)
                _update(acc, xi, shifted, fused)
            accs.append(acc)
        stats.use_kernels(None)
        ref, got = accs
        for name in stats.SiteStats.MERGE_OPS:
            a, b = getattr(ref, name), getattr(got, name)
            if name in ("sum", "sumsq"):
                same = bool(torch.isclose(a, b, rtol=1e-5))
            elif name.startswith("topk") and name != "topk_key":
                filled = ref.topk_key >= 0
                same = torch.equal(a[filled], b[filled])
            else:
                same = torch.equal(a, b)
            if not same:
                ok = False
                print(f"check [{x.shape[0]}x{x.shape[1]}, {width}] massive={massive}: {name} differs")
    print(f"check [{x.shape[0]}x{x.shape[1]}, {width}]: {'fused == reference' if ok else 'MISMATCH'}")
    return ok


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--widths", default="4096,12288")
    parser.add_argument("--sweep", action="store_true", help="time other block shapes of the fused scan")
    parser.add_argument("--cuda-sweep", action="store_true",
                        help="time the CUDA scan at 32 to 512 threads per row and 1 to 8 rows per block")
    parser.add_argument("--check", action="store_true", help="compare fused and reference updates first")
    parser.add_argument("--summary-only", action="store_true", help="skip the per-piece table")
    parser.add_argument("--gated", action="store_true",
                        help="a SwiGLU MLP's product and its two sites: apart against one gated pass (CUDA)")
    parser.add_argument("--host-profile", action="store_true",
                        help="cProfile of the host side of fused updates on a few rows (where the host time goes)")
    args = parser.parse_args()
    device = torch.device(args.device)
    failed = False
    for width in map(int, args.widths.split(",")):
        b, t = 8, args.tokens // 8
        x = torch.randn(b, t, width, device=device, dtype=torch.bfloat16)
        mask = torch.ones(b, t, dtype=torch.bool, device=device)
        mask[-1, t // 2:] = False
        w = torch.randn(width, min(width, 4096), device=device, dtype=torch.bfloat16)
        ctx = stats.BatchContext(mask, torch.arange(b * t, device=device).view(b, t), torch.arange(b, device=device),
                                 torch.zeros(b, t, dtype=torch.long, device=device))
        if args.check and device.type == "cuda":
            failed |= not check(x, ctx, width, device)
        if not args.summary_only and not args.gated:
            pieces_table(x, w, mask, ctx, width, b, t, device)
        if args.host_profile and device.type == "cuda":
            host_profile(x, ctx, width, device)
        if args.gated and device.type == "cuda":
            failed |= not gated_table(x, ctx, width, device, args.cuda_sweep)
            continue
        summary(x, w, ctx, width, device, args.sweep, args.cuda_sweep)
    if failed:
        raise SystemExit(1)


def gated_table(g: torch.Tensor, ctx: stats.BatchContext, width: int, device: torch.device, sweep: bool) -> bool:
    """Times a SwiGLU MLP's product with its two sites' statistics: eager product then two scans, against
    the gated kernel (product and the gate's statistics in one pass) then a scan of the product.
    False if the two disagree."""
    from maxact_card.kernels.scan import CudaScanShape, cuda_scan_shape
    from maxact_card.kernels.silu_mul import silu_mul
    from maxact_card.kernels.update import fused_update, gated_update

    up = torch.randn_like(g)
    silu = torch.nn.functional.silu
    a_gate, a_prod, b_gate, b_prod = (stats.SiteStats(width, 64, device) for _ in range(4))

    def scan(acc: stats.SiteStats, x: torch.Tensor) -> None:
        fused_update(acc, x, ctx.mask, ctx.token_index, ctx.sample_index, ctx.input_ids)

    def gated(shape: Any = None, acc: stats.SiteStats = b_gate) -> torch.Tensor:
        done = gated_update(acc, g, up, ctx.mask, ctx.token_index, ctx.sample_index, ctx.input_ids,
                            shape=shape)
        assert done is not None
        return done[0]

    def apart() -> None:
        out = silu(g) * up
        scan(a_gate, g)
        scan(a_prod, out)

    def one_pass(shape: Any = None) -> None:
        scan(b_prod, gated(shape))

    apart()
    one_pass()
    same = torch.equal(gated(acc=stats.SiteStats(width, 64, device)), silu(g) * up)
    for name in ("max", "min", "channel_max", "count", "hist", "topk_key"):
        same &= torch.equal(getattr(a_gate, name), getattr(b_gate, name))
        same &= torch.equal(getattr(a_prod, name), getattr(b_prod, name))
    rows: dict[str, Any] = {
        "eager silu(g) * up": lambda: silu(g) * up,
        "silu_mul kernel": lambda: silu_mul(g, up),
        "scan+fold of g": lambda: scan(a_gate, g),
        "gated kernel: product and the gate's statistics": gated,
        "eager product, then scan+fold of gate and of product": apart,
        "gated kernel, then scan+fold of product": one_pass,
    }
    if sweep:
        default = cuda_scan_shape(g.reshape(-1, width), gated=True)
        for group in (128, 256, 512, 1024):
            for per_block in (1, 2):
                if group * 8 * 16 < width or group * 8 > 2 * width or group * per_block > 1024:
                    continue
                shape = CudaScanShape(group, per_block, 0, 0)
                mark = " (default)" if default and (default.group, default.rows) == (group, per_block) else ""
                rows[f"  gated kernel, {group} threads x {per_block} rows{mark}"] = lambda shape=shape: gated(shape)
    read_ms = bench(lambda: g.amax(), device)
    print(f"\n[{g.shape[0] * g.shape[1]}, {width}] bf16, SwiGLU product and its two sites "
          f"(one read of g: {read_ms:.3f} ms; product and statistics agree: {same})")
    times = {name: bench(fn, device) for name, fn in rows.items()}
    for name, ms in times.items():
        print(f"  {name:<58} {ms:8.3f} ms  {ms / read_ms:5.2f} reads")
    old, new = times["eager product, then scan+fold of gate and of product"], times["gated kernel, then scan+fold of product"]
    print(f"  one pass / apart: {new / old:.3f}x; statistics above the product: apart "
          f"{old - times['eager silu(g) * up']:.3f} ms, now {new - times['silu_mul kernel']:.3f} ms")
    return same


def pieces_table(x: torch.Tensor, w: torch.Tensor, mask: torch.Tensor, ctx: stats.BatchContext, width: int,
                 b: int, t: int, device: torch.device) -> None:
    """Milliseconds per call of each piece of the reference update."""
    keys = stats.abs_hist_keys(x)
    stats.use_kernels(False)
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
        "SiteStats.update (reference path)": lambda: acc.update(x, ctx),
        "SiteStats.update (reference, massive)": lambda: acc_m.update(x, ctx),
        "QuantAccumulator.update": lambda: qacc.update(x, mask),
    }
    if device.type == "cuda":
        compiled = torch.compile(stats.dense_scan, dynamic=True)
        pieces["dense_scan compiled"] = lambda: compiled(x, mask, False)
        pieces["dense_scan eager"] = lambda: stats.dense_scan(x, mask, False)
    print(f"--- [{b}x{t}, {width}] bf16 on {device}")
    for name, fn in pieces.items():
        try:
            print(f"{name:44s} {bench(fn, device):8.3f} ms")
        except Exception as exc:  # noqa: BLE001 - report and go on
            print(f"{name:44s} failed: {type(exc).__name__}: {str(exc)[:120]}")
    stats.use_kernels(None)


if __name__ == "__main__":
    main()
