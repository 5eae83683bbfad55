"""`outliers`: the map of outlier channels per layer and site, with the tokens that carry them.

Built from what the results already hold: each site's `top_channels` (its largest per-channel
max|a|), its `top_k` tokens (which channel each peaked in, and where), its median |a| and the
massive-activation thresholds. A channel is `massive` when its max|a| passes both of Sun et al.'s
thresholds (`massive.abs_threshold`, and `massive.ratio_threshold` times the site's median |a|; the
results keep the site's median, not each token's, so this is the site-level reading of the test).
Token text is copied as data, never interpreted.
"""

from __future__ import annotations

import json
from typing import Any

from maxact_card.export.inputs import Inputs

FORMAT_VERSION = 1


def _token(entry: dict[str, Any]) -> dict[str, Any]:
    loc = entry["location"]
    token = {"value": entry["value"], "abs": entry["abs"], "sample_id": loc["sample_id"], "position": loc["position"],
             "token_id": loc["token_id"], "token": loc["token"]}
    if "piece" in loc:
        token["piece"] = loc["piece"]
    return token


def _site(site: dict[str, Any], abs_threshold: float, ratio_threshold: float) -> dict[str, Any]:
    median = site["quantiles"]["median"]
    channels = []
    for ch in site["top_channels"]:
        ratio = ch["max_abs"] / median if median > 0 else None
        channels.append({
            "channel": ch["channel"],
            "max_abs": ch["max_abs"],
            "ratio_to_median": ratio,
            "massive": ch["max_abs"] > abs_threshold and (ratio is None or ratio > ratio_threshold),
            "tokens": [_token(t) for t in site["top_k"] if t["location"]["channel"] == ch["channel"]],
        })
    return {
        "site": site["name"], "component": site["component"], "module": site["module"],
        **({"readers": site["readers"]} if site.get("readers") else {}),
        "width": site.get("width"), "max_abs": site["max_abs"], "median_abs": median,
        "massive_tokens": site["massive"]["tokens"] if site.get("massive") else None,
        "channels": channels,
    }


def outlier_map(inputs: Inputs) -> dict[str, Any]:
    """The outlier map as a JSON-ready dict."""
    results = inputs.results
    massive = results["massive"]
    abs_threshold, ratio_threshold = massive["abs_threshold"], massive["ratio_threshold"]
    layers: dict[int | None, list[dict[str, Any]]] = {}
    for site in results["sites"]:
        layers.setdefault(site["layer"], []).append(_site(site, abs_threshold, ratio_threshold))
    ordered = sorted(layers.items(), key=lambda kv: -1 if kv[0] is None else kv[0])
    flagged = [{"layer": layer, "site": s["site"], "channel": c["channel"], "max_abs": c["max_abs"]}
               for layer, sites in ordered for s in sites for c in s["channels"] if c["massive"]]
    model = results["model"]
    return {
        "format": "maxact-outliers",
        "version": FORMAT_VERSION,
        "model": {"id": model["id"], "revision": model["revision"], "commit_sha": model["commit_sha"]},
        "results": {"schema_version": results["schema_version"], "tokens": results["run"]["tokens"]},
        "thresholds": {"abs": abs_threshold, "ratio_to_median": ratio_threshold},
        "massive_channels": flagged,
        "layers": [{"layer": layer, "sites": sites} for layer, sites in ordered],
    }


def build(inputs: Inputs) -> bytes:
    """The outlier map as UTF-8 JSON text."""
    return (json.dumps(outlier_map(inputs), indent=1, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")
