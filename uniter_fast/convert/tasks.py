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

import os
from pathlib import Path
from typing import Any

import numpy as np

from ..data.schema import BERT_BASE_CASED, Vocab
from ..data.task_shards import TaskRecord
from .captions import WordPiece, kept_regions, read_task_npz
from .common import (
    ConvertError,
    GroupedSource,
    RegionPolicy,
    SkipRecord,
    Unit,
    input_fingerprint,
    lacking_strings,
    read_jsonl,
    sample_key,
)

VE_LABELS = {"contradiction": 0, "entailment": 1, "neutral": 2}
NLVR2_LABELS = {"true": 1, "false": 0}


class TaskJsonlSource(GroupedSource):
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
        for number, obj in read_jsonl(self.jsonl, self.bad_lines):
            parsed = self._parse(obj, f"line {number}")
            if isinstance(parsed, tuple):
                self.bad_lines.append(parsed)
            else:
                self.groups.setdefault(parsed["group"], []).append(parsed)
        self.keys = sorted(self.groups)

    def _parse(self, obj: dict, where: str) -> dict | tuple[str, str, str]:
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
        problem = lacking_strings(id=ident, image=image, text=text, label=label)
        if problem:
            return ("decode", where, problem)
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

    def _image(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        npz = f"{name}.npz"
        if npz not in self._npz:
            raise SkipRecord("no_features", None, f"has no {npz} in {self.npz_dir}")
        return read_task_npz(self.npz_dir / npz, self.policy)[:2]

    def _fill(self, unit: Unit, key: str) -> None:
        lines = self.groups[key]
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

    def describe(self) -> dict:
        return {"vocab": self.tokenizer.describe(), "soft_labels": "not stored (task shards)"}


__all__ = ["NLVR2_LABELS", "VE_LABELS", "TaskJsonlSource"]


# --------------------------------------------------------------------------------------------
# The reference's own databases


class TaskLmdbSource(GroupedSource):
    """The reference's txt_db + img_db of a downstream task -> task shards.

        python -m uniter_fast.convert task-lmdb --task vqa --img-db img_db/coco_val2014 \\
            --txt-db txt_db/vqa_devval.db --out shards/vqa/devval

    Text DB values (lz4 msgpack, as for pretraining; `meta.json` checked): `input_ids`,
    `img_fname` (NLVR2: a pair, left then right) and the target: VQA and VE `target` =
    `{"labels": [...], "scores": [...]}` (VE: one label, score 1, of contradiction 0, entailment
    1, neutral 2; the reference's VE shares VQA's data code), NLVR2 `target` 0/1. A missing or
    null target is a test split. Examples are grouped by image (NLVR2: by image pair); image DB
    values are decoded as for pretraining (.npz or msgpack, no pickle).
    """

    bad_line_prefix = "text DB "

    def __init__(
        self,
        task: str,
        img_db: str | Path,
        txt_db: str | Path,
        *,
        num_answers: int = 3129,
        dataset: str = "",
        policy: RegionPolicy | None = None,
        vocab: Vocab = BERT_BASE_CASED,
    ) -> None:
        if task not in ("vqa", "ve", "nlvr2"):
            raise ValueError(f"TaskLmdbSource takes vqa, ve or nlvr2, got {task!r}")
        self.task, self.kind = task, f"{task}-lmdb"
        self.img_db, self.txt_db = Path(img_db), Path(txt_db)
        self.num_answers = num_answers if task == "vqa" else 3
        self.dataset = dataset
        self.policy = policy or RegionPolicy()
        self.vocab = vocab
        self._envs: list = []

    def identity(self) -> dict:
        files = [self.img_db / "data.mdb", self.txt_db / "data.mdb", self.txt_db / "meta.json"]
        return {
            "kind": self.kind,
            "arguments": {
                "img_db": str(self.img_db.resolve()),
                "txt_db": str(self.txt_db.resolve()),
                "num_answers": self.num_answers,
            },
            "inputs": [input_fingerprint(p) for p in files if p.exists()],
        }

    def open(self) -> None:
        from .lmdb import open_reference_dbs, text_db_examples

        self._vocab_info, img_env, txt_env = open_reference_dbs(
            self.img_db, self.txt_db, self.vocab
        )
        self._envs = [img_env, txt_env]
        self._img_txn = img_env.begin(buffers=False)
        self.bad_lines: list[tuple[str, str, str]] = []
        self.groups: dict[str, list[dict]] = {}
        with txt_env.begin(buffers=False) as txn:
            for ident, example in text_db_examples(txn, self.bad_lines):
                parsed = self._parse(ident, example)
                if isinstance(parsed, tuple):
                    self.bad_lines.append(parsed)
                else:
                    self.groups.setdefault(parsed["group"], []).append(parsed)
        self.keys = sorted(self.groups)

    def _parse(self, ident: str, ex: Any) -> dict | tuple[str, str, str]:
        if not isinstance(ex, dict):
            return ("decode", ident, "is not a map")
        ids = ex.get("input_ids")
        ids = ids.tolist() if isinstance(ids, np.ndarray) else ids
        img = ex.get("img_fname")
        images = list(img) if self.task == "nlvr2" and isinstance(img, (list, tuple)) else [img]
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in images):
            return ("decode", ident, "lacks input_ids or img_fname")
        if self.task == "nlvr2" and len(images) != 2:
            return ("decode", ident, f"img_fname holds {len(images)} images, NLVR2 needs 2")
        if not ids:
            return ("empty_caption", ident, "has no input_ids")
        ids = [int(t) for t in ids]
        if min(ids) < 0 or max(ids) >= self.vocab.size:
            return ("token_id", ident, f"an id outside [0, {self.vocab.size})")
        item: dict[str, Any] = {"id": ident, "input_ids": ids}
        target = ex.get("target")
        if target is not None:
            try:
                item.update(self._target(target))
            except (TypeError, ValueError, KeyError) as e:
                return ("label", ident, f"target {str(target)[:80]} ({e})")
        return {"group": "|".join(images), "images": images, "item": item}

    def _target(self, target: Any) -> dict:
        if self.task == "nlvr2":
            value = int(target)
            if value not in (0, 1):
                raise ValueError("not 0 or 1")
            return {"target": bool(value)}
        labels = [int(x) for x in target["labels"]]
        scores = [float(x) for x in target["scores"]]
        if len(labels) != len(scores) or any(not 0 <= x < self.num_answers for x in labels):
            raise ValueError(f"labels outside [0, {self.num_answers}) or unpaired scores")
        if self.task == "ve":
            if len(labels) != 1:
                raise ValueError("VE takes one label")
            return {"label": labels[0]}
        return {"answers": [[x, s] for x, s in zip(labels, scores, strict=True)]}

    def _fill(self, unit: Unit, key: str) -> None:
        from .lmdb import _decode_image

        lines = self.groups[key]
        unit.captions_seen = len(lines)
        images = []
        for name in lines[0]["images"]:
            value = self._img_txn.get(name.encode("utf-8"))
            if value is None:
                raise SkipRecord("no_features", None, f"{name} is not in the image DB")
            images.append(kept_regions(_decode_image(value), self.policy, name)[:2])
        meta = {"dataset": self.dataset, "images": lines[0]["images"]}
        if self.task == "vqa":
            meta["num_classes"] = self.num_answers
        names = [sample_key(n) for n in lines[0]["images"]]
        key = names[0]
        if self.task == "nlvr2":  # nlvr2_dev-850-0-img0 + -img1 -> nlvr2_dev-850-0
            pair = names[0].removesuffix("-img0")
            key = pair if names == [pair + "-img0", pair + "-img1"] else "+".join(names)
        unit.record = TaskRecord(key, self.task, images, [line["item"] for line in lines], meta)

    def describe(self) -> dict:
        return {"vocab": self._vocab_info, "soft_labels": "not stored (task shards)"}

    def close(self) -> None:
        for env in self._envs:
            env.close()
        self._envs = []


__all__ += ["TaskLmdbSource"]
