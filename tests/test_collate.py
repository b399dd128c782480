"""The packed batch: invariants of every index, targets and the padded view, on ragged inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import ragged_sizes, random_examples

from uniter_fast.data import collate, collate_numpy
from uniter_fast.data.schema import TASKS


@pytest.mark.parametrize("task", TASKS)
def test_layout_invariants(task, rng):
    for _ in range(5):
        sizes = ragged_sizes(rng, int(rng.integers(1, 12)))
        examples = random_examples(rng, sizes, img_dim=16, label_dim=9)
        b = collate_numpy(examples, task)
        txt_len = np.array([t for t, _ in sizes])
        img_len = np.array([i for _, i in sizes])
        n = int((txt_len + img_len).sum())
        assert b["cu_seqlens"].dtype == np.int32
        assert b["cu_seqlens"].tolist() == [0, *np.cumsum(txt_len + img_len).tolist()]
        # Every packed row is written exactly once, text first in each sequence.
        rows = np.concatenate([b["txt_dest"], b["img_dest"]])
        assert sorted(rows.tolist()) == list(range(n))
        for k, ex in enumerate(examples):
            start = b["cu_seqlens"][k]
            t0 = txt_len[:k].sum()
            i0 = img_len[:k].sum()
            assert (b["txt_dest"][t0 : t0 + txt_len[k]] == start + np.arange(txt_len[k])).all()
            assert (b["input_ids"][t0 : t0 + txt_len[k]] == ex["input_ids"]).all()
            assert (b["txt_pos"][t0 : t0 + txt_len[k]] == np.arange(txt_len[k])).all()
            assert (
                b["img_dest"][i0 : i0 + img_len[k]] == start + txt_len[k] + np.arange(img_len[k])
            ).all()
            assert np.array_equal(b["img_loc"][i0 : i0 + img_len[k]], ex["img_loc"])
        assert b["max_seqlen"] == int((txt_len + img_len).max())
        assert (b["max_txt_len"], b["max_img_len"]) == (txt_len.max(), img_len.max())
        # The padded view and its inverse.
        lpad = b["pad_index"].shape[1]
        assert lpad % 8 == 0 and lpad >= b["max_seqlen"] and lpad - b["max_seqlen"] < 8
        flat = b["pad_index"].reshape(-1)
        assert (flat[b["unpad_index"]] == np.arange(n)).all()
        assert (flat == n).sum() == flat.size - n
        for k in range(len(sizes)):
            real = b["pad_index"][k][b["pad_index"][k] < n]
            assert real.tolist() == list(range(b["cu_seqlens"][k], b["cu_seqlens"][k + 1]))


def test_mlm_targets_in_batch_major_order(rng):
    examples = random_examples(rng, ragged_sizes(rng, 6), img_dim=8)
    b = collate_numpy(examples, "mlm")
    labels = np.concatenate([ex["txt_labels"] for ex in examples])
    assert (b["mlm_labels"] == labels[labels != -1]).all()
    assert (b["mlm_index"] == b["txt_dest"][labels != -1]).all()
    assert np.diff(b["mlm_index"]).min() > 0
    assert not b["img_masked"].any()


@pytest.mark.parametrize("task", ["mrfr", "mrc", "mrckl"])
def test_region_masking_targets(task, rng):
    examples = random_examples(rng, ragged_sizes(rng, 5), img_dim=12, label_dim=7)
    b = collate_numpy(examples, task)
    mask = np.concatenate([ex["img_mask"] for ex in examples])
    feats = np.concatenate([ex["img_feat"] for ex in examples])
    assert (b["img_masked"] == mask).all()
    assert (b["img_feat"][mask] == 0).all() and (b["img_feat"][~mask] == feats[~mask]).all()
    assert (b["mrm_index"] == b["img_dest"][mask]).all()
    if task == "mrfr":
        assert np.array_equal(b["mrfr_target"], feats[mask])
        assert "mrc_soft_target" not in b
    else:
        soft = np.concatenate([ex["soft_labels"] for ex in examples])[mask]
        assert np.array_equal(b["mrc_soft_target"], soft)
        assert (b["mrc_label"] == 1 + soft[:, 1:].argmax(1)).all() and (b["mrc_label"] >= 1).all()
    # The examples themselves are untouched (images are shared between pairs).
    assert not any(
        (ex["img_feat"][ex["img_mask"]] == 0).all() for ex in examples if ex["img_mask"].any()
    )


def test_itm_targets(rng):
    examples = random_examples(rng, ragged_sizes(rng, 7), img_dim=8)
    b = collate_numpy(examples, "itm")
    assert b["itm_target"].tolist() == [ex["itm_target"] for ex in examples]
    assert b["itm_target"].dtype == np.int64


def test_feature_dtypes(rng):
    half = random_examples(rng, [(5, 3), (4, 2)], img_dim=8)
    assert collate_numpy(half, "itm")["img_feat"].dtype == np.float16
    full = random_examples(rng, [(5, 3)], img_dim=8, feat_dtype=np.float32)
    mixed = collate_numpy(half + full, "mrfr")
    assert mixed["img_feat"].dtype == np.float32 and mixed["mrfr_target"].dtype == np.float32
    assert np.array_equal(
        mixed["img_feat"][-3:][~full[0]["img_mask"]], full[0]["img_feat"][~full[0]["img_mask"]]
    )


def test_batch_wraps_without_copy_and_moves(rng):
    batch = collate(random_examples(rng, [(6, 4), (3, 9)], img_dim=8), "mlm")
    assert batch.num_pairs == 2 and batch.num_tokens == 6 + 4 + 3 + 9 and batch.num_txt_tokens == 9
    assert batch.cu_seqlens.dtype == torch.int32 and batch.mlm_index.dtype == torch.int64
    moved = batch.to("cpu")
    assert moved.task == "mlm" and moved.max_seqlen == batch.max_seqlen
    assert moved.mrm_index is None


def _one(rng, **override):
    ex = random_examples(rng, [(5, 4)], img_dim=8)[0]
    ex.update(override)
    return ex


@pytest.mark.parametrize(
    "override, task, message",
    [
        (
            {"img_loc": np.zeros((4, 6), np.float32)},
            "itm",
            r"example 1: img_loc has shape \(4, 6\)",
        ),
        (
            {"img_feat": np.zeros((0, 8), np.float16), "img_loc": np.zeros((0, 7), np.float32)},
            "itm",
            "example 1: img_feat has no regions",
        ),
        ({"input_ids": np.array([], np.int64)}, "itm", "example 1: input_ids must be a non-empty"),
        ({"txt_labels": np.array([-1, -1])}, "mlm", "example 1: txt_labels has shape"),
        ({"img_mask": np.ones(3, bool)}, "mrfr", "example 1: img_mask must be bool of shape"),
        ({"itm_target": 2}, "itm", "itm_target must be 0 or 1"),
        ({"img_feat": np.zeros((4, 8), np.int32)}, "itm", "img_feat must be floating point"),
    ],
)
def test_bad_examples_name_the_example_and_field(rng, override, task, message):
    examples = [_one(rng), _one(rng, **override)]
    with pytest.raises((ValueError, TypeError), match=message):
        collate_numpy(examples, task)


def test_missing_field_and_empty_targets(rng):
    ex = _one(rng)
    del ex["soft_labels"]
    with pytest.raises(ValueError, match="example 0: missing field 'soft_labels'"):
        collate_numpy([ex], "mrckl")
    ex = _one(rng, txt_labels=np.full(5, -1))
    with pytest.raises(ValueError, match="no masked token"):
        collate_numpy([ex], "mlm")
    with pytest.raises(ValueError, match="no examples"):
        collate_numpy([], "mlm")
    with pytest.raises(ValueError, match="unknown task"):
        collate_numpy([ex], "vqa")
