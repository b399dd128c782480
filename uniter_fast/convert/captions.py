"""COCO-style captions, WordPiece tokenisation, and per-image .npz features + captions -> shards.

    python -m uniter_fast.convert npz-captions --npz-dir features/coco_val2014 \\
        --captions annotations/captions_val2014.json --vocab bert-base-cased-vocab.txt \\
        --out shards/coco_val --prefix coco_val

Caption JSON (COCO): `{"images": [{"id", "file_name", "width", "height"}, ...],
"annotations": [{"id", "image_id", "caption"}, ...]}`. Without "images", the images are the
annotations' `image_id`s. Images go in order of id; an image's captions in annotation order.

Or Karpathy's split files (`dataset_coco.json`, `dataset_flickr30k.json`, the retrieval splits):
`{"images": [{"filename", "cocoid" (COCO only), "split", "sentences": [{"raw", "sentid"}]}]}`,
read with `--karpathy-split` (e.g. `train,restval`; required for these files, refused for COCO
ones): only the images of those splits are kept. Image id: `cocoid`, else the filename's stem
(Flickr30k's `1000092795.jpg` -> `1000092795`); caption ids: `sentid`; text: `raw`.

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
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..data.schema import BERT_BASE_CASED, MAX_REGIONS, Vocab
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
    read_npz_file,
    require_extra,
    sample_key,
    select_regions,
    uniform_soft_labels,
    units_in_order,
)

__all__ = [
    "KARPATHY_SPLITS",
    "CaptionFile",
    "CaptionImage",
    "CocoCaptions",
    "NpzCaptionsSource",
    "WordPiece",
    "parse_karpathy_split",
]

_NPZ_FIELDS = ("features", "norm_bb", "boxes", "conf", "soft_labels", "image_w", "image_h")
MISSING_SOFT_LABELS = ("refuse", "uniform")
UNIFORM_WARNING = (
    "soft labels are missing and replaced by a uniform distribution over classes 1..1600 "
    "(--missing-soft-labels uniform): MRC and MRC-kl targets are meaningless on these shards; "
    "leave those tasks out of the mix"
)
# Ground-truth boxes (RE, VCR): every one, in stored order (what targets and tags point at).
KEEP_ALL = RegionPolicy(min_regions=1, max_regions=MAX_REGIONS)


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


KARPATHY_SPLITS = ("train", "restval", "val", "test")


def parse_karpathy_split(text: str | Sequence[str]) -> tuple[str, ...]:
    """The splits of `--karpathy-split` ("train,restval" -> ("train", "restval")); ValueError
    for an empty or unknown one."""
    names = [n.strip() for n in text.split(",")] if isinstance(text, str) else list(text)
    bad = [n for n in names if n not in KARPATHY_SPLITS]
    if not names or bad:
        raise ValueError(
            f"--karpathy-split takes splits among {', '.join(KARPATHY_SPLITS)} separated by ',', "
            f"got {text!r}"
        )
    return tuple(dict.fromkeys(names))


@dataclass(frozen=True)
class CaptionFile:
    """A caption JSON and, for Karpathy's split files, the splits to read from it.

    Accepted by `CocoCaptions` wherever a path is; path-like (`os.fspath`, `resolve()`), so a
    source that keeps its caption path and hands it to `CocoCaptions` as it is carries the
    splits along.
    """

    path: Path
    karpathy_split: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))
        if self.karpathy_split is not None:
            object.__setattr__(self, "karpathy_split", parse_karpathy_split(self.karpathy_split))

    def __fspath__(self) -> str:
        return os.fspath(self.path)

    def resolve(self) -> Path:
        return self.path.resolve()


def _is_karpathy(obj: Any) -> bool:
    """Karpathy's layout: no "annotations"; images carry their own "sentences"."""
    return (
        isinstance(obj, dict)
        and "annotations" not in obj
        and isinstance(images := obj.get("images"), list)
        and any(isinstance(e, dict) and "sentences" in e for e in images)
    )


class CocoCaptions:
    """A COCO-style caption JSON, or the chosen splits of a Karpathy split file (module
    docstring); images sorted by id (numerically when all ids are integers).

    path: the JSON, or a `CaptionFile` naming it and its Karpathy splits.
    karpathy_split: the Karpathy splits to keep (required for those files, refused for COCO's).
    images: the sorted `CaptionImage`s. by_id: image id string -> CaptionImage.
    dangling: (annotation id, image id) of captions whose image is not listed.
    duplicates: image ids listed more than once (the first entry is kept).
    excluded: Karpathy files: the images of the splits not chosen (no captions read).
    split_counts: Karpathy files: images per split in the whole file.
    """

    def __init__(
        self,
        path: str | os.PathLike | CaptionFile,
        karpathy_split: Sequence[str] | None = None,
    ) -> None:
        if isinstance(path, CaptionFile):
            path, karpathy_split = path.path, karpathy_split or path.karpathy_split
        self.path = Path(path)
        self.karpathy_split = (
            None if karpathy_split is None else parse_karpathy_split(karpathy_split)
        )
        try:
            obj = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConvertError(f"{self.path}: cannot read the caption JSON ({e})") from None
        self.by_id: dict[str, CaptionImage] = {}
        self.duplicates: list[str] = []
        self.dangling: list[tuple[str, str]] = []
        self.excluded: list[CaptionImage] = []
        self.split_counts: dict[str, int] = {}
        if _is_karpathy(obj):
            if self.karpathy_split is None:
                raise ConvertError(
                    f"{self.path} is one of Karpathy's split files: choose its splits with "
                    "--karpathy-split (e.g. train,restval for COCO training, test for "
                    "evaluation)"
                )
            raw_ids = self._read_karpathy(obj)
        else:
            if self.karpathy_split is not None:
                raise ConvertError(
                    f"{self.path} is a COCO caption JSON, not one of Karpathy's split files: "
                    "--karpathy-split does not apply to it"
                )
            raw_ids = self._read_coco(obj)
        numeric = all(type(v) is int for v in raw_ids.values())
        order = sorted(raw_ids, key=(lambda k: raw_ids[k]) if numeric else None)
        self.images = [self.by_id[k] for k in order]

    def _read_coco(self, obj: Any) -> dict[str, Any]:
        if not isinstance(obj, dict) or not isinstance(obj.get("annotations"), list):
            raise ConvertError(f'{self.path}: expected an object with an "annotations" list')
        raw_images = obj.get("images")
        if raw_images is not None and not isinstance(raw_images, list):
            raise ConvertError(f'{self.path}: "images" must be a list')
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
        return raw_ids

    def _read_karpathy(self, obj: dict) -> dict[str, Any]:
        wanted = set(self.karpathy_split or ())
        counts: Counter[str] = Counter()
        raw_ids: dict[str, Any] = {}
        for i, entry in enumerate(obj["images"]):
            where = f"{self.path}: images[{i}]"
            if not isinstance(entry, dict):
                raise ConvertError(f"{where} is not an object")
            split, filename, cocoid = entry.get("split"), entry.get("filename"), entry.get("cocoid")
            if not isinstance(split, str):
                raise ConvertError(f'{where} has no "split" string')
            if filename is not None and not isinstance(filename, str):
                raise ConvertError(f'{where}: "filename" is {filename!r}, expected a string')
            if cocoid is not None:
                if type(cocoid) is not int:
                    raise ConvertError(f'{where}: "cocoid" is {cocoid!r}, expected an integer')
                raw = cocoid
            elif filename:
                raw = Path(filename).stem  # Flickr30k: features are named by this stem
            else:
                raise ConvertError(f'{where} has neither "cocoid" nor "filename"')
            counts[split] += 1
            key = str(raw)
            image = CaptionImage(image_id=key, file_name=filename)
            if split not in wanted:
                self.excluded.append(image)
                continue
            if key in self.by_id:
                self.duplicates.append(key)
                continue
            sentences = entry.get("sentences")
            if not isinstance(sentences, list):
                raise ConvertError(f'{where} (image {key}): "sentences" is not a list')
            for j, sent in enumerate(sentences):
                sent = sent if isinstance(sent, dict) else {}
                sid, text = sent.get("sentid"), sent.get("raw")
                cid = f"{key}/{j}" if sid is None or isinstance(sid, bool) else str(sid)
                image.captions.append((cid, text if isinstance(text, str) else None))
            raw_ids[key] = raw
            self.by_id[key] = image
        self.split_counts = dict(sorted(counts.items()))
        if not raw_ids:
            found = ", ".join(f"{k} {v}" for k, v in self.split_counts.items()) or "none"
            raise ConvertError(
                f"{self.path}: no image in Karpathy split(s) {','.join(self.karpathy_split or ())}"
                f" (images per split in the file: {found})"
            )
        return raw_ids

    def warnings(self) -> list[str]:
        """What a converter reading this file should warn about (duplicated image ids, chosen
        Karpathy splits the file does not have)."""
        lines = []
        if self.duplicates:
            lines.append(
                f"{self.path}: {len(self.duplicates)} image id(s) listed more than once, the "
                f"first entry kept (e.g. {', '.join(self.duplicates[:5])})"
            )
        absent = [s for s in self.karpathy_split or () if s not in self.split_counts]
        if absent:
            lines.append(
                f"{self.path}: no image in Karpathy split(s) {', '.join(absent)} (the file has "
                f"{', '.join(self.split_counts)})"
            )
        return lines

    def fingerprint(self) -> dict:
        """What identifies this input (a resumed conversion must read the same): the file,
        and the chosen Karpathy splits."""
        info = input_fingerprint(self.path)
        if self.karpathy_split is not None:
            info["karpathy_split"] = list(self.karpathy_split)
        return info


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
    soft_labels_for: str = "MRC",
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray, str]:
    """(features, loc [n, 7], conf or None, soft, confidence source) from decoded fields.
    soft_labels_for: the task named when soft labels are missing and refused."""
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
            fix = "--missing-soft-labels uniform fills it in"
            detail = f"is missing ({soft_labels_for} needs it; {fix})"
            raise SkipRecord("missing_field", "soft_labels", detail)
        n = features.shape[0] if isinstance(features, np.ndarray) and features.ndim == 2 else 0
        soft = uniform_soft_labels(n)
    return features, loc, conf, soft, conf_source


def kept_regions(
    arrays: dict[str, Any],
    policy: RegionPolicy,
    where: str,
    *,
    width: float | None = None,
    height: float | None = None,
    keep_order: bool = False,
    missing_soft_labels: str = "uniform",
    soft_labels_for: str = "MRC",
) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """(float16 features, float32 boxes, float16 soft labels, confidence source) of the kept
    regions of one image's decoded arrays, for the task shards. Raises SkipRecord naming
    `where` (the image's file or key) for bad input.

    width, height: the image size in pixels for pixel `boxes` (else the arrays' image_w/h).
    keep_order: keep every region in source order, ignoring the confidences, and refuse more
    than `policy.max_regions` ("too_many_regions"): ground-truth boxes (policy `KEEP_ALL`), one
    per annotation or object, whose order is what targets and tags point at.
    missing_soft_labels, soft_labels_for: as `regions_from_arrays` takes them.
    """
    if keep_order:
        features = arrays.get("features")
        n = features.shape[0] if isinstance(features, np.ndarray) and features.ndim == 2 else 0
        if n > policy.max_regions:
            detail = f"{where}: {n} ground-truth regions, more than {policy.max_regions}"
            raise SkipRecord("too_many_regions", "features", detail)
    try:
        features, loc, conf, soft, conf_source = regions_from_arrays(
            arrays,
            width=width,
            height=height,
            missing_soft_labels=missing_soft_labels,
            soft_labels_for=soft_labels_for,
        )
        if keep_order:
            conf, conf_source = None, "file_order"
        feat, loc, soft = select_regions(
            features=features, loc=loc, conf=conf, soft=soft, policy=policy
        )
    except SkipRecord as e:
        raise SkipRecord(e.reason, e.field, f"{where}: {e.detail}") from None
    return feat, loc, soft, conf_source


def read_task_npz(path: Path, policy: RegionPolicy) -> tuple[np.ndarray, np.ndarray, str]:
    """(float16 features, float32 boxes, confidence source): `kept_regions` of a per-image .npz,
    for the task shards that store no soft labels (missing ones are no reason to skip)."""
    feat, loc, _, conf_source = kept_regions(read_npz_file(path, _NPZ_FIELDS), policy, path.name)
    return feat, loc, conf_source


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
    """A directory of per-image .npz features plus a COCO caption JSON, or the chosen splits
    of a Karpathy split file (module docstring)."""

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
        karpathy_split: Sequence[str] | None = None,
        policy: RegionPolicy | None = None,
        vocab: Vocab = BERT_BASE_CASED,
    ) -> None:
        if missing_soft_labels not in MISSING_SOFT_LABELS:
            raise ValueError(f"missing_soft_labels must be one of {MISSING_SOFT_LABELS}")
        self.npz_dir = Path(npz_dir)
        self.captions_path = Path(captions)
        self.karpathy_split = (
            None if karpathy_split is None else parse_karpathy_split(karpathy_split)
        )
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
        self.coco = CocoCaptions(self.captions_path, self.karpathy_split)
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
                # Only when given: a COCO conversion's identity (and journal) stays as it was.
                **({"karpathy_split": list(self.karpathy_split)} if self.karpathy_split else {}),
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
        arrays = read_npz_file(self.npz_dir / npz_name, _NPZ_FIELDS)
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
        # listed image points to (a Karpathy file's images of other splits are not counted).
        used = {self._npz_name(img) for img in (*self.coco.images, *self.coco.excluded)}
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
