"""Everything that speaks to the Hugging Face Hub: resolve a model to local files, read repo state,
publish the model-card section as a pull request.

huggingface_hub reads HF_ENDPOINT, HF_HOME/HF_HUB_CACHE and HF_HUB_OFFLINE once, when it is imported;
this module reads them on every call and passes them explicitly, so a changed environment (a test,
a long-lived process) is honoured. HF_TOKEN is read by huggingface_hub itself on every call.

Messages are built here from what we know (repo id, revision, endpoint), never from the text of a
client exception: that text can quote a server reply, and a token must never reach a message.
"""

from __future__ import annotations

import difflib
import glob
import hashlib
import json
import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import (
    CommitOperationAdd,
    DiscussionWithDetails,
    HfApi,
    get_token,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub.errors import (
    FileMetadataError,
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    LocalTokenNotFoundError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
    RevisionResolutionError,
    SafetensorsParsingError,
)
from huggingface_hub.utils import build_hf_headers, get_session

from maxact_card import progress
from maxact_card.documents import sha256_file
from maxact_card.errors import MaxactError, RuntimeFailure, UsageError
from maxact_card.fmt import size

PR_TITLE_PREFIX = "[maxact-card]"
DEFAULT_ENDPOINT = "https://huggingface.co"

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
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")
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


@dataclass(frozen=True)
class PublishOutcome:
    """What publish did: "opened" | "updated" | "unchanged" | "committed" | "dry-run"."""

    action: str
    url: str | None
    pr_num: int | None
    card_diff: str
    files: tuple[str, ...]
    saw_open_prs: bool = True  # a dry run without a token cannot list the account's open PRs


# ---- environment ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Hub:
    """The Hub as the environment names it now: endpoint, cache, token, and a client for it."""

    endpoint: str
    cache_dir: str
    token: str | None
    offline: bool
    api: HfApi

    @classmethod
    def from_env(cls, token: str | None) -> _Hub:
        endpoint = (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
        return cls(endpoint, _cache_dir(), token, _offline(), HfApi(endpoint=endpoint, token=token))

    def download(self, repo_id: str, filename: str, revision: str) -> Path:
        return Path(
            hf_hub_download(
                repo_id,
                filename,
                revision=revision,
                cache_dir=self.cache_dir,
                endpoint=self.endpoint,
                token=self.token,
                local_files_only=self.offline,
            )
        )


def _cache_dir() -> str:
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    home = os.environ.get("HF_HOME") or os.path.join(xdg, "huggingface")
    return os.path.join(os.path.expanduser(home), "hub")


def _offline() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in {"1", "ON", "YES", "TRUE"}


# ---- errors --------------------------------------------------------------------------------


def _is_transport_error(exc: BaseException) -> bool:
    """A connection failure or timeout from the HTTP library huggingface_hub uses (httpx2 or httpx)."""
    for name in ("httpx2", "httpx"):
        module = sys.modules.get(name)
        if module is not None and isinstance(exc, getattr(module, "TransportError", ())):
            return True
    return isinstance(exc, (ConnectionError, TimeoutError, OfflineModeIsEnabled))


def _translate(
    exc: BaseException, hub: _Hub, repo_id: str, revision: str | None, writing: bool
) -> MaxactError | None:
    """The typed error for a client exception, or None for one we do not know."""
    where = f"{repo_id}@{revision}" if revision else repo_id
    unreachable = RuntimeFailure(
        f"the Hub at {hub.endpoint} is unreachable",
        hint="check the network or set HF_HUB_OFFLINE=1 to use the cache",
    )
    cause = exc.__cause__ or exc.__context__
    if isinstance(exc, (LocalEntryNotFoundError, RevisionResolutionError)) and cause is not None and cause is not exc:
        # a failed HEAD of a file reaches us wrapped: say what the Hub answered, not "unreachable"
        inner = _translate(cause, hub, repo_id, revision, writing)
        if inner is not None:
            return inner
    if type(exc).__name__ == "XetDownloadError":  # huggingface_hub.errors from 1.x on
        return RuntimeFailure(
            f"downloading {where} from the Hub's Xet storage failed",
            hint="run again, or set HF_HUB_DISABLE_XET=1 to download over plain HTTP",
        )
    if type(exc).__name__ == "DisabledRepoError":
        return UsageError(f"{repo_id} is disabled on {hub.endpoint}", hint="its author has disabled access to it")
    if isinstance(exc, GatedRepoError):
        return UsageError(
            f"{repo_id} is gated and this token has no access",
            hint=f"request access on {hub.endpoint}/{repo_id} and pass that account's token with --token or HF_TOKEN",
        )
    if isinstance(exc, RepositoryNotFoundError):
        return UsageError(
            f"no model repo {repo_id} on {hub.endpoint}",
            hint="check the name, or pass --token (or set HF_TOKEN) if the repo is private",
        )
    if isinstance(exc, RevisionNotFoundError):
        return UsageError(
            f"revision {revision or 'main'!r} not found in {repo_id}",
            hint="pass a branch, tag, 40-hex commit sha or refs/pr/N that exists",
        )
    if isinstance(exc, RemoteEntryNotFoundError):
        return UsageError(f"a file listed in {where} is missing on the Hub", hint="check the repo's files")
    if isinstance(exc, HfHubHTTPError) and exc.response is not None:
        status = exc.response.status_code
        if status == 401:
            return UsageError(
                "the Hub refused the token (HTTP 401)",
                hint="the token is invalid or missing; pass a valid one with --token or set HF_TOKEN",
            )
        if status == 403:
            what = (
                f"the token has no write access to {repo_id}"
                if writing
                else f"the token may not read {repo_id}"
            )
            return UsageError(
                what,
                hint=f"create a token with write permission at {hub.endpoint}/settings/tokens, pass it with --token",
            )
        if status == 412:
            return RuntimeFailure(f"{where} changed while publishing", hint="run the command again")
        if status == 429:
            return RuntimeFailure(
                f"the Hub at {hub.endpoint} is rate limiting requests", hint="wait and run again"
            )
        if status >= 500:
            return unreachable
        return RuntimeFailure(
            f"the Hub answered HTTP {status} for {where}", hint="set MAXACT_CARD_DEBUG=1 to see the reply"
        )
    if isinstance(exc, LocalTokenNotFoundError):
        return UsageError("this needs a Hub token", hint="pass --token or set HF_TOKEN")
    if isinstance(exc, FileMetadataError):
        return RuntimeFailure(
            f"{hub.endpoint} does not answer like the Hugging Face Hub",
            hint="check HF_ENDPOINT and proxy settings",
        )
    if isinstance(exc, (LocalEntryNotFoundError, RevisionResolutionError)) or _is_transport_error(exc):
        return unreachable
    return None


@contextmanager
def _hub_errors(hub: _Hub, repo_id: str, revision: str | None, *, writing: bool = False) -> Iterator[None]:
    try:
        yield
    except MaxactError:
        raise
    except Exception as exc:
        mapped = _translate(exc, hub, repo_id, revision, writing)
        if mapped is None:
            raise
        raise mapped from exc


def _offline_error(repo_id: str, revision: str | None) -> UsageError:
    return UsageError(
        f"offline and no cached snapshot of {repo_id}@{revision or 'main'}",
        hint="run once online or unset HF_HUB_OFFLINE",
    )


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


def is_repo_id(model: str) -> bool:
    """True for an "org/name" Hub repo id that is not also an existing local path."""
    return bool(_REPO_ID.fullmatch(model)) and ".." not in model and not Path(model).exists()


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
    hub = _Hub.from_env(token)
    if hub.offline:
        return _resolve_cached(hub, model, revision)
    progress.step(f"resolving {model}" + (f"@{revision}" if revision else ""), "resolve")
    with _hub_errors(hub, model, revision):
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


def _resolve_cached(hub: _Hub, repo_id: str, revision: str | None) -> ResolvedModel:
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
        raise _offline_error(repo_id, revision) from exc
    names = {p.name for p in folder.iterdir() if p.is_file()}
    where = f"the cached snapshot of {repo_id}@{revision or 'main'}"
    weights, _, notes = _choose_weights(names, lambda f: json.loads((folder / f).read_text()), where)
    files = tuple(WeightFile(w, _cached_sha256(folder / w), (folder / w).stat().st_size) for w in weights)
    notes += (f"HF_HUB_OFFLINE is set: used the cached snapshot {folder.name[:12]}",)
    return ResolvedModel(folder, repo_id, revision or "main", folder.name, files, "hub", notes)


def _safetensors_bytes(hub: _Hub, repo_id: str, sha: str, weights: tuple[str, ...]) -> int | None:
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
    hub = _Hub.from_env(token)
    if hub.offline:
        raise UsageError(
            "HF_HUB_OFFLINE is set; estimating weights needs the Hub", hint="unset HF_HUB_OFFLINE"
        )
    with _hub_errors(hub, repo_id, revision):
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
    hub = _Hub.from_env(token)
    if hub.offline:
        raise UsageError(
            "HF_HUB_OFFLINE is set; checking the repo needs the Hub", hint="unset HF_HUB_OFFLINE"
        )
    with _hub_errors(hub, repo_id, revision):
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
    hub = _Hub.from_env(token)
    with _hub_errors(hub, repo_id, revision):
        return _read(hub, repo_id, path, revision or "main")


def _read(hub: _Hub, repo_id: str, path: str, revision: str) -> bytes | None:
    try:
        return hub.download(repo_id, path, revision).read_bytes()
    except RemoteEntryNotFoundError:
        return None
    except LocalEntryNotFoundError as exc:
        if hub.offline:
            raise _offline_error(repo_id, revision) from exc
        raise


# ---- publishing ----------------------------------------------------------------------------


def publish(
    repo_id: str,
    *,
    build_card: Callable[[str | None], str],
    files: dict[str, bytes],
    title: str,
    description: str,
    revision: str | None = None,
    direct: bool = False,
    dry_run: bool = False,
    token: str | None = None,
) -> PublishOutcome:
    """Publish README.md (from `build_card`) and `files` in one commit: a pull request by default.

    An open "[maxact-card]" PR of the same account against the same branch is updated instead of
    opening another; when it (or, without one, the branch) already holds exactly these files,
    nothing is written. `direct` commits to the branch; `dry_run` writes nothing and returns the
    card's diff.
    """
    if not title.startswith(PR_TITLE_PREFIX):
        raise ValueError(f"title must start with {PR_TITLE_PREFIX!r}")
    if "README.md" in files:
        raise ValueError("README.md is built by build_card, not passed in files")
    hub = _Hub.from_env(token)
    base = revision or "main"
    if hub.offline:
        raise UsageError("HF_HUB_OFFLINE is set; publishing needs the Hub", hint="unset HF_HUB_OFFLINE")
    has_token = (token or get_token()) is not None
    if not has_token and not dry_run:
        raise UsageError(
            "publishing needs a Hub token with write access", hint="pass --token or set HF_TOKEN"
        )
    with _hub_errors(hub, repo_id, base, writing=True):
        pr = None if direct or not has_token else _open_card_pr(hub, repo_id, base)
        target = f"refs/pr/{pr.num}" if pr is not None else base
        info = hub.api.model_info(repo_id, revision=target, files_metadata=True)
        head = info.sha
        assert head is not None
        current = _read(hub, repo_id, "README.md", head)
        old_card = current.decode("utf-8") if current is not None else None
        wanted = {"README.md": build_card(old_card).encode("utf-8"), **files}
        _validate_metadata(hub, repo_id, target, wanted["README.md"].decode("utf-8"))
        names = tuple(wanted)
        diff = _card_diff(old_card, wanted["README.md"].decode("utf-8"))
        pr_url, pr_num = (pr.url, pr.num) if pr is not None else (None, None)
        if dry_run:
            return PublishOutcome("dry-run", pr_url, pr_num, diff, names, saw_open_prs=has_token)
        remote = {s.rfilename: (s.lfs.sha256 if s.lfs else s.blob_id) for s in info.siblings or []}
        if all(
            remote.get(p) in (_git_blob_id(data), hashlib.sha256(data).hexdigest())
            for p, data in wanted.items()
        ):
            return PublishOutcome("unchanged", pr_url, pr_num, diff, names)
        operations = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=data) for p, data in wanted.items()]
        commit = hub.api.create_commit(
            repo_id,
            operations,
            commit_message=title,
            commit_description=description,
            revision=target,
            create_pr=not direct and pr is None,
            parent_commit=head,
        )
    if direct:
        return PublishOutcome("committed", commit.commit_url, None, diff, names)
    if pr is not None:
        with _hub_errors(hub, repo_id, base, writing=True):
            _refresh_pr(hub, repo_id, pr, title, description)
        return PublishOutcome("updated", pr_url, pr_num, diff, names)
    if commit.pr_url is None:  # the Hub found nothing to change and opened no PR
        return PublishOutcome("unchanged", None, None, diff, names)
    return PublishOutcome("opened", commit.pr_url, commit.pr_num, diff, names)


def _validate_metadata(hub: _Hub, repo_id: str, target: str, card: str) -> None:
    """Ask the Hub whether it accepts the card's metadata, as RepoCard.validate does (POST
    /api/validate-yaml; 400 with the reasons when it does not), so that a card the Hub would refuse
    fails with the Hub's own words before anything is written. Any other answer is left to the
    commit itself."""
    response = get_session().post(
        f"{hub.endpoint}/api/validate-yaml", json={"repoType": "model", "content": card},
        headers=build_hf_headers(token=hub.token),
    )
    if response.status_code != 400:
        return
    try:
        errors = [str(e.get("message", e)) for e in response.json().get("errors", [])]
    except (ValueError, AttributeError):
        errors = [response.text.strip()[:300]]
    raise UsageError(
        f"the Hub rejects the metadata of README.md in {repo_id}@{target}: {'; '.join(errors) or 'no reason given'}",
        hint="fix the front matter (the YAML between the --- lines) on that branch, then publish again",
    )


def check_publish_target(repo_id: str, branch: str, token: str | None, *, dry_run: bool = False) -> None:
    """Before any long work: can a card be published to `branch` of `repo_id` with this token?

    A pull request can only target a branch (huggingface_hub's create_commit refuses a tag, a
    commit sha or refs/pr/N as the revision of a new PR), so `branch` must be one; the repo must
    exist for this token; and, unless `dry_run`, the token must be one that may write.
    """
    hub = _Hub.from_env(token)
    if hub.offline:
        raise UsageError("HF_HUB_OFFLINE is set; publishing needs the Hub", hint="unset HF_HUB_OFFLINE")
    has_token = (token or get_token()) is not None
    if not has_token and not dry_run:
        raise UsageError("publishing needs a Hub token with write access", hint="pass --token or set HF_TOKEN")
    with _hub_errors(hub, repo_id, branch, writing=True):
        if has_token:
            role = ((hub.api.whoami(cache=True).get("auth") or {}).get("accessToken") or {}).get("role")
            if role == "read" and not dry_run:
                raise UsageError(f"this token can only read; publishing to {repo_id} needs write access",
                                 hint=f"create a token with write permission at {hub.endpoint}/settings/tokens "
                                      "and pass it with --token")
        refs = hub.api.list_repo_refs(repo_id)
    branches = {b.name for b in refs.branches}
    if branch not in branches:
        kind = ("a tag" if branch in {t.name for t in refs.tags} else
                "a pull request" if branch.startswith("refs/pr/") else
                "a commit" if re.fullmatch(r"[0-9a-f]{40}", branch) else "not a branch")
        raise UsageError(
            f"{branch!r} in {repo_id} is {kind}; a pull request can only target a branch "
            f"({', '.join(sorted(branches)) or 'none'})",
            hint="measure any revision with --revision, and name the branch that receives the card "
                 "(check --pr-base, publish --revision)",
        )


def _refresh_pr(hub: _Hub, repo_id: str, pr: DiscussionWithDetails, title: str, description: str) -> None:
    """An updated PR says what it now holds: its title and its opening comment (the description)
    are replaced when the new results changed them."""
    if pr.title != title:
        hub.api.rename_discussion(repo_id, pr.num, title)
    opening = next((e for e in pr.events if e.type == "comment"), None)
    if opening is not None and getattr(opening, "content", None) != description:
        hub.api.edit_discussion_comment(repo_id, pr.num, opening.id, description)


def _open_card_pr(hub: _Hub, repo_id: str, base: str) -> DiscussionWithDetails | None:
    """This account's newest open "[maxact-card]" PR against `base`, or None."""
    me = hub.api.whoami(cache=True)["name"]
    for d in hub.api.get_repo_discussions(
        repo_id, author=me, discussion_type="pull_request", discussion_status="open"
    ):
        if d.title.startswith(PR_TITLE_PREFIX):
            details = hub.api.get_discussion_details(repo_id, d.num)
            if details.target_branch in (f"refs/heads/{base}", base):
                return details
    return None


def _git_blob_id(data: bytes) -> str:
    """The git object id of `data`, as the Hub reports it for files not stored with LFS."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _card_diff(old: str | None, new: str) -> str:
    def lines(text: str) -> list[str]:
        return [line if line.endswith("\n") else line + "\n" for line in text.splitlines(keepends=True)]

    return "".join(difflib.unified_diff(lines(old or ""), lines(new), "a/README.md", "b/README.md"))
