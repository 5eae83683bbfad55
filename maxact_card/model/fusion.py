"""The forward's elementwise pieces fused for the length of a run: RMSNorms and rotary embeddings
compiled, and SwiGLU MLP products as one kernel.

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

Compiling pays only for a long loop (`measure.budget.compile_choice`): on a machine whose compile
caches are empty, as on every fresh CI runner, the compile takes 9 to 24 s, and the compiled norms
and rotary save about 6% of the loop, so a release check of a few hundred samples finishes sooner
without them.

A SwiGLU MLP (`down_proj(act_fn(gate_proj(x)) * up_proj(x))` with a SiLU, found by reading its
forward's source) gets a forward that calls the same modules and makes silu(gate) * up with one
CUDA kernel that rounds as eager does (bit-identical, checked on every bf16 gate pattern), in
place of eager's SiLU and product kernels. A measurement that reads the MLP's gate has that kernel
fold the gate's statistics in as it reads the gate (see `read_gated`). MAXACT_CARD_GATED=0 keeps
the MLPs' own forwards.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import inspect
import sys
import textwrap
import types
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
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
    """What a `fused_forward` block swapped: norm modules, modelling files, the functions compiled
    for them (as `compiled` keys them: function and backend), and the gated MLPs (their classes)."""

    norms: int = 0
    rotary: int = 0
    pieces: tuple[tuple[Callable[..., Any], Backend], ...] = ()
    mlps: int = 0
    mlp_classes: tuple[type[nn.Module], ...] = ()
    ran_eager: set[type] = field(default_factory=set, compare=False)  # MLP classes whose product ran eager
    skipped: tuple[str, ...] = ()  # pieces found but left as they are, each with why

    def record(self) -> dict[str, list[str]]:
        """The swapped functions by name (modelling file and qualified name): `compiled`, those that
        ran compiled or have not run yet; `eager`, those that did not compile, or whose kernel would
        not run, and ran their eager code; `fused`, the SwiGLU MLP forwards whose product ran as one
        kernel (with the gate's statistics where the gate was read); `not_fused` (only when there are
        any), pieces that were found but not swapped, each with the reason."""
        names: dict[str, set[str]] = {"compiled": set(), "eager": set(), "fused": set()}
        for key in self.pieces:
            fn = key[0]
            names["eager" if key in _FAILED else "compiled"].add(_name(fn))
        for cls in self.mlp_classes:
            names["eager" if cls in self.ran_eager else "fused"].add(_name(cls.forward))
        record = {kind: sorted(found) for kind, found in names.items()}
        if self.skipped:
            record["not_fused"] = sorted(self.skipped)
        return record


def _name(fn: Callable[..., Any]) -> str:
    return f"{fn.__module__.rsplit('.', 1)[-1]}.{fn.__qualname__}"


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


def eager_rotary(obj: object) -> types.FunctionType | None:
    """The plain function behind a modelling file's `apply_rotary_pos_emb`, or None if there is none.

    Up to transformers 5.17 the name is the function itself. From 5.2x, with the `kernels` package
    installed (transformers requires it), `use_kernel_forward_from_hub` turns the function into an
    instance of a small `nn.Module` class made per function (kernels' `_create_func_module`), whose
    `forward` calls the function it closes over unless the model was `kernelize`d, which a
    measurement never does. That function is taken from the closure of the class's `forward`.
    """
    if isinstance(obj, types.FunctionType):
        return obj
    if not isinstance(obj, nn.Module) or "forward" in vars(obj):  # a forward set on the instance: kernelized
        return None
    inner = getattr(type(obj).forward, "__closure__", None) or ()
    found = [c.cell_contents for c in inner
             if isinstance(getattr(c, "cell_contents", None), types.FunctionType)
             and c.cell_contents.__name__ == ROTARY]
    return found[0] if len(found) == 1 else None


def rotary_files(model: nn.Module) -> list[types.ModuleType]:
    """The modelling files of `model`'s classes that define a rotary-embedding function we can compile."""
    return [file for file, fn in _rotary_names(model).items() if fn is not None]


def _rotary_names(model: nn.Module) -> dict[types.ModuleType, types.FunctionType | None]:
    """Each modelling file of `model`'s classes that has an `apply_rotary_pos_emb`, with the plain
    function behind it (None where it is something else, which then runs as it is)."""
    seen: dict[types.ModuleType, types.FunctionType | None] = {}
    for m in model.modules():
        file = sys.modules.get(type(m).__module__)
        obj = getattr(file, ROTARY, None)
        if file is None or file in seen or obj is None or obj in _COMPILED.values():
            continue
        seen[file] = eager_rotary(obj)
    return seen


# --- SwiGLU MLPs ---------------------------------------------------------------------------------
# An MLP whose forward is exactly `down_proj(act_fn(gate_proj(x)) * up_proj(x))` with a SiLU runs
# silu(gate) * up as one kernel (three passes over memory, where eager torch makes five: the SiLU
# reads and writes, the product reads two and writes). What it computes is eager torch's, rounded
# where eager rounds (`maxact_card.kernels.silu_mul`). Where a measurement reads the MLP's gate or its
# down_proj input, the reader it registers (`read_gated`) makes the product instead, folding the
# gate's statistics into the same pass, and hands both sites their tensors: the sites' own hooks
# then stay quiet for that call.
GatedReader = Callable[[torch.Tensor, torch.Tensor, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]], torch.Tensor]
_READERS: dict[nn.Module, GatedReader] = {}
_QUIET: set[nn.Module] = set()
_GATED_FORMS: dict[Callable[..., Any], bool] = {}


def _is_call(node: ast.AST | None, owner: str, attr: str) -> ast.AST | None:
    """The single positional argument of `node` if it is `owner.attr(arg)` and nothing else, else None."""
    if (isinstance(node, ast.Call) and not node.keywords and len(node.args) == 1
            and isinstance(node.func, ast.Attribute) and node.func.attr == attr
            and isinstance(node.func.value, ast.Name) and node.func.value.id == owner):
        return node.args[0]
    return None


def _is_name(node: ast.AST | None, name: str) -> bool:
    return isinstance(node, ast.Name) and node.id == name


def _returned(fn: ast.FunctionDef) -> ast.AST | None:
    """What `fn` returns if its body (after any docstring) is `return E` or `v = E; return v`."""
    body = fn.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    if len(body) == 1 and isinstance(body[0], ast.Return):
        return body[0].value
    if (len(body) == 2 and isinstance(body[0], ast.Assign) and len(body[0].targets) == 1
            and isinstance(body[0].targets[0], ast.Name) and isinstance(body[1], ast.Return)
            and _is_name(body[1].value, body[0].targets[0].id)):
        return body[0].value
    return None


def is_swiglu_forward(fn: Callable[..., Any]) -> bool:
    """Whether `fn`'s source is `down_proj(act_fn(gate_proj(x)) * up_proj(x))` returned (directly or
    through one local name), in either order of the product, and nothing else."""
    cached = _GATED_FORMS.get(fn)
    if cached is not None:
        return cached
    try:
        tree: ast.Module | None = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    except (OSError, TypeError, SyntaxError):
        tree = None
    node = tree.body[0] if tree is not None and tree.body else None
    found = False
    if isinstance(node, ast.FunctionDef):
        a = node.args
        if len(a.args) == 2 and not (a.vararg or a.kwarg or a.kwonlyargs or a.posonlyargs or a.defaults):
            me, x = a.args[0].arg, a.args[1].arg
            prod = _is_call(_returned(node), me, "down_proj")
            if isinstance(prod, ast.BinOp) and isinstance(prod.op, ast.Mult):
                found = any(_is_name(_is_call(_is_call(act, me, "act_fn"), me, "gate_proj"), x)
                            and _is_name(_is_call(up, me, "up_proj"), x)
                            for act, up in ((prod.left, prod.right), (prod.right, prod.left)))
    _GATED_FORMS[fn] = found
    return found


def gated_mlps(model: nn.Module) -> list[nn.Module]:
    """The SwiGLU MLPs of `model` (forward as `is_swiglu_forward` reads it, a SiLU as act_fn) whose
    forward, or the one a device hook wraps, is their class's own. None with MAXACT_CARD_GATED=0."""
    if switched_off("MAXACT_CARD_GATED"):
        return []
    found = []
    for m in model.modules():
        children = dict(m.named_children())
        if not all(n in children for n in ("gate_proj", "up_proj", "down_proj")):
            continue
        if _is_silu(getattr(m, "act_fn", None)) and _slot(m) is not None and is_swiglu_forward(type(m).forward):
            found.append(m)
    return found


def _is_silu(act: object) -> bool:
    """torch's SiLU or transformers' (which calls torch's), its forward not replaced on the instance."""
    return (isinstance(act, nn.Module) and "forward" not in vars(act)
            and (isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"))


def read_gated(mlp: nn.Module, reader: GatedReader) -> Callable[[], None]:
    """Have `reader(gate, up, product)` make `mlp`'s product while its forward is swapped (it returns
    the product; `product(gate, up)` is the plain one); returns what undoes it."""
    _READERS[mlp] = reader

    def undo() -> None:
        if _READERS.get(mlp) is reader:
            del _READERS[mlp]

    return undo


def quiet(module: nn.Module) -> bool:
    """Whether a swapped MLP's reader is reading `module`'s site for the call in progress."""
    return module in _QUIET


def _silu_mul_kernel(g: torch.Tensor, up: torch.Tensor) -> torch.Tensor | None:
    from maxact_card.kernels.silu_mul import silu_mul  # on CUDA only: CPU-only runs never load the kernels

    return silu_mul(g, up)


def _product(g: torch.Tensor, up: torch.Tensor, cls: type, ran_eager: set[type]) -> torch.Tensor:
    """silu(g) * up: one kernel on CUDA bf16, else eager torch's two (and `cls` noted in `ran_eager`)."""
    if g.is_cuda:
        out = _silu_mul_kernel(g, up)
        if out is not None:
            return out
    ran_eager.add(cls)
    return torch.nn.functional.silu(g) * up


def _gated_forward(self: nn.Module, x: torch.Tensor, *, ran_eager: set[type]) -> torch.Tensor:
    """A SwiGLU MLP's forward: its modules called as its own forward calls them, the product as one
    kernel, or made by the reader a measurement registered."""
    reader = _READERS.get(self)
    gate_proj, up_proj, down_proj = (self.get_submodule(n) for n in ("gate_proj", "up_proj", "down_proj"))
    cls = type(self)
    if reader is None:
        return down_proj(_product(gate_proj(x), up_proj(x), cls, ran_eager))
    _QUIET.update((gate_proj, down_proj))
    try:
        g = gate_proj(x)
        out = reader(g, up_proj(x), lambda a, b: _product(a, b, cls, ran_eager))
        return down_proj(out)
    finally:
        _QUIET.difference_update((gate_proj, down_proj))


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
def fused_forward(model: nn.Module, *, enabled: bool | None = None, compile_pieces: bool = True,
                  backend: Backend = "inductor") -> Iterator[Fused]:
    """Swap in compiled RMSNorm forwards and rotary functions, and the gated MLP forwards, while the block
    runs; yields what was swapped.

    enabled: None fuses when the model's norms live on a CUDA device and MAXACT_CARD_FUSE is not 0.
    compile_pieces: False leaves norms and rotary as they are (`measure.budget.compile_choice`); the
    MLPs, which compile nothing, are swapped either way.
    """
    modules = norm_modules(model)
    if enabled is None:
        enabled = not switched_off("MAXACT_CARD_FUSE") and any(
            p.is_cuda for m in modules for p in m.parameters(recurse=False)
        )
    swapped: list[tuple[nn.Module, str, object]] = []
    files: list[tuple[types.ModuleType, Callable[..., Any]]] = []
    pieces: dict[tuple[Callable[..., Any], Backend], None] = {}
    mlps: list[nn.Module] = []
    ran_eager: set[type] = set()
    skipped: list[str] = []
    try:
        if enabled and compile_pieces:
            for m in modules:
                slot = _slot(m)
                assert slot is not None
                swapped.append((m, slot, vars(m).get(slot)))
                setattr(m, slot, types.MethodType(compiled(type(m).forward, backend), m))
                pieces[(type(m).forward, backend)] = None
            for file, eager in _rotary_names(model).items():
                if eager is None:
                    held = getattr(file, ROTARY)
                    skipped.append(f"{file.__name__.rsplit('.', 1)[-1]}.{ROTARY}: not a plain function "
                                   f"({type(held).__qualname__}), runs as the modelling file has it")
                    continue
                files.append((file, getattr(file, ROTARY)))
                setattr(file, ROTARY, compiled(eager, backend))
                pieces[(eager, backend)] = None
        if enabled:
            for m in gated_mlps(model):
                slot = _slot(m)
                assert slot is not None
                swapped.append((m, slot, vars(m).get(slot)))
                setattr(m, slot, types.MethodType(functools.partial(_gated_forward, ran_eager=ran_eager), m))
                mlps.append(m)
        yield Fused(norms=len(swapped) - len(mlps), rotary=len(files), pieces=tuple(pieces), mlps=len(mlps),
                    mlp_classes=tuple(dict.fromkeys(type(m) for m in mlps)), ran_eager=ran_eager,
                    skipped=tuple(skipped))
    finally:
        for m, slot, before in swapped:
            if before is None:
                vars(m).pop(slot, None)
            else:
                setattr(m, slot, before)
        for file, held in files:
            setattr(file, ROTARY, held)
