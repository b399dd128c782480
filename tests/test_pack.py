"""The C++ packer (`uniter_fast._C`) against `collate_numpy`, the oracle: every array equal in
dtype, shape and bits, every int equal, the same errors; packing into preallocated buffers; the
NumPy fallback."""

from __future__ import annotations

import importlib
import logging
import os

import numpy as np
import pytest
import torch
from conftest import ragged_sizes, random_examples
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from uniter_fast.data.collate import (
    EXTENSION_ERROR,
    collate,
    collate_cpp,
    collate_numpy,
    extension_loaded,
)
from uniter_fast.data.schema import TASKS

# The module, not the function `uniter_fast.data.collate` that the package re-exports.
collate_mod = importlib.import_module("uniter_fast.data.collate")

# CI (and anyone who sets UNITER_FAST_REQUIRE_EXT=1) must have the extension: a broken build
# fails there instead of silently testing the fallback.
REQUIRE_EXT = os.environ.get("CI") == "true" or os.environ.get("UNITER_FAST_REQUIRE_EXT") == "1"
needs_ext = pytest.mark.skipif(
    not extension_loaded(), reason=f"uniter_fast._C is not built ({EXTENSION_ERROR})"
)
PROPERTY = settings(deadline=None, max_examples=150, suppress_health_check=[HealthCheck.too_slow])


def test_extension_is_loaded_where_required():
    if not extension_loaded():
        assert not REQUIRE_EXT, f"CI / UNITER_FAST_REQUIRE_EXT=1 but _C failed: {EXTENSION_ERROR}"
        pytest.skip(f"uniter_fast._C is not built ({EXTENSION_ERROR})")
    assert EXTENSION_ERROR is None
    import uniter_fast._C as C

    assert hasattr(C, "PackPlan") and hasattr(C, "bucket_batches")


def _bits(a: np.ndarray) -> np.ndarray:
    return a.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def assert_same_arrays(want: dict, got: dict) -> None:
    """Equal keys; arrays equal in dtype, shape and value (floats bit for bit, NaN as NaN)."""
    assert sorted(got) == sorted(want)
    for key, w in want.items():
        g = got[key]
        if not isinstance(w, np.ndarray):
            assert type(g) is int and g == w, key
            continue
        assert isinstance(g, np.ndarray), key
        assert (g.dtype, g.shape) == (w.dtype, w.shape), key
        if w.dtype.kind == "f":
            nan = np.isnan(w)
            assert np.array_equal(np.isnan(g), nan), key
            assert np.array_equal(_bits(g)[~nan], _bits(w)[~nan]), key
        else:
            assert np.array_equal(g, w), key


# --- random ragged batches ------------------------------------------------------------------------

SPECIAL = np.array([0.0, -0.0, np.inf, -np.inf, 6e-8, -3e-5, 65504.0, 1e-40, np.nan])


def make_examples(draw_spec: dict) -> list[dict]:
    """Examples from a drawn spec: sizes and dtypes from hypothesis, values from a seeded RNG."""
    rng = np.random.default_rng(draw_spec["seed"])
    dim, classes = draw_spec["dim"], draw_spec["classes"]
    examples = []
    for (txt_len, n), dt in zip(draw_spec["sizes"], draw_spec["dtypes"], strict=True):
        ids = rng.integers(0, 28996, txt_len).astype(dt["ids"])
        labels = np.where(rng.random(txt_len) < 0.3, rng.integers(0, 28996, txt_len), -1)
        feat = rng.standard_normal((n, dim))
        if draw_spec["specials"]:
            pick = rng.random((n, dim)) < 0.2
            feat[pick] = rng.choice(SPECIAL, int(pick.sum()))
        # Soft labels from a few values, so that rows tie and the first maximum must win.
        soft = rng.choice([0.0, -0.0, 0.125, 0.25, 0.5], (n, classes))
        if draw_spec["specials"]:
            pick = rng.random((n, classes)) < 0.05
            soft[pick] = rng.choice(SPECIAL, int(pick.sum()))
        with np.errstate(over="ignore"):
            example = {
                "input_ids": ids,
                "txt_labels": labels.astype(dt["labels"]),
                "img_feat": feat.astype(dt["feat"]),
                "img_loc": rng.random((n, 7)).astype(dt["loc"]),
                "img_mask": rng.random(n) < 0.3,
                "soft_labels": soft.astype(dt["soft"]),
                "itm_target": dt["itm"](int(rng.integers(2))),
            }
        examples.append(example)
    # The tasks need at least one target in the batch; the error cases have their own tests.
    examples[0]["img_mask"][-1] = True
    examples[-1]["txt_labels"][0] = 7
    return examples


example_dtypes = st.fixed_dictionaries(
    {
        "ids": st.sampled_from([np.int64, np.int32]),
        "labels": st.sampled_from([np.int64, np.int32]),
        "feat": st.sampled_from([np.float16, np.float16, np.float32, np.float64]),
        "loc": st.sampled_from([np.float32, np.float64]),
        "soft": st.sampled_from([np.float16, np.float16, np.float32]),
        "itm": st.sampled_from([int, np.int64, bool]),
    }
)


@st.composite
def batch_specs(draw, max_batch: int = 12):
    b = draw(st.integers(1, max_batch))
    uniform = draw(st.booleans())  # one dtype set for the whole batch (the common case)
    dtypes = [draw(example_dtypes)] * b if uniform else [draw(example_dtypes) for _ in range(b)]
    return {
        "seed": draw(st.integers(0, 2**32 - 1)),
        "dim": draw(st.sampled_from([1, 3, 8, 17])),
        "classes": draw(st.sampled_from([2, 3, 9])),
        "sizes": [(draw(st.integers(1, 20)), draw(st.integers(1, 9))) for _ in range(b)],
        "dtypes": dtypes,
        "specials": draw(st.booleans()),
    }


@needs_ext
@pytest.mark.parametrize("task", TASKS)
@PROPERTY
@given(spec=batch_specs())
def test_cpp_packer_matches_numpy_oracle(task, spec):
    examples = make_examples(spec)
    assert_same_arrays(collate_numpy(examples, task), collate_cpp(examples, task))


@needs_ext
@pytest.mark.parametrize("task", TASKS)
def test_large_and_tiny_batches(task, rng):
    big = random_examples(rng, ragged_sizes(rng, 300), img_dim=6, label_dim=5)
    one = random_examples(rng, [(2, 1)], img_dim=3, label_dim=2)  # then a 1-token caption
    one[0].update(input_ids=np.array([101]), txt_labels=np.array([5]), img_mask=np.ones(1, bool))
    for examples in (big, one):
        assert_same_arrays(collate_numpy(examples, task), collate_cpp(examples, task))
        for pad_multiple in (1, 3, 64):
            assert_same_arrays(
                collate_numpy(examples, task, pad_multiple=pad_multiple),
                collate_cpp(examples, task, pad_multiple=pad_multiple),
            )


@needs_ext
def test_every_float16_value_converts_as_numpy_does():
    # All 65536 bit patterns (subnormals, infinities, NaNs) next to a float32 example: the output
    # is float32 and every value must be NumPy's float16 -> float32 conversion.
    half = np.arange(2**16, dtype=np.uint32).astype(np.uint16).view(np.float16).reshape(-1, 64)
    examples = [
        {
            "input_ids": np.array([101, 102]),
            "img_feat": half,
            "img_loc": np.zeros((half.shape[0], 7), np.float32),
            "itm_target": 1,
        },
        {
            "input_ids": np.array([101]),
            "img_feat": np.ones((1, 64), np.float32),
            "img_loc": np.zeros((1, 7), np.float32),
            "itm_target": 0,
        },
    ]
    got = collate_cpp(examples, "itm")["img_feat"][:-1]
    want = half.astype(np.float32)
    assert got.dtype == np.float32
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan)
    assert np.array_equal(_bits(got)[~nan], _bits(want)[~nan])


@needs_ext
@pytest.mark.parametrize("task", ["mrc", "mrckl"])
def test_mrc_label_argmax_rules_in_float16_and_float32(task):
    # Ties (first wins), -0 == +0, negative rows, infinities and NaN (first NaN wins), column 0
    # (background) never the label.
    rows = np.array(
        [
            [9.0, 0.25, 0.5, 0.5],
            [9.0, -0.0, 0.0, -0.0],
            [9.0, -3.0, -1.0, -1.0],
            [9.0, 1.0, np.inf, np.inf],
            [9.0, 1.0, np.nan, np.nan],
            [np.nan, np.nan, 1.0, 2.0],
            [9.0, -np.inf, -np.inf, -np.inf],
        ]
    )
    for dtype in (np.float16, np.float32):
        soft = rows.astype(dtype)
        n = soft.shape[0]
        examples = [
            {
                "input_ids": np.array([101, 102]),
                "img_feat": np.ones((n, 4), np.float16),
                "img_loc": np.zeros((n, 7), np.float32),
                "img_mask": np.ones(n, bool),
                "soft_labels": soft,
            }
        ]
        got = collate_cpp(examples, task)
        assert got["mrc_label"].tolist() == (1 + soft[:, 1:].argmax(1)).tolist()
        assert_same_arrays(collate_numpy(examples, task), got)


@needs_ext
@pytest.mark.parametrize("classes", [32767, 32768, 40000])
def test_mrc_label_on_rows_wider_than_int16(classes, rng):
    # float16 rows switch from the vectorised 16-bit argmax to the scalar one past 32767 classes.
    soft = rng.choice([0.0, -0.0, 0.5, 1.0], (3, classes)).astype(np.float16)
    soft[0, -1] = 2.0  # the maximum in the last class
    soft[2, classes // 2] = np.nan
    examples = [
        {
            "input_ids": np.array([101, 102]),
            "img_feat": np.ones((3, 4), np.float16),
            "img_loc": np.zeros((3, 7), np.float32),
            "img_mask": np.ones(3, bool),
            "soft_labels": soft,
        }
    ]
    got = collate_cpp(examples, "mrc")
    assert got["mrc_label"].tolist() == [classes - 1, *(1 + soft[1:, 1:].argmax(1)).tolist()]
    assert_same_arrays(collate_numpy(examples, "mrc"), got)


@needs_ext
def test_odd_input_layouts_and_read_only_inputs(rng):
    examples = random_examples(rng, ragged_sizes(rng, 4), img_dim=10, label_dim=4)
    wide = rng.standard_normal((examples[0]["img_feat"].shape[0], 20)).astype(np.float16)
    examples[0]["img_feat"] = wide[:, ::2]  # strided
    examples[1]["img_loc"] = examples[1]["img_loc"].astype(">f4")  # big-endian
    examples[2]["input_ids"] = examples[2]["input_ids"].astype(np.uint16)
    examples[3]["input_ids"] = examples[3]["input_ids"].tolist()  # a list, as np.asarray takes
    for ex in examples:
        for v in ex.values():
            if isinstance(v, np.ndarray):
                v.flags.writeable = False  # shard records are read-only
    before = [{k: np.copy(v) for k, v in ex.items()} for ex in examples]
    for task in TASKS:
        assert_same_arrays(collate_numpy(examples, task), collate_cpp(examples, task))
    for ex, saved in zip(examples, before, strict=True):
        for k, v in saved.items():
            assert np.array_equal(np.asarray(ex[k]), v), k  # inputs untouched (no zeroing)


# --- errors ---------------------------------------------------------------------------------------


def _one(rng, **override):
    ex = random_examples(rng, [(5, 4)], img_dim=8)[0]
    ex.update(override)
    return ex


BAD = [
    ({"img_loc": np.zeros((4, 6), np.float32)}, "itm"),
    ({"img_feat": np.zeros((4, 9), np.float16)}, "itm"),
    ({"img_feat": np.zeros(8, np.float16)}, "itm"),
    ({"img_feat": np.zeros((0, 8), np.float16), "img_loc": np.zeros((0, 7), np.float32)}, "itm"),
    ({"input_ids": np.array([], np.int64)}, "itm"),
    ({"input_ids": np.ones((2, 2), np.int64)}, "mlm"),
    ({"input_ids": np.ones(3, np.float32)}, "mlm"),
    ({"txt_labels": np.array([-1, -1])}, "mlm"),
    ({"img_mask": np.ones(3, bool)}, "mrfr"),
    ({"img_mask": np.ones(4, np.uint8)}, "mrc"),
    ({"soft_labels": np.ones((3, 1601), np.float16)}, "mrckl"),
    ({"itm_target": 2}, "itm"),
    ({"itm_target": 1.0}, "itm"),
    ({"img_feat": np.zeros((4, 8), np.int32)}, "itm"),
    ({"soft_labels": np.zeros((4, 1601), np.int64)}, "mrc"),
]


@needs_ext
@pytest.mark.parametrize("override, task", BAD)
def test_bad_examples_raise_what_the_oracle_raises(rng, override, task):
    examples = [_one(rng), _one(rng, **override), _one(rng)]
    with pytest.raises((ValueError, TypeError)) as want:
        collate_numpy(examples, task)
    with pytest.raises(want.type) as got:
        collate_cpp(examples, task)
    assert str(got.value) == str(want.value)
    assert "example 1" in str(got.value) or "itm_target" in str(got.value)


@needs_ext
def test_missing_fields_and_empty_targets(rng):
    for field, task in [
        ("input_ids", "itm"),
        ("img_feat", "itm"),
        ("img_loc", "mlm"),
        ("txt_labels", "mlm"),
        ("img_mask", "mrfr"),
        ("soft_labels", "mrckl"),
        ("itm_target", "itm"),
    ]:
        ex = _one(rng)
        del ex[field]
        with pytest.raises(ValueError, match=f"example 1: missing field '{field}'"):
            collate_cpp([_one(rng), ex], task)
    with pytest.raises(TypeError, match="example 0: expected a dict, got list"):
        collate_cpp([[1, 2]], "mlm")
    ex = _one(rng, txt_labels=np.full(5, -1))
    with pytest.raises(ValueError, match="no masked token"):
        collate_cpp([ex], "mlm")
    ex = _one(rng, img_mask=np.zeros(4, bool))
    with pytest.raises(ValueError, match="no masked region"):
        collate_cpp([ex], "mrfr")
    with pytest.raises(ValueError, match="no examples"):
        collate_cpp([], "mlm")
    with pytest.raises(ValueError, match="unknown task"):
        collate_cpp([ex], "vqa")
    with pytest.raises(ValueError, match="pad_multiple"):
        collate_cpp([ex], "itm", pad_multiple=0)


@needs_ext
def test_stricter_than_numpy_casts_name_the_example(rng):
    # Types NumPy would cast silently and the packer refuses, with a TypeError saying so.
    cases = [
        ({"img_loc": np.zeros((4, 7), np.int64)}, "itm", "example 1: img_loc must be float"),
        (
            {"txt_labels": np.zeros(5, np.float32)},
            "mlm",
            "example 1: txt_labels must be an integer",
        ),
    ]
    if np.dtype(np.longdouble).itemsize > 8:  # x86-64 Linux; elsewhere long double is double
        wide = np.zeros((4, 8), np.longdouble)
        cases.append(({"img_feat": wide}, "itm", f"example 1: img_feat has dtype {wide.dtype}"))
    for override, task, message in cases:
        with pytest.raises(TypeError, match=message):
            collate_cpp([_one(rng), _one(rng, **override)], task)
    soft = _one(rng, soft_labels=np.zeros((4, 7), np.float16))
    with pytest.raises(ValueError, match=r"example 1: soft_labels has shape \(4, 7\)"):
        collate_cpp([_one(rng), soft], "mrc")
    one_class = [_one(rng, soft_labels=np.ones((4, 1), np.float16))]
    with pytest.raises(ValueError, match="C must be >= 2"):
        collate_cpp(one_class, "mrc")


# --- preallocated outputs -------------------------------------------------------------------------


def _poison(nbytes: int) -> torch.Tensor:
    # Garbage everywhere, so that any element the packer fails to write shows.
    return torch.full((nbytes,), 0xA7, dtype=torch.uint8)


@needs_ext
@pytest.mark.parametrize("task", TASKS)
def test_pack_into_poisoned_buffers(task, rng):
    from uniter_fast import _C

    examples = random_examples(rng, ragged_sizes(rng, 7), img_dim=12, label_dim=6)
    want = collate_numpy(examples, task)
    plan = _C.PackPlan(examples, task, 8)
    assert plan.task == task and plan.num_pairs == 7
    assert plan.num_rows == int(want["cu_seqlens"][-1])
    out = {}
    for name, shape, dtype in plan.outputs():
        out[name] = np.empty(shape, dtype)
        out[name].view(np.uint8)[...] = 0xA7
    plan.pack_into(out)
    plan.pack_into(out)  # a plan packs any number of times
    assert_same_arrays(want, {**out, **plan.scalars()})

    # The same through collate's allocator hook: one poisoned arena, views into it.
    arrays = collate_cpp(examples, task, out=_poison)
    assert_same_arrays(want, arrays)
    batch = collate(examples, task, out="shared")
    assert all(t.is_shared() for t in batch.tensors().values())
    assert_same_arrays(want, _batch_arrays(batch))


@needs_ext
def test_pack_into_rejects_wrong_buffers(rng):
    from uniter_fast import _C

    examples = random_examples(rng, ragged_sizes(rng, 3), img_dim=4)
    plan = _C.PackPlan(examples, "mlm")
    good = {name: np.empty(shape, dtype) for name, shape, dtype in plan.outputs()}
    n = good["input_ids"].shape[0]
    bad_cases = {
        "missing output 'txt_pos'": {k: v for k, v in good.items() if k != "txt_pos"},
        "output 'input_ids' must be": {**good, "input_ids": np.empty(n, np.int32)},
        "output 'txt_dest' must be": {**good, "txt_dest": np.empty(n + 1, np.int64)},
        "output 'pad_index' must be": {**good, "pad_index": good["pad_index"].T.copy().T},
    }
    read_only = np.empty(n, np.int64)
    read_only.flags.writeable = False
    bad_cases["(read-only)"] = {**good, "txt_pos": read_only}
    for message, out in bad_cases.items():
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            plan.pack_into(out)
    with pytest.raises(TypeError, match="must be a NumPy array"):
        plan.pack_into({**good, "txt_pos": torch.empty(n, dtype=torch.int64)})
    with pytest.raises(ValueError, match="allocator must return"):
        collate_cpp(examples, "mlm", out=lambda nbytes: torch.empty(nbytes, dtype=torch.int64))
    with pytest.raises(ValueError, match="out must be"):
        collate(examples, "mlm", out="gpu")


# --- the Batch, both backends ---------------------------------------------------------------------


def _batch_arrays(batch) -> dict:
    fields = {k: v.numpy() for k, v in batch.tensors().items()}
    fields.update(
        max_seqlen=batch.max_seqlen, max_txt_len=batch.max_txt_len, max_img_len=batch.max_img_len
    )
    return fields


@pytest.mark.parametrize("task", TASKS)
def test_numpy_fallback_gives_the_same_batch(task, rng):
    examples = random_examples(rng, ragged_sizes(rng, 5), img_dim=8, label_dim=5)
    want = collate_numpy(examples, task)
    by_numpy = collate(examples, task, backend="numpy")
    assert by_numpy.task == task
    assert_same_arrays(want, _batch_arrays(by_numpy))
    assert_same_arrays(want, _batch_arrays(collate(examples, task, backend="numpy", out=_poison)))
    if extension_loaded():
        by_cpp = collate(examples, task, backend="cpp")
        assert by_cpp.task == task
        assert_same_arrays(want, _batch_arrays(by_cpp))
        assert_same_arrays(want, _batch_arrays(collate(examples, task)))


def test_missing_extension_warns_once_and_falls_back(rng, monkeypatch, caplog):
    monkeypatch.setattr(collate_mod, "_C", None)
    monkeypatch.setattr(collate_mod, "EXTENSION_ERROR", "ImportError: no module named _C (test)")
    monkeypatch.setattr(collate_mod, "_fallback_warned", False)
    examples = random_examples(rng, ragged_sizes(rng, 3), img_dim=8)
    assert not collate_mod.extension_loaded()
    with caplog.at_level(logging.WARNING, logger="uniter_fast.data"):
        first = collate(examples, "mlm")
        collate(examples, "itm")
    warnings = [r for r in caplog.records if r.name == "uniter_fast.data"]
    assert len(warnings) == 1
    assert "no module named _C (test)" in warnings[0].getMessage()
    assert "UNITER_FAST_REQUIRE_EXT" in warnings[0].getMessage()
    assert_same_arrays(collate_numpy(examples, "mlm"), _batch_arrays(first))
    with pytest.raises(RuntimeError, match=r"not importable \(ImportError: no module named _C"):
        collate(examples, "mlm", backend="cpp")
    with pytest.raises(ValueError, match="backend must be"):
        collate(examples, "mlm", backend="rust")
