"""maxact_card.hub against the local Hub server: resolving models, reading state, publishing."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest
from huggingface_hub import CommitOperationAdd, DiscussionComment, HfApi

from maxact_card.errors import MaxactError, RuntimeFailure, UsageError
from maxact_card.hub.client import is_repo_id
from maxact_card.hub.download import (
    BIN_FALLBACK_NOTE,
    WeightFile,
    estimate_weight_bytes,
    read_repo_file,
    repo_weight_state,
    resolve_model,
)
from maxact_card.hub.publish import publish
from tests.hub_server import HubServer, tiny_llama_files

REPO = "org/tiny"
WRITE, READ = "hf_write_token_for_tests", "hf_read_token_for_tests"
NEEDED = [
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
]
TITLE = "[maxact-card] Add maximum activations"


@pytest.fixture
def files(tmp_path: Path) -> dict[str, bytes]:
    return tiny_llama_files(tmp_path)


@pytest.fixture
def hub(
    hub_server: HubServer,
    files: dict[str, bytes],
) -> HubServer:
    hub_server.create_repo(REPO, files)
    hub_server.add_token(WRITE, "alice", write=True)
    hub_server.add_token(READ, "bob", write=False)
    return hub_server


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def main_sha(hub: HubServer, repo: str = REPO) -> str:
    return hub.repo_state(repo)["branches"]["main"]


def error_text(err: BaseException) -> str:
    """The message of an exception and of every exception it was raised from."""
    parts, seen = [], set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        parts.append(err.line() if isinstance(err, MaxactError) else str(err))
        err = err.__cause__ or err.__context__  # type: ignore[assignment]
    return "\n".join(parts)


# ---- resolve_model ---------------------------------------------------------------------------


def test_resolve_downloads_only_what_loading_needs(hub: HubServer, files: dict[str, bytes]) -> None:
    model = resolve_model(REPO)
    assert sorted(hub.downloads()) == NEEDED
    assert model.source == "hub" and model.repo_id == REPO and model.revision == "main"
    assert model.commit_sha == main_sha(hub) and model.local_dir.name == model.commit_sha
    assert model.weight_files == (
        WeightFile("model.safetensors", sha256(files["model.safetensors"]), 161496),
    )
    assert model.notes == ()
    assert sorted(p.name for p in model.local_dir.iterdir()) == NEEDED
    resolve_model(REPO)  # everything is cached now
    assert sorted(hub.downloads()) == NEEDED


def test_bin_weights_only_when_there_are_no_safetensors(hub: HubServer, files: dict[str, bytes]) -> None:
    hub.create_repo("org/old", {k: v for k, v in files.items() if not k.endswith(".safetensors")})
    model = resolve_model("org/old")
    assert [w.path for w in model.weight_files] == ["pytorch_model.bin"]
    assert model.weight_files[0].sha256 == sha256(files["pytorch_model.bin"])
    assert model.notes == (BIN_FALLBACK_NOTE,)
    assert sorted(hub.downloads()) == sorted(set(NEEDED) - {"model.safetensors"} | {"pytorch_model.bin"})


def test_sharded_weights_are_the_shards_the_index_lists(hub: HubServer) -> None:
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    shards = {
        name: safetensors_bytes(4 + i) for i, name in enumerate(sorted(set(index["weight_map"].values())))
    }
    hub.create_repo(
        "org/sharded",
        {
            "config.json": b"{}",
            "model.safetensors.index.json": json.dumps(index).encode(),
            **shards,
            "consolidated.safetensors": safetensors_bytes(9),  # another format's copy of the weights
        },
    )
    model = resolve_model("org/sharded")
    assert [w.path for w in model.weight_files] == sorted(shards)
    assert sorted(hub.downloads()) == sorted(["config.json", "model.safetensors.index.json", *shards])
    assert estimate_weight_bytes("org/sharded", None, None) == (4 + 5) * 4


def safetensors_bytes(n: int) -> bytes:
    """A safetensors file with one float32 tensor of n elements."""
    header = json.dumps({"t": {"dtype": "F32", "shape": [n], "data_offsets": [0, 4 * n]}}).encode()
    return struct.pack("<Q", len(header)) + header + bytes(4 * n)


def test_revision_is_pinned_to_its_commit(hub: HubServer, files: dict[str, bytes]) -> None:
    first = main_sha(hub)
    hub.create_tag(REPO, "v1")
    second = hub.commit(REPO, {"model.safetensors": safetensors_bytes(3)})
    old = resolve_model(REPO, revision=first)
    assert old.commit_sha == first and old.revision == first
    assert old.weight_files[0].sha256 == sha256(files["model.safetensors"])
    assert (old.local_dir / "model.safetensors").read_bytes() == files["model.safetensors"]
    assert resolve_model(REPO, revision="v1").commit_sha == first
    new = resolve_model(REPO)
    assert new.commit_sha == second and new.weight_files[0].sha256 == sha256(safetensors_bytes(3))
    pr = HfApi(endpoint=hub.url, token=WRITE).create_commit(
        REPO,
        [CommitOperationAdd("model.safetensors", safetensors_bytes(5))],
        commit_message="x",
        create_pr=True,
    )
    in_pr = resolve_model(REPO, revision="refs/pr/1")
    assert in_pr.commit_sha == pr.oid and in_pr.weight_files[0].sha256 == sha256(safetensors_bytes(5))
    assert repo_weight_state(REPO, first, None) == (
        first,
        {"model.safetensors": sha256(files["model.safetensors"])},
    )


def test_memory_budget_refuses_before_downloading_weights(hub: HubServer, files: dict[str, bytes]) -> None:
    data = files["model.safetensors"]
    tensor_bytes = len(data) - 8 - struct.unpack("<Q", data[:8])[0]
    with pytest.raises(UsageError) as err:
        resolve_model(REPO, memory_budget_bytes=1000)
    assert f"weights need {tensor_bytes / 1024:.1f} KiB, the selected devices have 1000 B" in err.value.line()
    assert "--force" in err.value.line()
    assert ("GET", f"/{REPO}/resolve/{main_sha(hub)}/model.safetensors") in hub.requests  # the header, ranged
    assert hub.downloads() == []
    resolve_model(REPO, memory_budget_bytes=1000, force=True)
    assert "model.safetensors" in hub.downloads()
    resolve_model(REPO, memory_budget_bytes=1 << 30)


def test_estimate_weight_bytes(hub: HubServer, files: dict[str, bytes]) -> None:
    data = files["model.safetensors"]
    header_len = struct.unpack("<Q", data[:8])[0]
    assert estimate_weight_bytes(REPO, None, None) == len(data) - 8 - header_len
    hub.create_repo("org/old", {k: v for k, v in files.items() if not k.endswith(".safetensors")})
    assert estimate_weight_bytes("org/old", None, None) is None


def test_offline_uses_the_cached_snapshot(hub: HubServer, monkeypatch: pytest.MonkeyPatch) -> None:
    online = resolve_model(REPO)
    hub.received.clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    offline = resolve_model(REPO)
    assert hub.requests == []
    assert (offline.local_dir, offline.commit_sha, offline.weight_files) == (
        online.local_dir,
        online.commit_sha,
        online.weight_files,
    )
    assert resolve_model(REPO, revision=online.commit_sha).commit_sha == online.commit_sha
    assert any("HF_HUB_OFFLINE" in note for note in offline.notes)


def test_offline_without_a_cached_snapshot(hub: HubServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UsageError) as err:
        resolve_model(REPO, revision="v2")
    assert err.value.line() == (
        "offline and no cached snapshot of org/tiny@v2; run once online or unset HF_HUB_OFFLINE"
    )
    assert hub.requests == []


def test_local_directory(tmp_path: Path, files: dict[str, bytes]) -> None:
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    for name in ("config.json", "model.safetensors", "pytorch_model.bin"):
        (model_dir / name).write_bytes(files[name])
    model = resolve_model(str(model_dir))
    assert (model.source, model.repo_id, model.commit_sha) == ("local", None, None)
    assert model.weight_files == (
        WeightFile("model.safetensors", sha256(files["model.safetensors"]), 161496),
    )
    with pytest.raises(UsageError, match="no such directory"):
        resolve_model(str(tmp_path / "missing" / "dir" / "x"))
    with pytest.raises(UsageError, match="no model weights"):
        resolve_model(str(tmp_path))
    assert is_repo_id("org/name") and is_repo_id("meta-llama/Llama-3.1-8B")
    assert not is_repo_id("name") and not is_repo_id("a/b/c") and not is_repo_id("../x")
    assert not is_repo_id(str(model_dir))  # an existing path is a path


SECRET = "hf_DISTINCTIVEsecret9f8e7d6c5b4a"


@pytest.mark.parametrize(
    ("case", "error", "expected"),
    [
        ("missing repo", UsageError, "no model repo org/missing on http://127.0.0.1"),
        ("missing revision", UsageError, "revision 'nope' not found in org/tiny"),
        ("gated", UsageError, "org/gated is gated and this token has no access; request access on http://"),
        ("private without token", UsageError, "no model repo org/private"),
        ("bad token", UsageError, "the Hub refused the token (HTTP 401); the token is invalid or missing"),
        ("hub down", RuntimeFailure, "the Hub at http://127.0.0.1:"),
        ("no hub", RuntimeFailure, "the Hub at http://127.0.0.1:9 is unreachable; check the network or set"),
    ],
)
def test_hub_errors_map_to_typed_errors(
    hub: HubServer, monkeypatch: pytest.MonkeyPatch, case: str, error: type[MaxactError], expected: str
) -> None:
    weights = {"config.json": b"{}", "model.safetensors": safetensors_bytes(2)}
    hub.create_repo("org/gated", weights, gated=True)
    hub.create_repo("org/private", weights, private=True)
    hub.add_token(SECRET, "mallory", write=True)
    repo, revision, token = {
        "missing repo": ("org/missing", None, SECRET),
        "missing revision": (REPO, "nope", SECRET),
        "gated": ("org/gated", None, SECRET),
        "private without token": ("org/private", None, None),
        "bad token": (REPO, None, SECRET + "x"),
        "hub down": (REPO, None, SECRET),
        "no hub": (REPO, None, SECRET),
    }[case]
    if case == "hub down":
        hub.fail_status = 503
    if case == "no hub":
        monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(error) as err:
        resolve_model(repo, revision=revision, token=token)
    assert expected in err.value.line()
    assert SECRET not in error_text(err.value)


def test_read_repo_file_and_weight_state(hub: HubServer, files: dict[str, bytes]) -> None:
    assert read_repo_file(REPO, "README.md", None, None) == files["README.md"]
    assert read_repo_file(REPO, "nothing.txt", None, None) is None
    sha, weights = repo_weight_state(REPO, None, None)
    assert sha == main_sha(hub) and weights == {"model.safetensors": sha256(files["model.safetensors"])}


# ---- publish ---------------------------------------------------------------------------------


def card_builder(seen: list[str | None], section: str = "## Maximum activations\n\nmax 12.5\n"):  # type: ignore[no-untyped-def]
    def build(old: str | None) -> str:  # replaces its own section, as the real card builder does
        seen.append(old)
        return (old or "").split("\n## Maximum activations")[0] + "\n" + section

    return build


def publish_card(hub: HubServer, seen: list[str | None] | None = None, **kw):  # type: ignore[no-untyped-def]
    args = {
        "build_card": card_builder([] if seen is None else seen),
        "files": {"maxact/results.json": b'{"max": 12.5}', "maxact/profile.svg": b"<svg/>"},
        "title": TITLE,
        "description": "Maximum activations measured by maxact-card.",
        "token": WRITE,
    }
    return publish(REPO, **{**args, **kw})


def test_publish_opens_a_pull_request(hub: HubServer, files: dict[str, bytes]) -> None:
    main_before = main_sha(hub)
    seen: list[str | None] = []
    outcome = publish_card(hub, seen)
    assert (outcome.action, outcome.pr_num, outcome.url) == ("opened", 1, f"{hub.url}/{REPO}/discussions/1")
    assert outcome.files == ("README.md", "maxact/results.json", "maxact/profile.svg")
    assert seen == [files["README.md"].decode()]
    state = hub.repo_state(REPO)
    pr = state["pull_requests"][1]
    assert (pr["title"], pr["base"], pr["author"]) == (TITLE, "main", "alice")
    assert pr["description"] == "Maximum activations measured by maxact-card."
    assert hub.read(REPO, "maxact/results.json", "refs/pr/1") == b'{"max": 12.5}'
    assert (hub.read(REPO, "README.md", "refs/pr/1") or b"").endswith(b"max 12.5\n")
    assert state["branches"]["main"] == main_before and hub.read(REPO, "maxact/results.json") is None
    commits = [r for r in hub.received if r.method == "POST" and "/commit/" in r.path]
    assert len(commits) == 1  # README.md and the files in one commit


def test_publish_again_updates_the_open_pull_request(hub: HubServer) -> None:
    publish_card(hub)
    seen: list[str | None] = []
    outcome = publish_card(
        hub,
        seen,
        files={"maxact/results.json": b'{"max": 13.0}'},
        build_card=card_builder(seen, "## Maximum activations\n\nmax 13.0\n"),
    )
    assert (outcome.action, outcome.pr_num, outcome.url) == ("updated", 1, f"{hub.url}/{REPO}/discussions/1")
    assert seen[0] is not None and seen[0].endswith("max 12.5\n")  # built from the README in the PR
    state = hub.repo_state(REPO)
    assert list(state["pull_requests"]) == [1]
    assert hub.read(REPO, "maxact/results.json", "refs/pr/1") == b'{"max": 13.0}'
    assert hub.read(REPO, "maxact/results.json") is None


def test_identical_publish_changes_nothing(hub: HubServer) -> None:
    publish_card(hub)
    before = hub.repo_state(REPO)
    seen: list[str | None] = []

    def same_card(old: str | None) -> str:
        seen.append(old)
        return old or ""

    outcome = publish_card(hub, build_card=same_card)
    assert (outcome.action, outcome.pr_num) == ("unchanged", 1)
    assert seen[0] is not None and seen[0].endswith("max 12.5\n")  # read from the PR, not from main
    assert hub.repo_state(REPO) == before


def test_dry_run_writes_nothing_and_returns_the_diff(hub: HubServer) -> None:
    before = hub.repo_state(REPO)
    outcome = publish_card(hub, dry_run=True)
    assert outcome.action == "dry-run" and outcome.pr_num is None
    assert outcome.card_diff.startswith("--- a/README.md\n+++ b/README.md\n")
    assert "+## Maximum activations\n" in outcome.card_diff
    assert outcome.files == ("README.md", "maxact/results.json", "maxact/profile.svg")
    assert hub.repo_state(REPO) == before
    # nothing but reads, and the Hub's check of the card's metadata (it writes nothing either)
    assert {r.path for r in hub.received if r.method not in ("GET", "HEAD")} == {"/api/validate-yaml"}
    assert publish_card(hub, dry_run=True, token=None).action == "dry-run"  # no token needed to look


def test_direct_commit_to_main(hub: HubServer) -> None:
    outcome = publish_card(hub, direct=True)
    state = hub.repo_state(REPO)
    assert outcome.action == "committed" and outcome.pr_num is None
    assert outcome.url == f"{hub.url}/{REPO}/commit/{state['branches']['main']}"
    assert state["pull_requests"] == {}
    assert hub.read(REPO, "maxact/profile.svg") == b"<svg/>"
    assert publish_card(hub, direct=True).action == "unchanged"


def test_other_accounts_closed_prs_and_other_branches_are_left_alone(hub: HubServer) -> None:
    hub.add_token("hf_carol", "carol", write=True)
    assert publish_card(hub, token="hf_carol").pr_num == 1
    assert (publish_card(hub).action, publish_card(hub).action) == ("opened", "unchanged")
    assert hub.repo_state(REPO)["pull_requests"][2]["author"] == "alice"
    hub.repos[REPO].discussions[2].status = "closed"
    assert (publish_card(hub).action, publish_card(hub).pr_num) == ("opened", 3)
    hub.commit(REPO, revision="dev")
    outcome = publish_card(hub, revision="dev")
    assert (outcome.action, outcome.pr_num, hub.repo_state(REPO)["pull_requests"][4]["base"]) == (
        "opened",
        4,
        "dev",
    )


def test_publish_refusals(hub: HubServer) -> None:
    before = hub.repo_state(REPO)
    with pytest.raises(UsageError) as err:
        publish_card(hub, token=READ)
    assert err.value.line().startswith("the token has no write access to org/tiny; create a token with write")
    with pytest.raises(UsageError, match="needs a Hub token"):
        publish_card(hub, token=None)
    with pytest.raises(ValueError, match="maxact-card"):
        publish_card(hub, title="Add maximum activations")
    assert hub.repo_state(REPO) == before


def test_the_token_never_leaves_the_authorization_header(
    hub: HubServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub.add_token(SECRET, "mallory", write=True)
    hub.create_repo(
        "org/gated", {"config.json": b"{}", "model.safetensors": safetensors_bytes(2)}, gated=True
    )
    monkeypatch.setenv("HF_TOKEN", SECRET)  # the way most users pass it
    texts: list[str] = []
    publish_card(hub, token=None)
    publish_card(hub, token=None, files={"maxact/results.json": b"{}"})
    resolve_model(REPO)
    for call in (
        lambda: resolve_model("org/gated"),
        lambda: resolve_model("org/missing"),
        lambda: resolve_model(REPO, revision="nope"),
        lambda: resolve_model(REPO, memory_budget_bytes=1),
        lambda: publish_card(hub, token=SECRET + "x"),
        lambda: publish_card(hub, token=READ),
    ):
        with pytest.raises(MaxactError) as err:
            call()
        texts.append(error_text(err.value))
    hub.add_token(READ, "bob", write=False)
    details = HfApi(endpoint=hub.url, token=SECRET).get_discussion_details(REPO, 1)
    texts.extend(e.content for e in details.events if isinstance(e, DiscussionComment))
    texts.extend(
        r.body.decode(errors="replace") + json.dumps(r.headers) + r.path + r.query for r in hub.received
    )
    assert len(hub.received) > 20
    assert not [t for t in texts if SECRET in t]
