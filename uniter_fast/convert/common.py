"""What every feature converter shares: region selection, record building, counting, and the
resumable, journaled writing of a shard set with its manifest.

A converter is a `Source`: it yields one `Unit` per source image, in a deterministic order,
each holding either a finished `ImageRecord` or the reason the image was skipped, and a JSON
`cursor` that resumes the iteration right after it. `run_conversion` feeds the records to a
`ShardWriter` and, each time a shard is renamed into place, atomically replaces the journal
(`DIR/.convert-journal.json`) with the finished shards, their checksums, the cursor after the
shard's last record and the counts up to it. Re-running the same command after a kill verifies
the finished shards, deletes leftovers and carries on from that cursor: since shard boundaries
depend only on the records (exact tar sizes), the result is byte-identical to an uninterrupted
run. The finished set gets `manifest.json`, written last; the journal is then removed.

Bad source records never stop a conversion: the source raises `SkipRecord` (reason, field,
detail) and the image is counted by reason with a few example keys. Only `SkipRecord` is
caught: a TypeError or any other bug still stops the run at once. When the bad images pass
`max_bad_fraction` of the source images, the conversion fails with the counts and examples.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..data.schema import (
    BERT_BASE_CASED,
    IMG_DIM,
    IMG_LABEL_DIM,
    LOC_DIM,
    MAX_CAPTION_TOKENS,
    MAX_REGIONS,
    MIN_REGIONS,
    Vocab,
)
from ..data.shards import ImageRecord, ShardFormatError, ShardWriter, validate_record

__all__ = [
    "MANIFEST_FORMAT",
    "ConvertError",
    "ConvertOptions",
    "GroupedSource",
    "RegionPolicy",
    "SkipRecord",
    "Source",
    "Stats",
    "Unit",
    "build_record",
    "filter_captions",
    "loc_from_norm_bb",
    "loc_from_pixel_boxes",
    "parse_size",
    "require_extra",
    "run_conversion",
    "sample_key",
    "uniform_soft_labels",
]

MANIFEST_FORMAT = "uniter-fast-shards/1"
JOURNAL_FORMAT = "uniter-fast-convert-journal/1"
MANIFEST_NAME = "manifest.json"
JOURNAL_NAME = ".convert-journal.json"
# The name bert-base-cased's tokenizer goes by in the reference's meta.json.
VOCAB_NAMES = {BERT_BASE_CASED: "bert-base-cased"}
FP16_MAX = float(np.finfo(np.float16).max)

# Image-level skip reasons that are selection policy, not defects of the source: they never
# count towards `max_bad_fraction`. Every other reason does (decode, shape, nonfinite, ...).
POLICY_SKIPS = frozenset({"no_caption", "no_caption_left"})
# Caption-level reasons that are policy: UNITER leaves captions over 60 tokens out.
POLICY_LEFT_OUT = frozenset({"too_long", "empty"})
_EXAMPLES_PER_REASON = 5


class ConvertError(Exception):
    """A conversion that cannot go on: bad arguments, a refused source, a failed check.

    The CLI prints the message and exits with status 1; nothing here is a bug.
    """


class SkipRecord(Exception):  # noqa: N818 (a signal for "skip this image", not an error)
    """Raised while reading one source image: skip the image, count it under `reason`.

    field: the source field at fault (e.g. "features", "norm_bb"), or None.
    """

    def __init__(self, reason: str, field: str | None, detail: str) -> None:
        self.reason = reason
        self.field = field
        self.detail = detail
        super().__init__(f"{field}: {detail}" if field else detail)


def require_extra(module: str):
    """Import an optional dependency of the converters, or fail naming the install command."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ConvertError(
            f"the converters need the optional package {module.split('.')[0]!r} ({e}); "
            'install them with: pip install -e ".[convert]"'
        ) from None


def parse_size(text: str | int) -> int:
    """Bytes from "256MB", "1.5GB", "64MiB", "1000000" (KB/MB/GB are powers of 1000, KiB/MiB/GiB
    of 1024)."""
    if isinstance(text, int):
        value = text
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?)B?\s*", str(text), re.IGNORECASE)
        if m is None:
            raise ValueError(f"cannot read {text!r} as a size (e.g. 256MB, 1GiB, 1000000)")
        number, unit, binary = m.groups()
        base = 1024 if binary else 1000
        power = "KMGT".index(unit.upper()) + 1 if unit else 0
        value = int(float(number) * base**power)
    if value < 1:
        raise ValueError(f"a size must be at least 1 byte, got {text!r}")
    return value


# --------------------------------------------------------------------------------------------
# Regions


@dataclass(frozen=True)
class RegionPolicy:
    """Which detector regions an image keeps (UNITER: `clamp(#(conf > 0.2), 10, 100)`).

    The kept regions are the top ones by confidence, stored in descending confidence order
    (stable, so ties keep the source order). An image with fewer than `min_regions` regions
    keeps them all. Without confidences, the first `max_regions` in source order are kept.
    """

    conf_threshold: float = 0.2
    min_regions: int = MIN_REGIONS
    max_regions: int = MAX_REGIONS

    def __post_init__(self) -> None:
        if not 1 <= self.min_regions <= self.max_regions <= MAX_REGIONS:
            raise ValueError(
                f"RegionPolicy needs 1 <= min_regions ({self.min_regions}) <= max_regions "
                f"({self.max_regions}) <= {MAX_REGIONS}"
            )

    def select(self, conf: np.ndarray | None, n: int) -> np.ndarray:
        """Indices of the kept regions among n, in storage order. conf: float [n] or None."""
        if conf is None:
            return np.arange(min(n, self.max_regions))
        keep = int(np.count_nonzero(conf > self.conf_threshold))
        keep = min(max(keep, self.min_regions), self.max_regions, n)
        return np.argsort(-conf.astype(np.float64), kind="stable")[:keep]

    def describe(self) -> dict:
        return {
            "rule": "clamp(#(conf > conf_threshold), min_regions, max_regions), top by conf",
            "order": "descending confidence (stable)",
            "conf_threshold": self.conf_threshold,
            "min_regions": self.min_regions,
            "max_regions": self.max_regions,
        }


def loc_from_norm_bb(norm_bb: np.ndarray) -> np.ndarray:
    """float32 [n, 7] from the reference's normalised boxes: [n, 6] gets the 7th column w*h
    (computed in float32, as the reference's loader does); [n, 7] is taken as it is."""
    nb = np.asarray(norm_bb)
    if nb.ndim != 2 or nb.shape[1] not in (6, LOC_DIM):
        raise SkipRecord("shape", "norm_bb", f"has shape {nb.shape}, expected (n, 6) or (n, 7)")
    if nb.dtype.kind not in "fiu":
        raise SkipRecord("dtype", "norm_bb", f"has dtype {nb.dtype}, expected a float array")
    nb = nb.astype(np.float32)
    if nb.shape[1] == LOC_DIM:
        return nb
    return np.concatenate([nb, nb[:, 4:5] * nb[:, 5:6]], axis=1)


def loc_from_pixel_boxes(boxes: np.ndarray, width: float, height: float) -> np.ndarray:
    """float32 [n, 7] `[x1, y1, x2, y2, w, h, w*h]` from pixel boxes [n, 4] (x1, y1, x2, y2),
    normalised by the image width and height (computed in float64, then cast)."""
    b = np.asarray(boxes)
    if b.ndim != 2 or b.shape[1] != 4:
        raise SkipRecord("shape", "boxes", f"has shape {b.shape}, expected (n, 4)")
    if not (np.isfinite(width) and np.isfinite(height) and width > 0 and height > 0):
        raise SkipRecord("image_size", "image_w/image_h", f"is {width} x {height}")
    b = b.astype(np.float64) / np.array([width, height, width, height])
    w = b[:, 2] - b[:, 0]
    h = b[:, 3] - b[:, 1]
    return np.stack([b[:, 0], b[:, 1], b[:, 2], b[:, 3], w, h, w * h], axis=1).astype(np.float32)


def uniform_soft_labels(n: int) -> np.ndarray:
    """float32 [n, 1601]: uniform over classes 1..1600, nothing on background (class 0)."""
    soft = np.full((n, IMG_LABEL_DIM), 1.0 / (IMG_LABEL_DIM - 1), dtype=np.float32)
    soft[:, 0] = 0.0
    return soft


def _check_array(name: str, value: np.ndarray, shape: tuple) -> None:
    if not isinstance(value, np.ndarray):
        raise SkipRecord("type", name, f"is a {type(value).__name__}, expected an array")
    if value.dtype.kind not in "fiub":
        raise SkipRecord("dtype", name, f"has dtype {value.dtype}, expected a numeric array")
    if value.shape != shape:
        want = ", ".join("n" if d == -1 else str(d) for d in shape)
        raise SkipRecord("shape", name, f"has shape {value.shape}, expected ({want})")
    if value.dtype.kind == "f" and not np.isfinite(value).all():
        bad = int(np.count_nonzero(~np.isfinite(value)))
        raise SkipRecord("nonfinite", name, f"has {bad} NaN/Inf values")


def build_record(
    key: str,
    *,
    features: np.ndarray,
    loc: np.ndarray,
    conf: np.ndarray | None,
    soft: np.ndarray,
    captions: list[np.ndarray],
    meta: dict,
    policy: RegionPolicy,
    vocab: Vocab = BERT_BASE_CASED,
) -> ImageRecord:
    """Select regions and cast to the shard schema; raise `SkipRecord` on any bad input.

    features: [n, 2048] (any float dtype), loc: [n, 7], conf: [n] or None (source order),
    soft: [n, 1601]. A NaN/Inf anywhere in the source arrays skips the image (reason
    "nonfinite": the record is corrupt even if the bad value sits in a dropped region); a kept
    feature outside the float16 range skips it too ("fp16_overflow") rather than storing inf.
    """
    feat16, loc32, soft16 = select_regions(
        features=features, loc=loc, conf=conf, soft=soft, policy=policy
    )
    record = ImageRecord(key=key, feat=feat16, loc=loc32, soft=soft16, captions=captions, meta=meta)
    try:
        validate_record(record, shard="", vocab=vocab)
    except ShardFormatError as e:  # whatever the checks above did not catch (negative soft...)
        raise SkipRecord(e.reason, e.field, e.detail) from None
    return record


def select_regions(
    *,
    features: np.ndarray,
    loc: np.ndarray,
    conf: np.ndarray | None,
    soft: np.ndarray,
    policy: RegionPolicy,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`build_record`'s checks and region selection: (feat float16, loc float32, soft float16)
    of the kept regions; raises `SkipRecord` on any bad input (the task converters use it
    directly: task shards keep no captions)."""
    if not isinstance(features, np.ndarray) or features.ndim != 2:
        shape = getattr(features, "shape", None)
        raise SkipRecord("shape", "features", f"has shape {shape}, expected (n, {IMG_DIM})")
    n = features.shape[0]
    if n == 0:
        raise SkipRecord("no_regions", "features", "holds no regions")
    _check_array("features", features, (n, IMG_DIM))
    _check_array("loc", loc, (n, LOC_DIM))
    # soft before conf: a conf derived from a NaN soft label is the soft label's fault.
    _check_array("soft_labels", soft, (n, IMG_LABEL_DIM))
    if conf is not None:
        _check_array("conf", conf, (n,))

    idx = policy.select(conf, n)
    with np.errstate(over="ignore"):
        feat16 = features[idx].astype(np.float16)
    if not np.isfinite(feat16).all():
        big = float(np.abs(features[idx].astype(np.float64)).max())
        raise SkipRecord(
            "fp16_overflow", "features", f"has |value| {big:g} beyond float16's {FP16_MAX:g}"
        )
    return feat16, loc[idx].astype(np.float32), soft[idx].astype(np.float16)


def filter_captions(
    captions: list[tuple[str, Any]], vocab: Vocab = BERT_BASE_CASED
) -> tuple[list[np.ndarray], list[str], list[tuple[str, str, str]]]:
    """Keep the captions a shard may hold; say why each other one was left out.

    captions: (caption id, token ids without [CLS]/[SEP]) pairs.
    Returns (kept int32 arrays, their ids, [(reason, caption id, detail)] for the rest). Left out:
    "empty", "too_long" (over MAX_CAPTION_TOKENS), "token_id" (an id outside the vocabulary, or
    not an integer), "special_token" ([PAD]/[CLS]/[SEP]/[MASK] inside the caption).
    """
    specials = np.array(sorted({vocab.pad_id, vocab.cls_id, vocab.sep_id, vocab.mask_id}))
    kept, kept_ids, left_out = [], [], []
    for cid, ids in captions:
        if isinstance(ids, np.ndarray):
            ok = ids.ndim == 1 and ids.dtype.kind in "iu"
            values = ids if ok else None
        else:
            ok = isinstance(ids, (list, tuple)) and all(type(t) is int for t in ids)
            values = np.asarray(ids, dtype=np.int64) if ok and ids else np.zeros(0, np.int64)
        if not ok:
            left_out.append(("token_id", cid, "is not a flat list of integer token ids"))
            continue
        if values.size == 0:
            left_out.append(("empty", cid, "has no tokens"))
            continue
        if values.size > MAX_CAPTION_TOKENS:
            left_out.append(("too_long", cid, f"has {values.size} > {MAX_CAPTION_TOKENS} tokens"))
            continue
        outside = (values < 0) | (values >= vocab.size)
        if outside.any():
            bad = int(values[outside][0])
            left_out.append(("token_id", cid, f"has id {bad} outside [0, {vocab.size})"))
            continue
        special = np.isin(values, specials)
        if special.any():
            left_out.append(("special_token", cid, f"holds special id {int(values[special][0])}"))
            continue
        kept.append(values.astype(np.int32))
        kept_ids.append(cid)
    return kept, kept_ids, left_out


def sample_key(name: str) -> str:
    """A shard sample key from a source image name: `coco_train2014_000000000009.npz` ->
    `coco_train2014_000000000009`. WebDataset splits member names at the first '.', so a
    known file extension is dropped and any other '.' becomes '_'."""
    name = str(name)
    stem = re.sub(r"\.(npz|npy|jpe?g|png|gif|bmp|webp)$", "", name, flags=re.IGNORECASE)
    return stem.replace(".", "_").strip("/") or "_"


# --------------------------------------------------------------------------------------------
# Safe decoding of source records: never unpickle

# numpy's message when an object array meets allow_pickle=False
_PICKLE_MESSAGE = "allow_pickle"
_NPZ_ERRORS = (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile, zlib.error)


def read_npz(data: bytes | os.PathLike | str, fields: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The arrays `fields` of an .npz (bytes or a path) that it holds, read without pickle.

    Only the named members are decoded: an object array among them is refused (reason
    "pickle") before any of its bytes reach pickle; members not asked for are never read.
    Raises SkipRecord("decode") for anything that is not a readable .npz.
    """
    import io

    stream = io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data
    head = bytes(data[:4]) if isinstance(data, (bytes, bytearray, memoryview)) else None
    if head is not None and head != b"PK\x03\x04":
        raise SkipRecord("decode", None, "is not an .npz archive (no zip header)")
    out = {}
    try:
        with np.load(stream, allow_pickle=False) as npz:
            if not isinstance(npz, np.lib.npyio.NpzFile):
                raise SkipRecord("decode", None, "is a single .npy array, expected an .npz")
            for name in fields:
                if name in npz.files:
                    try:
                        out[name] = npz[name]
                    except ValueError as e:
                        if _PICKLE_MESSAGE in str(e):
                            raise SkipRecord(
                                "pickle", name, "is an object array (needs pickle): refused"
                            ) from None
                        raise
    except SkipRecord:
        raise
    except _NPZ_ERRORS as e:
        if _PICKLE_MESSAGE in str(e):
            raise SkipRecord("pickle", None, f"holds pickled data: refused ({e})") from None
        raise SkipRecord(
            "decode", None, f"is not a readable .npz ({type(e).__name__}: {e})"
        ) from None
    return out


def read_npz_file(path: Path, fields: tuple[str, ...]) -> dict[str, np.ndarray]:
    """`read_npz` of a file, a SkipRecord's detail starting with the file's name."""
    try:
        return read_npz(path, fields)
    except SkipRecord as e:
        raise SkipRecord(e.reason, e.field, f"{path.name}: {e.detail}") from None


def read_jsonl(
    path: Path, bad: list[tuple[str, str, str]], prefix: str = ""
) -> Iterator[tuple[int, dict]]:
    """(line number, object) of every line of a JSONL file that holds a JSON object, read as
    UTF-8 with bad bytes replaced; blank lines are passed over. A line that is not a JSON object
    is appended to `bad` as ("decode", f"{prefix}line {number}", why)."""
    with path.open(encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                bad.append(("decode", f"{prefix}line {number}", f"is not JSON ({e.msg})"))
                continue
            if not isinstance(obj, dict):
                bad.append(("decode", f"{prefix}line {number}", "is not a JSON object"))
                continue
            yield number, obj


def lacking_strings(**fields: Any) -> str | None:
    """Why a record is bad when some of `fields` are not non-empty strings ("lacks id, text (or
    they are not strings)"), else None."""
    missing = [name for name, value in fields.items() if not isinstance(value, str) or not value]
    return f"lacks {', '.join(missing)} (or they are not strings)" if missing else None


# dtype kinds a msgpack_numpy array may have: bool, ints, floats. Object ('O') arrays would need
# pickle.loads (what msgpack_numpy does), structured ('V') ones are never feature data.
_PLAIN_KINDS = frozenset("biuf")


def _msgpack_numpy_hook(obj: dict) -> Any:
    """Decode msgpack_numpy's {nd, type, kind, shape, data} maps ourselves, refusing pickles."""
    get = lambda k: obj.get(k.encode(), obj.get(k))  # noqa: E731 (keys may be bytes or str)
    nd = get("nd")
    if nd is None or get("data") is None:
        return obj
    kind = get("kind")
    kind = kind.decode("latin-1") if isinstance(kind, bytes) else (kind or "")
    type_str = get("type")
    if kind == "O" or (isinstance(type_str, (str, bytes)) and "O" in str(type_str)):
        raise SkipRecord("pickle", None, "holds a msgpack_numpy object array (pickled): refused")
    if not isinstance(type_str, (str, bytes)):
        raise SkipRecord("decode", None, f"msgpack_numpy dtype {type_str!r} is not a plain dtype")
    try:
        dtype = np.dtype(type_str.decode() if isinstance(type_str, bytes) else type_str)
    except TypeError as e:
        raise SkipRecord("decode", None, f"msgpack_numpy dtype {type_str!r}: {e}") from None
    if dtype.kind not in _PLAIN_KINDS:
        raise SkipRecord("decode", None, f"msgpack_numpy dtype {dtype} is not numeric: refused")
    data = bytes(get("data"))
    if nd is not True:  # a numpy scalar
        if len(data) != dtype.itemsize:
            raise SkipRecord("decode", None, f"msgpack_numpy scalar of {len(data)} bytes")
        return np.frombuffer(data, dtype=dtype)[0]
    shape = get("shape")
    if not isinstance(shape, (list, tuple)) or not all(type(d) is int and d >= 0 for d in shape):
        raise SkipRecord("decode", None, f"msgpack_numpy shape {shape!r} is not a shape")
    if len(data) != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
        raise SkipRecord(
            "decode", None, f"msgpack_numpy array of shape {shape} has {len(data)} bytes"
        )
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def _refuse_ext(code: int, data: bytes) -> Any:
    raise SkipRecord("decode", None, f"holds a msgpack extension type {code}: refused")


def msgpack_loads(data: bytes) -> Any:
    """Unpack msgpack (the reference's uncompressed image DB and its text DB values), turning
    msgpack_numpy arrays into arrays without ever unpickling. Raises SkipRecord."""
    msgpack = require_extra("msgpack")
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            object_hook=_msgpack_numpy_hook,
            ext_hook=_refuse_ext,
            strict_map_key=False,
        )
    except SkipRecord:
        raise
    except (ValueError, msgpack.exceptions.UnpackException) as e:
        # ExtraData, FormatError, StackError and OutOfData are ValueError subclasses.
        raise SkipRecord(
            "decode", None, f"is not valid msgpack ({type(e).__name__}: {e})"
        ) from None


# --------------------------------------------------------------------------------------------
# Sources and counting


@dataclass
class Unit:
    """One source image: a record to write, or why it was skipped.

    key: the image's name in the source (used in messages and examples).
    cursor: JSON value that resumes the source right after this image.
    record: the record (None when skipped); skip/source_field/detail: why it was skipped.
    left_out: (reason, caption id, detail) for captions left out of this image.
    captions_seen: captions of this image read from the source (kept or not).
    conf_source: where the region confidences came from ("conf", "cls_prob_max", "file_order").
    mark: index of this image in the source's list of captioned images (sources that can only
        tell which captioned images had no features once they have read everything).
    """

    key: str
    cursor: Any
    record: ImageRecord | None = None
    skip: str | None = None
    source_field: str | None = None
    detail: str = ""
    left_out: list[tuple[str, str, str]] = field(default_factory=list)
    captions_seen: int = 0
    conf_source: str | None = None
    mark: int | None = None


def units_in_order(
    cursor: Any, items: list, key: Callable[[Any], str], fill: Callable[[Unit, Any], None]
) -> Iterator[Unit]:
    """The units of a source that lists its images (or groups) up front: one per item after
    `cursor` (the index to resume at; None: from the start), each filled by `fill(unit, item)`,
    or skipped with the reason of the `SkipRecord` it raised."""
    for i in range(0 if cursor is None else int(cursor), len(items)):
        item = items[i]
        unit = Unit(key=key(item), cursor=i + 1)
        try:
            fill(unit, item)
        except SkipRecord as e:
            unit.record = None
            unit.skip, unit.source_field, unit.detail = e.reason, e.field, e.detail
        yield unit


class Source:
    """A converter's input. Subclasses set `kind` and implement the methods below."""

    kind = "source"
    # Lines printed when the conversion starts and kept in the manifest.
    warnings: list[str]

    def identity(self) -> dict:
        """Everything that shapes the output: arguments and input fingerprints (JSON)."""
        raise NotImplementedError

    def open(self) -> None:
        """Load mappings and check the source (vocabulary, fields); raise ConvertError."""

    def num_marks(self) -> int:
        """Length of the captioned-image list `Unit.mark` indexes (0 when unused)."""
        return 0

    def mark_name(self, index: int) -> str:
        raise NotImplementedError

    def total(self) -> int | None:
        """Number of units (for the progress bar), if known."""
        return None

    def units(self, cursor: Any, marks: np.ndarray) -> Iterator[Unit]:
        """The units after `cursor` (None: from the start), in a fixed order.

        marks: bool [num_marks()], the `Unit.mark`s counted before `cursor` (a resumed run).
        """
        raise NotImplementedError

    def final_counts(self, stats: Stats) -> None:
        """Add counts that do not depend on the position (e.g. captioned images without
        features in an image database that is known up front)."""

    def describe(self) -> dict:
        """Manifest entries: `vocab` (what captions were checked against) and `soft_labels`
        ("source" or "uniform")."""
        return {}

    def close(self) -> None:
        pass


class GroupedSource(Source):
    """A source that reads all its texts in `open`, grouped by the sample they go into.

    Subclasses set, in `open`: `keys`, the samples in the order they are written, each built
    by `_fill(unit, key)` (raising SkipRecord to skip it); `bad_lines`, the texts left out
    while reading, as (reason, where, detail), counted at the end with `where` after
    `bad_line_prefix`. A resumed run's cursor is an index into `keys`.
    """

    keys: list
    bad_lines: list[tuple[str, str, str]]
    bad_line_prefix = ""

    def total(self) -> int:
        return len(self.keys)

    def units(self, cursor: Any, marks: np.ndarray) -> Iterator[Unit]:
        return units_in_order(cursor, self.keys, str, self._fill)

    def _fill(self, unit: Unit, key: Any) -> None:
        raise NotImplementedError

    def final_counts(self, stats: Stats) -> None:
        stats.leave_out_read(self.bad_lines, self.bad_line_prefix)


def _histogram(counter: Counter) -> dict:
    total = sum(counter.values())
    mean = sum(k * v for k, v in counter.items()) / total if total else 0.0
    return {
        "counts": {str(k): counter[k] for k in sorted(counter)},
        "total": total,
        "min": min(counter) if counter else None,
        "max": max(counter) if counter else None,
        "mean": round(mean, 4),
    }


class Stats:
    """Running counts of a conversion; JSON round-trips exactly (journal and manifest)."""

    def __init__(self, num_marks: int = 0) -> None:
        self.source_images = 0  # source images met (units, plus those counted at the end)
        self.images = 0  # written
        self.pairs = 0  # captions written
        self.regions = 0  # regions written
        self.captions_seen = 0
        self.skipped: Counter[str] = Counter()  # image-level, by reason
        self.left_out: Counter[str] = Counter()  # caption-level, by reason
        self.examples: dict[str, list[str]] = {}  # reason -> first few keys with detail
        self.caption_tokens: Counter[int] = Counter()
        self.region_counts: Counter[int] = Counter()
        self.conf_source: Counter[str] = Counter()
        self.marks = np.zeros(num_marks, dtype=bool)

    def _example(self, reason: str, text: str) -> None:
        shown = self.examples.setdefault(reason, [])
        if len(shown) < _EXAMPLES_PER_REASON:
            shown.append(text)

    def skip(self, reason: str, key: str, detail: str = "") -> None:
        """Count one skipped source image."""
        self.skipped[reason] += 1
        self.source_images += 1
        self._example(reason, f"{key}: {detail}" if detail else key)

    def skip_many(self, reason: str, keys: list[str], detail: str) -> None:
        """Count source images skipped for one reason found at the end (e.g. no features)."""
        self.skipped[reason] += len(keys)
        self.source_images += len(keys)
        for key in keys[:_EXAMPLES_PER_REASON]:
            self._example(reason, f"{key}: {detail}")
        if not keys:  # keep the reason out of the counts when nothing was skipped
            del self.skipped[reason]

    def leave_out(self, reason: str, where: str, detail: str) -> None:
        """Count one caption left out."""
        self.left_out[reason] += 1
        self._example(f"caption:{reason}", f"{where}: {detail}")

    def leave_out_read(self, lines: Iterable[tuple[str, str, str]], prefix: str = "") -> None:
        """Count captions left out while the source was read, before any unit held them: each
        (reason, where, detail) one caption seen and left out, `prefix` put before `where`."""
        for reason, where, detail in lines:
            self.captions_seen += 1
            self.leave_out(reason, f"{prefix}{where}", detail)

    def apply(self, unit: Unit) -> None:
        """Count one unit (its image and its captions)."""
        self.captions_seen += unit.captions_seen
        for reason, cid, detail in unit.left_out:
            self.leave_out(reason, f"{unit.key} caption {cid}", detail)
        if unit.mark is not None:
            self.marks[unit.mark] = True
        if unit.record is None:
            what = f"{unit.source_field}: {unit.detail}" if unit.source_field else unit.detail
            self.skip(unit.skip or "unknown", unit.key, what)
            return
        self.source_images += 1
        record = unit.record
        self.images += 1
        self.pairs += len(record.captions)
        self.regions += record.num_regions
        self.region_counts[record.num_regions] += 1
        self.caption_tokens.update(int(c.size) for c in record.captions)
        if unit.conf_source:
            self.conf_source[unit.conf_source] += 1

    @property
    def bad_images(self) -> int:
        return sum(v for k, v in self.skipped.items() if k not in POLICY_SKIPS)

    @property
    def bad_captions(self) -> int:
        return sum(v for k, v in self.left_out.items() if k not in POLICY_LEFT_OUT)

    def to_json(self) -> dict:
        return {
            "source_images": self.source_images,
            "images": self.images,
            "pairs": self.pairs,
            "regions": self.regions,
            "captions_seen": self.captions_seen,
            "skipped": dict(sorted(self.skipped.items())),
            "left_out_captions": dict(sorted(self.left_out.items())),
            "examples": {k: list(v) for k, v in sorted(self.examples.items())},
            "caption_tokens": {str(k): v for k, v in sorted(self.caption_tokens.items())},
            "region_counts": {str(k): v for k, v in sorted(self.region_counts.items())},
            "conf_source": dict(sorted(self.conf_source.items())),
            "marks": np.packbits(self.marks).tobytes().hex() if self.marks.size else "",
            "num_marks": int(self.marks.size),
        }

    @classmethod
    def from_json(cls, obj: dict) -> Stats:
        stats = cls(int(obj["num_marks"]))
        for name in ("source_images", "images", "pairs", "regions", "captions_seen"):
            setattr(stats, name, int(obj[name]))
        stats.skipped = Counter(obj["skipped"])
        stats.left_out = Counter(obj["left_out_captions"])
        stats.examples = {k: list(v) for k, v in obj["examples"].items()}
        stats.caption_tokens = Counter({int(k): v for k, v in obj["caption_tokens"].items()})
        stats.region_counts = Counter({int(k): v for k, v in obj["region_counts"].items()})
        stats.conf_source = Counter(obj["conf_source"])
        if stats.marks.size:
            bits = np.frombuffer(bytes.fromhex(obj["marks"]), dtype=np.uint8)
            stats.marks = np.unpackbits(bits)[: stats.marks.size].astype(bool)
        return stats

    def summary_lines(self) -> list[str]:
        lines = [
            f"source images {self.source_images}: wrote {self.images} images, {self.pairs} "
            f"pairs, {self.regions} regions; skipped {sum(self.skipped.values())} images "
            f"({self.bad_images} bad), left out {sum(self.left_out.values())} of "
            f"{self.captions_seen} captions ({self.bad_captions} bad)"
        ]
        for title, counter in (
            ("images skipped", self.skipped),
            ("captions left out", self.left_out),
        ):
            for reason, count in sorted(counter.items()):
                tag = reason if title.startswith("images") else f"caption:{reason}"
                example = self.examples.get(tag, [""])[0]
                lines.append(f"  {title}: {reason}: {count}  (e.g. {example})")
        return lines


# --------------------------------------------------------------------------------------------
# Atomic files, journal and manifest


def _fsync_dir(path: Path) -> None:
    # The rename is durable only once the directory entry is; not every platform allows it.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON under a hidden temporary name, fsync, rename over `path`."""
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    data = json.dumps(obj, indent=1, ensure_ascii=False, allow_nan=False) + "\n"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def input_fingerprint(path: str | os.PathLike) -> dict:
    """What identifies an input file: absolute path, size and modification time."""
    p = Path(path).resolve()
    st = p.stat()
    return {"path": str(p), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


@dataclass
class ConvertOptions:
    """Output options shared by all converters.

    out: output directory. prefix: shards are `{prefix}-NNNNNN.tar`. dataset: stored in each
    sample's meta. shard_bytes / max_samples: roll a shard over at this size / sample count.
    max_bad_fraction: fail when bad images (or bad captions) exceed this fraction of those read.
    overwrite: replace a finished or different conversion in `out`. progress: tqdm bars
    (None: only on a terminal). vocab: the model vocabulary captions are checked against.
    """

    out: Path
    prefix: str = "shard"
    dataset: str = ""
    shard_bytes: int = 256 * 10**6
    max_samples: int | None = None
    max_bad_fraction: float = 0.01
    overwrite: bool = False
    progress: bool | None = None
    policy: RegionPolicy = field(default_factory=RegionPolicy)
    vocab: Vocab = BERT_BASE_CASED

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {self.max_bad_fraction}")
        if not self.prefix or "/" in self.prefix or "." in self.prefix:
            raise ValueError(f"prefix must be a plain name without '.' or '/', got {self.prefix!r}")
        self.dataset = self.dataset or self.prefix

    def identity(self) -> dict:
        """The options that shape the output bytes (max_bad_fraction does not)."""
        return {
            "prefix": self.prefix,
            "dataset": self.dataset,
            "shard_bytes": self.shard_bytes,
            "max_samples": self.max_samples,
            "region_selection": self.policy.describe(),
            "vocab_size": self.vocab.size,
        }


_SHARD_NAME = re.compile(r"[^/\\.][^/\\]*-[0-9]{6}\.tar")


def _shard_index(path: Path) -> int:
    return int(path.name[:-4].rsplit("-", 1)[1])


def _our_shards(out: Path, prefix: str) -> list[Path]:
    pattern = re.compile(re.escape(prefix) + r"-[0-9]{6}\.tar")
    return sorted(p for p in out.iterdir() if pattern.fullmatch(p.name))


def _our_temp_files(out: Path, prefix: str) -> list[Path]:
    # ShardWriter's `.{prefix}-NNNNNN.tar.<pid>.<hex>.partial` and our `.{name}.<pid>.tmp`.
    partial = re.compile(r"\." + re.escape(prefix) + r"-[0-9]{6}\.tar\..+\.partial")
    tmp = re.compile(
        r"\.(" + re.escape(MANIFEST_NAME) + "|" + re.escape(JOURNAL_NAME) + r")\.[0-9]+\.tmp"
    )
    return sorted(p for p in out.iterdir() if partial.fullmatch(p.name) or tmp.fullmatch(p.name))


def _diff(a: Any, b: Any, path: str = "") -> list[str]:
    """The first few places where two JSON values differ (for refusal messages)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{path}.{k}" if path else k)
        return out
    return [] if a == b else [f"{path}: {a!r} (journal) vs {b!r} (now)"]


def _prepare_output(opts: ConvertOptions, identity: dict) -> dict | None:
    """Check `opts.out` against this command; return the journal to resume, or None.

    Refuses (ConvertError) a finished directory or one holding another conversion unless
    `overwrite`, in which case those files are deleted first.
    """
    out = opts.out
    out.mkdir(parents=True, exist_ok=True)
    manifest = out / MANIFEST_NAME
    journal_path = out / JOURNAL_NAME
    journal = None
    if journal_path.exists():
        try:
            journal = json.loads(journal_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            if not opts.overwrite:
                raise ConvertError(
                    f"{journal_path} is not readable JSON ({e}); pass --overwrite to start over"
                ) from None
    existing = _our_shards(out, opts.prefix)
    if opts.overwrite:
        stale = list(existing) + _our_temp_files(out, opts.prefix)
        # Shards an earlier command (maybe with another prefix) listed: a replaced set must not
        # leave its old shards beside the new ones. Only plain shard names are trusted.
        listed = [] if journal is None else journal.get("shards", [])
        if manifest.exists():
            try:
                listed += json.loads(manifest.read_text(encoding="utf-8")).get("shards", [])
            except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
                pass  # an unreadable manifest lists nothing to delete; it goes below anyway
        for entry in listed:
            name = entry.get("name") if isinstance(entry, dict) else None
            if isinstance(name, str) and _SHARD_NAME.fullmatch(name):
                stale.append(out / name)
        for path in [manifest, journal_path, *stale]:
            path.unlink(missing_ok=True)
        return None
    if manifest.exists():
        raise ConvertError(
            f"{out} already holds a finished conversion ({manifest}); pass --overwrite to "
            "replace it, or choose another --out"
        )
    if journal is not None:
        if journal.get("format") != JOURNAL_FORMAT or journal.get("identity") != identity:
            diff = _diff(journal.get("identity"), identity)[:8] or ["journal format"]
            raise ConvertError(
                f"{out} holds an unfinished conversion by a different command (differences: "
                + "; ".join(diff)
                + "); rerun that command to finish it, or pass --overwrite to start over"
            )
        return journal
    if existing:
        raise ConvertError(
            f"{out} already holds {len(existing)} shard(s) named {opts.prefix}-*.tar (e.g. "
            f"{existing[0].name}) and no conversion journal; pass --overwrite to replace them"
        )
    return None


def _resume_checks(opts: ConvertOptions, journal: dict, progress: bool | None) -> None:
    """Verify the journaled shards; delete what an interrupted run left beyond them."""
    from tqdm import tqdm

    out = opts.out
    shards = journal["shards"]
    for info in tqdm(shards, desc="verify finished shards", unit="shard", disable=_off(progress)):
        path = out / info["name"]
        if not path.is_file():
            raise ConvertError(f"cannot resume: finished shard {path} is missing; pass --overwrite")
        size = path.stat().st_size
        if size != info["bytes"]:
            raise ConvertError(
                f"cannot resume: finished shard {path} has {size} bytes, the journal says "
                f"{info['bytes']}; pass --overwrite to start over"
            )
        if _sha256_file(path) != info["sha256"]:
            raise ConvertError(
                f"cannot resume: finished shard {path} does not match its journaled sha256; "
                "pass --overwrite to start over"
            )
    # A shard renamed into place just before the kill, before its journal entry: redone.
    for path in _our_shards(out, opts.prefix):
        if _shard_index(path) >= len(shards):
            path.unlink()
    for path in _our_temp_files(out, opts.prefix):
        path.unlink()


def _off(progress: bool | None) -> bool | None:
    return None if progress is None else not progress


def run_conversion(source: Source, opts: ConvertOptions, *, log=None) -> dict:
    """Convert `source` into shards under `opts.out`; return the manifest (also written there).

    Resumes an interrupted run of the same command (see the module docstring). Raises
    ConvertError for refusals and when the bad fraction passes `opts.max_bad_fraction` (the
    shards written so far and the journal stay, so that the same command with a higher
    threshold finishes without redoing them).
    log: a callable taking one line (default: print to stderr).
    """
    from tqdm import tqdm

    log = log or (lambda line: print(line, file=sys.stderr))
    source.warnings = []
    source.open()
    try:
        for line in source.warnings:
            log(f"warning: {line}")
        identity = {"source": source.identity(), "options": opts.identity()}
        journal = _prepare_output(opts, identity)
        if journal is not None:
            _resume_checks(opts, journal, opts.progress)
            stats = Stats.from_json(journal["stats"])
            shards, cursor = list(journal["shards"]), journal["cursor"]
            log(f"resuming after {len(shards)} finished shard(s) in {opts.out}")
        else:
            stats = Stats(source.num_marks())
            shards, cursor = [], None

        def save_journal() -> None:
            body = {
                "format": JOURNAL_FORMAT,
                "identity": identity,
                "shards": shards,
                "cursor": cursor,
                "stats": stats.to_json(),
            }
            write_json_atomic(opts.out / JOURNAL_NAME, body)

        def on_shard_finished(info: dict) -> None:
            # Runs inside writer.write() of the next shard's first record, before that record
            # (and the skips just before it) is counted: `stats` and `cursor` describe the
            # position right after this shard's last record, where a resumed run must start.
            shards.append(info)
            save_journal()

        # Written before the first shard too, so that a different command is refused even
        # when this one dies early.
        save_journal()
        writer = ShardWriter(
            opts.out,
            prefix=opts.prefix,
            max_samples=opts.max_samples or 2**62,
            max_bytes=opts.shard_bytes,
            vocab=opts.vocab,
            start_index=len(shards),
            on_shard_finished=on_shard_finished,
        )
        pending: list[Unit] = []  # skipped units since the last written record
        bar = tqdm(
            total=source.total(),
            initial=stats.source_images,
            unit="img",
            desc=f"convert {source.kind}",
            disable=_off(opts.progress),
        )
        with writer, bar:
            for unit in source.units(cursor, stats.marks.copy()):
                bar.update()
                if unit.record is None:
                    pending.append(unit)
                    continue
                if isinstance(unit.record, ImageRecord):
                    writer.write(unit.record)
                else:  # a downstream task's record (uniter_fast.data.task_shards)
                    _write_task_record(writer, unit.record)
                for skipped in pending:
                    stats.apply(skipped)
                pending.clear()
                stats.apply(unit)
                cursor = unit.cursor
        for skipped in pending:
            stats.apply(skipped)
        source.final_counts(stats)
        manifest = _manifest(source, opts, identity, stats, shards)
        for line in stats.summary_lines():
            log(line)
        _check_bad_fraction(stats, opts, source)
        write_json_atomic(opts.out / MANIFEST_NAME, manifest)
        (opts.out / JOURNAL_NAME).unlink(missing_ok=True)
        _fsync_dir(opts.out)
        return manifest
    finally:
        source.close()


def _write_task_record(writer: ShardWriter, record) -> None:
    from ..data.task_shards import encode_task_sample, validate_task_record

    shard = writer._name(writer._index)
    validate_task_record(record, shard=shard, num_classes=record.meta.get("num_classes"))
    writer.write_sample(record.key, encode_task_sample(record), pairs=len(record.items))


def _check_bad_fraction(stats: Stats, opts: ConvertOptions, source: Source) -> None:
    problems = []
    for what, bad, seen, counter, tag in (
        ("images", stats.bad_images, stats.source_images, stats.skipped, ""),
        ("captions", stats.bad_captions, stats.captions_seen, stats.left_out, "caption:"),
    ):
        if seen and bad / seen > opts.max_bad_fraction:
            problems.append(
                f"{bad} of {seen} source {what} ({bad / seen:.2%}) are bad, more than "
                f"--max-bad-fraction {opts.max_bad_fraction:g}:"
            )
            policy = POLICY_SKIPS if what == "images" else POLICY_LEFT_OUT
            for reason, count in sorted(counter.items()):
                if reason in policy:
                    continue
                examples = "; ".join(stats.examples.get(tag + reason, []))
                problems.append(f"  {reason}: {count} (e.g. {examples})")
    if stats.images == 0:
        problems.append("no image was written")
    if problems:
        raise ConvertError(
            f"{source.kind} conversion into {opts.out} failed:\n"
            + "\n".join(problems)
            + "\nThe shards written so far and the journal are kept: rerun the same command "
            "with a higher --max-bad-fraction to finish, or --overwrite to start over."
        )


def _manifest(
    source: Source, opts: ConvertOptions, identity: dict, stats: Stats, shards: list[dict]
) -> dict:
    counts = stats.to_json()
    described = source.describe()
    return {
        "format": MANIFEST_FORMAT,
        "source": identity["source"],
        "options": {**identity["options"], "max_bad_fraction": opts.max_bad_fraction},
        "vocab": described.get("vocab", {}),
        "region_selection": {
            **opts.policy.describe(),
            "confidence_source": counts["conf_source"],
        },
        "soft_labels": described.get("soft_labels", "source"),
        "shards": shards,
        "totals": {
            "shards": len(shards),
            "bytes": sum(s["bytes"] for s in shards),
            "source_images": stats.source_images,
            "images": stats.images,
            "pairs": stats.pairs,
            "regions": stats.regions,
            "captions_seen": stats.captions_seen,
            "bad_images": stats.bad_images,
            "bad_captions": stats.bad_captions,
            "skipped_images": counts["skipped"],
            "left_out_captions": counts["left_out_captions"],
        },
        "examples": counts["examples"],
        "histograms": {
            "caption_tokens": _histogram(stats.caption_tokens),
            "regions": _histogram(stats.region_counts),
        },
        "warnings": list(source.warnings),
    }
