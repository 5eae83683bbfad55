"""Read the queries, keys and values each attention layer hands to its attention function.

A transformers attention module projects q, k and v, applies the rotary embedding (and any q/k
norm), updates the KV cache when there is one, and then calls the function registered for
`config._attn_implementation` in `ALL_ATTENTION_FUNCTIONS`, the module itself first and the tensors
as [batch, heads, tokens, head_dim] (`modeling_llama.LlamaAttention.forward` and every family
written after it). Its keys and values are therefore exactly what a KV cache stores, whether or not
the forward keeps a cache, and the same on every family that dispatches through that interface: GQA
(the kv heads, before any repeat), sliding windows, decompressed MLA heads. A layer that never calls
it (linear attention, a state-space mixer) has no KV cache to measure.

While reading, the model's implementation is overridden on the shared interface through its mapping
API, which keeps overrides apart from the registered functions (`GeneralInterface.__setitem__`,
transformers/utils/generic.py: "Allow local update of the default functions"), by a function that
hands the watched modules' tensors on and then calls what was there before. For "eager", which is
no entry of the interface but each modeling file's own `eager_attention_forward` (`get_interface`'s
default), that is the function of the calling module's file. Removing the override restores the
interface as it was.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

#: Hands one module's (queries, keys, values) on, each [batch, heads, tokens, head_dim].
AttentionReader = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]

NO_CALL = ("no attention call arrived: the layer keeps no KV cache (linear attention or a state-space layer), "
           "or its attention bypasses transformers' attention functions")


def implementations(modules: list[nn.Module]) -> set[str]:
    """The attention implementations the modules' configs name (usually one)."""
    names = set()
    for module in modules:
        name = getattr(getattr(module, "config", None), "_attn_implementation", None)
        if isinstance(name, str):
            names.add(name)
    return names


def _eager(module: nn.Module) -> Callable[..., Any]:
    """The eager attention function of `module`'s modeling file (what `get_interface` falls back to)."""
    found: Callable[..., Any] | None = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if found is not None:
        return found
    from transformers.models.llama.modeling_llama import eager_attention_forward

    return eager_attention_forward


@contextmanager
def read_attention(readers: dict[nn.Module, AttentionReader]) -> Iterator[None]:
    """While open, every call of the watched modules' attention function first hands its queries,
    keys and values to the module's reader; nothing else about the forward changes."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    interface = ALL_ATTENTION_FUNCTIONS
    names = implementations(list(readers))
    before: dict[str, Any] = {name: interface.get(name) for name in names}
    for name, original in before.items():
        interface[name] = _reading(readers, original)
    try:
        yield
    finally:
        for name, original in before.items():
            del interface[name]
            # an override that was in place (another library's) was called through: put it back
            if original is not None and (name not in interface or interface[name] is not original):
                interface[name] = original


def _reading(readers: dict[nn.Module, AttentionReader],
             original: Callable[..., Any] | None) -> Callable[..., Any]:
    def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  *args: Any, **kwargs: Any) -> Any:
        reader = readers.get(module)
        if reader is not None:
            reader(query, key, value)
        return (original or _eager(module))(module, query, key, value, *args, **kwargs)

    return attention


def tokens_last(t: torch.Tensor, batch: int, seq: int) -> torch.Tensor | None:
    """[batch, heads, tokens, dim] as [batch, tokens, heads * dim] (channel c: head c // dim), else None."""
    if t.dim() != 4 or t.shape[0] != batch or t.shape[2] != seq:
        return None
    return t.transpose(1, 2).reshape(batch, seq, t.shape[1] * t.shape[3])
