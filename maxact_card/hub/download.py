"""Resolve a model to files on disk: a Hub repo (only the files loading needs, safetensors preferred)
or a local folder, each weight file with its sha256; and read a repo's state without downloading.
"""

from __future__ import annotations

import glob
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import snapshot_download
from huggingface_hub.errors import LocalEntryNotFoundError, RemoteEntryNotFoundError, SafetensorsParsingError

from maxact_card import progress
from maxact_card.documents import sha256_file
from maxact_card.errors import UsageError
from maxact_card.fmt import size
from maxact_card.hub.client import Hub, hub_errors, is_repo_id, offline_error

# What loading a causal LM with transformers needs besides the weights (root of the repo only).
MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "spiece.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
# (format, single file, index) in order of preference: the formats transformers loads.
_WEIGHT_FORMATS = (
    ("safetensors", "model.safetensors", "model.safetensors.index.json"),
    ("bin", "pytorch_model.bin", "pytorch_model.bin.index.json"),
)
BIN_FALLBACK_NOTE = "no safetensors in repo; fell back to .bin weights"

_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class WeightFile:
    """One weight file: its path in the repo (or directory), sha256 of its content, size in bytes."""

    path: str
    sha256: str
    size: int


@dataclass(frozen=True)
class ResolvedModel:
    """A model checkpoint on local disk, and where it came from."""

    local_dir: Path
    repo_id: str | None
    revision: str | None
    commit_sha: str | None
    weight_files: tuple[WeightFile, ...]
    source: str  # "hub" | "local"
    notes: tuple[str, ...]

# ---- choosing files ------------------------------------------------------------------------


def _choose_weights(
    names: set[str], read_index: Callable[[str], Mapping[str, Any]], where: str
) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """(weight files, index files, notes) for the files `names` at the root of a repo or directory.

    Safetensors when there are any in a form transformers loads (model.safetensors or an index
    with its shards), else .bin with a note. With an index, only the shards it lists: repos often
    carry other root-level weights (e.g. Mistral's consolidated.safetensors) that would double
    the download.
    """
    root = {n for n in names if "/" not in n}
    weights: tuple[str, ...]
    indexes: tuple[str, ...]
    for fmt, single, index in _WEIGHT_FORMATS:
        if index in root:
            shards = _index_shards(read_index, index, where)
            missing = [s for s in shards if s not in root]
            if missing or not shards:
                raise UsageError(
                    f"{index} in {where} lists shards that are not there ({', '.join(missing[:3]) or 'none'})",
                    hint="fix the repo's index or pass another revision",
                )
            weights, indexes = tuple(shards), (index,)
        elif single in root:
            weights, indexes = (single,), ()
        else:
            continue
        return weights, indexes, (() if fmt == "safetensors" else (BIN_FALLBACK_NOTE,))
    raise UsageError(
        f"no model weights in {where}",
        hint="expected model.safetensors, model.safetensors.index.json with shards, or pytorch_model.bin",
    )


def _index_shards(read_index: Callable[[str], Mapping[str, Any]], index: str, where: str) -> list[str]:
    """The shard file names a weight index lists; an index that is not one is bad input."""
    bad = UsageError(f"{index} in {where} is not a weight index", hint="fix or remove the index file")
    try:
        doc = read_index(index)
    except (ValueError, UnicodeDecodeError, RecursionError):  # JSONDecodeError is a ValueError
        raise bad from None
    weight_map = doc.get("weight_map") if isinstance(doc, Mapping) else None
    if not isinstance(weight_map, Mapping) or not all(isinstance(v, str) for v in weight_map.values()):
        raise bad
    return sorted(set(weight_map.values()))


def _cached_sha256(path: Path) -> str:
    """The Hub cache names LFS blobs by their sha256: use the name, hash only when it is not one."""
    name = path.resolve().name
    return name if _SHA256.fullmatch(name) else sha256_file(path)

# ---- resolving a model ---------------------------------------------------------------------


def resolve_model(
    model: str,
    *,
    revision: str | None = None,
    token: str | None = None,
    memory_budget_bytes: int | None = None,
    force: bool = False,
    hash_local: bool = True,
) -> ResolvedModel:
    """Make `model` (a local directory or a Hub repo id) available on disk with the files needed to load it.

    A local folder's weights are hashed here unless `hash_local` is False (their sha256 is then
    empty, for the caller to fill); the Hub gives the sha256 of LFS files itself.

    From the Hub: the revision (branch, tag, commit sha or refs/pr/N) is pinned to its commit sha
    first, and only config, tokenizer and weight files of that commit are downloaded. With
    `memory_budget_bytes`, weights larger than the budget are refused before any weight is
    downloaded, unless `force`.
    """
    path = Path(model).expanduser()
    if path.exists():
        if revision is not None:
            raise UsageError(
                f"--revision applies to Hub repos, and {model} is a local path", hint="drop --revision"
            )
        return _resolve_local(path, hashed=hash_local)
    if not is_repo_id(model):
        raise UsageError(
            f"no such directory: {model}", hint="pass a local model directory or a Hub repo id org/name"
        )
    hub = Hub.from_env(token)
    if hub.offline:
        return _resolve_cached(hub, model, revision)
    progress.step(f"resolving {model}" + (f"@{revision}" if revision else ""), "resolve")
    with hub_errors(hub, model, revision):
        # resolve_revision also records revision -> sha in the cache, where HF_HUB_OFFLINE runs find it
        sha = hub.api.resolve_revision(model, revision=revision, cache_dir=hub.cache_dir).resolved
        info = hub.api.model_info(model, revision=sha, files_metadata=True)
        siblings = {s.rfilename: s for s in info.siblings or []}
        weights, indexes, notes = _choose_weights(
            set(siblings),
            lambda f: json.loads(hub.download(model, f, sha).read_bytes()),
            f"{model}@{sha[:12]}",
        )
        if memory_budget_bytes is not None and not force:
            if weights[0].endswith(".safetensors"):
                need = _safetensors_bytes(hub, model, sha, weights)
            else:  # .bin: the file size is the tensor data, to within the pickle's bookkeeping
                need = sum(siblings[w].size or 0 for w in weights) or None
            if need is not None and need > memory_budget_bytes:
                raise UsageError(
                    f"weights need {size(need)}, the selected devices have {size(memory_budget_bytes)}",
                    hint="use --device-map auto on more GPUs, or --force",
                )
        wanted = [f for f in MODEL_FILES if f in siblings] + list(indexes) + list(weights)
        total = sum(siblings[f].size or 0 for f in wanted)
        progress.step(f"downloading {len(wanted)} files ({size(total)}) or finding them in the cache", "download")
        folder = Path(
            snapshot_download(
                model,
                revision=sha,
                allow_patterns=[glob.escape(f) for f in wanted],
                cache_dir=hub.cache_dir,
                endpoint=hub.endpoint,
                token=token,
            )
        )
    files = []
    for w in weights:
        lfs = siblings[w].lfs  # a weight small enough to live outside LFS has no Hub sha256: hash it here
        sha256 = lfs.sha256 if lfs is not None else sha256_file(folder / w)
        files.append(WeightFile(w, sha256, (folder / w).stat().st_size))
    return ResolvedModel(folder, model, revision or "main", sha, tuple(files), "hub", notes)


def _resolve_local(path: Path, *, hashed: bool = True) -> ResolvedModel:
    """A local model folder; its weights hashed here, or (`hashed=False`) left with an empty sha256
    for the caller to fill, so that hashing can run beside the loading."""
    if not path.is_dir():
        raise UsageError(
            f"{path} is not a directory", hint="pass the model's directory (with config.json) or org/name"
        )
    names = {p.name for p in path.iterdir() if p.is_file()}
    weights, _, notes = _choose_weights(names, lambda f: json.loads((path / f).read_text()), str(path))
    try:
        files = tuple(WeightFile(w, sha256_file(path / w) if hashed else "", (path / w).stat().st_size)
                      for w in weights)
    except OSError as exc:
        raise UsageError(f"cannot read the weights in {path}: {exc.strerror or exc} ({exc.filename})",
                         hint="check the files' permissions") from None
    return ResolvedModel(path.resolve(), None, None, None, files, "local", notes)


def _resolve_cached(hub: Hub, repo_id: str, revision: str | None) -> ResolvedModel:
    """HF_HUB_OFFLINE: the snapshot a previous online run left in the cache, without a request."""
    try:
        folder = Path(
            snapshot_download(
                repo_id,
                revision=revision,
                allow_patterns=["config.json"],
                cache_dir=hub.cache_dir,
                local_files_only=True,
            )
        )
    except LocalEntryNotFoundError as exc:  # also IncompleteSnapshotError
        raise offline_error(repo_id, revision) from exc
    names = {p.name for p in folder.iterdir() if p.is_file()}
    where = f"the cached snapshot of {repo_id}@{revision or 'main'}"
    weights, _, notes = _choose_weights(names, lambda f: json.loads((folder / f).read_text()), where)
    files = tuple(WeightFile(w, _cached_sha256(folder / w), (folder / w).stat().st_size) for w in weights)
    notes += (f"HF_HUB_OFFLINE is set: used the cached snapshot {folder.name[:12]}",)
    return ResolvedModel(folder, repo_id, revision or "main", folder.name, files, "hub", notes)


def _safetensors_bytes(hub: Hub, repo_id: str, sha: str, weights: tuple[str, ...]) -> int | None:
    """Bytes of tensor data in the safetensors `weights`, from their headers (ranged reads only).

    Each header lists dtype, shape and the byte range of every tensor; the byte ranges are
    dtype size x number of elements, also for dtypes the client does not know. Headers are read
    per file rather than through get_safetensors_metadata, which downloads the index into the
    cache fixed at import time and only knows the standard file names.
    """
    total = 0
    for w in weights:
        try:
            meta = hub.api.parse_safetensors_file_metadata(repo_id, w, revision=sha)
        except SafetensorsParsingError:
            return None
        total += sum(t.data_offsets[1] - t.data_offsets[0] for t in meta.tensors.values())
    return total


def estimate_weight_bytes(repo_id: str, revision: str | None, token: str | None) -> int | None:
    """Bytes of the repo's safetensors weights at `revision`, from their headers; None without safetensors."""
    hub = Hub.from_env(token)
    if hub.offline:
        raise UsageError(
            "HF_HUB_OFFLINE is set; estimating weights needs the Hub", hint="unset HF_HUB_OFFLINE"
        )
    with hub_errors(hub, repo_id, revision):
        info = hub.api.model_info(repo_id, revision=revision)
        sha = info.sha
        assert sha is not None
        names = {s.rfilename for s in info.siblings or []}
        weights, _, _ = _choose_weights(
            names, lambda f: json.loads(hub.download(repo_id, f, sha).read_bytes()), repo_id
        )
        if not weights[0].endswith(".safetensors"):
            return None
        return _safetensors_bytes(hub, repo_id, sha, weights)


# ---- reading repo state --------------------------------------------------------------------


def repo_weight_state(repo_id: str, revision: str | None, token: str | None) -> tuple[str, dict[str, str]]:
    """(commit sha, {weight path: sha256}) of the weights transformers would load at `revision`."""
    hub = Hub.from_env(token)
    if hub.offline:
        raise UsageError(
            "HF_HUB_OFFLINE is set; checking the repo needs the Hub", hint="unset HF_HUB_OFFLINE"
        )
    with hub_errors(hub, repo_id, revision):
        info = hub.api.model_info(repo_id, revision=revision, files_metadata=True)
        sha = info.sha
        assert sha is not None
        siblings = {s.rfilename: s for s in info.siblings or []}
        weights, _, _ = _choose_weights(
            set(siblings), lambda f: json.loads(hub.download(repo_id, f, sha).read_bytes()), repo_id
        )
        hashes = {}
        for w in weights:
            lfs = siblings[w].lfs
            hashes[w] = lfs.sha256 if lfs is not None else sha256_file(hub.download(repo_id, w, sha))
    return sha, hashes


def read_repo_file(repo_id: str, path: str, revision: str | None, token: str | None) -> bytes | None:
    """The bytes of `path` in the repo at `revision`; None when the repo has no such file."""
    hub = Hub.from_env(token)
    with hub_errors(hub, repo_id, revision):
        return read_file(hub, repo_id, path, revision or "main")


def read_file(hub: Hub, repo_id: str, path: str, revision: str) -> bytes | None:
    try:
        return hub.download(repo_id, path, revision).read_bytes()
    except RemoteEntryNotFoundError:
        return None
    except LocalEntryNotFoundError as exc:
        if hub.offline:
            raise offline_error(repo_id, revision) from exc
        raise
