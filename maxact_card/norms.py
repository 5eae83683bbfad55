"""The model's RMSNorm modules, compiled for the length of a run: one fused kernel each.

An eager transformers RMSNorm is about seven kernels over the whole activation (a cast to float32,
the square, the mean, the reciprocal square root, the scaling, the cast back, the weight), each a
full pass over memory; in Qwen3-8B the norms took more device time than attention. Compiled, each
norm reads its input once and writes its output once.

The arithmetic stays the module's own: its forward is what is compiled (any RMSNorm variant:
Gemma's `1 + weight`, gated norms), in float32 where it says float32, and with
`emulate_precision_casts` so that its casts to bf16 round where eager rounds (without it, a
quarter of the outputs differed in their last bit). Only the order in which the variance's sum is
added can differ from eager torch's, so a GPU value can differ from the eager one in its last bit;
on CPU the compiled norm is bit-identical.

Only modules whose class name says RMSNorm are taken, and only those whose `forward` is the class's
own (accelerate's device hooks of a sharded model replace it per instance; those stay as they
are). Hooks registered on a norm keep running: only `forward` is swapped, never the module's call.
A compilation that fails costs speed, never the run: that class falls back to its eager forward.
MAXACT_CARD_COMPILE_NORMS=0 keeps every norm eager.
"""

from __future__ import annotations

import contextlib
import types
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from maxact_card.switches import switched_off

Backend = str | Callable[..., Any]  # torch.compile's: a name, or a callable (tests)
_COMPILED: dict[tuple[type, Backend], Callable[..., Any]] = {}
_FAILED: dict[tuple[type, Backend], str] = {}
_OPTIONS: dict[str, str | int | bool | Callable[..., Any]] = {"emulate_precision_casts": True}


def norm_modules(model: nn.Module) -> list[nn.Module]:
    """The RMSNorm leaves of `model` whose forward is their class's own."""
    return [
        m for m in model.modules()
        if "rmsnorm" in type(m).__name__.lower() and not any(True for _ in m.children()) and "forward" not in vars(m)
    ]


def _compiled_forward(cls: type, backend: Backend) -> Callable[..., Any]:
    key = (cls, backend)
    cached = _COMPILED.get(key)
    if cached is not None:
        return cached
    eager = cls.forward  # type: ignore[attr-defined]
    options = _OPTIONS if backend == "inductor" else None
    compiled = torch.compile(eager, dynamic=True, backend=backend, options=options)

    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if key in _FAILED:
            return eager(self, *args, **kwargs)
        try:
            return compiled(self, *args, **kwargs)
        except torch.OutOfMemoryError:
            raise  # the batch loop splits the batch and retries
        except Exception as exc:  # noqa: BLE001 - any compiler failure: the eager forward does the same work
            _FAILED[key] = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
            warnings.warn(f"{cls.__name__} runs eager: it did not compile ({_FAILED[key]})", RuntimeWarning,
                          stacklevel=2)
            return eager(self, *args, **kwargs)

    _COMPILED[key] = forward
    return forward


@contextlib.contextmanager
def compiled_norms(model: nn.Module, *, enabled: bool | None = None, backend: Backend = "inductor") -> Iterator[int]:
    """Swap each RMSNorm's forward for a compiled one while the block runs; yields how many were swapped.

    enabled: None compiles when the norms live on a CUDA device and MAXACT_CARD_COMPILE_NORMS is not 0.
    """
    modules = norm_modules(model)
    if enabled is None:
        enabled = not switched_off("MAXACT_CARD_COMPILE_NORMS") and any(
            p.is_cuda for m in modules for p in m.parameters(recurse=False)
        )
    swapped: list[nn.Module] = []
    try:
        if enabled:
            for m in modules:
                m.forward = types.MethodType(_compiled_forward(type(m), backend), m)  # type: ignore[method-assign]
                swapped.append(m)
        yield len(swapped)
    finally:
        for m in swapped:
            vars(m).pop("forward", None)
