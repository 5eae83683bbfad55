"""Results: build the JSON document from a measurement, validate it against the schema, write it.

The document is plain JSON (dicts and lists) validated against `schemas/maxact-results.schema.json`;
every consumer (card, gate, diff, publish) reads it through `load_results`, which validates first.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from maxact_card.documents import (  # noqa: F401 - the document API, re-exported for callers of results
    RESULTS_SCHEMA,
    SCHEMA_VERSION,
    atomic_write_text,
    dumps,
    json_path,
    load_results,
    validate_document,
    validate_results,
    write_results,
)
from maxact_card.errors import UsageError
from maxact_card.measure.loop import Measurement
from maxact_card.measure.stats import MASSIVE_ABS, MASSIVE_RATIO, hist_quantile, nonfinite_count

BOOTSTRAP_RESAMPLES = 1000
TOP_CHANNELS = 8


# --- building -------------------------------------------------------------------------------------
def _finite(value: float) -> float:
    if math.isnan(value):
        return 0.0
    if math.isinf(value):
        return math.copysign(3.4028234663852886e38, value)
    return value


def build_results(
    measurement: Measurement,
    *,
    model_info: dict[str, Any],
    run_info: dict[str, Any],
    corpus_info: dict[str, Any],
    sample_ids: list[str],
    decode: Callable[[int], str],
    seed: int,
    spell: Callable[[int], str | None] | None = None,
) -> dict[str, Any]:
    """The results document for a finished measurement (one host transfer of every statistic)."""
    state = {name: {k: v.detach().cpu() for k, v in acc.state_dict().items()} for name, acc in measurement.stats.items()}
    offsets = torch.tensor(measurement.offsets(), dtype=torch.int64)
    decoded: dict[int, tuple[str, str | None]] = {}

    def token_text(token_id: int) -> tuple[str, str | None]:
        if token_id not in decoded:
            decoded[token_id] = (decode(token_id), spell(token_id) if spell is not None else None)
        return decoded[token_id]

    def location(key: int, channel: int, token_id: int) -> dict[str, Any]:
        index = 0xFFFFFFFF - (key & 0xFFFFFFFF)
        sample = int(torch.searchsorted(offsets, torch.tensor([index]), right=True).item()) - 1
        text, piece = token_text(int(token_id))
        found = {
            "sample": sample,
            "sample_id": sample_ids[sample],
            "position": int(index - offsets[sample]),
            "channel": int(channel),
            "token_id": int(token_id),
            "token": text,
        }
        if piece is not None:
            found["piece"] = piece
        return found

    sites_out: list[dict[str, Any]] = []
    missing = list(measurement.site_map.missing)
    for site in measurement.site_map.sites:
        s = state[site.name]
        keys = s["topk_key"].tolist()
        top = [
            {
                "abs": abs(float(v)),
                "value": float(v),
                "location": location(k, c, t),
            }
            for k, v, c, t in zip(keys, s["topk_value"].tolist(), s["topk_channel"].tolist(),
                                  s["topk_token_id"].tolist())
            if k >= 0
        ]
        if not top:
            missing.append((site.name, f"every token was non-finite ({int(nonfinite_count(s['hist']))} inf/NaN elements)"))
            continue
        count = int(s["count"])
        mean = float(s["sum"]) / count if count else 0.0
        rms = math.sqrt(float(s["sumsq"]) / count) if count else 0.0
        channel_max = s["channel_max"]
        k = min(TOP_CHANNELS, channel_max.numel())
        ch_vals, ch_idx = channel_max.topk(k)
        hist = s["hist"]
        sites_out.append({
            "name": site.name,
            "component": site.component,
            "layer": site.layer,
            "module": site.module,
            "read": site.description,
            **({"readers": list(site.readers)} if site.readers else {}),
            **_heads(site.heads, channel_max),
            "width": int(channel_max.numel()),
            "max": _finite(float(s["max"])),
            "min": _finite(float(s["min"])),
            "max_abs": top[0]["abs"],
            "location": top[0]["location"],
            "top_k": top,
            "count": count,
            "mean": mean,
            "rms": rms,
            "quantiles": {
                "median": _q(hist, 0.5), "q0.99": _q(hist, 0.99),
                "q0.999": _q(hist, 0.999), "q0.9999": _q(hist, 0.9999),
            },
            "non_finite": {"elements": int(nonfinite_count(hist)), "tokens": int(s["nonfinite_tokens"])},
            "massive": {"tokens": int(s["massive_tokens"]), "max_ratio": _top_ratio(s)}
            if site.component in ("residual", "embedding") else None,
            "top_channels": [{"channel": int(c), "max_abs": float(v)} for v, c in zip(ch_vals.tolist(), ch_idx.tolist())],
        })
    if not sites_out:
        raise UsageError("no site produced a finite activation", hint="check the dtype (try --dtype float32)")

    peak = max(sites_out, key=lambda s: (s["max_abs"], -_order(s)))
    per_sample = torch.stack([state[s["name"]]["sample_max"] for s in sites_out]).amax(dim=0)
    results: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "tool": {"name": "maxact-card", "version": run_info["versions"]["maxact_card"]},
        "model": model_info,
        "run": run_info,
        "corpus": corpus_info,
        "global": {
            "max_abs": peak["max_abs"],
            "value": peak["top_k"][0]["value"],
            "site": peak["name"],
            "component": peak["component"],
            "layer": peak["layer"],
            "module": peak["module"],
            "location": peak["location"],
            "bootstrap": bootstrap_max(per_sample, seed=seed),
        },
        "components": _components(sites_out),
        "layers": _layers(sites_out),
        "massive": _massive(sites_out),
        "sites": sites_out,
        "missing_sites": [{"site": name, "reason": reason} for name, reason in missing],
    }
    return results


def _heads(heads: int | None, channel_max: torch.Tensor) -> dict[str, Any]:
    """For queries, keys and values: the heads and each head's max|a| (its run of width / heads channels)."""
    if not heads or channel_max.numel() % heads:
        return {}
    return {"heads": heads, "head_max_abs": channel_max.view(heads, -1).amax(dim=1).tolist()}


def channel_file(measurement: Measurement, results: dict[str, Any]) -> bytes:
    """The bytes of the per-channel companion file: per site of `results`, its `channel_max` (float32
    [width], max|a| per input channel over every measured token), keyed by the site's name.

    The accumulators already hold these vectors, merged by max across batches, resumed sessions
    and processes, so a resumed or data-parallel run writes the same bytes as one process. The
    safetensors layout (tensors ordered by name, no metadata) makes the bytes a function of the
    vectors alone, so the sha256 the results record identifies them.
    """
    from safetensors.torch import save

    vectors = {site["name"]: measurement.stats[site["name"]].channel_max.detach().to("cpu", torch.float32).clone()
               for site in results["sites"]}
    return save(vectors)


def _order(site: dict[str, Any]) -> int:
    layer = site["layer"]
    return -1 if layer is None else layer


def _q(hist: torch.Tensor, q: float) -> float:
    value = hist_quantile(hist, q)
    return 0.0 if math.isnan(value) else value


def _top_ratio(state: dict[str, torch.Tensor]) -> float | None:
    """Sun et al.'s largest ratio |a| / median |a| of the token, read at the site's top-K tokens."""
    keep = (state["topk_key"] >= 0) & (state["topk_median"] > 0)
    if not bool(keep.any()):
        return None
    ratio = float((state["topk_value"].abs()[keep] / state["topk_median"][keep]).max())
    return None if math.isinf(ratio) or math.isnan(ratio) else ratio


def bootstrap_max(per_sample_max: torch.Tensor, *, seed: int, resamples: int = BOOTSTRAP_RESAMPLES) -> dict[str, Any]:
    """Stability of the global max over the corpus: resample samples with replacement, take each max.

    No model run is needed: the per-sample maxima are kept during the measurement.
    """
    values = per_sample_max.to(torch.float64)
    generator = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, values.numel(), (resamples, values.numel()), generator=generator)
    maxima = values[idx].amax(dim=1)
    q = torch.quantile(maxima, torch.tensor([0.5, 0.05, 0.95], dtype=torch.float64))
    return {"median": float(q[0]), "p05": float(q[1]), "p95": float(q[2]), "resamples": resamples}


def _components(sites: Iterable[dict[str, Any]]) -> dict[str, Any]:
    best: dict[str, dict[str, Any]] = {}
    for s in sites:
        c = s["component"]
        if c not in best or s["max_abs"] > best[c]["max_abs"]:
            best[c] = {"max_abs": s["max_abs"], "site": s["name"], "layer": s["layer"], "location": s["location"]}
    return best


def _layers(sites: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    rows: dict[int, dict[str, Any]] = {}
    for s in sites:
        if s["layer"] is None:
            continue
        row = rows.setdefault(s["layer"], {"layer": s["layer"], "max_abs": {}, "massive_tokens": 0,
                                           "massive_max_ratio": None})
        row["max_abs"][s["component"]] = s["max_abs"]
        if s["component"] == "residual" and s["massive"] is not None:
            row["massive_tokens"] = s["massive"]["tokens"]
            row["massive_max_ratio"] = s["massive"]["max_ratio"]
    return [rows[k] for k in sorted(rows)]


def _massive(sites: list[dict[str, Any]]) -> dict[str, Any]:
    residual = [s for s in sites if s["component"] == "residual" and s["massive"] is not None]
    ratios = [s["massive"]["max_ratio"] for s in residual if s["massive"]["max_ratio"] is not None]
    return {
        "abs_threshold": MASSIVE_ABS,
        "ratio_threshold": MASSIVE_RATIO,
        "layers": sorted(s["layer"] for s in residual if s["massive"]["tokens"] > 0),
        "tokens": sum(s["massive"]["tokens"] for s in residual),
        "max_ratio": max(ratios) if ratios else None,
    }
