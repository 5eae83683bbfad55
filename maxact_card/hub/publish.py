"""Publish the card section and its files to a model repo: one commit on a pull request (our own open
PR is updated, not duplicated), after checking the target and the card's metadata with the Hub.
"""

from __future__ import annotations

import difflib
import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass

from huggingface_hub import CommitOperationAdd, DiscussionWithDetails, get_token
from huggingface_hub.utils import build_hf_headers, get_session

from maxact_card.errors import UsageError
from maxact_card.hub.client import Hub, hub_errors
from maxact_card.hub.download import read_file

PR_TITLE_PREFIX = "[maxact-card]"


@dataclass(frozen=True)
class PublishOutcome:
    """What publish did: "opened" | "updated" | "unchanged" | "committed" | "dry-run"."""

    action: str
    url: str | None
    pr_num: int | None
    card_diff: str
    files: tuple[str, ...]
    saw_open_prs: bool = True  # a dry run without a token cannot list the account's open PRs


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
    hub = Hub.from_env(token)
    base = revision or "main"
    if hub.offline:
        raise UsageError("HF_HUB_OFFLINE is set; publishing needs the Hub", hint="unset HF_HUB_OFFLINE")
    has_token = (token or get_token()) is not None
    if not has_token and not dry_run:
        raise UsageError(
            "publishing needs a Hub token with write access", hint="pass --token or set HF_TOKEN"
        )
    with hub_errors(hub, repo_id, base, writing=True):
        pr = None if direct or not has_token else _open_card_pr(hub, repo_id, base)
        target = f"refs/pr/{pr.num}" if pr is not None else base
        info = hub.api.model_info(repo_id, revision=target, files_metadata=True)
        head = info.sha
        assert head is not None
        current = read_file(hub, repo_id, "README.md", head)
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
        with hub_errors(hub, repo_id, base, writing=True):
            _refresh_pr(hub, repo_id, pr, title, description)
        return PublishOutcome("updated", pr_url, pr_num, diff, names)
    if commit.pr_url is None:  # the Hub found nothing to change and opened no PR
        return PublishOutcome("unchanged", None, None, diff, names)
    return PublishOutcome("opened", commit.pr_url, commit.pr_num, diff, names)


def _validate_metadata(hub: Hub, repo_id: str, target: str, card: str) -> None:
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
    hub = Hub.from_env(token)
    if hub.offline:
        raise UsageError("HF_HUB_OFFLINE is set; publishing needs the Hub", hint="unset HF_HUB_OFFLINE")
    has_token = (token or get_token()) is not None
    if not has_token and not dry_run:
        raise UsageError("publishing needs a Hub token with write access", hint="pass --token or set HF_TOKEN")
    with hub_errors(hub, repo_id, branch, writing=True):
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


def _refresh_pr(hub: Hub, repo_id: str, pr: DiscussionWithDetails, title: str, description: str) -> None:
    """An updated PR says what it now holds: its title and its opening comment (the description)
    are replaced when the new results changed them."""
    if pr.title != title:
        hub.api.rename_discussion(repo_id, pr.num, title)
    opening = next((e for e in pr.events if e.type == "comment"), None)
    if opening is not None and getattr(opening, "content", None) != description:
        hub.api.edit_discussion_comment(repo_id, pr.num, opening.id, description)


def _open_card_pr(hub: Hub, repo_id: str, base: str) -> DiscussionWithDetails | None:
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
