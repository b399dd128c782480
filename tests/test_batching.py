"""Token-bucket batching: the C++ bucketer against the Python reference and against a literal
transcription of the authors' sampler; the seeded generator; the budgets; the edge cases."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from uniter_fast.data.batching import (
    SplitMix64,
    token_bucket_batches,
    token_bucket_batches_reference,
)
from uniter_fast.data.collate import extension_error, extension_loaded

needs_ext = pytest.mark.skipif(
    not extension_loaded(), reason=f"uniter_fast._C is not built ({extension_error()})"
)
PROPERTY = settings(deadline=None, max_examples=150, suppress_health_check=[HealthCheck.too_slow])


def authors_sampler(lens, order, bucket_size, batch_size, droplast, size_multiple):
    """The authors' TokenBucketSampler.__iter__ (UNITER data/sampler.py) verbatim, with the
    random.shuffle of the ids replaced by `order` and the final shuffle of the batches left out."""

    def partition_all(n, seq):  # toolz.partition_all
        return [seq[i : i + n] for i in range(0, len(seq), n)]

    ids = list(order)
    buckets = [
        sorted(ids[i : i + bucket_size], key=lambda i: lens[i], reverse=True)
        for i in range(0, len(ids), bucket_size)
    ]
    batches = []
    for bucket in buckets:
        max_len = 0
        batch_indices = []
        for indices in partition_all(size_multiple, bucket):
            max_len = max(max_len, max(lens[i] for i in indices))
            if max_len * (len(batch_indices) + size_multiple) > batch_size:
                if not batch_indices:
                    raise ValueError("max_tokens too small / max_seq_len too long")
                assert len(batch_indices) % size_multiple == 0
                batches.append(batch_indices)
                batch_indices = list(indices)
            else:
                batch_indices.extend(indices)
        if not droplast and batch_indices:
            batches.append(batch_indices)
    return batches


@st.composite
def problems(draw):
    n = draw(st.integers(0, 300))
    # Few distinct lengths sometimes, so that the stable sort's tie order matters.
    top = draw(st.sampled_from([3, 40, 200]))
    seed = draw(st.integers(0, 2**64 - 1))
    lens = np.random.default_rng(seed).integers(1, top + 1, n)
    return {
        "lengths": lens,
        # Mostly budgets that hold a group of the longest samples; sometimes any budget.
        "max_tokens": draw(st.integers(1, 2000) | st.integers(8 * top, 8 * top + 3000)),
        "bucket_size": draw(st.sampled_from([1, 7, 64, 8192])),
        "size_multiple": draw(st.sampled_from([1, 2, 8])),
        "mode": draw(st.sampled_from(["padded", "packed"])),
        "drop_last": draw(st.booleans()),
        "sort_by_length": draw(st.booleans()),
        "seed": seed,
    }


def _run(fn, **kwargs):
    try:
        return fn(**kwargs), None
    except ValueError as e:
        return None, str(e)


def _assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.dtype == np.int64 and y.dtype == np.int64
        assert np.array_equal(x, y)


@needs_ext
@PROPERTY
@given(p=problems(), explicit_order=st.booleans())
def test_cpp_matches_python_reference(p, explicit_order):
    if explicit_order:
        p["order"] = np.random.default_rng(p["seed"] + 1).permutation(len(p["lengths"]))
    got, got_error = _run(token_bucket_batches, backend="cpp", **p)
    want, want_error = _run(token_bucket_batches_reference, **p)
    assert got_error == want_error
    if want is not None:
        _assert_same_batches(got, want)
        unshuffled = token_bucket_batches(shuffle_batches=False, **p)
        # The batch shuffle only reorders whole batches.
        assert sorted(map(tuple, unshuffled)) == sorted(map(tuple, got))


@PROPERTY
@given(p=problems())
def test_padded_mode_is_the_authors_sampler(p):
    lens = p["lengths"].tolist()
    order = np.random.default_rng(p["seed"]).permutation(len(lens))
    args = (p["bucket_size"], p["max_tokens"], p["drop_last"], p["size_multiple"])
    want, want_error = _run(lambda: authors_sampler(lens, order, *args))
    for backend in ("python", "cpp") if extension_loaded() else ("python",):
        got, got_error = _run(
            token_bucket_batches,
            lengths=p["lengths"],
            max_tokens=p["max_tokens"],
            bucket_size=p["bucket_size"],
            size_multiple=p["size_multiple"],
            drop_last=p["drop_last"],
            mode="padded",
            order=order,
            shuffle_batches=False,
            sort_by_length=True,
            backend=backend,
        )
        assert (got_error is None) == (want_error is None)
        if want_error is not None:
            assert "max_tokens too small / max_seq_len too long" in got_error
        else:
            _assert_same_batches(got, [np.asarray(b, dtype=np.int64) for b in want])


@PROPERTY
@given(p=problems())
def test_budgets_and_coverage(p):
    lens = p["lengths"]
    batches, error = _run(token_bucket_batches, **p)
    if error is not None:
        assert p["mode"] == "padded" and "max_tokens too small" in error
        return
    flat = np.concatenate(batches) if batches else np.zeros(0, np.int64)
    assert len(np.unique(flat)) == len(flat)  # no sample twice
    if not p["drop_last"]:
        assert sorted(flat.tolist()) == list(range(len(lens)))  # every sample once
    for batch in batches:
        assert len(batch) > 0
        if p["mode"] == "padded":
            assert len(batch) * lens[batch].max() <= p["max_tokens"]
        else:
            assert lens[batch].sum() <= p["max_tokens"] or len(batch) == 1


def _reference_splitmix64(seed, count):
    # Vigna's splitmix64.c, line by line.
    out, x = [], seed
    for _ in range(count):
        x = (x + 0x9E3779B97F4A7C15) % 2**64
        z = x
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
        out.append(z ^ (z >> 31))
    return out


def test_generator_is_splitmix64():
    rng = SplitMix64(0)
    assert [rng.next() for _ in range(3)] == _reference_splitmix64(0, 3)
    assert _reference_splitmix64(0, 1) == [0xE220A8397B1DCDAF]  # the published first output
    rng = SplitMix64(-1)  # seeds are taken modulo 2^64
    assert rng.next() == _reference_splitmix64(2**64 - 1, 1)[0]
    draws = [SplitMix64(s).below(7) for s in range(2000)]
    assert set(draws) == set(range(7))
    assert SplitMix64(5).below(1) == 0


@needs_ext
@pytest.mark.parametrize("n", [0, 1, 2, 10, 1000])
def test_permutations_are_valid_seeded_and_the_same_in_python(n):
    from uniter_fast import _C

    for seed in (0, 1, 2**64 - 1):
        perm = _C.permutation(n, seed)
        assert perm.dtype == np.int64 and sorted(perm.tolist()) == list(range(n))
        assert np.array_equal(perm, _C.permutation(n, seed))
        ids = list(range(n))
        SplitMix64(seed).shuffle(ids)
        assert perm.tolist() == ids
    if n >= 10:
        assert not np.array_equal(_C.permutation(n, 0), _C.permutation(n, 1))


def test_seeds_repeat_and_differ():
    lens = np.random.default_rng(0).integers(10, 160, 5000)
    a = token_bucket_batches(lens, max_tokens=4096, seed=3)
    _assert_same_batches(a, token_bucket_batches(lens, max_tokens=4096, seed=3))
    _assert_same_batches(a, token_bucket_batches_reference(lens, max_tokens=4096, seed=3))
    b = token_bucket_batches(lens, max_tokens=4096, seed=4)
    assert len(a) != len(b) or any(not np.array_equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("backend", ["python", "cpp"])
def test_edge_cases(backend):
    if backend == "cpp" and not extension_loaded():
        pytest.skip(f"uniter_fast._C is not built ({extension_error()})")
    run = lambda lens, **kw: token_bucket_batches(lens, backend=backend, **kw)  # noqa: E731
    assert run([], max_tokens=10) == []
    assert run(np.zeros(0, np.int32), max_tokens=10, mode="packed") == []
    with pytest.raises(ValueError, match=r"lengths\[1\] is 0; every length must be positive"):
        run([3, 0, 2], max_tokens=10)
    with pytest.raises(ValueError, match=r"lengths\[0\] is -4"):
        run([-4], max_tokens=10)
    with pytest.raises(ValueError, match="max_tokens too small / max_seq_len too long"):
        run([50, 3], max_tokens=100, size_multiple=8)
    with pytest.raises(ValueError, match="not a permutation"):
        run([1, 2, 3], max_tokens=10, order=[0, 0, 2])
    with pytest.raises(ValueError, match="order must be"):
        run([1, 2, 3], max_tokens=10, order=[0, 1])
    with pytest.raises(ValueError, match="must be >= 1"):
        run([1, 2, 3], max_tokens=0)
    with pytest.raises(ValueError, match="mode must be"):
        run([1, 2, 3], max_tokens=10, mode="greedy")
    with pytest.raises(TypeError, match="integer"):
        run([1.5, 2.0], max_tokens=10)
    # Packed: an oversized sample is a batch of its own; an oversized group is split.
    out = run(
        [5, 50, 4, 3],
        max_tokens=10,
        mode="packed",
        size_multiple=2,
        order=[0, 1, 2, 3],
        shuffle_batches=False,
    )
    # Sorted longest first: 50, 5, 4, 3; groups (50, 5) and (4, 3); the first is split.
    assert [b.tolist() for b in out] == [[1], [0], [2, 3]]
    # drop_last drops each bucket's last open batch, as the reference does.
    out = run([4, 4, 4, 4, 4], max_tokens=8, size_multiple=1, bucket_size=5, drop_last=True)
    assert sorted(len(b) for b in out) == [2, 2]


def test_unsorted_batches_follow_the_shuffled_order():
    # sort_by_length=False: batches are consecutive runs of the shuffled order, cut by budget.
    lengths = np.random.default_rng(0).integers(10, 160, 500)
    order = np.random.default_rng(1).permutation(500)
    for backend in ("python", "cpp") if extension_loaded() else ("python",):
        batches = token_bucket_batches(
            lengths,
            max_tokens=1000,
            bucket_size=500,
            size_multiple=1,
            mode="packed",
            order=order,
            shuffle_batches=False,
            sort_by_length=False,
            backend=backend,
        )
        assert np.array_equal(np.concatenate(batches), order)
        assert all(lengths[b].sum() <= 1000 for b in batches)
        # Each batch is closed only by a sample that would not fit.
        for b, nxt in zip(batches, batches[1:], strict=False):
            assert lengths[b].sum() + lengths[nxt[0]] > 1000


def test_unsorted_padded_batches_refuse_a_group_over_the_budget():
    # Unsorted, a longer group can close a batch and open the next; the reference would take it
    # unchecked (sorted longest first it always fits). Here 2 x 60 > 100: both backends refuse,
    # naming the group's length, rather than emit a batch over the budget.
    for backend in ("python", "cpp") if extension_loaded() else ("python",):
        with pytest.raises(ValueError, match="cannot hold 2 samples of length 60"):
            token_bucket_batches(
                np.array([10, 10, 60, 5]),
                max_tokens=100,
                size_multiple=2,
                bucket_size=4,
                mode="padded",
                order=[0, 1, 2, 3],
                shuffle_batches=False,
                sort_by_length=False,
                backend=backend,
            )
