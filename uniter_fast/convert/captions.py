"""COCO-style captions, WordPiece tokenisation, and per-image .npz features + captions -> shards.

    python -m uniter_fast.convert npz-captions --npz-dir features/coco_val2014 \\
        --captions annotations/captions_val2014.json --vocab bert-base-cased-vocab.txt \\
        --out shards/coco_val --prefix coco_val

Caption JSON (COCO): `{"images": [{"id", "file_name", "width", "height"}, ...],
"annotations": [{"id", "image_id", "caption"}, ...]}`. Without "images", the images are the
annotations' `image_id`s. Images go in order of id; an image's captions in annotation order.

Tokenisation: `tokenizers.BertWordPieceTokenizer` over `--vocab` (BERT normalisation: clean
text, split Chinese characters; cased unless `--lowercase`, which also strips accents as BERT's
uncased models do). No [CLS]/[SEP] is stored: the task builders add them. The vocab file must
be the model's: as many lines as the model's vocabulary and [PAD]/[UNK]/[CLS]/[SEP]/[MASK] at its
special ids, else the conversion is refused.

Features: `<npz-dir>/<file_name stem>.npz`, else `<npz-dir>/<image id>.npz`, holding
`features` [n, 2048], `norm_bb` [n, 6|7] (or pixel `boxes` [n, 4] with the image size from the
JSON or the npz's `image_w`/`image_h`), `conf` [n] (optional: else the max soft label over the
object classes) and `soft_labels` [n, 1601]. Read with `allow_pickle=False`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..data.schema import BERT_BASE_CASED, Vocab
from .common import (
    ConvertError,
    RegionPolicy,
    SkipRecord,
    Source,
    Stats,
    Unit,
    build_record,
    filter_captions,
    input_fingerprint,
    loc_from_norm_bb,
    loc_from_pixel_boxes,
    read_npz,
    require_extra,
    sample_key,
    select_regions,
    uniform_soft_labels,
    units_in_order,
)

__all__ = ["CaptionImage", "CocoCaptions", "NpzCaptionsSource", "WordPiece"]

_NPZ_FIELDS = ("features", "norm_bb", "boxes", "conf", "soft_labels", "image_w", "image_h")
MISSING_SOFT_LABELS = ("refuse", "uniform")
UNIFORM_WARNING = (
    "soft labels are missing and replaced by a uniform distribution over classes 1..1600 "
    "(--missing-soft-labels uniform): MRC and MRC-kl targets are meaningless on these shards; "
    "leave those tasks out of the mix"
)


@dataclass
class CaptionImage:
    """One image of a caption JSON: its id (as a string), size if given, and captions.

    captions: (annotation id, caption text or None when the annotation has no string caption).
    """

    image_id: str
    file_name: str | None = None
    width: float | None = None
    height: float | None = None
    captions: list[tuple[str, str | None]] = field(default_factory=list)


class CocoCaptions:
    """A COCO-style caption JSON, images sorted by id (numerically when all ids are integers).

    images: the sorted `CaptionImage`s. by_id: image id string -> CaptionImage.
    dangling: (annotation id, image id) of captions whose image is not listed.
    duplicates: image ids listed more than once (the first entry is kept).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        try:
            obj = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConvertError(f"{self.path}: cannot read the caption JSON ({e})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("annotations"), list):
            raise ConvertError(f'{self.path}: expected an object with an "annotations" list')
        raw_images = obj.get("images")
        if raw_images is not None and not isinstance(raw_images, list):
            raise ConvertError(f'{self.path}: "images" must be a list')
        self.by_id: dict[str, CaptionImage] = {}
        self.duplicates: list[str] = []
        raw_ids: dict[str, Any] = {}
        for i, entry in enumerate(raw_images or []):
            if not isinstance(entry, dict) or "id" not in entry:
                raise ConvertError(f'{self.path}: images[{i}] has no "id"')
            key = str(entry["id"])
            if key in self.by_id:
                self.duplicates.append(key)
                continue
            raw_ids[key] = entry["id"]
            self.by_id[key] = CaptionImage(
                image_id=key,
                file_name=entry.get("file_name"),
                width=entry.get("width"),
                height=entry.get("height"),
            )
        self.dangling: list[tuple[str, str]] = []
        for i, ann in enumerate(obj["annotations"]):
            if not isinstance(ann, dict) or "image_id" not in ann:
                raise ConvertError(f'{self.path}: annotations[{i}] has no "image_id"')
            key = str(ann["image_id"])
            ann_id = str(ann.get("id", i))
            caption = ann.get("caption")
            caption = caption if isinstance(caption, str) else None
            if key not in self.by_id:
                if raw_images is not None:
                    self.dangling.append((ann_id, key))
                    continue
                raw_ids[key] = ann["image_id"]
                self.by_id[key] = CaptionImage(image_id=key)
            self.by_id[key].captions.append((ann_id, caption))
        numeric = all(type(v) is int for v in raw_ids.values())
        order = sorted(raw_ids, key=(lambda k: raw_ids[k]) if numeric else None)
        self.images = [self.by_id[k] for k in order]

    def warnings(self) -> list[str]:
        """What a converter reading this file should warn about (duplicated image ids)."""
        if not self.duplicates:
            return []
        return [
            f"{self.path}: {len(self.duplicates)} image id(s) listed more than once, the first "
            f"entry kept (e.g. {', '.join(self.duplicates[:5])})"
        ]

    def fingerprint(self) -> dict:
        return input_fingerprint(self.path)


class WordPiece:
    """A BERT WordPiece tokenizer over a vocab file that must match the model's vocabulary."""

    def __init__(
        self,
        vocab_file: str | os.PathLike,
        *,
        lowercase: bool = False,
        vocab: Vocab = BERT_BASE_CASED,
    ) -> None:
        tokenizers = require_extra("tokenizers")
        self.path = Path(vocab_file)
        try:
            data = self.path.read_bytes()
            tokens = data.decode("utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise ConvertError(f"{self.path}: cannot read the vocab file ({e})") from None
        problems = []
        if len(tokens) != vocab.size:
            problems.append(f"it has {len(tokens)} tokens, the model's vocabulary {vocab.size}")
        for name, index in (
            ("[PAD]", vocab.pad_id),
            ("[UNK]", vocab.unk_id),
            ("[CLS]", vocab.cls_id),
            ("[SEP]", vocab.sep_id),
            ("[MASK]", vocab.mask_id),
        ):
            found = tokens[index] if index < len(tokens) else None
            if found != name:
                problems.append(f"id {index} is {found!r}, expected {name}")
        if len(set(tokens)) != len(tokens):
            problems.append("it lists a token twice (ids would be ambiguous)")
        if problems:
            raise ConvertError(f"{self.path}: not the model's vocabulary: " + "; ".join(problems))
        self.lowercase = lowercase
        self.sha256 = hashlib.sha256(data).hexdigest()
        self.vocab = vocab
        self._tok = tokenizers.BertWordPieceTokenizer(
            str(self.path),
            clean_text=True,
            handle_chinese_chars=True,
            strip_accents=None,  # as BERT: stripped with lowercasing only
            lowercase=lowercase,
        )

    def encode(self, texts: list[str]) -> list[list[int]]:
        """WordPiece ids of each text, without [CLS]/[SEP]."""
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def describe(self) -> dict:
        v = self.vocab
        return {
            "file": str(self.path.resolve()),
            "sha256": self.sha256,
            "lowercase": self.lowercase,
            "size": v.size,
            "special_ids": {
                "PAD": v.pad_id,
                "UNK": v.unk_id,
                "CLS": v.cls_id,
                "SEP": v.sep_id,
                "MASK": v.mask_id,
            },
            "word_range": [v.word_start, v.word_end],
        }


def tokenize_captions(
    unit: Unit, image: CaptionImage, tokenizer: WordPiece
) -> tuple[list[np.ndarray], list[str]]:
    """Tokenise an image's captions; record what is left out on `unit`; SkipRecord if none."""
    texts = [(cid, text) for cid, text in image.captions if text is not None]
    for cid, text in image.captions:
        if text is None:
            unit.left_out.append(("decode", cid, "has no caption string"))
    ids = tokenizer.encode([t for _, t in texts]) if texts else []
    kept, kept_ids, left_out = filter_captions(
        [(cid, i) for (cid, _), i in zip(texts, ids, strict=True)], tokenizer.vocab
    )
    unit.captions_seen = len(image.captions)
    unit.left_out.extend(left_out)
    if not kept:
        raise SkipRecord("no_caption_left", "caption", "every caption was left out")
    return kept, kept_ids


def regions_from_arrays(
    arrays: dict[str, Any],
    *,
    width: float | None,
    height: float | None,
    missing_soft_labels: str,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray, str]:
    """(features, loc [n, 7], conf or None, soft, confidence source) from decoded fields."""
    if "features" not in arrays:
        raise SkipRecord("missing_field", "features", "is missing")
    features = arrays["features"]
    if "norm_bb" in arrays:
        loc = loc_from_norm_bb(arrays["norm_bb"])
    elif "boxes" in arrays:
        # The JSON's size first; the npz's own when the JSON has none.
        if not _is_number(width):
            width = _scalar(arrays.get("image_w"), "image_w")
        if not _is_number(height):
            height = _scalar(arrays.get("image_h"), "image_h")
        loc = loc_from_pixel_boxes(arrays["boxes"], width, height)
    else:
        raise SkipRecord("missing_field", "norm_bb", "is missing (and no pixel boxes either)")
    soft = arrays.get("soft_labels")
    conf = arrays.get("conf")
    if conf is not None:
        conf_source = "conf"
    elif soft is not None:
        conf_source = "soft_labels_max"
        if isinstance(soft, np.ndarray) and soft.ndim == 2 and soft.shape[1] > 1:
            conf = soft[:, 1:].max(axis=1)
    else:
        conf_source = "file_order"
    if soft is None:
        if missing_soft_labels != "uniform":
            raise SkipRecord(
                "missing_field",
                "soft_labels",
                "is missing (MRC needs it; --missing-soft-labels uniform fills it in)",
            )
        n = features.shape[0] if isinstance(features, np.ndarray) and features.ndim == 2 else 0
        soft = uniform_soft_labels(n)
    return features, loc, conf, soft, conf_source


def task_regions(
    arrays: dict[str, Any], policy: RegionPolicy, where: str
) -> tuple[np.ndarray, np.ndarray, str]:
    """(float16 features, float32 boxes, confidence source) of the kept regions of one image's
    decoded arrays, for
    the task shards (which store no soft labels: missing ones are no reason to skip). Raises
    SkipRecord naming `where` (the image's file or key) for bad input."""
    try:
        features, loc, conf, soft, conf_source = regions_from_arrays(
            arrays, width=None, height=None, missing_soft_labels="uniform"
        )
        feat, loc, _ = select_regions(
            features=features, loc=loc, conf=conf, soft=soft, policy=policy
        )
    except SkipRecord as e:
        raise SkipRecord(e.reason, e.field, f"{where}: {e.detail}") from None
    return feat, loc, conf_source


def read_task_npz(path: Path, policy: RegionPolicy) -> tuple[np.ndarray, np.ndarray, str]:
    """`task_regions` of a per-image .npz."""
    try:
        arrays = read_npz(path, _NPZ_FIELDS)
    except SkipRecord as e:
        raise SkipRecord(e.reason, e.field, f"{path.name}: {e.detail}") from None
    return task_regions(arrays, policy, path.name)


def _num_rows(array: Any) -> int:
    return int(array.shape[0]) if isinstance(array, np.ndarray) and array.ndim >= 1 else 0


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _scalar(value: Any, name: str) -> float:
    if value is None:
        raise SkipRecord("missing_field", name, "is missing (needed to normalise pixel boxes)")
    array = np.asarray(value)
    if array.size != 1 or array.dtype.kind not in "iuf":
        raise SkipRecord("shape", name, f"is not a number (shape {array.shape})")
    return float(array.reshape(()))


class NpzCaptionsSource(Source):
    """A directory of per-image .npz features plus a COCO caption JSON (module docstring)."""

    kind = "npz-captions"

    def __init__(
        self,
        npz_dir: str | Path,
        captions: str | Path,
        vocab_file: str | Path,
        *,
        dataset: str,
        lowercase: bool = False,
        missing_soft_labels: str = "refuse",
        policy: RegionPolicy | None = None,
        vocab: Vocab = BERT_BASE_CASED,
    ) -> None:
        if missing_soft_labels not in MISSING_SOFT_LABELS:
            raise ValueError(f"missing_soft_labels must be one of {MISSING_SOFT_LABELS}")
        self.npz_dir = Path(npz_dir)
        self.captions_path = Path(captions)
        self.vocab_file = Path(vocab_file)
        self.dataset = dataset
        self.lowercase = lowercase
        self.missing_soft_labels = missing_soft_labels
        self.policy = policy or RegionPolicy()
        self.vocab = vocab

    def open(self) -> None:
        if not self.npz_dir.is_dir():
            raise ConvertError(f"{self.npz_dir}: not a directory")
        self.tokenizer = WordPiece(self.vocab_file, lowercase=self.lowercase, vocab=self.vocab)
        self.coco = CocoCaptions(self.captions_path)
        # One listing instead of a stat per image; sorted so that every count is reproducible.
        self._npz = sorted(e.name for e in os.scandir(self.npz_dir) if e.name.endswith(".npz"))
        self._npz_set = set(self._npz)
        if self.missing_soft_labels == "uniform":
            self.warnings.append(UNIFORM_WARNING)
        self.warnings.extend(self.coco.warnings())

    def identity(self) -> dict:
        return {
            "kind": self.kind,
            "arguments": {
                "npz_dir": str(self.npz_dir.resolve()),
                "captions": str(self.captions_path.resolve()),
                "vocab": str(self.vocab_file.resolve()),
                "lowercase": self.lowercase,
                "missing_soft_labels": self.missing_soft_labels,
            },
            "inputs": [
                self.coco.fingerprint(),
                input_fingerprint(self.vocab_file),
                {"path": str(self.npz_dir.resolve()), "npz_files": len(self._npz)},
            ],
        }

    def total(self) -> int:
        return len(self.coco.images)

    def _npz_name(self, image: CaptionImage) -> str | None:
        candidates = [f"{image.image_id}.npz"]
        if image.file_name:
            candidates.insert(0, Path(str(image.file_name)).stem + ".npz")
        return next((c for c in candidates if c in self._npz_set), None)

    def units(self, cursor: Any, marks: np.ndarray) -> Iterator[Unit]:
        return units_in_order(cursor, self.coco.images, lambda im: im.image_id, self._fill)

    def _fill(self, unit: Unit, image: CaptionImage) -> None:
        if not image.captions:
            raise SkipRecord("no_caption", None, "has no caption in the caption JSON")
        npz_name = self._npz_name(image)
        if npz_name is None:
            raise SkipRecord("no_features", None, f"has no .npz in {self.npz_dir}")
        kept, kept_ids = tokenize_captions(unit, image, self.tokenizer)
        try:
            arrays = read_npz(self.npz_dir / npz_name, _NPZ_FIELDS)
        except SkipRecord as e:
            raise SkipRecord(e.reason, e.field, f"{npz_name}: {e.detail}") from None
        features, loc, conf, soft, unit.conf_source = regions_from_arrays(
            arrays,
            width=image.width,
            height=image.height,
            missing_soft_labels=self.missing_soft_labels,
        )
        key = sample_key(image.image_id)
        unit.record = build_record(
            key,
            features=features,
            loc=loc,
            conf=conf,
            soft=soft,
            captions=kept,
            meta={
                "image_id": image.image_id,
                "dataset": self.dataset,
                "file_name": image.file_name,
                "width": image.width,
                "height": image.height,
                "caption_ids": kept_ids,
                "num_source_regions": _num_rows(features),
            },
            policy=self.policy,
            vocab=self.vocab,
        )

    def final_counts(self, stats: Stats) -> None:
        # Images listed without captions were units already; these are .npz files that no
        # listed image points to.
        used = {self._npz_name(img) for img in self.coco.images}
        unused = [name for name in self._npz if name not in used]
        stats.skip_many("no_caption", unused, "is an .npz no image of the caption JSON names")
        for ann_id, image_id in self.coco.dangling:
            stats.captions_seen += 1
            stats.leave_out("unknown_image", f"annotation {ann_id}", f"image {image_id} unlisted")

    def describe(self) -> dict:
        return {"vocab": self.tokenizer.describe(), "soft_labels": self.missing_soft_labels_label}

    @property
    def missing_soft_labels_label(self) -> str:
        return (
            "source, uniform where missing" if self.missing_soft_labels == "uniform" else "source"
        )
