"""Referring expressions (RefCOCO, RefCOCO+, RefCOCOg) -> "re" task shards.

    python -m uniter_fast.convert re-refs --refs 'refcoco/refs(unc).p' \\
        --instances refcoco/instances.json --split train --gt-npz-dir feat/refcoco_gt \\
        --det-npz-dir feat/refcoco_det --vocab bert-base-cased-vocab.txt \\
        --out shards/refcoco/train --prefix refcoco_train
    python -m uniter_fast.convert re-lmdb --txt-db txt_db/refcoco_train.db \\
        --gt-img-db img_db/visual_grounding_coco_gt \\
        --det-img-db img_db/visual_grounding_det_coco --out shards/refcoco/train

One sample per image (`uniter_fast.data.task_shards`, task "re"), holding every referring
sentence about it: `feat.npy`/`loc.npy` are the ground-truth boxes, one region per COCO
annotation of the image, all of them in the order of `meta.ann_ids`; `feat1.npy`/`loc1.npy` the
detected boxes, kept by the usual rule (clamp(#(conf > 0.2), 10, 100), top by confidence). Each
item is `{"id": sent_id, "input_ids", "target": index of the referred annotation in
meta.ann_ids, "bbox": its [x, y, w, h] in pixels, "ref_id", "ann_id"}`; meta holds `image_id`,
`width`, `height`, `ann_ids`, `file_name` and `dataset`.

`re-refs` reads the public refer files: `refs(unc).p` / `refs(umd).p` (or a JSON export of the
same list) and the COCO `instances.json`. The pickle is read by `RestrictedUnpickler`, which
builds plain lists, dicts, strings and numbers only: a pickle that asks for any class or function
is refused, naming it, before anything runs. Only the refs of `--split` are converted. Features:
per-image .npz (`features`, `norm_bb` or pixel `boxes`, optional `conf`/`soft_labels`, read
without pickle) named `<image_id>.npz` or, as the reference names them,
`visual_grounding_coco_gt_{image_id:012}.npz` (ground truth) and
`visual_grounding_det_coco_{image_id:012}.npz` (detections). The ground-truth regions follow the
order of the image's annotations in instances.json, unless the .npz holds an `ann_ids` array
giving it. Sentences (`sent`, else `raw`) are WordPiece-tokenised with --vocab.

`re-lmdb` reads the reference's RE text DB (`refs.json`, `images.json` [{id, file_name, ann_ids,
height, width}], `annotations.json`, `meta.json` checked as for every text DB, and an LMDB of lz4
msgpack examples `{sent_id, sent, ref_id, ann_id, image_id, bbox, input_ids}` keyed by sent_id)
and its two image DBs (keys `visual_grounding_coco_gt_{image_id:012}.npz` and
`visual_grounding_det_coco_{image_id:012}.npz`, values decoded as the `lmdb` converter does).
The target is `images[image_id]["ann_ids"].index(ann_id)`, as in the reference.

Skipped and counted by reason: images missing from instances.json / images.json ("no_image"),
without a positive size ("image_size"), without features ("no_features"), with a ground-truth
region count other than their annotation count ("region_count", the reference asserts it), an
`ann_ids` array that is not the image's annotations ("ann_ids"), more than 100 annotations
("too_many_regions"), or bad features (the usual reasons); sentences whose annotation is not
the image's ("unknown_ann"), with a bad box ("bbox"), no tokens ("empty_caption"), ids outside
the vocabulary ("token_id"), a repeated sent_id ("duplicate_sentence"), a ref missing from
refs.json when `re-lmdb --split` needs its split ("unknown_ref"). Texts are kept whole
(the training loader drops over-long ones, as the reference does). Resumable, atomic, with a
manifest: `uniter_fast.convert.common.run_conversion`.
"""

from __future__ import annotations

import json
import os
import pickle
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..data.schema import BERT_BASE_CASED, Vocab
from ..data.task_shards import TaskRecord
from .captions import _NPZ_FIELDS, KEEP_ALL, WordPiece, kept_regions
from .common import (
    ConvertError,
    GroupedSource,
    RegionPolicy,
    SkipRecord,
    Unit,
    input_fingerprint,
    read_npz_file,
    sample_key,
)

__all__ = [
    "DET_NAME",
    "GT_NAME",
    "RE_SPLITS",
    "ReLmdbSource",
    "RefsSource",
    "RestrictedUnpickler",
    "UnsafePickleError",
    "load_instances",
    "load_refs",
    "safe_unpickle",
    "validate_refs",
]

RE_SPLITS = ("train", "val", "testA", "testB", "test")
GT_NAME = "visual_grounding_coco_gt_{:012}.npz"
DET_NAME = "visual_grounding_det_coco_{:012}.npz"


# --------------------------------------------------------------------------------------------
# Reading refer's pickles without running them


class UnsafePickleError(ConvertError):
    """A pickle asked for a global (a class or a function): refused, nothing was run."""


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles plain data only: dict, list, tuple, str, int, float, bool, None (and bytes
    from protocol 3 on).

    Those have opcodes of their own. Everything else (a class, a function such as os.system,
    even builtins.set before protocol 4, or Python 3 bytes before protocol 3, which pickle
    through _codecs.encode) is fetched through `find_class`, which refuses it, naming the file
    and the global; so are persistent ids. Python 2 strings (refer's pickles were written by
    Python 2) are decoded as UTF-8.
    """

    def __init__(self, file, *, path: str | os.PathLike) -> None:
        super().__init__(file, encoding="utf-8", errors="strict")
        self.path = str(path)

    def find_class(self, module: str, name: str) -> Any:
        raise UnsafePickleError(
            f"{self.path}: the pickle asks for the global {module}.{name}: refused (only "
            "plain lists, dicts, strings and numbers are read; nothing was run)"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"{self.path}: the pickle holds a persistent id: refused")


# What a truncated or malformed pickle raises (pickle's documentation names most of them).
_PICKLE_ERRORS = (
    pickle.UnpicklingError,
    EOFError,
    ValueError,  # UnicodeDecodeError among them
    TypeError,
    IndexError,
    KeyError,
    AttributeError,
    OverflowError,
    RecursionError,
)


def safe_unpickle(path: str | os.PathLike) -> Any:
    """The plain data of a pickle file, through `RestrictedUnpickler`. Raises UnsafePickleError
    for a pickle that asks for any global, ConvertError for an unreadable one."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return RestrictedUnpickler(f, path=path).load()
    except UnsafePickleError:
        raise
    except OSError as e:
        raise ConvertError(f"{path}: cannot read the file ({e})") from None
    except _PICKLE_ERRORS as e:
        raise ConvertError(f"{path}: not a readable pickle ({type(e).__name__}: {e})") from None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_size(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def validate_refs(obj: Any, where: str) -> list[dict]:
    """Check refer's list of refs; raise ConvertError naming the ref (and sentence) at fault.

    Each ref: {ref_id, ann_id, image_id: int, split: str, sentences: [{sent_id: int, sent or
    raw: str}, ...]} (other keys, e.g. category_id and sent_ids, are not needed).
    """
    if not isinstance(obj, list):
        raise ConvertError(f"{where}: expected a list of refs, got a {type(obj).__name__}")
    for i, ref in enumerate(obj):
        if not isinstance(ref, dict):
            raise ConvertError(f"{where}: refs[{i}] is a {type(ref).__name__}, expected a dict")
        name = f"{where}: refs[{i}] (ref_id {ref.get('ref_id')!r})"
        for key in ("ref_id", "ann_id", "image_id"):
            if not _is_int(ref.get(key)):
                raise ConvertError(f"{name}: {key} is {ref.get(key)!r}, expected an integer")
        if not isinstance(ref.get("split"), str):
            raise ConvertError(f"{name}: split is {ref.get('split')!r}, expected a string")
        sentences = ref.get("sentences")
        if not isinstance(sentences, list):
            raise ConvertError(f"{name}: sentences is {type(sentences).__name__}, expected a list")
        for j, sent in enumerate(sentences):
            if not isinstance(sent, dict) or not _is_int(sent.get("sent_id")):
                raise ConvertError(f"{name}: sentences[{j}] has no integer sent_id")
            if not (isinstance(sent.get("sent"), str) or isinstance(sent.get("raw"), str)):
                raise ConvertError(f"{name}: sentences[{j}] has no sent or raw string")
    return obj


def load_refs(path: str | os.PathLike) -> list[dict]:
    """refer's refs: a .json export, else a pickle read by `RestrictedUnpickler`; validated."""
    path = Path(path)
    if path.suffix.lower() == ".json":
        obj = _read_json(path)
    else:
        obj = safe_unpickle(path)
    return validate_refs(obj, str(path))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConvertError(f"{path}: cannot read the JSON ({e})") from None


# --------------------------------------------------------------------------------------------
# What both sources share


@dataclass
class ImageInfo:
    """An image of the RE data: its size in pixels and its annotations in their stored order."""

    image_id: int
    width: Any
    height: Any
    file_name: str | None
    ann_ids: list[int]

    @classmethod
    def from_entry(cls, entry: dict, ann_ids: list[int]) -> ImageInfo:
        """An `images` entry ({id, width, height, file_name}: instances.json, images.json)."""
        name = entry.get("file_name")
        return cls(
            entry["id"],
            entry.get("width"),
            entry.get("height"),
            name if isinstance(name, str) else None,
            ann_ids,
        )


@dataclass
class Expression:
    """One referring sentence: its token ids and the box it refers to."""

    sent_id: str
    ref_id: int | None
    ann_id: int
    input_ids: list[int]
    bbox: Any  # [x, y, w, h] pixels as given; checked when the item is built


@dataclass
class Instances:
    """COCO instances.json, as RE needs it.

    images: image id -> ImageInfo (ann_ids in the order the annotations are listed).
    bbox: annotation id -> its bbox as given.
    """

    images: dict[int, ImageInfo]
    bbox: dict[int, Any]


def load_instances(path: str | os.PathLike) -> Instances:
    """Read COCO instances.json: `images` [{id, width, height, file_name}], `annotations`
    [{id, image_id, bbox}]. Raises ConvertError naming the entry for a structural fault."""
    path = Path(path)
    obj = _read_json(path)
    if not isinstance(obj, dict):
        raise ConvertError(f"{path}: expected a COCO instances object")
    for key in ("images", "annotations"):
        if not isinstance(obj.get(key), list):
            raise ConvertError(f'{path}: expected an "{key}" list')
    images: dict[int, ImageInfo] = {}
    for i, entry in enumerate(obj["images"]):
        if not isinstance(entry, dict) or not _is_int(entry.get("id")):
            raise ConvertError(f"{path}: images[{i}] has no integer id")
        if entry["id"] in images:
            raise ConvertError(f"{path}: images[{i}]: image id {entry['id']} listed twice")
        images[entry["id"]] = ImageInfo.from_entry(entry, [])
    bbox: dict[int, Any] = {}
    for i, ann in enumerate(obj["annotations"]):
        if not isinstance(ann, dict) or not _is_int(ann.get("id")):
            raise ConvertError(f"{path}: annotations[{i}] has no integer id")
        ann_id, image_id = ann["id"], ann.get("image_id")
        if not _is_int(image_id):
            raise ConvertError(f"{path}: annotations[{i}] (id {ann_id}) has no integer image_id")
        if ann_id in bbox:
            raise ConvertError(f"{path}: annotations[{i}]: annotation id {ann_id} listed twice")
        bbox[ann_id] = ann.get("bbox")
        if image_id in images:  # an annotation of an unlisted image is no region of anything
            images[image_id].ann_ids.append(ann_id)
    return Instances(images, bbox)


def _check_bbox(bbox: Any) -> list[float] | None:
    if isinstance(bbox, np.ndarray):
        bbox = bbox.tolist()
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        return None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox):
        return None
    box = [float(v) for v in bbox]
    if not (np.isfinite(box).all() and box[2] > 0 and box[3] > 0):
        return None
    return box


def _gt_regions(arrays: dict[str, Any], image: ImageInfo, where: str):
    """(feat, loc, ann_ids) of the ground-truth boxes: one region per annotation, all kept, in
    the order of the arrays' `ann_ids` when they hold one, else of `image.ann_ids`."""
    feat, loc, _, _ = kept_regions(
        arrays, KEEP_ALL, where, width=image.width, height=image.height, keep_order=True
    )
    order = list(image.ann_ids)
    stored = arrays.get("ann_ids")
    if stored is not None:
        if not (isinstance(stored, np.ndarray) and stored.ndim == 1 and stored.dtype.kind in "iu"):
            shape = getattr(stored, "shape", None)
            raise SkipRecord(
                "ann_ids", "ann_ids", f"{where}: expected a 1-d integer array, got shape {shape}"
            )
        stored = [int(a) for a in stored]
        if Counter(stored) != Counter(order):
            raise SkipRecord(
                "ann_ids",
                "ann_ids",
                f"{where}: its {len(stored)} ann_ids are not the {len(order)} annotations of "
                f"image {image.image_id} (e.g. {sorted(set(stored) ^ set(order))[:3]})",
            )
        order = stored
    if feat.shape[0] != len(order):
        raise SkipRecord(
            "region_count",
            "features",
            f"{where}: {feat.shape[0]} ground-truth regions, image {image.image_id} has "
            f"{len(order)} annotations (one region per annotation expected)",
        )
    return feat, loc, order


def _re_record(
    unit: Unit,
    image: ImageInfo,
    gt: tuple[dict[str, Any], str],
    det: tuple[dict[str, Any], str],
    expressions: list[Expression],
    *,
    policy: RegionPolicy,
    vocab: Vocab,
    dataset: str,
) -> TaskRecord:
    """The "re" record of one image; counts what is left out on `unit`; SkipRecord when the
    image is unusable. gt, det: (decoded arrays, their file or key for messages)."""
    if not (_is_size(image.width) and _is_size(image.height)):
        raise SkipRecord(
            "image_size", "width/height", f"is {image.width!r} x {image.height!r} pixels"
        )
    gt_feat, gt_loc, ann_ids = _gt_regions(gt[0], image, gt[1])
    det_feat, det_loc, _, unit.conf_source = kept_regions(
        det[0], policy, det[1], width=image.width, height=image.height
    )
    index = {ann_id: i for i, ann_id in enumerate(ann_ids)}
    items = []
    for ex in expressions:
        target = index.get(ex.ann_id)
        box = _check_bbox(ex.bbox)
        ids = ex.input_ids
        if target is None:
            detail = f"ann_id {ex.ann_id} is not an annotation of image {image.image_id}"
            unit.left_out.append(("unknown_ann", ex.sent_id, detail))
        elif box is None:
            detail = f"bbox {str(ex.bbox)[:80]} is not [x, y, w, h] with w, h > 0"
            unit.left_out.append(("bbox", ex.sent_id, detail))
        elif not ids:
            unit.left_out.append(("empty_caption", ex.sent_id, "has no tokens"))
        elif not all(_is_int(t) and 0 <= t < vocab.size for t in ids):
            unit.left_out.append(("token_id", ex.sent_id, f"an id outside [0, {vocab.size})"))
        else:
            item = {"id": ex.sent_id, "input_ids": list(ids), "target": target, "bbox": box}
            if ex.ref_id is not None:
                item["ref_id"] = ex.ref_id
            item["ann_id"] = ex.ann_id
            items.append(item)
    if not items:
        raise SkipRecord("no_caption_left", "sentences", "every referring expression was left out")
    meta = {
        "dataset": dataset,
        "image_id": image.image_id,
        "width": image.width,
        "height": image.height,
        "file_name": image.file_name,
        "ann_ids": ann_ids,
    }
    key = sample_key(str(image.image_id))
    return TaskRecord(key, "re", [(gt_feat, gt_loc), (det_feat, det_loc)], items, meta)


def _in_dir(names: set[str], image_id: int, reference: str) -> str | None:
    return next((n for n in (f"{image_id}.npz", reference.format(image_id)) if n in names), None)


# --------------------------------------------------------------------------------------------
# refer's files


class RefsSource(GroupedSource):
    """refer's refs + COCO instances.json + per-image .npz (module docstring) -> "re" shards."""

    kind = "re-refs"

    def __init__(
        self,
        refs: str | Path,
        instances: str | Path,
        split: str,
        gt_npz_dir: str | Path,
        det_npz_dir: str | Path,
        vocab_file: str | Path,
        *,
        dataset: str = "",
        lowercase: bool = False,
        policy: RegionPolicy | None = None,
        vocab: Vocab = BERT_BASE_CASED,
    ) -> None:
        if split not in RE_SPLITS:
            raise ValueError(f"split must be one of {', '.join(RE_SPLITS)}, got {split!r}")
        self.refs = Path(refs)
        self.instances_path = Path(instances)
        self.split = split
        self.gt_dir, self.det_dir = Path(gt_npz_dir), Path(det_npz_dir)
        self.vocab_file = Path(vocab_file)
        self.dataset = dataset
        self.lowercase = lowercase
        self.policy = policy or RegionPolicy()
        self.vocab = vocab

    def open(self) -> None:
        for path in (self.refs, self.instances_path):
            if not path.is_file():
                raise ConvertError(f"{path}: not a file")
        for path in (self.gt_dir, self.det_dir):
            if not path.is_dir():
                raise ConvertError(f"{path}: not a directory")
        self.tokenizer = WordPiece(self.vocab_file, lowercase=self.lowercase, vocab=self.vocab)
        refs = load_refs(self.refs)
        splits = Counter(ref["split"] for ref in refs)
        if not splits[self.split]:
            found = ", ".join(f"{k} {v}" for k, v in sorted(splits.items())) or "no refs"
            raise ConvertError(f"{self.refs}: no ref of split {self.split!r} (refs: {found})")
        self.instances = load_instances(self.instances_path)
        # image id -> (sent_id, ref_id, ann_id, text) of its sentences, in file order
        self.groups: dict[int, list[tuple[str, int, int, str]]] = {}
        self.bad_lines: list[tuple[str, str, str]] = []
        seen: dict[str, int] = {}
        for ref in refs:
            if ref["split"] != self.split:
                continue
            for sent in ref["sentences"]:
                sid = str(sent["sent_id"])
                if sid in seen:
                    detail = f"of ref {ref['ref_id']} was already read with ref {seen[sid]}"
                    self.bad_lines.append(("duplicate_sentence", f"sentence {sid}", detail))
                    continue
                seen[sid] = ref["ref_id"]
                text = sent["sent"] if isinstance(sent.get("sent"), str) else sent["raw"]
                entry = (sid, ref["ref_id"], ref["ann_id"], text)
                self.groups.setdefault(ref["image_id"], []).append(entry)
        self.keys = sorted(self.groups)
        self._gt = {e.name for e in os.scandir(self.gt_dir) if e.name.endswith(".npz")}
        self._det = {e.name for e in os.scandir(self.det_dir) if e.name.endswith(".npz")}

    def identity(self) -> dict:
        return {
            "kind": self.kind,
            "arguments": {
                "refs": str(self.refs.resolve()),
                "instances": str(self.instances_path.resolve()),
                "split": self.split,
                "gt_npz_dir": str(self.gt_dir.resolve()),
                "det_npz_dir": str(self.det_dir.resolve()),
                "vocab": str(self.vocab_file.resolve()),
                "lowercase": self.lowercase,
            },
            "inputs": [
                input_fingerprint(self.refs),
                input_fingerprint(self.instances_path),
                input_fingerprint(self.vocab_file),
                {"path": str(self.gt_dir.resolve()), "npz_files": len(self._gt)},
                {"path": str(self.det_dir.resolve()), "npz_files": len(self._det)},
            ],
        }

    def _arrays(self, folder: Path, names: set[str], image_id: int, reference: str):
        name = _in_dir(names, image_id, reference)
        if name is None:
            detail = f"has no {image_id}.npz or {reference.format(image_id)} in {folder}"
            raise SkipRecord("no_features", None, detail)
        return read_npz_file(folder / name, (*_NPZ_FIELDS, "ann_ids")), name

    def _fill(self, unit: Unit, image_id: int) -> None:
        entries = self.groups[image_id]
        unit.captions_seen = len(entries)
        image = self.instances.images.get(image_id)
        if image is None:
            detail = f"image {image_id} is not in {self.instances_path.name}"
            raise SkipRecord("no_image", "image_id", detail)
        gt = self._arrays(self.gt_dir, self._gt, image_id, GT_NAME)
        det = self._arrays(self.det_dir, self._det, image_id, DET_NAME)
        ids = self.tokenizer.encode([text for *_, text in entries])
        expressions = [
            Expression(
                sid, ref_id, ann_id, [int(t) for t in tokens], self.instances.bbox.get(ann_id)
            )
            for (sid, ref_id, ann_id, _), tokens in zip(entries, ids, strict=True)
        ]
        unit.record = _re_record(
            unit,
            image,
            gt,
            det,
            expressions,
            policy=self.policy,
            vocab=self.vocab,
            dataset=self.dataset,
        )

    def describe(self) -> dict:
        return {"vocab": self.tokenizer.describe(), "soft_labels": "not stored (task shards)"}


# --------------------------------------------------------------------------------------------
# The reference's databases


class ReLmdbSource(GroupedSource):
    """The reference's RE text DB + ground-truth and detected image DBs (module docstring).

    split: keep only the examples whose ref (refs.json) is of this split (None: all of them;
    the reference writes one text DB per split).
    """

    kind = "re-lmdb"
    bad_line_prefix = "text DB "

    def __init__(
        self,
        txt_db: str | Path,
        gt_img_db: str | Path,
        det_img_db: str | Path,
        *,
        split: str | None = None,
        dataset: str = "",
        policy: RegionPolicy | None = None,
        vocab: Vocab = BERT_BASE_CASED,
    ) -> None:
        if split is not None and split not in RE_SPLITS:
            raise ValueError(f"split must be one of {', '.join(RE_SPLITS)}, got {split!r}")
        self.txt_db = Path(txt_db)
        self.gt_db, self.det_db = Path(gt_img_db), Path(det_img_db)
        self.split = split
        self.dataset = dataset
        self.policy = policy or RegionPolicy()
        self.vocab = vocab
        self._dbs = None

    def _json_files(self) -> list[Path]:
        names = ["meta.json", "images.json", "annotations.json"]
        if self.split is not None:
            names.append("refs.json")
        return [self.txt_db / n for n in names if (self.txt_db / n).is_file()]

    def identity(self) -> dict:
        dbs = [self.txt_db / "data.mdb", self.gt_db / "data.mdb", self.det_db / "data.mdb"]
        return {
            "kind": self.kind,
            "arguments": {
                "txt_db": str(self.txt_db.resolve()),
                "gt_img_db": str(self.gt_db.resolve()),
                "det_img_db": str(self.det_db.resolve()),
                "split": self.split,
            },
            "inputs": [input_fingerprint(p) for p in [*dbs, *self._json_files()] if p.exists()],
        }

    def open(self) -> None:
        from .lmdb import open_gt_det_dbs, text_db_examples

        self._dbs = open_gt_det_dbs(self.gt_db, self.det_db, self.txt_db, self.vocab)
        self.images = self._read_images()
        self._bbox = self._read_annotations()
        ref_split = self._read_ref_splits()
        self.groups: dict[int, list[Expression]] = {}
        self.bad_lines: list[tuple[str, str, str]] = []
        with self._dbs.txt.begin(buffers=False) as txn:
            for ident, (image_id, ex) in text_db_examples(txn, self.bad_lines, self._parse):
                if ref_split is not None:
                    if ex.ref_id not in ref_split:
                        detail = f"ref_id {ex.ref_id} is not in refs.json (its split is unknown)"
                        self.bad_lines.append(("unknown_ref", ident, detail))
                        continue
                    if ref_split[ex.ref_id] != self.split:
                        continue  # another split's example
                self.groups.setdefault(image_id, []).append(ex)
        self.keys = sorted(self.groups)

    def _read_images(self) -> dict[int, ImageInfo]:
        path = self.txt_db / "images.json"
        if not path.is_file():
            raise ConvertError(f"{path} is missing: the RE text DB needs it (ann_ids, size)")
        obj = _read_json(path)
        if not isinstance(obj, list):
            raise ConvertError(f"{path}: expected a list of images")
        images = {}
        for i, entry in enumerate(obj):
            if not isinstance(entry, dict) or not _is_int(entry.get("id")):
                raise ConvertError(f"{path}: images[{i}] has no integer id")
            ann_ids = entry.get("ann_ids")
            if not isinstance(ann_ids, list) or not all(_is_int(a) for a in ann_ids):
                raise ConvertError(f"{path}: images[{i}] (id {entry['id']}): ann_ids is no list")
            images[entry["id"]] = ImageInfo.from_entry(entry, list(ann_ids))
        return images

    def _read_annotations(self) -> dict[int, Any]:
        """Annotation id -> bbox from annotations.json, for examples without a bbox."""
        path = self.txt_db / "annotations.json"
        if not path.is_file():
            return {}
        obj = _read_json(path)
        if not isinstance(obj, list):
            raise ConvertError(f"{path}: expected a list of annotations")
        return {a["id"]: a.get("bbox") for a in obj if isinstance(a, dict) and _is_int(a.get("id"))}

    def _read_ref_splits(self) -> dict[int, str] | None:
        if self.split is None:
            return None
        path = self.txt_db / "refs.json"
        if not path.is_file():
            raise ConvertError(f"{path} is missing: --split needs the refs' splits")
        refs = validate_refs(_read_json(path), str(path))
        return {ref["ref_id"]: ref["split"] for ref in refs}

    def _parse(self, ident: str, ex: Any) -> tuple[int, Expression]:
        """(image id, expression) of one text DB example; SkipRecord for a malformed one."""
        if not isinstance(ex, dict):
            raise SkipRecord("decode", None, "is not a map")
        ids = ex.get("input_ids")
        ids = ids.tolist() if isinstance(ids, np.ndarray) else ids
        image_id, ann_id, ref_id = ex.get("image_id"), ex.get("ann_id"), ex.get("ref_id")
        if not (_is_int(image_id) and _is_int(ann_id)):
            raise SkipRecord("decode", None, "lacks an integer image_id or ann_id")
        if not isinstance(ids, list):
            raise SkipRecord("decode", None, "lacks input_ids")
        bbox = ex.get("bbox", self._bbox.get(ann_id))
        ref_id = ref_id if _is_int(ref_id) else None
        return image_id, Expression(ident, ref_id, ann_id, ids, bbox)

    def _fill(self, unit: Unit, image_id: int) -> None:
        from .lmdb import image_from_db

        expressions = self.groups[image_id]
        unit.captions_seen = len(expressions)
        image = self.images.get(image_id)
        if image is None:
            raise SkipRecord("no_image", "image_id", f"image {image_id} is not in images.json")
        unit.record = _re_record(
            unit,
            image,
            image_from_db(self._dbs.gt, GT_NAME.format(image_id), "ground-truth"),
            image_from_db(self._dbs.det, DET_NAME.format(image_id), "detection"),
            expressions,
            policy=self.policy,
            vocab=self.vocab,
            dataset=self.dataset,
        )

    def describe(self) -> dict:
        return {"vocab": self._dbs.vocab_info, "soft_labels": "not stored (task shards)"}

    def close(self) -> None:
        if self._dbs is not None:
            self._dbs.close()
