"""Render the "Maximum activations" section and the front-matter summary from a results document.

Everything a model or its tokenizer controls (token strings, the model's name) is escaped here, so
the section renders inertly on the Hub.
"""

from __future__ import annotations

import posixpath
import re
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jinja2
import yaml

from maxact_card import fmt
from maxact_card.card.front_matter import END_MARKER, START_MARKER
from maxact_card.card.paths import DEFAULT_CHART_PATH, DEFAULT_RESULTS_PATH
from maxact_card.documents import (
    COMPONENTS,
    KV_CACHE,
    LINEAR_INPUTS,
    RESULTS_SCHEMA,
    parse_json,
    schema_error,
)
from maxact_card.errors import SchemaError, UsageError
from maxact_card.resources import template_text

SUMMARY_KEY = "maxact"

SECTION_TEMPLATE = "section.md.j2"
INT8_QMAX = 127
QUANTILE_REL_ERROR = 0.02  # the results' quantiles are read from a log histogram, within 2%

COMPONENT_LABELS = {
    "embedding": "Embedding",
    "residual": "Residual stream",
    "attn_input": "Attention input",
    "query": "Queries (after RoPE)",
    "key_cache": "KV cache: keys",
    "value_cache": "KV cache: values",
    "o_proj_input": "o_proj input",
    "attention": "Attention output",
    "mlp_input": "MLP input",
    "mlp": "MLP output",
    "gate": "Gate pre-activation",
    "down_proj_input": "down_proj input",
    "router": "Router logits",
    "final_norm": "Final norm",
}

# The inputs a W8A8 or FP8 deployment quantizes, in the order the "For deployment" part lists them:
# the Linear layers' inputs, then the KV cache, then the queries (FP8 attention only).
DEPLOY_CLASSES: tuple[str, ...] = (*LINEAR_INPUTS, *KV_CACHE, "query")
# Which option measures the classes that are off by default, and how the part names them when none
# of a group was measured. down_proj_input is always measured (where the MLP has a down projection).
DEPLOY_FLAGS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("--gemm-inputs", ("attn_input", "o_proj_input", "mlp_input"), "the attention, o_proj and MLP inputs"),
    ("--kv-cache", ("key_cache", "value_cache", "query"), "the KV cache and the queries"),
)
# maxact_card.quant.schemes.RECOMMENDATION_ORDER by name (quant imports torch, the card must not; a
# test keeps the two equal): among the policies that pass, the first one here is recommended.
RECOMMENDATION_ORDER: tuple[str, ...] = (
    "fp8-e4m3-static",
    "int8-static-mse",
    "int8-static-percentile",
    "int8-static-maxabs",
    "int8-dynamic-per-token",
)

# --- Markdown helpers -----------------------------------------------------------------------------
_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>|~#!])")


def md_text(text: str) -> str:
    """Free text (a device name, a category) as Markdown that renders literally, also in a table cell:
    on one line (`fmt.one_line`), every character Markdown or HTML would read escaped."""
    return _MD_SPECIAL.sub(r"\\\1", fmt.one_line(text).replace("&", "&amp;"))


def md_code(text: str, *, in_table: bool = True) -> str:
    """A code span that shows `text` exactly; pipes are escaped so the span can sit in a table cell."""
    text = fmt.one_line(text)
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    if in_table:
        text = text.replace("|", "\\|")
    return f"{fence}{pad}{text}{pad}{fence}"


def md_token(location: Mapping[str, Any], *, in_table: bool = True) -> str:
    """A measured token as a quoted code span (leading spaces and control characters visible; the
    vocabulary's spelling where the text alone is unreadable) and its id: `fmt.token_parts`."""
    quoted, note = fmt.token_parts(location)
    return f"{md_code(quoted, in_table=in_table)} ({md_text(note)})"


def md_sample(peak: Mapping[str, Any]) -> str:
    """The peak's sample: its id, and where the results carry it, its category and the text around
    the peak (`global.context`), all as literal Markdown."""
    text = md_code(peak["location"]["sample_id"], in_table=False)
    context = peak.get("context")
    if isinstance(context, Mapping):
        text += f" ({md_text(context['category'])}: {md_code(context['excerpt'], in_table=False)})"
    return text


# --- results --------------------------------------------------------------------------------------
def check_results(results: Any, *, source: str = "results") -> None:
    """Raise SchemaError `source::$.json.path: message` (best match first, then how many others)."""
    found = schema_error(results, RESULTS_SCHEMA)
    if found is None:
        return
    where, rest = found
    more = f" ({rest} other error{'s' if rest != 1 else ''})" if rest else ""
    raise SchemaError(
        f"{source}::{where}{more}",
        hint="re-run `maxact-card measure` to write a valid results file",
    )


def parse_results(data: bytes, *, source: str) -> dict[str, Any]:
    """Decode, parse and validate a results file's bytes; bad input raises UsageError/SchemaError."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(
            f"{source} is not UTF-8 text", hint="pass the JSON file `maxact-card measure` wrote"
        ) from None
    doc = parse_json(text, source=source)
    check_results(doc, source=source)
    return doc


def read_results(path: Path) -> dict[str, Any]:
    """Read and validate a results file from disk."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise UsageError(
            f"results file {path} does not exist", hint="pass the file `maxact-card measure --out` wrote"
        ) from None
    except OSError as exc:
        raise UsageError(f"cannot read results file {path}: {exc.strerror}") from None
    return parse_results(data, source=str(path))


# --- the section --------------------------------------------------------------------------------
def _site_index(results: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    return {site["name"]: site for site in results.get("sites", [])}


def _where(component: str, layer: int | None, moe: bool) -> str:
    at = f" of layer {layer}" if layer is not None else ""
    return {
        "embedding": "the token embeddings",
        "residual": f"the residual stream after layer {layer}"
        if layer is not None
        else "the residual stream",
        "attn_input": f"the attention input{at} (the input of its q/k/v projections)",
        "query": f"the attention queries{at} (after the rotary embedding)",
        "key_cache": f"the keys the KV cache stores{at} (after the rotary embedding)",
        "value_cache": f"the values the KV cache stores{at}",
        "o_proj_input": f"the input of the attention output projection{at}",
        "attention": f"the attention output{at}",
        "mlp_input": f"the {'MoE' if moe else 'MLP'} input{at}",
        "mlp": f"the {'MoE' if moe else 'MLP'} output{at}",
        "gate": f"the gate pre-activation{at}",
        "down_proj_input": f"the input of down_proj{at}",
        "router": f"the router logits{at}",
        "final_norm": "the output of the final norm",
    }.get(component, f"{component}{at}")


def _label(component: str, moe: bool) -> str:
    if component == "mlp" and moe:
        return "MoE output"
    return COMPONENT_LABELS.get(component, component)


def _percentile_name(key: str) -> str:
    digits = key.removeprefix("q0.")
    whole, rest = digits[:2], digits[2:]
    return f"{whole}.{rest}th" if rest else f"{whole}th"


def _quantizer_sentences(results: Mapping[str, Any], sites: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Two sentences on what the peak means for a static per-tensor INT8 scale, from the numbers."""
    glob = results["global"]
    peak = float(glob["max_abs"])
    site_name = glob["site"]
    massive_layers = results.get("massive", {}).get("layers", [])
    if peak <= 0:
        return [
            (f"Every measured activation is zero, so no quantization scale can be derived from "
             f"{md_code(site_name, in_table=False)}."),
            "Check that the model and corpus produced real forward passes.",
        ]
    step = peak / INT8_QMAX
    half = step / 2
    scale = (
        f"Quantized to INT8 with a static per-tensor scale set by this peak, {md_code(site_name, in_table=False)} "
        "gets a step of "
        f"{fmt.number(peak)} / {INT8_QMAX} = {fmt.number(step)}"
    )
    site = sites.get(site_name)
    if site is None:
        return [
            f"{scale}, so every activation below half a step ({fmt.number(half)}) in magnitude rounds to zero.",
            "Sites with a peak far above their typical values need finer scales or 16-bit activations.",
        ]
    median = float(site["quantiles"]["median"])
    steps = median / step
    # Quantiles come from a log histogram (within 2% of the true value): claim "rounds to zero" only
    # when that holds with the error included.
    if median * (1 + QUANTILE_REL_ERROR) < half:
        below = [
            key
            for key in ("q0.9999", "q0.999", "q0.99")
            if float(site["quantiles"][key]) * (1 + QUANTILE_REL_ERROR) < half
        ]
        tail = ""
        if below:
            key = below[0]
            tail = (
                f", as do at least {_percentile_name(key).removesuffix('th')}% of its activations "
                f"({_percentile_name(key)} percentile |a| = {fmt.number(site['quantiles'][key])}, "
                f"below half a step)"
            )
        first = (
            f"{scale}, so its median |a| ({fmt.number(median)}) is {fmt.number(steps, sig=2)} of a step "
            f"and rounds to zero{tail}."
        )
        where = (
            f", above all in layer{'s' if len(massive_layers) > 1 else ''} {fmt.layer_ranges(massive_layers)}, "
            "which meet the massive-activation criterion"
            if massive_layers
            else ""
        )
        second = (
            "Keeping that information needs finer scales (per token or per channel), outlier handling "
            f"such as SmoothQuant-style smoothing or clipping, or 16-bit activations{where}."
        )
        return [first, second]
    first = (
        f"{scale}, so its median |a| ({fmt.number(median)}) lies {fmt.number(steps, sig=3)} steps from zero."
    )
    second = (
        f"Rounding moves an activation by at most half a step ({fmt.number(half)}), "
        f"{fmt.number(50.0 / steps, sig=2)}% of the median; "
        + (
            "the held-out check below measures what that costs."
            if results.get("quant")
            else "measure the held-out error (`maxact-card measure --quant`) before relying on it."
        )
    )
    return [first, second]


def _component_rows(
    results: Mapping[str, Any], sites: Mapping[str, Mapping[str, Any]], moe: bool
) -> list[dict]:
    components = results.get("components", {})
    order = [c for c in COMPONENTS if c in components] + sorted(set(components) - set(COMPONENTS))
    rows = []
    for name in order:
        entry = components[name]
        site = sites.get(entry["site"])
        median = float(site["quantiles"]["median"]) if site else 0.0
        loc = entry["location"]
        rows.append(
            {
                "label": _label(name, moe),
                "max_abs": fmt.number(entry["max_abs"]),
                "site": md_code(entry["site"]),
                "layer": "–" if entry["layer"] is None else str(entry["layer"]),
                "channel": str(loc["channel"]),
                "token": md_token(loc),
                "ratio": fmt.ratio(float(entry["max_abs"]) / median) if median > 0 else "n/a",
            }
        )
    return rows


def _layer_table(results: Mapping[str, Any], moe: bool) -> dict[str, Any]:
    layers = sorted(results.get("layers", []), key=lambda row: row["layer"])
    present = {c for row in layers for c in row["max_abs"]}
    columns = [c for c in COMPONENTS if c in present] + sorted(present - set(COMPONENTS))
    glob = results["global"]
    rows = []
    for row in layers:
        cells = []
        for component in columns:
            value = row["max_abs"].get(component)
            text = "–" if value is None else fmt.number(value)
            if row["layer"] == glob.get("layer") and component == glob.get("component") and value is not None:
                text = f"**{text}**"
            cells.append(text)
        ratio = row.get("massive_max_ratio")
        rows.append(
            {
                "layer": str(row["layer"]),
                "cells": cells,
                "massive_tokens": fmt.count(row["massive_tokens"]),
                "max_ratio": "–" if ratio is None else fmt.ratio(ratio),
            }
        )
    return {"headers": [_label(c, moe) for c in columns], "rows": rows}


def _quant_view(quant: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if not quant:
        return None
    policies = quant.get("policies", {}) or {}
    peak = quant.get("peak_site")
    peak = peak if isinstance(peak, Mapping) else {}
    peak_policies = peak.get("policies") or {}
    rows = []
    for name, policy in policies.items():
        verdict = str(policy.get("verdict", "?"))
        rows.append(
            {
                "policy": md_code(name),
                # Plain words, not emoji: emoji fonts are missing in some viewers and the word is what counts.
                "verdict": {"PASS": "PASS", "FAIL": "**FAIL**"}.get(verdict, md_text(verdict)),
                "worst_site": md_code(policy["worst_site"]) if policy.get("worst_site") else "–",
                "worst_sqnr": fmt.db(policy.get("worst_sqnr_db")),
                "token_p05": fmt.db(policy.get("worst_token_sqnr_p05_db")),
                "failing_sites": fmt.count(policy.get("failing_sites", 0)),
                "peak_sqnr": fmt.db((peak_policies.get(name) or {}).get("sqnr_db"))
                if peak_policies
                else None,
            }
        )
    thresholds = quant.get("thresholds") or {}
    threshold_text = ", ".join(
        f"{md_code(key, in_table=False)} = "
        + (
            fmt.number(value)
            if isinstance(value, (int, float)) and not isinstance(value, bool)
            else md_text(value)
        )
        for key, value in thresholds.items()
    )
    recommended = quant.get("recommended")
    any_pass = any(str(p.get("verdict")) == "PASS" for p in policies.values())
    return {
        "rows": rows,
        "peak_site": md_code(peak["site"], in_table=False) if peak_policies and peak.get("site") else None,
        "recommended": md_code(recommended, in_table=False) if recommended else None,
        "none_passed": not any_pass,
        "thresholds": threshold_text,
    }


def _run_view(results: Mapping[str, Any], results_path: str) -> dict[str, Any]:
    model, run, corpus = results["model"], results["run"], results["corpus"]
    versions = run.get("versions", {})
    named = [("torch", "torch"), ("transformers", "transformers"), ("huggingface_hub", "huggingface_hub")]
    version_text = ", ".join(f"{label} {md_text(versions[key])}" for key, label in named if key in versions)
    if "python" in versions:
        version_text += f", Python {md_text(versions['python'])}"
    extra = sorted(set(versions) - {"maxact_card", "torch", "transformers", "huggingface_hub", "python"})
    for key in extra:
        version_text += f", {md_text(key)} {md_text(versions[key])}"
    categories = ", ".join(f"{md_text(k)} {fmt.count(v)}" for k, v in corpus.get("categories", {}).items())
    weights = model.get("weight_files", [])
    if len(weights) <= 4:
        weight_text = ", ".join(
            f"{md_code(w['path'], in_table=False)} (sha256 `{w['sha256'][:12]}…`)" for w in weights
        )
    else:
        total = sum(int(w["size"]) for w in weights)
        weight_text = f"{len(weights)} files, {fmt.count(total)} bytes (sha256 of each in the results file)"
    device = md_text(run["device"])
    if run.get("device_type") and run["device_type"] not in run["device"]:
        device += f" ({md_text(run['device_type'])})"
    world = run.get("world_size") or 1
    if world > 1:
        device += f", {world} processes"
    commit = model.get("commit_sha")
    revision = model.get("revision")
    at = ""
    if commit:
        at = f" at commit `{commit[:12]}`"
    elif revision:
        at = f" at revision {md_code(revision, in_table=False)}"
    started = str(run.get("started_at", ""))[:10]
    return {
        "tool_version": md_text(results["tool"]["version"]),
        "model_id": md_code(model["id"], in_table=False),
        "model_at": at,
        "architecture": md_text(model["architecture"]),
        "num_layers": fmt.count(model["num_layers"]),
        "hidden_size": fmt.count(model["hidden_size"]),
        "corpus_id": md_code(corpus["id"], in_table=False),
        "corpus_sha": corpus["sha256"][:12],
        "categories": categories,
        "samples": fmt.count(run["samples"]),
        "tokens": fmt.count(run["tokens"]),
        "max_seq_len": fmt.count(run["max_seq_len"]),
        "dtype": md_text(run["dtype"]),
        "device": device,
        "seed": str(run["seed"]),
        "date": md_text(started),
        "versions": version_text,
        "weights": weight_text,
        "results_path": results_path,
        "results_link": _link_target(results_path),
        "notes": [md_text(note) for note in model.get("notes", [])],
    }


def _link_target(path: str) -> str:
    """A relative link target, percent-encoded: spaces, parentheses, angle brackets and line breaks
    would end a Markdown link early, and a colon could turn a file name into a URL scheme."""
    return urllib.parse.quote(path, safe="/!$&'*+,;=@-._~")


def _class_scheme(checked: list[Mapping[str, Any]]) -> str | None:
    """The first policy of RECOMMENDATION_ORDER that passes at every checked site (as `quant.summarize`
    picks the overall one); "" when none passes, None when no site was checked."""
    if not checked:
        return None
    for policy in RECOMMENDATION_ORDER:
        if all(str((site.get("policies") or {}).get(policy, {}).get("verdict")) == "PASS" for site in checked):
            return policy
    return ""


def export_links(exports: Mapping[str, str], results_path: str) -> dict[str, str]:
    """Each export format's file as a path relative to the card (normalized), from its name relative
    to the results file; a name that leaves the card's folder is a UsageError."""
    base = posixpath.dirname(results_path)
    links = {}
    for name, path in sorted(exports.items()):
        joined = posixpath.normpath(posixpath.join(base, path))
        if not path or posixpath.isabs(path) or joined == ".." or joined.startswith("../"):
            raise UsageError(
                f"export file {path!r} ({name}) is not inside the card's folder",
                hint="name export files relative to the results file, beside it or below it",
            )
        links[name] = joined
    return links


def _deploy_view(
    results: Mapping[str, Any], moe: bool, results_path: str, exports: Mapping[str, str] | None
) -> dict[str, Any] | None:
    """Per class of quantized input: its largest max|a|, where, and the cheapest scheme that passed
    the held-out check at every checked site of the class; the classes not measured; the export links."""
    components = results.get("components", {})
    present = [c for c in DEPLOY_CLASSES if c in components]
    links = export_links(exports, results_path) if exports else {}
    if not present and not links:
        return None
    quant = results.get("quant") or {}
    checked: dict[str, list[Mapping[str, Any]]] = {}
    for site in quant.get("sites") or []:
        checked.setdefault(site["component"], []).append(site)
    measured: dict[str, int] = {}
    for site in results.get("sites", []):
        measured[site["component"]] = measured.get(site["component"], 0) + 1
    rows = []
    for name in present:
        entry = components[name]
        sites = checked.get(name, [])
        policy = _class_scheme(sites)
        scheme = "not checked" if policy is None else md_code(policy) if policy else "**none passes**"
        total = max(measured.get(name, 0), len(sites))
        if sites and len(sites) < total:
            scheme += f" ({len(sites)} of {total} sites checked)"
        rows.append(
            {
                "label": _label(name, moe),
                "max_abs": fmt.number(entry["max_abs"]),
                "layer": "–" if entry["layer"] is None else str(entry["layer"]),
                "site": md_code(entry["site"]),
                "scheme": scheme,
            }
        )
    off = [(flag, group, phrase) for flag, group, phrase in DEPLOY_FLAGS if not any(c in components for c in group)]
    not_measured = [f"{phrase} (`{flag}`)" for flag, _, phrase in off]
    unmeasured = {c for _, group, _ in off for c in group}
    # The option was on (or the class needs none) and the class is still absent: the model has no
    # such site. Queries are measured only where the model has them, so their absence says nothing.
    not_found = [
        _label(c, moe) for c in DEPLOY_CLASSES if c not in components and c not in unmeasured and c != "query"
    ]
    return {
        "rows": rows,
        "checked": bool(quant),
        # one group a line, so the raw Markdown stays within 80 columns
        "not_measured": ";\n".join(not_measured),
        "not_found": ", ".join(not_found),
        "exports": [
            # shown relative to the results (as the sentence says), linked relative to the card; both
            # from the normalized path, which is what the summary keeps and validate renders again
            {
                "format": md_code(name, in_table=False),
                "text": md_text(posixpath.relpath(path, posixpath.dirname(results_path) or ".")),
                "target": _link_target(path),
            }
            for name, path in links.items()
        ],
    }


def section_context(
    results: Mapping[str, Any],
    *,
    chart_path: str,
    results_path: str,
    exports: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Everything the template shows, already formatted: the template only lays it out.

    `exports` maps an export format to its file, relative to the results file; the "For
    deployment" part links each one."""
    sites = _site_index(results)
    moe = "router" in results.get("components", {})
    glob = results["global"]
    loc = glob["location"]
    value = float(glob["value"])
    boot = glob["bootstrap"]
    massive = results["massive"]
    return {
        "start_marker": START_MARKER,
        "end_marker": END_MARKER,
        "results_path": results_path,
        "model_id": md_code(results["model"]["id"], in_table=False),
        "peak": {
            "max_abs": fmt.number(glob["max_abs"]),
            "negative": value < 0,
            "value": fmt.number(value),
            "where": _where(glob["component"], glob["layer"], moe),
            "site": md_code(glob["site"], in_table=False),
            "module": md_code(glob["module"], in_table=False),
            "channel": str(loc["channel"]),
            "token": md_token(loc, in_table=False),
            "position": str(loc["position"]),
            "first_token": loc["position"] == 0,
            "sample_id": md_sample(glob),
        },
        "meaning": _quantizer_sentences(results, sites),
        "bootstrap": {
            "median": fmt.number(boot["median"]),
            "p05": fmt.number(boot["p05"]),
            "p95": fmt.number(boot["p95"]),
            "resamples": fmt.count(boot["resamples"]),
            "samples": fmt.count(results["run"]["samples"]),
        },
        "components": _component_rows(results, sites, moe),
        "massive": {
            "abs_threshold": fmt.number(massive["abs_threshold"]),
            "ratio_threshold": fmt.ratio(massive["ratio_threshold"]),
            "layers": fmt.layer_ranges(massive["layers"]),
            "count": len(massive["layers"]),
            "tokens": fmt.count(massive["tokens"]),
            "max_ratio": None if massive.get("max_ratio") is None else fmt.ratio(massive["max_ratio"]),
        },
        "quant": _quant_view(results.get("quant")),
        "deploy": _deploy_view(results, moe, results_path, exports),
        "chart_path": _link_target(chart_path),
        "layer_table": _layer_table(results, moe),
        "num_layers": len(results.get("layers", [])),
        "run": _run_view(results, results_path),
        "missing": [
            {"site": md_code(m["site"], in_table=False), "reason": md_text(m["reason"])}
            for m in results.get("missing_sites", [])
        ],
    }


def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        undefined=jinja2.StrictUndefined,
        autoescape=False,  # Markdown, not HTML: values are escaped for Markdown before they get here
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def render_section(
    results: Mapping[str, Any],
    *,
    chart_path: str = DEFAULT_CHART_PATH,
    results_path: str = DEFAULT_RESULTS_PATH,
    exports: Mapping[str, str] | None = None,
) -> str:
    """The "## Maximum activations" section, markers included, LF line endings, one trailing newline.

    `exports` (export format -> file name relative to the results file) adds links to the files
    published beside the card."""
    template = _environment().from_string(template_text(SECTION_TEMPLATE))
    context = section_context(results, chart_path=chart_path, results_path=results_path, exports=exports)
    text = template.render(**context)
    # Collapse accidental runs of blank lines and trailing spaces so the output never depends on
    # template whitespace details.
    lines = [line.rstrip() for line in text.strip("\n").split("\n")]
    tidy: list[str] = []
    for line in lines:
        if line == "" and tidy and tidy[-1] == "":
            continue
        tidy.append(line)
    return "\n".join(tidy) + "\n"


# --- front-matter summary --------------------------------------------------------------------------
def card_summary(
    results: Mapping[str, Any],
    *,
    chart_path: str = DEFAULT_CHART_PATH,
    results_path: str = DEFAULT_RESULTS_PATH,
    exports: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The machine-readable summary kept under `maxact:` in the card's front matter.

    With `exports`, it lists each export format's file relative to the card (as the section links
    it), so that `validate` renders the same links again."""
    glob = results["global"]
    summary: dict[str, Any] = {
        "schema_version": results["schema_version"],
        "results": results_path,
        "chart": chart_path,
        "global_max_abs": glob["max_abs"],
        "site": glob["site"],
        "component": glob["component"],
        "layer": glob["layer"],
        "massive_layers": list(results["massive"]["layers"]),
    }
    quant = results.get("quant")
    if quant:
        summary["quant"] = {name: p.get("verdict") for name, p in (quant.get("policies") or {}).items()}
        summary["quant_recommended"] = quant.get("recommended")
    if exports:
        summary["exports"] = export_links(exports, results_path)
    return summary


def summary_yaml(summary: Mapping[str, Any]) -> str:
    """The `maxact:` block alone, LF endings. Only this block is dumped; the rest of the YAML is never touched."""
    return yaml.safe_dump(
        {SUMMARY_KEY: dict(summary)},
        sort_keys=False,
        default_flow_style=None,
        allow_unicode=True,
        width=4096,
    )
