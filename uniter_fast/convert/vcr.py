"""Visual Commonsense Reasoning (VCR) -> "vcr" task shards.

    python -m uniter_fast.convert vcr-jsonl --jsonl vcr/train.jsonl \\
        --gt-npz-dir feat/vcr_gt_train --det-npz-dir feat/vcr_det_train \\
        [--metadata-dir vcr/vcr1images] --vocab bert-base-cased-vocab.txt \\
        --out shards/vcr/train --prefix vcr_train
    python -m uniter_fast.convert vcr-lmdb --txt-db txt_db/vcr_train.db \\
        --gt-img-db img_db/vcr_gt_train --det-img-db img_db/vcr_train \\
        --out shards/vcr/train --prefix vcr_train

One sample per image (a movie frame, `uniter_fast.data.task_shards`, task "vcr") holding every
question about it: `feat.npy`/`loc.npy`/`soft.npy` are its ground-truth boxes, all of them, in
the order of the image's `objects` list, so that **ground-truth region k is object k** (the tag
of a person points at a known region); `feat1.npy`/`loc1.npy`/`soft1.npy` its detected boxes,
kept by the usual rule (clamp(#(conf > 0.2), 10, 100), top by confidence). The soft labels
(float16 [n, 1601]) are the second pretraining stage's MRC-kl targets. Each item is
`{"id": annot_id, "question": [ids], "answers": [[ids] x 4], "rationales": [[ids] x 4],
"answer_label": 0..3, "rationale_label": 0..3}` (labels absent in the test split), token ids
without [CLS]/[SEP]; meta holds `image_id` (the img_fn), `width`, `height` (pixels), `objects`
and `dataset`. Texts are kept whole (the training loader drops over-long ones, as the reference
does with max_txt_len 220).

Object references -> token ids: THE rule (`vcr_tokens`)
-------------------------------------------------------
VCR texts are token lists mixing words (strings) and object references (lists of indices into
the image's `objects`), e.g. `["Why", "is", [0], "smiling", "at", [1, 2], "?"]`.

- A reference to object k with `objects[k] == "person"` becomes the tag id `TAG_BASE + p`
  (TAG_BASE = 28996, bert-base-cased's vocabulary size), p being k's rank among the image's
  persons: the number of "person" entries before index k in `objects`, capped at 80. The 81
  tag ids 28996..29076 are the reference's 81 extra word embeddings (`VCR_SPECIAL_TOKENS`);
  every person from the 81st on shares the last tag.
- A reference to any other object becomes the WordPiece ids of its class name ("car",
  "dining table" -> the ids of "dining" and "table").
- Several indices in one reference are joined by the word "and": `[1, 2]` reads "<1> and <2>",
  `[1, 2, 3]` "<1> and <2> and <3>" ("and" as WordPiece ids).
- Words are WordPiece-tokenised (cased, BERT normalisation) with the --vocab tokenizer, each
  word as it stands (tokenising the words one at a time or joined by spaces gives the same ids:
  BERT splits at whitespace first).

Both training stages (VCR fine-tuning and the second pretraining stage) read these shards, so
the rule is applied once, here, the same way for every text. The reference's own text DB
(`vcr-lmdb`) holds ids whose tags were mapped offline by its authors' unpublished rule; its ids
are taken as they are (checked to lie below `VCR_VOCAB_SIZE`).

`vcr-jsonl` reads the public annotations: lines `{"annot_id", "img_fn", "metadata_fn",
"objects", "question", "answer_choices" (4), "rationale_choices" (4), "answer_label",
"rationale_label"}` (the test split has no labels). Features: per-image .npz in --gt-npz-dir and
--det-npz-dir (`features`, `norm_bb` or pixel `boxes`, `soft_labels`, optional `conf`,
`image_w`/`image_h`; read without pickle), named after the img_fn with '/' replaced by '_' and
the extension by `.npz` (`lsmdc_x/x_00.01@0.jpg` -> `lsmdc_x_x_00.01@0.npz`), else
`<img_fn stem>.npz`. The image size: the metadata JSON's "width"/"height" when --metadata-dir is
given (`<metadata-dir>/<metadata_fn>`, else the img_fn with `.json`), else the npz's
`image_w`/`image_h` (ground truth, then detections); pixel boxes are normalised by it.

`vcr-lmdb` reads the reference's databases: the text DB (lz4 msgpack examples keyed by annot
id: `{"input_ids" (question), "input_ids_as" (4), "input_ids_rs" (4), "qa_target",
"qar_target", "img_fname": [gt name, det name]}` beside meta.json, checked as for every text
DB; optional `objects`, `img_fn`, `width`, `height` are used when present) and the ground-truth
and detected image DBs (values decoded as the `lmdb` converter does). Examples are grouped by
their ground-truth image; the sample key is that name without `.npz`. Without `objects` the
ground-truth boxes are still all kept in stored order, but nothing checks their count; without
a size, meta has no width/height (the reference's DBs store normalised boxes only).

Skipped and counted by reason: images without features ("no_features"), whose ground-truth
region count differs from len(objects) ("region_count"), with more than 100 objects
("too_many_regions"), without a size ("image_size"), with an unreadable metadata JSON
("metadata"), without soft labels ("missing_field", field soft_labels: MRC-kl needs them;
`--missing-soft-labels uniform` fills in a uniform distribution over classes 1..1600 instead,
noted in the manifest) or bad features (the usual reasons); questions that are not JSON or lack
a field ("decode"), with a reference outside the image's objects ("object_ref"), bad labels
("label"), an annot id read before ("duplicate_id"), objects differing from the image's first
question ("objects"), an empty text ("empty_caption"), ids outside the vocabulary ("token_id")
or a special token inside a text ("special_token"). Resumable, atomic, with a manifest:
`uniter_fast.convert.common.run_conversion`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from ..data.schema import BERT_BASE_CASED, MAX_REGIONS, Vocab
from ..data.task_shards import VCR_SPECIAL_TOKENS, VCR_VOCAB_SIZE, TaskRecord
from .captions import (
    _NPZ_FIELDS,
    KEEP_ALL,
    MISSING_SOFT_LABELS,
    UNIFORM_WARNING,
    WordPiece,
    kept_regions,
)
from .common import (
    ConvertError,
    GroupedSource,
    RegionPolicy,
    SkipRecord,
    Unit,
    input_fingerprint,
    lacking_strings,
    read_jsonl,
    read_npz_file,
    sample_key,
)

__all__ = [
    "MAX_PERSON_TAG",
    "TAG_BASE",
    "VcrJsonlSource",
    "VcrLmdbSource",
    "encode_parts",
    "reference_parts",
    "vcr_tokens",
]

TAG_BASE = VCR_VOCAB_SIZE - VCR_SPECIAL_TOKENS  # 28996: the first id past BERT's words
MAX_PERSON_TAG = VCR_SPECIAL_TOKENS - 1  # person ranks from 80 on share the last tag
PERSON = "person"
JOIN_WORD = "and"
NUM_CHOICES = 4
MRC_KL = "MRC-kl"  # what the soft labels are for: the second pretraining stage's targets


# --------------------------------------------------------------------------------------------
# The rule: object references -> token ids


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _token_problem(tokens: Any, objects: Sequence[str]) -> tuple[str, str] | None:
    """(reason, detail) when `tokens` is not a VCR text over `objects`, else None: a VCR text
    is a list of words (str) and references (non-empty lists of indices into `objects`)."""
    if not isinstance(tokens, list):
        return ("decode", f"is a {type(tokens).__name__}, expected a list of words and references")
    for i, token in enumerate(tokens):
        if isinstance(token, str):
            continue
        if not isinstance(token, list) or not token or not all(_is_int(k) for k in token):
            detail = f"token {i} ({str(token)[:40]}) is neither a word nor a list of object indices"
            return ("decode", detail)
        bad = [int(k) for k in token if not 0 <= k < len(objects)]
        if bad:
            detail = (
                f"token {i} refers to object {bad[0]}, outside the image's {len(objects)} objects"
            )
            return ("object_ref", detail)
    return None


def reference_parts(tokens: list, objects: Sequence[str]) -> list[str | int]:
    """A checked VCR text under the rule (module docstring), as parts: strings to WordPiece
    (runs of words joined by spaces) and ints (person tag ids), in order."""
    parts: list[str | int] = []
    words: list[str] = []
    persons_before: list[int] = []
    count = 0
    for name in objects:
        persons_before.append(count)
        count += name == PERSON
    for token in tokens:
        if isinstance(token, str):
            words.append(token)
            continue
        for j, k in enumerate(token):
            if j:
                words.append(JOIN_WORD)
            if objects[k] == PERSON:
                if words:
                    parts.append(" ".join(words))
                    words = []
                parts.append(TAG_BASE + min(persons_before[k], MAX_PERSON_TAG))
            else:
                words.append(objects[k])
    if words:
        parts.append(" ".join(words))
    return parts


def encode_parts(texts: list[list[str | int]], tokenizer: WordPiece) -> list[list[int]]:
    """Token ids of several texts' `reference_parts`, their strings WordPiece'd in one batch."""
    strings = [p for parts in texts for p in parts if isinstance(p, str)]
    encoded = iter(tokenizer.encode(strings) if strings else [])
    out = []
    for parts in texts:
        ids: list[int] = []
        for part in parts:
            if isinstance(part, str):
                ids.extend(int(t) for t in next(encoded))
            else:
                ids.append(part)
        out.append(ids)
    return out


def vcr_tokens(tokens: list, objects: Sequence[str], tokenizer: WordPiece) -> list[int]:
    """The token ids (no [CLS]/[SEP]) of one VCR text under the rule of the module docstring.

    tokens: words and references, e.g. ["Why", "is", [0], "smiling", "at", [1, 2], "?"];
    objects: the image's class names, e.g. ["person", "car", "person"]; tokenizer: the
    model's `WordPiece`. That example gives the ids of "Why is" + [28996] + the ids of
    "smiling at car and" + [28997] + the id of "?". Raises ValueError for a malformed text.
    """
    problem = _token_problem(tokens, objects)
    if problem is not None:
        raise ValueError(f"not a VCR text: {problem[1]}")
    return encode_parts([reference_parts(tokens, objects)], tokenizer)[0]


# --------------------------------------------------------------------------------------------
# What both sources share


@dataclass
class Question:
    """One VCR question: its texts as token ids (or, from the JSONL, as words and references
    still to encode) and its labels (None in the test split)."""

    annot_id: str
    texts: list  # question, the 4 answers, the 4 rationales
    answer_label: int | None
    rationale_label: int | None


def _labels(
    answer: Any, rationale: Any, names: tuple[str, str] = ("answer_label", "rationale_label")
) -> tuple[int | None, int | None] | str:
    """(answer label, rationale label), or why they are bad: both absent (a test split) or both
    0..3. names: the two fields, for the message."""
    if answer is None and rationale is None:
        return None, None
    if not all(_is_int(v) and 0 <= v < NUM_CHOICES for v in (answer, rationale)):
        return f"{names[0]} {answer!r} and {names[1]} {rationale!r} must both be 0..3"
    return int(answer), int(rationale)


def _text_names() -> list[str]:
    return [
        "question",
        *(f"answers[{i}]" for i in range(NUM_CHOICES)),
        *(f"rationales[{i}]" for i in range(NUM_CHOICES)),
    ]


def _vcr_items(unit: Unit, questions: list[Question], vocab: Vocab) -> list[dict]:
    """The items of the questions whose texts (token ids) a shard may hold; what is left out
    is counted on `unit`."""
    specials = {vocab.pad_id, vocab.cls_id, vocab.sep_id, vocab.mask_id}
    items = []
    for q in questions:
        problem = None
        for name, ids in zip(_text_names(), q.texts, strict=True):
            if not ids:
                problem = ("empty_caption", f"{name} has no tokens")
            elif not all(_is_int(t) and 0 <= t < VCR_VOCAB_SIZE for t in ids):
                problem = ("token_id", f"{name} has an id outside [0, {VCR_VOCAB_SIZE})")
            elif specials.intersection(ids):
                bad = next(t for t in ids if t in specials)
                problem = ("special_token", f"{name} holds special id {bad}")
            if problem:
                break
        if problem:
            unit.left_out.append((problem[0], q.annot_id, problem[1]))
            continue
        texts = [[int(t) for t in ids] for ids in q.texts]
        item = {
            "id": q.annot_id,
            "question": texts[0],
            "answers": texts[1 : 1 + NUM_CHOICES],
            "rationales": texts[1 + NUM_CHOICES :],
        }
        if q.answer_label is not None:
            item["answer_label"] = q.answer_label
            item["rationale_label"] = q.rationale_label
        items.append(item)
    if not items:
        raise SkipRecord("no_caption_left", "questions", "every question was left out")
    return items


def _gt_regions(
    arrays: dict[str, Any],
    where: str,
    objects: list[str] | None,
    *,
    width: float | None,
    height: float | None,
    missing_soft_labels: str,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every ground-truth box in stored order, one per object (checked when objects is known)."""
    feat, loc, soft, _ = kept_regions(
        arrays,
        KEEP_ALL,
        where,
        width=width,
        height=height,
        keep_order=True,
        missing_soft_labels=missing_soft_labels,
        soft_labels_for=MRC_KL,
    )
    if objects is not None and feat.shape[0] != len(objects):
        raise SkipRecord(
            "region_count",
            "features",
            f"{where}: {feat.shape[0]} ground-truth regions for {len(objects)} objects (one "
            "region per object expected)",
        )
    return feat, loc, soft


def _vcr_record(
    unit: Unit,
    key: str,
    gt: tuple[dict[str, Any], str],
    det: tuple[dict[str, Any], str],
    questions: list[Question],
    *,
    objects: list[str] | None,
    width: float | None,
    height: float | None,
    policy: RegionPolicy,
    missing_soft_labels: str,
    vocab: Vocab,
    meta: dict,
) -> TaskRecord:
    """The "vcr" record of one image (questions' texts already token ids); counts what is left
    out on `unit`; SkipRecord when the image is unusable. gt, det: (decoded arrays, their file
    or key for messages)."""
    if objects is not None and len(objects) > MAX_REGIONS:
        detail = f"{len(objects)} objects, more than {MAX_REGIONS} ground-truth regions"
        raise SkipRecord("too_many_regions", "objects", detail)
    gt_feat, gt_loc, gt_soft = _gt_regions(
        gt[0],
        gt[1],
        objects,
        width=width,
        height=height,
        missing_soft_labels=missing_soft_labels,
    )
    det_feat, det_loc, det_soft, unit.conf_source = kept_regions(
        det[0],
        policy,
        det[1],
        width=width,
        height=height,
        missing_soft_labels=missing_soft_labels,
        soft_labels_for=MRC_KL,
    )
    items = _vcr_items(unit, questions, vocab)
    return TaskRecord(
        key,
        "vcr",
        [(gt_feat, gt_loc), (det_feat, det_loc)],
        items,
        meta,
        soft=[gt_soft, det_soft],
    )


def _is_size(value: Any) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and bool(np.isfinite(value))
        and value > 0
    )


def _npz_size(arrays: dict[str, Any]) -> tuple[float, float] | None:
    """The npz's image_w/image_h when both are positive numbers."""
    sizes = []
    for name in ("image_w", "image_h"):
        value = arrays.get(name)
        if value is None:
            return None
        array = np.asarray(value)
        if array.size != 1 or array.dtype.kind not in "iuf":
            return None
        sizes.append(float(array.reshape(())))
    return (sizes[0], sizes[1]) if all(_is_size(v) for v in sizes) else None


def _soft_label_note(missing_soft_labels: str) -> str:
    return "source, uniform where missing" if missing_soft_labels == "uniform" else "source"


# --------------------------------------------------------------------------------------------
# The public annotations


def _safe_relative(name: str) -> bool:
    path = PurePosixPath(name)
    return bool(name) and not path.is_absolute() and ".." not in path.parts and "\\" not in name


class VcrJsonlSource(GroupedSource):
    """The public VCR JSONL + ground-truth and detected per-image .npz (module docstring)."""

    kind = "vcr-jsonl"

    def __init__(
        self,
        jsonl: str | Path,
        gt_npz_dir: str | Path,
        det_npz_dir: str | Path,
        vocab_file: str | Path,
        *,
        metadata_dir: str | Path | None = None,
        dataset: str = "",
        lowercase: bool = False,
        missing_soft_labels: str = "refuse",
        policy: RegionPolicy | None = None,
        vocab: Vocab = BERT_BASE_CASED,
    ) -> None:
        if missing_soft_labels not in MISSING_SOFT_LABELS:
            raise ValueError(f"missing_soft_labels must be one of {MISSING_SOFT_LABELS}")
        self.jsonl = Path(jsonl)
        self.gt_dir, self.det_dir = Path(gt_npz_dir), Path(det_npz_dir)
        self.metadata_dir = None if metadata_dir is None else Path(metadata_dir)
        self.vocab_file = Path(vocab_file)
        self.dataset = dataset
        self.lowercase = lowercase
        self.missing_soft_labels = missing_soft_labels
        self.policy = policy or RegionPolicy()
        self.vocab = vocab

    # --- reading the JSONL ------------------------------------------------------------------

    def open(self) -> None:
        if not self.jsonl.is_file():
            raise ConvertError(f"{self.jsonl}: not a file")
        for path in (self.gt_dir, self.det_dir, self.metadata_dir):
            if path is not None and not path.is_dir():
                raise ConvertError(f"{path}: not a directory")
        self.tokenizer = WordPiece(self.vocab_file, lowercase=self.lowercase, vocab=self.vocab)
        self._gt = {e.name for e in os.scandir(self.gt_dir) if e.name.endswith(".npz")}
        self._det = {e.name for e in os.scandir(self.det_dir) if e.name.endswith(".npz")}
        # sample key -> the questions about its image, in file order
        self.groups: dict[str, list[dict]] = {}
        self.bad_lines: list[tuple[str, str, str]] = []  # (reason, where, detail)
        seen: dict[str, int] = {}
        for number, obj in read_jsonl(self.jsonl, self.bad_lines, f"{self.jsonl.name} "):
            parsed = self._parse(obj, f"{self.jsonl.name} line {number}")
            if isinstance(parsed, tuple):
                self.bad_lines.append(parsed)
                continue
            where = f"{self.jsonl.name} line {number} (annot_id {parsed['id']})"
            if parsed["id"] in seen:
                detail = f"repeats the annot_id of line {seen[parsed['id']]}"
                self.bad_lines.append(("duplicate_id", where, detail))
                continue
            group = self.groups.setdefault(parsed["key"], [])
            if group and group[0]["img_fn"] != parsed["img_fn"]:
                detail = (
                    f"img_fn {parsed['img_fn']!r} has the sample key {parsed['key']!r} of "
                    f"{group[0]['img_fn']!r}"
                )
                self.bad_lines.append(("duplicate_key", where, detail))
                continue
            if group and group[0]["objects"] != parsed["objects"]:
                detail = (
                    f"objects differ from those of the first question about "
                    f"{parsed['img_fn']} (annot_id {group[0]['id']})"
                )
                self.bad_lines.append(("objects", where, detail))
                continue
            seen[parsed["id"]] = number
            group.append(parsed)
        self.keys = sorted(self.groups)
        if self.missing_soft_labels == "uniform":
            self.warnings.append(UNIFORM_WARNING)

    def _parse(self, obj: dict, where: str) -> dict | tuple[str, str, str]:
        annot_id, img_fn, objects = obj.get("annot_id"), obj.get("img_fn"), obj.get("objects")
        problem = lacking_strings(annot_id=annot_id, img_fn=img_fn)
        if problem:
            return ("decode", where, problem)
        where = f"{where} (annot_id {annot_id})"
        if not isinstance(objects, list) or not all(isinstance(o, str) for o in objects):
            return ("decode", where, "objects is not a list of class names")
        metadata_fn = obj.get("metadata_fn")
        if metadata_fn is not None and not (
            isinstance(metadata_fn, str) and _safe_relative(metadata_fn)
        ):
            return ("decode", where, f"metadata_fn {str(metadata_fn)[:80]!r} is no relative path")
        texts = [("question", obj.get("question"))]
        for field in ("answer_choices", "rationale_choices"):
            choices = obj.get(field)
            if not isinstance(choices, list) or len(choices) != NUM_CHOICES:
                got = len(choices) if isinstance(choices, list) else type(choices).__name__
                return ("decode", where, f"{field} must be {NUM_CHOICES} texts, got {got}")
            texts += [(f"{field}[{i}]", c) for i, c in enumerate(choices)]
        for name, tokens in texts:
            problem = _token_problem(tokens, objects)
            if problem is not None:
                return (problem[0], where, f"{name} {problem[1]}")
        labels = _labels(obj.get("answer_label"), obj.get("rationale_label"))
        if isinstance(labels, str):
            return ("label", where, labels)
        return {
            "id": annot_id,
            "img_fn": img_fn,
            "key": sample_key(img_fn.replace("/", "_")),
            "metadata_fn": metadata_fn,
            "objects": objects,
            "texts": [tokens for _, tokens in texts],
            "labels": labels,
        }

    # --- the Source interface ----------------------------------------------------------------

    def identity(self) -> dict:
        inputs = [
            input_fingerprint(self.jsonl),
            input_fingerprint(self.vocab_file),
            {"path": str(self.gt_dir.resolve()), "npz_files": len(self._gt)},
            {"path": str(self.det_dir.resolve()), "npz_files": len(self._det)},
        ]
        if self.metadata_dir is not None:
            inputs.append({"path": str(self.metadata_dir.resolve())})
        return {
            "kind": self.kind,
            "arguments": {
                "jsonl": str(self.jsonl.resolve()),
                "gt_npz_dir": str(self.gt_dir.resolve()),
                "det_npz_dir": str(self.det_dir.resolve()),
                "metadata_dir": (
                    None if self.metadata_dir is None else str(self.metadata_dir.resolve())
                ),
                "vocab": str(self.vocab_file.resolve()),
                "lowercase": self.lowercase,
                "missing_soft_labels": self.missing_soft_labels,
            },
            "inputs": inputs,
        }

    def _arrays(self, folder: Path, names: set[str], img_fn: str) -> tuple[dict, str]:
        flat = str(PurePosixPath(img_fn.replace("/", "_")).with_suffix(".npz"))
        stem = PurePosixPath(img_fn).stem + ".npz"
        name = next((n for n in (flat, stem) if n in names), None)
        if name is None:
            raise SkipRecord("no_features", None, f"has no {flat} or {stem} in {folder}")
        return read_npz_file(folder / name, _NPZ_FIELDS), name

    @staticmethod
    def _metadata_name(first: dict) -> str:
        return first["metadata_fn"] or str(PurePosixPath(first["img_fn"]).with_suffix(".json"))

    def _metadata_size(self, first: dict) -> tuple[float, float] | None:
        """The metadata JSON's width and height; None without --metadata-dir or its file."""
        if self.metadata_dir is None:
            return None
        name = self._metadata_name(first)
        path = self.metadata_dir / name
        if not path.is_file():
            return None
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SkipRecord(
                "metadata", "metadata_fn", f"{name}: not readable JSON ({e})"
            ) from None
        if not isinstance(obj, dict):
            raise SkipRecord("metadata", "metadata_fn", f"{name}: not a JSON object")
        width, height = obj.get("width"), obj.get("height")
        if not (_is_size(width) and _is_size(height)):
            detail = f"{name}: width/height are {width!r} x {height!r}, expected positive numbers"
            raise SkipRecord("metadata", "width/height", detail)
        return width, height

    def _fill(self, unit: Unit, key: str) -> None:
        lines = self.groups[key]
        unit.captions_seen = len(lines)
        first = lines[0]
        img_fn, objects = first["img_fn"], first["objects"]
        gt = self._arrays(self.gt_dir, self._gt, img_fn)
        det = self._arrays(self.det_dir, self._det, img_fn)
        size = self._metadata_size(first) or _npz_size(gt[0]) or _npz_size(det[0])
        if size is None:
            looked = f"no image_w/image_h in {gt[1]} or {det[1]}"
            if self.metadata_dir is not None:
                looked = f"no {self._metadata_name(first)} in {self.metadata_dir}, {looked}"
            raise SkipRecord("image_size", "width/height", f"no image size: {looked}")
        parts = [reference_parts(t, objects) for line in lines for t in line["texts"]]
        ids = iter(encode_parts(parts, self.tokenizer))
        per_text = 1 + 2 * NUM_CHOICES
        questions = [
            Question(line["id"], [next(ids) for _ in range(per_text)], *line["labels"])
            for line in lines
        ]
        meta = {
            "dataset": self.dataset,
            "image_id": img_fn,
            "width": size[0],
            "height": size[1],
            "objects": list(objects),
            "images": [gt[1], det[1]],
        }
        unit.record = _vcr_record(
            unit,
            key,
            gt,
            det,
            questions,
            objects=objects,
            width=size[0],
            height=size[1],
            policy=self.policy,
            missing_soft_labels=self.missing_soft_labels,
            vocab=self.vocab,
            meta=meta,
        )

    def describe(self) -> dict:
        return {
            "vocab": {
                **self.tokenizer.describe(),
                "object_tags": _tag_description(),
            },
            "soft_labels": _soft_label_note(self.missing_soft_labels),
        }


def _tag_description() -> dict:
    return {
        "rule": "uniter_fast.convert.vcr (module docstring)",
        "person_tags": [TAG_BASE, TAG_BASE + MAX_PERSON_TAG],
        "other_objects": "WordPiece ids of the class name",
        "joined_by": JOIN_WORD,
        "vocab_size": VCR_VOCAB_SIZE,
    }


# --------------------------------------------------------------------------------------------
# The reference's databases


@dataclass
class _DbExample:
    question: Question
    det_name: str
    objects: list[str] | None
    extra: dict  # img_fn, width, height when the example holds them


class VcrLmdbSource(GroupedSource):
    """The reference's VCR text DB + ground-truth and detected image DBs (module docstring)."""

    kind = "vcr-lmdb"
    bad_line_prefix = "text DB "

    def __init__(
        self,
        txt_db: str | Path,
        gt_img_db: str | Path,
        det_img_db: str | Path,
        *,
        dataset: str = "",
        missing_soft_labels: str = "refuse",
        policy: RegionPolicy | None = None,
        vocab: Vocab = BERT_BASE_CASED,
    ) -> None:
        if missing_soft_labels not in MISSING_SOFT_LABELS:
            raise ValueError(f"missing_soft_labels must be one of {MISSING_SOFT_LABELS}")
        self.txt_db = Path(txt_db)
        self.gt_db, self.det_db = Path(gt_img_db), Path(det_img_db)
        self.dataset = dataset
        self.missing_soft_labels = missing_soft_labels
        self.policy = policy or RegionPolicy()
        self.vocab = vocab
        self._dbs = None

    def identity(self) -> dict:
        files = [self.txt_db / "data.mdb", self.gt_db / "data.mdb", self.det_db / "data.mdb"]
        files += [self.txt_db / n for n in ("meta.json", "txt2img.json")]
        return {
            "kind": self.kind,
            "arguments": {
                "txt_db": str(self.txt_db.resolve()),
                "gt_img_db": str(self.gt_db.resolve()),
                "det_img_db": str(self.det_db.resolve()),
                "missing_soft_labels": self.missing_soft_labels,
            },
            "inputs": [input_fingerprint(p) for p in files if p.exists()],
        }

    def open(self) -> None:
        from .lmdb import open_gt_det_dbs, text_db_examples

        self._dbs = open_gt_det_dbs(self.gt_db, self.det_db, self.txt_db, self.vocab)
        self.groups: dict[str, list[_DbExample]] = {}  # gt image name -> its examples
        self.bad_lines: list[tuple[str, str, str]] = []
        with self._dbs.txt.begin(buffers=False) as txn:
            for _, (gt_name, ex) in text_db_examples(txn, self.bad_lines, self._parse):
                self.groups.setdefault(gt_name, []).append(ex)
        self.keys = sorted(self.groups)
        if self.missing_soft_labels == "uniform":
            self.warnings.append(UNIFORM_WARNING)

    @staticmethod
    def _ids(value: Any) -> Any:
        return value.tolist() if isinstance(value, np.ndarray) else value

    def _parse(self, ident: str, ex: Any) -> tuple[str, _DbExample]:
        """(ground-truth image name, example) of one text DB value; SkipRecord for a bad one."""
        if not isinstance(ex, dict):
            raise SkipRecord("decode", None, "is not a map")
        names = ex.get("img_fname")
        if not (
            isinstance(names, (list, tuple))
            and len(names) == 2
            and all(isinstance(n, str) and n for n in names)
        ):
            raise SkipRecord("decode", "img_fname", "must be [gt image name, det image name]")
        question = self._ids(ex.get("input_ids"))
        texts = [question]
        for field in ("input_ids_as", "input_ids_rs"):
            choices = self._ids(ex.get(field))
            if not isinstance(choices, (list, tuple)) or len(choices) != NUM_CHOICES:
                raise SkipRecord("decode", field, f"must hold {NUM_CHOICES} token lists")
            texts += [self._ids(c) for c in choices]
        if not all(isinstance(t, (list, tuple)) for t in texts):
            raise SkipRecord("decode", "input_ids", "the texts must be lists of token ids")
        targets = ("qa_target", "qar_target")
        labels = _labels(*(ex.get(k) for k in targets), names=targets)
        if isinstance(labels, str):
            raise SkipRecord("label", "qa_target", labels)
        objects = ex.get("objects")
        if objects is not None and not (
            isinstance(objects, list) and all(isinstance(o, str) for o in objects)
        ):
            raise SkipRecord("decode", "objects", "is not a list of class names")
        extra = {k: ex[k] for k in ("img_fn",) if isinstance(ex.get(k), str)}
        extra.update({k: ex[k] for k in ("width", "height") if _is_size(ex.get(k))})
        question = Question(ident, [list(t) for t in texts], *labels)
        return names[0], _DbExample(question, names[1], objects, extra)

    def _fill(self, unit: Unit, gt_name: str) -> None:
        from .lmdb import image_from_db

        examples = self.groups[gt_name]
        unit.captions_seen = len(examples)
        first = examples[0]
        kept = []
        for ex in examples:
            if ex.det_name != first.det_name:
                detail = f"its detections are {ex.det_name}, the image's {first.det_name}"
                unit.left_out.append(("img_mismatch", ex.question.annot_id, detail))
            elif ex.objects != first.objects:
                detail = f"objects differ from those of {first.question.annot_id}"
                unit.left_out.append(("objects", ex.question.annot_id, detail))
            else:
                kept.append(ex)
        meta: dict[str, Any] = {
            "dataset": self.dataset,
            "image_id": first.extra.get("img_fn", gt_name),
            "images": [gt_name, first.det_name],
        }
        width, height = first.extra.get("width"), first.extra.get("height")
        if width is not None and height is not None:
            meta.update(width=width, height=height)
        if first.objects is not None:
            meta["objects"] = list(first.objects)
        unit.record = _vcr_record(
            unit,
            sample_key(gt_name),
            image_from_db(self._dbs.gt, gt_name, "ground-truth"),
            image_from_db(self._dbs.det, first.det_name, "detection"),
            [ex.question for ex in kept],
            objects=first.objects,
            width=width,
            height=height,
            policy=self.policy,
            missing_soft_labels=self.missing_soft_labels,
            vocab=self.vocab,
            meta=meta,
        )

    def describe(self) -> dict:
        return {
            "vocab": {
                **self._dbs.vocab_info,
                "object_tags": "as mapped in the reference's text DB",
            },
            "soft_labels": _soft_label_note(self.missing_soft_labels),
        }

    def close(self) -> None:
        if self._dbs is not None:
            self._dbs.close()
