"""`maxact-card publish` through the CLI runner, against the local Hub server."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from maxact_card.card.chart import render_chart
from maxact_card.card.front_matter import END_MARKER, START_MARKER
from maxact_card.cli import app
from maxact_card.measure.results import dumps, validate_results
from tests import paths
from tests.hub_server import HubServer, tiny_llama_files

REPO = "org/tiny"
WRITE = "hf_write_token_for_publish_tests"
READ = "hf_read_token_for_publish_tests"
SECRET = "hf_SeCrEt_7d1e0c4b9a_never_print_me"
EXAMPLE = paths.TESTS / "data" / "results_example.json"
FILES = ("README.md", "maxact/results.json", "maxact/profile.svg")


@pytest.fixture
def files(tmp_path: Path) -> dict[str, bytes]:
    return tiny_llama_files(tmp_path)


@pytest.fixture
def hub(hub_server: HubServer, files: dict[str, bytes]) -> HubServer:
    hub_server.create_repo(REPO, files)
    hub_server.add_token(WRITE, "alice", write=True)
    hub_server.add_token(READ, "bob", write=False)
    hub_server.add_token(SECRET, "carol", write=True)
    return hub_server


def make_results(hub: HubServer, files: dict[str, bytes], **run: Any) -> dict[str, Any]:
    """The example results, measured (so they say) on the repo's weights at main."""
    results = json.loads(EXAMPLE.read_text())
    weights = files["model.safetensors"]
    results["model"]["id"] = REPO
    results["model"]["commit_sha"] = hub.repo_state(REPO)["branches"]["main"]
    results["model"]["weight_files"] = [
        {"path": "model.safetensors", "sha256": hashlib.sha256(weights).hexdigest(), "size": len(weights)}
    ]
    results["run"].update(run)
    validate_results(results)
    return results


def write(tmp_path: Path, results: dict[str, Any], name: str = "results.json") -> Path:
    path = tmp_path / name
    path.write_text(dumps(results))
    return path


def cli(*args: str) -> Result:
    return CliRunner().invoke(app, ["publish", *args])


def publish(results: Path, *args: str, token: str = WRITE) -> Result:
    return cli(REPO, "--results", str(results), "--token", token, *args)


def test_publish_opens_a_pull_request(hub: HubServer, files: dict[str, bytes], tmp_path: Path) -> None:
    results = make_results(hub, files)
    main_before = hub.repo_state(REPO)["branches"]["main"]
    result = publish(write(tmp_path, results))
    assert result.exit_code == 0, result.stderr
    url = f"{hub.url}/{REPO}/discussions/1"
    assert f"opened pull request #1: {url}" in result.stdout
    assert "files: README.md, maxact/results.json, maxact/profile.svg" in result.stdout
    state = hub.repo_state(REPO)
    assert state["branches"]["main"] == main_before
    assert list(state["pull_requests"]) == [1]
    pr = state["pull_requests"][1]
    assert pr["title"] == "[maxact-card] Maximum activations: 36,012 at blocks.3.hook_resid_post"
    assert (pr["status"], pr["base"], pr["author"]) == ("open", "main", "alice")
    card = hub.read(REPO, "README.md", "refs/pr/1")
    assert card is not None
    text = card.decode()
    assert text.startswith(files["README.md"].decode()[:40]) and "A tiny random Llama for tests." in text
    assert START_MARKER in text and END_MARKER in text
    assert hub.read(REPO, "maxact/results.json", "refs/pr/1") == dumps(results).encode()
    assert hub.read(REPO, "maxact/profile.svg", "refs/pr/1") == render_chart(results).encode()
    description = pr["description"]
    for expected in (
        "36,012",
        "`blocks.3.hook_resid_post`",
        "`maxact-builtin-v1`",
        "256 samples, 183,424 tokens",
        "bfloat16 on NVIDIA H100 80GB HBM3",
        "torch 2.11.0",
        f"maxact-card measure {REPO} --revision {main_before} --corpus builtin --samples 256",
        f"maxact-card publish {REPO} --results maxact/results.json",
    ):
        assert expected in description, expected
    assert "Quantization verdicts" not in description  # no --quant in the example


def test_description_shows_quant_verdicts(hub: HubServer, files: dict[str, bytes], tmp_path: Path) -> None:
    from tests.card.test_card import QUANT

    results = make_results(hub, files)
    results["quant"] = copy.deepcopy(QUANT)
    result = publish(write(tmp_path, results))
    assert result.exit_code == 0, result.stderr
    description = hub.repo_state(REPO)["pull_requests"][1]["description"]
    assert "## Quantization verdicts" in description
    assert "| `int8-static-maxabs` | **FAIL** | 18.5 dB |" in description
    assert "Recommended: `fp8-e4m3-static`." in description
    assert "--quant --min-sqnr 20 --out" in description  # default split and clip: not repeated


def test_reproduce_command_carries_a_non_default_split_and_clip(
    hub: HubServer, files: dict[str, bytes], tmp_path: Path
) -> None:
    from tests.card.test_card import QUANT

    results = make_results(hub, files)
    results["quant"] = copy.deepcopy(QUANT)
    results["quant"]["eval_fraction"] = 0.25
    results["quant"]["clip_quantile"] = 0.9999
    result = publish(write(tmp_path, results))
    assert result.exit_code == 0, result.stderr
    description = hub.repo_state(REPO)["pull_requests"][1]["description"]
    assert "--quant --min-sqnr 20 --eval-fraction 0.25 --clip-quantile 0.9999 --out" in description


def test_second_publish_updates_the_open_pull_request(
    hub: HubServer, files: dict[str, bytes], tmp_path: Path
) -> None:
    assert publish(write(tmp_path, make_results(hub, files))).exit_code == 0
    changed = make_results(hub, files, tokens=200_000)
    result = publish(write(tmp_path, changed, "changed.json"))
    assert result.exit_code == 0, result.stderr
    assert f"updated pull request #1: {hub.url}/{REPO}/discussions/1" in result.stdout
    state = hub.repo_state(REPO)
    assert list(state["pull_requests"]) == [1] and state["discussions"] == 1
    assert hub.read(REPO, "maxact/results.json", "refs/pr/1") == dumps(changed).encode()
    assert "200,000" in hub.read(REPO, "README.md", "refs/pr/1").decode()  # type: ignore[union-attr]


def test_identical_publish_is_unchanged(hub: HubServer, files: dict[str, bytes], tmp_path: Path) -> None:
    path = write(tmp_path, make_results(hub, files))
    assert publish(path).exit_code == 0
    before = hub.repo_state(REPO)
    result = publish(path)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith("unchanged: pull request #1")
    assert "nothing written" in result.stdout
    assert hub.repo_state(REPO) == before


def test_dry_run_prints_the_diff_and_writes_nothing(
    hub: HubServer, files: dict[str, bytes], tmp_path: Path
) -> None:
    before = hub.repo_state(REPO)
    result = publish(write(tmp_path, make_results(hub, files)), "--dry-run")
    assert result.exit_code == 0, result.stderr
    assert hub.repo_state(REPO) == before
    assert "--- a/README.md\n+++ b/README.md\n" in result.stdout
    assert f"+{START_MARKER}" in result.stdout
    assert "dry run: nothing written" in result.stdout
    assert "files: README.md, maxact/results.json, maxact/profile.svg" in result.stdout


def test_dry_run_json_carries_the_diff(hub: HubServer, files: dict[str, bytes], tmp_path: Path) -> None:
    before = hub.repo_state(REPO)
    result = publish(write(tmp_path, make_results(hub, files)), "--dry-run", "--format", "json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert (doc["action"], doc["pr_num"], doc["files"]) == ("dry-run", None, list(FILES))
    assert START_MARKER in doc["card_diff"]
    assert hub.repo_state(REPO) == before


def test_json_output(hub: HubServer, files: dict[str, bytes], tmp_path: Path) -> None:
    result = publish(write(tmp_path, make_results(hub, files)), "--format", "json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout) == {
        "action": "opened",
        "url": f"{hub.url}/{REPO}/discussions/1",
        "pr_num": 1,
        "files": list(FILES),
    }


def test_direct_commits_to_main(hub: HubServer, files: dict[str, bytes], tmp_path: Path) -> None:
    results = make_results(hub, files)
    main_before = hub.repo_state(REPO)["branches"]["main"]
    result = publish(write(tmp_path, results), "--direct")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith(f"committed to {REPO}@main: ")
    state = hub.repo_state(REPO)
    assert state["branches"]["main"] != main_before and state["pull_requests"] == {}
    assert hub.read(REPO, "maxact/results.json") == dumps(results).encode()
    assert START_MARKER in hub.read(REPO, "README.md").decode()  # type: ignore[union-attr]


def test_stale_results_are_refused(hub: HubServer, files: dict[str, bytes], tmp_path: Path) -> None:
    results = make_results(hub, files)
    results["model"]["weight_files"][0]["sha256"] = "0" * 64
    path = write(tmp_path, results)
    before = hub.repo_state(REPO)
    result = publish(path)
    assert result.exit_code == 2
    assert result.stdout == ""
    line = result.stderr.strip()
    assert line.startswith("error: the results were measured on other weights than org/tiny@main")
    assert "model.safetensors differs" in line and "--allow-stale" in line and "re-measure" in line
    assert "\n" not in line
    assert hub.repo_state(REPO) == before

    allowed = publish(path, "--allow-stale")
    assert allowed.exit_code == 0, allowed.stderr
    assert "opened pull request #1" in allowed.stdout
    assert "publishing anyway (--allow-stale)" in allowed.stderr


def test_stale_when_a_file_is_missing(hub: HubServer, files: dict[str, bytes], tmp_path: Path) -> None:
    results = make_results(hub, files)
    results["model"]["weight_files"][0]["path"] = "model-00001-of-00002.safetensors"
    result = publish(write(tmp_path, results))
    assert result.exit_code == 2
    assert "model-00001-of-00002.safetensors was measured but is not among the weights there" in result.stderr


def test_results_from_a_local_folder_are_compared_by_sha256(
    hub: HubServer, files: dict[str, bytes], tmp_path: Path
) -> None:
    results = make_results(hub, files)
    results["model"].update(source="local", id="/models/tiny", commit_sha=None, revision=None)
    validate_results(results)
    main_sha = hub.repo_state(REPO)["branches"]["main"]
    result = publish(write(tmp_path, results))
    assert result.exit_code == 0, result.stderr
    description = hub.repo_state(REPO)["pull_requests"][1]["description"]
    assert f"maxact-card measure {REPO} --revision {main_sha}" in description
    assert "measured from a local folder" in description

    results["model"]["weight_files"][0]["sha256"] = "f" * 64
    stale = publish(write(tmp_path, results, "stale.json"))
    assert stale.exit_code == 2 and "model.safetensors differs" in stale.stderr


def test_stale_check_reads_the_target_revision(
    hub: HubServer, files: dict[str, bytes], tmp_path: Path
) -> None:
    hub.commit(REPO, {"model.safetensors": b"retrained" + files["model.safetensors"]}, revision="v2")
    path = write(tmp_path, make_results(hub, files))
    result = publish(path, "--revision", "v2")
    assert result.exit_code == 2 and "org/tiny@v2" in result.stderr
    assert publish(path, "--revision", "main", "--dry-run").exit_code == 0


def test_token_without_write_access(hub: HubServer, files: dict[str, bytes], tmp_path: Path) -> None:
    before = hub.repo_state(REPO)
    result = publish(write(tmp_path, make_results(hub, files)), token=READ)
    assert result.exit_code == 2
    assert "write" in result.stderr and "--token" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert hub.repo_state(REPO) == before


def test_no_token_is_refused(hub: HubServer, files: dict[str, bytes], tmp_path: Path) -> None:
    result = cli(REPO, "--results", str(write(tmp_path, make_results(hub, files))))
    assert result.exit_code == 2 and "token" in result.stderr


def test_the_token_never_appears(
    hub: HubServer, files: dict[str, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[str] = []
    path = write(tmp_path, make_results(hub, files))
    for args in ((), ("--format", "json"), ("--dry-run",), ()):
        result = publish(path, *args, token=SECRET)
        assert result.exit_code == 0, result.stderr
        seen += [result.stdout, result.stderr]
    stale = make_results(hub, files)
    stale["model"]["weight_files"][0]["sha256"] = "1" * 64
    seen += [(r := publish(write(tmp_path, stale, "stale.json"), token=SECRET)).stdout, r.stderr]
    assert r.exit_code == 2
    hub.tokens[SECRET] = ("carol", False)  # the same token, now read-only: the error must not quote it
    seen += [
        (r := publish(write(tmp_path, make_results(hub, files, tokens=1), "b.json"), token=SECRET)).stdout,
        r.stderr,
    ]
    assert r.exit_code == 2
    monkeypatch.setenv("HF_TOKEN", SECRET)  # and from the environment
    seen += [(r := cli(REPO, "--results", str(path), "--dry-run")).stdout, r.stderr]
    assert r.exit_code == 0
    state = hub.repo_state(REPO)
    seen += [pr["description"] + pr["title"] for pr in state["pull_requests"].values()]
    seen += [(hub.read(REPO, f, "refs/pr/1") or b"").decode() for f in FILES]
    assert state["pull_requests"]
    assert all(SECRET not in text for text in seen)


def test_bad_input(hub: HubServer, files: dict[str, bytes], tmp_path: Path) -> None:
    path = write(tmp_path, make_results(hub, files))
    assert cli("not a repo", "--results", str(path), "--token", WRITE).exit_code == 2
    missing = cli(REPO, "--results", str(tmp_path / "nope.json"), "--token", WRITE)
    assert missing.exit_code == 2 and "does not exist" in missing.stderr
    markdown = publish(path, "--format", "markdown")
    assert markdown.exit_code == 2 and "text or json" in markdown.stderr
    unknown = cli("org/absent", "--results", str(path), "--token", WRITE)
    assert unknown.exit_code == 2 and "org/absent" in unknown.stderr


def test_an_updated_pull_request_gets_the_new_title_and_description(
    hub: HubServer, files: dict[str, bytes], tmp_path: Path
) -> None:
    """New numbers: the PR's title and opening description say them too, not only its files."""
    assert publish(write(tmp_path, make_results(hub, files))).exit_code == 0
    first = hub.repo_state(REPO)["pull_requests"][1]["description"]
    changed = make_results(hub, files)
    from tests.gate.test_gate import scaled_peak

    changed = scaled_peak(changed, 45_000.0)
    validate_results(changed)
    result = publish(write(tmp_path, changed, "changed.json"))
    assert result.exit_code == 0, result.stderr
    pr = hub.repo_state(REPO)["pull_requests"][1]
    assert pr["title"] == "[maxact-card] Maximum activations: 45,000 at blocks.3.hook_resid_post"
    assert "**45,000**" in pr["description"] and "**36,012**" in first and pr["description"] != first
    from huggingface_hub import HfApi  # the client reads it back the same way

    seen = HfApi(endpoint=hub.url, token=WRITE).get_discussion_details(REPO, 1)
    assert seen.title == pr["title"] and seen.events[0].content == pr["description"]


def test_a_dry_run_without_a_token_says_it_cannot_see_open_pull_requests(
    hub: HubServer, files: dict[str, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no cached login
    path = write(tmp_path, make_results(hub, files))
    assert publish(path).exit_code == 0  # a PR is open now, which only its author's token can find
    result = cli(REPO, "--results", str(path), "--dry-run")
    assert result.exit_code == 0, result.stderr
    assert "without a token the open pull requests of org/tiny cannot be seen" in result.stdout
    assert "would open a pull request" not in result.stdout


def test_publishing_to_a_tag_is_refused_before_anything_is_sent(
    hub: HubServer, files: dict[str, bytes], tmp_path: Path
) -> None:
    hub.create_tag(REPO, "v1.0")
    before = hub.repo_state(REPO)
    result = publish(write(tmp_path, make_results(hub, files)), "--revision", "v1.0")
    assert result.exit_code == 2
    assert "'v1.0' in org/tiny is a tag; a pull request can only target a branch" in result.stderr
    assert hub.repo_state(REPO) == before


@pytest.mark.parametrize(("front_matter", "says"), [
    ("license: [mit, apache-2.0]", '"license" must be a string'),
    ("model-index: {name: x}", '"model-index" must be an array'),
])
def test_a_card_the_hub_rejects_is_one_line_with_the_hubs_reason(
    hub: HubServer, files: dict[str, bytes], tmp_path: Path, front_matter: str, says: str
) -> None:
    hub.commit(REPO, {"README.md": f"---\n{front_matter}\n---\n# Tiny\n".encode()})
    before = hub.repo_state(REPO)
    result = publish(write(tmp_path, make_results(hub, files)))
    assert result.exit_code == 2, result.stdout + result.stderr
    assert result.stderr.startswith(f"error: the Hub rejects the metadata of README.md in {REPO}@main: {says}")
    assert len(result.stderr.splitlines()) == 1 and hub.repo_state(REPO) == before


def test_the_description_reproduces_the_sites_measured_and_lists_the_exports(
    hub: HubServer, files: dict[str, bytes], tmp_path: Path
) -> None:
    """A run with the Linear inputs and the KV cache is reproduced with --gemm-inputs --kv-cache, and
    the exports published with it are listed and named in the publish command."""
    results = make_results(hub, files)
    results["run"]["gemm_inputs"] = results["run"]["kv_cache"] = True
    result = publish(write(tmp_path, results), "--exports", "outliers")
    assert result.exit_code == 0, result.stderr
    description = hub.repo_state(REPO)["pull_requests"][1]["description"]
    measure_line = next(line for line in description.splitlines() if line.startswith("maxact-card measure"))
    assert measure_line.endswith("--gemm-inputs --kv-cache --out maxact/results.json")
    assert "## Exports" in description and "- `outliers`: `maxact/maxact-outliers.json`" in description
    assert f"maxact-card publish {REPO} --results maxact/results.json --exports outliers" in description
    assert hub.read(REPO, "maxact/maxact-outliers.json", "refs/pr/1") is not None
    plain = make_results(hub, files)
    assert publish(write(tmp_path, plain, "plain.json")).exit_code == 0
    description = hub.repo_state(REPO)["pull_requests"][1]["description"]
    assert "--gemm-inputs" not in description and "--kv-cache" not in description and "## Exports" not in description
