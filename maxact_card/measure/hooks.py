"""The hooks of the measurement loop: one per site, each extracting its tensor and feeding its accumulator.

What a hook reads depends on the site (`Site.read`): a module's input or output, a router's logits
reshaped to [batch, tokens, experts], the gate half of a SwiGLU MLP (handed to the fused MLP forward
of `model.fusion`, which folds the gate's statistics into the product's pass), or the model's
`hidden_states` where no layer stack was found.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from maxact_card.errors import RuntimeFailure
from maxact_card.measure.attention import NO_CALL, AttentionReader, read_attention, tokens_last
from maxact_card.measure.sites import (
    ATTENTION_READS,
    READ_GATE_HALF,
    READ_INPUT,
    READ_OUTPUT,
    READ_ROUTER,
    Site,
)
from maxact_card.measure.stats import BatchContext, SiteStats, gated_update
from maxact_card.model import fusion

Consumer = Callable[[torch.Tensor, BatchContext], None]  # what a hook feeds: a [B, T, H] tensor and its batch


def first_tensor(value: object) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    hidden = getattr(value, "last_hidden_state", None)
    return hidden if isinstance(hidden, torch.Tensor) else None


def _router_logits(value: object, num_experts: int) -> torch.Tensor | None:
    items = value if isinstance(value, (tuple, list)) else (value,)
    for item in items:
        if isinstance(item, torch.Tensor) and item.is_floating_point() and item.shape[-1] == num_experts:
            return item
    return None


def _as_bth(t: torch.Tensor, batch: int, seq: int) -> torch.Tensor | None:
    if t.dim() == 3 and t.shape[0] == batch and t.shape[1] == seq:
        return t
    if t.dim() == 2 and t.shape[0] == batch * seq:  # flattened tokens (MoE routers)
        return t.view(batch, seq, t.shape[1])
    return None


class Hooks:
    """Registers one hook per site; each extracts its tensor and updates its accumulator.

    With streams (CUDA: the loop runs on `main`), each update is queued on `side` behind the work that
    produced its tensor, and the tensor is marked as in use by that stream so that its memory is not
    reused early; the forward pass goes on meanwhile. `join()` makes the forward's stream wait for
    every queued update: called after each forward pass, before the accumulators are read, rolled
    back or the batch's inputs released.

    The gate and the down_proj input of a SwiGLU MLP are also handed to the MLP (`fusion.read_gated`):
    where `fused_forward` swapped its forward, the MLP's product is made by `_gated`, which folds
    the gate's statistics, when its accumulator is in `stats`, into the kernel that makes the
    product (on the forward's stream: the product is needed next), and hands the product to its
    site as the hook would; the sites' own hooks stay quiet for that call.

    Queries, keys and values are read where the attention module calls its attention function
    (`measure.attention`); a site whose module never called it over a whole run (`forwards` > 0) is
    unreadable on `remove()`.
    """

    def __init__(self, model: nn.Module, sites: Sequence[Site], consumers: dict[str, Consumer],
                 streams: tuple[torch.cuda.Stream, torch.cuda.Stream] | None = None,
                 stats: Mapping[str, SiteStats] | None = None) -> None:
        self.ctx: BatchContext | None = None
        self.shape: tuple[int, int] = (0, 0)
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        self.undo: list[Callable[[], None]] = []
        self.unreadable: dict[str, str] = {}
        self.main: torch.cuda.Stream | None = streams[0] if streams is not None else None
        self.side: torch.cuda.Stream | None = streams[1] if streams is not None else None
        # one event, recorded again for each update (a wait takes the event as it is when queued)
        self._ready = torch.cuda.Event() if streams is not None else None
        self.stats = stats or {}
        self.forwards = 0  # forward passes run (`_forward_one` counts them)
        self._attention_sites: list[Site] = []
        self._seen: set[str] = set()
        gated: dict[str, dict[str, tuple[Site, Consumer]]] = {}
        attention: dict[nn.Module, dict[str, tuple[Site, Consumer]]] = {}
        for site in sites:
            module = model.get_submodule(site.module)
            acc = consumers[site.name]
            if site.read in ATTENTION_READS:
                attention.setdefault(module, {})[site.read] = (site, acc)
                self._attention_sites.append(site)
                continue
            mlp, role = _gated_role(site)
            if mlp is not None:
                gated.setdefault(mlp, {})[role] = (site, acc)
            if site.read == READ_INPUT:
                hook = self._pre_hook(site, acc, mlp is not None)
                self.handles.append(module.register_forward_pre_hook(hook))
            else:
                self.handles.append(module.register_forward_hook(self._hook(site, acc, module)))
        for path, reads in gated.items():
            self.undo.append(fusion.read_gated(model.get_submodule(path), self._gated(reads)))
        if attention:
            opened = contextlib.ExitStack()
            opened.enter_context(read_attention({m: self._attention(reads) for m, reads in attention.items()}))
            self.undo.append(opened.close)

    def _attention(self, reads: dict[str, tuple[Site, Consumer]]) -> AttentionReader:
        def read(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
            for kind, t in zip(ATTENTION_READS, (query, key, value)):  # the reads in that order
                entry = reads.get(kind)
                if entry is None or self.ctx is None:
                    continue
                site, acc = entry
                self._seen.add(site.name)
                x = tokens_last(t, *self.shape)
                if x is None:
                    self.unreadable.setdefault(site.name, "its attention tensors are not [batch, heads, tokens, dim]")
                    continue
                self._consume(site, acc, x)

        return read

    def _gated(self, reads: dict[str, tuple[Site, Consumer]]) -> fusion.GatedReader:
        gate, product = reads.get("gate"), reads.get("product")
        fast = self.stats.get(gate[0].name) if gate is not None else None

        def read(g: torch.Tensor, up: torch.Tensor, plain: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 ) -> torch.Tensor:
            out = None
            if fast is not None and self.ctx is not None and g.dim() == 3 and tuple(g.shape[:2]) == self.shape:
                out = gated_update(fast, g, up, self.ctx)
            if out is None:
                out = plain(g, up)
                if gate is not None:
                    self._consume(gate[0], gate[1], g)
            if product is not None:
                self._consume(product[0], product[1], out)
            return out

        return read

    def _consume(self, site: Site, acc: Consumer, t: torch.Tensor | None) -> None:
        if t is None or self.ctx is None:
            self.unreadable.setdefault(site.name, "its module returned no tensor")
            return
        t = _as_bth(t, *self.shape)
        if t is None:
            self.unreadable.setdefault(site.name, "its tensor is not [batch, tokens, width]")
            return
        t = t.detach()
        side = self.side
        if side is None or self.main is None or t.device != side.device:
            acc(t, self.ctx)
            return
        assert self._ready is not None
        self._ready.record(self.main)
        side.wait_event(self._ready)
        t.record_stream(side)
        with torch.cuda.stream(side):
            acc(t, self.ctx)

    def join(self) -> None:
        if self.side is not None and self.main is not None:
            self.main.wait_stream(self.side)

    def _pre_hook(self, site: Site, acc: Consumer, gated: bool):  # type: ignore[no-untyped-def]
        """A hook on the module's input; for the down_proj input of a swapped MLP (`gated`) it stays
        quiet, the MLP's reader hands the product on. The gate_proj input (the MLP input) is read
        here either way: no reader hands it on."""

        def hook(module: nn.Module, args: tuple[object, ...]) -> None:
            if not (gated and fusion.quiet(module)):
                self._consume(site, acc, first_tensor(args))

        return hook

    def _hook(self, site: Site, acc: Consumer, module: nn.Module):  # type: ignore[no-untyped-def]
        if site.read == READ_ROUTER:
            experts = module.weight.shape[0]

            def router_hook(module: nn.Module, args: object, output: object) -> None:
                self._consume(site, acc, _router_logits(output, experts))

            return router_hook
        if site.read == READ_GATE_HALF:

            def gate_hook(module: nn.Module, args: object, output: object) -> None:
                t = first_tensor(output)
                self._consume(site, acc, None if t is None else t[..., : t.shape[-1] // 2])

            return gate_hook

        def hook(module: nn.Module, args: object, output: object) -> None:
            if not fusion.quiet(module):
                self._consume(site, acc, first_tensor(output))

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        for undo in self.undo:
            undo()
        if self.forwards:
            for site in self._attention_sites:
                if site.name not in self._seen:
                    self.unreadable.setdefault(site.name, NO_CALL)


def _gated_role(site: Site) -> tuple[str | None, str]:
    """The MLP whose gate (the gate_proj output) or product (the down_proj input) `site` reads, and which."""
    parent, _, leaf = site.module.rpartition(".")
    if site.read == READ_OUTPUT and leaf == "gate_proj":
        return parent, "gate"
    if site.read == READ_INPUT and leaf == "down_proj":
        return parent, "product"
    return None, ""


def feed_hidden_states(out: object, stats: dict[str, SiteStats], ctx: BatchContext, n: int) -> None:
    hidden = getattr(out, "hidden_states", None)
    if not hidden:
        raise RuntimeFailure("the model returned no hidden states", hint="this architecture is not supported yet")
    for i in range(min(n, len(hidden) - 1)):
        stats[f"blocks.{i}.hook_resid_post"].update(hidden[i + 1].detach(), ctx)
