"""What changed between two results: identity, run settings, the peak, per-site maxima and quant verdicts."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from maxact_card.gate.policy import COMPONENTS, QUANT_POLICIES


def quant_entries(results: Mapping[str, Any]) -> dict[str, Mapping[str, Any]] | None:
    quant = results.get("quant")
    if not isinstance(quant, Mapping):
        return None
    policies = quant.get("policies")
    return dict(policies) if isinstance(policies, Mapping) else {}


def peak_growth_pct(old_peak: float, new_peak: float) -> float | None:
    """Growth of the peak in percent; None when the old peak is 0 and the new one is not."""
    if old_peak == 0:
        return 0.0 if new_peak == 0 else None
    return (new_peak - old_peak) / old_peak * 100.0


def _site_order(component: str | None, layer: int | None, name: str) -> tuple[int, int, str]:
    """Model order: embedding, then layer by layer (components in COMPONENTS order), then the final norm."""
    if layer is None:
        position = -1 if component == "embedding" else 1 << 30
    else:
        position = int(layer)
    rank = COMPONENTS.index(component) if component in COMPONENTS else len(COMPONENTS)
    return (position, rank, name)


def _change(old: float | None, new: float | None) -> tuple[float | None, float | None]:
    if old is None or new is None:
        return None, None
    return new - old, peak_growth_pct(old, new)


#: Run settings that change the numbers without changing the model, as `diff` names them.
# the sites measured (`--gemm-inputs`, `--kv-cache`) add sites without changing the others'
RUN_SETTINGS = ("dtype", "corpus", "samples", "seed", "max_seq_len", "device", "gemm_inputs", "kv_cache")


def _identity(results: Mapping[str, Any]) -> dict[str, Any]:
    model, run, corpus = results.get("model", {}), results.get("run", {}), results.get("corpus", {})
    return {
        "model": model.get("id"),
        "revision": model.get("revision"),
        "commit_sha": model.get("commit_sha"),
        "dtype": run.get("dtype"),
        "corpus": corpus.get("id"),
        "samples": run.get("samples"),
        "tokens": run.get("tokens"),
        "seed": run.get("seed"),
        "max_seq_len": run.get("max_seq_len"),
        "device": run.get("device"),
        "gemm_inputs": bool(run.get("gemm_inputs")),
        "kv_cache": bool(run.get("kv_cache")),
        "weights": sorted((w.get("path"), w.get("sha256")) for w in model.get("weight_files") or ()),
    }


def identity_text(results: Mapping[str, Any]) -> str:
    ident = _identity(results)
    text = str(ident["model"])
    if ident["revision"]:
        text += f"@{ident['revision']}"
    return text


def _non_finite_total(results: Mapping[str, Any]) -> int:
    return sum(int(s.get("non_finite", {}).get("elements", 0)) for s in results.get("sites", ()))


def _quant_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    old_entries, new_entries = quant_entries(old) or {}, quant_entries(new) or {}
    names = [n for n in QUANT_POLICIES if n in old_entries or n in new_entries]
    names += sorted((set(old_entries) | set(new_entries)) - set(QUANT_POLICIES))
    rows = []
    for name in names:
        o, n = old_entries.get(name, {}), new_entries.get(name, {})
        ov, nv = o.get("verdict"), n.get("verdict")
        rows.append(
            {
                "policy": name,
                "old": ov,
                "new": nv,
                "changed": ov != nv,
                "old_worst_sqnr_db": o.get("worst_sqnr_db"),
                "new_worst_sqnr_db": n.get("worst_sqnr_db"),
            }
        )
    return {
        "policies": rows,
        "recommended": {"old": recommended(old), "new": recommended(new)},
    }


def recommended(results: Mapping[str, Any]) -> str | None:
    quant = results.get("quant")
    return quant.get("recommended") if isinstance(quant, Mapping) else None


def diff_results(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """What changed from ``old`` to ``new`` results, in a deterministic order (JSON-ready).

    Sites and components are listed in model order; every site appears once with a status of
    ``changed``, ``unchanged``, ``added`` (only in new) or ``removed`` (only in old). Percentages are
    relative to the old value (None when it was 0 and the new one is not).
    """
    old_peak, new_peak = old["global"], new["global"]
    abs_change, pct_change = _change(float(old_peak["max_abs"]), float(new_peak["max_abs"]))
    peak = {
        "old": float(old_peak["max_abs"]),
        "new": float(new_peak["max_abs"]),
        "abs_change": abs_change,
        "pct_change": pct_change,
        "old_site": old_peak["site"],
        "new_site": new_peak["site"],
    }

    components = []
    old_comp, new_comp = old.get("components", {}), new.get("components", {})
    for name in [c for c in COMPONENTS if c in old_comp or c in new_comp] + sorted(
        (set(old_comp) | set(new_comp)) - set(COMPONENTS)
    ):
        o, n = old_comp.get(name), new_comp.get(name)
        ov = None if o is None else float(o["max_abs"])
        nv = None if n is None else float(n["max_abs"])
        a, p = _change(ov, nv)
        components.append(
            {
                "component": name,
                "status": _status(ov, nv),
                "old": ov,
                "new": nv,
                "abs_change": a,
                "pct_change": p,
                "old_site": None if o is None else o["site"],
                "new_site": None if n is None else n["site"],
            }
        )

    old_sites = {s["name"]: s for s in old.get("sites", ())}
    new_sites = {s["name"]: s for s in new.get("sites", ())}
    sites = []
    for name in set(old_sites) | set(new_sites):
        o, n = old_sites.get(name), new_sites.get(name)
        ref = n if n is not None else o
        assert ref is not None
        ov = None if o is None else float(o["max_abs"])
        nv = None if n is None else float(n["max_abs"])
        a, p = _change(ov, nv)
        sites.append(
            {
                "site": name,
                "component": ref.get("component"),
                "layer": ref.get("layer"),
                "status": _status(ov, nv),
                "old": ov,
                "new": nv,
                "abs_change": a,
                "pct_change": p,
            }
        )
    sites.sort(key=lambda s: _site_order(s["component"], s["layer"], s["site"]))
    counts = {
        k: sum(1 for s in sites if s["status"] == k) for k in ("changed", "unchanged", "added", "removed")
    }

    old_massive = sorted(set(old.get("massive", {}).get("layers", ())))
    new_massive = sorted(set(new.get("massive", {}).get("layers", ())))

    old_id, new_id = _identity(old), _identity(new)
    settings = [key for key in RUN_SETTINGS if old_id[key] != new_id[key]]
    notes = [f"{key} differs: {old_id[key]} → {new_id[key]}" for key in settings]
    same_weights = bool(old_id["weights"]) and old_id["weights"] == new_id["weights"]
    if same_weights:
        notes.append("the weights are the same (every weight file's sha256 agrees)"
                     + (": the changes come from the run settings above" if settings else ""))
    elif old_id["weights"] and new_id["weights"]:
        notes.append("the weights differ" + (", and so do run settings: not all changes are the model's"
                                             if settings else ""))
    return {
        "diff_version": 1,
        "old": old_id,
        "new": new_id,
        "same_weights": same_weights,
        "notes": notes,
        "peak": peak,
        "components": components,
        "site_counts": counts,
        "sites": sites,
        "massive_layers": {
            "old": old_massive,
            "new": new_massive,
            "became": sorted(set(new_massive) - set(old_massive)),
            "stopped": sorted(set(old_massive) - set(new_massive)),
        },
        "non_finite": {"old": _non_finite_total(old), "new": _non_finite_total(new)},
        "quant": _quant_diff(old, new),
    }


def _status(old: float | None, new: float | None) -> str:
    if old is None:
        return "added"
    if new is None:
        return "removed"
    return "unchanged" if old == new else "changed"
