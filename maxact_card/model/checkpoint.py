"""Resolve a model reference (local directory, .gguf file or Hub repo id) and load it for measuring."""

from __future__ import annotations

import functools
import json
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from maxact_card import progress
from maxact_card.documents import sha256_file
from maxact_card.errors import RuntimeFailure, UsageError
from maxact_card.fmt import size

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16", "auto": "auto"}


@dataclass
class LoadedModel:
    """A model ready to measure, with the provenance the results record."""

    model: nn.Module
    tokenizer: Any
    info: dict[str, Any]  # the results' "model" object
    device: torch.device
    dtype: torch.dtype
    hashing: HashInBackground | None = None  # weights still being hashed (`load(wait_for_hashes=False)`)

    def weights_hashed(self) -> dict[str, Any]:
        """`info` with every weight file's sha256, waiting for the hashing still running (a `hash` phase)."""
        if self.hashing is not None:
            hashing, self.hashing = self.hashing, None
            hashing.finish()
        return self.info

    def stop_hashing(self) -> None:
        """Cancel the hashing still running (a run that failed: nothing is left running)."""
        if self.hashing is not None:
            self.hashing.stop()
            self.hashing = None


def pick_device(device: str) -> torch.device:
    """`auto` → cuda when available, else cpu; anything else must exist."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UsageError(f"unknown device {device!r}", hint="use cuda, cuda:N, cpu or auto") from None
    if dev.type not in ("cuda", "cpu"):
        raise UsageError(f"--device {device} is not supported", hint="use cuda, cuda:N, cpu or auto")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no CUDA device is visible", hint="use --device cpu or auto")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UsageError(f"--device {device}: there are {torch.cuda.device_count()} CUDA devices",
                         hint="use cuda:0 to cuda:N-1, or auto")
    return dev


def parse_dtype(dtype: str | None) -> str:
    """Normalise a --dtype value; "auto" keeps the checkpoint's own."""
    value = _DTYPE_ALIASES.get((dtype or "auto").lower(), (dtype or "auto").lower())
    if value != "auto" and value not in DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}", hint="use auto, float32, float16 or bfloat16")
    return value


def _quiet_gguf_loader() -> None:
    """transformers' GGUF loader draws its own tqdm bar, which `quiet_libraries`' switch does not
    reach. Imported only for a GGUF file: the module costs a quarter of a second to import."""
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_loader
    except Exception:  # noqa: BLE001 - no GGUF support installed: no bar to silence
        return
    bar = getattr(gguf_loader, "tqdm", None)
    if bar is not None and not isinstance(bar, functools.partial):
        gguf_loader.tqdm = functools.partial(bar, disable=True)


def _looks_like_path(ref: str) -> bool:
    return ref.startswith((".", "/", "~")) or ref.endswith(".gguf") or ref.count("/") > 1


def resolve(ref: str, *, revision: str | None, token: str | None, memory_budget_bytes: int | None,
            force: bool) -> tuple[Path, str | None, dict[str, Any]]:
    """Files on disk for `ref`, the gguf file name if any, and the provenance fields of the results.

    Weight files on local disk are not hashed here: their `sha256` is empty, and `HashInBackground`
    fills it while the model loads (files from the Hub come with the Hub's sha256)."""
    path = Path(ref).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path.parent, path.name, {
            "id": path.name, "source": "gguf", "revision": None, "commit_sha": None,
            "weight_files": [{"path": path.name, "sha256": "", "size": path.stat().st_size}],
            "notes": ["weights dequantized from GGUF by transformers"],
        }
    if path.exists() and not path.is_dir():
        raise UsageError(f"{ref} is a file, not a checkpoint directory", hint="pass a directory with config.json, a .gguf file or a Hub repo id")
    from maxact_card import hub

    if not path.exists() and (_looks_like_path(ref) or not hub.is_repo_id(ref)):
        raise UsageError(f"model path {ref} does not exist", hint="pass a checkpoint directory, a .gguf file or a Hub repo id org/name")
    if path.is_dir() and not (path / "config.json").is_file():
        raise UsageError(f"{ref} has no config.json", hint="point at the folder save_pretrained wrote (it holds config.json)")
    resolved = hub.resolve_model(ref, revision=revision, token=token, memory_budget_bytes=memory_budget_bytes,
                                 force=force, hash_local=False)
    info = {
        "id": resolved.repo_id or str(Path(ref)),
        "source": resolved.source,
        "revision": resolved.revision,
        "commit_sha": resolved.commit_sha,
        "weight_files": [{"path": w.path, "sha256": w.sha256, "size": w.size} for w in resolved.weight_files],
        "notes": list(resolved.notes),
    }
    return resolved.local_dir, None, info


class HashInBackground:
    """The sha256 of the weight files still without one, computed in threads while the model loads
    and, where the caller waits later, while it is measured (hashlib releases the GIL on large reads,
    and the loader reads the same files: one of the two finds them in the page cache). `finish`
    waits for them and fills `weight_files` in place."""

    def __init__(self, ref: str, folder: Path, weight_files: list[dict[str, Any]]) -> None:
        self.ref = ref
        self.files = [w for w in weight_files if not w["sha256"]]
        self._stop = threading.Event()
        self.pool = ThreadPoolExecutor(max_workers=max(1, min(4, len(self.files))), thread_name_prefix="sha256")
        self.futures = [self.pool.submit(sha256_file, folder / w["path"], stop=self._stop) for w in self.files]

    def stop(self) -> None:
        """Give up: files not begun are not hashed, and the ones being hashed stop at their next chunk."""
        self._stop.set()
        self.pool.shutdown(wait=False, cancel_futures=True)

    def finish(self) -> None:
        if not all(f.done() for f in self.futures):
            total = sum(w["size"] for w in self.files)
            progress.step(f"hashing {len(self.files)} weight file{'s' if len(self.files) != 1 else ''} "
                          f"({size(total)})", "hash")
        try:
            for w, future in zip(self.files, self.futures):
                w["sha256"] = future.result()
        except OSError as exc:
            raise UsageError(f"cannot read the weights of {self.ref}: {exc.strerror or exc} ({exc.filename})",
                             hint="check the files' permissions") from None
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)


def _config_dtype(config: Any) -> str:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    value = getattr(text, "dtype", None) or getattr(config, "dtype", None) or getattr(text, "torch_dtype", None)
    if isinstance(value, torch.dtype):
        value = str(value).removeprefix("torch.")
    return value if value in DTYPES else "float32"


def load(ref: str, *, revision: str | None = None, token: str | None = None, dtype: str | None = "auto",
         device: str = "auto", device_map: str | None = None, trust_remote_code: bool = False,
         memory_budget_bytes: int | None = None, force: bool = False, wait_for_hashes: bool = True) -> LoadedModel:
    """Resolve and load model and tokenizer (the weights hashed meanwhile); every failure is a typed
    one-line error. `wait_for_hashes=False` returns while a local folder's weights are still being
    hashed: the caller reads their sha256 through `LoadedModel.weights_hashed()` when it needs them,
    so the hashing runs on beside whatever comes next (the measurement), and calls `stop_hashing()`
    on failure."""
    dtype_name = parse_dtype(dtype)
    dev = pick_device(device)
    if device_map:
        _check_device_map(device_map)
    progress.step("importing transformers", "import")
    quiet_libraries()
    local_dir, gguf_file, info = resolve(ref, revision=revision, token=token,
                                         memory_budget_bytes=memory_budget_bytes, force=force)
    hashing = HashInBackground(ref, local_dir, info["weight_files"])
    try:
        loaded = _load(ref, local_dir, gguf_file, info, hashing, dtype_name=dtype_name, dev=dev,
                       device_map=device_map, trust_remote_code=trust_remote_code)
    except BaseException:
        hashing.stop()  # a failed load leaves nothing running
        raise
    if wait_for_hashes:
        loaded.weights_hashed()
    return loaded


def _load(ref: str, local_dir: Path, gguf_file: str | None, info: dict[str, Any], hashing: HashInBackground, *,
          dtype_name: str, dev: torch.device, device_map: str | None, trust_remote_code: bool) -> LoadedModel:
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
        _quiet_gguf_loader()
    progress.step("reading the config" + (f" of {gguf_file}" if gguf_file else ""), "config")
    try:
        config = AutoConfig.from_pretrained(local_dir, **kwargs)
    except ValueError as exc:
        if "trust_remote_code" in str(exc) or "custom code" in str(exc):
            raise UsageError(f"{ref} needs its own remote code to load",
                             hint="review that code, then pass --trust-remote-code") from None
        raise UsageError(f"cannot read the config of {ref}: {str(exc).splitlines()[0]}") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise UsageError(f"cannot read the config of {ref}: {str(exc).splitlines()[0]}",
                         hint="check config.json") from None
    except Exception as exc:  # noqa: BLE001 - a config of the wrong shape fails anywhere in transformers
        hint = "the GGUF file may be truncated or damaged: download it again" if gguf_file else "check config.json"
        raise UsageError(f"cannot read the config of {ref} ({_first_line(exc)})", hint=hint) from None
    _refuse_non_causal(ref, config)
    if not gguf_file:
        check_layer_count(ref, config, [local_dir / w["path"] for w in info["weight_files"]])
    chosen = dtype_name if dtype_name != "auto" else ("float32" if gguf_file else _config_dtype(config))
    torch_dtype = DTYPES[chosen]
    # use_kernels=False: transformers swaps layers for kernels fetched from the Hub when the `kernels`
    # package is installed (which recent transformers releases require), which would run code nobody
    # asked for and measure someone else's numerics instead of the model's own forward
    load_kwargs: dict[str, Any] = dict(kwargs, dtype=torch_dtype, use_kernels=False)
    if device_map:
        load_kwargs["device_map"] = device_map
    progress.step(f"loading the model ({chosen}" + (f", to {dev})" if not device_map else f", device map {device_map})"),
                  "load")
    model = _load_model(ref, local_dir, config, load_kwargs, transformers, AutoModelForCausalLM)
    if not device_map:
        try:
            model.to(dev)
        except torch.OutOfMemoryError:
            raise RuntimeFailure(f"{ref} does not fit in the memory of {dev}",
                                 hint="use --device-map auto, a smaller --dtype or --device cpu") from None
    model.eval()
    progress.step("loading the tokenizer", "load")
    try:
        tokenizer = AutoTokenizer.from_pretrained(local_dir, **kwargs)
    except Exception as exc:  # noqa: BLE001 - tokenizer loaders raise many kinds of errors
        raise UsageError(f"cannot load the tokenizer of {ref}: {type(exc).__name__}",
                         hint="the checkpoint needs tokenizer files (tokenizer.json or tokenizer.model)") from None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    info.update({
        "architecture": (getattr(config, "architectures", None) or [type(model).__name__])[0],
        "model_type": str(getattr(config, "model_type", "unknown")),
        "num_layers": int(getattr(text, "num_hidden_layers", 0) or getattr(text, "n_layer", 0) or 0),
        "hidden_size": int(getattr(text, "hidden_size", 0) or getattr(text, "n_embd", 0) or 1),
    })
    info = {k: info[k] for k in ("id", "source", "revision", "commit_sha", "architecture", "model_type",
                                 "num_layers", "hidden_size", "weight_files", "notes")}
    first = next(model.parameters())
    return LoadedModel(model, tokenizer, info, first.device if device_map else dev, torch_dtype, hashing)


_CAUSAL_HEADS = ("CausalLM", "LMHeadModel", "ForConditionalGeneration")
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def _check_device_map(device_map: str) -> None:
    """`--device-map` takes accelerate's placement strategies, and needs accelerate installed."""
    import importlib.util

    if device_map not in DEVICE_MAPS:
        raise UsageError(f"--device-map must be one of {', '.join(DEVICE_MAPS)}, got {device_map!r}")
    if importlib.util.find_spec("accelerate") is None:
        raise UsageError("--device-map needs the accelerate package",
                         hint="pip install 'maxact-card[sharded]' (or pip install accelerate)")


def _refuse_non_causal(ref: str, config: Any) -> None:
    """Encoder-only and encoder-decoder checkpoints are not what the measurement means."""
    architectures = getattr(config, "architectures", None) or []
    if not isinstance(architectures, list) or not all(isinstance(a, str) for a in architectures):
        raise UsageError(f"the config of {ref} has architectures {architectures!r}: not a list of class names",
                         hint='check config.json: "architectures": ["LlamaForCausalLM"], say')
    encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
    if encoder_decoder or (architectures and not any(h in a for a in architectures for h in _CAUSAL_HEADS)):
        names = ", ".join(architectures) or str(getattr(config, "model_type", "?"))
        raise UsageError(f"{ref} is not a causal language model ({names})",
                         hint="maxact-card measures decoder-only LMs (a *ForCausalLM checkpoint)")


def quiet_libraries() -> None:
    """The libraries' own progress bars stay off: the run's steps are shown by `progress`. The Hub's
    download bars (bytes and speed) stay on where progress is shown on a terminal; warnings reach
    only a terminal, so that piped stderr is one line per problem."""
    import sys

    import huggingface_hub.utils
    import transformers

    transformers.utils.logging.disable_progress_bar()
    if not (sys.stderr.isatty() and progress.shown()):
        huggingface_hub.utils.disable_progress_bars()
    if not sys.stderr.isatty():
        transformers.utils.logging.set_verbosity_error()


_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)\.")


def check_layer_count(ref: str, config: Any, weight_files: list[Path]) -> None:
    """Refuse, before building anything, a config that claims more decoder layers than the weights
    hold: a `num_hidden_layers` of 10**9 would otherwise build a billion random layers for minutes
    before running out of memory. Only safetensors headers are read (names, not tensors); weights
    whose names show no layer index are left to `check_loaded`."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    claimed = getattr(text, "num_hidden_layers", None)
    if not isinstance(claimed, int) or isinstance(claimed, bool):
        if claimed is not None:
            raise UsageError(f"the config of {ref} has num_hidden_layers {claimed!r}, not a whole number",
                             hint="check config.json")
        return
    indices: set[int] = set()
    for path in weight_files:
        if path.suffix != ".safetensors":
            return
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                names = list(handle.keys())
        except Exception:  # noqa: BLE001 - an unreadable file is reported by the load itself
            return
        indices.update(int(m.group(1)) for name in names if (m := _LAYER_INDEX.search(name)))
    if indices and claimed > max(indices) + 1:
        raise UsageError(
            f"the config of {ref} claims {claimed:,} layers and its weights hold {max(indices) + 1}",
            hint="check num_hidden_layers in config.json against the weights",
        )


def _first_line(exc: BaseException) -> str:
    text = str(exc).splitlines()[0][:200] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def check_loaded(ref: str, report: dict[str, Any]) -> None:
    """Refuse a model whose weights did not all load, or brought tensors it has no place for.

    transformers fills a parameter missing from the checkpoint with random initialisation and only
    logs it, and drops a tensor it has no place for: a checkpoint with a layer's tensors deleted, a
    config that claims more layers than the weights hold, or weights of another architecture would
    then be measured as noise and published as the model's. Any missing, unexpected or mismatched
    tensor is an error naming them (transformers already leaves out the keys a model declares
    optional, such as a tied output head).
    """
    problems = []
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        names = sorted(str(k[0] if isinstance(k, tuple) else k) for k in report.get(kind) or ())
        if names:
            shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
            problems.append(f"{len(names)} {kind.replace('_keys', '')} ({shown})")
    if problems:
        raise UsageError(
            f"the weights of {ref} do not match its config: {'; '.join(problems)}; "
            "a missing tensor would be measured as random initialisation",
            hint="check that the config (config.json, or a GGUF file's metadata) belongs to these weights "
                 "(architecture, layer count, widths) and that no weight file or shard is missing",
        )


def _load_model(ref: str, local_dir: Path, config: Any, load_kwargs: dict[str, Any], transformers: Any,
                auto_causal: Any) -> nn.Module:
    classes = [auto_causal]
    if getattr(config, "text_config", None) is not None and hasattr(transformers, "AutoModelForImageTextToText"):
        classes.append(transformers.AutoModelForImageTextToText)
    last: Exception | None = None
    for cls in classes:
        try:
            model, report = cls.from_pretrained(local_dir, output_loading_info=True, **load_kwargs)
        except ValueError as exc:
            if "Unrecognized configuration class" in str(exc) or "does not recognize" in str(exc):
                last = exc
                continue
            raise UsageError(f"cannot load {ref}: {str(exc).splitlines()[0]}") from None
        except torch.OutOfMemoryError:
            raise RuntimeFailure(f"{ref} does not fit in device memory",
                                 hint="use --device-map auto, a smaller --dtype or --device cpu") from None
        except (OSError, RuntimeError, KeyError, EnvironmentError) as exc:
            raise UsageError(
                f"cannot read the weights of {ref} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})",
                hint="the weight files may be corrupt or truncated: download them again",
            ) from None
        except Exception as exc:  # safetensors raises its own error type
            if type(exc).__name__ in ("SafetensorError", "HeaderTooLarge"):
                raise UsageError(f"cannot read the weights of {ref}: the safetensors file is corrupt or truncated",
                                 hint="download the weights again") from None
            # what is left comes from building the model out of its config: a head count of 0, a
            # dtype that does not exist, a field of the wrong type
            raise UsageError(f"cannot build {ref} from its config ({_first_line(exc)})",
                             hint="check config.json against the model's documentation") from None
        check_loaded(ref, report)
        return model
    model_type = getattr(config, "model_type", "?")
    raise UsageError(f"{ref} is not a causal language model (model type {model_type!r})",
                     hint="maxact-card measures decoder-only LMs (AutoModelForCausalLM)") from last
