"""Each step of a run is announced as it happens, to a listener only: nothing when nobody listens,
nothing from the other processes of a data-parallel run, nothing on a pipe."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from maxact_card import progress
from maxact_card.cli import app
from maxact_card.commands.measure import Display
from maxact_card.measure.run import MeasureOptions, run_measure
from tests import factory
from tests.factory import write_corpus


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, ...]] = []

    def step(self, text: str) -> None:
        self.events.append(("step", text))

    def start_pass(self, label: str, samples: int, tokens: int, batches: int) -> None:
        self.events.append(("pass", label, str(samples), str(batches)))

    def advance(self, samples: int, tokens: int) -> None:
        self.events.append(("advance", str(samples)))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("progress")
    write_corpus(root / "corpus.jsonl")
    return factory.save("llama", root / "llama")


def _options(checkpoint: Path, **kw: object) -> MeasureOptions:
    return MeasureOptions(model=str(checkpoint), corpus=str(checkpoint.parent / "corpus.jsonl"), device="cpu",
                          batch_size=2, **kw)  # type: ignore[arg-type]


def test_a_run_announces_its_steps_and_each_batch_of_both_passes(checkpoint: Path) -> None:
    recorder = Recorder()
    with progress.listening(recorder):
        results = run_measure(_options(checkpoint, quant=True))
    assert results is not None
    steps = [e[1] for e in recorder.events if e[0] == "step"]
    assert steps == [  # the weights are hashed beside the loading: a tiny file is done by then
        "reading the corpus",
        "importing transformers",
        "reading the config",
        "loading the model (float32, to cpu)",
        "loading the tokenizer",
        f"tokenizing {results['run']['samples']:,} samples",
        "finding the sites",
        f"tokenizing {results['quant']['eval_samples']:,} samples",
    ]
    passes = [e for e in recorder.events if e[0] == "pass"]
    assert [p[1] for p in passes] == ["measuring", "checking INT8/FP8 on held-out data"]
    measured, held_out = int(passes[0][2]), int(passes[1][2])
    assert measured == results["run"]["samples"] and held_out == results["quant"]["eval_samples"]
    first = recorder.events.index(passes[0])
    advances = [int(e[1]) for e in recorder.events[first + 1:recorder.events.index(passes[1])] if e[0] == "advance"]
    assert len(advances) == int(passes[0][3]) and advances[-1] == measured  # one per batch, to the end
    assert advances == sorted(advances)


def test_with_no_listener_nothing_is_announced(checkpoint: Path) -> None:
    assert not progress.shown()
    progress.step("nobody hears this", "corpus")  # and nothing fails


def test_the_display_stays_off_the_pipe(checkpoint: Path) -> None:
    """CliRunner's stderr is not a terminal: no spinner, no bar, no library bars; only the result line."""
    res = CliRunner().invoke(app, ["measure", str(checkpoint), "--corpus", str(checkpoint.parent / "corpus.jsonl"),
                                   "--device", "cpu", "--out", str(checkpoint.parent / "r.json")])
    assert res.exit_code == 0, res.stderr
    assert res.stderr.splitlines() == [f"results written to {checkpoint.parent / 'r.json'}"]


def test_the_display_counts_batches() -> None:
    display = Display(enabled=True)
    with display:
        display.start_pass("measuring", 16, 3552, 2)
        assert display.progress is not None
        assert display.progress.tasks[-1].fields["count"] == "0/16 samples, batch 1 of 2"
        display.advance(8, 1800)
        assert display.progress.tasks[-1].fields["count"] == "8/16 samples, batch 2 of 2"
        display.advance(16, 3552)
        assert display.progress.tasks[-1].fields["count"] == "16/16 samples, batch 2 of 2"
        display.step("writing")
        assert display.progress.tasks[-1].total is None and len(display.progress.tasks) == 1
    assert not progress.shown()


def test_the_peak_carries_its_sample_category_and_the_text_around_it(checkpoint: Path) -> None:
    from maxact_card.card.section import render_section

    results = run_measure(_options(checkpoint))
    assert results is not None
    context, loc = results["global"]["context"], results["global"]["location"]
    assert context["category"] == "default"  # a .jsonl corpus without categories
    assert context["excerpt"].count("⟦") == 1 and context["excerpt"].count("⟧") == 1
    section = render_section(results, chart_path="maxact/profile.svg", results_path="maxact/results.json")
    assert f"`{loc['sample_id']}` (default: `" in section


def test_the_results_record_where_the_time_went(checkpoint: Path) -> None:
    from maxact_card.commands.measure import phases_line, summary_lines

    results = run_measure(_options(checkpoint, quant=True), import_s=0.25)  # the command's import of torch
    assert results is not None
    phases = results["run"]["phases"]
    assert list(phases) == ["import", "corpus", "config", "load", "tokenize", "discover", "measure", "quant"]
    assert phases["import"] >= 0.25
    assert all(seconds >= 0 for seconds in phases.values()) and phases["measure"] > 0
    line = next(line for line in summary_lines(results, None) if line.startswith("time"))
    assert line.endswith(phases_line(phases)) and "measure " in line and "(total " in line


def test_the_weights_are_hashed_while_the_model_loads_and_is_measured(
        checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The sha256 in the results is the file's; it is waited for only when the results are built,
    after the measurement pass, and hashing that outlasts loading and measuring is its own step and
    phase."""
    import hashlib
    import time

    from maxact_card.model import checkpoint as checkpoint_mod

    real, real_finish = checkpoint_mod.sha256_file, checkpoint_mod.HashInBackground.finish
    started: list[float] = []
    waited: list[float] = []

    def slow(path: Path, **kwargs: object) -> str:
        started.append(time.perf_counter())
        time.sleep(4.0)
        return real(path)

    def finish(self: checkpoint_mod.HashInBackground) -> None:
        waited.append(time.perf_counter())
        real_finish(self)

    monkeypatch.setattr(checkpoint_mod, "sha256_file", slow)
    monkeypatch.setattr(checkpoint_mod.HashInBackground, "finish", finish)
    class Clocked(Recorder):
        def step(self, text: str) -> None:
            super().step(text)
            if text.startswith("loading the model"):
                loading.append(time.perf_counter())

    loading: list[float] = []
    recorder = Clocked()
    with progress.listening(recorder):
        results = run_measure(_options(checkpoint))
    assert results is not None
    (weights,) = results["model"]["weight_files"]
    assert weights["sha256"] == hashlib.sha256((checkpoint / weights["path"]).read_bytes()).hexdigest()
    steps = [e[1] for e in recorder.events if e[0] == "step"]
    assert steps.index("loading the tokenizer") < steps.index(next(s for s in steps if s.startswith("hashing 1 ")))
    kinds = [e[0] if e[0] != "step" or not e[1].startswith("hashing 1 ") else "hash" for e in recorder.events]
    assert kinds.index("pass") < kinds.index("hash")  # the measurement ran while the weights were hashed
    # the hash ran while the model loaded: the model's loading began while the 4 s hash was running,
    # and the wait for the hash came after; the part it outlasted the loading is a phase of its own
    # (no bound on that part: on a busy machine the loading may take any time)
    assert len(started) == len(waited) == len(loading) == 1
    assert started[0] < loading[0] < started[0] + 4.0 and loading[0] < waited[0]
    assert results["run"]["phases"]["hash"] > 0


def test_a_run_that_fails_leaves_no_hashing_behind(checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run that fails after loading (an unknown --quant-sites name) stops the hashing still running:
    the hashing thread gives up at its next chunk instead of reading the rest of the weights."""
    import threading
    import time

    from maxact_card.errors import UsageError
    from maxact_card.model import checkpoint as checkpoint_mod

    gave_up = threading.Event()

    def endless(path: Path, *, stop: threading.Event, **kwargs: object) -> str:
        for _ in range(2000):  # a file that takes 20 s to hash, read chunk by chunk
            if stop.wait(0.01):
                gave_up.set()
                return ""
        return "0" * 64

    monkeypatch.setattr(checkpoint_mod, "sha256_file", endless)
    with pytest.raises(UsageError, match="unknown --quant-sites name"):
        run_measure(_options(checkpoint, quant=True, quant_sites="blocks.99.nowhere"))
    assert gave_up.wait(5.0)
    deadline = time.monotonic() + 5.0
    while any(t.name.startswith("sha256") for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not any(t.name.startswith("sha256") for t in threading.enumerate())


def test_hashing_gives_up_between_chunks_once_stopped(tmp_path: Path) -> None:
    import hashlib
    import threading

    from maxact_card.documents import sha256_file

    path = tmp_path / "w.bin"
    path.write_bytes(bytes(range(256)) * 64)
    stop = threading.Event()
    assert sha256_file(path, chunk=1000, stop=stop) == hashlib.sha256(path.read_bytes()).hexdigest()
    stop.set()
    assert sha256_file(path, chunk=1000, stop=stop) == ""
