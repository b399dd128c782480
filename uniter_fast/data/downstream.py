"""Packed batches for the downstream tasks: VQA, SNLI-VE, NLVR2, retrieval, referring expressions.

    batch = collate(examples, task=model.task)  # "vqa", "ve", "nlvr2", "nlvr2-triplet",
                                                # "retrieval" or "re"

Each downstream batch is a pretraining batch without pretraining targets (the C++ packer's
"pairs" task: text, regions, `cu_seqlens`, the padded view), plus the task's own fields:

- "vqa", "ve": one sequence per example, [CLS] question-or-hypothesis [SEP] then the regions.
  Example fields `input_ids`, `img_feat`, `img_loc`, and `targets` (float [C]: VQA's soft scores
  over the answer vocabulary, VE's one-hot over contradiction / entailment / neutral). Batch:
  `targets` float32 [B, C].
- "nlvr2" (the paired variants): two sequences per example that share the text, the left image's
  then the right image's: example i is sequences 2i and 2i+1. Example fields `input_ids`,
  `img_feat` and `img_loc` as a (left, right) pair, and `target` (int or bool: 1 when the
  statement is true). Batch: `target` int64 [B / 2]; `img_type_ids` int64 [Ni]: 1 on the left
  image's regions, 2 on the right's (the reference's `use_img_type`).
- "nlvr2-triplet": one sequence per example, the text then both images' regions; same fields,
  `img_type_ids` 1 then 2.
- "retrieval": one sequence per (text, image) pair, fields `input_ids`, `img_feat`, `img_loc`,
  and optionally `target`: 1 for a group's positive pair, 0 for each of its negatives, which
  follow it (the first example of a batch with targets is a positive). Batch: `target` int64
  [B].
- "re": one sequence per referring expression, fields `input_ids`, `img_feat`, `img_loc`
  (the image's regions) and optionally `target`: the referred region's index (0 <= target <
  regions). Batch: `target` int64 [B] and `region_index` int64 [B, R] (R the most regions of an
  example in the batch): position r of example b holds the index of its r-th region among the
  batch's Ni regions, or Ni past its regions.
- "vcr": one sequence per candidate: `input_ids` ([CLS] q [SEP] a [SEP], or [CLS] q [SEP] a_gt
  [SEP] r [SEP]), `txt_type_ids` (one per token: [CLS] and the question 0, the answer part 2,
  the rationale part 3), `img_feat`/`img_loc` (the ground-truth boxes, then the detected ones)
  and optionally `target` (1 for the right candidate). Batch: `target` int64 [B] and
  `txt_type_ids` int64 [Nt].

Any task's examples may carry `txt_type_ids` (all or none); the batch then holds them [Nt].

Targets are optional (all examples or none): a batch without them is for inference. Bad examples
raise ValueError/TypeError naming the example and the field.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch

from .collate import DOWNSTREAM_TASKS, _field, collate, txt_type_ids, with_arrays

# The reference's class counts: VQA's answer vocabulary (utils/ans2label.json), SNLI-VE's labels.
VQA_ANSWERS = 3129
VE_LABELS = ("contradiction", "entailment", "neutral")


def _all_or_none(examples: Sequence[dict], name: str) -> bool:
    """Whether every example has `name`; raises if only some do."""
    have = [name in ex for ex in examples if isinstance(ex, dict)]
    if any(have) and not all(have):
        missing = next(i for i, h in enumerate(have) if not h)
        raise ValueError(
            f"example {missing}: missing field {name!r} (other examples of the batch have it: "
            "targets must be given for all examples or none)"
        )
    return bool(have) and all(have)


def _soft_targets(examples: Sequence[dict]) -> np.ndarray | None:
    if not _all_or_none(examples, "targets"):
        return None
    rows = []
    for i, ex in enumerate(examples):
        t = np.asarray(ex["targets"])
        if t.ndim != 1 or t.shape[0] == 0 or t.dtype.kind not in "fiub":
            raise ValueError(
                f"example {i}: targets must be a non-empty 1-d float array, got dtype {t.dtype} "
                f"shape {t.shape}"
            )
        if rows and t.shape != rows[0].shape:
            raise ValueError(
                f"example {i}: targets has {t.shape[0]} classes, example 0 has {rows[0].shape[0]}"
            )
        t = t.astype(np.float32)
        if not np.isfinite(t).all() or (t < 0).any() or (t > 1).any():
            raise ValueError(f"example {i}: targets must lie in [0, 1]")
        rows.append(t)
    return np.stack(rows)


def _scalar(t):
    """A target given as a one-element array or tensor (the reference's `tensor([target])`) as
    its Python value; anything else unchanged."""
    if isinstance(t, torch.Tensor):
        t = t.detach().cpu().numpy()
    if isinstance(t, np.ndarray) and t.size == 1:
        return t.reshape(()).item()
    if isinstance(t, (list, tuple)) and len(t) == 1:
        return t[0]
    return t


def _binary_target(examples: Sequence[dict]) -> np.ndarray | None:
    if not _all_or_none(examples, "target"):
        return None
    out = np.empty(len(examples), dtype=np.int64)
    for i, ex in enumerate(examples):
        t = _scalar(ex["target"])
        if isinstance(t, (bool, np.bool_)) or (isinstance(t, (int, np.integer)) and t in (0, 1)):
            out[i] = int(t)
        else:
            raise ValueError(f"example {i}: target must be 0, 1 or a bool, got {t!r}")
    return out


def _retrieval_target(examples: Sequence[dict]) -> np.ndarray | None:
    target = _binary_target(examples)
    if target is None:
        return None
    if target[0] != 1:
        raise ValueError(
            "example 0: target must be 1: a retrieval batch with targets starts with a group's "
            "positive, followed by its negatives"
        )
    if target.all():
        raise ValueError("retrieval targets: the batch has no negative (target 0) to rank against")
    return target


def _region_target(examples: Sequence[dict], seqs: list[dict]) -> np.ndarray | None:
    if not _all_or_none(examples, "target"):
        return None
    out = np.empty(len(examples), dtype=np.int64)
    for i, ex in enumerate(examples):
        t = _scalar(ex["target"])
        n = len(seqs[i]["img_feat"])
        if (
            isinstance(t, (bool, np.bool_))
            or not isinstance(t, (int, np.integer))
            or not (0 <= t < n)
        ):
            raise ValueError(
                f"example {i}: target must be the referred region's index in [0, {n}), got {t!r}"
            )
        out[i] = int(t)
    return out


def _region_index(img_len: np.ndarray) -> np.ndarray:
    """(B, max regions): each example's region positions among the batch's Ni, Ni past its own."""
    total = int(img_len.sum())
    width = max(int(img_len.max()), 1)
    starts = np.concatenate([[0], np.cumsum(img_len)[:-1]])
    r = np.arange(width)
    return np.where(r[None, :] < img_len[:, None], starts[:, None] + r[None, :], total)


def _image_pair(ex: dict, i: int) -> tuple[tuple, tuple]:
    """((left feat, left loc), (right feat, right loc)) of an NLVR2 example."""
    pairs = []
    for name in ("img_feat", "img_loc"):
        value = _field(ex, i, name)
        if isinstance(value, np.ndarray) or not isinstance(value, (list, tuple)) or len(value) != 2:
            raise ValueError(
                f"example {i}: NLVR2's {name} must be a (left, right) pair of arrays, got "
                f"{type(value).__name__}"
                + (f" of length {len(value)}" if isinstance(value, (list, tuple)) else "")
            )
        pairs.append(value)
    (left_feat, right_feat), (left_loc, right_loc) = pairs
    return (left_feat, left_loc), (right_feat, right_loc)


def _sequences(examples: Sequence[dict], task: str) -> tuple[list[dict], list[np.ndarray] | None]:
    """The packer's examples (one per sequence) and, for NLVR2, each sequence's region types."""
    if task in ("vqa", "ve", "retrieval", "re", "vcr"):
        seqs = [
            {
                "input_ids": _field(ex, i, "input_ids"),
                "img_feat": _field(ex, i, "img_feat"),
                "img_loc": _field(ex, i, "img_loc"),
            }
            for i, ex in enumerate(examples)
        ]
        return seqs, None
    seqs, types = [], []
    for i, ex in enumerate(examples):
        ids = _field(ex, i, "input_ids")
        (lf, ll), (rf, rl) = _image_pair(ex, i)
        nl, nr = len(lf), len(rf)
        if task == "nlvr2":
            seqs.append({"input_ids": ids, "img_feat": lf, "img_loc": ll})
            seqs.append({"input_ids": ids, "img_feat": rf, "img_loc": rl})
            types += [np.full(nl, 1, np.int64), np.full(nr, 2, np.int64)]
        else:
            try:
                feat = np.concatenate([np.asarray(lf), np.asarray(rf)])
                loc = np.concatenate([np.asarray(ll), np.asarray(rl)])
            except ValueError as e:
                raise ValueError(f"example {i}: left and right images do not stack ({e})") from e
            seqs.append({"input_ids": ids, "img_feat": feat, "img_loc": loc})
            types.append(np.concatenate([np.full(nl, 1, np.int64), np.full(nr, 2, np.int64)]))
    return seqs, types


def _renamed(e: Exception, task: str) -> Exception:
    """The packer's "example j: ..." of a paired NLVR2 sequence, named by example and side."""
    text = str(e)
    if task != "nlvr2" or not text.startswith("example "):
        return e
    head, _, rest = text.partition(":")
    try:
        j = int(head.split()[1])
    except (IndexError, ValueError):
        return e
    side = "left" if j % 2 == 0 else "right"
    return type(e)(f"example {j // 2} ({side} image):{rest}")


def collate_downstream(examples: Sequence[dict], task: str, *, out=None, backend: str = "auto"):
    """Pack downstream examples into a `Batch` (module docstring). `out`, `backend`: as
    `uniter_fast.data.collate`."""
    if task not in DOWNSTREAM_TASKS:
        raise ValueError(
            f"unknown downstream task {task!r}; expected one of {', '.join(DOWNSTREAM_TASKS)}"
        )
    if len(examples) == 0:
        raise ValueError("collate: no examples")
    seqs, types = _sequences(examples, task)
    extra: dict[str, np.ndarray] = {}
    if task in ("vqa", "ve"):
        targets = _soft_targets(examples)
        if targets is not None:
            extra["targets"] = targets
    elif task == "retrieval":
        target = _retrieval_target(examples)
        if target is not None:
            extra["target"] = target
    elif task == "vcr":
        target = _binary_target(examples)
        if target is not None:
            extra["target"] = target
    elif task == "re":
        target = _region_target(examples, seqs)
        if target is not None:
            extra["target"] = target
        lengths = np.array([len(sq["img_feat"]) for sq in seqs], dtype=np.int64)
        extra["region_index"] = _region_index(lengths)
    else:
        target = _binary_target(examples)
        if target is not None:
            extra["target"] = target
        extra["img_type_ids"] = np.concatenate(types)
    types = txt_type_ids(examples)
    if types is not None:
        if task in ("nlvr2",):
            raise ValueError("txt_type_ids: not for the paired NLVR2 form")
        extra["txt_type_ids"] = types
    try:
        batch = collate(seqs, "pairs", out=out, backend=backend)
    except (ValueError, TypeError) as e:
        raise _renamed(e, task) from None
    return with_arrays(dataclasses.replace(batch, task=task), extra, out)


__all__ = ["DOWNSTREAM_TASKS", "VE_LABELS", "VQA_ANSWERS", "collate_downstream"]
