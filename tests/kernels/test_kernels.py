"""The fused Triton kernels against the reference path (dense_scan + bincount), exactly.

No GPU here: the kernels run on Triton's CPU interpreter, which executes the same kernel code on CPU
tensors. The interpreter must be on before Triton is first imported, and by the time pytest imports
this module something else may have imported it: so the test below runs this module again in a
fresh process with TRITON_INTERPRET=1, where the other tests run. Tensors stay small because the
interpreter is slow.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

triton = pytest.importorskip("triton", reason="Triton is not installed: the fused kernels cannot run")

from maxact_card.kernels.encoding import HIST_BINS, HIST_NONFINITE, HIST_UNDERFLOW, PAD_KEY, abs_hist_keys
from maxact_card.measure import stats
from maxact_card.measure.stats import BatchContext, SiteStats, dense_scan
from tests import paths

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
EXACT = ("max", "min", "channel_max", "count", "hist", "nonfinite_tokens", "massive_tokens", "sample_max",
         "topk_key")


# The test extra pins Triton 3.9, whose interpreter runs these kernels; older interpreters (3.5 and
# 3.6, tried with NumPy 2.4) fail on the first loop of any kernel.
OLD_INTERPRETER = tuple(int(part) for part in triton.__version__.split(".")[:2]) < (3, 9)


@pytest.mark.skipif(INTERPRETED, reason="this is the process it starts")
@pytest.mark.skipif(OLD_INTERPRETER, reason=f"Triton {triton.__version__}'s interpreter cannot run them: needs 3.9")
def test_kernels_under_the_interpreter() -> None:
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__))], check=False,
        cwd=paths.ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and " failed" not in proc.stdout


@pytest.fixture(scope="module")
def kernels() -> Iterator[ModuleType]:
    """The kernels' dispatch (`maxact_card.kernels.update`), built for the interpreter, with SiteStats
    routed through it on CPU."""
    if not INTERPRETED:
        pytest.skip("run in a fresh process under Triton's interpreter by test_kernels_under_the_interpreter")
    from maxact_card.kernels import update as module

    assert module.INTERPRET
    stats.use_kernels(True)
    yield module
    stats.use_kernels(None)


# --- helpers -----------------------------------------------------------------------------------------
def _context(mask: torch.Tensor, offset: int = 0) -> BatchContext:
    b, t = mask.shape
    token_index = torch.arange(b * t).view(b, t) + offset
    return BatchContext(mask, token_index, torch.arange(b), token_index % 997)


def _present(t: torch.Tensor | None) -> torch.Tensor:
    assert t is not None
    return t


def _reference(x: torch.Tensor, mask: torch.Tensor, massive: bool) -> dict[str, torch.Tensor]:
    """Per-row and per-column results of dense_scan, and the bincount histogram of masked rows."""
    scan = dense_scan(x, mask, massive)
    tok_max, tok_min, signed, channel, valid, tok_sum, tok_sq, channel_max, keys = (
        _present(scan[i]) for i in (0, 1, 3, 4, 5, 6, 7, 8, 9)
    )
    hist = torch.bincount(keys.reshape(-1).long(), minlength=HIST_BINS + 1)[:HIST_BINS]
    assert keys.max() <= PAD_KEY
    per_row = {"max": tok_max, "min": tok_min, "signed": signed, "channel": channel, "sum": tok_sum,
               "sq": tok_sq, "valid": valid, "below": scan[10]}
    out = {name: t.reshape(-1) for name, t in per_row.items() if t is not None}
    return out | {"channel_max": channel_max, "hist": hist}


def _fused(kernels: ModuleType, x: torch.Tensor, mask: torch.Tensor, massive: bool,
           config: Any = None) -> tuple[dict[str, torch.Tensor], SiteStats]:
    """One fused update of a fresh accumulator whose top-K holds every valid row (16 rows at most).

    The scan leaves per-row extremes, moments and counts; each row's signed extreme and its first
    channel are found by the fold for the rows entering the top-K, so they are read from there.
    """
    n_rows = x.shape[0] * x.shape[1]
    assert n_rows <= 16
    acc = SiteStats(x.shape[-1], x.shape[0], "cpu", top_k=16, massive=massive)
    ctx = _context(mask)
    scan = kernels.fused_update(acc, x, mask, ctx.token_index, ctx.sample_index, ctx.input_ids, config=config)
    filled = acc.topk_key >= 0
    rows = 0xFFFFFFFF - (acc.topk_key[filled] & 0xFFFFFFFF)  # token index == row here
    signed = torch.full((n_rows,), float("nan"))
    channel = torch.full((n_rows,), -1, dtype=torch.int64)
    signed[rows] = acc.topk_value[filled]
    channel[rows] = acc.topk_channel[filled]
    out = {"max": scan.row_f[0], "min": scan.row_f[1], "signed": signed, "channel": channel,
           "sum": scan.row_f[2], "sq": scan.row_f[3], "valid": scan.row_i[0].bool(),
           "channel_max": acc.channel_max, "hist": acc.hist}
    if massive:
        out["below"] = scan.row_i[1].long()
    return out, acc


def _assert_matches(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], *, sums: bool = True) -> None:
    valid = want["valid"]
    assert torch.equal(got["valid"], valid)
    for name in ("max", "min", "signed", "channel"):  # only valid rows have defined extremes
        assert torch.equal(got[name][valid], want[name][valid]), name
    for name in ("sum", "sq") if sums else ():
        assert torch.allclose(got[name][valid], want[name][valid], rtol=1e-5, atol=1e-6), name
    assert torch.equal(got["channel_max"], want["channel_max"])
    assert torch.equal(got["hist"], want["hist"])
    if "below" in want:
        assert torch.equal(got["below"][valid], want["below"][valid])


def _planted(dtype: torch.dtype, width: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """[3, 5, width]: a scaled channel, an outlier, padding with huge values, inf/NaN, zero and -0 rows."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 5, width, generator=gen) * 2.0
    x[..., width // 3] *= 40.0  # a scaled channel
    x[1, 2, width - 2] = -700.0  # the outlier: row 7, last-but-one channel
    x[0, 3, 1] = float("inf")
    x[2, 1, 0] = float("nan")
    x[2, 2] = 0.0  # an all-zero row is valid
    x[0, 4] = -0.0  # so is a row of -0, whose largest |a| is +0
    x[2, 4] = 3.0e4  # padding holding huge values
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[2, 4] = False
    mask[1, 4] = False
    x[1, 4, 5] = float("nan")  # non-finite padding is not counted either
    return x.to(dtype), mask


# --- the scan against dense_scan ---------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [96, 1000])
def test_scan_matches_the_reference(kernels: ModuleType, dtype: torch.dtype, width: int) -> None:
    x, mask = _planted(dtype, width)
    got, acc = _fused(kernels, x, mask, massive=True)
    _assert_matches(got, _reference(x, mask, massive=True))
    # the outlier, exactly: value, row (token 7 of the run), channel
    assert float(acc.max) == float(x[mask & torch.isfinite(x).all(-1)].max())
    assert float(acc.topk_value[0]) == -700.0
    assert int(acc.topk_channel[0]) == width - 2
    assert int(acc.topk_key[0]) & 0xFFFFFFFF == 0xFFFFFFFF - 7
    # padding leaves no trace; inf and NaN of masked rows are counted, not measured
    assert int(acc.hist.sum()) == int(mask.sum()) * width
    assert int(acc.hist[HIST_NONFINITE]) == 2
    assert int(acc.nonfinite_tokens) == 2
    assert int(acc.count) == (int(mask.sum()) - 2) * width
    assert float(acc.channel_max.max()) < 3.0e4


def test_several_steps_per_row_and_ties(kernels: ModuleType) -> None:
    # a narrow block makes every row take many steps: ties across steps go to the first channel
    width = 200
    x = torch.zeros(2, 3, width)
    x[0, 0, [7, 70, 199]] = 5.0
    x[0, 0, [3, 130]] = -5.0
    x[0, 1, [150, 20]] = -2.0
    x[1, 2] = 1.0
    mask = torch.ones(2, 3, dtype=torch.bool)
    from maxact_card.kernels.scan import ScanConfig

    config = ScanConfig(block_n=2, block_h=64, num_warps=1)
    got, acc = _fused(kernels, x, mask, massive=False, config=config)
    _assert_matches(got, _reference(x, mask, massive=False))
    assert got["signed"][0] == 5.0 and got["channel"][0] == 7  # |5| ties |-5|: the positive one, first
    assert got["signed"][1] == -2.0 and got["channel"][1] == 20
    assert got["signed"][5] == 1.0 and got["channel"][5] == 0  # all equal: the first channel
    assert got["signed"][2] == 0.0 and got["channel"][2] == 0  # all zero
    assert int(acc.hist[HIST_UNDERFLOW]) == int((x == 0).sum())


@pytest.mark.parametrize("dtype", DTYPES)
def test_wider_than_one_block(kernels: ModuleType, dtype: torch.dtype) -> None:
    x, mask = _planted(dtype, 2100, seed=3)
    got, _ = _fused(kernels, x[:2], mask[:2], massive=True)
    _assert_matches(got, _reference(x[:2], mask[:2], massive=True))


@pytest.mark.filterwarnings("ignore:overflow encountered")
def test_histogram_edges_of_fp32_inputs(kernels: ModuleType) -> None:
    # rounding to bf16 decides the bin: ties to even, overflow to inf (counted as non-finite, while
    # the row stays valid), subnormals and zeros below the range, both ends of the range. (The row's
    # sum overflows or not depending on the order of addition: not compared here.)
    values = torch.tensor([1.0 + 2**-8, 1.0 + 3 * 2**-8, 1.0 + 2**-7 + 2**-9, 3.3e38, 3.4e38, -3.39e38,
                           1e-40, -0.0, 2.0**-32, 2.0**-33, 2.0**32, 2.0**31 * 1.99, 65504.0, -1.5e-5])
    x = values.repeat(2, 1).reshape(1, 2, -1)
    mask = torch.tensor([[True, False]])
    got, acc = _fused(kernels, x, mask, massive=False)
    _assert_matches(got, _reference(x, mask, massive=False), sums=False)
    assert torch.equal(acc.hist, torch.bincount(abs_hist_keys(values).long(), minlength=HIST_BINS))
    assert bool(got["valid"][0])


def test_massive_token_is_counted(kernels: ModuleType) -> None:
    width = 96
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 4, width, generator=gen) * 0.01
    x[1, 1, 17] = 2500.0  # |a| > 100 and > 1000 x the median |a| of its token
    x[0, 2, 3] = 150.0
    x[0, 2, : width // 2] = 0.5  # |a| > 100 but the median is large: not massive
    mask = torch.ones(2, 4, dtype=torch.bool)
    for dtype in DTYPES:
        xd = x.to(dtype)
        got, acc = _fused(kernels, xd, mask, massive=True)
        _assert_matches(got, _reference(xd, mask, massive=True))
        assert int(acc.massive_tokens) == 1
        assert int(got["below"][5]) == width - 1


def test_scratch_is_left_zeroed(kernels: ModuleType) -> None:
    from maxact_card.kernels.workspace import persistent_scratch

    x, mask = _planted(torch.bfloat16, 96)
    _fused(kernels, x, mask, massive=False)
    hist, counters = persistent_scratch(torch.device("cpu"))
    assert int(hist.abs().sum()) == 0 and counters.tolist() == [0, 0]


def test_available(kernels: ModuleType) -> None:
    assert kernels.available(torch.zeros(2, 3))
    assert not kernels.available(torch.zeros(2, 3, dtype=torch.int32))


# --- SiteStats through the kernels, field by field --------------------------------------------------
def _run(batches: list[tuple[torch.Tensor, torch.Tensor, int]], *, fused: bool, top_k: int,
         massive: bool) -> SiteStats:
    x0 = batches[0][0]
    acc = SiteStats(x0.shape[-1], sum(b[0].shape[0] for b in batches), x0.device, top_k=top_k, massive=massive)
    previous = stats._KERNELS["on"]
    stats.use_kernels(fused)
    try:
        first = 0
        for x, mask, offset in batches:
            ctx = _context(mask.cpu(), offset)
            ctx = BatchContext(mask, ctx.token_index.to(x.device), torch.arange(first, first + x.shape[0]).to(x.device),
                               ctx.input_ids.to(x.device))
            acc.update(x, ctx)
            first += x.shape[0]
    finally:
        stats.use_kernels(previous)
    return acc


def test_each_update_is_counted_under_the_code_that_ran_it(kernels: ModuleType) -> None:
    # what the results' run.forward.statistics reports: here the Triton scan (the CUDA one needs a
    # GPU), then the reference path with the kernels off
    x, mask = torch.randn(2, 4, 24), torch.ones(2, 4, dtype=torch.bool)
    before = stats.updates_by_path()
    _run([(x, mask, 0)], fused=True, top_k=4, massive=False)
    middle = stats.updates_by_path()
    _run([(x, mask, 0), (x, mask, 8)], fused=False, top_k=4, massive=False)
    after = stats.updates_by_path()
    assert {k: middle[k] - before[k] for k in before} == {"cuda": 0, "triton": 1, "torch": 0}
    assert {k: after[k] - middle[k] for k in before} == {"cuda": 0, "triton": 0, "torch": 2}


def _assert_same_stats(got: SiteStats, want: SiteStats, *, rel: float) -> None:
    for name in EXACT:
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    for name in ("sum", "sumsq"):
        assert float(getattr(got, name)) == pytest.approx(float(getattr(want, name)), rel=rel), name
    filled = want.topk_key >= 0
    for name in ("topk_value", "topk_channel", "topk_token_id", "topk_median"):
        assert torch.equal(getattr(got, name)[filled], getattr(want, name)[filled]), name


@pytest.mark.parametrize(("top_k", "massive", "dtype"), [(4, True, torch.bfloat16), (1, False, torch.float32),
                                                         (16, True, torch.float16)])
def test_site_stats_update_equals_the_reference_path(kernels: ModuleType, top_k: int, massive: bool,
                                                     dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(11)
    batches = []
    offset = 0
    for b, t in ((2, 5), (3, 4), (1, 6)):
        x = (torch.randn(b, t, 64, generator=gen) * 3).round() / 2  # rounded: ties between tokens
        x[0, 0, 9] = 40.0 + b  # a growing maximum: later batches enter the top-K
        mask = torch.ones(b, t, dtype=torch.bool)
        mask[-1, t - 1] = False
        x[-1, t - 1] = 1e6
        if b == 3:
            x[1, 1, 2] = float("nan")
        batches.append((x.to(dtype), mask, offset))
        offset += b * t
    x = batches[1][0].float()
    x[2, 0] = 0.0
    x[2, 1] = torch.where(torch.arange(64) == 33, 5000.0, 1e-3)  # a massive token
    batches[1] = (x.to(dtype), batches[1][1], batches[1][2])

    want = _run(batches, fused=False, top_k=top_k, massive=massive)
    got = _run(batches, fused=True, top_k=top_k, massive=massive)
    _assert_same_stats(got, want, rel=1e-6)
    if massive:
        assert int(got.massive_tokens) == 1


@pytest.mark.parametrize("top_k", [16, 40])
def test_top_k_across_selection_blocks(kernels: ModuleType, top_k: int) -> None:
    # 2,500 rows a batch: three selection programs of the fold, whose staged keys the last one
    # merges. The largest tokens are planted in every block, some beating the stored top-K in the
    # second batch and some not, with exact ties in |a| (broken towards the earlier token).
    from maxact_card.kernels import workspace

    assert workspace.BLOCK_R == 1024
    gen = torch.Generator().manual_seed(3)
    batches = []
    for k, offset in enumerate((0, 2500)):
        x = torch.randn(5, 500, 24, generator=gen)
        flat = x.view(-1, 24)
        for i, row in enumerate((3, 1000, 1023, 1024, 2047, 2048, 2499)):
            flat[row, (row + k) % 24] = (50.0 + i) * (1 + k) * (-1) ** i
        flat[1500, 5] = flat[1501, 7] = 200.0  # a tie
        mask = torch.ones(5, 500, dtype=torch.bool)
        mask[4, 400:] = False
        flat[2400, 0] = 1e6  # padding never counts
        batches.append((x.to(torch.bfloat16), mask, offset))
    want = _run(batches, fused=False, top_k=top_k, massive=False)
    got = _run(batches, fused=True, top_k=top_k, massive=False)
    _assert_same_stats(got, want, rel=1e-5)
    # the ties in token order, then the largest planted value outside the padding (row 2499 is
    # padding): row 2048 of the second batch
    assert got.topk_value[:5].tolist() == [200.0, 200.0, 200.0, 200.0, -110.0]
    assert got.topk_channel[:5].tolist() == [5, 7, 5, 7, (2048 + 1) % 24]
    _, counters = workspace.persistent_scratch(torch.device("cpu"))
    assert counters.tolist() == [0, 0]


# --- on a GPU, compiled for real (this process: no interpreter) ----------------------------------------
@pytest.mark.skipif(INTERPRETED or not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("massive", [False, True])
@pytest.mark.parametrize(("width", "cuda_scan", "top_k"), [
    # the CUDA scan, which folds the update itself: 128 threads per row, 256 (6 vectors each), 2 rows
    # of 64 and 4 rows of 32 per block
    (4096, True, 16), (12288, True, 16), (2048, True, 16), (1000, True, 5),
    (4096, True, 24),  # a top-K larger than the scan's own fold merges: the Triton fold after the scan
    (4096, False, 16),  # the Triton scan with the CUDA histogram
    (1001, False, 16),  # not divisible by 8: the Triton scan and the CUDA histogram's unvectorised path
])
def test_cuda_update_equals_the_reference_path(massive: bool, width: int, cuda_scan: bool, top_k: int,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from maxact_card.kernels import fold, histogram, scan, workspace

    if not cuda_scan:
        monkeypatch.setenv("MAXACT_CARD_CUDA_SCAN", "0")
    scan._cuda_scan["kernels"].clear()
    fold._fold_compiled["kernels"].clear()
    gen = torch.Generator().manual_seed(2)
    batches = []
    offset = 0
    for b, t in ((4, 512), (8, 256), (2, 700)):
        x = torch.randn(b, t, width, generator=gen) * torch.rand(width, generator=gen) * 4
        x[b - 1, 3, width // 5] = -300.0 * (1 + offset / 1000)
        x[0, 1] = torch.where(torch.arange(width) == 7, 4000.0, 1e-3)  # a massive token
        x[1, 2, 5] = float("nan")
        x[1, 2, 6], x[1, 2, 8] = 1e10, float("-inf")  # the overflow key, and a second non-finite value
        x[0, 9, 10], x[0, 9, 11] = 1e-12, -0.0  # the underflow key
        x[0, 6] = -0.0  # a row of -0: valid, its largest |a| is +0
        x[1, 4, width - 1] = 5000.0 * (1 + offset / 1000)  # the last channel, tied with an earlier one
        x[1, 4, 3] = 5000.0 * (1 + offset / 1000)
        mask = torch.ones(b, t, dtype=torch.bool)
        mask[-1, t // 2:] = False
        x[-1, t - 1] = 1e30
        batches.append((x.to(torch.bfloat16).cuda(), mask.cuda(), offset))
        offset += b * t
    want = _run(batches, fused=False, top_k=top_k, massive=massive)
    got = _run(batches, fused=True, top_k=top_k, massive=massive)

    assert stats._KERNELS["error"] is None and scan.available(batches[0][0])
    assert bool(scan._cuda_scan["kernels"]) == cuda_scan and not scan._cuda_scan["failed"]
    scan_folded = cuda_scan and top_k <= 16
    # a folding scan is built beside the scan without its fold (whose occupancy it keeps)
    built = {key[-1] for key in scan._cuda_scan["kernels"]}
    assert built == ({False, True} if scan_folded else {False} if cuda_scan else set())
    # otherwise every fold after the first was launched by the compiled kernel's own launcher
    assert fold._FOLD_RELAUNCH and not fold._fold_compiled["failed"]
    assert bool(fold._fold_compiled["kernels"]) != scan_folded
    _, counters = workspace.persistent_scratch(batches[0][0].device)
    assert counters.tolist() == [0, 0]
    if not cuda_scan:
        assert histogram._cuda_hist["kernels"] and not histogram._cuda_hist["failed"]
    _assert_same_stats(got, want, rel=1e-5)
    assert int(got.topk_channel[0]) == 3  # the largest token (the last batch's), at the first of its tied channels


# --- a SwiGLU MLP's product and its two sites in one pass (CUDA) ------------------------------------------
def _same_bits(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Equal bf16 values, NaN where NaN (its payload aside)."""
    nan = want.isnan()
    return bool(torch.equal(got.isnan(), nan)) and bool(torch.equal(got[~nan].view(torch.int16), want[~nan].view(torch.int16)))


def _gate_and_up(b: int, t: int, width: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.randn(b, t, width, generator=gen) * torch.rand(width, generator=gen) * 6
    up = torch.randn(b, t, width, generator=gen) * 2
    g[0, 1, 7] = 900.0  # a large gate: silu is the identity there
    g[0, 1, 8] = -900.0  # exp(900) overflows: silu is -0
    up[0, 2, 3] = 3000.0  # a large product
    g[1, 0, 4], g[1, 0, 5], g[1, 0, 6] = float("nan"), float("inf"), float("-inf")
    g[0, 3] = -0.0
    return g.to(torch.bfloat16).cuda(), up.to(torch.bfloat16).cuda()


@pytest.mark.skipif(INTERPRETED or not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_silu_mul_rounds_as_eager_torch() -> None:
    from maxact_card.kernels.silu_mul import silu_mul

    gen = torch.Generator().manual_seed(5)
    g, up = _gate_and_up(3, 333, 1024, gen)
    g.view(-1)[:65536] = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).cuda()
    got = silu_mul(g, up)  # every bf16 pattern as a gate, among others
    assert got is not None and got.shape == g.shape and got.dtype == torch.bfloat16
    assert _same_bits(got, torch.nn.functional.silu(g) * up)
    assert silu_mul(g.float(), up.float()) is None  # bf16 only
    assert silu_mul(g[..., :1000], up[..., :1000]) is None  # not contiguous


@pytest.mark.skipif(INTERPRETED or not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("width", [4096, 2047, 1, 2])
def test_cuda_row_medians_equal_torch(width: int) -> None:
    """The radix-select median kernel gives torch's lower median |a| of each chosen row, bit for bit:
    ties, -0 and +0, inf, subnormals, a row of one value, a NaN (NaN out), a strided view; rows of -1
    entries are left alone."""
    from maxact_card.kernels.row_medians import row_medians

    gen = torch.Generator().manual_seed(11)
    base = torch.randn(40, width + 8, generator=gen).to(torch.bfloat16)
    rows = base[:, 3 : 3 + width]  # a row stride that is not the width
    rows[1] = 0.0
    rows[2] = -rows[2]
    rows[3, : width // 2 + 1] = float("inf")
    rows[4, -1] = float("nan")
    rows[5] = torch.tensor(3.0).to(torch.bfloat16)
    rows[6] = torch.randint(-3, 4, (width,), generator=gen).to(torch.bfloat16) * 1e-40  # subnormals, ties
    rows[7, :: 2] = -0.0
    x2 = base.cuda()[:, 3 : 3 + width]
    source = torch.tensor([0, 1, -1, 2, 3, 4, 5, 6, 7, 39, -1, 20], dtype=torch.int64, device="cuda")
    median = torch.full((source.numel(),), -7.0, device="cuda")
    assert row_medians(x2, source, median)
    want = x2.index_select(0, source.clamp(min=0)).abs().median(dim=-1).values.float()
    want = torch.where(source >= 0, want, -7.0)
    assert torch.equal(median.isnan(), want.isnan()) and bool(median.isnan()[5])
    assert torch.equal(median.nan_to_num(0.0).view(torch.int32), want.nan_to_num(0.0).view(torch.int32))
    assert not row_medians(x2.float(), source, median)  # bf16 only


@pytest.mark.skipif(INTERPRETED or not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("massive", [False, True])
@pytest.mark.parametrize("width", [12288, 6144, 1000])
def test_cuda_gated_update_equals_the_product_then_an_update(massive: bool, width: int) -> None:
    """One pass over gate and up gives eager's product and the gate's statistics as scanning the gate
    apart (the reference path) gives them; padding rows get their product too."""
    from maxact_card.kernels import scan

    scan._cuda_scan["kernels"].clear()
    gen = torch.Generator().manual_seed(7)
    total = 4 + 8 + 2
    want, got = (SiteStats(width, total, "cuda", top_k=16, massive=massive) for _ in range(2))
    first = offset = 0
    for b, t in ((4, 512), (8, 256), (2, 700)):
        g, up = _gate_and_up(b, t, width, gen)
        mask = torch.ones(b, t, dtype=torch.bool)
        mask[-1, t // 2:] = False
        g[-1, t - 1] = 1e30  # padding: never counted, but its product is still made
        mask = mask.cuda()
        base = _context(mask.cpu(), offset)
        ctx = BatchContext(mask, base.token_index.cuda(), torch.arange(first, first + b).cuda(), base.input_ids.cuda())
        stats.use_kernels(False)
        try:
            want.update(g, ctx)
        finally:
            stats.use_kernels(None)
        out = stats.gated_update(got, g, up, ctx)
        assert out is not None, stats._KERNELS["error"]
        assert _same_bits(out, torch.nn.functional.silu(g) * up)
        first += b
        offset += b * t
    assert stats._KERNELS["error"] is None and not scan._cuda_scan["failed"]
    _assert_same_stats(got, want, rel=1e-5)
    assert float(got.max) == 900.0 and int(got.nonfinite_tokens) == 3


@pytest.mark.skipif(INTERPRETED or not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_measurement_through_the_gated_kernel_equals_the_hooks(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bf16 Llama measured with its MLPs swapped (the gate's statistics folded into the product's
    kernel) and with them kept (MAXACT_CARD_GATED=0): every statistic of every site the same."""
    from maxact_card.measure.loop import measure
    from tests import factory

    model = factory.build_model("llama").to("cuda", torch.bfloat16)
    gen = torch.Generator().manual_seed(4)
    ids = [torch.randint(3, factory.VOCAB, (n,), generator=gen).tolist() for n in (40, 17, 64, 33, 9, 50)]
    plan = [[0, 1, 2], [3, 4, 5]]
    from maxact_card.measure import hooks as hooks_mod

    folded: list[bool] = []
    real = hooks_mod.gated_update

    def counting(acc, g, up, ctx):  # type: ignore[no-untyped-def]
        out = real(acc, g, up, ctx)
        folded.append(out is not None)
        return out

    monkeypatch.setattr(hooks_mod, "gated_update", counting)
    runs = {}
    for gated in ("1", "0"):
        monkeypatch.setenv("MAXACT_CARD_GATED", gated)
        runs[gated] = measure(model, ids, batches=plan, device=torch.device("cuda")).stats
    # the gate of every MLP (2 layers) in each of the 2 batches went through the kernel
    assert folded == [True] * 4, stats._KERNELS["error"]
    for name, acc in runs["0"].items():
        other = runs["1"][name]
        for field in SiteStats.MERGE_OPS:
            a, b = getattr(other, field), getattr(acc, field)
            assert torch.equal(a, b) if field not in ("sum", "sumsq") else torch.allclose(a, b, rtol=1e-5), (name, field)


# --- a fold that fails: the reference path finishes the update, counting nothing twice ------------------
def _fold_fails_then_reference(x: torch.Tensor, mask: torch.Tensor, monkeypatch: pytest.MonkeyPatch,
                               kernels: ModuleType) -> None:
    failed: list[int] = []

    def failing_fold(*args: Any, **kwargs: Any) -> None:
        failed.append(1)
        raise RuntimeError("the fold would not compile")

    batches = [(x, mask, 0)]
    want = _run(batches, fused=False, top_k=8, massive=True)
    monkeypatch.setattr(kernels, "fold", failing_fold)
    got = _run(batches, fused=True, top_k=8, massive=True)  # restores the kernels' switch after
    assert failed == [1]
    _assert_same_stats(got, want, rel=1e-6)  # the histogram counted once


def test_a_failed_fold_after_the_triton_scan_counts_once(kernels: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    x, mask = _planted(torch.bfloat16, 96)
    _fold_fails_then_reference(x, mask, monkeypatch, kernels)


@pytest.mark.skipif(INTERPRETED or not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_failed_fold_after_the_cuda_scan_counts_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA scan adds the histogram itself: when the fold then fails, the reference path that
    finishes the update (here and in the gated update) must not add it again. (A scan that folds
    the update itself has no later step to fail: this is the scan followed by the Triton fold.)"""
    from maxact_card.kernels import update as kernels

    monkeypatch.setenv("MAXACT_CARD_SCAN_FOLD", "0")

    gen = torch.Generator().manual_seed(9)
    x = (torch.randn(4, 300, 4096, generator=gen) * 3).bfloat16().cuda()
    mask = torch.ones(4, 300, dtype=torch.bool, device="cuda")
    mask[3, 100:] = False
    _fold_fails_then_reference(x, mask, monkeypatch, kernels)

    g, up = _gate_and_up(2, 256, 6144, gen)
    mask = torch.ones(2, 256, dtype=torch.bool, device="cuda")
    base = _context(mask.cpu())
    ctx = BatchContext(mask, base.token_index.cuda(), torch.arange(2).cuda(), base.input_ids.cuda())
    want, got = (SiteStats(6144, 2, "cuda", top_k=8) for _ in range(2))
    stats.use_kernels(False)
    want.update(g, ctx)
    stats.use_kernels(None)
    try:
        out = stats.gated_update(got, g, up, ctx)
        error = stats._KERNELS["error"]
    finally:
        stats.use_kernels(None)
    assert out is not None and _same_bits(out, torch.nn.functional.silu(g) * up)
    assert "HistogramCounted" in str(error) and "would not compile" in str(error)
    _assert_same_stats(got, want, rel=1e-6)
