"""SNLI-VE and NLVR2 from their public JSONL files plus per-image .npz features -> task shards.

    python -m uniter_fast.convert ve-jsonl --jsonl snli_ve_dev.jsonl --npz-dir flickr30k_npz \\
        --vocab bert-base-cased-vocab.txt --out shards/ve/dev --prefix ve_dev
    python -m uniter_fast.convert nlvr2-jsonl --jsonl dev.json --npz-dir nlvr2_npz \\
        --vocab bert-base-cased-vocab.txt --out shards/nlvr2/dev --prefix nlvr2_dev

SNLI-VE lines: `{"pairID", "Flikr30kID" (sic; "Flickr30kID" also read), "sentence2" (the
hypothesis), "gold_label": "contradiction" | "entailment" | "neutral"}`; the image's features are
`<npz-dir>/<Flickr30kID stem>.npz`. One sample per image, holding every hypothesis about it.

NLVR2 lines: `{"identifier": "split-set-pair-sentence", "sentence", "label": "True" | "False"}`;
the pair's images are `<split-set-pair>-img0` and `-img1`, features
`<npz-dir>/<split-set-pair>-img0.npz` and `-img1.npz`. One sample per image pair, holding every
statement about it.

The .npz files are the pretraining converters' (`features`, `norm_bb` or pixel `boxes` with
`image_w`/`image_h`, optional `conf`/`soft_labels`; no pickle), regions kept by the same rule.
Texts are WordPiece-tokenised with --vocab (checked against the model's special ids) and kept
whole (the training loader drops over-long ones, as the reference does). Skipped and counted by
reason, the way every converter does: lines that are not JSON or miss a field ("decode"), an
unknown label ("label"), an empty text ("empty_caption"), text ids outside the vocabulary
("token_id"); images without features ("no_features") or with bad ones (the feature reasons).
Resumable, atomic, with a manifest: `uniter_fast.convert.common.run_conversion`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..data.schema import BERT_BASE_CASED, Vocab
from ..data.task_shards import TaskRecord
from .captions import WordPiece, regions_from_arrays
from .common import (
    ConvertError,
    RegionPolicy,
    SkipRecord,
    Source,
    Stats,
    Unit,
    input_fingerprint,
    read_npz,
    sample_key,
    select_regions,
)

VE_LABELS = {"contradiction": 0, "entailment": 1, "neutral": 2}
NLVR2_LABELS = {"true": 1, "false": 0}
_NPZ_FIELDS = ("features", "norm_bb", "boxes", "conf", "soft_labels", "image_w", "image_h")


class TaskJsonlSource(Source):
    """SNLI-VE or NLVR2 JSONL with per-image .npz features (module docstring)."""

    def __init__(
        self,
        task: str,
        jsonl: str | Path,
        npz_dir: str | Path,
        vocab_file: str | Path,
        *,
        dataset: str = "",
        lowercase: bool = False,
        policy: RegionPolicy | None = None,
        vocab: Vocab = BERT_BASE_CASED,
    ) -> None:
        if task not in ("ve", "nlvr2"):
            raise ValueError(f"TaskJsonlSource takes ve or nlvr2, got {task!r}")
        self.task = task
        self.kind = f"{task}-jsonl"
        self.jsonl = Path(jsonl)
        self.npz_dir = Path(npz_dir)
        self.vocab_file = Path(vocab_file)
        self.dataset = dataset
        self.lowercase = lowercase
        self.policy = policy or RegionPolicy()
        self.vocab = vocab

    # --- reading the JSONL ------------------------------------------------------------------

    def open(self) -> None:
        if not self.jsonl.is_file():
            raise ConvertError(f"{self.jsonl}: not a file")
        if not self.npz_dir.is_dir():
            raise ConvertError(f"{self.npz_dir}: not a directory")
        self.tokenizer = WordPiece(self.vocab_file, lowercase=self.lowercase, vocab=self.vocab)
        self._npz = {e.name for e in os.scandir(self.npz_dir) if e.name.endswith(".npz")}
        self.groups: dict[str, list[dict]] = {}
        self.bad_lines: list[tuple[str, str, str]] = []  # (reason, line id, detail)
        with self.jsonl.open(encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                parsed = self._parse(line, number)
                if isinstance(parsed, tuple):
                    self.bad_lines.append(parsed)
                else:
                    self.groups.setdefault(parsed["group"], []).append(parsed)
        self.keys = sorted(self.groups)

    def _parse(self, line: str, number: int) -> dict | tuple[str, str, str]:
        where = f"line {number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            return ("decode", where, f"is not JSON ({e.msg})")
        if not isinstance(obj, dict):
            return ("decode", where, "is not a JSON object")
        if self.task == "ve":
            image = obj.get("Flikr30kID", obj.get("Flickr30kID"))
            text, label, ident = obj.get("sentence2"), obj.get("gold_label"), obj.get("pairID")
            labels = VE_LABELS
        else:
            ident, text, label = obj.get("identifier"), obj.get("sentence"), obj.get("label")
            image = ident.rsplit("-", 1)[0] if isinstance(ident, str) and "-" in ident else None
            labels = NLVR2_LABELS
            if isinstance(label, bool):
                label = str(label)
        missing = [
            name
            for name, value in (("id", ident), ("image", image), ("text", text), ("label", label))
            if not isinstance(value, str) or not value
        ]
        if missing:
            return ("decode", where, f"lacks {', '.join(missing)} (or they are not strings)")
        if label.lower() not in labels:
            return ("label", f"{ident}", f"label {label!r} is not one of {sorted(labels)}")
        group = Path(image).stem
        return {"id": ident, "group": group, "text": text, "label": labels[label.lower()]}

    # --- the Source interface ----------------------------------------------------------------

    def identity(self) -> dict:
        return {
            "kind": self.kind,
            "arguments": {
                "jsonl": str(self.jsonl.resolve()),
                "npz_dir": str(self.npz_dir.resolve()),
                "vocab": str(self.vocab_file.resolve()),
                "lowercase": self.lowercase,
            },
            "inputs": [
                input_fingerprint(self.jsonl),
                input_fingerprint(self.vocab_file),
                {"path": str(self.npz_dir.resolve()), "npz_files": len(self._npz)},
            ],
        }

    def total(self) -> int:
        return len(self.keys)

    def units(self, cursor: Any, marks: np.ndarray) -> Iterator[Unit]:
        start = 0 if cursor is None else int(cursor)
        for i in range(start, len(self.keys)):
            key = self.keys[i]
            unit = Unit(key=key, cursor=i + 1)
            try:
                self._fill(unit, key, self.groups[key])
            except SkipRecord as e:
                unit.record = None
                unit.skip, unit.source_field, unit.detail = e.reason, e.field, e.detail
            yield unit

    def _image(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        npz = f"{name}.npz"
        if npz not in self._npz:
            raise SkipRecord("no_features", None, f"has no {npz} in {self.npz_dir}")
        try:
            arrays = read_npz(self.npz_dir / npz, _NPZ_FIELDS)
        except SkipRecord as e:
            raise SkipRecord(e.reason, e.field, f"{npz}: {e.detail}") from None
        features, loc, conf, soft, _ = regions_from_arrays(
            arrays, width=None, height=None, missing_soft_labels="uniform"
        )
        feat, loc, _ = select_regions(
            features=features, loc=loc, conf=conf, soft=soft, policy=self.policy
        )
        return feat, loc

    def _fill(self, unit: Unit, key: str, lines: list[dict]) -> None:
        unit.captions_seen = len(lines)
        names = [key] if self.task == "ve" else [f"{key}-img0", f"{key}-img1"]
        images = [self._image(name) for name in names]
        ids = self.tokenizer.encode([line["text"] for line in lines])
        items = []
        for line, tokens in zip(lines, ids, strict=True):
            tokens = [int(t) for t in tokens]
            if not tokens:
                unit.left_out.append(("empty_caption", line["id"], "tokenises to nothing"))
                continue
            if max(tokens) >= self.vocab.size:
                unit.left_out.append(("token_id", line["id"], "an id outside the vocabulary"))
                continue
            target = "label" if self.task == "ve" else "target"
            value = line["label"] if self.task == "ve" else bool(line["label"])
            items.append({"id": line["id"], "input_ids": tokens, target: value})
        if not items:
            raise SkipRecord("no_caption_left", "text", "every text was left out")
        meta = {"dataset": self.dataset, "images": names}
        unit.record = TaskRecord(sample_key(key), self.task, images, items, meta)

    def final_counts(self, stats: Stats) -> None:
        for reason, line, detail in self.bad_lines:
            stats.captions_seen += 1
            stats.leave_out(reason, line, detail)

    def describe(self) -> dict:
        return {"vocab": self.tokenizer.describe(), "soft_labels": "not stored (task shards)"}


__all__ = ["NLVR2_LABELS", "VE_LABELS", "TaskJsonlSource"]
