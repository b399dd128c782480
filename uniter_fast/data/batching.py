"""Token-bucket batching: the authors' TokenBucketSampler, seeded with a specified generator.

    from uniter_fast.data.batching import token_bucket_batches
    batches = token_bucket_batches(lengths, max_tokens=8192, seed=epoch_seed)  # [int64 array]

`lengths[i]` is sample i's real length (text tokens plus regions). The algorithm, `mode="padded"`
(the reference's, line for line):

1. shuffle the sample ids (or take the explicit permutation `order`);
2. cut them into buckets of `bucket_size`, and sort each bucket by length, longest first; the
   sort is stable, so equal lengths keep their shuffled order (Python's `sorted`);
3. walk each bucket in groups of `size_multiple` (the last group may be shorter): with
   `max_len` the longest sample seen so far in the bucket, a group joins the current batch while
   `max_len * (len(batch) + size_multiple) <= max_tokens`; otherwise the batch closes and the
   group opens the next one. A first group that does not fit raises ValueError ("max_tokens too
   small / max_seq_len too long"). The bucket's last batch is kept unless `drop_last`;
4. shuffle the batches (unless `shuffle_batches=False`).

Kept from the reference on purpose: `max_len` is never reset when a batch closes. The bucket is
sorted longest first, so every batch of a bucket is budgeted as if its samples were as long as
the bucket's longest, and batches late in a bucket hold fewer samples than the padded budget
would allow. Changing it would change which samples train together.

`mode="packed"` budgets real tokens instead, for the packed (unpadded) batch: the same shuffle,
buckets, sort and groups, but a group joins the batch while `sum(lengths in batch) + sum(lengths
in group) <= max_tokens`. A group that does not fit closes the batch and opens the next one; a
group larger than the whole budget is split into single samples that fill batches in order;
a single sample larger than the budget is a batch of its own (never an error).

Randomness: SplitMix64 (Steele, Lea and Flood 2014) seeded with `seed` (taken modulo 2^64),
uniform draws below a bound by rejection (`below`), and Fisher-Yates from the back as Python's
`random.shuffle` does. The id shuffle draws first (none when `order` is given) and the batch
shuffle continues the same stream. The C++ extension (`uniter_fast._C.bucket_batches`) and the
pure-Python reference here (`token_bucket_batches_reference`, the tests' oracle and the fallback
when the extension is missing) implement exactly this, so a seed gives the same batches on every
platform, with or without the extension.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .collate import _C

BUCKET_SIZE = 8192  # the reference's BUCKET_SIZE (utils/const.py)
SIZE_MULTIPLE = 8  # the reference's size_multiple: batch sizes in multiples of 8
MODES = ("padded", "packed")
_MASK64 = (1 << 64) - 1


class SplitMix64:
    """The generator both implementations use; `next()` returns 64-bit unsigned ints."""

    def __init__(self, seed: int):
        self.state = seed & _MASK64

    def next(self) -> int:
        self.state = (self.state + 0x9E3779B97F4A7C15) & _MASK64
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        return z ^ (z >> 31)

    def below(self, bound: int) -> int:
        """Uniform in [0, bound): draws below 2^64 mod bound are rejected (no modulo bias)."""
        threshold = ((1 << 64) - bound) % bound
        while True:
            x = self.next()
            if x >= threshold:
                return x % bound

    def shuffle(self, items: list) -> None:
        """In place, Fisher-Yates from the back (the loop of Python's random.shuffle)."""
        for i in range(len(items) - 1, 0, -1):
            j = self.below(i + 1)
            items[i], items[j] = items[j], items[i]


def _check(lengths: np.ndarray, max_tokens: int, bucket_size: int, size_multiple: int, mode: str):
    if mode not in MODES:
        raise ValueError(f"bucketing: mode must be 'padded' or 'packed', got {mode!r}")
    if min(max_tokens, bucket_size, size_multiple) < 1:
        raise ValueError(
            "bucketing: max_tokens, bucket_size and size_multiple must be >= 1, got "
            f"{max_tokens}, {bucket_size}, {size_multiple}"
        )
    bad = np.flatnonzero(lengths <= 0)
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"bucketing: lengths[{i}] is {int(lengths[i])}; every length must be positive"
        )


def _as_lengths(lengths: Sequence[int] | np.ndarray) -> np.ndarray:
    arr = np.asarray(lengths)
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise TypeError(
            f"bucketing: lengths must be a 1-d integer array, got {arr.dtype} {arr.shape}"
        )
    return np.ascontiguousarray(arr, dtype=np.int64)


def _as_order(order, n: int) -> np.ndarray | None:
    if order is None:
        return None
    arr = np.asarray(order)
    if arr.ndim != 1 or arr.shape[0] != n or (n and arr.dtype.kind not in "iu"):
        raise ValueError(
            f"bucketing: order must be a 1-d integer permutation of 0..{n - 1}, got {arr.dtype} "
            f"{arr.shape}"
        )
    return np.ascontiguousarray(arr, dtype=np.int64)


def token_bucket_batches(
    lengths: Sequence[int] | np.ndarray,
    *,
    max_tokens: int,
    bucket_size: int = BUCKET_SIZE,
    size_multiple: int = SIZE_MULTIPLE,
    mode: str = "padded",
    drop_last: bool = False,
    seed: int = 0,
    order: Sequence[int] | np.ndarray | None = None,
    shuffle_batches: bool = True,
    sort_by_length: bool = True,
    backend: str = "auto",
) -> list[np.ndarray]:
    """Batches of sample indices under a token budget (the algorithm: this module's docstring).

    lengths: int [n], every entry > 0 (text tokens + regions of sample i).
    max_tokens: the budget per batch, padded (`mode="padded"`: max_len x samples) or real
        (`mode="packed"`: the sum of the samples' lengths).
    order: int [n], a permutation of 0..n-1 used instead of the seeded first shuffle.
    shuffle_batches: False keeps the batches in bucket order (the deterministic part).
    sort_by_length: False skips step 2's sort: batches are filled in shuffled order (random
        batches under the budget; no length buckets).
    backend: "auto" (the C++ extension when loaded), "cpp" or "python" (the reference).

    Returns a list of int64 index arrays [batch size], together a permutation of 0..n-1 (less
    the dropped batches with `drop_last`). Empty lengths give no batches. Raises ValueError for a
    non-positive length, a bad option, a non-permutation `order`, or (padded) a budget below one
    group of the longest samples.
    """
    if backend not in ("auto", "cpp", "python"):
        raise ValueError(f"bucketing: backend must be 'auto', 'cpp' or 'python', got {backend!r}")
    if backend == "python" or (backend == "auto" and _C is None):
        return token_bucket_batches_reference(
            lengths,
            max_tokens=max_tokens,
            bucket_size=bucket_size,
            size_multiple=size_multiple,
            mode=mode,
            drop_last=drop_last,
            seed=seed,
            order=order,
            shuffle_batches=shuffle_batches,
            sort_by_length=sort_by_length,
        )
    if _C is None:
        raise RuntimeError("bucketing: backend='cpp' but uniter_fast._C is not importable")
    lens = _as_lengths(lengths)
    _check(lens, max_tokens, bucket_size, size_multiple, mode)
    offsets, indices = _C.bucket_batches(
        lens,
        max_tokens=max_tokens,
        bucket_size=bucket_size,
        size_multiple=size_multiple,
        drop_last=drop_last,
        mode=mode,
        seed=seed & _MASK64,
        order=_as_order(order, lens.shape[0]),
        shuffle_batches=shuffle_batches,
        sort_by_length=sort_by_length,
    )
    return [indices[offsets[k] : offsets[k + 1]] for k in range(offsets.shape[0] - 1)]


def token_bucket_batches_reference(
    lengths: Sequence[int] | np.ndarray,
    *,
    max_tokens: int,
    bucket_size: int = BUCKET_SIZE,
    size_multiple: int = SIZE_MULTIPLE,
    mode: str = "padded",
    drop_last: bool = False,
    seed: int = 0,
    order: Sequence[int] | np.ndarray | None = None,
    shuffle_batches: bool = True,
    sort_by_length: bool = True,
) -> list[np.ndarray]:
    """`token_bucket_batches` in plain Python, written as the authors' sampler is: the oracle.

    Same arguments and result; the authors' `random.shuffle` is replaced by `SplitMix64`.
    """
    lens_arr = _as_lengths(lengths)
    _check(lens_arr, max_tokens, bucket_size, size_multiple, mode)
    lens = lens_arr.tolist()
    n = len(lens)
    rng = SplitMix64(seed)
    if order is None:
        ids = list(range(n))
        rng.shuffle(ids)
    else:
        ids = _as_order(order, n).tolist()
        seen = set()
        for k, i in enumerate(ids):
            if not 0 <= i < n or i in seen:
                raise ValueError(
                    f"bucketing: order is not a permutation of 0..{n - 1} (order[{k}] = {i})"
                )
            seen.add(i)
    buckets = [
        sorted(ids[i : i + bucket_size], key=lambda i: lens[i], reverse=True)
        if sort_by_length
        else ids[i : i + bucket_size]
        for i in range(0, n, bucket_size)
    ]
    batches: list[list[int]] = []
    for bucket in buckets:
        groups = [bucket[i : i + size_multiple] for i in range(0, len(bucket), size_multiple)]
        if mode == "padded":
            batch = _fill_padded(lens, groups, max_tokens, size_multiple, batches)
        else:
            batch = _fill_packed(lens, groups, max_tokens, batches)
        if not drop_last and batch:
            batches.append(batch)
    if shuffle_batches:
        rng.shuffle(batches)
    return [np.asarray(b, dtype=np.int64) for b in batches]


def _fill_padded(lens, groups, max_tokens, size_multiple, batches) -> list[int]:
    """The reference's loop over one bucket; returns the open last batch."""
    max_len = 0
    batch_indices: list[int] = []
    for indices in groups:
        group_max = max(lens[i] for i in indices)
        max_len = max(max_len, group_max)  # never reset: see module doc
        if max_len * (len(batch_indices) + size_multiple) > max_tokens:
            # The reference starts the next batch with this group unchecked; sorted longest
            # first it always fits, unsorted (sort_by_length=False) it may not: refuse that too.
            if not batch_indices or group_max * size_multiple > max_tokens:
                too_long = group_max if batch_indices else max_len
                raise ValueError(
                    f"bucketing: max_tokens {max_tokens} cannot hold {size_multiple} samples of "
                    f"length {too_long} (max_tokens too small / max_seq_len too long)"
                )
            batches.append(batch_indices)
            batch_indices = list(indices)
        else:
            batch_indices.extend(indices)
    return batch_indices


def _fill_packed(lens, groups, max_tokens, batches) -> list[int]:
    """Packed mode over one bucket (module doc); returns the open last batch."""
    batch: list[int] = []
    used = 0
    for indices in groups:
        group = sum(lens[i] for i in indices)
        if used + group <= max_tokens:
            batch.extend(indices)
            used += group
            continue
        if batch:
            batches.append(batch)
            batch, used = [], 0
        if group <= max_tokens:
            batch, used = list(indices), group
            continue
        for i in indices:  # a group larger than the budget: single samples, in order
            if used + lens[i] > max_tokens and batch:
                batches.append(batch)
                batch, used = [], 0
            batch.append(i)
            used += lens[i]
    return batch
