"""The UNITER reference's LMDB databases -> shards (one sample per image, all its captions).

    python -m uniter_fast.convert lmdb --img-db img_db/coco_train2014 \\
        --txt-db txt_db/pretrain_coco_train.db --out shards/coco --prefix coco

Image DB: keys are image file names (`coco_train2014_000000000009.npz`), values either an .npz
(`np.savez_compressed`: `features` [n, 2048] fp16/fp32, `norm_bb` [n, 6] or [n, 7], `conf` [n],
`soft_labels` [n, 1601]) or, in the reference's uncompressed variant, msgpack with
msgpack_numpy-encoded arrays. Both are decoded without pickle (object arrays are refused).

Text DB: values are `lz4.frame.compress(msgpack.dumps(example, use_bin_type=True))`, each
example holding `input_ids` (WordPiece ids without [CLS]/[SEP]) and `img_fname`. Beside it,
`meta.json` names the tokenizer and its special ids (checked against ours), and
`txt2img.json` maps caption ids to image names (`img2txts.json` is used when `txt2img.json` is
absent; without either the text DB is scanned).

Order: image DB key order (LMDB's byte order); an image's captions in text DB key order.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..data.schema import BERT_BASE_CASED, Vocab
from .common import (
    VOCAB_NAMES,
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
    msgpack_loads,
    read_npz,
    require_extra,
    sample_key,
)

__all__ = [
    "GtDetDbs",
    "LmdbSource",
    "check_txt_meta",
    "image_from_db",
    "open_gt_det_dbs",
    "open_reference_dbs",
    "text_db_examples",
]

_IMG_FIELDS = ("features", "norm_bb", "conf", "soft_labels")


def check_txt_meta(meta: dict, vocab: Vocab = BERT_BASE_CASED, where: str = "meta.json") -> dict:
    """Refuse (ConvertError) a text DB tokenised with another vocabulary than the model's.

    meta: the reference's meta.json, e.g. {"bert": "bert-base-cased", "UNK": 100, "CLS": 101,
    "SEP": 102, "MASK": 103, "v_range": [999, 28996]}. The special ids are required; `v_range`
    and the tokenizer name (`bert` or `toker`) are checked when present.
    Returns the vocab entry of the manifest.
    """
    if not isinstance(meta, dict):
        raise ConvertError(f"{where}: expected a JSON object, got {type(meta).__name__}")
    want = {"UNK": vocab.unk_id, "CLS": vocab.cls_id, "SEP": vocab.sep_id, "MASK": vocab.mask_id}
    problems = []
    for name, value in want.items():
        if name not in meta:
            problems.append(f"{name} is missing (expected {value})")
        elif meta[name] != value:
            problems.append(f"{name} is {meta[name]!r}, ours is {value}")
    if "v_range" in meta and list(meta["v_range"]) != [vocab.word_start, vocab.word_end]:
        problems.append(
            f"v_range is {meta['v_range']!r}, ours is [{vocab.word_start}, {vocab.word_end}]"
        )
    name = meta.get("bert", meta.get("toker"))
    expected = VOCAB_NAMES.get(vocab)
    if name is not None and expected is not None and name != expected:
        problems.append(f"tokenizer is {name!r}, the model's vocabulary is {expected!r}")
    if problems:
        raise ConvertError(
            f"{where}: the text DB was tokenised with another vocabulary: "
            + "; ".join(problems)
            + " (its token ids would mean other words to this model)"
        )
    return {
        "name": expected,
        "size": vocab.size,
        "special_ids": {"PAD": vocab.pad_id, **want},
        "word_range": [vocab.word_start, vocab.word_end],
        "checked_against": {k: meta[k] for k in sorted(meta) if k in (*want, "v_range", "bert")},
    }


class LmdbSource(Source):
    """The reference's image DB + text DB (see the module docstring)."""

    kind = "lmdb"

    def __init__(
        self,
        img_db: str | Path,
        txt_db: str | Path,
        *,
        dataset: str,
        policy: RegionPolicy | None = None,
        vocab: Vocab = BERT_BASE_CASED,
    ) -> None:
        self.img_db = Path(img_db)
        self.txt_db = Path(txt_db)
        self.dataset = dataset
        self.policy = policy or RegionPolicy()
        self.vocab = vocab
        self._img_env = self._txt_env = None
        self._unattached: list[tuple[str, str, str]] = []

    def _inputs(self) -> list[Path]:
        files = [self.img_db / "data.mdb", self.txt_db / "data.mdb"]
        for name in ("meta.json", "txt2img.json", "img2txts.json"):
            if (self.txt_db / name).exists():
                files.append(self.txt_db / name)
        return files

    def identity(self) -> dict:
        return {
            "kind": self.kind,
            "arguments": {
                "img_db": str(self.img_db.resolve()),
                "txt_db": str(self.txt_db.resolve()),
            },
            "inputs": [input_fingerprint(p) for p in self._inputs()],
        }

    def open(self) -> None:
        self._vocab_info, self._img_env, self._txt_env = open_reference_dbs(
            self.img_db, self.txt_db, self.vocab
        )
        self._img_txn = self._img_env.begin(buffers=False)
        self._txt_txn = self._txt_env.begin(buffers=False)
        with self._img_txn.cursor() as cur:
            self._keys = [bytes(k) for k in cur.iternext(keys=True, values=False)]
        self._img2txts = self._caption_map()

    def _caption_map(self) -> dict[str, list[str]]:
        """Image name -> its caption ids (text DB key order)."""
        txt2img = self.txt_db / "txt2img.json"
        img2txts = self.txt_db / "img2txts.json"
        groups: dict[str, list[str]] = {}
        if txt2img.is_file():
            mapping = _read_json(txt2img)
            if not isinstance(mapping, dict):
                raise ConvertError(f"{txt2img}: expected an object {{txt_id: img_fname}}")
            for txt_id, img in mapping.items():
                groups.setdefault(str(img), []).append(str(txt_id))
        elif img2txts.is_file():
            mapping = _read_json(img2txts)
            if not isinstance(mapping, dict):
                raise ConvertError(f"{img2txts}: expected an object {{img_fname: [txt_id, ...]}}")
            for img, ids in mapping.items():
                groups[str(img)] = [str(t) for t in ids]
        else:
            # Neither mapping: read every example once for its img_fname. An example that does
            # not decode cannot be given to an image; it is counted at the end.
            for txt_id, example in text_db_examples(self._txt_txn, self._unattached):
                img = example.get("img_fname") if isinstance(example, dict) else None
                if not isinstance(img, str):
                    self._unattached.append(("decode", txt_id, "has no img_fname"))
                    continue
                groups.setdefault(img, []).append(txt_id)
        return {img: sorted(set(ids), key=lambda t: t.encode()) for img, ids in groups.items()}

    def total(self) -> int:
        return len(self._keys)

    def units(self, cursor: Any, marks: np.ndarray) -> Iterator[Unit]:
        start = 0 if cursor is None else int(cursor)
        for i in range(start, len(self._keys)):
            raw_key = self._keys[i]
            name = raw_key.decode("utf-8", errors="replace")
            unit = Unit(key=name, cursor=i + 1)
            txt_ids = self._img2txts.get(name)
            if not txt_ids:
                unit.skip, unit.detail = "no_caption", "no caption in the text DB"
                yield unit
                continue
            try:
                self._fill(unit, raw_key, name, txt_ids)
            except SkipRecord as e:
                unit.record = None
                unit.skip, unit.source_field, unit.detail = e.reason, e.field, e.detail
            yield unit

    def _fill(self, unit: Unit, raw_key: bytes, name: str, txt_ids: list[str]) -> None:
        captions = []
        for txt_id in txt_ids:
            value = self._txt_txn.get(txt_id.encode("utf-8"))
            if value is None:
                unit.left_out.append(("missing_text", txt_id, "is not in the text DB"))
                continue
            try:
                example = _decode_text(value)
            except SkipRecord as e:
                unit.left_out.append((e.reason, txt_id, e.detail))
                continue
            if not isinstance(example, dict) or "input_ids" not in example:
                unit.left_out.append(("decode", txt_id, "has no input_ids"))
                continue
            if example.get("img_fname", name) != name:
                detail = f"belongs to {example.get('img_fname')!r}, txt2img says {name!r}"
                unit.left_out.append(("img_mismatch", txt_id, detail))
                continue
            ids = example["input_ids"]
            captions.append((txt_id, ids.tolist() if isinstance(ids, np.ndarray) else ids))
        unit.captions_seen = len(txt_ids)
        kept, kept_ids, left_out = filter_captions(captions, self.vocab)
        unit.left_out.extend(left_out)
        if not kept:
            raise SkipRecord("no_caption_left", "input_ids", "every caption was left out")

        value = self._img_txn.get(raw_key)
        arrays = _decode_image(value)
        missing = [f for f in ("features", "norm_bb") if f not in arrays]
        if missing:
            raise SkipRecord("missing_field", missing[0], "is missing")
        features = arrays["features"]
        conf = arrays.get("conf")
        soft = arrays.get("soft_labels")
        if soft is None:
            raise SkipRecord("missing_field", "soft_labels", "is missing (MRC needs it)")
        unit.conf_source = "conf" if conf is not None else "soft_labels_max"
        if conf is None and isinstance(soft, np.ndarray) and soft.ndim == 2:
            conf = soft[:, 1:].max(axis=1) if soft.shape[1] > 1 else None
        n = features.shape[0] if isinstance(features, np.ndarray) and features.ndim == 2 else 0
        unit.record = build_record(
            sample_key(name),
            features=features,
            loc=loc_from_norm_bb(arrays["norm_bb"]),
            conf=conf,
            soft=soft,
            captions=kept,
            meta={
                "image_id": sample_key(name),
                "dataset": self.dataset,
                "source_key": name,
                "txt_ids": kept_ids,
                "num_source_regions": int(n),
            },
            policy=self.policy,
            vocab=self.vocab,
        )

    def final_counts(self, stats: Stats) -> None:
        names = {k.decode("utf-8", errors="replace") for k in self._keys}
        missing = sorted(img for img in self._img2txts if img not in names)
        stats.skip_many("no_features", missing, "has captions but is not in the image DB")
        stats.leave_out_read(self._unattached, "text DB caption ")

    def describe(self) -> dict:
        return {"vocab": self._vocab_info, "soft_labels": "source"}

    def close(self) -> None:
        for env in (self._img_env, self._txt_env):
            if env is not None:
                env.close()
        self._img_env = self._txt_env = None


def open_reference_dbs(img_db: Path, txt_db: Path, vocab: Vocab) -> tuple[dict, Any, Any]:
    """Check and open the reference's image DB and text DB read-only: (the manifest's vocab
    entry, from the text DB's meta.json checked against `vocab`; image env; text env)."""
    lmdb = require_extra("lmdb")
    require_extra("lz4.frame")
    require_extra("msgpack")
    for db in (img_db, txt_db):
        if not (db / "data.mdb").is_file():
            raise ConvertError(f"{db}: not an LMDB directory (no data.mdb)")
    meta_path = txt_db / "meta.json"
    if not meta_path.is_file():
        raise ConvertError(
            f"{meta_path} is missing: without it the text DB's vocabulary cannot be checked"
        )
    vocab_info = check_txt_meta(_read_json(meta_path), vocab, str(meta_path))

    def env(path: Path):
        # lock=False: read-only use; the databases may sit on a read-only file system.
        return lmdb.open(str(path), readonly=True, lock=False, readahead=False, subdir=True)

    return vocab_info, env(img_db), env(txt_db)


@dataclass
class GtDetDbs:
    """A text DB with its two image DBs, ground-truth and detected boxes (RE, VCR), open
    read-only: `open_gt_det_dbs`.

    vocab_info: the manifest's vocab entry (meta.json checked against the model's).
    gt, det: read transactions of the image DBs (`image_from_db`); txt: the text DB's
    environment (`text_db_examples` over one of its transactions); envs: all three, for `close`.
    """

    vocab_info: dict
    gt: Any
    det: Any
    txt: Any
    envs: list

    def close(self) -> None:
        for env in self.envs:
            env.close()
        self.envs = []


def open_gt_det_dbs(gt_db: Path, det_db: Path, txt_db: Path, vocab: Vocab) -> GtDetDbs:
    """Check and open a text DB beside its ground-truth and detected image DBs, each image DB
    checked as `open_reference_dbs` checks one."""
    # lmdb opens an environment once per process, so the text DB opened beside the
    # detections is closed before it is opened again.
    _, det_env, txt_env = open_reference_dbs(det_db, txt_db, vocab)
    txt_env.close()
    vocab_info, gt_env, txt_env = open_reference_dbs(gt_db, txt_db, vocab)
    return GtDetDbs(
        vocab_info,
        gt=gt_env.begin(buffers=False),
        det=det_env.begin(buffers=False),
        txt=txt_env,
        envs=[det_env, gt_env, txt_env],
    )


def text_db_examples(
    txn, bad: list[tuple[str, str, str]], parse: Callable[[str, Any], Any] | None = None
) -> Iterator[tuple[str, Any]]:
    """(key, decoded example) of every entry of a text DB read through `txn`, in key order;
    with `parse`, (key, parse(key, example)). An entry that does not decode, or that `parse`
    refuses with a SkipRecord, is passed over, appended to `bad` as (reason, key, detail)."""
    with txn.cursor() as cur:
        for key, value in cur:
            ident = bytes(key).decode("utf-8", errors="replace")
            try:
                example = _decode_text(value)
                if parse is not None:
                    example = parse(ident, example)
            except SkipRecord as e:
                bad.append((e.reason, ident, e.detail))
                continue
            yield ident, example


def image_from_db(txn, name: str, what: str) -> tuple[dict[str, np.ndarray], str]:
    """(decoded arrays, name) of the image `name` of an image DB read through `txn`; SkipRecord
    naming it when it is not in that (`what`) image DB or does not decode."""
    value = txn.get(name.encode("utf-8"))
    if value is None:
        raise SkipRecord("no_features", None, f"{name} is not in the {what} image DB")
    try:
        return _decode_image(value), name
    except SkipRecord as e:
        raise SkipRecord(e.reason, e.field, f"{name}: {e.detail}") from None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConvertError(f"{path}: not valid JSON ({e})") from None


def _decode_text(value: bytes) -> Any:
    lz4_frame = require_extra("lz4.frame")
    try:
        data = lz4_frame.decompress(bytes(value))
    except RuntimeError as e:  # lz4.frame reports corrupt frames as RuntimeError
        raise SkipRecord("decode", None, f"is not an lz4 frame ({e})") from None
    return msgpack_loads(data)


def _decode_image(value: bytes | None) -> dict[str, np.ndarray]:
    if value is None:
        raise SkipRecord("decode", None, "vanished from the image DB")
    value = bytes(value)
    if value[:4] == b"PK\x03\x04":
        return read_npz(value, _IMG_FIELDS)
    # msgpack maps start with a fixmap byte (0x80-0x8f) or map16/map32 (0xde/0xdf).
    if value and (0x80 <= value[0] <= 0x8F or value[0] in (0xDE, 0xDF)):
        obj = msgpack_loads(value)
        if not isinstance(obj, dict):
            raise SkipRecord("decode", None, "msgpack value is not a map")
        return {str(k, "utf-8") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}
    raise SkipRecord("decode", None, "is neither an .npz nor a msgpack map")
