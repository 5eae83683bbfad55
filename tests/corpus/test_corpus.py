"""The calibration corpus: built-in data, loaders, selection, splitting, tokenising, batching."""

from __future__ import annotations

import hashlib
import json
import math
import re
import runpy
import sys
import types
from collections import Counter
from collections.abc import Iterator
from fractions import Fraction
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast
from transformers.tokenization_utils_base import BatchEncoding

from maxact_card.corpus import (
    BUILTIN_ID,
    Corpus,
    Sample,
    apportion,
    batches,
    builtin_corpus,
    load_corpus,
    select,
    split,
    tokenize,
)
from maxact_card.errors import UsageError

CATEGORIES = {"prose", "multilingual", "code", "math", "chat", "structured", "long", "edge"}
DATA_DIR = Path(str(resources.files("maxact_card.corpus") / "data"))


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    return builtin_corpus()


def _text(sample: Sample) -> str:
    if sample.text is not None:
        return sample.text
    assert sample.messages is not None
    return "".join(turn["content"] for turn in sample.messages)


# --------------------------------------------------------------------------- built-in data


def test_builtin_size_and_categories(corpus: Corpus) -> None:
    counts = corpus.categories()
    assert corpus.id == BUILTIN_ID == "maxact-builtin-v1"
    assert len(corpus.samples) >= 256
    assert set(counts) == CATEGORIES
    assert counts["long"] >= 6
    for category, count in counts.items():
        if category != "long":
            assert 30 <= count <= 48, (category, count)  # roughly balanced


def test_builtin_ids_are_unique_and_follow_the_file(corpus: Corpus) -> None:
    ids = [s.id for s in corpus.samples]
    assert len(ids) == len(set(ids))
    for sample in corpus.samples:
        assert re.fullmatch(rf"{sample.category}-\d{{3}}", sample.id), sample.id
        assert sample.input_ids is None


def test_builtin_payloads(corpus: Corpus) -> None:
    chats = [s for s in corpus.samples if s.category == "chat"]
    assert all(s.messages and s.text is None for s in chats)
    assert all(s.text and s.messages is None for s in corpus.samples if s.category != "chat")
    roles = {turn["role"] for s in chats for turn in s.messages or ()}
    assert roles == {"system", "user", "assistant"}
    assert sum(1 for s in chats if s.messages and s.messages[0]["role"] == "system") >= 10
    assert all(len(s.messages or ()) >= 2 for s in chats)
    for sample in corpus.samples:
        if sample.category not in ("long", "edge"):
            assert 150 <= len(_text(sample)) <= 2500, sample.id


def test_long_documents_are_long(corpus: Corpus) -> None:
    longs = [s for s in corpus.samples if s.category == "long"]
    assert len(longs) >= 6
    assert all(len(_text(s)) > 12_000 for s in longs)
    assert len(_text(max(longs, key=lambda s: len(_text(s))))) < 25_000


def test_multilingual_covers_many_scripts(corpus: Corpus) -> None:
    text = "".join(_text(s) for s in corpus.samples if s.category == "multilingual")
    scripts = {
        "han": r"[\u4e00-\u9fff]",
        "kana": r"[\u3040-\u30ff]",
        "hangul": r"[\uac00-\ud7af]",
        "arabic": r"[\u0600-\u06ff]",
        "hebrew": r"[\u0590-\u05ff]",
        "cyrillic": r"[\u0400-\u04ff]",
        "greek": r"[\u0370-\u03ff]",
        "devanagari": r"[\u0900-\u097f]",
        "thai": r"[\u0e00-\u0e7f]",
        "vietnamese": r"[ạảấầẩẫậắằẳẵặẹẻẽếềểễệỉịọỏốồổỗộớờởỡợụủứừửữựỳỵỷỹ]",
    }
    for name, pattern in scripts.items():
        assert re.search(pattern, text), name


def test_edge_cases_present(corpus: Corpus) -> None:
    edge = [_text(s) for s in corpus.samples if s.category == "edge"]
    assert any(len(t) == 1 for t in edge)
    assert any(" " * 1000 in t for t in edge)
    assert any("\t" * 500 in t for t in edge)
    assert any("\n" * 500 in t for t in edge)
    assert any(re.search(r"\d{1000}", t) for t in edge)
    assert any("\u200d" in t and re.search(r"[\U0001F300-\U0001FAFF]", t) for t in edge)
    assert any("https://" in t for t in edge)
    assert any(re.fullmatch(r"[A-Za-z0-9+/]{1000,}={0,2}", t) for t in edge)


def test_data_files_are_one_category_each_and_small() -> None:
    files = sorted(DATA_DIR.glob("*.jsonl"))
    assert {p.stem for p in files} == CATEGORIES
    for path in files:
        lines = path.read_text(encoding="utf-8").split("\n")  # not splitlines(): U+2028 is content
        records = [json.loads(line) for line in lines if line]
        assert {r["category"] for r in records} == {path.stem}
    assert sum(p.stat().st_size for p in DATA_DIR.iterdir() if p.is_file()) < 1_500_000


def test_edge_file_is_reproducible() -> None:
    generator = runpy.run_path(str(DATA_DIR / "_generate_edge.py"))
    expected = [
        json.dumps({"id": f"edge-{i:03d}", "category": "edge", "text": t}, ensure_ascii=False)
        for i, t in enumerate(generator["samples"](), start=1)
    ]
    assert (DATA_DIR / "edge.jsonl").read_text(encoding="utf-8") == "\n".join(expected) + "\n"


# --------------------------------------------------------------------------- hashing


def _independent_hash(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in files:
        for line in path.read_text(encoding="utf-8").split("\n"):
            if not line.strip():
                continue
            record = json.loads(line)
            payload = {
                k: record[k] for k in ("id", "category", "text", "messages", "input_ids") if k in record
            }
            canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
            digest.update(canonical.encode("ascii") + b"\n")
    return digest.hexdigest()


def test_hash_is_stable_and_recomputable(corpus: Corpus) -> None:
    assert re.fullmatch(r"[0-9a-f]{64}", corpus.sha256)
    assert builtin_corpus().sha256 == corpus.sha256
    files = sorted(DATA_DIR.glob("*.jsonl"), key=lambda p: p.name)
    assert _independent_hash(files) == corpus.sha256


def test_hash_tracks_content_not_formatting(tmp_path: Path) -> None:
    a = tmp_path / "a.jsonl"
    b = tmp_path / "b.jsonl"
    a.write_text('{"id": "x", "category": "c", "text": "héllo"}\n', encoding="utf-8")
    b.write_text('\n  {"text":"h\\u00e9llo",   "category":"c","id":"x"}  \r\n\n', encoding="utf-8")
    assert load_corpus(str(a)).sha256 == load_corpus(str(b)).sha256
    c = tmp_path / "c.jsonl"
    c.write_text('{"id": "x", "category": "c", "text": "hello"}\n', encoding="utf-8")
    assert load_corpus(str(c)).sha256 != load_corpus(str(a)).sha256


# --------------------------------------------------------------------------- samples


def test_sample_validation_and_round_trip() -> None:
    with pytest.raises(ValueError):
        Sample(id="a", category="c")
    with pytest.raises(ValueError):
        Sample(id="a", category="c", text="t", input_ids=(1,))
    chat = Sample(id="a", category="chat", messages=[{"role": "user", "content": "hi"}])  # type: ignore[arg-type]
    assert isinstance(chat.messages, tuple)
    assert {chat, Sample.from_dict(chat.to_dict())} == {chat}
    ids = Sample(id="b", category="c", input_ids=[1, 2])  # type: ignore[arg-type]
    assert ids.input_ids == (1, 2) and ids.to_dict()["input_ids"] == [1, 2]
    with pytest.raises(ValueError, match="twice"):
        Corpus.from_samples("t", [ids, ids])


# --------------------------------------------------------------------------- select


def test_select_is_deterministic_sorted_and_proportional(corpus: Corpus) -> None:
    picked = select(corpus, 64, seed=0)
    assert picked == select(corpus, 64, seed=0)
    assert len(picked) == 64
    order = {s.id: i for i, s in enumerate(corpus.samples)}
    assert [order[s.id] for s in picked] == sorted(order[s.id] for s in picked)
    counts = Counter(s.category for s in picked)
    assert set(counts) == CATEGORIES
    total = len(corpus.samples)
    for category, size in corpus.categories().items():
        assert abs(counts[category] - Fraction(64 * size, total)) < 1, category


def test_select_seeds_differ(corpus: Corpus) -> None:
    ids = {seed: [s.id for s in select(corpus, 40, seed=seed)] for seed in range(4)}
    assert len({tuple(v) for v in ids.values()}) == 4


def test_select_all_and_errors(corpus: Corpus) -> None:
    assert select(corpus, None, seed=1) == list(corpus.samples)
    assert select(corpus, len(corpus.samples), seed=1) == list(corpus.samples)
    assert select(corpus, 10_000, seed=1) == list(corpus.samples)
    for bad in (0, -3):
        with pytest.raises(UsageError):
            select(corpus, bad, seed=0)


def test_select_gives_every_category_one(corpus: Corpus) -> None:
    picked = select(corpus, len(CATEGORIES), seed=5)
    assert Counter(s.category for s in picked) == {c: 1 for c in CATEGORIES}
    tiny = Corpus.from_samples(
        "t",
        [Sample(f"a{i}", "big", text="x") for i in range(100)]
        + [Sample("b", "b", text="y"), Sample("c", "c", text="z")],
    )
    assert Counter(s.category for s in select(tiny, 3, seed=0)) == {"big": 1, "b": 1, "c": 1}


@given(st.lists(st.integers(0, 50), min_size=1, max_size=12), st.integers(0, 400))
def test_apportion_properties(counts: list[int], total: int) -> None:
    total = min(total, sum(counts))
    shares = apportion(counts, total)
    assert sum(shares) == total
    for share, count in zip(shares, counts):
        assert 0 <= share <= count
        assert abs(share - Fraction(total * count, sum(counts) or 1)) < 1


# --------------------------------------------------------------------------- split


def test_split_is_stratified_disjoint_and_complete(corpus: Corpus) -> None:
    samples = list(corpus.samples)
    calibration, held_out = split(samples, 0.25, seed=3)
    assert split(samples, 0.25, seed=3) == (calibration, held_out)
    assert {s.id for s in calibration}.isdisjoint(s.id for s in held_out)
    assert sorted(s.id for s in calibration + held_out) == sorted(s.id for s in samples)
    position = {s.id: i for i, s in enumerate(samples)}
    for part in (calibration, held_out):
        assert [position[s.id] for s in part] == sorted(position[s.id] for s in part)
    held_size = len(held_out)
    assert held_size == round(len(samples) * 0.25)
    counts = Counter(s.category for s in held_out)
    for category, size in corpus.categories().items():
        assert abs(counts[category] - Fraction(held_size * size, len(samples))) < 1, category
    other, _ = split(samples, 0.25, seed=4)
    assert other != calibration


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5, math.nan])
def test_split_rejects_bad_fractions(corpus: Corpus, fraction: float) -> None:
    with pytest.raises(UsageError, match="fraction"):
        split(list(corpus.samples), fraction, seed=0)


@pytest.mark.parametrize(("size", "fraction"), [(1, 0.5), (3, 0.1), (3, 0.9), (0, 0.5)])
def test_split_rejects_too_small(size: int, fraction: float) -> None:
    samples = [Sample(f"s{i}", "c", text="x") for i in range(size)]
    with pytest.raises(UsageError, match="corpus too small to split"):
        split(samples, fraction, seed=0)


def test_split_two_samples() -> None:
    samples = [Sample("a", "c", text="x"), Sample("b", "c", text="y")]
    calibration, held_out = split(samples, 0.5, seed=0)
    assert len(calibration) == len(held_out) == 1


# --------------------------------------------------------------------------- loading files


def _write(tmp_path: Path, name: str, content: str | bytes) -> str:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("spec", [None, "builtin", BUILTIN_ID])
def test_load_builtin_specs(spec: str | None, corpus: Corpus) -> None:
    assert load_corpus(spec).sha256 == corpus.sha256


def test_load_jsonl(tmp_path: Path) -> None:
    lines = [
        json.dumps({"text": "plain text"}),
        "",
        json.dumps({"id": "mine", "category": "code", "text": "x = 1"}),
        json.dumps({"input_ids": [1, 2, 3], "category": "ids"}),
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}),
        json.dumps({"text": "line\u2028separator\u0085inside", "extra": "ignored"}),
    ]
    loaded = load_corpus(_write(tmp_path, "mine.jsonl", "\n".join(lines) + "\n"))
    assert loaded.id == "file:mine.jsonl"
    assert [s.id for s in loaded.samples] == ["line-1", "mine", "line-4", "line-5", "line-6"]
    assert [s.category for s in loaded.samples] == ["default", "code", "ids", "default", "default"]
    assert loaded.samples[2].input_ids == (1, 2, 3)
    assert loaded.samples[3].messages == (
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
    )
    assert loaded.samples[4].text == "line\u2028separator\u0085inside"


def test_load_accepts_a_path_object(tmp_path: Path) -> None:
    path = tmp_path / "p.txt"
    path.write_text("hello", encoding="utf-8")
    assert load_corpus(path).samples == (Sample("para-1", "default", text="hello"),)


def test_load_txt(tmp_path: Path) -> None:
    content = "first paragraph\nstill first\n\n---\n\n\n  second, indented\n---\n---\n\nthird\n"
    loaded = load_corpus(_write(tmp_path, "notes.txt", content))
    assert loaded.id == "file:notes.txt"
    assert [s.text for s in loaded.samples] == ["first paragraph\nstill first", "  second, indented", "third"]
    assert [s.id for s in loaded.samples] == ["para-1", "para-2", "para-3"]
    whole = load_corpus(_write(tmp_path, "whole.txt", "one\n\ntwo\n"))
    assert [s.text for s in whole.samples] == ["one\n\ntwo"]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("bad.jsonl", '{"text": "ok"}\n{"text": nope}\n', "invalid JSON at line 2"),
        (
            "none.jsonl",
            '{"text": "ok"}\n{"category": "x"}\n',
            "line 2 needs exactly one of 'text', 'input_ids' or 'messages'",
        ),
        (
            "both.jsonl",
            '{"text": "a", "messages": [{"role": "user", "content": "b"}]}\n',
            "found text and messages",
        ),
        ("empty.jsonl", "", "has no samples"),
        ("blank.jsonl", "\n  \n", "has no samples"),
        ("seps.txt", "---\n\n---\n", "has no samples"),
        ("empty.txt", "", "has no samples"),
        ("dup.jsonl", '{"id": "a", "text": "x"}\n{"id": "a", "text": "y"}\n', "repeats the sample id 'a'"),
        ("list.jsonl", "[1, 2]\n", "not an object"),
        ("ids.jsonl", '{"input_ids": [1, -2]}\n', "non-negative integers"),
        ("ids2.jsonl", '{"input_ids": []}\n', "non-empty list"),
        ("msgs.jsonl", '{"messages": [{"role": "user"}]}\n', "needs a string 'role' and 'content'"),
        ("text.jsonl", '{"text": ""}\n', "'text' must be a non-empty string"),
        ("cat.jsonl", '{"text": "a", "category": ""}\n', "category"),
        ("data.csv", "a,b\n", "unsupported extension '.csv'"),
        ("latin1.txt", "caf\xe9".encode("latin-1"), "is not UTF-8"),
    ],
)
def test_load_errors(tmp_path: Path, name: str, content: str | bytes, message: str) -> None:
    with pytest.raises(UsageError, match=re.escape(message)):
        load_corpus(_write(tmp_path, name, content))


def test_load_missing_paths(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="does not exist") as missing:
        load_corpus(str(tmp_path / "nope.jsonl"))
    assert missing.value.hint and "hf:DATASET" in missing.value.hint
    with pytest.raises(UsageError, match="is a directory"):
        load_corpus(str(tmp_path))


def test_error_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(UsageError) as err:
        load_corpus(_write(tmp_path, "bad.jsonl", "{\n"))
    assert "\n" not in err.value.line()


# --------------------------------------------------------------------------- Hugging Face datasets


def test_hf_without_datasets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(UsageError, match="needs the 'datasets' package") as err:
        load_corpus("hf:some/dataset")
    assert err.value.hint is not None and "pip install" in err.value.hint


def _fake_datasets(monkeypatch: pytest.MonkeyPatch, rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    calls: list[tuple[str, str]] = []

    def load_dataset(name: str, split: str) -> list[dict[str, Any]]:
        calls.append((name, split))
        if split == "missing":
            raise ValueError('Unknown split "missing"')
        return rows

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    return calls


def test_hf_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _fake_datasets(monkeypatch, [{"text": "one"}, {"text": "  "}, {"text": "three"}])
    loaded = load_corpus("hf:org/set")
    assert calls == [("org/set", "train")]
    assert loaded.id == "hf:org/set:train:text"
    assert [(s.id, s.text) for s in loaded.samples] == [("train-0", "one"), ("train-2", "three")]

    calls = _fake_datasets(monkeypatch, [{"body": "x", "chat": [{"role": "user", "content": "hi"}]}])
    assert load_corpus("hf:org/set:validation:body").id == "hf:org/set:validation:body"
    assert calls == [("org/set", "validation")]
    assert load_corpus("hf:org/set:validation:chat").samples[0].messages == (
        {"role": "user", "content": "hi"},
    )


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("hf:org/set:train:nope", "has no column 'nope'"),
        ("hf:org/set:missing", "cannot load split 'missing'"),
        ("hf:", "cannot read the corpus spec"),
        ("hf:a:b:c:d", "cannot read the corpus spec"),
    ],
)
def test_hf_errors(monkeypatch: pytest.MonkeyPatch, spec: str, message: str) -> None:
    _fake_datasets(monkeypatch, [{"text": "one"}])
    with pytest.raises(UsageError, match=re.escape(message)):
        load_corpus(spec)


def test_hf_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_datasets(monkeypatch, [{"text": ""}])
    with pytest.raises(UsageError, match="corpus hf:org/set:train:text has no samples"):
        load_corpus("hf:org/set")


# --------------------------------------------------------------------------- tokenize

CHAT_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE trained here on a few strings: offline, small, and able to encode anything."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(
        ["the quick brown fox jumps over the lazy dog", "def f(x): return x + 1"] * 20, trainer
    )
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", backend.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


@pytest.fixture
def chat_tokenizer(tokenizer: PreTrainedTokenizerFast) -> Iterator[PreTrainedTokenizerFast]:
    tokenizer.chat_template = CHAT_TEMPLATE
    yield tokenizer
    tokenizer.chat_template = None


TURNS = ({"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"})


def test_tokenize_text_adds_bos(tokenizer: PreTrainedTokenizerFast) -> None:
    [ids] = tokenize([Sample("t", "c", text="the fox")], tokenizer, 64)
    assert ids[0] == tokenizer.bos_token_id
    assert ids == tokenizer("the fox")["input_ids"]
    assert tokenizer.decode(ids[1:]) == "the fox"


def test_tokenize_chat_with_template(chat_tokenizer: PreTrainedTokenizerFast) -> None:
    [ids] = tokenize([Sample("c", "chat", messages=TURNS)], chat_tokenizer, 256)
    rendered = "<|system|>be brief\n<|user|>hi there\n"
    assert ids == chat_tokenizer(rendered, add_special_tokens=False)["input_ids"]


def test_tokenize_chat_without_template(tokenizer: PreTrainedTokenizerFast) -> None:
    assert not tokenizer.chat_template
    [ids] = tokenize([Sample("c", "chat", messages=TURNS)], tokenizer, 256)
    assert ids == tokenizer("system: be brief\nuser: hi there")["input_ids"]


def test_tokenize_passes_ids_through(tokenizer: PreTrainedTokenizerFast) -> None:
    assert tokenize([Sample("i", "c", input_ids=(7, 3, 9))], tokenizer, 3) == [[7, 3, 9]]


def test_tokenize_encodes_plain_texts_in_one_call(tokenizer: PreTrainedTokenizerFast,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    samples = [Sample("a", "c", text="the quick brown fox"), Sample("i", "c", input_ids=(7, 3)),
               Sample("m", "chat", messages=TURNS), Sample("b", "c", text="jumps over")]
    one_by_one = [tokenizer("the quick brown fox")["input_ids"], [7, 3],
                  tokenizer("system: be brief\nuser: hi there")["input_ids"], tokenizer("jumps over")["input_ids"]]
    calls: list[Any] = []
    encode = type(tokenizer).__call__

    def counting(self: PreTrainedTokenizerFast, text: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(text)
        return encode(self, text, *args, **kwargs)

    monkeypatch.setattr(type(tokenizer), "__call__", counting)
    assert tokenize(samples, tokenizer, 64) == one_by_one
    assert calls == [["the quick brown fox", "system: be brief\nuser: hi there", "jumps over"]]
    calls.clear()
    monkeypatch.setattr(type(tokenizer), "is_fast", False)  # a Python tokenizer: one call per sample
    assert tokenize(samples, tokenizer, 64) == one_by_one
    assert calls == ["the quick brown fox", "system: be brief\nuser: hi there", "jumps over"]


def test_tokenize_too_long_and_truncate(tokenizer: PreTrainedTokenizerFast) -> None:
    samples = [Sample("short", "c", text="fox"), Sample("wordy", "c", text="the quick brown fox " * 20)]
    full = tokenize(samples, tokenizer, 10_000)
    with pytest.raises(
        UsageError, match=rf"sample wordy is {len(full[1])} tokens long, over the limit of 16"
    ) as err:
        tokenize(samples, tokenizer, 16)
    assert err.value.hint == "raise --max-seq-len or pass --truncate"
    cut = tokenize(samples, tokenizer, 16, truncate=True)
    assert cut[0] == full[0]
    assert cut[1] == full[1][:16]
    with pytest.raises(UsageError):
        tokenize(samples, tokenizer, 0)


def test_tokenize_empty_is_an_error(tokenizer: PreTrainedTokenizerFast) -> None:
    with pytest.raises(UsageError, match="sample nothing tokenises to no tokens"):
        tokenize([Sample("nothing", "c", input_ids=())], tokenizer, 8)


class _FakeChatTokenizer:
    chat_template = "set"

    def __init__(self, result: Any) -> None:
        self.result = result

    def apply_chat_template(self, messages: list[dict[str, str]], tokenize: bool) -> Any:
        assert tokenize is True and messages == [dict(t) for t in TURNS]
        return self.result


@pytest.mark.parametrize(
    "result",
    [
        [4, 5, 6],
        {"input_ids": [4, 5, 6], "attention_mask": [1, 1, 1]},
        BatchEncoding({"input_ids": [4, 5, 6]}),
        BatchEncoding({"input_ids": [[4, 5, 6]]}),
        torch.tensor([[4, 5, 6]]),
        torch.tensor([4, 5, 6]),
    ],
    ids=["list", "dict", "batch-encoding", "batched", "tensor-2d", "tensor-1d"],
)
def test_tokenize_normalises_chat_template_results(result: Any) -> None:
    assert tokenize([Sample("c", "chat", messages=TURNS)], _FakeChatTokenizer(result), 8) == [[4, 5, 6]]


def test_tokenize_folds_a_refused_system_turn(tokenizer: PreTrainedTokenizerFast) -> None:
    tokenizer.chat_template = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        + CHAT_TEMPLATE
    )
    try:
        [ids] = tokenize([Sample("c", "chat", messages=TURNS)], tokenizer, 256)
    finally:
        tokenizer.chat_template = None
    assert ids == tokenizer("<|user|>be brief\n\nhi there\n", add_special_tokens=False)["input_ids"]


def test_tokenize_template_rejection_names_the_sample() -> None:
    class Refusing(_FakeChatTokenizer):
        def apply_chat_template(self, messages: list[dict[str, str]], tokenize: bool) -> Any:
            raise ValueError("System role not supported")

    with pytest.raises(UsageError, match="rejected sample c: System role not supported"):
        tokenize([Sample("c", "chat", messages=TURNS)], Refusing(None), 8)


def test_builtin_tokenizes_and_long_documents_are_long_in_tokens(
    corpus: Corpus, chat_tokenizer: PreTrainedTokenizerFast
) -> None:
    token_lists = tokenize(list(corpus.samples), chat_tokenizer, 1_000_000)
    assert all(token_lists)
    lengths = {s.id: len(ids) for s, ids in zip(corpus.samples, token_lists)}
    assert all(lengths[s.id] > 2_500 for s in corpus.samples if s.category == "long")


# --------------------------------------------------------------------------- batches


def test_batches_by_token_budget() -> None:
    assert batches([5, 3, 8, 3, 1], max_batch_tokens=10) == [[2], [0, 1], [3, 4]]
    assert batches([50, 2, 2], max_batch_tokens=10) == [[0], [1, 2]]
    assert batches([], max_batch_tokens=10) == []


def test_batches_by_size() -> None:
    assert batches([1, 9, 4, 9, 2], batch_size=2) == [[1, 3], [2, 4], [0]]


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"max_batch_tokens": 8, "batch_size": 2}, {"batch_size": 0}, {"max_batch_tokens": -1}],
)
def test_batches_rejects_bad_options(kwargs: dict[str, int]) -> None:
    with pytest.raises(UsageError):
        batches([1, 2], **kwargs)


def _check_order(lengths: list[int], groups: list[list[int]]) -> None:
    flat = [i for group in groups for i in group]
    assert sorted(flat) == list(range(len(lengths)))
    assert flat == sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    assert all(groups)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 300), max_size=60), st.integers(1, 1_500))
def test_batches_budget_property(lengths: list[int], budget: int) -> None:
    groups = batches(lengths, max_batch_tokens=budget)
    _check_order(lengths, groups)
    for group, following in zip(groups, groups[1:] + [None]):
        padded = len(group) * max(lengths[i] for i in group)
        assert len(group) == 1 or padded <= budget
        if following is not None:  # greedy: the next sample would not have fit
            assert (len(group) + 1) * lengths[group[0]] > budget


@given(st.lists(st.integers(0, 300), max_size=60), st.integers(1, 16))
def test_batches_size_property(lengths: list[int], size: int) -> None:
    groups = batches(lengths, batch_size=size)
    _check_order(lengths, groups)
    assert all(len(g) == size for g in groups[:-1]) and all(0 < len(g) <= size for g in groups)
