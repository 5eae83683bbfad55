"""Find the measurement sites of a decoder-only model by its structure.

Sites are named as TransformerLens names places in a transformer (`blocks.{i}.hook_resid_post`,
...), and each records the Hugging Face module path it is read from. Discovery looks for the
decoder layer stack (the ModuleList of identical blocks, outside any vision or audio tower) and,
inside a block, for its attention, MLP/MoE, gate and down-projection submodules by name and shape.
With `gemm_inputs`, it also reads the inputs of the block's other Linear layers, what a W8A8 or FP8
deployment quantizes: the attention input (read where q/k/v or their fused projection take it, not
at the norm, whose placement varies), the output projection's input and the MLP input. Every site
that is a Linear input names the Linear modules that read it (`Site.readers`). With `kv_cache`, it
also reads what each attention layer hands its attention function: the queries, and the keys and
values a KV cache stores (after the rotary embedding and any q/k norm; `measure.attention`).

The one family rule: blocks that normalise their sub-layer outputs before the residual add (Gemma
2/3 sandwich norms, OLMo 2 post-norms, recognisable by a `post_feedforward_layernorm`) are read
after those norms, because that is what enters the residual stream.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

from torch import nn

from maxact_card.documents import COMPONENTS  # noqa: F401 - the site components, in model order

# How a site's tensor is taken from its module's call.
READ_OUTPUT = "output"
READ_INPUT = "input"
READ_GATE_HALF = "output_first_half"  # the gate half of a fused gate_up projection
READ_ROUTER = "router_logits"
# What the attention module hands its attention function (`measure.attention`), [batch, heads, tokens, dim]
READ_QUERIES = "attention_queries"
READ_KEYS = "attention_keys"
READ_VALUES = "attention_values"
ATTENTION_READS = (READ_QUERIES, READ_KEYS, READ_VALUES)

_TOWER = re.compile(r"(^|\.)(vision|visual|audio|image|vit|mm_projector|multi_modal|speech)", re.I)
_ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention", "linear_attn", "mixer", "temporal_block")
_MLP_NAMES = ("mlp", "feed_forward", "block_sparse_moe", "moe", "ffn", "ff")
_DOWN_NAMES = ("down_proj", "c_proj", "dense_4h_to_h", "fc2", "w2", "wo", "fc_out")
_O_PROJ_NAMES = ("o_proj", "out_proj", "dense", "c_proj", "wo")
_SHARED_EXPERT_NAMES = ("shared_expert", "shared_experts")
_FINAL_NORM_NAMES = ("norm", "final_layernorm", "final_layer_norm", "ln_f", "norm_f", "final_norm")


@dataclass(frozen=True)
class Site:
    """One place activations are measured."""

    name: str
    component: str
    layer: int | None
    module: str
    read: str
    note: str = ""
    readers: tuple[str, ...] = ()  # the Linear modules that read this tensor (full paths), for a Linear input
    heads: int | None = None  # for queries, keys and values: the heads, each a run of width / heads channels

    @property
    def description(self) -> str:
        """What was read, for the results: module output/input and any note."""
        what = {
            READ_OUTPUT: "output",
            READ_INPUT: "input",
            READ_GATE_HALF: "output, gate half of the fused gate/up projection",
            READ_ROUTER: "router logits (output)",
            READ_QUERIES: "queries as the attention function receives them (after any rotary embedding)",
            READ_KEYS: "keys as the KV cache stores them (after any rotary embedding)",
            READ_VALUES: "values as the KV cache stores them",
        }[self.read]
        return f"{what}; {self.note}" if self.note else what


@dataclass(frozen=True)
class SiteMap:
    """The sites found on a model, and the ones looked for but absent (with the reason)."""

    sites: tuple[Site, ...]
    missing: tuple[tuple[str, str], ...]
    layers_path: str | None
    num_layers: int

    def by_name(self) -> dict[str, Site]:
        """Sites keyed by their public name."""
        return {s.name: s for s in self.sites}


def _text_config(model: nn.Module) -> object:
    config = getattr(model, "config", None)
    if config is None:
        return None
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def _named(model: nn.Module) -> dict[int, str]:
    return {id(m): n for n, m in model.named_modules()}


def find_layer_stack(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The decoder layer stack: a ModuleList of same-class blocks outside vision/audio towers."""
    config = _text_config(model)
    expected = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    candidates: list[tuple[int, str, nn.ModuleList]] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0 or _TOWER.search(name):
            continue
        first = module[0]
        if any(type(m) is not type(first) for m in module):
            continue
        children = {n for n, _ in first.named_children()}
        if not children & set(_ATTENTION_NAMES + _MLP_NAMES):
            continue
        score = 2 if expected is not None and len(module) == expected else 0
        candidates.append((score, name, module))
    if not candidates:
        return None
    # prefer the count the config names, then the stack closest to the root
    candidates.sort(key=lambda c: (-c[0], c[1].count("."), c[1]))
    _, name, stack = candidates[0]
    return name, stack


def _child(module: nn.Module, names: tuple[str, ...]) -> tuple[str, nn.Module] | None:
    children = dict(module.named_children())
    for n in names:
        if n in children:
            return n, children[n]
    return None


def _num_experts(model: nn.Module) -> int | None:
    config = _text_config(model)
    for attr in ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 1:
            return value
    return None


def _router(mlp: nn.Module, num_experts: int | None) -> tuple[str, nn.Module] | None:
    for n, child in mlp.named_children():
        weight = getattr(child, "weight", None)
        named_like = n in ("gate", "router") or "Router" in type(child).__name__
        shaped_like = weight is not None and getattr(weight, "dim", lambda: 0)() == 2 and (
            num_experts is None or weight.shape[0] == num_experts
        )
        if named_like and shaped_like and (num_experts is not None or "Router" in type(child).__name__):
            return n, child
    return None


def _hidden_size(model: nn.Module) -> int | None:
    config = _text_config(model)
    for attr in ("hidden_size", "n_embd", "d_model"):
        value = getattr(config, attr, None)
        if isinstance(value, int):
            return value
    return None


def _linear_dims(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) features of a Linear layer (nn.Linear and its subclasses, GPT-2's Conv1D), else None."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    weight = getattr(module, "weight", None)
    if type(module).__name__ == "Conv1D" and weight is not None and weight.dim() == 2:
        return int(weight.shape[0]), int(weight.shape[1])  # Conv1D stores [in, out]
    return None


def _input_projections(module: nn.Module, hidden: int | None, exclude: tuple[str, ...]) -> list[str]:
    """Names of `module`'s Linear children that take the hidden state, in child order, not those in `exclude`."""
    return [n for n, child in module.named_children()
            if n not in exclude and (dims := _linear_dims(child)) is not None and dims[0] == hidden]


def discover(model: nn.Module, *, gemm_inputs: bool = False, kv_cache: bool = False) -> SiteMap:
    """All measurement sites of `model`, and the ones it does not have, with the reason.

    gemm_inputs: also the inputs of the attention projections, the attention output projection and
    the MLP's input projections (off by default: three more hooked tensors per layer).
    kv_cache: also each attention layer's queries, keys and values (off by default: three more).
    """
    paths = _named(model)
    sites: list[Site] = []
    missing: list[tuple[str, str]] = []

    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None and id(embeddings) in paths:
        sites.append(Site("hook_embed", "embedding", None, paths[id(embeddings)], READ_OUTPUT))
    else:
        missing.append(("hook_embed", "no input embedding module found"))

    found = find_layer_stack(model)
    if found is None:
        missing.append(("blocks.*", "no decoder layer stack found; residual stream read from output_hidden_states"))
        missing.append(("ln_final.hook_normalized", "no decoder layer stack found: the final norm cannot be located"))
        return SiteMap(tuple(sites), tuple(missing), None, 0)
    stack_path, stack = found
    num_experts = _num_experts(model)
    hidden = _hidden_size(model) if gemm_inputs else None

    for i, block in enumerate(stack):
        prefix = f"{stack_path}.{i}"
        sites.append(Site(f"blocks.{i}.hook_resid_post", "residual", i, prefix, READ_OUTPUT))
        sites.extend(_block_sites(i, prefix, block, num_experts, missing, gemm_inputs, hidden))
        if kv_cache:
            sites.extend(_attention_tensors(i, prefix, block, _latent_kv(model), missing))

    parent_path = stack_path.rsplit(".", 1)[0] if "." in stack_path else ""
    parent = model.get_submodule(parent_path) if parent_path else model
    norm = _child(parent, _FINAL_NORM_NAMES)
    if norm is not None:
        path = f"{parent_path}.{norm[0]}" if parent_path else norm[0]
        sites.append(Site("ln_final.hook_normalized", "final_norm", None, path, READ_OUTPUT))
    else:
        missing.append(("ln_final.hook_normalized", "no final norm beside the layer stack"))
    return SiteMap(tuple(sites), tuple(group_missing(missing)), stack_path, len(stack))


def _attention_inputs(i: int, attn_path: str, attention: nn.Module, hidden: int | None,
                      missing: list[tuple[str, str]]) -> Iterator[Site]:
    """The attention input, read where the first projection of the hidden state takes it (q_proj, or
    a fused qkv_proj / c_attn / query_key_value), and the output projection's input."""
    output = next((n for n, child in attention.named_children() if n in _O_PROJ_NAMES
                   and (dims := _linear_dims(child)) is not None and dims[1] == hidden), None)
    readers = _input_projections(attention, hidden, (output,) if output else ())
    if readers:
        yield Site(f"blocks.{i}.ln1.hook_normalized", "attn_input", i, f"{attn_path}.{readers[0]}", READ_INPUT,
                   readers=tuple(f"{attn_path}.{n}" for n in readers))
    else:
        missing.append((f"blocks.{i}.ln1.hook_normalized", "no Linear in the attention module takes the hidden state"))
    if output is not None:
        yield Site(f"blocks.{i}.attn.hook_z", "o_proj_input", i, f"{attn_path}.{output}", READ_INPUT,
                   readers=(f"{attn_path}.{output}",))
    else:
        missing.append((f"blocks.{i}.attn.hook_z", "no attention output projection (a Linear back to the hidden size)"))


def _latent_kv(model: nn.Module) -> bool:
    """Multi-head latent attention (DeepSeek-V2/V3): a runtime may cache the compressed latent instead."""
    return isinstance(getattr(_text_config(model), "kv_lora_rank", None), int)


def _attention_tensors(i: int, prefix: str, block: nn.Module, latent: bool,
                       missing: list[tuple[str, str]]) -> Iterator[Site]:
    """The queries, keys and values the block's attention hands its attention function. A layer with
    no softmax attention (linear attention, a state-space mixer) is found out when nothing arrives."""
    attention = _child(block, _ATTENTION_NAMES)
    names = (("hook_rot_q", "query", READ_QUERIES), ("hook_rot_k", "key_cache", READ_KEYS),
             ("hook_v", "value_cache", READ_VALUES))
    if attention is None:
        for name, _, _ in names:
            missing.append((f"blocks.{i}.attn.{name}", "no attention submodule"))
        return
    note = ("as transformers caches them, decompressed per head; a runtime that caches the latent of "
            "multi-head latent attention stores other tensors") if latent else ""
    for name, component, read in names:
        yield Site(f"blocks.{i}.attn.{name}", component, i, f"{prefix}.{attention[0]}", read,
                   note if read != READ_QUERIES else "")


def _mlp_input(i: int, mlp_path: str, mlp: nn.Module, dense: bool, hidden: int | None,
               missing: list[tuple[str, str]]) -> Iterator[Site]:
    """The MLP input, read where its first input projection (gate_proj, gate_up_proj, c_fc, ...) takes
    it; for fused MoE experts, the MoE block's input, which the router and every expert share."""
    if not dense:
        shared = _child(mlp, _SHARED_EXPERT_NAMES)
        readers = () if shared is None else tuple(
            f"{mlp_path}.{shared[0]}.{n}" for n in _input_projections(shared[1], hidden, _DOWN_NAMES))
        yield Site(f"blocks.{i}.ln2.hook_normalized", "mlp_input", i, mlp_path, READ_INPUT,
                   "MoE block input: the router and the fused experts share it (the experts' inputs are no "
                   "separate modules)", readers=readers)
        return
    projections = _input_projections(mlp, hidden, _DOWN_NAMES)
    if projections:
        yield Site(f"blocks.{i}.ln2.hook_normalized", "mlp_input", i, f"{mlp_path}.{projections[0]}", READ_INPUT,
                   readers=tuple(f"{mlp_path}.{n}" for n in projections))
    else:
        missing.append((f"blocks.{i}.ln2.hook_normalized", "no Linear in the MLP takes the hidden state"))


def _block_sites(i: int, prefix: str, block: nn.Module, num_experts: int | None, missing: list[tuple[str, str]],
                 gemm_inputs: bool, hidden: int | None) -> Iterator[Site]:
    children = dict(block.named_children())
    post_norm = "post_feedforward_layernorm" in children
    attention = _child(block, _ATTENTION_NAMES)
    if gemm_inputs and attention is not None:
        yield from _attention_inputs(i, f"{prefix}.{attention[0]}", attention[1], hidden, missing)
    elif gemm_inputs:
        for site in ("ln1.hook_normalized", "attn.hook_z"):
            missing.append((f"blocks.{i}.{site}", "no attention submodule"))
    if post_norm and "post_attention_layernorm" in children:
        yield Site(f"blocks.{i}.hook_attn_out", "attention", i, f"{prefix}.post_attention_layernorm", READ_OUTPUT,
                   "attention output after its post-attention norm (post-norm block)")
    elif attention is not None:
        yield Site(f"blocks.{i}.hook_attn_out", "attention", i, f"{prefix}.{attention[0]}", READ_OUTPUT)
    else:
        missing.append((f"blocks.{i}.hook_attn_out", "no attention submodule"))

    mlp = _child(block, _MLP_NAMES)
    if mlp is None:
        missing.append((f"blocks.{i}.hook_mlp_out", "no MLP submodule"))
        for site in ("mlp.hook_pre", "mlp.hook_post", "mlp.hook_router_logits") + (
                ("ln2.hook_normalized",) if gemm_inputs else ()):
            missing.append((f"blocks.{i}.{site}", "no MLP submodule"))
        return
    mlp_name, mlp_module = mlp
    mlp_path = f"{prefix}.{mlp_name}"
    mlp_children = dict(mlp_module.named_children())
    dense = "experts" not in mlp_children
    if gemm_inputs:
        yield from _mlp_input(i, mlp_path, mlp_module, dense, hidden, missing)
    if post_norm:
        yield Site(f"blocks.{i}.hook_mlp_out", "mlp", i, f"{prefix}.post_feedforward_layernorm", READ_OUTPUT,
                   "MLP output after its post-feedforward norm (post-norm block)")
    else:
        yield Site(f"blocks.{i}.hook_mlp_out", "mlp", i, mlp_path, READ_OUTPUT)

    router = _router(mlp_module, num_experts)
    if "gate_proj" in mlp_children and dense:
        yield Site(f"blocks.{i}.mlp.hook_pre", "gate", i, f"{mlp_path}.gate_proj", READ_OUTPUT)
    elif "gate_up_proj" in mlp_children and dense:
        yield Site(f"blocks.{i}.mlp.hook_pre", "gate", i, f"{mlp_path}.gate_up_proj", READ_GATE_HALF)
    elif not dense:
        missing.append((f"blocks.{i}.mlp.hook_pre", "MoE experts are fused: no per-token gate projection module"))
    else:
        missing.append((f"blocks.{i}.mlp.hook_pre", "MLP has no gate (not a gated MLP)"))

    down = _child(mlp_module, _DOWN_NAMES) if dense else None
    if down is not None:
        yield Site(f"blocks.{i}.mlp.hook_post", "down_proj_input", i, f"{mlp_path}.{down[0]}", READ_INPUT,
                   readers=(f"{mlp_path}.{down[0]}",))
    else:
        missing.append((f"blocks.{i}.mlp.hook_post", "MoE experts are fused: no down projection module"
                        if not dense else "no down projection module"))

    if router is not None:
        yield Site(f"blocks.{i}.mlp.hook_router_logits", "router", i, f"{mlp_path}.{router[0]}", READ_ROUTER)
    elif not dense:
        missing.append((f"blocks.{i}.mlp.hook_router_logits", "no router module found in the MoE block"))
    else:
        missing.append((f"blocks.{i}.mlp.hook_router_logits", "dense MLP: no router"))


def group_missing(missing: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Collapse per-layer misses with one reason into one entry naming the layers."""
    groups: dict[tuple[str, str], list[int]] = {}
    singles: list[tuple[str, str]] = []
    for site, reason in missing:
        m = re.fullmatch(r"blocks\.(\d+)\.(.+)", site)
        if m:
            groups.setdefault((m.group(2), reason), []).append(int(m.group(1)))
        else:
            singles.append((site, reason))
    out = list(singles)
    for (suffix, reason), layers in groups.items():
        out.append((f"blocks.{{{_ranges(layers)}}}.{suffix}", reason))
    return out


def _ranges(values: list[int]) -> str:
    values = sorted(set(values))
    parts: list[str] = []
    start = prev = values[0]
    for v in values[1:] + [None]:  # type: ignore[list-item]
        if v is not None and v == prev + 1:
            prev = v
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if v is not None:
            start = prev = v
    return ",".join(parts)
