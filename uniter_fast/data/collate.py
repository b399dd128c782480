"""Packing examples into the packed, unpadded `Batch`.

`collate_numpy` is the plain NumPy statement of the packing: the C++ packer (`uniter_fast._C`,
next issue) must produce the same arrays, and the tests hold it to this function.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .schema import LOC_DIM, MRM_TASKS, Batch, check_task

PAD_MULTIPLE = 8


def _field(ex: dict, i: int, name: str) -> Any:
    try:
        return ex[name]
    except KeyError:
        raise ValueError(f"example {i}: missing field {name!r}") from None
    except TypeError:
        raise TypeError(f"example {i}: expected a dict, got {type(ex).__name__}") from None


def _check_2d(arr: np.ndarray, i: int, name: str, rows: int | None, cols: int | None) -> None:
    if (
        arr.ndim != 2
        or (rows is not None and arr.shape[0] != rows)
        or (cols is not None and arr.shape[1] != cols)
    ):
        want = f"({rows if rows is not None else 'n'}, {cols if cols is not None else 'd'})"
        raise ValueError(f"example {i}: {name} has shape {arr.shape}, expected {want}")


def _feature_dtype(arrays: Sequence[np.ndarray], name: str) -> np.dtype:
    # float16 in, float16 out (half the bytes to move); anything else widens to float32 so that
    # full-precision inputs are never rounded.
    for i, a in enumerate(arrays):
        if a.dtype.kind != "f":
            raise TypeError(f"example {i}: {name} must be floating point, got {a.dtype}")
    if all(a.dtype == np.float16 for a in arrays):
        return np.dtype(np.float16)
    return np.dtype(np.float32)


def collate_numpy(
    examples: Sequence[dict], task: str, *, pad_multiple: int = PAD_MULTIPLE
) -> dict[str, Any]:
    """Pack examples (schema in `uniter_fast.data.schema`) into the `Batch` fields as NumPy arrays.

    Sequence b is its text (`input_ids`, [CLS] ... [SEP]) followed by its regions. Returns a dict
    of the `Batch` fields other than `task`; `collate` wraps it in a `Batch`.
    """
    check_task(task)
    if len(examples) == 0:
        raise ValueError("collate: no examples")
    mrm = task in MRM_TASKS

    ids = [np.asarray(_field(ex, i, "input_ids")) for i, ex in enumerate(examples)]
    feats = [np.asarray(_field(ex, i, "img_feat")) for i, ex in enumerate(examples)]
    locs = [np.asarray(_field(ex, i, "img_loc")) for i, ex in enumerate(examples)]
    for i, (t, f, loc) in enumerate(zip(ids, feats, locs, strict=True)):
        if t.ndim != 1 or t.shape[0] == 0 or t.dtype.kind not in "iu":
            raise ValueError(
                f"example {i}: input_ids must be a non-empty 1-d integer array, got shape "
                f"{t.shape} dtype {t.dtype}"
            )
        _check_2d(f, i, "img_feat", None, feats[0].shape[1] if feats[0].ndim == 2 else None)
        if f.shape[0] == 0:
            raise ValueError(f"example {i}: img_feat has no regions")
        _check_2d(loc, i, "img_loc", f.shape[0], LOC_DIM)

    txt_len = np.array([t.shape[0] for t in ids], dtype=np.int64)
    img_len = np.array([f.shape[0] for f in feats], dtype=np.int64)
    seq_len = txt_len + img_len
    cu_seqlens = np.zeros(len(examples) + 1, dtype=np.int64)
    np.cumsum(seq_len, out=cu_seqlens[1:])
    starts = cu_seqlens[:-1]
    num_rows = int(cu_seqlens[-1])

    # Position of every text token within its caption, and every region within its image.
    txt_pos = np.arange(int(txt_len.sum())) - np.repeat(np.cumsum(txt_len) - txt_len, txt_len)
    img_pos = np.arange(int(img_len.sum())) - np.repeat(np.cumsum(img_len) - img_len, img_len)
    txt_dest = np.repeat(starts, txt_len) + txt_pos
    img_dest = np.repeat(starts + txt_len, img_len) + img_pos

    img_feat = np.concatenate(feats).astype(_feature_dtype(feats, "img_feat"), copy=False)
    out: dict[str, Any] = {
        "input_ids": np.concatenate(ids).astype(np.int64, copy=False),
        "txt_pos": txt_pos.astype(np.int64, copy=False),
        "txt_dest": txt_dest.astype(np.int64, copy=False),
        "img_loc": np.concatenate(locs).astype(np.float32, copy=False),
        "img_dest": img_dest.astype(np.int64, copy=False),
        "cu_seqlens": cu_seqlens.astype(np.int32),
        "txt_len": txt_len,
        "img_len": img_len,
        "max_seqlen": int(seq_len.max()),
        "max_txt_len": int(txt_len.max()),
        "max_img_len": int(img_len.max()),
    }

    # Padded view: row-major (b, l) positions; padding points at row N, one past the packed rows.
    lpad = -(-out["max_seqlen"] // pad_multiple) * pad_multiple
    seq_pos = np.arange(num_rows) - np.repeat(starts, seq_len)
    seq_id = np.repeat(np.arange(len(examples)), seq_len)
    pad_index = np.full((len(examples), lpad), num_rows, dtype=np.int64)
    pad_index[seq_id, seq_pos] = np.arange(num_rows)
    out["pad_index"] = pad_index
    out["unpad_index"] = (seq_id * lpad + seq_pos).astype(np.int64)

    if task == "mlm":
        labels = []
        for i, (ex, t) in enumerate(zip(examples, ids, strict=True)):
            lab = np.asarray(_field(ex, i, "txt_labels"))
            if lab.shape != t.shape:
                raise ValueError(
                    f"example {i}: txt_labels has shape {lab.shape}, input_ids {t.shape}"
                )
            labels.append(lab)
        labels = np.concatenate(labels).astype(np.int64, copy=False)
        target = labels != -1
        if not target.any():
            raise ValueError("collate: MLM batch has no masked token (every txt_labels is -1)")
        out["mlm_index"] = out["txt_dest"][target]
        out["mlm_labels"] = labels[target]

    if mrm:
        masks = []
        for i, (ex, f) in enumerate(zip(examples, feats, strict=True)):
            m = np.asarray(_field(ex, i, "img_mask"))
            if m.shape != (f.shape[0],) or m.dtype != np.bool_:
                raise ValueError(
                    f"example {i}: img_mask must be bool of shape ({f.shape[0]},), got "
                    f"{m.dtype} {m.shape}"
                )
            masks.append(m)
        img_masked = np.concatenate(masks)
        if not img_masked.any():
            raise ValueError("collate: region-masking batch has no masked region")
        out["mrm_index"] = out["img_dest"][img_masked]
        if task == "mrfr":
            out["mrfr_target"] = img_feat[img_masked]  # a copy, taken before the zeroing below
        else:
            soft = []
            for i, (ex, m) in enumerate(zip(examples, masks, strict=True)):
                s = np.asarray(_field(ex, i, "soft_labels"))
                _check_2d(s, i, "soft_labels", m.shape[0], None)
                soft.append(s[m])
            soft_dtype = _feature_dtype(soft, "soft_labels")
            soft = np.concatenate(soft).astype(soft_dtype, copy=False)
            out["mrc_soft_target"] = soft
            # Background (class 0) is never the hard target: argmax over classes 1..C-1.
            out["mrc_label"] = (1 + soft[:, 1:].argmax(axis=1)).astype(np.int64)
        img_feat[img_masked] = 0  # img_feat is a fresh array from np.concatenate
    else:
        img_masked = np.zeros(out["img_dest"].shape[0], dtype=np.bool_)
    out["img_feat"] = img_feat
    out["img_masked"] = img_masked

    if task == "itm":
        target = np.array([_field(ex, i, "itm_target") for i, ex in enumerate(examples)])
        if target.dtype.kind not in "iub" or not np.isin(target, (0, 1)).all():
            raise ValueError(f"collate: itm_target must be 0 or 1, got {target.tolist()}")
        out["itm_target"] = target.astype(np.int64)
    return out


def collate(examples: Sequence[dict], task: str) -> Batch:
    """Pack examples into a `Batch` of CPU tensors (see `collate_numpy` for the layout)."""
    return Batch.from_numpy(task, collate_numpy(examples, task))
