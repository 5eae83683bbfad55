"""Turn samples into token ids, the way the model will see them."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from jinja2 import TemplateError

from maxact_card.corpus.model import Sample
from maxact_card.errors import UsageError

_TOO_LONG_HINT = "raise --max-seq-len or pass --truncate"
#: No tokenizer in use makes tokens this long on average: text past max_seq_len times this many
#: characters cannot be among the first max_seq_len tokens, so it is cut (or refused) unread.
MAX_CHARS_PER_TOKEN = 256
# What a chat template raises for conversations it refuses: its own raise_exception() gives a
# jinja2 TemplateError; transformers' checks give ValueError; odd indexing gives Key/IndexError.
_TEMPLATE_ERRORS = (TemplateError, ValueError, KeyError, IndexError)

DEFAULT_MAX_SEQ_LEN = 4096  # the longest sample in tokens, unless --max-seq-len says otherwise


def tokenize(
    samples: list[Sample], tokenizer: Any, max_seq_len: int, *, truncate: bool = False
) -> list[list[int]]:
    """Token ids per sample, in order.

    Text goes through `tokenizer(text)` with the tokenizer's default special tokens (so a BOS
    where the tokenizer adds one). Chat turns go through `apply_chat_template` when the tokenizer
    has a chat template (a template that refuses a system turn gets it folded into the first
    user turn), else through a plain "role: content" join tokenised like text.
    Pre-tokenised ids pass through. A sample longer than `max_seq_len` is an error naming it,
    unless `truncate` keeps its first `max_seq_len` tokens; a sample with no tokens is an error.
    """
    if isinstance(max_seq_len, bool) or max_seq_len < 1:
        raise UsageError(f"max sequence length {max_seq_len} is below 1", hint="pass --max-seq-len 1 or more")
    limit = max_seq_len * MAX_CHARS_PER_TOKEN
    samples = [_bounded(sample, limit, truncate, max_seq_len) for sample in samples]
    encoded = _encode_texts(samples, tokenizer)
    token_lists = [_ids_of(sample, tokenizer, encoded.get(i)) for i, sample in enumerate(samples)]
    too_long = [(s, len(ids)) for s, ids in zip(samples, token_lists) if len(ids) > max_seq_len]
    if too_long and not truncate:
        sample, length = max(too_long, key=lambda pair: pair[1])
        others = f" ({len(too_long)} samples are over it)" if len(too_long) > 1 else ""
        raise UsageError(
            f"sample {sample.id} is {length} tokens long, over the limit of {max_seq_len}{others}",
            hint=_TOO_LONG_HINT,
        )
    return [ids[:max_seq_len] for ids in token_lists]


def _bounded(sample: Sample, limit: int, truncate: bool, max_seq_len: int) -> Sample:
    """`sample` with its text cut to `limit` characters when truncating, or refused when longer
    without truncation: a sample that long is far over `max_seq_len` tokens, and handing megabytes
    of one line to a tokenizer costs minutes and gigabytes for nothing. Chat turns count together."""
    if sample.text is not None:
        size = len(sample.text)
    elif sample.messages is not None:
        size = sum(len(m.get("content") or "") for m in sample.messages)
    else:
        return sample  # token ids: their count is checked below
    if size <= limit:
        return sample
    if not truncate:
        raise UsageError(f"sample {sample.id} is {size:,} characters long, far over the limit of "
                         f"{max_seq_len} tokens", hint=_TOO_LONG_HINT)
    if sample.text is not None:
        return dataclasses.replace(sample, text=sample.text[:limit])
    turns, left = [], limit
    for turn in sample.messages or ():
        content = (turn.get("content") or "")[:left]
        turns.append({**turn, "content": content})
        left -= len(content)
        if left <= 0:
            break
    return dataclasses.replace(sample, messages=tuple(turns))


def chat_as_text(messages: Sequence[Mapping[str, str]]) -> str:
    """The plain rendering used when a tokenizer has no chat template: one "role: content" per turn."""
    return "\n".join(f"{turn['role']}: {turn['content']}" for turn in messages)


def _plain_text(sample: Sample, tokenizer: Any) -> str | None:
    """The text `tokenizer(text)` encodes for this sample, or None (ids, or chat through a template)."""
    if sample.input_ids is not None:
        return None
    if sample.messages is not None:
        return None if getattr(tokenizer, "chat_template", None) else chat_as_text(sample.messages)
    return sample.text


def _encode_texts(samples: list[Sample], tokenizer: Any) -> dict[int, Any]:
    """Sample index → the fast tokenizer's encoding of its plain text, all in one call.

    A Rust-backed tokenizer encodes a list on all cores, where one call per sample runs on one: at
    thousands of samples (millions of tokens) that is seconds of the run. The ids are the same as
    one `tokenizer(text)` each (no padding, no truncation). Other tokenizers get {} and are called
    per sample."""
    if getattr(tokenizer, "is_fast", False) is not True:
        return {}
    texts = {i: text for i, sample in enumerate(samples) if (text := _plain_text(sample, tokenizer)) is not None}
    if len(texts) < 2:
        return {}
    batch = tokenizer(list(texts.values()))["input_ids"]
    return dict(zip(texts, batch))


def _ids_of(sample: Sample, tokenizer: Any, encoded: Any = None) -> list[int]:
    text = _plain_text(sample, tokenizer)
    if sample.input_ids is not None:
        ids = list(sample.input_ids)
    elif text is None:
        ids = _as_id_list(_apply_template(tokenizer, sample), sample.id)
    else:
        ids = _as_id_list(tokenizer(text) if encoded is None else encoded, sample.id)
    if not ids:
        raise UsageError(
            f"sample {sample.id} tokenises to no tokens", hint="drop the empty sample from the corpus"
        )
    return ids


def _apply_template(tokenizer: Any, sample: Sample) -> Any:
    turns = [dict(m) for m in sample.messages or ()]
    try:
        return tokenizer.apply_chat_template(turns, tokenize=True)
    except _TEMPLATE_ERRORS as err:
        # Some templates (Gemma's, for one) refuse a system turn. Folding it into the first user
        # turn is what such models are prompted with in practice, so try that before giving up.
        merged = _fold_system_turn(turns)
        if merged is not None:
            try:
                return tokenizer.apply_chat_template(merged, tokenize=True)
            except _TEMPLATE_ERRORS:
                pass
        raise UsageError(
            f"the chat template rejected sample {sample.id}: {err}",
            hint="drop the sample or use a corpus the template accepts",
        ) from err


def _fold_system_turn(turns: list[dict[str, str]]) -> list[dict[str, str]] | None:
    if len(turns) < 2 or turns[0]["role"] != "system" or turns[1]["role"] != "user":
        return None
    first = {"role": "user", "content": f"{turns[0]['content']}\n\n{turns[1]['content']}"}
    return [first, *turns[2:]]


def _as_id_list(encoded: Any, sample_id: str) -> list[int]:
    # transformers 5 returns a BatchEncoding from both __call__ and apply_chat_template (dict-like),
    # older code paths a plain list, and return_tensors a tensor, possibly with a batch axis of 1.
    if isinstance(encoded, Mapping):
        encoded = encoded["input_ids"]
    if hasattr(encoded, "tolist"):
        encoded = encoded.tolist()
    if isinstance(encoded, list) and len(encoded) == 1 and isinstance(encoded[0], list):
        encoded = encoded[0]
    if not isinstance(encoded, list) or not all(isinstance(i, int) for i in encoded):
        raise UsageError(
            f"the tokenizer returned {type(encoded).__name__} for sample {sample_id}, not a list of token ids",
            hint="use a Hugging Face tokenizer",
        )
    return encoded
