"""One measurement run end to end: load → corpus → measure → results (the core of `measure`)."""

from __future__ import annotations

import contextlib
import datetime as _dt
import platform
import re
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import maxact_card
from maxact_card import corpus as corpus_mod
from maxact_card import progress
from maxact_card import quant as quant_mod
from maxact_card.corpus.tokenizing import DEFAULT_MAX_SEQ_LEN
from maxact_card.documents import KV_CACHE, LINEAR_INPUTS
from maxact_card.errors import RuntimeFailure, UsageError
from maxact_card.measure import distributed
from maxact_card.measure.budget import active_parameters, auto_batch_tokens, compile_choice
from maxact_card.measure.loop import (
    Accumulators,
    LoopControl,
    LoopReport,
    Measurement,
    drop_sites,
    padded_tokens,
    prepare,
    run_hooked,
    run_measurement,
)
from maxact_card.measure.results import build_results, channel_file
from maxact_card.measure.sites import SiteMap, discover
from maxact_card.measure.state import PassState, StateDir, fingerprint_digest
from maxact_card.measure.stats import prebuild_kernels
from maxact_card.model.checkpoint import LoadedModel, load

#: Largest --top-k: the top-K rows of every site are kept on the device, K x width each.
MAX_TOP_K = 1024
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
    max_batch_tokens: int | str | None = "auto"  # an int, or "auto": sized from free device memory
    batch_size: int | None = None
    top_k: int = 16
    gemm_inputs: bool = False  # also the inputs of the other Linear layers of each block (`discover`)
    kv_cache: bool = False  # also each attention layer's queries, keys and values (`discover`)
    force: bool = False
    quant: bool = False
    eval_fraction: float = 1 / 3
    quant_sites: str = "default"
    clip_quantile: float = 0.999
    min_sqnr: float = 20.0
    state_dir: str | Path | None = None
    resume: bool = False
    checkpoint_every: int = 20

    def __post_init__(self) -> None:
        # the command line hands these over as text and paths: one spelling from here on
        object.__setattr__(self, "max_batch_tokens", parse_batch_tokens(self.max_batch_tokens))
        if self.state_dir is not None:
            object.__setattr__(self, "state_dir", str(self.state_dir))

    def check(self) -> None:
        """Reject impossible values before any work is done."""
        if self.samples is not None and self.samples < 1:
            raise UsageError(f"--samples must be at least 1, got {self.samples}")
        if self.max_seq_len < 1:
            raise UsageError(f"--max-seq-len must be at least 1, got {self.max_seq_len}")
        if self.batch_size is not None and self.batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, got {self.batch_size}")
        if isinstance(self.max_batch_tokens, str) and self.max_batch_tokens != "auto":
            raise UsageError(f"--max-batch-tokens must be a number of tokens or auto, got {self.max_batch_tokens!r}")
        if isinstance(self.max_batch_tokens, int) and self.max_batch_tokens < 1:
            raise UsageError(f"--max-batch-tokens must be at least 1, got {self.max_batch_tokens}")
        if self.checkpoint_every < 1:
            raise UsageError(f"--checkpoint-every must be at least 1, got {self.checkpoint_every}")
        if self.resume and not self.state_dir:
            raise UsageError("--resume needs the --state-dir of the run to continue")
        if not 1 <= self.top_k <= MAX_TOP_K:
            raise UsageError(f"--top-k must lie between 1 and {MAX_TOP_K}, got {self.top_k}",
                             hint="the card shows 16; each kept token costs a row of every site's width")
        if not 0 <= self.seed < 2**63:
            raise UsageError(f"--seed must lie between 0 and 2**63 - 1, got {self.seed}")
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
    progress.step(f"tokenizing {len(samples):,} samples", "tokenize")
    token_ids = corpus_mod.tokenize(samples, loaded.tokenizer, opts.max_seq_len, truncate=truncate)
    check_vocabulary(loaded.model, samples, token_ids)
    return token_ids, truncate


def check_vocabulary(model: torch.nn.Module, samples: list[corpus_mod.Sample], token_ids: list[list[int]]) -> None:
    """Refuse token ids the model's embedding has no row for (pre-tokenised samples can hold any)."""
    get_embeddings = getattr(model, "get_input_embeddings", None)
    rows = getattr(get_embeddings() if callable(get_embeddings) else None, "num_embeddings", None)
    if not isinstance(rows, int):
        return
    for sample, ids in zip(samples, token_ids):
        if not ids or (min(ids) >= 0 and max(ids) < rows):  # min/max run in C: millions of ids in a blink
            continue
        bad = next((i for i in ids if not 0 <= i < rows), None)
        if bad is not None:
            raise UsageError(f"sample {sample.id} holds token id {bad}, outside the model's vocabulary of {rows:,}",
                             hint="tokenise the corpus with this model's tokenizer")


def parse_batch_tokens(value: str | int | None) -> int | str | None:
    """`--max-batch-tokens`: a positive number of tokens, or auto."""
    if value is None or isinstance(value, int):
        return value
    text = value.strip().lower()
    if text == "auto":
        return "auto"
    try:
        return int(text.replace("_", ""))
    except ValueError:
        raise UsageError(f"--max-batch-tokens must be a number of tokens or auto, got {value!r}",
                         hint="pass e.g. --max-batch-tokens 16384, or auto to size it from free memory") from None


def batch_budget(opts: MeasureOptions, loaded: LoadedModel) -> int | None:
    """The padded-token budget of a batch (None with --batch-size)."""
    if opts.batch_size is not None:
        return None
    if opts.max_batch_tokens in (None, "auto"):
        return auto_batch_tokens(loaded.model, loaded.device, loaded.dtype, opts.max_seq_len,
                                 sharded=bool(opts.device_map))
    assert isinstance(opts.max_batch_tokens, int)
    return opts.max_batch_tokens


def plan_batches(lengths: list[int], opts: MeasureOptions, budget: int | None = None) -> list[list[int]]:
    """Length-sorted batches under a padded-token budget, or of a fixed size."""
    if opts.batch_size is not None:
        return corpus_mod.batches(lengths, batch_size=opts.batch_size)
    if budget is None:
        budget = opts.max_batch_tokens if isinstance(opts.max_batch_tokens, int) else DEFAULT_MAX_BATCH_TOKENS
    return corpus_mod.batches(lengths, max_batch_tokens=budget)


def speller(tokenizer: Any) -> Callable[[int], str | None]:
    """Token id → its spelling in the tokenizer's vocabulary (`Ġthe`, `Ð`, `<0xD0>`), or None."""

    def spell(token_id: int) -> str | None:
        try:
            piece = tokenizer.convert_ids_to_tokens(token_id)
        except Exception:  # noqa: BLE001 - a tokenizer without a vocabulary to ask
            return None
        return piece if isinstance(piece, str) and piece else None

    return spell


def decode_ids(tokenizer: Any, ids: list[int]) -> str:
    """Token ids → their text (special tokens kept, so a BOS shows as itself); ids that will not
    decode are shown by number."""
    try:
        return str(tokenizer.decode(ids, skip_special_tokens=False))
    except Exception:  # noqa: BLE001 - an undecodable id is shown by number
        return " ".join(f"<id {i}>" for i in ids)


def decoder(tokenizer: Any) -> Callable[[int], str]:
    """Token id → its text (`decode_ids` of one id)."""
    return lambda token_id: decode_ids(tokenizer, [token_id])


@dataclass(frozen=True)
class Measured:
    """A finished run: the results document and the bytes of its per-channel companion file
    (`results.channel_file`), which `documents.write_results` writes beside the results."""

    results: dict[str, Any]
    channels: bytes


def run_measure(opts: MeasureOptions, *, import_s: float = 0.0) -> dict[str, Any] | None:
    """Measure `opts.model` (and with `opts.quant`, check INT8/FP8 on held-out data); return the results.

    Under torchrun every process measures its share of the batches and all of them end up with
    the same merged statistics; only rank 0 gets the results, the others get None. Each step is
    announced through `progress` (rank 0's only). `import_s`: the seconds the caller spent importing
    this module (torch with it), counted in the "import" phase.
    """
    measured = measure_run(opts, import_s=import_s)
    return None if measured is None else measured.results


def measure_run(opts: MeasureOptions, *, import_s: float = 0.0) -> Measured | None:
    """`run_measure`, with the per-channel vectors the results file's companion holds."""
    world = distributed.world_from_env()
    with progress.timing() as clock, (progress.listening(None) if not world.is_main else contextlib.nullcontext()):
        clock.add("import", import_s)
        measured = _measure(opts, world)
        if measured is not None:
            measured.results["run"]["phases"] = clock.stop()
        return measured


def _measure(opts: MeasureOptions, world: distributed.World) -> Measured | None:
    opts.check()
    if world.distributed and opts.device_map:
        raise UsageError("--device-map spreads one model over the GPUs; it cannot be combined with several processes",
                         hint="use either --device-map auto (one process) or torchrun/--gpus (one model per GPU)")
    progress.step("reading the corpus", "corpus")
    corpus = corpus_mod.load_corpus(opts.corpus)
    samples = corpus_mod.select(corpus, opts.samples, opts.seed)
    held_out: list[corpus_mod.Sample] = []
    if opts.quant:
        samples, held_out = corpus_mod.split(samples, opts.eval_fraction, opts.seed)
    started = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0)
    requested = world.device(opts.device)
    if not opts.device_map and (requested in ("auto", "cuda") or re.fullmatch(r"cuda:\d+", requested)):
        # the first kernel compile on a machine costs seconds: it happens beside the loading (a
        # device that does not exist fails the load, with its own message, and the build quietly)
        prebuild_kernels(torch.device("cuda" if requested == "auto" else requested))
    loaded = load(opts.model, revision=opts.revision, token=opts.token, dtype=opts.dtype,
                  device=world.device(opts.device), device_map=opts.device_map,
                  trust_remote_code=opts.trust_remote_code, force=opts.force, wait_for_hashes=False)
    # a local folder's weights go on hashing beside the measurement: their sha256 is waited for only
    # where it is needed (the state dir's fingerprint, the results)
    try:
        distributed.init(world, loaded.device)
        with _stop_on_signals(enabled=opts.state_dir is not None) as stop:
            run = _Run(opts, world, loaded, corpus, samples, held_out, stop)
            return run.execute(started)
    finally:
        loaded.stop_hashing()
        distributed.close(world)


class _StopRequest:
    """Set by SIGTERM/SIGINT while a checkpointed run is going: stop after the batch in flight."""

    def __init__(self) -> None:
        self.signal: str | None = None


@contextmanager
def _stop_on_signals(*, enabled: bool) -> Iterator[_StopRequest]:
    stop = _StopRequest()
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum: int, frame: object) -> None:
        stop.signal = signal.Signals(signum).name

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


class _Run:
    """One run's passes: the measurement, then (with --quant) the held-out check, each resumable."""

    def __init__(self, opts: MeasureOptions, world: distributed.World, loaded: LoadedModel,
                 corpus: corpus_mod.Corpus, samples: list[corpus_mod.Sample], held_out: list[corpus_mod.Sample],
                 stop: _StopRequest) -> None:
        self.opts = opts
        self.world = world
        self.loaded = loaded
        self.corpus = corpus
        self.samples = samples
        self.held_out = held_out
        self.stop = stop
        self.store: StateDir | None = None
        self.resumed = False
        self.oom_splits = 0

    def execute(self, started: _dt.datetime) -> Measured | None:
        opts, loaded = self.opts, self.loaded
        if opts.quant:
            check_quant_sites(opts.quant_sites, discover(loaded.model, gemm_inputs=opts.gemm_inputs,
                                                                kv_cache=opts.kv_cache))
        builtin = self.corpus.id == corpus_mod.BUILTIN_ID
        token_ids, truncate = prepare_tokens(loaded, opts, self.samples, builtin)
        budget = batch_budget(opts, loaded)
        plan = plan_batches([len(t) for t in token_ids], opts, budget)
        if opts.state_dir:
            self.store = self._open_state(Path(opts.state_dir), truncate)
        progress.step("finding the sites", "discover")
        measurement = prepare(loaded.model, token_ids, device=loaded.device, top_k=opts.top_k,
                              gemm_inputs=opts.gemm_inputs, kv_cache=opts.kv_cache)
        stats = measurement.stats

        # this process's share of the padded tokens: what its loop costs, and so whether compiling pays
        share = sum(padded_tokens(token_ids, b) for b in plan) / self.world.size
        choice = compile_choice(round(share), active_parameters(loaded.model), loaded.device)

        def run_fn(batches: list[list[int]], control: LoopControl) -> LoopReport:
            return run_measurement(measurement, loaded.model, batches=batches, device=loaded.device,
                                   pad_token_id=_pad_id(loaded.tokenizer), progress=progress.advance,
                                   control=control, compile_pieces=choice.chosen)

        label = "measuring" + (" (the first batches compile the fused pieces)" if choice.chosen else "")
        wall, unreadable, forward = self.run_pass("measure", stats, plan, run_fn, label, token_ids)
        forward = {**forward, "compile": choice.record()}
        unreadable = distributed.union_unreadable(self.world, unreadable)
        drop_sites(measurement, unreadable)
        distributed.all_reduce_fields(self.world, [measurement.stats[n] for n in sorted(measurement.stats)])
        measurement.wall_time_s = distributed.all_reduce_scalar(self.world, wall, loaded.device)
        batching = (f"batch_size={opts.batch_size}" if budget is None else
                    f"max_batch_tokens={budget}" + (" (auto)" if opts.max_batch_tokens in (None, "auto") else ""))
        results = assemble(loaded, opts, self.corpus, self.samples, measurement, truncate=truncate, started=started,
                           eval_samples=len(self.held_out), world_size=self.world.size, batching=batching)
        if opts.quant:
            eval_ids, _ = prepare_tokens(loaded, opts, self.held_out, builtin)
            results["quant"] = self.quant_pass(measurement, results, eval_ids, budget)
        splits = distributed.all_reduce_scalar(self.world, float(self.oom_splits), loaded.device, op="sum")
        results["run"]["oom_splits"] = int(splits)
        results["run"]["resumed"] = self.resumed
        results["run"]["forward"] = forward
        return Measured(results, channel_file(measurement, results)) if self.world.is_main else None

    def _open_state(self, directory: Path, truncate: bool) -> StateDir:
        opts, info = self.opts, self.loaded.weights_hashed()
        fingerprint = {
            "model": info["id"], "commit_sha": info.get("commit_sha"),
            "weights": fingerprint_digest(info.get("weight_files") or []),
            "corpus": {"id": self.corpus.id, "sha256": self.corpus.sha256},
            "samples": fingerprint_digest([s.id for s in self.samples]),
            "held_out": fingerprint_digest([s.id for s in self.held_out]),
            "settings": {"max_seq_len": opts.max_seq_len, "truncate": truncate, "seed": opts.seed,
                         "dtype": str(self.loaded.dtype).removeprefix("torch."), "top_k": opts.top_k,
                         "gemm_inputs": opts.gemm_inputs, "kv_cache": opts.kv_cache, "quant": opts.quant,
                         "eval_fraction": opts.eval_fraction if opts.quant else None,
                         "quant_sites": opts.quant_sites if opts.quant else None,
                         "clip_quantile": opts.clip_quantile if opts.quant else None,
                         "min_sqnr": opts.min_sqnr if opts.quant else None},
            "world_size": self.world.size,
            "maxact_card": maxact_card.__version__,
        }
        store = StateDir(directory, fingerprint, resume=opts.resume, rank=self.world.rank)
        if self.world.distributed:
            import torch.distributed as dist

            dist.barrier()  # rank 0 has checked and created the directory
        return store

    def run_pass(self, name: str, accumulators: dict[str, Any], plan: list[list[int]],
                 run_fn: Callable[[list[list[int]], LoopControl], LoopReport], label: str,
                 token_ids: list[list[int]]) -> tuple[float, dict[str, str], dict[str, Any]]:
        """Run one pass over this process's share of `plan`, resuming and checkpointing when asked;
        announced to `progress` as `label`.

        Returns the wall time (earlier sessions of a resumed run included), the unreadable sites
        and how the forward ran (`LoopReport.forward`); out-of-memory splits add to `oom_splits`.
        """
        group = Accumulators(accumulators)
        saved = self.store.load(name) if self.store is not None else None
        skip, wall_before, unreadable_before = 0, 0.0, {}
        if saved is not None:
            if set(saved.accumulators) != set(accumulators):
                raise UsageError(f"the {name} checkpoint in {self.opts.state_dir} does not match this model's sites",
                                 hint="choose a new --state-dir")
            plan = saved.plan
            group.load(saved.accumulators)  # each accumulator moves its state to its own device
            skip, wall_before, unreadable_before = saved.done, saved.wall_time_s, saved.unreadable
            self.resumed = True
        shard = self.world.shard(plan)
        progress.start_pass(label, sum(len(b) for b in shard), sum(len(token_ids[i]) for b in shard for i in b),
                            len(shard), phase=name)
        every = self.opts.checkpoint_every
        store, stop = self.store, self.stop

        def after_batch(done: int, report: LoopReport) -> None:
            if store is None:
                return
            last = done == len(shard)
            if done % every == 0 or last or stop.signal:
                unreadable = dict(unreadable_before, **report.unreadable)
                store.save(name, PassState(plan, done, group.to_host(), unreadable, wall_before + report.wall_time_s))
            if stop.signal and not last:
                raise RuntimeFailure(
                    f"stopped by {stop.signal} after {done} of {len(shard)} batches of the {name} pass; "
                    f"the state is saved in {self.opts.state_dir}",
                    hint="continue with the same command and --resume",
                )

        report = run_fn(shard, LoopControl(skip=skip, after_batch=after_batch, transaction=group))
        self.oom_splits += report.oom_splits
        return wall_before + report.wall_time_s, dict(unreadable_before, **report.unreadable), report.forward

    def quant_pass(self, measurement: Measurement, results: dict[str, Any], eval_ids: list[list[int]],
                   budget: int | None) -> dict[str, Any]:
        """One extra forward pass over the held-out part, every policy evaluated at every chosen site."""
        opts, loaded = self.opts, self.loaded
        thresholds = quant_mod.Thresholds(min_sqnr_db=opts.min_sqnr, min_token_sqnr_db=opts.min_sqnr)
        names = quant_sites(opts.quant_sites, results)
        by_name = measurement.site_map.by_name()
        accumulators: dict[str, quant_mod.QuantAccumulator] = {}
        for name in names:
            stats = measurement.stats[name]
            site_result = next(s for s in results["sites"] if s["name"] == name)
            scales = quant_mod.static_scales(site_result["max_abs"], stats.hist.cpu(), opts.clip_quantile)
            accumulators[name] = quant_mod.QuantAccumulator(scales, device=stats.max.device, thresholds=thresholds)
        plan = plan_batches([len(t) for t in eval_ids], opts, budget)

        def run_fn(batches: list[list[int]], control: LoopControl) -> LoopReport:
            return run_hooked(
                loaded.model, eval_ids, batches=batches, sites=[by_name[n] for n in names],
                consumers={n: (lambda x, ctx, acc=accumulators[n]: acc.update(x, ctx.mask)) for n in names},
                device=loaded.device, pad_token_id=_pad_id(loaded.tokenizer), control=control,
                progress=progress.advance,
            )

        wall, unreadable, _ = self.run_pass("quant", dict(accumulators), plan, run_fn,
                                            "checking INT8/FP8 on held-out data", eval_ids)
        unreadable = distributed.union_unreadable(self.world, unreadable)
        kept = [n for n in names if n not in unreadable]
        distributed.all_reduce_fields(self.world, [accumulators[n] for n in kept])
        wall = distributed.all_reduce_scalar(self.world, wall, loaded.device)
        return quant_block(opts, thresholds, by_name, {n: accumulators[n].result() for n in kept}, results,
                           eval_ids, wall)


def check_quant_sites(spec: str, site_map: SiteMap) -> None:
    """Refuse an unknown --quant-sites name, or a set that selects no site of this run, before any
    forward pass."""
    if spec in _MEASURED_WITH and not any(s.component in _SET_COMPONENTS[spec] for s in site_map.sites):
        raise UsageError(f"--quant-sites {spec} selects no site of this model as measured",
                         hint=f"measure them with {_MEASURED_WITH[spec]}, or choose another --quant-sites")
    if spec in QUANT_SITE_SETS:
        return
    known = {s.name for s in site_map.sites}
    unknown = [name for name in _split_names(spec) if name not in known]
    if unknown:
        examples = ", ".join(sorted(known)[:4])
        raise UsageError(f"unknown --quant-sites name {unknown[0]!r}",
                         hint=f"use all, residual, linear, kv, peak, default or site names such as {examples}")


QUANT_SITE_SETS = ("default", "all", "residual", "linear", "kv", "peak")
# the sets chosen by component, and the option that measures a set a default run may lack
_SET_COMPONENTS = {"residual": ("residual",), "linear": LINEAR_INPUTS, "kv": KV_CACHE}
_MEASURED_WITH = {"linear": "--gemm-inputs", "kv": "--kv-cache"}


def _split_names(spec: str) -> list[str]:
    return [n.strip() for n in spec.split(",") if n.strip()]


def quant_sites(spec: str, results: dict[str, Any]) -> list[str]:
    """The site names the INT8/FP8 check evaluates, in results order."""
    names = [s["name"] for s in results["sites"]]
    peak = results["global"]["site"]
    by_name = {s["name"]: s for s in results["sites"]}
    if spec == "all":
        chosen = set(names)
    elif spec in _SET_COMPONENTS:
        chosen = {n for n in names if by_name[n]["component"] in _SET_COMPONENTS[spec]}
    elif spec == "peak":
        chosen = {peak}
    elif spec == "default":
        chosen = {n for n in names if by_name[n]["component"] in ("residual", *LINEAR_INPUTS, *KV_CACHE)} | {peak}
    else:
        chosen = {n for n in _split_names(spec) if n in by_name}
    return [n for n in names if n in chosen]


def quant_block(opts: MeasureOptions, thresholds: quant_mod.Thresholds, by_name: dict[str, Any],
                per_site: dict[str, dict[str, Any]], results: dict[str, Any], eval_ids: list[list[int]],
                wall: float) -> dict[str, Any]:
    """The results' `quant` block from every chosen site's policy figures."""
    peak = results["global"]["site"]
    summary = quant_mod.summarize(per_site, peak_site=peak if peak in per_site else None)
    site_rows = []
    for name, policies in per_site.items():
        s = by_name[name]
        site_rows.append({"site": name, "component": s.component, "layer": s.layer, "policies": policies})
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
             started: _dt.datetime, eval_samples: int = 0, world_size: int = 1,
             batching: str | None = None) -> dict[str, Any]:
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
        "world_size": world_size,
        "versions": versions(),
        "seed": opts.seed,
        "samples": len(samples),
        "tokens": tokens,
        "max_seq_len": opts.max_seq_len,
        "truncate": truncate,
        "gemm_inputs": opts.gemm_inputs,
        "kv_cache": opts.kv_cache,
        "batching": batching or (f"batch_size={opts.batch_size}" if opts.batch_size is not None
                                 else f"max_batch_tokens={opts.max_batch_tokens}"),
        "wall_time_s": round(measurement.wall_time_s, 3),
        "tokens_per_s": round(tokens / measurement.wall_time_s, 1) if measurement.wall_time_s > 0 else 0.0,
        "started_at": started.isoformat(),
    }
    corpus_info = {"id": corpus.id, "sha256": corpus.sha256, "samples": len(samples), "categories": categories,
                   "eval_samples": eval_samples}
    results = build_results(measurement, model_info=loaded.weights_hashed(), run_info=run_info, corpus_info=corpus_info,
                            sample_ids=[s.id for s in samples], decode=decoder(loaded.tokenizer), seed=opts.seed,
                            spell=speller(loaded.tokenizer))
    results["global"]["context"] = peak_context(loaded.tokenizer, measurement.token_ids, samples,
                                                results["global"]["location"])
    return results


def peak_context(tokenizer: Any, token_ids: list[list[int]], samples: list[corpus_mod.Sample],
                 location: dict[str, Any], *, width: int = 8) -> dict[str, str]:
    """The peak's sample category and its text around the peak, `width` tokens either side, with
    the peak's token marked ⟦ ⟧. A token that is a lone byte of a character is marked together with
    the tokens that complete the character, so that the excerpt reads as text (`⟦Д⟧ій`)."""
    index, position = location["sample"], location["position"]
    ids = token_ids[index]
    start, end = max(0, position - width), min(len(ids), position + 1 + width)

    def text(part: list[int]) -> str:
        return decode_ids(tokenizer, part)

    before, whole = text(ids[start:position]), text(ids[start:end])
    through = ""
    for last in range(position + 1, min(end, position + 4) + 1):  # a character is at most 4 bytes
        through = text(ids[start:last])
        if not through.endswith("\ufffd"):
            break
    if whole.startswith(through) and through.startswith(before):
        excerpt = f"{before}⟦{through[len(before):]}⟧{whole[len(through):]}"
    else:  # a tokenizer whose pieces do not concatenate: mark the token's own text
        excerpt = f"{before}⟦{location['token']}⟧{text(ids[position + 1:end])}"
    return {"category": samples[index].category, "excerpt": excerpt[:400]}


def _pad_id(tokenizer: Any) -> int:
    for attr in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value
    return 0
