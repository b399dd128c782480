"""Downstream task shards (VQA, SNLI-VE, NLVR2, RE): WebDataset tars, features stored once.

One sample per image (VQA, VE, RE) or per image pair (NLVR2), holding every question,
hypothesis, statement or referring expression about it, so that features are stored once however
many texts use them:

    feat.npy    float16 [n, D]   region features (NLVR2: the left image; RE: the ground-truth
                                 boxes, in the order of meta.ann_ids when given)
    loc.npy     float32 [n, 7]
    feat1.npy, loc1.npy          NLVR2: the right image; RE: the detected boxes
    items.json  {"items": [{"id": str, "input_ids": [int, ...], <target>}, ...]}
                target: VQA "answers": [[answer index, soft score], ...]; VE "label": 0, 1 or 2
                (contradiction, entailment, neutral); NLVR2 "target": true or false; RE "target":
                the referred ground-truth box's index, with "bbox": its [x, y, w, h] in pixels.
                Absent in test splits.
    meta.json   {"task": ..., "image_id": ..., ...}; RE also "width" and "height" in pixels (the
                boxes' pixel coordinates come from them and loc).

VCR samples hold one movie frame with every question about it: `feat.npy`/`loc.npy` its
ground-truth boxes (one per entry of meta "objects", in that order) and `feat1.npy`/`loc1.npy`
its detected boxes, plus `soft.npy` and `soft1.npy` (float16 [n, 1601], the detector's class
distribution of each box: the second pretraining stage's MRC-kl targets). Items:
`{"id": annot_id, "question": [ids], "answers": [[ids] x 4], "rationales": [[ids] x 4],
"answer_label": 0..3, "rationale_label": 0..3}` (labels absent in test), token ids without
[CLS]/[SEP] and below `VCR_VOCAB_SIZE` (the object tags are ids past BERT's vocabulary:
`uniter_fast.convert.vcr` says how references become tags).

`input_ids` are WordPiece ids without [CLS]/[SEP] (the example builder adds them). Written by
`ShardWriter.write_sample` (atomic shards, sha256 per shard); read through `iter_shard` with
`decode_task_sample`, an allow-list decoder like the pretraining one: no pickle, and every bad
sample raises `ShardFormatError` naming the shard, key, member and reason, so that a loader skips
and counts it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .schema import BERT_BASE_CASED, IMG_DIM, IMG_LABEL_DIM, LOC_DIM, MAX_REGIONS, Vocab
from .shards import (
    ShardFormatError,
    ShardWriter,
    _json_bytes,
    _load_json,
    _load_npy,
    _npy_bytes,
    iter_shard,
)

TARGET_FIELD = {
    "vqa": "answers",
    "ve": "label",
    "nlvr2": "target",
    "re": "target",
    "vcr": "answer_label",
}
TWO_IMAGES = ("nlvr2", "re", "vcr")  # tasks whose samples hold a second feature set (feat1, loc1)
VCR_SPECIAL_TOKENS = 81  # the object tags: word ids size .. size + 80
VCR_VOCAB_SIZE = BERT_BASE_CASED.size + VCR_SPECIAL_TOKENS
_WDS_META = frozenset({"__key__", "__url__", "__local_path__"})


def _members(task: str) -> tuple[str, ...]:
    images = (
        ("feat.npy", "loc.npy", "feat1.npy", "loc1.npy")
        if task in TWO_IMAGES
        else (
            "feat.npy",
            "loc.npy",
        )
    )
    if task == "vcr":
        images = (*images, "soft.npy", "soft1.npy")
    return (*images, "items.json", "meta.json")


@dataclass
class TaskRecord:
    """One sample of a task shard: its images ([(feat, loc)], two for NLVR2) and its texts."""

    key: str
    task: str
    images: list[tuple[np.ndarray, np.ndarray]]
    items: list[dict]
    meta: dict = field(default_factory=dict)
    shard: str = ""
    soft: list[np.ndarray] | None = None  # VCR: each image's soft labels [n, 1601]

    @property
    def captions(self) -> list[np.ndarray]:
        """The texts' token ids (what a converter's statistics count as captions)."""
        if self.task == "vcr":
            return [np.asarray(item["question"]) for item in self.items]
        return [np.asarray(item["input_ids"]) for item in self.items]

    @property
    def num_regions(self) -> int:
        return sum(int(feat.shape[0]) for feat, _ in self.images)


def encode_task_sample(record: TaskRecord) -> dict[str, bytes | str]:
    sample: dict[str, bytes | str] = {"__key__": record.key}
    for i, (feat, loc) in enumerate(record.images):
        suffix = "" if i == 0 else str(i)
        sample[f"feat{suffix}.npy"] = _npy_bytes(feat)
        sample[f"loc{suffix}.npy"] = _npy_bytes(loc)
    for i, soft in enumerate(record.soft or []):
        sample[f"soft{'' if i == 0 else i}.npy"] = _npy_bytes(soft)
    sample["items.json"] = _json_bytes({"items": record.items})
    sample["meta.json"] = _json_bytes({"task": record.task, **record.meta})
    return sample


def validate_task_record(
    record: TaskRecord,
    *,
    shard: str,
    num_classes: int | None = None,
    vocab: Vocab = BERT_BASE_CASED,
    img_dim: int = IMG_DIM,
) -> None:
    """Raise ShardFormatError (with a REASONS reason) unless `record` is a valid sample of its
    task. num_classes: VQA's answer vocabulary size (answer indices are checked against it)."""
    key = record.key

    def fail(member: str, reason: str, detail: str) -> ShardFormatError:
        return ShardFormatError(shard, key, member, reason, detail)

    if record.task not in TARGET_FIELD:
        raise fail("meta.json", "type", f"unknown task {record.task!r}")
    want_images = 2 if record.task in TWO_IMAGES else 1
    if len(record.images) != want_images:
        raise fail(
            "feat.npy",
            "missing_field",
            f"{len(record.images)} images, {record.task} has {want_images}",
        )
    for i, (feat, loc) in enumerate(record.images):
        suffix = "" if i == 0 else str(i)
        if feat.ndim != 2 or feat.shape[1] != img_dim or not 1 <= feat.shape[0] <= MAX_REGIONS:
            raise fail(
                f"feat{suffix}.npy",
                "shape",
                f"has shape {feat.shape}, expected (1..{MAX_REGIONS}, {img_dim})",
            )
        if feat.dtype.kind != "f":
            raise fail(f"feat{suffix}.npy", "dtype", f"is {feat.dtype}, expected float")
        if loc.shape != (feat.shape[0], LOC_DIM) or loc.dtype.kind != "f":
            raise fail(
                f"loc{suffix}.npy",
                "shape",
                f"has shape {loc.shape} {loc.dtype}, expected ({feat.shape[0]}, {LOC_DIM}) float",
            )
        if not (np.isfinite(feat).all() and np.isfinite(loc).all()):
            raise fail(f"feat{suffix}.npy", "nonfinite", "holds NaN or Inf")
    if record.task == "re":
        for name in ("width", "height"):
            value = record.meta.get(name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise fail(
                    "meta.json", "missing_field", f"RE needs a positive {name}, got {value!r}"
                )
    if record.task == "vcr":
        soft = record.soft or []
        if len(soft) != 2:
            raise fail("soft.npy", "missing_field", "VCR needs soft.npy and soft1.npy")
        for i, ((feat, _), labels) in enumerate(zip(record.images, soft, strict=True)):
            member = f"soft{'' if i == 0 else i}.npy"
            if labels.shape != (feat.shape[0], IMG_LABEL_DIM) or labels.dtype.kind != "f":
                raise fail(
                    member,
                    "shape",
                    f"has shape {labels.shape} {labels.dtype}, expected ({feat.shape[0]}, "
                    f"{IMG_LABEL_DIM}) float",
                )
            if not np.isfinite(labels).all() or (labels < 0).any():
                raise fail(member, "nonfinite", "holds NaN, Inf or negative values")
    if not isinstance(record.items, list) or not record.items:
        raise fail("items.json", "empty_caption", "holds no items")
    if record.task == "vcr":
        for j, item in enumerate(record.items):
            _validate_vcr_item(item, f"item {j}", fail)
        return
    target = TARGET_FIELD[record.task]
    for j, item in enumerate(record.items):
        where = f"item {j}"
        if not isinstance(item, dict) or not isinstance(item.get("id"), str):
            raise fail("items.json", "type", f"{where}: expected a dict with a string id")
        ids = item.get("input_ids")
        if not isinstance(ids, list) or not ids:
            raise fail("items.json", "empty_caption", f"{where} ({item['id']}): no input_ids")
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise fail("items.json", "type", f"{where} ({item['id']}): input_ids must be ints")
        arr = np.asarray(ids)
        if arr.min() < 0 or arr.max() >= vocab.size:
            raise fail(
                "items.json", "token_id", f"{where} ({item['id']}): id outside [0, {vocab.size})"
            )
        if target not in item:
            continue  # a test split
        value = item[target]
        if record.task == "vqa":
            ok = isinstance(value, list) and all(
                isinstance(a, list)
                and len(a) == 2
                and isinstance(a[0], int)
                and (num_classes is None or 0 <= a[0] < num_classes)
                and isinstance(a[1], (int, float))
                and 0 <= a[1] <= 1
                for a in value
            )
            if not ok:
                raise fail(
                    "items.json",
                    "range",
                    f"{where} ({item['id']}): answers must be [[index in [0, "
                    f"{num_classes}), score in [0, 1]], ...], got {str(value)[:100]}",
                )
        elif record.task == "ve":
            if not isinstance(value, int) or isinstance(value, bool) or value not in (0, 1, 2):
                raise fail(
                    "items.json",
                    "range",
                    f"{where} ({item['id']}): label must be 0, 1 or 2, got {value!r}",
                )
        elif record.task == "re":
            n = record.images[0][0].shape[0]
            bbox = item.get("bbox")
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < n:
                raise fail(
                    "items.json",
                    "range",
                    f"{where} ({item['id']}): target must be a ground-truth box index in [0, {n}),"
                    f" got {value!r}",
                )
            if not (
                isinstance(bbox, list)
                and len(bbox) == 4
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)
                and bbox[2] > 0
                and bbox[3] > 0
            ):
                raise fail(
                    "items.json",
                    "range",
                    f"{where} ({item['id']}): bbox must be [x, y, w, h] with w, h > 0, got "
                    f"{str(bbox)[:80]}",
                )
        elif not isinstance(value, bool) and value not in (0, 1):
            raise fail(
                "items.json",
                "range",
                f"{where} ({item['id']}): target must be true or false, got {value!r}",
            )


def _validate_vcr_item(item, where: str, fail) -> None:
    if not isinstance(item, dict) or not isinstance(item.get("id"), str):
        raise fail("items.json", "type", f"{where}: expected a dict with a string id")
    where = f"{where} ({item['id']})"
    texts = [("question", item.get("question"))]
    for name in ("answers", "rationales"):
        choices = item.get(name)
        if not isinstance(choices, list) or len(choices) != 4:
            raise fail("items.json", "missing_field", f"{where}: {name} must be 4 token lists")
        texts += [(f"{name}[{k}]", c) for k, c in enumerate(choices)]
    for name, ids in texts:
        if not isinstance(ids, list) or not ids:
            raise fail("items.json", "empty_caption", f"{where}: {name} is empty or missing")
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise fail("items.json", "type", f"{where}: {name} must hold ints")
        if min(ids) < 0 or max(ids) >= VCR_VOCAB_SIZE:
            raise fail(
                "items.json", "token_id", f"{where}: {name} has an id outside [0, {VCR_VOCAB_SIZE})"
            )
    labels = [item.get(k) for k in ("answer_label", "rationale_label")]
    if labels == [None, None]:
        return  # a test split
    if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 4 for v in labels):
        raise fail(
            "items.json",
            "range",
            f"{where}: answer_label and rationale_label must both be 0..3, got {labels}",
        )


def decode_task_sample(
    raw: dict,
    *,
    shard: str,
    task: str,
    num_classes: int | None = None,
    vocab: Vocab = BERT_BASE_CASED,
) -> TaskRecord:
    """Decode and validate one sample (member -> bytes) of a `task` shard (allow-list)."""
    key = str(raw.get("__key__"))
    allowed = _members(task)
    for member in raw:
        if member not in _WDS_META and member not in allowed:
            raise ShardFormatError(
                shard,
                key,
                str(member),
                "forbidden_member",
                f"is not an allowed member of a {task} shard (allowed: "
                f"{', '.join(allowed)}); refused undecoded",
            )
    missing = [m for m in allowed if m not in raw]
    if missing:
        raise ShardFormatError(
            shard, key, missing[0], "missing_field", f"is missing (missing: {', '.join(missing)})"
        )
    images = [
        (
            _load_npy(raw["feat.npy"], shard, key, "feat.npy"),
            _load_npy(raw["loc.npy"], shard, key, "loc.npy"),
        )
    ]
    if task in TWO_IMAGES:
        images.append(
            (
                _load_npy(raw["feat1.npy"], shard, key, "feat1.npy"),
                _load_npy(raw["loc1.npy"], shard, key, "loc1.npy"),
            )
        )
    soft = None
    if task == "vcr":
        soft = [_load_npy(raw[m], shard, key, m) for m in ("soft.npy", "soft1.npy")]
    items = _load_json(raw["items.json"], shard, key, "items.json")
    meta = _load_json(raw["meta.json"], shard, key, "meta.json")
    if not isinstance(items, dict) or not isinstance(items.get("items"), list):
        raise ShardFormatError(shard, key, "items.json", "type", 'expected {"items": [...]}')
    if not isinstance(meta, dict):
        raise ShardFormatError(shard, key, "meta.json", "type", "expected a JSON object")
    if meta.get("task", task) != task:
        raise ShardFormatError(
            shard, key, "meta.json", "type", f"a {meta.get('task')!r} sample in a {task} shard"
        )
    record = TaskRecord(
        key=key, task=task, images=images, items=items["items"], meta=meta, shard=shard, soft=soft
    )
    validate_task_record(record, shard=shard, num_classes=num_classes, vocab=vocab)
    return record


def write_task_shards(
    out_dir, records, *, prefix: str, num_classes: int | None = None, max_samples: int = 500
) -> list[dict]:
    """Validate and write `records` (TaskRecords of one task) as shards; returns the finished
    shards' entries (name, samples, pairs = texts, bytes, sha256, first and last key)."""
    with ShardWriter(out_dir, prefix=prefix, max_samples=max_samples, overwrite=True) as writer:
        for record in records:
            validate_task_record(record, shard=writer._name(writer._index), num_classes=num_classes)
            writer.write_sample(record.key, encode_task_sample(record), pairs=len(record.items))
    return writer.finished


def iter_task_shard(
    url: str, task: str, *, num_classes: int | None = None, on_bad=None
) -> Iterator[TaskRecord]:
    """The validated records of one task shard, in file order (bad ones: see `iter_shard`)."""

    def decode(members: dict[str, Any], *, shard: str) -> TaskRecord:
        return decode_task_sample(members, shard=shard, task=task, num_classes=num_classes)

    return iter_shard(url, on_bad=on_bad, decode=decode)


__all__ = [
    "TARGET_FIELD",
    "TWO_IMAGES",
    "VCR_SPECIAL_TOKENS",
    "VCR_VOCAB_SIZE",
    "TaskRecord",
    "decode_task_sample",
    "encode_task_sample",
    "iter_task_shard",
    "validate_task_record",
    "write_task_shards",
]
