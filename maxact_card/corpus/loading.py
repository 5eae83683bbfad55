"""Load a corpus from the built-in data, a .jsonl or .txt file, or a Hugging Face dataset."""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Iterable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from maxact_card.corpus.model import Corpus, Sample
from maxact_card.errors import RuntimeFailure, UsageError

BUILTIN_ID = "maxact-builtin-v1"
DEFAULT_CATEGORY = "default"
TXT_SEPARATOR = "---"
_SPEC_HINT = "pass 'builtin', a .jsonl or .txt file, or 'hf:DATASET[:split[:column]]'"
_PAYLOADS = ("text", "messages", "input_ids")


def builtin_corpus() -> Corpus:
    """The corpus shipped inside the package: every `data/*.jsonl` file, in file-name order.

    Read through `importlib.resources`, so it works from a source checkout and an installed wheel.
    """
    data = resources.files("maxact_card.corpus") / "data"
    files = sorted((entry for entry in data.iterdir() if entry.name.endswith(".jsonl")), key=lambda e: e.name)
    samples: list[Sample] = []
    seen: dict[str, str] = {}
    for entry in files:
        where = f"built-in corpus file {entry.name}"
        samples.extend(
            _parse_jsonl(entry.read_text(encoding="utf-8"), where, default_id_prefix=None, seen=seen)
        )
    return _finish(BUILTIN_ID, samples)


def load_corpus(spec: str | os.PathLike[str] | None) -> Corpus:
    """Resolve a corpus spec: None/"builtin" (or the built-in's id), a file path, or "hf:DATASET[:split[:column]]".

    Files: `.jsonl` has one JSON object per line with one of "text", "input_ids" or "messages",
    an optional "category" (default "default") and an optional "id" (default "line-N").
    `.txt` holds samples separated by lines that contain only "---"; a file without such a line
    is one sample. Blank lines around a separator are dropped, other whitespace is kept.
    """
    if spec is not None and not isinstance(spec, str):
        spec = os.fspath(spec)
    if spec is None or spec in ("builtin", BUILTIN_ID):
        return builtin_corpus()
    if spec.startswith("hf:"):
        return _load_hf(spec)
    return _load_file(Path(spec))


def _finish(corpus_id: str, samples: list[Sample]) -> Corpus:
    if not samples:
        raise UsageError(f"corpus {corpus_id} has no samples", hint=_SPEC_HINT)
    return Corpus.from_samples(corpus_id, samples)


def _load_file(path: Path) -> Corpus:
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise UsageError(f"corpus file {path} {what}", hint=_SPEC_HINT)
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".txt"):
        raise UsageError(
            f"corpus file {path} has the unsupported extension {suffix or '(none)'!r}", hint=_SPEC_HINT
        )
    try:
        # utf-8-sig: editors on Windows like to start files with a byte-order mark.
        content = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise UsageError(
            f"corpus file {path} is not UTF-8 (byte {err.start})", hint="re-save the file as UTF-8"
        ) from err
    except OSError as err:
        raise UsageError(f"cannot read corpus file {path}: {err.strerror or err}", hint="check its permissions") from None
    corpus_id = f"file:{path.name}"
    if suffix == ".jsonl":
        samples = list(_parse_jsonl(content, str(path), default_id_prefix="line-", seen={}))
    else:
        samples = _parse_txt(content)
    return _finish(corpus_id, samples)


def _parse_txt(content: str) -> list[Sample]:
    # Split on "\n" alone: str.splitlines would also break at U+2028, U+0085 and friends,
    # which are content, not line ends.
    chunks: list[list[str]] = [[]]
    for line in content.split("\n"):
        if line.rstrip("\r") == TXT_SEPARATOR:
            chunks.append([])
        else:
            chunks[-1].append(line)
    samples: list[Sample] = []
    for chunk in chunks:
        text = "\n".join(chunk).strip("\r\n")
        if text.strip():
            samples.append(Sample(id=f"para-{len(samples) + 1}", category=DEFAULT_CATEGORY, text=text))
    return samples


def _parse_jsonl(
    content: str, where: str, *, default_id_prefix: str | None, seen: dict[str, str]
) -> Iterable[Sample]:
    """Samples from JSON lines; `default_id_prefix=None` makes "id" and "category" mandatory."""
    # JSON escapes "\n" inside strings but not U+2028 or U+0085, which str.splitlines would split at.
    for number, line in enumerate(content.split("\n"), start=1):
        if not line.strip():
            continue
        here = f"{where} line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise UsageError(
                f"invalid JSON at line {number} of {where}: {err.msg}",
                hint="each line must be one JSON object",
            ) from err
        if not isinstance(record, dict):
            raise UsageError(
                f"{here} is a JSON {type(record).__name__}, not an object", hint="one object a line"
            )
        sample = _sample_from_record(record, here, number, default_id_prefix)
        if sample.id in seen:
            raise UsageError(
                f"{here} repeats the sample id {sample.id!r} (first at {seen[sample.id]})",
                hint="give every sample a unique id",
            )
        seen[sample.id] = here
        yield sample


def _sample_from_record(
    record: Mapping[str, Any], here: str, number: int, default_id_prefix: str | None
) -> Sample:
    payloads = [key for key in _PAYLOADS if key in record]
    if len(payloads) != 1:
        found = "none" if not payloads else " and ".join(payloads)
        raise UsageError(
            f"{here} needs exactly one of 'text', 'input_ids' or 'messages' (found {found})",
            hint='e.g. {"text": "..."}',
        )
    strict = default_id_prefix is None
    sample_id = record.get("id")
    if sample_id is None and not strict:
        sample_id = f"{default_id_prefix}{number}"
    if isinstance(sample_id, bool) or not isinstance(sample_id, (str, int)) or str(sample_id) == "":
        raise UsageError(f"{here} has no usable 'id' (a non-empty string)", hint="give every sample an id")
    category = record.get("category", None if strict else DEFAULT_CATEGORY)
    if not isinstance(category, str) or not category:
        raise UsageError(
            f"{here} has no usable 'category' (a non-empty string)", hint="set a category or leave it out"
        )
    key = payloads[0]
    value = record[key]
    sample_id = str(sample_id)
    if key == "text":
        if not isinstance(value, str) or not value:
            raise UsageError(f"{here}: 'text' must be a non-empty string", hint="drop empty samples")
        return Sample(id=sample_id, category=category, text=value)
    if key == "input_ids":
        if (
            not isinstance(value, list)
            or not value
            or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value)
        ):
            raise UsageError(
                f"{here}: 'input_ids' must be a non-empty list of non-negative integers", hint="fix the line"
            )
        return Sample(id=sample_id, category=category, input_ids=tuple(value))
    return Sample(id=sample_id, category=category, messages=_messages(value, here))


def _messages(value: Any, here: str) -> tuple[dict[str, str], ...]:
    hint = 'e.g. [{"role": "user", "content": "..."}]'
    if not isinstance(value, list) or not value:
        raise UsageError(f"{here}: 'messages' must be a non-empty list of turns", hint=hint)
    turns = []
    for turn in value:
        if (
            not isinstance(turn, dict)
            or not isinstance(turn.get("role"), str)
            or not turn["role"]
            or not isinstance(turn.get("content"), str)
        ):
            raise UsageError(
                f"{here}: every turn in 'messages' needs a string 'role' and 'content'", hint=hint
            )
        turns.append({"role": turn["role"], "content": turn["content"]})
    return tuple(turns)


def _load_hf(spec: str) -> Corpus:
    parts = spec[len("hf:") :].split(":")
    if not parts[0] or len(parts) > 3 or any(not part for part in parts):
        raise UsageError(
            f"cannot read the corpus spec {spec!r}", hint="write it as hf:DATASET[:split[:column]]"
        )
    dataset_name = parts[0]
    split_name = parts[1] if len(parts) > 1 else "train"
    column = parts[2] if len(parts) > 2 else "text"
    try:
        datasets = importlib.import_module("datasets")
    except ImportError as err:
        raise UsageError(
            f"the corpus {spec!r} needs the 'datasets' package, which is not installed",
            hint="pip install 'maxact-card[datasets]'",
        ) from err
    try:
        rows = datasets.load_dataset(dataset_name, split=split_name)
    except FileNotFoundError as err:  # datasets' DatasetNotFoundError is one of these
        raise UsageError(
            f"dataset {dataset_name!r} was not found: {err}", hint="check the name on the Hub"
        ) from err
    except ValueError as err:  # an unknown split, among others
        raise UsageError(
            f"cannot load split {split_name!r} of {dataset_name!r}: {err}", hint="check the split"
        ) from err
    except (ConnectionError, TimeoutError) as err:
        raise RuntimeFailure(
            f"could not download dataset {dataset_name!r}: {err}", hint="retry later"
        ) from err
    columns = list(getattr(rows, "column_names", None) or (rows[0].keys() if len(rows) else []))
    if len(rows) and column not in columns:
        raise UsageError(
            f"dataset {dataset_name!r} split {split_name!r} has no column {column!r} (columns: {', '.join(columns)})",
            hint="name the column as hf:DATASET:split:column",
        )
    corpus_id = f"hf:{dataset_name}:{split_name}:{column}"
    samples = []
    for index, row in enumerate(rows):
        sample = _hf_sample(row[column], f"{split_name}-{index}", f"{corpus_id} row {index}")
        if sample is not None:
            samples.append(sample)
    return _finish(corpus_id, samples)


def _hf_sample(value: Any, sample_id: str, here: str) -> Sample | None:
    # Text datasets often hold blank rows (wikitext's paragraph breaks); they carry nothing to measure.
    if isinstance(value, str):
        return Sample(id=sample_id, category=DEFAULT_CATEGORY, text=value) if value.strip() else None
    if isinstance(value, list) and value and all(isinstance(t, dict) for t in value):
        return Sample(id=sample_id, category="chat", messages=_messages(value, here))
    if (
        isinstance(value, list)
        and value
        and all(isinstance(i, int) and not isinstance(i, bool) for i in value)
    ):
        return Sample(id=sample_id, category=DEFAULT_CATEGORY, input_ids=tuple(value))
    if value is None or (isinstance(value, list) and not value):
        return None
    raise UsageError(
        f"{here} holds a {type(value).__name__}, not text, chat turns or token ids",
        hint="name a text column as hf:DATASET:split:column",
    )
