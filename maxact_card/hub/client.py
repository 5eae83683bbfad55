"""The connection to the Hub, and its errors in our words.

huggingface_hub reads HF_ENDPOINT, HF_HOME/HF_HUB_CACHE and HF_HUB_OFFLINE once, when it is imported;
this module reads them on every call and passes them explicitly, so a changed environment (a test,
a long-lived process) is honoured. HF_TOKEN is read by huggingface_hub itself on every call.

Messages are built here from what we know (repo id, revision, endpoint), never from the text of a
client exception: that text can quote a server reply, and a token must never reach a message.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import HfApi, hf_hub_download
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
)

from maxact_card.errors import MaxactError, RuntimeFailure, UsageError

DEFAULT_ENDPOINT = "https://huggingface.co"

_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")

# ---- environment ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Hub:
    """The Hub as the environment names it now: endpoint, cache, token, and a client for it."""

    endpoint: str
    cache_dir: str
    token: str | None
    offline: bool
    api: HfApi

    @classmethod
    def from_env(cls, token: str | None) -> Hub:
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


def translate(
    exc: BaseException, hub: Hub, repo_id: str, revision: str | None, writing: bool
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
        inner = translate(cause, hub, repo_id, revision, writing)
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
def hub_errors(hub: Hub, repo_id: str, revision: str | None, *, writing: bool = False) -> Iterator[None]:
    try:
        yield
    except MaxactError:
        raise
    except Exception as exc:
        mapped = translate(exc, hub, repo_id, revision, writing)
        if mapped is None:
            raise
        raise mapped from exc


def offline_error(repo_id: str, revision: str | None) -> UsageError:
    return UsageError(
        f"offline and no cached snapshot of {repo_id}@{revision or 'main'}",
        hint="run once online or unset HF_HUB_OFFLINE",
    )


def is_repo_id(model: str) -> bool:
    """True for an "org/name" Hub repo id that is not also an existing local path."""
    return bool(_REPO_ID.fullmatch(model)) and ".." not in model and not Path(model).exists()
