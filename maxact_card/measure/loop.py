"""The measurement loop: hooks on every site feed on-device statistics, batch after batch.

The loop runs the base model (never the LM head, so no [B, T, vocab] logits), pads batches on the
right (so padding never changes what a causal model computes for real tokens) and excludes padding
from every statistic by the batch's mask. The forward itself gets no attention mask when the model
is causal (`needs_attention_mask`): right padding is then invisible to real tokens anyway, and
without a mask SDPA runs its causal kernel, which skips the masked half of the scores. Nothing in a
hook or between batches waits for the device; the only transfer to the host is the final one.
"""

from __future__ import annotations

import contextlib
import time
import weakref
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch
from torch import nn

from maxact_card.errors import RuntimeFailure, UsageError
from maxact_card.measure.attention import NO_CALL, read_attention
from maxact_card.measure.hooks import Consumer, Hooks, feed_hidden_states, first_tensor
from maxact_card.measure.sites import (
    ATTENTION_READS,
    READ_GATE_HALF,
    READ_INPUT,
    READ_ROUTER,
    Site,
    SiteMap,
    discover,
    group_missing,
)
from maxact_card.measure.stats import BatchContext, SiteStats, prebuild_kernels, updates_by_path
from maxact_card.model.fusion import fused_forward
from maxact_card.switches import switched_off

ProgressFn = Callable[[int, int], None]  # (samples done, tokens done)


class Transaction(Protocol):
    """Accumulators the loop can roll back, so a batch that fails half-way is never half-merged."""

    def snapshot(self) -> object: ...

    def restore(self, saved: object) -> None: ...


class Accumulators:
    """A named group of accumulators with `state_dict()`/`load_state_dict()`: snapshots, checkpoints.

    A snapshot is taken before every batch, so it is made cheap: the state is copied into buffers
    kept from one batch to the next, with one multi-tensor copy per (device, dtype) rather than one
    kernel per field; only a rollback (rare) allocates. A member with `storages()` (`SiteStats`:
    three buffers that every field is a view of) is copied buffer by buffer and restored in place:
    three tensors per site, where its 15 fields made the host's part of the snapshot about five
    times as long.
    """

    def __init__(self, members: dict[str, object]) -> None:
        self.members = members
        self._buffers: list[torch.Tensor] = []

    def _live(self) -> list[tuple[str, str | int, torch.Tensor]]:
        """Every state tensor: a member's storages (keyed by position) where it has them, else its fields."""
        live: list[tuple[str, str | int, torch.Tensor]] = []
        for name, acc in self.members.items():
            storages = getattr(acc, "storages", None)
            if storages is not None:
                live.extend((name, i, t) for i, t in enumerate(storages()))
            else:
                live.extend((name, key, value) for key, value in acc.state_dict().items())  # type: ignore[attr-defined]
        return live

    def snapshot(self) -> list[tuple[str, str | int, torch.Tensor]]:
        """Copies of every state tensor, on their devices (no host transfer, no synchronisation)."""
        live = self._live()
        if len(self._buffers) != len(live) or any(
            b.shape != v.shape or b.dtype != v.dtype or b.device != v.device
            for b, (_, _, v) in zip(self._buffers, live, strict=True)
        ):
            self._buffers = [torch.empty_like(v) for _, _, v in live]
        groups: dict[tuple[torch.device, torch.dtype], tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        for buffer, (_, _, value) in zip(self._buffers, live, strict=True):
            dst, src = groups.setdefault((value.device, value.dtype), ([], []))
            dst.append(buffer)
            src.append(value)
        for dst, src in groups.values():
            torch._foreach_copy_(dst, src)
        return [(name, key, buffer) for buffer, (name, key, _) in zip(self._buffers, live, strict=True)]

    def restore(self, saved: object) -> None:
        """Put back a snapshot taken by `snapshot`: storages copied back in place, other members'
        fields loaded as fresh tensors (the buffers are reused)."""
        assert isinstance(saved, list)
        states: dict[str, dict[str, torch.Tensor]] = {}
        for name, key, value in saved:
            if isinstance(key, int):
                self.members[name].storages()[key].copy_(value)  # type: ignore[attr-defined]
            else:
                states.setdefault(name, {})[key] = value.clone()
        self.load(states)

    def load(self, states: dict[str, dict[str, torch.Tensor]]) -> None:
        """Replace each member's state (a checkpoint read back, or a rollback)."""
        for name, state in states.items():
            self.members[name].load_state_dict(state)  # type: ignore[attr-defined]

    def to_host(self) -> dict[str, dict[str, torch.Tensor]]:
        """Every state tensor copied to the host: what a checkpoint file holds."""
        return {name: {k: v.detach().to("cpu", copy=True) for k, v in acc.state_dict().items()}  # type: ignore[attr-defined]
                for name, acc in self.members.items()}


@dataclass
class LoopReport:
    """What a pass of the batch loop reports besides the statistics it fed."""

    wall_time_s: float
    unreadable: dict[str, str]
    oom_splits: int = 0
    batches_run: list[list[int]] = field(default_factory=list)  # what ran, after any splits
    # how the forward ran: whether it got the attention mask, `Fused.record()` of its fused pieces,
    # and the statistics' updates by the code that ran them (`stats.updates_by_path`)
    forward: dict[str, Any] = field(default_factory=dict)


@dataclass
class LoopControl:
    """Where the batch loop starts, what it calls after each planned batch, and how it undoes one.

    skip: planned batches already done (a resumed run). after_batch(done, report): called once
    every part of planned batch `done - 1` is merged; checkpoints and stop requests go there.
    transaction: what to roll back when a batch runs out of memory half-way.
    """

    skip: int = 0
    after_batch: Callable[[int, LoopReport], None] | None = None
    transaction: Transaction | None = None


@dataclass
class Measurement:
    """What one run produced: the sites, their accumulators and the bookkeeping to locate tokens."""

    site_map: SiteMap
    stats: dict[str, SiteStats]
    lengths: list[int]
    token_ids: list[list[int]]
    wall_time_s: float = 0.0
    hidden_states_fallback: bool = False

    @property
    def tokens(self) -> int:
        """Tokens measured (padding excluded)."""
        return sum(self.lengths)

    def offsets(self) -> list[int]:
        """Run index of each sample's first token."""
        out, total = [], 0
        for n in self.lengths:
            out.append(total)
            total += n
        return out


def enable_compile() -> None:
    """Fuse the statistics passes with torch.compile on CUDA unless MAXACT_CARD_COMPILE=0."""
    from maxact_card import quant
    from maxact_card.measure import stats

    on = not switched_off("MAXACT_CARD_COMPILE")
    stats.use_compile(on)
    quant.use_compile(on)


def base_model(model: nn.Module) -> nn.Module:
    """The model without its LM head: what produces hidden states."""
    base = getattr(model, "base_model", None)
    if isinstance(base, nn.Module) and base is not model:
        return base
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    return decoder if isinstance(decoder, nn.Module) else model


def _streams(device: torch.device) -> tuple[torch.cuda.Stream, torch.cuda.Stream] | None:
    """CUDA streams of `device` for the forward pass (high priority) and the statistics (low), so that
    the statistics fill what the forward leaves idle rather than run between its kernels (None off
    CUDA, or with MAXACT_CARD_OVERLAP=0)."""
    if device.type != "cuda" or switched_off("MAXACT_CARD_OVERLAP"):
        return None
    # lower is more urgent; 0 is the default (and least urgent), -1 the next (CUDA clamps to its range)
    return torch.cuda.Stream(device, priority=-1), torch.cuda.Stream(device, priority=0)


def _site_width(model: nn.Module, site: Site) -> int | None:
    module = model.get_submodule(site.module)
    weight = getattr(module, "weight", None)
    if site.read == READ_ROUTER and weight is not None:
        return int(weight.shape[0])
    if site.read == READ_INPUT and weight is not None:
        # nn.Linear stores [out, in]; GPT-2's Conv1D stores [in, out]
        return int(weight.shape[0] if type(module).__name__ == "Conv1D" else weight.shape[-1])
    if site.read == READ_GATE_HALF and weight is not None:
        return int(weight.shape[0]) // 2
    if site.component == "embedding" and weight is not None:
        return int(weight.shape[1])
    if site.component == "gate" and weight is not None:
        return int(weight.shape[0] if type(module).__name__ != "Conv1D" else weight.shape[1])
    return None


def _hidden_size(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    get = getattr(config, "get_text_config", None)
    text = get() if callable(get) else config
    for attr in ("hidden_size", "n_embd", "d_model"):
        value = getattr(text, attr, None)
        if isinstance(value, int):
            return value
    raise UsageError("cannot tell the model's hidden size from its config", hint="pass a standard transformers checkpoint")


def _probe_widths(model: nn.Module, runner: nn.Module, sites: Sequence[Site], device: torch.device,
                  vocab: int) -> tuple[dict[str, int], dict[str, int]]:
    """Widths of the sites whose width the weights do not tell, from one tiny forward, and the heads
    of the attention sites (queries, keys, values: heads x head_dim channels)."""
    widths: dict[str, int] = {}
    heads: dict[str, int] = {}
    handles = []
    attention: dict[nn.Module, list[Site]] = {}

    def grab_attention(watched: list[Site]):  # type: ignore[no-untyped-def]
        def read(*tensors: torch.Tensor) -> None:
            for site in watched:
                t = tensors[ATTENTION_READS.index(site.read)]
                if t.dim() == 4:
                    widths[site.name], heads[site.name] = int(t.shape[1] * t.shape[3]), int(t.shape[1])

        return read

    def grab(site: Site):  # type: ignore[no-untyped-def]
        def hook(module: nn.Module, args: object, output: object) -> None:
            t = first_tensor(args if site.read == READ_INPUT else output)
            if t is not None:
                widths[site.name] = int(t.shape[-1]) // (2 if site.read == READ_GATE_HALF else 1)

        return hook

    for site in sites:
        module = model.get_submodule(site.module)
        if site.read in ATTENTION_READS:
            attention.setdefault(module, []).append(site)
        elif site.read == READ_INPUT:
            handles.append(module.register_forward_pre_hook(lambda m, a, s=site: grab(s)(m, a, None)))
        else:
            handles.append(module.register_forward_hook(grab(site)))
    readers = {m: grab_attention(watched) for m, watched in attention.items()}
    try:
        ids = torch.zeros((1, 2), dtype=torch.long, device=device).clamp(max=max(vocab - 1, 0))
        with torch.inference_mode(), read_attention(readers) if readers else contextlib.nullcontext():
            runner(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return widths, heads


_MASK_NEEDED: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


def needs_attention_mask(model: nn.Module, device: torch.device, pad_token_id: int = 0) -> bool:
    """Whether the forward pass needs the attention mask to keep right padding from real tokens.

    It does not when every attention module of the model is causal (transformers' `is_causal`) and
    one tiny padded batch agrees with and without the mask at its real tokens: each token then sees
    only earlier ones, and padding comes after all of them. Any doubt keeps the mask: a model with
    no `is_causal` flag, a bidirectional module, a forward that fails without a mask, a probe that
    disagrees, or MAXACT_CARD_MASKLESS=0. Decided once per model.
    """
    runner = base_model(model)
    if switched_off("MAXACT_CARD_MASKLESS"):
        return True
    known = _MASK_NEEDED.get(runner)
    if known is None:
        known = _MASK_NEEDED[runner] = _probe_mask_needed(model, runner, device, pad_token_id)
    return known


def _probe_mask_needed(model: nn.Module, runner: nn.Module, device: torch.device, pad_token_id: int) -> bool:
    flags = [m.is_causal for m in runner.modules() if isinstance(getattr(m, "is_causal", None), bool)]
    if not flags or not all(flags):
        return True
    vocab = _vocab_size(model)
    if vocab < 2:
        return True
    real, width = 3, 6
    ids = (torch.arange(2 * width, dtype=torch.long).view(2, width) * 7 + 1) % vocab
    ids[1, real:] = pad_token_id % vocab
    mask = torch.ones_like(ids)
    mask[1, real:] = 0
    ids, mask = ids.to(device), mask.to(device)
    try:
        with torch.inference_mode():
            masked = _first_layer(runner(input_ids=ids, attention_mask=mask, use_cache=False, output_hidden_states=True))
            bare = _first_layer(runner(input_ids=ids, attention_mask=None, use_cache=False, output_hidden_states=True))
    except Exception:  # noqa: BLE001 - a model that cannot run without a mask keeps it
        return True
    if masked is None or bare is None or masked.shape != bare.shape or masked.dim() != 3:
        return True
    a, b = masked[1, :real].float(), bare[1, :real].float()
    # The first layer's output: kernels differ with and without a mask, so rounding may too, and in a
    # deep random-weight model a last-bit difference grows layer by layer; padding that leaks moves
    # most values of the first layer already.
    scale = a.pow(2).mean(-1, keepdim=True).sqrt()
    off = (a - b).abs() > 0.02 * a.abs() + 0.02 * scale
    return not bool(torch.isfinite(b).all()) or float(off.float().mean()) > 0.01


def _first_layer(out: object) -> torch.Tensor | None:
    """The first layer's output from a forward with output_hidden_states (else the last hidden state)."""
    hidden = getattr(out, "hidden_states", None)
    if isinstance(hidden, (tuple, list)) and len(hidden) > 1 and isinstance(hidden[1], torch.Tensor):
        return hidden[1]
    return first_tensor(out)


def measure(
    model: nn.Module,
    token_ids: list[list[int]],
    *,
    batches: list[list[int]],
    device: torch.device,
    pad_token_id: int = 0,
    top_k: int = 16,
    gemm_inputs: bool = False,
    kv_cache: bool = False,
    progress: ProgressFn | None = None,
    control: LoopControl | None = None,
) -> Measurement:
    """Run every batch through the base model with hooks on every site; return the statistics."""
    measurement = prepare(model, token_ids, device=device, top_k=top_k, gemm_inputs=gemm_inputs, kv_cache=kv_cache)
    report = run_measurement(measurement, model, batches=batches, device=device, pad_token_id=pad_token_id,
                             progress=progress, control=control)
    drop_sites(measurement, report.unreadable)
    return measurement


def prepare(model: nn.Module, token_ids: list[list[int]], *, device: torch.device, top_k: int = 16,
            gemm_inputs: bool = False, kv_cache: bool = False) -> Measurement:
    """Discover the sites (`gemm_inputs` and `kv_cache` as `discover` takes them) and build a fresh
    accumulator for each (nothing runs over the corpus yet). A site that gave no tensor in the probe
    forward that tells the widths is missing, with the reason."""
    if not token_ids:
        raise UsageError("the corpus selected no samples", hint="check --corpus and --samples")
    site_map = discover(model, gemm_inputs=gemm_inputs, kv_cache=kv_cache)
    runner = base_model(model)
    num_samples = len(token_ids)
    vocab = _vocab_size(model) or 1
    input_device = _input_device(model, device)

    sites = list(site_map.sites)
    widths = {s.name: w for s in sites if (w := _site_width(model, s)) is not None}
    unknown = [s for s in sites if s.name not in widths]
    heads: dict[str, int] = {}
    if unknown:
        probed, heads = _probe_widths(model, runner, unknown, input_device, vocab)
        widths.update(probed)
    silent = [(s.name, NO_CALL if s.read in ATTENTION_READS else "its module gave no tensor in a probe forward")
              for s in sites if s.name not in widths]
    sites = [replace(s, heads=heads[s.name]) if s.name in heads else s for s in sites if s.name in widths]
    site_map = SiteMap(tuple(sites), site_map.missing + tuple(group_missing(silent)), site_map.layers_path,
                       site_map.num_layers)
    stats = {
        s.name: SiteStats(widths[s.name], num_samples, _module_device(model, s, input_device), top_k=top_k,
                          massive=s.component in ("residual", "embedding"))
        for s in sites
    }
    _prebuild(model, sites, stats)
    fallback = site_map.layers_path is None
    if fallback:
        hidden = _hidden_size(model)
        fallback_sites = _fallback_sites(model)
        for s in fallback_sites:
            stats[s.name] = SiteStats(hidden, num_samples, input_device, top_k=top_k, massive=True)
        sites = [s for s in sites if s.component != "residual"] + fallback_sites
        site_map = SiteMap(tuple(sites), site_map.missing, None, len(fallback_sites))
    return Measurement(site_map, stats, [len(t) for t in token_ids], token_ids, hidden_states_fallback=fallback)


def _prebuild(model: nn.Module, sites: Sequence[Site], stats: Mapping[str, SiteStats]) -> None:
    """Start building the CUDA kernels the sites' updates will launch, side by side on background
    threads, while the loop gets ready: a bf16 model's sites on each CUDA device, a SwiGLU gate in the
    gated variant that the fused MLP reads it with."""
    if getattr(model, "dtype", None) != torch.bfloat16:
        return
    gated = not switched_off("MAXACT_CARD_GATED")
    by_device: dict[torch.device, list[tuple[int, bool, bool, int]]] = {}
    for s in sites:
        acc = stats[s.name]
        by_device.setdefault(acc.max.device, []).append((acc.width, acc.massive, gated and s.component == "gate",
                                                          acc.top_k))
    for device, wanted in by_device.items():
        prebuild_kernels(device, wanted)


def run_measurement(measurement: Measurement, model: nn.Module, *, batches: list[list[int]], device: torch.device,
                    pad_token_id: int = 0, progress: ProgressFn | None = None,
                    control: LoopControl | None = None, compile_pieces: bool = True) -> LoopReport:
    """Feed `batches` of the measurement's samples into its accumulators; time adds to `wall_time_s`.
    `compile_pieces` as `fused_forward` takes it.

    Sites found unreadable are reported, not dropped: a resumed or distributed run first learns
    what every session and process found (`drop_sites`).
    """
    stats = measurement.stats
    sites = measurement.site_map.sites
    hooked = [s for s in sites if not s.module.startswith("<")]
    fallback_count = len(sites) - len(hooked)
    after = ((lambda out, ctx: feed_hidden_states(out, stats, ctx, fallback_count))
             if measurement.hidden_states_fallback else None)
    control = control or LoopControl()
    if control.transaction is None:
        control = LoopControl(control.skip, control.after_batch, Accumulators(dict(stats)))
    report = run_hooked(
        model, measurement.token_ids, batches=batches, sites=hooked,
        consumers={s.name: stats[s.name].update for s in hooked}, device=device, pad_token_id=pad_token_id,
        progress=progress, after_forward=after, control=control, stats={s.name: stats[s.name] for s in hooked},
        compile_pieces=compile_pieces,
    )
    measurement.wall_time_s += report.wall_time_s
    return report


def drop_sites(measurement: Measurement, unreadable: dict[str, str]) -> None:
    """Move sites whose module gave no usable tensor from the measured to the missing list."""
    for name, reason in unreadable.items():
        if name not in measurement.stats:
            continue
        measurement.site_map = SiteMap(
            tuple(s for s in measurement.site_map.sites if s.name != name),
            measurement.site_map.missing + ((name, reason),),
            measurement.site_map.layers_path,
            measurement.site_map.num_layers,
        )
        measurement.stats.pop(name, None)


def padded_tokens(token_ids: list[list[int]], batch: list[int]) -> int:
    """What a batch costs on the device: rows times its longest row."""
    return len(batch) * max(len(token_ids[i]) for i in batch)


def run_hooked(
    model: nn.Module,
    token_ids: list[list[int]],
    *,
    batches: list[list[int]],
    sites: Sequence[Site],
    consumers: dict[str, Consumer],
    device: torch.device,
    pad_token_id: int = 0,
    progress: ProgressFn | None = None,
    after_forward: Callable[[object, BatchContext], None] | None = None,
    control: LoopControl | None = None,
    stats: Mapping[str, SiteStats] | None = None,
    compile_pieces: bool = True,
) -> LoopReport:
    """Run every batch through the base model with `consumers` hooked on `sites`.

    A batch that runs out of device memory is rolled back (`control.transaction`), split in two
    and retried, and every later batch is kept under half the size that failed; statistics do not
    depend on the batching, so the result is the same. A single sample that does not fit fails the
    run. Returns the wall time (device work included), the sites whose module gave no usable
    tensor and how many splits were needed. `stats`: the accumulators of the sites whose consumer is
    their `update`, which a SwiGLU MLP's kernel may update itself (`Hooks`).
    """
    control = control or LoopControl()
    runner = base_model(model)
    input_device = _input_device(model, device)
    if input_device.type == "cuda":
        enable_compile()
    use_mask = needs_attention_mask(model, input_device, pad_token_id)
    offsets: list[int] = []
    total = 0
    for t in token_ids:
        offsets.append(total)
        total += len(t)
    streams = _streams(input_device)
    hooks = Hooks(model, sites, consumers, streams, stats)
    report = LoopReport(0.0, hooks.unreadable)
    start = time.perf_counter()
    done_samples = done_tokens = 0
    queue = deque((k, batch) for k, batch in enumerate(batches) if k >= control.skip)
    parts_left = {k: 1 for k, _ in queue}
    ceiling: int | None = None  # padded tokens a batch may hold after an out-of-memory error
    before = updates_by_path()
    try:
        if streams is not None:  # the loop's own stream starts behind what was queued before it
            streams[0].wait_stream(torch.cuda.current_stream(input_device))
        on_stream = torch.cuda.stream(streams[0]) if streams is not None else contextlib.nullcontext()
        # on CUDA each RMSNorm and rotary embedding runs as one fused kernel, for this loop only
        with torch.inference_mode(), on_stream, fused_forward(model, compile_pieces=compile_pieces) as fused:
            while queue:
                k, batch = queue.popleft()
                if ceiling is not None and len(batch) > 1 and padded_tokens(token_ids, batch) > ceiling:
                    _split_front(queue, parts_left, k, batch)
                    continue
                saved = control.transaction.snapshot() if control.transaction is not None else None
                try:
                    _forward_one(runner, hooks, token_ids, batch, offsets, pad_token_id, input_device, after_forward,
                                 use_mask)
                except torch.OutOfMemoryError:
                    failed = padded_tokens(token_ids, batch)
                    shape = f"{len(batch)}x{failed // len(batch)}"
                else:
                    failed = 0
                if failed:
                    # outside the except block, so the failed batch's tensors are already released
                    if control.transaction is not None:
                        control.transaction.restore(saved)
                    if input_device.type == "cuda":
                        torch.cuda.empty_cache()
                    if len(batch) == 1:
                        raise RuntimeFailure(
                            f"out of memory on a single sample of {shape} tokens",
                            hint="lower --max-seq-len, or use --device-map auto or a larger device",
                        )
                    report.oom_splits += 1
                    ceiling = failed // 2
                    _split_front(queue, parts_left, k, batch)
                    continue
                report.batches_run.append(batch)
                done_samples += len(batch)
                done_tokens += sum(len(token_ids[i]) for i in batch)
                if progress is not None:
                    progress(done_samples, done_tokens)
                parts_left[k] -= 1
                if parts_left[k] == 0 and control.after_batch is not None:
                    report.wall_time_s = time.perf_counter() - start
                    control.after_batch(k + 1, report)
            ran = updates_by_path()
            report.forward = {"attention_mask": use_mask, **fused.record(),
                              "statistics": {path: ran[path] - before[path] for path in ran}}
        if input_device.type == "cuda":
            torch.cuda.synchronize(input_device)
    finally:
        hooks.remove()
    report.wall_time_s = time.perf_counter() - start
    return report


def _split_front(queue: deque[tuple[int, list[int]]], parts_left: dict[int, int], k: int, batch: list[int]) -> None:
    half = len(batch) // 2
    queue.appendleft((k, batch[half:]))
    queue.appendleft((k, batch[:half]))
    parts_left[k] += 1


def _forward_one(runner: nn.Module, hooks: Hooks, token_ids: list[list[int]], batch: list[int], offsets: list[int],
                 pad_token_id: int, input_device: torch.device,
                 after_forward: Callable[[object, BatchContext], None] | None, use_mask: bool = True) -> None:
    ids, mask, token_index = _pad(token_ids, batch, offsets, pad_token_id)
    ids, mask, token_index = ids.to(input_device), mask.to(input_device), token_index.to(input_device)
    hooks.ctx = BatchContext(mask, token_index, torch.tensor(batch, device=input_device), ids)
    hooks.shape = (ids.shape[0], ids.shape[1])
    try:
        out = runner(input_ids=ids, attention_mask=mask.long() if use_mask else None, use_cache=False,
                     output_hidden_states=after_forward is not None)
        hooks.forwards += 1
        if after_forward is not None:
            after_forward(out, hooks.ctx)
    finally:
        hooks.join()  # before the batch's inputs are released, or anything reads the statistics
        hooks.ctx = None


def pad_batch(token_ids: list[list[int]], batch: list[int], pad_token_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The samples `batch` as ids [B, T], padded on the right with `pad_token_id`, and the bool mask of
    their real tokens (on the host)."""
    width = max(len(token_ids[i]) for i in batch)
    ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.bool)
    for row, i in enumerate(batch):
        seq = token_ids[i]
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = True
    return ids, mask


def _pad(token_ids: list[list[int]], batch: list[int], offsets: list[int],
         pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids, mask = pad_batch(token_ids, batch, pad_token_id)
    positions = torch.arange(ids.shape[1], dtype=torch.long).unsqueeze(0)
    token_index = torch.tensor([offsets[i] for i in batch], dtype=torch.long).unsqueeze(1) + positions
    return ids, mask, token_index


def _input_embeddings(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_input_embeddings", None)
    embeddings = get() if callable(get) else None
    return embeddings if isinstance(embeddings, nn.Module) else None


def _vocab_size(model: nn.Module) -> int:
    """Rows of the input embedding (0 when the model does not say)."""
    return int(getattr(_input_embeddings(model), "num_embeddings", 0) or 0)


def _input_device(model: nn.Module, device: torch.device) -> torch.device:
    weight = getattr(_input_embeddings(model), "weight", None)
    return weight.device if isinstance(weight, torch.Tensor) else device


def _module_device(model: nn.Module, site: Site, default: torch.device) -> torch.device:
    module = model.get_submodule(site.module)
    for p in module.parameters():
        return p.device
    return default


def _fallback_sites(model: nn.Module) -> list[Site]:
    config = getattr(model, "config", None)
    get = getattr(config, "get_text_config", None)
    text = get() if callable(get) else config
    n = int(getattr(text, "num_hidden_layers", 0) or getattr(text, "n_layer", 0) or 0)
    return [Site(f"blocks.{i}.hook_resid_post", "residual", i, "<output_hidden_states>", "output",
                 f"hidden_states[{i + 1}] of the model output") for i in range(max(n - 1, 0))]
