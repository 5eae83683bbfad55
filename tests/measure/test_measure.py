"""The measurement loop against planted answers and a naive reference that keeps every tensor."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from maxact_card import corpus as corpus_mod
from maxact_card.cli import app
from maxact_card.measure.loop import measure
from maxact_card.measure.results import TOP_CHANNELS, bootstrap_max, build_results
from maxact_card.measure.stats import BatchContext, SiteStats, nonfinite_count
from tests import factory
from tests.factory import TEXTS, write_corpus

CPU = torch.device("cpu")
QUANTILES = {"median": 0.5, "q0.99": 0.99, "q0.999": 0.999, "q0.9999": 0.9999}


# --- helpers --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return factory.tokenizer()


@pytest.fixture(scope="module")
def token_ids(tokenizer: Any) -> list[list[int]]:
    return [tokenizer(t)["input_ids"] for t in TEXTS]




def _llama(layers: int = 3, seed: int = 0) -> Any:
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=factory.VOCAB,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return transformers.LlamaForCausalLM(config).eval()


def _results(
    model: nn.Module, ids: list[list[int]], batches: list[list[int]], top_k: int = 16
) -> dict[str, Any]:
    m = measure(model, ids, batches=batches, device=CPU, pad_token_id=0, top_k=top_k)
    return build_results(
        m,
        model_info={},
        run_info={"versions": {"maxact_card": "test"}},
        corpus_info={},
        sample_ids=[f"s{i}" for i in range(len(ids))],
        decode=str,
        seed=0,
    )


def _first_occurrence(ids: list[list[int]], token: int) -> tuple[int, int]:
    for s, seq in enumerate(ids):
        if token in seq:
            return s, seq.index(token)
    raise AssertionError(f"token {token} not in the corpus")


def _planted_token(ids: list[list[int]]) -> int:
    """A token absent from the first sample that occurs in at least two others (a non-trivial location)."""
    special = {0, 1, 2}
    candidates = sorted(
        t
        for t in {t for seq in ids[1:] for t in seq}
        if t not in special and t not in ids[0] and sum(t in seq for seq in ids) >= 2
    )
    assert candidates, "the corpus needs a token repeated outside the first sample"
    return candidates[0]


def _invoke(args: list[str], **kw: Any) -> Any:
    return CliRunner().invoke(app, args, **kw)


# --- the naive reference: every tensor kept, statistics on the host -----------------------------
def _llama_spec(model: Any) -> dict[str, tuple[Any, str]]:
    """Site → (module, what to read), written out by hand from LLaMA's structure."""
    spec: dict[str, tuple[Any, str]] = {"hook_embed": (model.model.embed_tokens, "out")}
    for i, layer in enumerate(model.model.layers):
        spec[f"blocks.{i}.hook_resid_post"] = (layer, "out")
        spec[f"blocks.{i}.hook_attn_out"] = (layer.self_attn, "out")
        spec[f"blocks.{i}.hook_mlp_out"] = (layer.mlp, "out")
        spec[f"blocks.{i}.mlp.hook_pre"] = (layer.mlp.gate_proj, "out")
        spec[f"blocks.{i}.mlp.hook_post"] = (layer.mlp.down_proj, "in")
    spec["ln_final.hook_normalized"] = (model.model.norm, "out")
    return spec


def _reference(model: Any, ids: list[list[int]], spec: dict[str, tuple[Any, str]]) -> dict[str, torch.Tensor]:
    """Every site's activations over the corpus as one [tokens, width] tensor, in run order."""
    store: dict[str, list[torch.Tensor]] = {name: [] for name in spec}
    handles = []
    for name, (module, read) in spec.items():

        def grab(t: Any, name: str = name) -> None:
            t = t[0] if isinstance(t, tuple) else t
            store[name].append(t.detach()[0].clone())

        if read == "in":
            handles.append(module.register_forward_pre_hook(lambda m, a, g=grab: g(a)))
        else:
            handles.append(module.register_forward_hook(lambda m, a, o, g=grab: g(o)))
    try:
        with torch.no_grad():
            for seq in ids:
                x = torch.tensor([seq])
                model.model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {name: torch.cat(parts) for name, parts in store.items()}


def _reference_site(a: torch.Tensor, ids: list[list[int]], top_k: int, massive: bool) -> dict[str, Any]:
    meta = [(s, p, t) for s, seq in enumerate(ids) for p, t in enumerate(seq)]
    a64 = a.double()
    tok_abs, tok_channel = a.abs().max(dim=1)
    order = sorted(range(a.shape[0]), key=lambda i: (-float(tok_abs[i]), i))  # ties: the earlier token
    top = []
    for i in order[:top_k]:
        s, p, t = meta[i]
        c = int(tok_channel[i])
        top.append(
            {
                "abs": float(tok_abs[i]),
                "value": float(a[i, c]),
                "sample": s,
                "position": p,
                "channel": c,
                "token_id": t,
            }
        )
    ch_max = a.abs().amax(dim=0)
    ch_vals, ch_idx = ch_max.topk(min(TOP_CHANNELS, a.shape[1]))
    out: dict[str, Any] = {
        "max": float(a.max()),
        "min": float(a.min()),
        "max_abs": float(a.abs().max()),
        "top": top,
        "count": a.numel(),
        "mean": float(a64.mean()),
        "rms": float(a64.square().mean().sqrt()),
        "top_channels": list(zip(ch_idx.tolist(), ch_vals.tolist())),
        "abs": a.abs().flatten().double(),
    }
    if massive:
        median = a.abs().median(dim=1).values
        hit = (tok_abs > 100) & (tok_abs > 1000 * median)
        out["massive"] = int(hit.sum())
    return out


def _bracket_quantile(values: torch.Tensor, q: float) -> tuple[float, float]:
    lower = float(torch.quantile(values, q, interpolation="lower"))
    higher = float(torch.quantile(values, q, interpolation="higher"))
    return lower, higher


# --- (a) a planted maximum, located exactly --------------------------------------------------------
PLANT_CHANNEL = 7
PLANT_VALUE = 5000.0


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory: pytest.TempPathFactory, token_ids: list[list[int]]) -> dict[str, Any]:
    tok = _planted_token(token_ids)

    def edit(model: Any) -> None:
        model.model.embed_tokens.weight[tok, PLANT_CHANNEL] = PLANT_VALUE
        for layer in model.model.layers:  # no sub-layer writes: the residual stream is the embedding
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()

    root = tmp_path_factory.mktemp("planted")
    ckpt = factory.save("llama", root / "ckpt", edit=edit)
    corpus = write_corpus(root / "c.jsonl")
    res = _invoke(
        ["measure", str(ckpt), "--corpus", str(corpus), "--format", "json", "--out", str(root / "r.json")]
    )
    assert res.exit_code == 0, res.stderr
    return {"token": tok, "doc": json.loads(res.stdout), "ckpt": ckpt, "corpus": corpus}


def test_planted_embedding_is_the_global_max_at_its_first_occurrence(
    planted_run: dict[str, Any], token_ids: list[list[int]]
) -> None:
    tok, doc = planted_run["token"], planted_run["doc"]
    g = doc["global"]
    sample, position = _first_occurrence(token_ids, tok)
    assert sample >= 1  # the sample index is exercised, not just position
    assert g["max_abs"] == PLANT_VALUE and g["value"] == PLANT_VALUE
    assert g["site"] == "hook_embed" and g["component"] == "embedding" and g["module"] == "model.embed_tokens"
    loc = g["location"]
    assert (loc["sample"], loc["position"], loc["channel"], loc["token_id"]) == (
        sample,
        position,
        PLANT_CHANNEL,
        tok,
    )
    assert loc["sample_id"] == f"line-{sample + 1}"
    # every occurrence of the token ties at the embedding; the top-K lists them in run order
    occurrences = [(s, p) for s, seq in enumerate(token_ids) for p, t in enumerate(seq) if t == tok]
    embed = next(s for s in doc["sites"] if s["name"] == "hook_embed")
    tied = [
        (e["location"]["sample"], e["location"]["position"])
        for e in embed["top_k"]
        if e["abs"] == PLANT_VALUE
    ]
    assert tied == occurrences
    # the residual stream carries the plant unchanged, and every occurrence is massive there
    for i in range(2):
        resid = next(s for s in doc["sites"] if s["name"] == f"blocks.{i}.hook_resid_post")
        assert resid["max_abs"] == PLANT_VALUE
        assert resid["massive"]["tokens"] == len(occurrences)
        assert (resid["location"]["sample"], resid["location"]["position"]) == (sample, position)
        attn = next(s for s in doc["sites"] if s["name"] == f"blocks.{i}.hook_attn_out")
        assert attn["max_abs"] == 0.0
    assert doc["massive"]["tokens"] == 2 * len(occurrences)
    assert doc["massive"]["layers"] == [0, 1]


def test_location_indexes_the_selected_samples(
    planted_run: dict[str, Any], token_ids: list[list[int]]
) -> None:
    tok = planted_run["token"]
    corpus = corpus_mod.load_corpus(str(planted_run["corpus"]))
    # a seed whose selection drops an earlier sample, so selected and corpus indices differ
    for seed in range(50):
        chosen = [int(s.id.split("-")[1]) - 1 for s in corpus_mod.select(corpus, 3, seed)]
        holding = [k for k, i in enumerate(chosen) if tok in token_ids[i]]
        if holding and holding[0] != chosen[holding[0]]:
            break
    else:
        raise AssertionError("no seed gives a useful selection")
    k = holding[0]
    res = _invoke(
        [
            "measure",
            str(planted_run["ckpt"]),
            "--corpus",
            str(planted_run["corpus"]),
            "--format",
            "json",
            "--samples",
            "3",
            "--seed",
            str(seed),
            "--batch-size",
            "2",
        ]
    )
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    loc = doc["global"]["location"]
    assert doc["global"]["max_abs"] == PLANT_VALUE and doc["run"]["samples"] == 3
    assert (loc["sample"], loc["sample_id"]) == (k, f"line-{chosen[k] + 1}")
    assert loc["position"] == token_ids[chosen[k]].index(tok) and loc["token_id"] == tok


# --- (b) every statistic of every site against the naive reference -------------------------------
@pytest.fixture(scope="module")
def reference_model(token_ids: list[list[int]]) -> Any:
    model = _llama(layers=3)
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight[5] *= 500.0
        model.model.embed_tokens.weight[_planted_token(token_ids), 11] = 1000.0  # massive tokens exist
    return model


def test_every_site_matches_the_naive_reference(reference_model: Any, token_ids: list[list[int]]) -> None:
    top_k = 8
    doc = _results(reference_model, token_ids, [[i] for i in range(len(token_ids))], top_k=top_k)
    ref = _reference(reference_model, token_ids, _llama_spec(reference_model))
    assert {s["name"] for s in doc["sites"]} == set(ref)
    massive_seen = 0
    for site in doc["sites"]:
        name = site["name"]
        r = _reference_site(
            ref[name], token_ids, top_k, massive=site["component"] in ("residual", "embedding")
        )
        assert site["width"] == ref[name].shape[1], name
        for key in ("max", "min", "max_abs", "mean", "rms"):
            assert site[key] == pytest.approx(r[key], rel=1e-5, abs=1e-12), (name, key)
        assert site["count"] == r["count"], name
        got_top = [
            (
                e["location"]["sample"],
                e["location"]["position"],
                e["location"]["channel"],
                e["location"]["token_id"],
            )
            for e in site["top_k"]
        ]
        want_top = [(e["sample"], e["position"], e["channel"], e["token_id"]) for e in r["top"]]
        assert got_top == want_top, name
        assert [e["value"] for e in site["top_k"]] == pytest.approx([e["value"] for e in r["top"]], rel=1e-5)
        loc = site["location"]
        assert (loc["sample"], loc["position"], loc["channel"]) == want_top[0][:3], name
        assert [c["channel"] for c in site["top_channels"]] == [c for c, _ in r["top_channels"]], name
        assert [c["max_abs"] for c in site["top_channels"]] == pytest.approx(
            [v for _, v in r["top_channels"]], rel=1e-5
        )
        for key, q in QUANTILES.items():
            lower, higher = _bracket_quantile(r["abs"], q)
            assert lower * 0.98 <= site["quantiles"][key] <= higher * 1.02, (name, key, lower, higher)
        assert site["non_finite"] == {"elements": 0, "tokens": 0}
        if "massive" in r:
            assert site["massive"]["tokens"] == r["massive"], name
            massive_seen += r["massive"]
        else:
            assert site["massive"] is None
    assert massive_seen > 0  # the comparison of massive counts is not vacuous
    # the scaled o_proj row is where layer 1's attention output peaks
    attn1 = next(s for s in doc["sites"] if s["name"] == "blocks.1.hook_attn_out")
    assert attn1["location"]["channel"] == 5


# --- (c) without hooks: output_hidden_states --------------------------------------------------------
def test_residual_sites_agree_with_output_hidden_states(
    reference_model: Any, token_ids: list[list[int]]
) -> None:
    doc = _results(reference_model, token_ids, [[i] for i in range(len(token_ids))])
    by = {s["name"]: s for s in doc["sites"]}
    hidden: list[list[torch.Tensor]] = []
    with torch.no_grad():
        for seq in token_ids:
            out = reference_model.model(
                input_ids=torch.tensor([seq]), output_hidden_states=True, use_cache=False
            )
            hidden.append([h[0] for h in out.hidden_states])
    layers = len(reference_model.model.layers)
    stacked = [torch.cat([h[i] for h in hidden]) for i in range(layers + 1)]
    for i in range(layers - 1):
        site = by[f"blocks.{i}.hook_resid_post"]
        assert site["max"] == pytest.approx(float(stacked[i + 1].max()), rel=1e-5)
        assert site["min"] == pytest.approx(float(stacked[i + 1].min()), rel=1e-5)
    final = by["ln_final.hook_normalized"]
    assert final["max"] == pytest.approx(float(stacked[-1].max()), rel=1e-5)
    assert final["min"] == pytest.approx(float(stacked[-1].min()), rel=1e-5)
    assert by["hook_embed"]["max"] == pytest.approx(float(stacked[0].max()), rel=1e-6)


# --- (d) batching does not change the answer ---------------------------------------------------------
@pytest.fixture(scope="module")
def varied_ids(token_ids: list[list[int]]) -> list[list[int]]:
    """Eighteen windows of the corpus with many lengths, so batches of 8 pad.

    No two start with the same token: a shared prefix would give tokens with identical contexts, whose
    exact ties under batch size 1 become ulp-level differences in a padded batch.
    """
    out: list[list[int]] = []
    first: set[int] = set()
    for idx, seq in enumerate(token_ids):
        for j, start in enumerate((1, 2, 5, 9)):
            window = seq[start:][: 5 + 7 * ((idx * 4 + j) % 6)]
            if window and window[0] not in first:
                first.add(window[0])
                out.append(window)
    assert len(out) > 8 and len({len(w) for w in out}) > 4
    return out


def _comparable(doc: dict[str, Any]) -> dict[str, Any]:
    return {s["name"]: s for s in doc["sites"]}


@pytest.mark.parametrize("planner", ["batch_size_8", "max_batch_tokens_120"])
def test_padded_batches_give_the_same_statistics(
    reference_model: Any, varied_ids: list[list[int]], planner: str
) -> None:
    lengths = [len(t) for t in varied_ids]
    if planner == "batch_size_8":
        batches = corpus_mod.batches(lengths, batch_size=8)
    else:
        batches = corpus_mod.batches(lengths, max_batch_tokens=120)
    assert any(len(b) > 1 and len({lengths[i] for i in b}) > 1 for b in batches)  # padding really happens
    single = _comparable(_results(reference_model, varied_ids, [[i] for i in range(len(varied_ids))]))
    batched = _comparable(_results(reference_model, varied_ids, batches))
    assert single.keys() == batched.keys()
    for name, a in single.items():
        b = batched[name]
        assert a["count"] == b["count"], name
        assert a["location"] == b["location"], name
        assert [e["location"] for e in a["top_k"]] == [e["location"] for e in b["top_k"]], name
        for key in ("max", "min", "max_abs", "mean", "rms"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-9), (name, key)
        assert a["non_finite"] == b["non_finite"]
        assert a["massive"] == (
            None
            if b["massive"] is None
            else {
                "tokens": b["massive"]["tokens"],
                "max_ratio": pytest.approx(b["massive"]["max_ratio"], rel=1e-5),
            }
        )


def _forward_masks(model: Any, ids: list[list[int]], batches: list[list[int]]) -> list[torch.Tensor | None]:
    """The attention_mask each forward of a measurement received."""
    from maxact_card.measure.loop import base_model

    seen: list[torch.Tensor | None] = []
    handle = base_model(model).register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs.get("attention_mask")), with_kwargs=True
    )
    try:
        measure(model, ids, batches=batches, device=CPU, pad_token_id=0)
    finally:
        handle.remove()
    return seen


def test_a_causal_model_runs_without_the_attention_mask(
    reference_model: Any, varied_ids: list[list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    batches = corpus_mod.batches([len(t) for t in varied_ids], batch_size=8)
    masks = _forward_masks(reference_model, varied_ids, batches)[-len(batches):]  # after the set-up probes
    assert masks == [None] * len(batches)
    maskless = _comparable(_results(reference_model, varied_ids, batches))
    monkeypatch.setenv("MAXACT_CARD_MASKLESS", "0")
    masks = _forward_masks(reference_model, varied_ids, batches)[-len(batches):]
    assert all(m is not None for m in masks)
    assert any(not bool(m.all()) for m in masks if m is not None)  # padding really happens
    masked = _comparable(_results(reference_model, varied_ids, batches))
    for name, a in masked.items():
        b = maskless[name]
        assert a["count"] == b["count"] and a["location"] == b["location"], name
        assert [e["location"] for e in a["top_k"]] == [e["location"] for e in b["top_k"]], name
        for key in ("max", "min", "max_abs", "mean", "rms"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-9), (name, key)


def test_bidirectional_attention_keeps_the_mask(varied_ids: list[list[int]]) -> None:
    from maxact_card.measure.loop import base_model, needs_attention_mask

    causal = _llama(layers=2, seed=3)
    assert needs_attention_mask(causal, CPU) is False
    model = _llama(layers=2, seed=3)
    flags = [m for m in base_model(model).modules() if hasattr(m, "is_causal")]
    assert flags
    for m in flags:
        m.is_causal = False  # what an encoder-style checkpoint declares
    assert needs_attention_mask(model, CPU) is True
    batches = corpus_mod.batches([len(t) for t in varied_ids], batch_size=8)
    masks = _forward_masks(model, varied_ids, batches)[-len(batches):]
    assert all(m is not None for m in masks) and any(not bool(m.all()) for m in masks if m is not None)


def test_a_leak_without_the_mask_keeps_it() -> None:
    """A model whose flags all say causal, but whose first layer mixes every position in when it gets
    no mask (as a bidirectional attention would): the probe sees the padding reach real tokens."""
    from maxact_card.measure.loop import base_model, needs_attention_mask

    model = _llama(layers=2, seed=4)
    runner = base_model(model)

    def leak(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if kwargs.get("attention_mask") is not None:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        mixed = hidden + hidden.mean(dim=1, keepdim=True)
        return ((mixed, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": mixed})

    runner.layers[0].register_forward_pre_hook(leak, with_kwargs=True)
    assert all(m.is_causal for m in runner.modules() if hasattr(m, "is_causal"))
    assert needs_attention_mask(model, CPU) is True


# --- (e) the LM head never runs ------------------------------------------------------------------
def test_lm_head_never_runs(token_ids: list[list[int]]) -> None:
    model = _llama(layers=2)
    calls: list[int] = []
    handle = model.lm_head.register_forward_hook(lambda m, a, o: calls.append(1))
    try:
        m = measure(model, token_ids, batches=[[0, 1, 2], [3, 4, 5]], device=CPU)
    finally:
        handle.remove()
    assert calls == []
    assert m.tokens == sum(len(t) for t in token_ids)
    assert not any(s.module.startswith("lm_head") for s in m.site_map.sites)


# --- (f) non-finite values are counted, never reported as a maximum -----------------------------
def _ctx(mask: torch.Tensor, ids: torch.Tensor | None = None) -> BatchContext:
    b, t = mask.shape
    token_index = (torch.arange(b).unsqueeze(1) * t + torch.arange(t)).long()
    return BatchContext(
        mask, token_index, torch.arange(b), ids if ids is not None else torch.zeros(b, t, dtype=torch.long)
    )


def test_non_finite_tokens_are_counted_and_excluded() -> None:
    x = torch.tensor(
        [
            [
                [1.0, -2.0, 3.0],
                [float("inf"), 0.5, 0.5],  # would be the max if it counted
                [-7.0, 4.0, 0.0],  # the largest |a| among finite tokens
                [float("nan"), 100.0, 1.0],
            ]
        ]
    )
    mask = torch.ones(1, 4, dtype=torch.bool)
    stats = SiteStats(3, 1, CPU, top_k=4)
    stats.update(x, _ctx(mask, torch.tensor([[10, 11, 12, 13]])))
    assert int(nonfinite_count(stats.hist)) == 2
    assert int(stats.nonfinite_tokens) == 2
    assert float(stats.max) == 4.0 and float(stats.min) == -7.0
    assert int(stats.count) == 6  # the two finite tokens, 3 channels each
    assert float(stats.sum) == pytest.approx(1 - 2 + 3 - 7 + 4 + 0)
    valid_keys = stats.topk_key[stats.topk_key >= 0]
    assert valid_keys.numel() == 2
    assert stats.topk_value[:2].tolist() == [-7.0, 3.0]
    assert stats.topk_channel[:2].tolist() == [0, 2]
    assert stats.topk_token_id[:2].tolist() == [12, 10]
    assert stats.channel_max.tolist() == [7.0, 4.0, 3.0]


# --- (g) the Sun et al. criterion -------------------------------------------------------------------
def test_massive_activation_criterion() -> None:
    from maxact_card.measure.results import _top_ratio

    width = 33
    rows = []
    for peak in (5000.0, 50.0, 500.0):
        row = torch.ones(width)
        row[4] = peak
        rows.append(row)
    x = torch.stack(rows).unsqueeze(0)
    stats = SiteStats(width, 1, CPU, massive=True)
    stats.update(x, _ctx(torch.ones(1, 3, dtype=torch.bool)))
    assert int(stats.massive_tokens) == 1  # 50 is below |a| > 100; 500 is only 500x its median of 1
    assert _top_ratio(stats.state_dict()) == 5000.0
    only_500 = SiteStats(width, 1, CPU, massive=True)
    only_500.update(x[:, 2:], _ctx(torch.ones(1, 1, dtype=torch.bool)))
    assert int(only_500.massive_tokens) == 0 and _top_ratio(only_500.state_dict()) == 500.0


# --- (h) bootstrap of the global maximum ------------------------------------------------------------
def test_bootstrap_with_one_peak_sample() -> None:
    per_sample = torch.tensor([1.0, 1.5, 2.0, 1.2, 40.0, 1.1, 0.9, 1.3])
    boot = bootstrap_max(per_sample, seed=3)
    assert boot["p05"] < boot["median"] <= boot["p95"] == 40.0
    assert boot["p05"] >= 1.5  # a resample's max is at least its largest ordinary sample, almost surely
    assert boot["resamples"] == 1000
    assert bootstrap_max(per_sample, seed=3) == boot
    assert bootstrap_max(per_sample, seed=4)["p95"] == 40.0


def test_bootstrap_recorded_in_a_run(planted_run: dict[str, Any]) -> None:
    boot = planted_run["doc"]["global"]["bootstrap"]
    # three of six samples hold the plant: most resamples contain one
    assert boot["median"] == boot["p95"] == PLANT_VALUE
    assert boot["p05"] <= PLANT_VALUE


# --- (i) --quant end to end -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def quant_dirs(tmp_path_factory: pytest.TempPathFactory, token_ids: list[list[int]]) -> dict[str, Path]:
    tok = _planted_token(token_ids)
    root = tmp_path_factory.mktemp("quant")

    def plant(model: Any) -> None:
        model.model.embed_tokens.weight[tok, 3] = 2000.0

    return {
        "plain": factory.save("llama", root / "plain"),
        "planted": factory.save("llama", root / "planted", edit=plant),
        "corpus": write_corpus(root / "c.jsonl"),
    }


def _quant(ckpt: Path, corpus: Path, *extra: str) -> dict[str, Any]:
    res = _invoke(["measure", str(ckpt), "--corpus", str(corpus), "--format", "json", "--quant", *extra])
    assert res.exit_code == 0, res.stderr
    return json.loads(res.stdout)


def test_quant_static_maxabs_fails_on_a_planted_outlier(
    quant_dirs: dict[str, Path], token_ids: list[list[int]]
) -> None:
    plain = _quant(quant_dirs["plain"], quant_dirs["corpus"])
    planted = _quant(quant_dirs["planted"], quant_dirs["corpus"])
    assert plain["quant"]["policies"]["int8-static-maxabs"]["verdict"] == "PASS"
    assert planted["quant"]["policies"]["int8-static-maxabs"]["verdict"] == "FAIL"
    assert plain["quant"]["policies"]["int8-dynamic-per-token"]["verdict"] == "PASS"
    assert planted["quant"]["policies"]["int8-dynamic-per-token"]["verdict"] == "PASS"
    assert planted["global"]["max_abs"] == pytest.approx(2000.0, rel=1e-3)

    corpus = corpus_mod.load_corpus(str(quant_dirs["corpus"]))
    selected = corpus_mod.select(corpus, None, 0)
    calibration, held_out = corpus_mod.split(selected, 1 / 3, 0)
    for doc in (plain, planted):
        assert doc["corpus"]["samples"] + doc["corpus"]["eval_samples"] == len(selected)
        assert doc["corpus"]["eval_samples"] == doc["quant"]["eval_samples"] == len(held_out)
        assert doc["run"]["samples"] == len(calibration)
        # every location the measurement reports lies in the calibration part, none in the held-out part
        seen = {e["location"]["sample_id"] for s in doc["sites"] for e in s["top_k"]}
        assert seen <= {s.id for s in calibration}
        assert not seen & {s.id for s in held_out}
        held_tokens = sum(len(token_ids[int(s.id.split("-")[1]) - 1]) for s in held_out)
        assert doc["quant"]["eval_tokens"] == held_tokens
        assert doc["run"]["tokens"] == sum(len(t) for t in token_ids) - held_tokens


@pytest.mark.parametrize(
    "args, message",
    [
        (["--eval-fraction", "1.5"], "--eval-fraction"),
        (["--quant-sites", "nope"], "'nope'"),
    ],
)
def test_quant_bad_options_are_usage_errors(
    quant_dirs: dict[str, Path], tmp_path: Path, args: list[str], message: str
) -> None:
    out = tmp_path / "r.json"
    res = _invoke(
        [
            "measure",
            str(quant_dirs["plain"]),
            "--corpus",
            str(quant_dirs["corpus"]),
            "--quant",
            "--out",
            str(out),
            *args,
        ]
    )
    assert res.exit_code == 2, res.output
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0]
    assert "Traceback" not in res.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_statistics_on_a_side_stream_equal_inline_updates(token_ids: list[list[int]],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from maxact_card.measure import loop as measure_mod

    device = torch.device("cuda")
    model = _llama(layers=3).to(device, torch.bfloat16)
    plan = [list(range(i, min(i + 2, len(token_ids)))) for i in range(0, len(token_ids), 2)]
    runs = {}
    for overlap in ("1", "0"):
        monkeypatch.setenv("MAXACT_CARD_OVERLAP", overlap)
        assert (measure_mod._streams(device) is not None) == (overlap == "1")
        runs[overlap] = measure(model, token_ids, batches=plan, device=device).stats
    assert runs["1"].keys() == runs["0"].keys()
    for name, side in runs["1"].items():
        inline = runs["0"][name]
        for field in SiteStats.MERGE_OPS:
            a, b = getattr(side, field), getattr(inline, field)
            assert torch.equal(a, b) if field not in ("sum", "sumsq") else torch.allclose(a, b, rtol=1e-9), (name, field)
