"""The real huggingface_hub client against tests/hub_server.py: what it sends, the server answers."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    DiscussionComment,
    DiscussionCommit,
    HfApi,
    RepoFile,
    get_hf_file_metadata,
    hf_hub_download,
    hf_hub_url,
    snapshot_download,
)
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from tests.hub_server import HubServer, tiny_llama_files

REPO = "org/tiny"
WRITE, READ = "hf_write_token_for_tests", "hf_read_token_for_tests"


@pytest.fixture
def hub(
    hub_server: HubServer,
    tmp_path: Path,
) -> HubServer:
    hub_server.create_repo(REPO, tiny_llama_files(tmp_path))
    hub_server.add_token(WRITE, "alice", write=True)
    hub_server.add_token(READ, "bob", write=False)
    return hub_server


def test_snapshot_download_gets_every_file_at_the_commit(hub: HubServer, tmp_path: Path) -> None:
    files = tiny_llama_files(tmp_path)
    folder = Path(snapshot_download(REPO, cache_dir=tmp_path / "cache", endpoint=hub.url))
    got = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert got == files
    assert folder.name == hub.repo_state(REPO)["branches"]["main"]
    assert sorted(hub.downloads(REPO)) == sorted(files)


def test_snapshot_download_allow_patterns_fetch_only_matches(hub: HubServer, tmp_path: Path) -> None:
    snapshot_download(
        REPO, cache_dir=tmp_path, endpoint=hub.url, allow_patterns=["*.json", "model.safetensors"]
    )
    assert sorted(hub.downloads()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]


def test_head_gives_commit_etag_and_size(hub: HubServer, tmp_path: Path) -> None:
    data = tiny_llama_files(tmp_path)["model.safetensors"]
    meta = get_hf_file_metadata(hf_hub_url(REPO, "model.safetensors", endpoint=hub.url))
    assert meta.commit_hash == hub.repo_state(REPO)["branches"]["main"]
    assert meta.etag == hashlib.sha256(data).hexdigest()  # LFS: the etag is the sha256 of the content
    assert meta.size == len(data)
    path = hf_hub_download(REPO, "config.json", cache_dir=tmp_path, endpoint=hub.url)
    assert Path(path).read_bytes() == hub.read(REPO, "config.json")


def test_range_request_answers_206(hub: HubServer) -> None:
    request = urllib.request.Request(
        f"{hub.url}/{REPO}/resolve/main/model.safetensors", headers={"Range": "bytes=0-7"}
    )
    with urllib.request.urlopen(request) as response:
        assert response.status == 206
        assert response.headers["Content-Range"].startswith("bytes 0-7/")
        assert response.read() == (hub.read(REPO, "model.safetensors") or b"")[:8]


def test_tree_listing_has_lfs_sha256_for_weights(hub: HubServer, tmp_path: Path) -> None:
    files = tiny_llama_files(tmp_path)
    api = HfApi(endpoint=hub.url)
    tree = {f.path: f.lfs for f in api.list_repo_tree(REPO, recursive=True) if isinstance(f, RepoFile)}
    for name in ("model.safetensors", "pytorch_model.bin", "tiny-llama-Q8_0.gguf"):
        lfs = tree[name]
        assert lfs is not None and lfs.sha256 == hashlib.sha256(files[name]).hexdigest()
    assert tree["config.json"] is None
    top = {f.path for f in api.list_repo_tree(REPO)}
    assert "assets" in top and "assets/banner.png" not in top
    info = api.model_info(REPO, files_metadata=True)
    sibling = next(s for s in info.siblings or [] if s.rfilename == "model.safetensors")
    assert sibling.lfs == tree["model.safetensors"]
    assert info.card_data is not None and info.card_data.license == "apache-2.0"
    assert [p.path for p in api.get_paths_info(REPO, ["config.json", "missing.txt"])] == ["config.json"]


def test_safetensors_metadata_single_file(hub: HubServer) -> None:
    meta = HfApi(endpoint=hub.url).get_safetensors_metadata(REPO)
    assert not meta.sharded
    tensors = meta.files_metadata["model.safetensors"].tensors
    assert tensors["model.embed_tokens.weight"].shape[1] == 32
    assert ("GET", f"/{REPO}/resolve/main/model.safetensors") in hub.requests
    assert hub.downloads() == []  # range reads only


def test_safetensors_metadata_sharded(
    hub_server: HubServer,
    tmp_path: Path,
) -> None:
    import torch
    from safetensors.torch import save

    shards = {
        "model-00001-of-00002.safetensors": save({"a": torch.zeros(2, 3)}),
        "model-00002-of-00002.safetensors": save({"b": torch.zeros(4, dtype=torch.float16)}),
    }
    index = {
        "metadata": {},
        "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"},
    }
    hub_server.create_repo(
        "org/sharded", {**shards, "model.safetensors.index.json": json.dumps(index).encode()}
    )
    # get_safetensors_metadata downloads the index into the cache fixed at import time, so run it where
    # HF_HOME is set before huggingface_hub is imported.
    script = (
        "from huggingface_hub import get_safetensors_metadata as g; m = g('org/sharded'); "
        "print(m.sharded, sorted(m.files_metadata), sorted(m.parameter_count.items()))"
    )
    env = {**os.environ, "HF_ENDPOINT": hub_server.url, "HF_HOME": str(tmp_path / "home")}
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == f"True {sorted(shards)} [('F16', 4), ('F32', 6)]"


def test_create_commit_directly_on_main(hub: HubServer) -> None:
    api = HfApi(endpoint=hub.url, token=WRITE)
    info = api.create_commit(
        REPO,
        [CommitOperationAdd("maxact/results.json", b"{}"), CommitOperationDelete("model.onnx")],
        commit_message="add results",
    )
    state = hub.repo_state(REPO)
    assert info.oid == state["branches"]["main"] and info.pr_url is None
    assert hub.read(REPO, "maxact/results.json") == b"{}" and hub.read(REPO, "model.onnx") is None
    assert state["pull_requests"] == {}


def test_create_pr_then_update_it_through_its_ref(hub: HubServer, tmp_path: Path) -> None:
    api = HfApi(endpoint=hub.url, token=WRITE)
    main_before = hub.repo_state(REPO)["branches"]["main"]
    info = api.create_commit(
        REPO,
        [CommitOperationAdd("README.md", b"# new card\n")],
        commit_message="[maxact-card] add card",
        commit_description="the description",
        create_pr=True,
    )
    assert info.pr_num == 1 and info.pr_revision == "refs/pr/1"
    assert info.pr_url == f"{hub.url}/{REPO}/discussions/1"
    pr = hub.repo_state(REPO)["pull_requests"][1]
    assert pr["ref"] == info.oid and pr["base"] == "main" and pr["description"] == "the description"

    second = api.create_commit(
        REPO,
        [CommitOperationAdd("maxact/profile.svg", b"<svg/>")],
        commit_message="update",
        revision="refs/pr/1",
    )
    state = hub.repo_state(REPO)
    assert state["branches"]["main"] == main_before
    assert state["pull_requests"][1]["ref"] == second.oid and len(state["pull_requests"]) == 1
    assert hub.read(REPO, "README.md", "refs/pr/1") == b"# new card\n"
    assert ("POST", f"/api/models/{REPO}/commit/refs%2Fpr%2F1") in hub.requests
    path = hf_hub_download(
        REPO, "maxact/profile.svg", revision="refs/pr/1", cache_dir=tmp_path, endpoint=hub.url
    )
    assert Path(path).read_bytes() == b"<svg/>"

    details = api.get_discussion_details(REPO, 1)
    assert details.is_pull_request and details.target_branch == "refs/heads/main"
    assert details.git_reference == "refs/pr/1" and details.author == "alice"
    comment = details.events[0]
    assert isinstance(comment, DiscussionComment) and comment.content == "the description"
    assert [e.oid for e in details.events if isinstance(e, DiscussionCommit)] == [info.oid, second.oid]
    assert "+# new card" in (details.diff or "")


def test_discussion_listing_filters(hub: HubServer) -> None:
    hub.add_token("hf_carol", "carol", write=True)
    HfApi(endpoint=hub.url, token=WRITE).create_commit(
        REPO, [CommitOperationAdd("a", b"1")], commit_message="A", create_pr=True
    )
    carol = HfApi(endpoint=hub.url, token="hf_carol")
    carol.create_commit(REPO, [CommitOperationAdd("b", b"2")], commit_message="B", create_pr=True)
    carol.create_discussion(REPO, "a question")
    api = HfApi(endpoint=hub.url)

    def titles(**kw: str) -> list[str]:
        return [d.title for d in api.get_repo_discussions(REPO, **kw)]  # type: ignore[arg-type]

    assert titles() == ["a question", "B", "A"]
    assert titles(discussion_type="pull_request") == ["B", "A"]
    assert titles(discussion_type="pull_request", discussion_status="open", author="alice") == ["A"]
    assert titles(discussion_type="discussion") == ["a question"]
    assert titles(discussion_status="closed") == []


def test_whoami(hub: HubServer) -> None:
    assert HfApi(endpoint=hub.url).whoami(token=WRITE)["name"] == "alice"
    with pytest.raises(HfHubHTTPError) as err:
        HfApi(endpoint=hub.url).whoami(token="hf_not_a_token")
    assert err.value.response.status_code == 401


def test_error_codes_map_to_client_exceptions(hub: HubServer, tmp_path: Path) -> None:
    api = HfApi(endpoint=hub.url)
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("org/missing")
    with pytest.raises(RevisionNotFoundError):
        api.model_info(REPO, revision="no-such-branch")
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download(REPO, "nope.txt", cache_dir=tmp_path, endpoint=hub.url)
    with pytest.raises(HfHubHTTPError) as bad_token:
        api.model_info(REPO, token="hf_not_a_token")
    assert bad_token.value.response.status_code == 401
    assert not isinstance(bad_token.value, RepositoryNotFoundError)


def test_private_and_gated_repos(hub: HubServer, tmp_path: Path) -> None:
    hub.create_repo("org/private", {"config.json": b"{}"}, private=True)
    hub.create_repo("org/gated", {"config.json": b"{}"}, gated=True)
    api = HfApi(endpoint=hub.url)
    with pytest.raises(RepositoryNotFoundError) as anonymous:
        api.model_info("org/private")
    assert anonymous.value.response.status_code == 401
    with pytest.raises(RepositoryNotFoundError) as stranger:
        api.model_info("org/private", token=READ)
    assert stranger.value.response.status_code == 404
    hub.grant("org/private", "bob")
    assert api.model_info("org/private", token=READ).private is True

    assert api.model_info("org/gated").gated == "manual"  # metadata is public, files are not
    with pytest.raises(GatedRepoError) as gated:
        hf_hub_download("org/gated", "config.json", cache_dir=tmp_path, endpoint=hub.url, token=READ)
    assert gated.value.response.status_code == 403
    with pytest.raises(GatedRepoError):
        hf_hub_download("org/gated", "config.json", cache_dir=tmp_path, endpoint=hub.url)
    hub.grant("org/gated", "bob")
    assert hf_hub_download("org/gated", "config.json", cache_dir=tmp_path, endpoint=hub.url, token=READ)


def test_writes_need_a_write_token(hub: HubServer) -> None:
    add = [CommitOperationAdd("x.txt", b"x")]
    with pytest.raises(HfHubHTTPError) as read_only:
        HfApi(endpoint=hub.url, token=READ).create_commit(REPO, add, commit_message="x")
    assert read_only.value.response.status_code == 403
    with pytest.raises(HfHubHTTPError) as anonymous:
        HfApi(endpoint=hub.url, token=False).create_commit(REPO, add, commit_message="x")
    assert anonymous.value.response.status_code == 401
    assert hub.repo_state(REPO)["commits"] == [hub.repo_state(REPO)["branches"]["main"]]


def test_invalid_card_yaml_is_refused(hub: HubServer) -> None:
    bad = CommitOperationAdd("README.md", b"---\nlicense: [unclosed\n---\n")
    with pytest.raises(ValueError, match="Invalid metadata"):
        HfApi(endpoint=hub.url, token=WRITE).create_commit(REPO, [bad], commit_message="x")


def test_revisions_by_tag_sha_and_branch(hub: HubServer) -> None:
    first = hub.repo_state(REPO)["branches"]["main"]
    hub.create_tag(REPO, "v1")
    second = hub.commit(REPO, {"config.json": b'{"changed": true}'})
    api = HfApi(endpoint=hub.url)
    assert api.model_info(REPO, revision="v1").sha == first
    assert api.model_info(REPO, revision=first).sha == first
    assert api.model_info(REPO).sha == second
    assert hub.read(REPO, "config.json", first) != hub.read(REPO, "config.json")
