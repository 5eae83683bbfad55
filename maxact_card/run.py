"""One measurement run end to end: load → corpus → measure → results (the core of `measure`)."""

from __future__ import annotations

import datetime as _dt
import platform
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

import maxact_card
from maxact_card import corpus as corpus_mod
from maxact_card import quant as quant_mod
from maxact_card.checkpoint import LoadedModel, load
from maxact_card.errors import UsageError
from maxact_card.measure import Measurement, measure, run_hooked
from maxact_card.results import build_results
from maxact_card.sites import SiteMap, discover

DEFAULT_MAX_SEQ_LEN = 4096
DEFAULT_MAX_BATCH_TOKENS = 16384


@dataclass(frozen=True)
class MeasureOptions:
    """Everything a measurement depends on (the CLI fills it from flags and environment)."""

    model: str
    revision: str | None = None
    token: str | None = None
    corpus: str | None = None
    samples: int | None = None
    max_seq_len: int = DEFAULT_MAX_SEQ_LEN
    truncate: bool | None = None  # None: truncate the built-in corpus, refuse long samples of user corpora
    seed: int = 0
    dtype: str = "auto"
    device: str = "auto"
    device_map: str | None = None
    trust_remote_code: bool = False
    max_batch_tokens: int | None = DEFAULT_MAX_BATCH_TOKENS
    batch_size: int | None = None
    top_k: int = 16
    force: bool = False
    quant: bool = False
    eval_fraction: float = 1 / 3
    quant_sites: str = "default"
    clip_quantile: float = 0.999
    min_sqnr: float = 20.0

    def check(self) -> None:
        """Reject impossible values before any work is done."""
        if self.samples is not None and self.samples < 1:
            raise UsageError(f"--samples must be at least 1, got {self.samples}")
        if self.max_seq_len < 1:
            raise UsageError(f"--max-seq-len must be at least 1, got {self.max_seq_len}")
        if self.batch_size is not None and self.batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.max_batch_tokens is not None and self.max_batch_tokens < 1:
            raise UsageError(f"--max-batch-tokens must be at least 1, got {self.max_batch_tokens}")
        if self.top_k < 1:
            raise UsageError(f"--top-k must be at least 1, got {self.top_k}")
        if self.quant and not 0.0 < self.eval_fraction < 1.0:
            raise UsageError(f"--eval-fraction must lie strictly between 0 and 1, got {self.eval_fraction}")
        if self.quant and not 0.0 < self.clip_quantile < 1.0:
            raise UsageError(f"--clip-quantile must lie strictly between 0 and 1, got {self.clip_quantile}")


def versions() -> dict[str, str]:
    """Versions recorded in every result."""
    import huggingface_hub
    import transformers

    return {
        "maxact_card": maxact_card.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "huggingface_hub": huggingface_hub.__version__,
        "python": platform.python_version(),
    }


def device_name(device: torch.device) -> str:
    """A human name for the device the run used."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def prepare_tokens(loaded: LoadedModel, opts: MeasureOptions, samples: list[corpus_mod.Sample],
                   builtin: bool) -> tuple[list[list[int]], bool]:
    """Tokenise the selected samples; the built-in corpus is cut to --max-seq-len unless told otherwise."""
    truncate = opts.truncate if opts.truncate is not None else builtin
    return corpus_mod.tokenize(samples, loaded.tokenizer, opts.max_seq_len, truncate=truncate), truncate


def plan_batches(lengths: list[int], opts: MeasureOptions) -> list[list[int]]:
    """Length-sorted batches under a padded-token budget, or of a fixed size."""
    if opts.batch_size is not None:
        return corpus_mod.batches(lengths, batch_size=opts.batch_size)
    return corpus_mod.batches(lengths, max_batch_tokens=opts.max_batch_tokens or DEFAULT_MAX_BATCH_TOKENS)


def decoder(tokenizer: Any) -> Callable[[int], str]:
    """Token id → its text (special tokens kept, so a BOS shows as itself)."""

    def decode(token_id: int) -> str:
        try:
            return str(tokenizer.decode([token_id], skip_special_tokens=False))
        except Exception:  # noqa: BLE001 - an undecodable id is shown by number
            return f"<id {token_id}>"

    return decode


def run_measure(opts: MeasureOptions, *, progress: Callable[[int, int], None] | None = None,
                on_plan: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Measure `opts.model` (and with `opts.quant`, check INT8/FP8 on held-out data); return the results."""
    opts.check()
    corpus = corpus_mod.load_corpus(opts.corpus)
    samples = corpus_mod.select(corpus, opts.samples, opts.seed)
    held_out: list[corpus_mod.Sample] = []
    if opts.quant:
        samples, held_out = corpus_mod.split(samples, opts.eval_fraction, opts.seed)
    thresholds = quant_mod.Thresholds(min_sqnr_db=opts.min_sqnr, min_token_sqnr_db=opts.min_sqnr) if opts.quant else None
    started = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0)
    loaded = load(opts.model, revision=opts.revision, token=opts.token, dtype=opts.dtype, device=opts.device,
                  device_map=opts.device_map, trust_remote_code=opts.trust_remote_code, force=opts.force)
    if opts.quant:
        check_quant_sites(opts.quant_sites, discover(loaded.model))
    builtin = corpus.id == corpus_mod.BUILTIN_ID
    token_ids, truncate = prepare_tokens(loaded, opts, samples, builtin)
    batches = plan_batches([len(t) for t in token_ids], opts)
    if on_plan is not None:
        on_plan(len(samples), sum(len(t) for t in token_ids))
    measurement = measure(loaded.model, token_ids, batches=batches, device=loaded.device,
                          pad_token_id=_pad_id(loaded.tokenizer), top_k=opts.top_k, progress=progress)
    results = assemble(loaded, opts, corpus, samples, measurement, truncate=truncate, started=started,
                       eval_samples=len(held_out))
    if opts.quant:
        assert thresholds is not None
        eval_ids, _ = prepare_tokens(loaded, opts, held_out, builtin)
        results["quant"] = quant_check(loaded, opts, measurement, results, eval_ids, thresholds)
    return results


def check_quant_sites(spec: str, site_map: SiteMap) -> None:
    """Refuse an unknown --quant-sites name before any forward pass."""
    if spec in QUANT_SITE_SETS:
        return
    known = {s.name for s in site_map.sites}
    unknown = [name for name in _split_names(spec) if name not in known]
    if unknown:
        examples = ", ".join(sorted(known)[:4])
        raise UsageError(f"unknown --quant-sites name {unknown[0]!r}",
                         hint=f"use all, residual, peak, default or site names such as {examples}")


QUANT_SITE_SETS = ("default", "all", "residual", "peak")


def _split_names(spec: str) -> list[str]:
    return [n.strip() for n in spec.split(",") if n.strip()]


def quant_sites(spec: str, results: dict[str, Any]) -> list[str]:
    """The site names the INT8/FP8 check evaluates, in results order."""
    names = [s["name"] for s in results["sites"]]
    peak = results["global"]["site"]
    by_name = {s["name"]: s for s in results["sites"]}
    if spec == "all":
        chosen = set(names)
    elif spec == "residual":
        chosen = {n for n in names if by_name[n]["component"] == "residual"}
    elif spec == "peak":
        chosen = {peak}
    elif spec == "default":
        chosen = {n for n in names if by_name[n]["component"] in ("residual", "down_proj_input")} | {peak}
    else:
        chosen = {n for n in _split_names(spec) if n in by_name}
    return [n for n in names if n in chosen]


def quant_check(loaded: LoadedModel, opts: MeasureOptions, measurement: Measurement, results: dict[str, Any],
                eval_ids: list[list[int]], thresholds: quant_mod.Thresholds) -> dict[str, Any]:
    """One extra forward pass over the held-out part, every policy evaluated at every chosen site."""
    names = quant_sites(opts.quant_sites, results)
    by_name = measurement.site_map.by_name()
    accumulators: dict[str, quant_mod.QuantAccumulator] = {}
    for name in names:
        stats = measurement.stats[name]
        site_result = next(s for s in results["sites"] if s["name"] == name)
        scales = quant_mod.static_scales(site_result["max_abs"], stats.hist.cpu(), opts.clip_quantile)
        accumulators[name] = quant_mod.QuantAccumulator(scales, device=stats.max.device, thresholds=thresholds)
    batches = plan_batches([len(t) for t in eval_ids], opts)
    wall, unreadable = run_hooked(
        loaded.model, eval_ids, batches=batches, sites=[by_name[n] for n in names],
        consumers={n: (lambda x, ctx, acc=accumulators[n]: acc.update(x, ctx.mask)) for n in names},
        device=loaded.device, pad_token_id=_pad_id(loaded.tokenizer),
    )
    per_site = {n: accumulators[n].result() for n in names if n not in unreadable}
    summary = quant_mod.summarize(per_site, peak_site=results["global"]["site"] if results["global"]["site"] in per_site else None)
    site_rows = []
    for name in per_site:
        s = by_name[name]
        site_rows.append({"site": name, "component": s.component, "layer": s.layer, "policies": per_site[name]})
    return {
        "eval_fraction": opts.eval_fraction,
        "eval_samples": len(eval_ids),
        "eval_tokens": sum(len(t) for t in eval_ids),
        "clip_quantile": opts.clip_quantile,
        "thresholds": {"min_sqnr_db": thresholds.min_sqnr_db, "min_token_sqnr_db": thresholds.min_token_sqnr_db,
                       "min_token_share": thresholds.min_token_share},
        "wall_time_s": round(wall, 3),
        "sites": site_rows,
        **summary,
    }


def assemble(loaded: LoadedModel, opts: MeasureOptions, corpus: corpus_mod.Corpus,
             samples: list[corpus_mod.Sample], measurement: Measurement, *, truncate: bool,
             started: _dt.datetime, eval_samples: int = 0) -> dict[str, Any]:
    """The results document for a finished measurement."""
    tokens = measurement.tokens
    categories: dict[str, int] = {}
    for s in samples:
        categories[s.category] = categories.get(s.category, 0) + 1
    run_info = {
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "device": device_name(loaded.device),
        "device_type": loaded.device.type,
        "device_map": opts.device_map,
        "world_size": 1,
        "versions": versions(),
        "seed": opts.seed,
        "samples": len(samples),
        "tokens": tokens,
        "max_seq_len": opts.max_seq_len,
        "truncate": truncate,
        "batching": f"batch_size={opts.batch_size}" if opts.batch_size is not None
        else f"max_batch_tokens={opts.max_batch_tokens or DEFAULT_MAX_BATCH_TOKENS}",
        "wall_time_s": round(measurement.wall_time_s, 3),
        "tokens_per_s": round(tokens / measurement.wall_time_s, 1) if measurement.wall_time_s > 0 else 0.0,
        "started_at": started.isoformat(),
    }
    corpus_info = {"id": corpus.id, "sha256": corpus.sha256, "samples": len(samples), "categories": categories,
                   "eval_samples": eval_samples}
    return build_results(measurement, model_info=loaded.info, run_info=run_info, corpus_info=corpus_info,
                         sample_ids=[s.id for s in samples], decode=decoder(loaded.tokenizer), seed=opts.seed)


def _pad_id(tokenizer: Any) -> int:
    for attr in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value
    return 0
