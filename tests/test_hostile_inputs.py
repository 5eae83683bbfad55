"""Bad input is one line and exit 2, before any work: configs of the wrong shape, devices and
numbers out of range, output paths that cannot be written. And results that cannot be written
after a run are kept, with the place they were kept at."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from maxact_card.cli import app
from maxact_card.commands import measure as measure_cmd
from tests import factory
from tests.factory import write_corpus


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hostile-inputs")
    write_corpus(root / "corpus.jsonl")
    return factory.save("llama", root / "llama")


def _invoke(*argv: str | Path) -> Any:
    return CliRunner().invoke(app, [str(a) for a in argv])


def _one_line(res: Any, code: int = 2) -> str:
    assert res.exit_code == code, res.stdout + res.stderr
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "unexpected" not in lines[0], res.stderr
    return lines[0]


def _with_config(llama: Path, tmp_path: Path, edit: Any) -> Path:
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for f in llama.iterdir():
        (ckpt / f.name).write_bytes(f.read_bytes())
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps(edit(config)))
    return ckpt


def _config_null(c: dict[str, Any]) -> None:
    return None


def _heads_zero(c: dict[str, Any]) -> dict[str, Any]:
    return {**c, "num_attention_heads": 0}


def _architectures_int(c: dict[str, Any]) -> dict[str, Any]:
    return {**c, "architectures": [5]}


def _dtype_unknown(c: dict[str, Any]) -> dict[str, Any]:
    return {**c, "dtype": "float99", "torch_dtype": "float99"}


def _layers_text(c: dict[str, Any]) -> dict[str, Any]:
    return {**c, "num_hidden_layers": "two"}


@pytest.mark.parametrize(("edit", "says"), [
    (_config_null, "cannot read the config"),
    (_heads_zero, "ZeroDivisionError"),
    (_architectures_int, "architectures [5]: not a list of class names"),
    (_dtype_unknown, "float99"),
    (_layers_text, "the config of"),
])
def test_a_config_of_the_wrong_shape_is_bad_input(llama: Path, tmp_path: Path, edit: Any, says: str) -> None:
    ckpt = _with_config(llama, tmp_path, edit)
    out = tmp_path / "r.json"
    line = _one_line(_invoke("measure", ckpt, "--corpus", llama.parent / "corpus.jsonl", "--device", "cpu",
                             "--out", out))
    assert says in line and "config" in line
    assert not out.exists()


@pytest.mark.parametrize(("args", "says"), [
    (["--device", "meta"], "--device meta is not supported"),
    (["--device", "mps"], "--device mps is not supported"),
    (["--seed", str(2**70)], "--seed must lie between 0 and 2**63 - 1"),
    (["--seed", "-1"], "--seed must lie between"),
    (["--top-k", "100000000"], "--top-k must lie between 1 and 1024"),
])
def test_options_out_of_range_are_refused_before_loading(llama: Path, args: list[str], says: str) -> None:
    line = _one_line(_invoke("measure", llama, "--corpus", llama.parent / "corpus.jsonl", *args))
    assert says in line


def test_output_paths_that_cannot_be_written_are_refused_before_measuring(
        llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def must_not_run(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("measured before checking the output path")

    monkeypatch.setattr("maxact_card.measure.run.measure_run", must_not_run)
    folder = tmp_path / "folder"
    folder.mkdir()
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    corpus = llama.parent / "corpus.jsonl"
    assert "--out" in _one_line(_invoke("measure", llama, "--corpus", corpus, "--out", folder))
    assert "which is a file" in _one_line(_invoke("measure", llama, "--corpus", corpus, "--out", a_file / "x" / "r.json"))
    assert "--verdict-out" in _one_line(_invoke("check", llama, "--corpus", corpus, "--verdict-out", folder))
    results = tmp_path / "r.json"
    results.write_text("{}")
    assert "--out" in _one_line(_invoke("render", results, "--out", folder))
    assert "--chart-out" in _one_line(_invoke("render", results, "--chart-out", a_file / "c.svg"))


def test_results_that_cannot_be_written_after_a_run_are_kept(
        llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def disk_full(results: dict[str, Any], path: Path, **kwargs: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(measure_cmd, "write_results", disk_full)
    line = _one_line(_invoke("measure", llama, "--corpus", llama.parent / "corpus.jsonl", "--device", "cpu",
                             "--out", tmp_path / "r.json"), code=3)
    assert "No space left on device" in line
    kept = Path(line.split("the results are saved in ")[1].split(";")[0])
    assert json.loads(kept.read_text())["model"]["id"] == str(llama)
    kept.unlink()


def test_a_huge_single_line_sample_is_refused_or_cut_without_tokenizing_it_whole(tmp_path: Path) -> None:
    from maxact_card.corpus.model import Sample
    from maxact_card.corpus.tokenizing import MAX_CHARS_PER_TOKEN, tokenize

    seen: list[int] = []

    class Counting:
        def __call__(self, text: str) -> dict[str, list[int]]:
            seen.append(len(text))
            return {"input_ids": [1] * len(text.split())}

    huge = Sample("big-001", "prose", text="word " * 4_000_000)  # 20 MB on one line
    with pytest.raises(Exception, match=r"sample big-001 is 20,000,000 characters long, far over the limit of 64"):
        tokenize([huge], Counting(), 64)
    assert seen == []  # refused unread
    ids = tokenize([huge], Counting(), 64, truncate=True)
    assert seen == [64 * MAX_CHARS_PER_TOKEN] and len(ids[0]) == 64
    chat = Sample("chat-001", "chat", messages=({"role": "user", "content": "x " * 10_000_000},
                                                {"role": "assistant", "content": "y"}))
    with pytest.raises(Exception, match=r"sample chat-001 is 20,000,001 characters long"):
        tokenize([chat], Counting(), 64)


@pytest.mark.parametrize(("index", "says"), [
    ('{"weight_map": ', "is not a weight index"),
    ("[1, 2]", "is not a weight index"),
    ('{"weight_map": {"a": 5}}', "is not a weight index"),
    ("\udcff", "is not a weight index"),
])
def test_a_malformed_weight_index_is_bad_input(llama: Path, tmp_path: Path, index: str, says: str) -> None:
    ckpt = _with_config(llama, tmp_path, lambda c: c)
    (ckpt / "model.safetensors.index.json").write_bytes(index.encode("utf-8", "surrogateescape"))
    assert says in _one_line(_invoke("measure", ckpt, "--corpus", llama.parent / "corpus.jsonl", "--device", "cpu"))


def test_token_ids_outside_the_vocabulary_are_bad_input(llama: Path, tmp_path: Path) -> None:
    corpus = tmp_path / "ids.jsonl"
    corpus.write_text(json.dumps({"id": "ids-1", "input_ids": [1, 2, 99_999_999]}) + "\n", encoding="utf-8")
    line = _one_line(_invoke("measure", llama, "--corpus", corpus, "--device", "cpu"))
    assert "sample ids-1 holds token id 99999999, outside the model's vocabulary of" in line


@pytest.mark.parametrize("content", [b"[1, 2]", b"\x8a\xff\x00binary", b"null", b'"text"'])
def test_a_state_dir_whose_run_file_is_not_ours_is_bad_input(llama: Path, tmp_path: Path, content: bytes) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "run.json").write_bytes(content)
    line = _one_line(_invoke("measure", llama, "--corpus", llama.parent / "corpus.jsonl", "--device", "cpu",
                             "--state-dir", state, "--resume"))
    assert "run.json is not a maxact-card state file" in line


def test_a_binary_results_file_is_bad_input(tmp_path: Path) -> None:
    blob = tmp_path / "r.json"
    blob.write_bytes(bytes(range(256)) * 8)
    assert "is not UTF-8 text" in _one_line(_invoke("diff", blob, blob))


def test_a_truncated_gguf_is_bad_input(tmp_path: Path) -> None:
    pytest.importorskip("gguf")
    smollm2 = Path(__file__).resolve().parent.parent / ".cache" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not smollm2.is_file():
        pytest.skip("python -m maxact_card.examples fetch-smollm2 .cache/smollm2")
    cut = tmp_path / "cut.gguf"
    with open(smollm2, "rb") as src:
        cut.write_bytes(src.read(4096))
    line = _one_line(_invoke("measure", cut, "--device", "cpu"))
    assert "the GGUF file may be truncated or damaged" in line


def test_a_missing_corpus_with_several_processes_is_said_once_before_launching(llama: Path, tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from maxact_card.measure import distributed

    def must_not_launch(*args: Any, **kwargs: Any) -> int:
        raise AssertionError("launched processes for a corpus that does not exist")

    monkeypatch.setattr(distributed, "launch", must_not_launch)
    line = _one_line(_invoke("measure", llama, "--corpus", tmp_path / "nope.jsonl", "--gpus", "2", "--device", "cpu"))
    assert "corpus file" in line and "does not exist" in line


def test_other_ranks_of_a_launch_stay_quiet(llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAXACT_CARD_EXIT_FILE", str(tmp_path / "exit"))
    monkeypatch.setenv("RANK", "1")
    res = _invoke("measure", llama, "--corpus", tmp_path / "nope.jsonl", "--device", "cpu")
    assert res.exit_code == 2 and res.stderr == ""


def test_unreadable_weights_and_corpus_are_bad_input(llama: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Mode 000 files (root reads them anyway, so the refusal is planted where the read happens)."""
    from maxact_card.model import checkpoint

    real_read = Path.read_text

    def denied_corpus(self: Path, *args: Any, **kwargs: Any) -> str:
        if self.name == "corpus.jsonl":
            raise PermissionError(13, "Permission denied", str(self))
        return real_read(self, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(Path, "read_text", denied_corpus)
        line = _one_line(_invoke("measure", llama, "--corpus", llama.parent / "corpus.jsonl", "--device", "cpu"))
    assert "cannot read corpus file" in line and "Permission denied" in line

    def denied(path: Path, **kwargs: Any) -> str:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(checkpoint, "sha256_file", denied)
    line = _one_line(_invoke("measure", llama, "--corpus", llama.parent / "corpus.jsonl", "--device", "cpu"))
    assert "cannot read the weights of" in line and "Permission denied" in line


@pytest.mark.parametrize("delay", [0.3, 2.5])
def test_ctrl_c_at_any_moment_is_one_line_and_never_exit_0(llama: Path, delay: float) -> None:
    """While the command line is still importing (torch), and while it measures."""
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen(
        [sys.executable, "-m", "maxact_card", "measure", str(llama), "--device", "cpu", "--samples", "263"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 3 and err == "error: interrupted\n", err
