"""Deterministic, category-proportional selection and a stratified calibration/held-out split."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

from maxact_card.corpus.model import Corpus, Sample
from maxact_card.errors import UsageError


def apportion(counts: Sequence[int], total: int) -> list[int]:
    """Split `total` over groups in proportion to `counts` by the largest-remainder method.

    Integer arithmetic only, so the result never depends on float rounding; ties in the
    remainder go to the earlier group. No group gets more than its count.
    """
    size = sum(counts)
    if size == 0:
        return [0 for _ in counts]
    shares = [total * count // size for count in counts]
    remainders = [total * count % size for count in counts]
    left = total - sum(shares)
    for index in sorted(range(len(counts)), key=lambda i: (-remainders[i], i))[:left]:
        shares[index] += 1
    return shares


def select(corpus: Corpus, n: int | None, seed: int) -> list[Sample]:
    """Pick `n` samples, category-proportional, seeded; returned in corpus order.

    Each category's share comes from largest-remainder apportionment; when `n` is at least
    the number of categories every category keeps at least one sample. Within a category the
    samples are ranked by a SHA-256 of (seed, category, id), which is the same on every machine
    and Python version, unlike `random`. `n` of None or at least the corpus size returns all.
    """
    if n is not None and (isinstance(n, bool) or n < 1):
        raise UsageError(
            f"cannot select {n} samples", hint="ask for at least 1 sample, or leave it unset for all"
        )
    samples = list(corpus.samples)
    if n is None or n >= len(samples):
        return samples
    groups = _by_category(samples)
    counts = [len(members) for members in groups.values()]
    shares = apportion(counts, n)
    if n >= len(groups):
        _give_everyone_one(shares, counts, n)
    chosen: set[int] = set()
    for (category, members), share in zip(groups.items(), shares):
        ranked = sorted(members, key=lambda i: _rank(seed, "select", category, samples[i].id, i))
        chosen.update(ranked[:share])
    return [samples[i] for i in sorted(chosen)]


def split(samples: list[Sample], eval_fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Split into (calibration, held_out), stratified by category, each part in input order.

    The held-out size is `round(len(samples) * eval_fraction)`, spread over categories by
    largest remainder; which samples go is seeded like `select`. Both parts must be non-empty.
    """
    if isinstance(eval_fraction, bool) or not (0.0 < eval_fraction < 1.0):  # also rejects NaN
        raise UsageError(
            f"eval fraction {eval_fraction} is outside (0, 1)", hint="pass a fraction such as 0.2"
        )
    total = len(samples)
    held_out_size = math.floor(total * eval_fraction + 0.5)
    if held_out_size < 1 or held_out_size > total - 1:
        raise UsageError(
            f"corpus too small to split: {total} sample(s) at eval fraction {eval_fraction} "
            f"leave the {'held-out' if held_out_size < 1 else 'calibration'} part empty",
            hint="use more samples or another eval fraction",
        )
    groups = _by_category(samples)
    shares = apportion([len(members) for members in groups.values()], held_out_size)
    held_out: set[int] = set()
    for (category, members), share in zip(groups.items(), shares):
        ranked = sorted(members, key=lambda i: _rank(seed, "split", category, samples[i].id, i))
        held_out.update(ranked[:share])
    calibration = [s for i, s in enumerate(samples) if i not in held_out]
    evaluation = [s for i, s in enumerate(samples) if i in held_out]
    return calibration, evaluation


def _by_category(samples: Sequence[Sample]) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {}
    for index, sample in enumerate(samples):
        groups.setdefault(sample.category, []).append(index)
    return groups


def _give_everyone_one(shares: list[int], counts: Sequence[int], n: int) -> None:
    # A category that rounded down to nothing takes one sample from the category that is most
    # over its exact quota (share - n*count/size, compared without floats) and can spare one.
    size = sum(counts)
    for empty in [i for i, share in enumerate(shares) if share == 0]:
        donor = max(
            (i for i, share in enumerate(shares) if share > 1),
            key=lambda i: (shares[i] * size - n * counts[i], -i),
        )
        shares[donor] -= 1
        shares[empty] += 1


def _rank(seed: int, purpose: str, category: str, sample_id: str, index: int) -> tuple[bytes, int]:
    key = f"{seed}\x00{purpose}\x00{category}\x00{sample_id}".encode("utf-8", "surrogatepass")
    return hashlib.sha256(key).digest(), index
