"""SiteStats: exact planted values, the monoid laws, padding, histogram quantiles, non-finite counts."""

from __future__ import annotations

import itertools
import math
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from maxact_card.measure.stats import (
    HIST_BINS,
    BatchContext,
    SiteStats,
    abs_hist_keys,
    dense_scan,
    hist_bin_bounds,
    hist_bin_values,
    hist_quantile,
    nonfinite_count,
)

CPU = torch.device("cpu")
# The largest massive ratio is read from the top-K entries (topk_median), compared with them.
EXACT = (
    "max",
    "min",
    "channel_max",
    "count",
    "hist",
    "nonfinite_tokens",
    "massive_tokens",
    "sample_max",
    "topk_key",
)


def _batch(
    samples: list[torch.Tensor],
    rows: list[int],
    offsets: list[int],
    *,
    extra_pad: int = 0,
    pad_value: float = 0.0,
) -> tuple[torch.Tensor, BatchContext]:
    """Right-padded [B, T, H] batch of the given samples (each [len, H]) with its context."""
    width = max(samples[i].shape[0] for i in rows) + extra_pad
    hidden = samples[rows[0]].shape[1]
    x = torch.full((len(rows), width, hidden), pad_value, dtype=samples[rows[0]].dtype)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for r, i in enumerate(rows):
        n = samples[i].shape[0]
        x[r, :n] = samples[i]
        mask[r, :n] = True
    token_index = torch.tensor([offsets[i] for i in rows]).unsqueeze(1) + torch.arange(width)
    ids = token_index % 1000
    return x, BatchContext(mask, token_index, torch.tensor(rows), ids)


def _offsets(samples: list[torch.Tensor]) -> list[int]:
    out, total = [], 0
    for s in samples:
        out.append(total)
        total += s.shape[0]
    return out


def _accumulate(
    samples: list[torch.Tensor],
    groups: list[list[int]],
    *,
    top_k: int = 4,
    massive: bool = True,
    **pad: Any,
) -> SiteStats:
    acc = SiteStats(samples[0].shape[1], len(samples), CPU, top_k=top_k, massive=massive)
    offsets = _offsets(samples)
    for rows in groups:
        x, ctx = _batch(samples, rows, offsets, **pad)
        acc.update(x, ctx)
    return acc


def _assert_same_state(a: SiteStats, b: SiteStats) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    for name in EXACT:
        assert torch.equal(sa[name], sb[name]), name
    for name in ("sum", "sumsq"):
        assert float(sa[name]) == pytest.approx(float(sb[name]), rel=1e-9, abs=1e-300), name
    valid = sa["topk_key"] >= 0
    for name in ("topk_value", "topk_channel", "topk_token_id"):
        assert torch.equal(sa[name][valid], sb[name][valid]), name


# --- exact planted values ---------------------------------------------------------------------------
def test_planted_values_are_exact() -> None:
    # two samples; sample 1 has a padded tail of huge values
    x = torch.tensor(
        [
            [[1.0, -2.0, 0.5], [0.0, 3.0, -4.0], [2.0, 2.0, 2.0]],
            [[-6.0, 1.0, 1.0], [9.0, 9.0, 9.0], [1e30, -1e30, 1e30]],
        ]
    )
    mask = torch.tensor([[True, True, True], [True, False, False]])
    token_index = torch.tensor([[0, 1, 2], [3, 4, 5]])
    ids = torch.tensor([[10, 11, 12], [13, 14, 15]])
    acc = SiteStats(3, 2, CPU, top_k=3)
    acc.update(x, BatchContext(mask, token_index, torch.tensor([0, 1]), ids))
    valid = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0, -4.0, 2.0, 2.0, 2.0, -6.0, 1.0, 1.0])
    assert float(acc.max) == 3.0 and float(acc.min) == -6.0
    assert acc.channel_max.tolist() == [6.0, 3.0, 4.0]
    assert int(acc.count) == 12
    assert float(acc.sum) == float(valid.sum())
    assert float(acc.sumsq) == float(valid.square().sum())
    assert acc.sample_max.tolist() == [4.0, 6.0]
    # tokens 0 (|-2|) and 2 (|2|) tie at 2: the earlier one wins
    assert acc.topk_value.tolist() == [-6.0, -4.0, -2.0]
    assert acc.topk_channel.tolist() == [0, 2, 1]
    assert acc.topk_token_id.tolist() == [13, 11, 10]
    assert int(acc.hist.sum()) == 12  # padding leaves no trace in the histogram
    assert int(acc.hist[int(abs_hist_keys(torch.tensor(2.0)))]) == 4
    assert int(nonfinite_count(acc.hist)) == 0


def _key(value: float) -> int:
    return int(abs_hist_keys(torch.tensor([value]))[0])


def test_histogram_keys_ignore_sign_and_grow_with_magnitude() -> None:
    keys = abs_hist_keys(torch.tensor([1.0, -1.0, 0.0, -0.0, 2.0, -2.0]))
    assert keys.dtype == torch.int16
    assert keys[0] == keys[1] and keys[2] == keys[3] and keys[4] == keys[5]
    assert int(keys[2]) < int(keys[0]) < int(keys[4]) < HIST_BINS
    ladder = torch.logspace(-6, 6, 400, dtype=torch.float64).float()
    ladder_keys = abs_hist_keys(ladder).long()
    assert torch.all(ladder_keys[1:] >= ladder_keys[:-1])  # monotone in |a|
    assert _key(float("inf")) == _key(float("-inf")) == _key(float("nan"))
    assert _key(float("inf")) not in {int(k) for k in ladder_keys}


def test_histogram_bins_contain_their_values_and_are_narrow() -> None:
    lower, upper = hist_bin_bounds()
    values = hist_bin_values()
    assert lower.shape == upper.shape == values.shape == (HIST_BINS,)
    probe = torch.logspace(-6, 6, 997, dtype=torch.float64).float()
    rounded = probe.to(torch.bfloat16).double()  # keys are taken from the bf16 value
    keys = abs_hist_keys(probe).long()
    assert torch.all(lower[keys] <= rounded) and torch.all(rounded < upper[keys])
    assert torch.all(upper[keys] / lower[keys] - 1 <= 2**-6 + 1e-12)  # a bin is at most 1.6% wide
    assert torch.all((lower[keys] <= values[keys]) & (values[keys] <= upper[keys]))
    # the representative value is the geometric middle, within 0.8% of anything in the bin
    assert torch.allclose(values[keys], torch.sqrt(lower[keys] * upper[keys]), rtol=1e-12)
    assert float(values[_key(0.0)]) <= 1e-6  # zero reads as (nearly) zero


def test_hist_quantile_on_a_planted_histogram() -> None:
    hist = torch.bincount(abs_hist_keys(torch.tensor([1.0, 2.0, 3.0, 4.0])).long(), minlength=HIST_BINS)
    values = hist_bin_values()
    assert hist_quantile(hist, 0.5) == float(values[_key(2.0)])  # rank 2 of 4: the 2.0 bin
    assert hist_quantile(hist, 0.75) == float(values[_key(3.0)])
    assert hist_quantile(hist, 1.0) == float(values[_key(4.0)])
    assert hist_quantile(hist, 0.01) == float(values[_key(1.0)])
    assert hist_quantile(hist, 0.5) == pytest.approx(2.0, rel=0.01)
    assert math.isnan(hist_quantile(torch.zeros(HIST_BINS, dtype=torch.int64), 0.5))


def test_top_k_ties_go_to_the_earlier_token_whatever_the_batch_order() -> None:
    samples = [torch.tensor([[5.0, 1.0]]), torch.tensor([[1.0, -5.0]]), torch.tensor([[5.0, 0.0]])]
    forward = _accumulate(samples, [[0], [1], [2]], top_k=2, massive=False)
    backward = _accumulate(samples, [[2], [1], [0]], top_k=2, massive=False)
    for acc in (forward, backward):
        assert acc.topk_token_id.tolist() == [0, 1]  # run indices 0 and 1, not 2
        assert acc.topk_value.tolist() == [5.0, -5.0]
        assert acc.topk_channel.tolist() == [0, 1]
    _assert_same_state(forward, backward)


def test_massive_ratio_does_not_depend_on_batching() -> None:
    from maxact_card.measure.results import _top_ratio

    # token 0: |a| 1.5, median 0.25 -> ratio 6; token 1: |a| 2.25, median 0.5 -> ratio 4.5
    samples = [torch.tensor([[1.5, -0.25]]), torch.tensor([[-2.25, 0.5]])]
    for top_k, expected in ((1, 4.5), (2, 6.0)):  # read at the top-K tokens by |a|
        apart = _accumulate(samples, [[0], [1]], top_k=top_k)
        together = _accumulate(samples, [[0, 1]], top_k=top_k)
        assert _top_ratio(apart.state_dict()) == expected
        assert _top_ratio(together.state_dict()) == expected


def test_cpu_updates_take_the_reference_path_unless_asked() -> None:
    # the fused kernels run on CUDA; on CPU only through Triton's interpreter, when a test asks
    from maxact_card.measure.stats import _kernel_module

    assert _kernel_module(torch.zeros(2, 3, 4)) is None


def test_dense_scan_marks_non_finite_tokens_invalid() -> None:
    x = torch.tensor([[[1.0, float("nan")], [float("-inf"), 2.0], [3.0, -1.0]]])
    mask = torch.tensor([[True, True, False]])
    scan = dense_scan(x, mask, massive=False)
    valid = scan[5]
    assert valid is not None
    assert valid.tolist() == [[False, False, False]]
    assert scan[-1] is None  # no massive-activation test unless the site asks for it


# --- the monoid laws --------------------------------------------------------------------------------
@st.composite
def _corpora(draw: st.DrawFn) -> tuple[list[torch.Tensor], list[list[int]], list[list[int]]]:
    """Samples of random lengths (values rounded so ties happen) and two different batchings."""
    seed = draw(st.integers(0, 2**31 - 1))
    hidden = draw(st.integers(1, 6))
    lengths = draw(st.lists(st.integers(1, 5), min_size=1, max_size=7))
    scale = draw(st.sampled_from([1.0, 1e3]))
    gen = torch.Generator().manual_seed(seed)
    samples = [torch.round(torch.randn(n, hidden, generator=gen) * 4) / 4 * scale for n in lengths]
    order = draw(st.permutations(range(len(lengths))))
    cuts_a = sorted(draw(st.sets(st.integers(1, max(len(order) - 1, 1)), max_size=3)))
    cuts_b = sorted(draw(st.sets(st.integers(1, max(len(order) - 1, 1)), max_size=3)))

    def groups(cuts: list[int], seq: list[int]) -> list[list[int]]:
        bounds = [0] + [c for c in cuts if c < len(seq)] + [len(seq)]
        return [seq[a:b] for a, b in itertools.pairwise(bounds) if b > a]

    return samples, groups(cuts_a, list(range(len(lengths)))), groups(cuts_b, list(order))


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(_corpora(), st.integers(1, 6))
def test_merge_is_associative_and_batching_free(corpus: tuple, top_k: int) -> None:
    samples, groups_a, groups_b = corpus
    single = _accumulate(samples, [list(range(len(samples)))], top_k=top_k)
    sequential = _accumulate(samples, groups_b, top_k=top_k)
    parts = [_accumulate(samples, [g], top_k=top_k) for g in groups_a]
    left = parts[0]
    for p in parts[1:]:
        left = left.merge(p)
    right = parts[-1]
    for p in reversed(parts[:-1]):
        right = p.merge(right)
    swapped = parts[-1]
    for p in parts[:-1]:
        swapped = swapped.merge(p)
    for other in (sequential, left, right, swapped):
        _assert_same_state(single, other)


@settings(max_examples=30, deadline=None, database=None)
@given(_corpora())
def test_a_fresh_accumulator_is_the_identity(corpus: tuple) -> None:
    samples, groups, _ = corpus
    acc = _accumulate(samples, groups, top_k=3)
    fresh = SiteStats(acc.width, len(samples), CPU, top_k=3, massive=True)
    _assert_same_state(acc, acc.merge(fresh))
    _assert_same_state(acc, fresh.merge(acc))
    _assert_same_state(fresh, fresh.merge(SiteStats(acc.width, len(samples), CPU, top_k=3, massive=True)))


def test_state_dict_round_trip() -> None:
    samples = [torch.randn(4, 3, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    acc = _accumulate(samples, [[0, 1], [2]])
    copy = SiteStats(3, 3, CPU, top_k=4, massive=True)
    copy.load_state_dict({k: v.clone() for k, v in acc.state_dict().items()})
    _assert_same_state(acc, copy)
    assert set(acc.state_dict()) == set(SiteStats.MERGE_OPS)


# --- padding ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("pad_value", [1e30, -3e38, float("inf"), float("nan")])
def test_padding_changes_nothing(pad_value: float) -> None:
    gen = torch.Generator().manual_seed(7)
    samples = [torch.randn(n, 5, generator=gen) for n in (3, 1, 6, 2)]
    clean = _accumulate(samples, [[0], [1], [2], [3]])
    padded = _accumulate(samples, [[2, 0, 3, 1]], extra_pad=3, pad_value=pad_value)
    _assert_same_state(clean, padded)
    assert int(nonfinite_count(padded.hist)) == 0 and int(padded.nonfinite_tokens) == 0


# --- histogram quantiles ----------------------------------------------------------------------------
def _distributions() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    n = 200_000
    return {
        "normal": torch.randn(n, generator=gen),
        "lognormal": torch.randn(n, generator=gen).mul(2).exp(),
        "uniform": torch.rand(n, generator=gen) * 1e-3,
        "exponential": torch.empty(n).exponential_(generator=gen) * 300,
        "cauchy": torch.empty(n).cauchy_(generator=gen),
        "outliers": torch.cat([torch.randn(n, generator=gen) * 0.01, torch.full((50,), 2000.0)]),
    }


@pytest.mark.parametrize("name", list(_distributions()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hist_quantiles_within_two_percent(name: str, dtype: torch.dtype) -> None:
    values = _distributions()[name].to(dtype)
    acc = SiteStats(1, 1, CPU)
    x = values.reshape(1, -1, 1)
    acc.update(
        x,
        BatchContext(
            torch.ones(1, x.shape[1], dtype=torch.bool),
            torch.arange(x.shape[1]).unsqueeze(0),
            torch.tensor([0]),
            torch.zeros(1, x.shape[1], dtype=torch.long),
        ),
    )
    magnitudes = values.float().abs().double()
    for q in (0.01, 0.25, 0.5, 0.9, 0.99, 0.999, 0.9999):
        lower = float(torch.quantile(magnitudes, q, interpolation="lower"))
        higher = float(torch.quantile(magnitudes, q, interpolation="higher"))
        got = hist_quantile(acc.hist, q)
        assert lower * 0.98 <= got <= higher * 1.02, (name, q, got, lower, higher)


# --- non-finite -------------------------------------------------------------------------------------
def test_nonfinite_count() -> None:
    x = torch.tensor([1.0, float("inf"), float("-inf"), float("nan"), 3e38, 0.0])
    hist = torch.bincount(abs_hist_keys(x).long(), minlength=HIST_BINS)
    assert int(nonfinite_count(hist)) == 3
    assert int(nonfinite_count(torch.stack([hist, hist * 2]))[1]) == 6


def test_non_finite_tokens_through_update() -> None:
    x = torch.tensor([[[1.0, float("inf")], [2.0, -3.0], [float("nan"), float("nan")], [0.5, 0.5]]])
    mask = torch.tensor([[True, True, True, False]])
    acc = SiteStats(2, 1, CPU)
    acc.update(
        x, BatchContext(mask, torch.arange(4).unsqueeze(0), torch.tensor([0]), torch.zeros(1, 4).long())
    )
    assert int(nonfinite_count(acc.hist)) == 3
    assert int(acc.nonfinite_tokens) == 2
    assert float(acc.max) == 2.0 and float(acc.min) == -3.0
    assert int(acc.count) == 2
