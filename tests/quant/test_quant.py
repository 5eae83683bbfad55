"""Scale policies and held-out quantization error, against planted and analytic answers."""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from maxact_card.errors import UsageError
from maxact_card.measure.stats import HIST_BINS, abs_hist_keys
from maxact_card.quant.heldout import QuantAccumulator, summarize
from maxact_card.quant.schemes import (
    FAIL,
    PASS,
    POLICY_ORDER,
    RECOMMENDATION_ORDER,
    SQNR_CAP_DB,
    STATIC_POLICIES,
    TOKEN_SQNR_BINS,
    QuantPolicy,
    Thresholds,
    quantize_fp8_e4m3,
    quantize_int8,
    static_scales,
)

MAXABS = QuantPolicy.INT8_STATIC_MAXABS
PERCENTILE = QuantPolicy.INT8_STATIC_PERCENTILE
MSE = QuantPolicy.INT8_STATIC_MSE
DYNAMIC = QuantPolicy.INT8_DYNAMIC_TOKEN
FP8 = QuantPolicy.FP8_E4M3_STATIC

RESULT_KEYS = {
    "scale",
    "clip",
    "sqnr_db",
    "rel_rmse",
    "rel_mae",
    "clip_rate",
    "token_sqnr_median_db",
    "token_sqnr_p05_db",
    "token_share_below",
    "tokens",
    "verdict",
}


def _hist(x: torch.Tensor) -> torch.Tensor:
    return torch.bincount(abs_hist_keys(x).flatten(), minlength=HIST_BINS)


def _calibrated(x: torch.Tensor, **kwargs: Any) -> dict[QuantPolicy, float]:
    return static_scales(float(x.abs().max()), _hist(x), **kwargs)


def _accumulate(
    x: torch.Tensor, scales: dict[QuantPolicy, float], mask: torch.Tensor | None = None
) -> QuantAccumulator:
    acc = QuantAccumulator(scales, device=x.device)
    acc.update(x, torch.ones(x.shape[:2], dtype=torch.bool, device=x.device) if mask is None else mask)
    return acc


def _same_scale(clip: float) -> dict[QuantPolicy, float]:
    """Every static policy clipping at `clip`."""
    return {p: clip / (448.0 if p is FP8 else 127.0) for p in STATIC_POLICIES}


def _assert_states_equal(a: QuantAccumulator, b: QuantAccumulator, rtol: float) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        if sa[name].dtype.is_floating_point:
            torch.testing.assert_close(sa[name], sb[name], rtol=rtol, atol=0.0, msg=name)
        else:
            assert torch.equal(sa[name], sb[name]), name


# --- enums and constants --------------------------------------------------------------------


def test_every_policy_has_a_place_everywhere() -> None:
    assert set(RECOMMENDATION_ORDER) == set(QuantPolicy) and len(RECOMMENDATION_ORDER) == len(QuantPolicy)
    assert set(POLICY_ORDER) == set(QuantPolicy)
    assert set(STATIC_POLICIES) == set(QuantPolicy) - {DYNAMIC}
    result = QuantAccumulator(_same_scale(1.0), device="cpu").result()
    assert set(result) == {p.value for p in QuantPolicy}
    assert all(set(figures) == RESULT_KEYS for figures in result.values())


def test_merge_ops_cover_the_state() -> None:
    acc = QuantAccumulator(_same_scale(1.0), device="cpu")
    assert set(QuantAccumulator.MERGE_OPS) == set(acc.state_dict())
    assert set(QuantAccumulator.MERGE_OPS.values()) == {"sum"}


# --- scales and quantizers: exact small cases -----------------------------------------------


def test_symmetric_scale_of_unit_range_is_one_over_127() -> None:
    x = torch.linspace(-1.0, 1.0, 201)
    scales = _calibrated(x)
    assert scales[MAXABS] == 1.0 / 127
    assert scales[FP8] == 1.0 / 448


def test_quantize_int8_known_values() -> None:
    x = torch.tensor([0.2, 0.25, 0.75, 1.0, -1.26, 100.0, -100.0, 0.0])
    # x / 0.5 = 0.4, 0.5, 1.5, 2, -2.52, 200, -200, 0 -> half to even, clamp at 127
    expected = torch.tensor([0.0, 0.0, 1.0, 1.0, -1.5, 63.5, -63.5, 0.0])
    assert torch.equal(quantize_int8(x, 0.5), expected)
    assert quantize_int8(x.to(torch.bfloat16), 0.5).dtype == torch.float32


def test_quantize_int8_broadcasts_a_per_token_scale() -> None:
    x = torch.tensor([[[1.0, -0.5], [10.0, 3.0]]])
    scale = torch.tensor([[[1.0 / 127], [10.0 / 127]]])
    xq = quantize_int8(x, scale)
    torch.testing.assert_close(xq[0, 0], torch.tensor([1.0, -64 / 127]))  # -63.5 rounds to even -64
    torch.testing.assert_close(xq[0, 1], torch.tensor([10.0, 10.0 * 38 / 127]))  # 38.1 -> 38


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1.0625, 1.0),  # halfway between 1.0 and 1.125 (spacing 2^-3 in [1, 2)): ties to even
        (1.1875, 1.25),  # halfway between 1.125 (odd mantissa) and 1.25: ties to even
        (1.0624, 1.0),
        (1.07, 1.125),
        (232.0, 224.0),  # halfway between 224 and 240 (spacing 16 in [128, 256)): to even
        (240.0, 240.0),
        (449.0, 448.0),  # saturation
        (1e4, 448.0),
        (-1e4, -448.0),
        (2.0**-6, 2.0**-6),  # smallest normal
        (0.0019, 2.0**-9),  # subnormals are multiples of 2^-9; 0.0019 * 512 = 0.97
        (2.0**-10, 0.0),  # halfway between 0 and 2^-9: to even (zero)
        (3 * 2.0**-10, 2.0**-8),  # halfway between 1 and 2 times 2^-9: to even
        (5 * 2.0**-9 + 0.4 * 2.0**-9, 5 * 2.0**-9),
        (0.0, 0.0),
    ],
)
def test_quantize_fp8_e4m3_known_values(value: float, expected: float) -> None:
    assert quantize_fp8_e4m3(torch.tensor([value]), 1.0).item() == expected
    assert quantize_fp8_e4m3(torch.tensor([2 * value]), 2.0).item() == 2 * expected


def test_clip_rate_of_a_known_tensor() -> None:
    x = torch.tensor([[[0.5, 1.5, -2.0, 0.9]]])
    result = _accumulate(x, _same_scale(1.0)).result()
    for policy in STATIC_POLICIES:
        assert result[policy.value]["clip_rate"] == 0.5
        assert result[policy.value]["clip"] == pytest.approx(1.0, rel=1e-15)
    assert result[DYNAMIC.value]["clip_rate"] == 0.0
    assert result[DYNAMIC.value]["scale"] is None and result[DYNAMIC.value]["clip"] is None


def test_zero_calibration_gives_tiny_positive_scales() -> None:
    for counts in (torch.zeros(HIST_BINS, dtype=torch.int64), _hist(torch.zeros(100))):
        scales = static_scales(0.0, counts)
        assert set(scales) == set(STATIC_POLICIES)
        assert all(math.isfinite(s) and 0 < s < 1e-20 for s in scales.values())
        # and quantizing real data with them yields numbers, not NaN
        result = _accumulate(torch.randn(1, 4, 8), scales).result()
        assert all(r["sqnr_db"] is not None for r in result.values())


def test_static_scales_rejects_bad_input() -> None:
    with pytest.raises(UsageError):
        static_scales(math.inf, torch.zeros(HIST_BINS, dtype=torch.int64))
    with pytest.raises(UsageError):
        static_scales(1.0, torch.zeros(10, dtype=torch.int64))
    with pytest.raises(UsageError):
        static_scales(1.0, torch.zeros(HIST_BINS, dtype=torch.int64), clip_quantile=0.0)
    with pytest.raises(UsageError):
        QuantAccumulator({MAXABS: 1.0}, device="cpu")
    with pytest.raises(UsageError):
        QuantAccumulator({**_same_scale(1.0), MSE: 0.0}, device="cpu")
    with pytest.raises(UsageError):
        Thresholds(min_token_sqnr_db=20.1)
    with pytest.raises(UsageError):
        Thresholds(min_token_share=1.5)


# --- calibration: percentile and MSE clips --------------------------------------------------


def test_percentile_clip_is_the_known_quantile() -> None:
    x = torch.linspace(1e-3, 1.0, 100_000)  # the q-quantile of |x| is q (to 1e-5)
    for q in (0.5, 0.9, 0.999):
        clip = static_scales(1.0, _hist(x), clip_quantile=q)[PERCENTILE] * 127
        assert clip == pytest.approx(q, rel=0.02)
    g = torch.Generator().manual_seed(1)
    gauss = torch.randn(200_000, generator=g)
    known = float(torch.quantile(gauss.abs(), 0.999))
    assert _calibrated(gauss)[PERCENTILE] * 127 == pytest.approx(known, rel=0.02)


def test_mse_clip_on_a_gaussian_lies_between_the_tail_and_the_max() -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1 << 18, generator=g)
    clip = _calibrated(x)[MSE] * 127
    assert float(torch.quantile(x.abs()[: 1 << 16], 0.99)) < clip < float(x.abs().max())


def test_mse_clip_beats_max_abs_with_one_huge_outlier() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1 << 18, generator=g)
    x[12345] = 200.0
    scales = _calibrated(x)
    assert scales[MSE] < scales[MAXABS]
    mse_error = (x - quantize_int8(x, scales[MSE])).square().mean()
    maxabs_error = (x - quantize_int8(x, scales[MAXABS])).square().mean()
    assert mse_error < 0.7 * maxabs_error


# --- analytic and planted failure modes -----------------------------------------------------


def test_uniform_tensor_reaches_the_8_bit_sqnr() -> None:
    # signal power 1/3, noise Δ²/12 with Δ = 1/127: SQNR = 10 log10(4 * 127²) = 48.10 dB
    theory = 10 * math.log10(4 * 127**2)
    assert theory == pytest.approx(48.10, abs=0.01)
    g = torch.Generator().manual_seed(4)
    x = torch.rand(64, 256, 64, generator=g) * 2 - 1
    result = _accumulate(x, _calibrated(x)).result()[MAXABS.value]
    assert result["sqnr_db"] == pytest.approx(theory, abs=0.5)
    assert result["clip_rate"] == 0.0
    assert result["verdict"] == PASS


def test_one_huge_outlier_breaks_both_static_int8_policies_but_not_dynamic() -> None:
    g = torch.Generator().manual_seed(5)
    calibration = torch.randn(2, 256, 64, generator=g)
    calibration[1, 17, 9] = 1000.0  # 1000 sigma
    held_out = torch.randn(2, 256, 64, generator=g)
    held_out[0, 100, 3] = 1000.0
    result = _accumulate(held_out, _calibrated(calibration)).result()

    maxabs = result[MAXABS.value]  # the bulk is quantized to zero: per-token figures collapse
    assert maxabs["verdict"] == FAIL
    assert maxabs["token_share_below"] > 0.95
    assert maxabs["token_sqnr_median_db"] < 5.0
    assert maxabs["rel_mae"] > 0.9

    percentile = result[PERCENTILE.value]  # the outlier is clipped: whole-tensor SQNR collapses
    assert percentile["verdict"] == FAIL
    assert percentile["sqnr_db"] < 3.0
    assert percentile["clip_rate"] > 0.0
    assert percentile["token_sqnr_median_db"] > 30.0

    dynamic = result[DYNAMIC.value]
    assert dynamic["verdict"] == PASS
    assert dynamic["sqnr_db"] > 30.0 and dynamic["token_share_below"] == 0.0
    assert dynamic["clip_rate"] == 0.0


def test_massive_tokens_fool_whole_tensor_sqnr_but_not_the_verdict() -> None:
    g = torch.Generator().manual_seed(6)
    x = torch.randn(1, 2000, 64, generator=g)
    x[0, [3, 500, 1000, 1500, 1999], 0] = 1e4
    result = _accumulate(x, _calibrated(x)).result()[MAXABS.value]
    assert result["sqnr_db"] >= 20.0  # passes on its own ...
    assert result["token_share_below"] > 0.99  # ... while ordinary tokens are all zeros
    assert result["token_sqnr_p05_db"] < 1.0
    assert result["tokens"] == 2000
    assert result["verdict"] == FAIL


def test_share_and_quantiles_read_from_a_planted_histogram() -> None:
    acc = QuantAccumulator(_same_scale(1.0), device="cpu")
    state = acc.state_dict()
    state["signal"] += 1000.0
    state["abs_sum"] += 100.0
    state["elements"] += 100
    state["noise"] += 1.0  # 30 dB everywhere
    bin_of = lambda db: 1 + round((db + 60.0) / 0.25)  # noqa: E731
    state["token_sqnr_hist"][:, bin_of(19.75)] = 1  # just below 20 dB
    state["token_sqnr_hist"][:, bin_of(20.0)] = 4  # exactly 20 dB: not below
    state["token_sqnr_hist"][:, bin_of(40.0)] = 95
    result = QuantAccumulator.from_state_dict(state, _same_scale(1.0)).result()[MAXABS.value]
    assert result["sqnr_db"] == pytest.approx(30.0)
    assert result["tokens"] == 100
    assert result["token_share_below"] == 0.01
    assert result["token_sqnr_p05_db"] == 20.0 and result["token_sqnr_median_db"] == 40.0
    assert result["verdict"] == PASS  # 99 of 100 tokens meet 20 dB: exactly the 0.99 share
    stricter = QuantAccumulator.from_state_dict(
        state, _same_scale(1.0), thresholds=Thresholds(min_token_sqnr_db=20.25)
    )
    assert stricter.result()[MAXABS.value]["verdict"] == FAIL


def test_exact_quantization_and_empty_accumulators_stay_json_safe() -> None:
    exact = torch.tensor([[[1.0, -1.0, 0.5, 0.0]], [[0.0, 0.0, 0.0, 0.0]]])  # on the 1/2 grid, one all-zero token
    result = _accumulate(exact, _same_scale(1.0)).result()
    fp8 = result[FP8.value]
    assert fp8["sqnr_db"] == SQNR_CAP_DB and fp8["rel_rmse"] == 0.0
    assert fp8["tokens"] == 1  # the all-zero token is left out
    assert fp8["token_sqnr_median_db"] == 140.0  # zero noise lands in the overflow bin
    empty = QuantAccumulator(_same_scale(1.0), device="cpu").result()
    assert all(r["verdict"] == FAIL and r["sqnr_db"] is None and r["tokens"] == 0 for r in empty.values())
    nan = torch.full((1, 2, 4), math.nan)
    poisoned = _accumulate(nan, _same_scale(1.0)).result()
    assert all(r["verdict"] == FAIL for r in poisoned.values())
    for document in (result, empty, poisoned):
        json.dumps(document, allow_nan=False)


# --- padding, batching, merging -------------------------------------------------------------


def test_padding_changes_nothing() -> None:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 10, 16, generator=g)
    mask = torch.rand(3, 10, generator=g) > 0.3
    scales = _same_scale(3.0)
    clean = _accumulate(torch.where(mask[..., None], x, 0.0), scales, mask)
    for junk in (1e6, math.inf, math.nan):
        padded = _accumulate(torch.where(mask[..., None], x, junk), scales, mask)
        _assert_states_equal(clean, padded, rtol=0.0)
    assert clean.result()[MAXABS.value]["tokens"] == int(mask.sum())


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**16),
    cuts=st.lists(st.integers(1, 7), min_size=0, max_size=4, unique=True),
)
def test_batches_then_merge_equal_one_update(seed: int, cuts: list[int]) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 12, 24, generator=g) * torch.rand(8, 12, 1, generator=g) * 10
    x[0, 0, 0] = 500.0
    mask = torch.rand(8, 12, generator=g) > 0.2
    scales = _calibrated(x[:4])  # calibrated on part: held-out values also clip
    whole = _accumulate(x, scales, mask)
    bounds = [0, *sorted(cuts), 8]
    merged = QuantAccumulator(scales, device="cpu")
    for start, stop in zip(bounds, bounds[1:]):
        merged = merged.merge(_accumulate(x[start:stop], scales, mask[start:stop]))
    _assert_states_equal(whole, merged, rtol=1e-6)


def _random_accumulator(seed: int, batch: int, tokens: int) -> QuantAccumulator:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, tokens, 8, generator=g) * 3
    return _accumulate(x, _same_scale(4.0), torch.rand(batch, tokens, generator=g) > 0.25)


@settings(max_examples=25, deadline=None)
@given(specs=st.lists(st.tuples(st.integers(0, 2**16), st.integers(1, 3), st.integers(1, 6)), min_size=3, max_size=3))
def test_merge_is_associative_with_an_identity(specs: list[tuple[int, int, int]]) -> None:
    a, b, c = (_random_accumulator(*spec) for spec in specs)
    _assert_states_equal(a.merge(b).merge(c), a.merge(b.merge(c)), rtol=1e-12)
    identity = QuantAccumulator(_same_scale(4.0), device="cpu")
    _assert_states_equal(a.merge(identity), a, rtol=0.0)
    _assert_states_equal(identity.merge(a), a, rtol=0.0)
    _assert_states_equal(a.merge(b), b.merge(a), rtol=1e-12)


def test_state_dict_round_trip_and_mismatched_merge() -> None:
    a = _random_accumulator(0, 2, 5)
    again = QuantAccumulator.from_state_dict(a.state_dict(), _same_scale(4.0), device="cpu")
    _assert_states_equal(a, again, rtol=0.0)
    assert again.result() == a.result()
    with pytest.raises(UsageError):
        a.merge(QuantAccumulator(_same_scale(5.0), device="cpu"))
    with pytest.raises(UsageError):
        QuantAccumulator.from_state_dict({"noise": torch.zeros(5)}, _same_scale(4.0))
    with pytest.raises(UsageError):
        a.update(torch.zeros(2, 3, 4), torch.ones(2, 4, dtype=torch.bool))


# --- no host synchronisation ----------------------------------------------------------------


def _refuse(name: str) -> Any:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"host synchronisation inside update(): Tensor.{name}")

    return refuse


@contextlib.contextmanager
def _no_host_sync(device: torch.device) -> Iterator[None]:
    if device.type == "cuda":
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode("default")
        return
    with pytest.MonkeyPatch.context() as patch:
        for name in ("item", "cpu", "tolist", "numpy", "__bool__", "__float__", "__int__"):
            patch.setattr(torch.Tensor, name, _refuse(name))
        yield


def test_the_sync_guard_bites() -> None:
    with _no_host_sync(torch.device("cpu")):
        with pytest.raises(AssertionError):
            bool(torch.tensor(True))
        with pytest.raises(AssertionError):
            torch.tensor(1.0).item()
    assert bool(torch.tensor(True))  # restored


@pytest.mark.parametrize("device", ["cpu", *(["cuda"] if torch.cuda.is_available() else [])])
def test_update_does_not_synchronise(device: str) -> None:
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, 7, 32, generator=g)
    mask = torch.rand(2, 7, generator=g) > 0.3
    acc = QuantAccumulator(_calibrated(x), device=device)
    x, mask = x.to(device, torch.bfloat16), mask.to(device)
    with _no_host_sync(torch.device(device)):
        acc.update(x, mask)
        acc.update(x, mask)
    assert acc.result()[DYNAMIC.value]["tokens"] == 2 * int(mask.sum())


def test_cuda_matches_cpu() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    g = torch.Generator().manual_seed(9)
    x = torch.randn(3, 20, 64, generator=g)
    x[1, 4, 7] = 300.0
    mask = torch.rand(3, 20, generator=g) > 0.2
    scales = _calibrated(x)
    cpu = _accumulate(x, scales, mask).result()
    cuda = _accumulate(x.cuda(), scales, mask.cuda()).result()
    for policy in POLICY_ORDER:
        for key, value in cpu[policy.value].items():
            if isinstance(value, float):
                assert cuda[policy.value][key] == pytest.approx(value, rel=1e-5, abs=0.25 if "token" in key else 0)
            else:
                assert cuda[policy.value][key] == value, (policy, key)


# --- summary across sites --------------------------------------------------------------------


def _figures(verdict: str, sqnr: float | None, p05: float | None) -> dict[str, Any]:
    return {"sqnr_db": sqnr, "token_sqnr_p05_db": p05, "verdict": verdict}


def _site(**overrides: dict[str, Any]) -> dict[str, dict[str, Any]]:
    site = {p.value: _figures(PASS, 40.0, 30.0) for p in QuantPolicy}
    site.update({key.replace("_", "-"): value for key, value in overrides.items()})
    return site


def test_summarize_picks_the_worst_site_and_the_recommendation() -> None:
    per_site = {
        "blocks.0.hook_resid_post": _site(**{"fp8_e4m3_static": _figures(PASS, 25.0, 21.0)}),
        "blocks.1.hook_resid_post": _site(
            **{
                "fp8_e4m3_static": _figures(FAIL, 35.0, 5.0),
                "int8_static_maxabs": _figures(FAIL, 10.0, 0.0),
            }
        ),
        "blocks.2.hook_resid_post": _site(
            **{
                "fp8_e4m3_static": _figures(FAIL, 30.0, 8.0),
                "int8_static_maxabs": _figures(FAIL, None, None),
            }
        ),
    }
    summary = summarize(per_site, peak_site="blocks.1.hook_resid_post")
    fp8 = summary["policies"][FP8.value]
    assert fp8["verdict"] == FAIL and fp8["failing_sites"] == 2
    # a failing site is worse than a passing one with a lower SQNR; then the lowest SQNR
    assert fp8["worst_site"] == "blocks.2.hook_resid_post"
    assert fp8["worst_sqnr_db"] == 25.0 and fp8["worst_token_sqnr_p05_db"] == 5.0
    maxabs = summary["policies"][MAXABS.value]
    assert maxabs["worst_site"] == "blocks.2.hook_resid_post"  # no figures at all is the worst
    assert maxabs["worst_sqnr_db"] == 10.0
    mse = summary["policies"][MSE.value]
    assert mse == {
        "verdict": PASS,
        "worst_site": "blocks.0.hook_resid_post",  # all tie: by name
        "worst_sqnr_db": 40.0,
        "worst_token_sqnr_p05_db": 30.0,
        "failing_sites": 0,
    }
    assert summary["recommended"] == MSE.value  # FP8 would come first, but it fails
    assert summary["peak_site"]["site"] == "blocks.1.hook_resid_post"
    assert summary["peak_site"]["policies"][FP8.value] == _figures(FAIL, 35.0, 5.0)
    json.dumps(summary, allow_nan=False)


def test_summarize_recommends_nothing_when_everything_fails_and_rejects_bad_input() -> None:
    failing = {p.value: _figures(FAIL, 5.0, 0.0) for p in QuantPolicy}
    summary = summarize({"a": failing, "b": _site()})
    assert summary["recommended"] is None and summary["peak_site"] is None
    assert all(p["worst_site"] == "a" for p in summary["policies"].values())
    only_dynamic = {p.value: _figures(FAIL if p is not DYNAMIC else PASS, 5.0, 0.0) for p in QuantPolicy}
    assert summarize({"a": only_dynamic})["recommended"] == DYNAMIC.value
    with pytest.raises(UsageError):
        summarize({})
    with pytest.raises(UsageError):
        summarize({"a": {FP8.value: _figures(PASS, 40.0, 30.0)}})
    with pytest.raises(UsageError):
        summarize({"a": _site()}, peak_site="b")


def test_summary_of_real_results_is_json_safe() -> None:
    g = torch.Generator().manual_seed(10)
    per_site = {}
    for name in ("blocks.0.hook_resid_post", "blocks.1.hook_resid_post"):
        x = torch.randn(2, 16, 32, generator=g)
        per_site[name] = _accumulate(x, _calibrated(x)).result()
    text = json.dumps(summarize(per_site), allow_nan=False)
    assert json.loads(text)["recommended"] in {p.value for p in QuantPolicy}
    assert TOKEN_SQNR_BINS == 802
