"""Bottom-up-attention TSV features + COCO-style captions -> shards.

    python -m uniter_fast.convert butd-tsv --tsv trainval_36/trainval_resnet101.tsv.0 \\
        --tsv trainval_36/trainval_resnet101.tsv.1 --fields image_id,image_w,image_h,num_boxes,\\
boxes,features,cls_prob --captions annotations/captions_train2014.json \\
        --vocab bert-base-cased-vocab.txt --out shards/coco --prefix coco

The TSV has no header; each line is one image, tab-separated in the order `--fields` names
(default: image_id, image_w, image_h, num_boxes, boxes, features). `boxes` [num_boxes, 4]
(pixels, x1 y1 x2 y2), `features` [num_boxes, 2048], `cls_prob` [num_boxes, 1601] and
`objects_conf` [num_boxes] are base64 of float32 arrays; other named columns are ignored.
Boxes are normalised by image_w / image_h. Region confidence: `objects_conf` if present, else
the max of `cls_prob` over the object classes 1..1600, else (neither column) the first
`max_regions` regions in file order are kept (recorded in the manifest).

Without `cls_prob` the conversion is refused: MRC and MRC-kl need soft labels. With
`--missing-soft-labels uniform` it goes on with uniform soft labels over classes 1..1600 and
says loudly, here and in the manifest, that MRC targets are then meaningless.

Captions come from a COCO-style JSON (see `captions.py`), matched by image id; images appear in
the shards in TSV order (files in the order given, lines in file order).
"""

from __future__ import annotations

import base64
import binascii
import csv
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..data.schema import BERT_BASE_CASED, IMG_DIM, IMG_LABEL_DIM, Vocab
from .captions import (
    MISSING_SOFT_LABELS,
    UNIFORM_WARNING,
    CocoCaptions,
    WordPiece,
    parse_karpathy_split,
    tokenize_captions,
)
from .common import (
    ConvertError,
    RegionPolicy,
    SkipRecord,
    Source,
    Stats,
    Unit,
    build_record,
    input_fingerprint,
    loc_from_pixel_boxes,
    sample_key,
    uniform_soft_labels,
)

__all__ = ["DEFAULT_FIELDS", "ButdTsvSource", "parse_fields"]

DEFAULT_FIELDS = ("image_id", "image_w", "image_h", "num_boxes", "boxes", "features")
# Known array columns: (float32 row width).
_ARRAY_FIELDS = {"boxes": 4, "features": IMG_DIM, "cls_prob": IMG_LABEL_DIM, "objects_conf": None}


def parse_fields(text: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """The column names of `--fields` ("a,b,c"); the six standard ones are required."""
    names = [f.strip() for f in text.split(",")] if isinstance(text, str) else list(text)
    if any(not n for n in names):
        raise ValueError(f"--fields has an empty column name: {text!r}")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"--fields names {', '.join(dup)} more than once")
    missing = [n for n in DEFAULT_FIELDS if n not in names]
    if missing:
        raise ValueError(f"--fields lacks the required column(s) {', '.join(missing)}")
    return tuple(names)


def _b64_array(text: str, name: str, rows: int, width: int | None) -> np.ndarray:
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise SkipRecord("decode", name, f"is not valid base64 ({e})") from None
    shape = (rows,) if width is None else (rows, width)
    expected = int(np.prod(shape)) * 4
    if len(data) != expected:
        raise SkipRecord(
            "shape",
            name,
            f"holds {len(data)} bytes, expected {expected} (float32 {shape}, num_boxes {rows})",
        )
    return np.frombuffer(data, dtype=np.float32).reshape(shape)


def _number(text: str, name: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise SkipRecord("decode", name, f"is not a number: {text[:40]!r}") from None


class ButdTsvSource(Source):
    """BUTD TSV files + a caption JSON (see the module docstring)."""

    kind = "butd-tsv"

    def __init__(
        self,
        tsv_files: list[str | Path],
        captions: str | Path,
        vocab_file: str | Path,
        *,
        dataset: str,
        fields: tuple[str, ...] = DEFAULT_FIELDS,
        lowercase: bool = False,
        missing_soft_labels: str = "refuse",
        policy: RegionPolicy | None = None,
        vocab: Vocab = BERT_BASE_CASED,
        karpathy_split: str | tuple[str, ...] | None = None,
    ) -> None:
        if missing_soft_labels not in MISSING_SOFT_LABELS:
            raise ValueError(f"missing_soft_labels must be one of {MISSING_SOFT_LABELS}")
        if not tsv_files:
            raise ValueError("ButdTsvSource needs at least one TSV file")
        self.tsv_files = [Path(p) for p in tsv_files]
        self.captions_path = Path(captions)
        self.karpathy_split = karpathy_split  # Karpathy's split files: the splits to read
        self.vocab_file = Path(vocab_file)
        self.dataset = dataset
        self.fields = parse_fields(fields)
        self.lowercase = lowercase
        self.missing_soft_labels = missing_soft_labels
        self.policy = policy or RegionPolicy()
        self.vocab = vocab

    def open(self) -> None:
        if "cls_prob" not in self.fields and self.missing_soft_labels != "uniform":
            raise ConvertError(
                f"--fields {','.join(self.fields)} has no cls_prob column: without soft labels "
                "MRC and MRC-kl have no targets. Name the column in --fields if the TSV has it "
                "(e.g. --fields " + ",".join((*DEFAULT_FIELDS, "cls_prob")) + "), or pass "
                "--missing-soft-labels uniform to convert anyway (MRC targets meaningless)"
            )
        for path in self.tsv_files:
            if not path.is_file():
                raise ConvertError(f"{path}: no such TSV file")
        if "cls_prob" not in self.fields:
            self.warnings.append(UNIFORM_WARNING)
        if "objects_conf" not in self.fields and "cls_prob" not in self.fields:
            self.warnings.append(
                "no objects_conf or cls_prob column: regions cannot be ranked by confidence; "
                f"the first {self.policy.max_regions} of each image in file order are kept"
            )
        # A features column of 100 x 2048 float32 is ~1.1 MB of base64: far above csv's
        # default 128 KiB field limit.
        csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
        self.tokenizer = WordPiece(self.vocab_file, lowercase=self.lowercase, vocab=self.vocab)
        self.coco = CocoCaptions(self.captions_path, karpathy_split=self.karpathy_split)
        captioned = [img for img in self.coco.images if img.captions]
        self._captioned = [img.image_id for img in captioned]
        self._index = {img.image_id: (i, img) for i, img in enumerate(captioned)}
        self.warnings.extend(self.coco.warnings())

    def identity(self) -> dict:
        return {
            "kind": self.kind,
            "arguments": {
                "tsv": [str(p.resolve()) for p in self.tsv_files],
                "captions": str(self.captions_path.resolve()),
                "karpathy_split": (
                    list(parse_karpathy_split(self.karpathy_split)) if self.karpathy_split else None
                ),
                "vocab": str(self.vocab_file.resolve()),
                "fields": list(self.fields),
                "lowercase": self.lowercase,
                "missing_soft_labels": self.missing_soft_labels,
            },
            "inputs": [
                *(input_fingerprint(p) for p in self.tsv_files),
                self.coco.fingerprint(),
                input_fingerprint(self.vocab_file),
            ],
        }

    def num_marks(self) -> int:
        return len(self._captioned)

    def units(self, cursor: Any, marks: np.ndarray) -> Iterator[Unit]:
        # cursor: [file index, byte offset, line number] right after the last unit.
        file_index, offset, line_no = cursor if cursor is not None else (0, 0, 0)
        for fi in range(file_index, len(self.tsv_files)):
            path = self.tsv_files[fi]
            if fi != file_index:
                offset, line_no = 0, 0
            with open(path, "rb") as f:
                f.seek(offset)
                while line := f.readline():
                    offset += len(line)
                    line_no += 1
                    text = line.rstrip(b"\r\n")
                    if not text.strip():
                        continue  # blank lines (a trailing newline) are no images
                    unit = Unit(key=f"{path.name}:{line_no}", cursor=[fi, offset, line_no])
                    try:
                        self._fill(unit, text, marks)
                    except SkipRecord as e:
                        unit.record = None
                        unit.skip, unit.source_field, unit.detail = e.reason, e.field, e.detail
                    yield unit

    def _fill(self, unit: Unit, text: bytes, marks: np.ndarray) -> None:
        try:
            row = next(csv.reader([text.decode("utf-8")], delimiter="\t"))
        except UnicodeDecodeError as e:
            raise SkipRecord("decode", None, f"line is not UTF-8 ({e})") from None
        except csv.Error as e:
            raise SkipRecord("decode", None, f"line is not TSV ({e})") from None
        if len(row) != len(self.fields):
            raise SkipRecord(
                "columns", None, f"has {len(row)} columns, --fields names {len(self.fields)}"
            )
        cols = dict(zip(self.fields, row, strict=True))
        image_id = cols["image_id"].strip()
        unit.key = f"image {image_id} ({unit.key})"
        found = self._index.get(image_id)
        if found is None:
            raise SkipRecord("no_caption", None, "has no caption in the caption JSON")
        mark, image = found
        if marks[mark]:
            raise SkipRecord("duplicate_image", "image_id", "appeared on an earlier line")
        marks[mark] = True
        unit.mark = mark
        width = _number(cols["image_w"], "image_w")
        height = _number(cols["image_h"], "image_h")
        nb = _number(cols["num_boxes"], "num_boxes")
        if nb != int(nb) or nb < 0:
            raise SkipRecord("decode", "num_boxes", f"is not a count: {cols['num_boxes']!r}")
        nb = int(nb)
        kept, kept_ids = tokenize_captions(unit, image, self.tokenizer)
        arrays = {
            name: _b64_array(cols[name], name, nb, width_)
            for name, width_ in _ARRAY_FIELDS.items()
            if name in cols
        }
        loc = loc_from_pixel_boxes(arrays["boxes"], width, height)
        conf = arrays.get("objects_conf")
        soft = arrays.get("cls_prob")
        if conf is not None:
            unit.conf_source = "objects_conf"
        elif soft is not None:
            unit.conf_source = "cls_prob_max"
            conf = soft[:, 1:].max(axis=1)
        else:
            unit.conf_source = "file_order"
        if soft is None:
            soft = uniform_soft_labels(nb)
        unit.record = build_record(
            sample_key(image_id),
            features=arrays["features"],
            loc=loc,
            conf=conf,
            soft=soft,
            captions=kept,
            meta={
                "image_id": image_id,
                "dataset": self.dataset,
                "file_name": image.file_name,
                "width": width,
                "height": height,
                "caption_ids": kept_ids,
                "num_source_regions": nb,
            },
            policy=self.policy,
            vocab=self.vocab,
        )

    def final_counts(self, stats: Stats) -> None:
        missing = [self._captioned[i] for i in np.flatnonzero(~stats.marks)]
        stats.skip_many("no_features", missing, "has captions but no line in the TSV")
        for ann_id, image_id in self.coco.dangling:
            stats.captions_seen += 1
            stats.leave_out("unknown_image", f"annotation {ann_id}", f"image {image_id} unlisted")

    def describe(self) -> dict:
        soft = "source" if "cls_prob" in self.fields else "uniform"
        return {"vocab": self.tokenizer.describe(), "soft_labels": soft}
