"""The forward's elementwise pieces compiled for the length of a run: RMSNorms and rotary embeddings.

In eager transformers an RMSNorm is about seven kernels over the whole activation (a cast to
float32, the square, the mean, the reciprocal square root, the scaling, the cast back, the weight)
and `apply_rotary_pos_emb` about seven more over the queries and keys (two products, a negation, a
concatenation, a sum, for each), each a full pass over memory. In Qwen3-8B with 16,384-token
batches the norms took about 15% of the forward's device time and the rotary embeddings 8%. Compiled,
each reads its inputs once and writes its outputs once.

The arithmetic stays the model's own: what is compiled is the module's `forward` or the modelling
file's own function (so any variant: Gemma's `1 + weight`, gated norms), with
`emulate_precision_casts`, so that every bf16 result is rounded where eager rounds it (without
it a quarter of a norm's outputs differed in their last bit). Elementwise work is then
bit-identical to eager (the rotary embeddings are). A norm's sum of squares may be added in
another order than eager torch's, and its reciprocal square root rounded otherwise, so on a GPU a
norm's output can differ from eager's in the last bit of the normalised value and then of its
product with the weight: fewer than one value in a thousand, at most two bf16 steps, in the CUDA
test (on the CPU here, none at all).

Only modules whose class name says RMSNorm are taken, and only those whose `forward` is the class's
own. Where accelerate's device hook of a sharded model wraps it, the forward the hook calls is
swapped instead, so that a sharded model computes what it computes on one GPU. Hooks registered
on a norm keep running, since only the forward is swapped, never the module's call. A rotary function is swapped in the modelling file that defines the model's classes, for the
duration of the block, and put back after. A piece that fails to compile costs speed, never the
run: it falls back to its eager code. MAXACT_CARD_FUSE=0 keeps everything eager.
"""

from __future__ import annotations

import contextlib
import sys
import types
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from maxact_card.switches import switched_off

Backend = str | Callable[..., Any]  # torch.compile's: a name, or a callable (tests)
ROTARY = "apply_rotary_pos_emb"  # the name transformers' modelling files give the function
_COMPILED: dict[tuple[Callable[..., Any], Backend], Callable[..., Any]] = {}
_FAILED: dict[tuple[Callable[..., Any], Backend], str] = {}
_OPTIONS: dict[str, str | int | bool | Callable[..., Any]] = {"emulate_precision_casts": True}


@dataclass(frozen=True)
class Fused:
    """What a `fused_forward` block swapped: norm modules, modelling files, and the functions compiled
    for them (as `compiled` keys them: function and backend)."""

    norms: int = 0
    rotary: int = 0
    pieces: tuple[tuple[Callable[..., Any], Backend], ...] = ()

    def record(self) -> dict[str, list[str]]:
        """The swapped functions by name (modelling file and qualified name): `compiled`, those that
        ran compiled or have not run yet; `eager`, those that did not compile and ran their eager code."""
        names: dict[str, set[str]] = {"compiled": set(), "eager": set()}
        for key in self.pieces:
            fn = key[0]
            names["eager" if key in _FAILED else "compiled"].add(f"{fn.__module__.rsplit('.', 1)[-1]}.{fn.__qualname__}")
        return {kind: sorted(found) for kind, found in names.items()}


def _slot(m: nn.Module) -> str | None:
    """Which attribute of norm `m` to swap: `forward` when it is the class's own; accelerate's saved
    `_old_forward` when a device hook (sharded models) wraps the class's own forward; else none."""
    if "forward" not in vars(m):
        return "forward"
    saved = vars(m).get("_old_forward")
    if getattr(m, "_hf_hook", None) is not None and getattr(saved, "__func__", None) is type(m).forward:
        return "_old_forward"
    return None


def norm_modules(model: nn.Module) -> list[nn.Module]:
    """The RMSNorm leaves of `model` whose forward (or the one a device hook wraps) is their class's own."""
    return [
        m for m in model.modules()
        if "rmsnorm" in type(m).__name__.lower() and not any(True for _ in m.children()) and _slot(m) is not None
    ]


def rotary_files(model: nn.Module) -> list[types.ModuleType]:
    """The modelling files of `model`'s classes that define a rotary-embedding function."""
    seen: dict[str, types.ModuleType] = {}
    for m in model.modules():
        name = type(m).__module__
        file = sys.modules.get(name)
        fn = getattr(file, ROTARY, None)
        if name not in seen and isinstance(fn, types.FunctionType) and fn not in _COMPILED.values():
            seen[name] = file  # type: ignore[assignment]
    return list(seen.values())


def compiled(fn: Callable[..., Any], backend: Backend = "inductor") -> Callable[..., Any]:
    """`fn` compiled (precision casts kept), falling back to `fn` if it will not compile.

    Shapes are left to torch.compile's automatic dynamism: the first call compiles for its shapes, and
    a call with new ones recompiles once with just the dimensions that changed (batch and length)
    symbolic. Widths, heads and head sizes stay constants, which the generated kernels need to be
    fast: with every dimension symbolic the fused rotary embedding of Qwen3-8B ran at a third of
    the memory bandwidth (and the norms' reductions looped)."""
    key = (fn, backend)
    cached = _COMPILED.get(key)
    if cached is not None:
        return cached
    options = _OPTIONS if backend == "inductor" else None
    fast = torch.compile(fn, backend=backend, options=options)

    def run(*args: Any, **kwargs: Any) -> Any:
        if key in _FAILED:
            return fn(*args, **kwargs)
        try:
            return fast(*args, **kwargs)
        except torch.OutOfMemoryError:
            raise  # the batch loop splits the batch and retries
        except Exception as exc:  # noqa: BLE001 - any compiler failure: the eager code does the same work
            _FAILED[key] = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
            warnings.warn(f"{fn.__qualname__} runs eager: it did not compile ({_FAILED[key]})", RuntimeWarning,
                          stacklevel=2)
            return fn(*args, **kwargs)

    _COMPILED[key] = run
    return run


@contextlib.contextmanager
def fused_forward(model: nn.Module, *, enabled: bool | None = None, backend: Backend = "inductor") -> Iterator[Fused]:
    """Swap in compiled RMSNorm forwards and rotary functions while the block runs; yields what was swapped.

    enabled: None fuses when the model's norms live on a CUDA device and MAXACT_CARD_FUSE is not 0.
    """
    modules = norm_modules(model)
    if enabled is None:
        enabled = not switched_off("MAXACT_CARD_FUSE") and any(
            p.is_cuda for m in modules for p in m.parameters(recurse=False)
        )
    swapped: list[tuple[nn.Module, str, object]] = []
    files: list[tuple[types.ModuleType, Callable[..., Any]]] = []
    pieces: dict[tuple[Callable[..., Any], Backend], None] = {}
    try:
        if enabled:
            for m in modules:
                slot = _slot(m)
                assert slot is not None
                swapped.append((m, slot, vars(m).get(slot)))
                setattr(m, slot, types.MethodType(compiled(type(m).forward, backend), m))
                pieces[(type(m).forward, backend)] = None
            for file in rotary_files(model):
                eager = getattr(file, ROTARY)
                setattr(file, ROTARY, compiled(eager, backend))
                files.append((file, eager))
                pieces[(eager, backend)] = None
        yield Fused(norms=len(swapped), rotary=len(files), pieces=tuple(pieces))
    finally:
        for m, slot, before in swapped:
            if before is None:
                vars(m).pop(slot, None)
            else:
                setattr(m, slot, before)
        for file, eager in files:
            setattr(file, ROTARY, eager)
