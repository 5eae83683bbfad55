"""A Hugging Face Hub-compatible HTTP server for tests (the subset in shared/hub-api.md).

The real huggingface_hub client talks to it over HTTP through ``HF_ENDPOINT``; nothing of the client
is patched. Repos live in a temp directory: file contents are stored once by sha256 under
``objects/``, and every commit is a full map ``path -> blob`` with a 40-hex sha, so any revision
(branch, tag, commit sha, ``refs/pr/N``) can be served as it was.
"""

from __future__ import annotations

import base64
import copy
import difflib
import hashlib
import io
import json
import re
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
import yaml

# Files the Hub stores through LFS (real repos say so in .gitattributes); the tree listing gives
# them an `lfs` entry whose oid is the sha256 of the content.
LFS_SUFFIXES = (".safetensors", ".bin", ".gguf", ".onnx", ".pt", ".pth")
_HEX40 = re.compile(r"[0-9a-f]{40}")
_PR_REF = re.compile(r"refs/pr/(\d+)")
_PAGE = 50  # discussions per page, as on the Hub
Reply = tuple[int, dict[str, str], bytes]  # status, headers, body


class HubHTTPError(Exception):
    """An error answer: status, optional X-Error-Code, and a message the client shows."""

    def __init__(self, status: int, message: str, code: str | None = None, commit: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.commit = status, message, code, commit


@dataclass(frozen=True)
class Blob:
    sha256: str
    git_oid: str  # git blob sha1 of what git stores: the content, or the LFS pointer
    size: int
    lfs_pointer_size: int | None


@dataclass
class Commit:
    sha: str
    parent: str | None
    files: dict[str, Blob]
    title: str
    description: str
    date: str


@dataclass
class Discussion:
    num: int
    title: str
    author: str
    is_pr: bool
    created: str
    events: list[dict[str, Any]]
    status: str = "open"
    base: str | None = None  # branch a PR targets
    head: str | None = None  # commit sha refs/pr/N points at
    description: str = ""


@dataclass
class Repo:
    repo_id: str
    private: bool
    gated: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    discussions: dict[int, Discussion] = field(default_factory=dict)
    access: set[str] = field(default_factory=set)  # users granted a gated or private repo


@dataclass(frozen=True)
class Received:
    """One request as the server saw it (the Authorization header is left out)."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes
    status: int


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def _git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubServer:
    """Repos, tokens and a request log, served on 127.0.0.1 at ``self.url``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "objects").mkdir(parents=True, exist_ok=True)
        self.repos: dict[str, Repo] = {}
        self.tokens: dict[str, tuple[str, bool]] = {}  # token -> (user, write)
        self.received: list[Received] = []
        self.fail_status: int | None = None  # set to e.g. 503 to answer every request with it
        # file name -> status for its resolve requests only (HEAD and GET), e.g. {"config.json": 429}:
        # the Hub rate-limits or refuses single files too, and the client wraps a failed HEAD in
        # LocalEntryNotFoundError (file_download.py, _get_metadata_or_catch_error)
        self.fail_files: dict[str, int] = {}
        self._lock = threading.RLock()
        self._counter = 0
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._httpd.daemon_threads = True
        self._httpd.block_on_close = False
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self) -> HubServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    # ---- state for tests -------------------------------------------------------------------
    @property
    def requests(self) -> list[tuple[str, str]]:
        """(method, path) of every request, in order."""
        return [(r.method, r.path) for r in self.received]

    def downloads(self, repo_id: str | None = None) -> list[str]:
        """Repo paths whose full content was served (GET /resolve without Range)."""
        out = []
        for r in self.received:
            parts = r.path.split("/")
            full_get = r.method == "GET" and r.status == 200 and "range" not in r.headers
            if full_get and parts[3:4] == ["resolve"] and repo_id in (None, "/".join(parts[1:3])):
                out.append(unquote("/".join(parts[5:])))
        return out

    def add_token(self, token: str, user: str, write: bool = False) -> None:
        self.tokens[token] = (user, write)

    def grant(self, repo_id: str, user: str) -> None:
        """Give `user` access to a gated or private repo."""
        self.repos[repo_id].access.add(user)

    def create_repo(
        self,
        repo_id: str,
        files: Mapping[str, bytes] | Path | None = None,
        *,
        private: bool = False,
        gated: bool = False,
        message: str = "initial commit",
    ) -> str:
        """Create a repo whose main branch holds `files` (a mapping or a directory); return the commit sha."""
        with self._lock:
            self.repos[repo_id] = Repo(repo_id, private, gated)
            return self._commit(self.repos[repo_id], "main", _as_files(files), (), message, "", None)

    def commit(
        self,
        repo_id: str,
        files: Mapping[str, bytes] | Path | None = None,
        *,
        delete: Iterable[str] = (),
        revision: str = "main",
        message: str = "update",
    ) -> str:
        """Add/replace `files` and remove `delete` on a branch (created from main if new) or refs/pr/N."""
        with self._lock:
            repo = self.repos[repo_id]
            if not _PR_REF.fullmatch(revision) and revision not in repo.branches:
                repo.branches[revision] = repo.branches["main"]
            return self._commit(repo, revision, _as_files(files), tuple(delete), message, "", None)

    def create_tag(self, repo_id: str, tag: str, revision: str = "main") -> None:
        with self._lock:
            repo = self.repos[repo_id]
            repo.tags[tag] = self._resolve(repo, revision)

    def read(self, repo_id: str, path: str, revision: str = "main") -> bytes | None:
        """The bytes of `path` at `revision`, None when absent."""
        repo = self.repos[repo_id]
        blob = repo.commits[self._resolve(repo, revision)].files.get(path)
        return None if blob is None else self._content(blob)

    def repo_state(self, repo_id: str) -> dict[str, Any]:
        """A plain snapshot of refs, commits and pull requests, to compare before and after."""
        with self._lock:
            repo = self.repos[repo_id]
            keys = ("status", "title", "base", "author", "description")
            prs = {
                d.num: {"ref": d.head, **{k: getattr(d, k) for k in keys}}
                for d in repo.discussions.values()
                if d.is_pr
            }
            refs = {"branches": repo.branches, "tags": repo.tags, "commits": sorted(repo.commits)}
            return copy.deepcopy({**refs, "pull_requests": prs, "discussions": len(repo.discussions)})

    # ---- storage ---------------------------------------------------------------------------
    def _store(self, path: str, data: bytes) -> Blob:
        sha256 = hashlib.sha256(data).hexdigest()
        (self.root / "objects" / sha256).write_bytes(data)
        if not path.endswith(LFS_SUFFIXES):
            return Blob(sha256, _git_oid(data), len(data), None)
        pointer = (
            f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {len(data)}\n".encode()
        )
        return Blob(sha256, _git_oid(pointer), len(data), len(pointer))

    def _content(self, blob: Blob) -> bytes:
        return (self.root / "objects" / blob.sha256).read_bytes()

    def _resolve(self, repo: Repo, revision: str) -> str:
        if revision in repo.branches:
            return repo.branches[revision]
        if revision in repo.tags:
            return repo.tags[revision]
        if _HEX40.fullmatch(revision) and revision in repo.commits:
            return revision
        match = _PR_REF.fullmatch(revision)
        if match and (pr := repo.discussions.get(int(match[1]))) is not None and pr.head is not None:
            return pr.head
        raise HubHTTPError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def _commit(
        self,
        repo: Repo,
        revision: str,
        files: Mapping[str, bytes],
        delete: tuple[str, ...],
        title: str,
        description: str,
        parent: str | None,
        author: str = "tests",
    ) -> str:
        """Write one commit on a branch or a PR ref; return its sha."""
        if parent is None:
            parent = self._resolve(repo, revision) if repo.commits else None
        tree = dict(repo.commits[parent].files) if parent else {}
        for path in delete:
            if path.endswith("/"):
                tree = {p: b for p, b in tree.items() if not p.startswith(path)}
            elif tree.pop(path, None) is None:
                raise HubHTTPError(404, f"Entry not found: {path}", "EntryNotFound")
        tree.update({path: self._store(path, data) for path, data in files.items()})
        self._counter += 1
        seed = json.dumps(
            [repo.repo_id, parent, sorted((p, b.git_oid) for p, b in tree.items()), title, self._counter]
        )
        sha = hashlib.sha1(seed.encode()).hexdigest()
        repo.commits[sha] = Commit(sha, parent, tree, title, description, _now())
        match = _PR_REF.fullmatch(revision)
        if match:
            pr = repo.discussions[int(match[1])]
            pr.head = sha
            pr.events.append(_event("commit", author, {"subject": title, "oid": sha}))
        else:
            repo.branches[revision] = sha
        return sha

    def _open_pr(self, repo: Repo, base: str, title: str, description: str, author: str) -> Discussion:
        num = max(repo.discussions, default=0) + 1
        pr = Discussion(
            num, title, author, True, _now(), [], base=base, head=repo.branches[base], description=description
        )
        pr.events.append(
            _event("comment", author, {"edited": False, "hidden": False, "latest": {"raw": description}})
        )
        repo.discussions[num] = pr
        return pr

    # ---- request handling ------------------------------------------------------------------
    def handle(self, method: str, raw_path: str, headers: Mapping[str, str], body: bytes) -> Reply:
        """Route one request; return (status, headers, body). Errors are raised as HubHTTPError."""
        url = urlsplit(raw_path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        seg = [unquote(s) for s in url.path.split("/")[1:]]
        if self.fail_status is not None:
            raise HubHTTPError(self.fail_status, "The Hub is having a bad day")
        user, write = self._caller(headers)
        if seg == ["api", "whoami-v2"]:
            if user is None:
                raise HubHTTPError(401, "Invalid credentials in Authorization header")
            auth = {"type": "access_token", "accessToken": {"role": "write" if write else "read"}}
            return _json({"type": "user", "name": user, "fullname": user, "orgs": [], "auth": auth})
        if seg == ["api", "validate-yaml"] and method == "POST":
            return _validate_yaml(json.loads(body or b"{}").get("content", ""))
        if seg[:2] == ["api", "models"] and len(seg) >= 4:
            repo = self._repo("/".join(seg[2:4]), user)
            if method == "POST" and seg[4:5] != ["paths-info"]:
                if user is None:
                    raise HubHTTPError(401, "You must be authenticated to write to this repo")
                if not write:
                    raise HubHTTPError(403, "You don't have the rights to write to this repo with this token")
            with self._lock:
                return self._api(method, repo, seg[4:], query, body, user or "")
        if len(seg) >= 5 and seg[2] == "resolve" and method in ("GET", "HEAD"):
            repo = self._repo("/".join(seg[:2]), user)
            return self._resolve_file(method, repo, seg[3], "/".join(seg[4:]), headers, user)
        raise HubHTTPError(404, "Sorry, we can't find the page you are looking for.")

    def _caller(self, headers: Mapping[str, str]) -> tuple[str | None, bool]:
        auth = headers.get("authorization", "")
        if not auth:
            return None, False
        token = auth.removeprefix("Bearer ").strip()
        if token not in self.tokens:  # the real Hub answers 401 to any request carrying a bad token
            raise HubHTTPError(401, "Invalid credentials in Authorization header")
        return self.tokens[token]

    def _repo(self, repo_id: str, user: str | None) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and not self._member(repo, user)):
            # private without a token: 401 (as the Hub); with a token that has no access: 404
            raise HubHTTPError(404 if repo is None or user else 401, "Repository not found", "RepoNotFound")
        return repo

    @staticmethod
    def _member(repo: Repo, user: str | None) -> bool:
        return user is not None and (user == repo.repo_id.split("/")[0] or user in repo.access)

    def _api(self, method: str, repo: Repo, rest: list[str], query: dict, body: bytes, user: str) -> Reply:
        kind, arg = (rest + ["", ""])[:2]
        if method == "GET" and kind in ("", "revision"):
            return self._info(repo, arg or "main", query)
        if method == "GET" and kind == "refs" and not arg:
            # list_repo_refs (hf_api.py): GET /api/{type}s/{repo}/refs[?include_prs=1] answers
            # {"branches", "tags", "converts"[, "pullRequests"]}, each entry {"name", "ref", "targetCommit"}
            def ref(name: str, full: str, sha: str) -> dict[str, str]:
                return {"name": name, "ref": full, "targetCommit": sha}

            out: dict[str, Any] = {
                "branches": [ref(b, f"refs/heads/{b}", sha) for b, sha in sorted(repo.branches.items())],
                "tags": [ref(t, f"refs/tags/{t}", sha) for t, sha in sorted(repo.tags.items())],
                "converts": [],
            }
            if query.get("include_prs"):
                out["pullRequests"] = [ref(f"refs/pr/{d.num}", f"refs/pr/{d.num}", d.head or "")
                                       for d in repo.discussions.values() if d.is_pr]
            return _json(out)
        if method == "GET" and kind == "tree" and arg:
            return self._tree(repo, arg, "/".join(rest[2:]), query)
        if method == "POST" and kind == "paths-info" and arg:
            commit = repo.commits[self._resolve(repo, arg)]
            paths = parse_qs(body.decode()).get("paths", [])
            return _json([_entry(p, commit.files[p]) for p in paths if p in commit.files])
        if method == "GET" and kind == "discussions":
            return self._details(repo, int(arg)) if arg else self._discussions(repo, query)
        if method == "POST" and kind == "preupload" and arg:
            self._resolve(repo, arg)
            files = [
                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                for f in json.loads(body)["files"]
            ]
            return _json({"files": files})
        if method == "POST" and kind == "commit" and arg:
            return self._receive_commit(repo, arg, query.get("create_pr") == "1", body, user)
        if method == "POST" and kind == "discussions" and arg:
            return self._change_discussion(repo, int(arg), rest[2:], json.loads(body or b"{}"), user)
        if method == "POST" and kind == "discussions" and not arg:
            data = json.loads(body)
            if data.get("pullRequest"):
                d = self._open_pr(repo, "main", data["title"], data.get("description", ""), user)
            else:
                num = max(repo.discussions, default=0) + 1
                d = repo.discussions[num] = Discussion(num, data["title"], user, False, _now(), [])
            return _json({"num": d.num, "pullRequest": d.is_pr})
        raise HubHTTPError(404, "Sorry, we can't find the page you are looking for.")

    def _info(self, repo: Repo, revision: str, query: dict) -> Reply:
        commit = repo.commits[self._resolve(repo, revision)]
        blobs = query.get("blobs", "").lower() == "true"
        siblings = []
        for path, blob in sorted(commit.files.items()):
            sib: dict[str, Any] = {"rfilename": path}
            if blobs:
                sib.update(size=blob.size, blobId=blob.git_oid)
                if blob.lfs_pointer_size is not None:
                    sib["lfs"] = {
                        "sha256": blob.sha256,
                        "size": blob.size,
                        "pointerSize": blob.lfs_pointer_size,
                    }
            siblings.append(sib)
        info: dict[str, Any] = {"id": repo.repo_id, "author": repo.repo_id.split("/")[0], "sha": commit.sha}
        gated = "manual" if repo.gated else False
        info.update(lastModified=commit.date, private=repo.private, gated=gated, siblings=siblings)
        readme = commit.files.get("README.md")
        card = _front_matter(self._content(readme).decode()) if readme else None
        if isinstance(card, dict):
            info["cardData"] = card
        return _json(info)

    def _tree(self, repo: Repo, revision: str, prefix: str, query: dict) -> Reply:
        commit = repo.commits[self._resolve(repo, revision)]
        recursive = query.get("recursive", "").lower() == "true"
        base = prefix.rstrip("/") + "/" if prefix else ""
        if prefix and prefix not in commit.files and not any(p.startswith(base) for p in commit.files):
            raise HubHTTPError(404, f"Entry not found: {prefix}", "EntryNotFound")
        entries: dict[str, dict[str, Any]] = {}
        for path, blob in sorted(commit.files.items()):
            if not path.startswith(base):
                continue
            parts = path[len(base) :].split("/")
            for depth in range(1, len(parts)):  # the folders on the way
                folder = base + "/".join(parts[:depth])
                entries.setdefault(
                    folder,
                    {
                        "type": "directory",
                        "path": folder,
                        "size": 0,
                        "oid": hashlib.sha1(folder.encode()).hexdigest(),
                    },
                )
                if not recursive:
                    break
            if recursive or len(parts) == 1:
                entries[path] = _entry(path, blob)
        return _json(sorted(entries.values(), key=lambda e: e["path"]))

    def _resolve_file(
        self, method: str, repo: Repo, revision: str, path: str, headers: Mapping[str, str], user: str | None
    ) -> Reply:
        if path in self.fail_files:
            raise HubHTTPError(self.fail_files[path], "Too many requests" if self.fail_files[path] == 429 else "Refused")
        if repo.gated and not self._member(repo, user):
            status = 403 if user else 401
            raise HubHTTPError(
                status, f"Access to model {repo.repo_id} is restricted. Ask for access.", "GatedRepo"
            )
        with self._lock:
            commit = repo.commits[self._resolve(repo, revision)]
        blob = commit.files.get(path)
        if blob is None:
            raise HubHTTPError(404, "Entry not found", "EntryNotFound", commit=commit.sha)
        etag = blob.sha256 if blob.lfs_pointer_size is not None else blob.git_oid
        out = {
            "X-Repo-Commit": commit.sha,
            "ETag": f'"{etag}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        if method == "HEAD":
            return 200, {**out, "Content-Length": str(blob.size)}, b""
        data = self._content(blob)
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", headers.get("range", ""))
        if match is None:
            return 200, out, data
        start, end = int(match[1]), int(match[2] or blob.size - 1)
        if start >= blob.size:
            return 416, {**out, "Content-Range": f"bytes */{blob.size}"}, b""
        end = min(end, blob.size - 1)
        return 206, {**out, "Content-Range": f"bytes {start}-{end}/{blob.size}"}, data[start : end + 1]

    def _receive_commit(self, repo: Repo, revision: str, create_pr: bool, body: bytes, user: str) -> Reply:
        header: dict[str, Any] = {}
        files: dict[str, bytes] = {}
        deleted: list[str] = []
        for line in body.decode().splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                header = value
            elif key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key in ("deletedFile", "deletedFolder"):
                deleted.append(value["path"].rstrip("/") + ("/" if key == "deletedFolder" else ""))
            else:  # lfsFile/copies: never asked for, the preupload answer is always "regular"
                raise HubHTTPError(400, f"unsupported commit operation {key!r}")
        title, description = header.get("summary", ""), header.get("description", "")
        parent = header.get("parentCommit")
        is_pr_ref = _PR_REF.fullmatch(revision) is not None
        if is_pr_ref:
            pr = repo.discussions.get(int(revision.split("/")[-1]))
            if pr is None or not pr.is_pr:
                raise HubHTTPError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            if pr.status != "open":
                raise HubHTTPError(403, "This pull request is not open")
        elif revision not in repo.branches:
            raise HubHTTPError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        if parent is not None and parent not in repo.commits:
            raise HubHTTPError(400, f"Invalid parent commit {parent}")
        if parent is not None and not create_pr and parent != self._resolve(repo, revision):
            raise HubHTTPError(412, "A commit has happened since. Please refresh and try again.")
        pr = None
        if create_pr:
            if is_pr_ref:
                raise HubHTTPError(400, "create_pr needs a branch as base")
            pr = self._open_pr(repo, revision, title, description, user)
            pr.head = parent or pr.head
            revision, parent = f"refs/pr/{pr.num}", None
        sha = self._commit(repo, revision, files, tuple(deleted), title, description, parent, user)
        pr_url = f"{self.url}/{repo.repo_id}/discussions/{pr.num}" if pr else None
        commit_url = f"{self.url}/{repo.repo_id}/commit/{sha}"
        return _json({"commitUrl": commit_url, "commitOid": sha, "pullRequestUrl": pr_url, "success": True})

    def _summary(self, repo: Repo, d: Discussion) -> dict[str, Any]:
        return {
            "num": d.num,
            "title": d.title,
            "status": d.status,
            "author": {"name": d.author, "type": "user"},
            "createdAt": d.created,
            "isPullRequest": d.is_pr,
            "numComments": 1,
            "pinned": False,
            "repo": {"name": repo.repo_id, "type": "model"},
        }

    def _discussions(self, repo: Repo, query: dict) -> Reply:
        kind, status, author = query.get("type", "all"), query.get("status", "all"), query.get("author")
        found = [
            d
            for d in sorted(repo.discussions.values(), key=lambda d: -d.num)
            if (kind == "all" or d.is_pr == (kind == "pull_request"))
            and (status == "all" or d.status == status)
            and (author is None or d.author == author)
        ]
        start = int(query.get("p", 0)) * _PAGE
        page = [self._summary(repo, d) for d in found[start : start + _PAGE]]
        return _json({"count": len(found), "start": start, "discussions": page})

    def _change_discussion(self, repo: Repo, num: int, what: list[str], data: dict, user: str) -> Reply:
        """Rename a discussion, or edit one of its comments, as huggingface_hub's `rename_discussion`
        (POST .../discussions/{num}/title {"title"}, answered {"newTitle": event}) and
        `edit_discussion_comment` (POST .../discussions/{num}/comment/{id}/edit {"content"}, answered
        {"updatedComment": event}) call them (hf_api.py, `_post_discussion_changes`). Only the
        author of the discussion (or of the comment) or a member of the repo may."""
        d = repo.discussions.get(num)
        if d is None:
            raise HubHTTPError(404, "Discussion not found")
        if what == ["title"]:
            if user != d.author and not self._member(repo, user):
                raise HubHTTPError(403, "Only the author or a member can rename this discussion")
            event = _event("title-change", user, {"from": d.title, "to": data["title"]})
            d.title = data["title"]
            d.events.append(event)
            return _json({"newTitle": event})
        if len(what) == 3 and what[0] == "comment" and what[2] == "edit":
            comment = next((e for e in d.events if e["type"] == "comment" and e["id"] == what[1]), None)
            if comment is None:
                raise HubHTTPError(404, "Comment not found")
            if user != comment["author"]["name"]:
                raise HubHTTPError(403, "Only the author can edit this comment")
            comment["data"].update(edited=True, latest={"raw": data["content"]})
            if comment is next(e for e in d.events if e["type"] == "comment"):
                d.description = data["content"]  # the opening comment is the description
            return _json({"updatedComment": comment})
        raise HubHTTPError(404, "Sorry, we can't find the page you are looking for.")

    def _details(self, repo: Repo, num: int) -> Reply:
        d = repo.discussions.get(num)
        if d is None:
            raise HubHTTPError(404, "Discussion not found")
        out = self._summary(repo, d)
        out.update(events=d.events, filesWithConflicts=[], diff=None)
        if d.is_pr and d.base is not None and d.head is not None:
            out["changes"] = {"base": f"refs/heads/{d.base}"}
            out["diff"] = self._diff(repo.commits[repo.branches[d.base]], repo.commits[d.head])
        return _json(out)

    def _diff(self, old: Commit, new: Commit) -> str:
        def lines(blob: Blob | None) -> list[str]:
            return self._content(blob).decode(errors="replace").splitlines(True) if blob else []

        chunks: list[str] = []
        for path in sorted(set(old.files) | set(new.files)):
            a, b = old.files.get(path), new.files.get(path)
            if a != b:
                chunks.extend(difflib.unified_diff(lines(a), lines(b), f"a/{path}", f"b/{path}"))
        return "".join(chunks)


def _event(kind: str, author: str, data: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": hashlib.sha1(json.dumps([kind, data, _now()]).encode()).hexdigest()[:24],
        "type": kind,
        "createdAt": _now(),
        "author": {"name": author},
        "data": data,
    }


def _entry(path: str, blob: Blob) -> dict[str, Any]:
    entry: dict[str, Any] = {"type": "file", "path": path, "size": blob.size, "oid": blob.git_oid}
    if blob.lfs_pointer_size is not None:
        entry["lfs"] = {"oid": blob.sha256, "size": blob.size, "pointerSize": blob.lfs_pointer_size}
    return entry


def _front_matter(text: str) -> Any:
    match = re.match(r"---\s*\n(.*?)\n---\s*(\n|$)", text, re.DOTALL)
    return yaml.safe_load(match[1]) if match else None


def _validate_yaml(content: str) -> Reply:
    """POST /api/validate-yaml, which RepoCard.validate calls (repocard.py; a 400 makes the client
    raise ValueError with the reply's text). Like the Hub, it rejects YAML that does not parse and
    model-card metadata that does not fit the Hub's card spec (docs: hub/model-cards, "Model card
    metadata"): a `license` that is not a string identifier, a `model-index` that is not a list
    of entries with a `name` and a list of `results`."""

    def bad(message: str) -> Reply:
        _, headers, body = _json({"errors": [{"message": message}], "warnings": []})
        return 400, headers, body

    try:
        data = _front_matter(content)
    except yaml.YAMLError as exc:
        return bad(f"Invalid YAML: {exc}")
    if not isinstance(data, dict):
        return _json({"errors": [], "warnings": []})
    if "license" in data and not isinstance(data["license"], str):
        return bad('"license" must be a string')
    index = data.get("model-index")
    if index is not None and not (
        isinstance(index, list)
        and all(isinstance(e, dict) and isinstance(e.get("name"), str) and isinstance(e.get("results"), list)
                for e in index)
    ):
        return bad('"model-index" must be an array of objects with a "name" and "results"')
    return _json({"errors": [], "warnings": []})


def _json(obj: Any) -> Reply:
    return 200, {"Content-Type": "application/json"}, json.dumps(obj).encode()


def _as_files(files: Mapping[str, bytes] | Path | None) -> dict[str, bytes]:
    if files is None:
        return {}
    if isinstance(files, Path):
        return {
            p.relative_to(files).as_posix(): p.read_bytes() for p in sorted(files.rglob("*")) if p.is_file()
        }
    return dict(files)


def _make_handler(server: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the client's connection pool expects

        def log_message(self, format: str, *args: Any) -> None:  # quiet in tests
            pass

        def _serve(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            headers = {k.lower(): v for k, v in self.headers.items()}
            try:
                status, out, payload = server.handle(self.command, self.path, headers, body)
            except HubHTTPError as err:
                status, out, payload = _json({"error": err.message})
                status = err.status
                out = {**out, "X-Error-Message": err.message}
                if err.code:
                    out["X-Error-Code"] = err.code
                if err.commit:
                    out["X-Repo-Commit"] = err.commit
            with server._lock:
                seen = {k: v for k, v in headers.items() if k != "authorization"}
                path, _, query = self.path.partition("?")
                server.received.append(Received(self.command, path, query, seen, body, status))
            self.send_response(status)
            for key, value in out.items():
                self.send_header(key, value)
            if "Content-Length" not in out:
                self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)

        do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _serve

    return Handler


@pytest.fixture
def hub_server(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Iterator[HubServer]:
    """A running HubServer; HF_ENDPOINT points at it for the test."""
    server = HubServer(tmp_path_factory.mktemp("hub")).start()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    yield server
    server.stop()


_TINY_CACHE: dict[str, bytes] = {}
# 1x1 transparent PNG: repos carry images the CLI must never download
_PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAQAAAC1HAwCAAAAC0lEQVR42mNkYAAAAAYAAjCB0C8AAAAASUVORK5CYII="
)
_README = """---
license: apache-2.0
library_name: transformers
tags:
- tiny
---

# tiny-llama

A tiny random Llama for tests.
"""


def tiny_llama_files(tmp_path: Path) -> dict[str, bytes]:
    """The files of a realistic tiny Llama repo: safetensors weights, a tokenizer, and decoys.

    Decoys the CLI must not download: a duplicate ``pytorch_model.bin``, ``model.onnx``, a ``.gguf``,
    a ``.pth`` and an image. Built once per session (seeded, so identical every time).
    """
    if not _TINY_CACHE:
        _TINY_CACHE.update(_build_tiny_llama(tmp_path / "tiny-llama"))
    return dict(_TINY_CACHE)


def _build_tiny_llama(out: Path) -> dict[str, bytes]:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    corpus = ["the quick brown fox jumps over the lazy dog", "max activations of causal language models"] * 20
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    files = {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    files["pytorch_model.bin"] = buffer.getvalue()
    files["model.onnx"] = b"\x08\x07onnx-decoy" + bytes(64)
    files["tiny-llama-Q8_0.gguf"] = b"GGUF" + (3).to_bytes(4, "little") + bytes(64)
    files["original/consolidated.pth"] = b"pth-decoy" + bytes(64)
    files["assets/banner.png"] = _PNG
    files["README.md"] = _README.encode()
    return files
