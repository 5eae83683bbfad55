"""Group samples into padded batches, longest first."""

from __future__ import annotations

from maxact_card.errors import UsageError


def batches(
    lengths: list[int], *, max_batch_tokens: int | None = None, batch_size: int | None = None
) -> list[list[int]]:
    """Sample indices grouped into batches; exactly one of `max_batch_tokens`, `batch_size` is given.

    Indices are sorted longest first (ties by index) and cut into consecutive groups, so every
    index appears once and a batch pads little. With `max_batch_tokens` a batch's padded cost,
    len(batch) * its longest length, stays within the budget; a sample longer than the budget
    goes alone. With `batch_size` each batch holds that many (the last may hold fewer).
    """
    if (max_batch_tokens is None) == (batch_size is None):
        raise UsageError(
            "give exactly one of a token budget and a batch size",
            hint="pass --max-batch-tokens or --batch-size",
        )
    limit = max_batch_tokens if max_batch_tokens is not None else batch_size
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        name = "max batch tokens" if max_batch_tokens is not None else "batch size"
        raise UsageError(
            f"{name} must be a positive integer, not {limit!r}", hint=f"pass a {name} of 1 or more"
        )
    if any(length < 0 for length in lengths):
        raise ValueError("sample lengths cannot be negative")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    if batch_size is not None:
        return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    groups: list[list[int]] = []
    for index in order:
        # Sorted longest first, so a batch's first member sets its padded length.
        if groups and (len(groups[-1]) + 1) * lengths[groups[-1][0]] <= limit:
            groups[-1].append(index)
        else:
            groups.append([index])
    return groups
