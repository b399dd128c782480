"""Reading and writing WebDataset tar shards of UNITER images (one sample per image).

A sample holds the members of `schema.SHARD_FIELDS` under one key (see `schema` for the
layout). This module is the only place that turns bytes into arrays, and it does so by an
allow-list: `.npy` members are read with `allow_pickle=False`, `.json` members with `json`, and a
sample holding any other member (`.pyd`, `.pickle`, `.pth`, ...) is refused before anything in it
is decoded. Nothing here ever unpickles.

    records = [ImageRecord(key="coco_1", feat=..., loc=..., soft=..., captions=[...], meta={...})]
    with ShardWriter("shards/coco", prefix="coco") as writer:
        for record in records:
            writer.write(record)
    for url in list_shards("shards/coco/coco-{000000..000003}.tar"):
        for record in iter_shard(url):
            ...

Bad data raises `ShardFormatError`, which names the shard, the sample key, the member and a short
machine-readable `reason` (one of `REASONS`), so that a pipeline can count what it skips.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import io
import json
import math
import os
import re
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from glob import escape as glob_escape
from glob import glob
from pathlib import Path
from typing import Any

import numpy as np
from braceexpand import braceexpand
from webdataset import TarWriter
from webdataset.gopen import gopen

from .schema import (
    BERT_BASE_CASED,
    IMG_DIM,
    IMG_LABEL_DIM,
    LOC_DIM,
    MAX_CAPTION_TOKENS,
    MAX_REGIONS,
    SHARD_FIELDS,
    Vocab,
)
from .tarstream import SampleDamage, iter_samples

__all__ = [
    "REASONS",
    "ImageRecord",
    "ShardFormatError",
    "ShardWriter",
    "decode_sample",
    "encode_sample",
    "iter_shard",
    "list_shards",
    "shard_name",
    "validate_record",
]

# Machine-readable reasons a sample (or a shard) is rejected; `ShardFormatError.reason` is one.
REASONS = (
    "missing_field",  # a member of SHARD_FIELDS (or __key__) is absent
    "forbidden_member",  # a member outside the allow-list (e.g. .pyd/.pickle): never decoded
    "decode",  # bytes that are not a valid .npy / UTF-8 JSON (object arrays included)
    "type",  # JSON of the wrong structure (captions not a list of lists of ints, meta not a dict)
    "dtype",  # an array of the wrong dtype
    "shape",  # an array of the wrong shape, or region counts that disagree
    "nonfinite",  # NaN or Inf in feat / loc / soft
    "range",  # negative soft-label mass
    "empty_caption",  # no captions, or a caption with no tokens
    "caption_length",  # a caption longer than MAX_CAPTION_TOKENS
    "token_id",  # an id outside [0, vocab.size)
    "special_token",  # [PAD]/[CLS]/[SEP]/[MASK] inside a raw caption (the builders add them)
    "key",  # a sample key WebDataset cannot round-trip (empty, or a '.' in its last component)
    "duplicate_key",  # the same key twice in one shard (WebDataset would merge the samples)
    "tar",  # the tar stream itself is damaged (bad header, truncated)
    "io",  # the shard cannot be opened or read (missing file, failing pipe command)
)

# Keys WebDataset adds to a sample dict; they are strings, not members, and never decoded.
_WDS_META_KEYS = frozenset({"__key__", "__url__", "__local_path__"})
_NPY_FIELDS = ("feat.npy", "loc.npy", "soft.npy")
_TAR_BLOCK = 512
_TAR_RECORD = 20 * _TAR_BLOCK  # tarfile pads a closed archive to a multiple of this
_SHARD_INDEX_DIGITS = 6
# A fixed member mtime makes shards byte-for-byte reproducible (same records => same file).
_MEMBER_MTIME = 0
_URL_RE = re.compile(r"^(pipe:|[A-Za-z][A-Za-z0-9+.\-]*://)")
_GLOB_MAGIC = re.compile(r"[*?\[]")
_TAR_NAME = re.compile(r"\.(tar|tgz|tar\.gz)$")
_GZIP_MAGIC = b"\x1f\x8b"


class ShardFormatError(ValueError):
    """A shard or sample that does not follow the schema.

    Attributes:
        shard: basename of the shard file ("" when unknown).
        key: the sample's `__key__` (None when the error is about the tar stream itself).
        field: the member at fault, e.g. "soft.npy" (None for whole-sample errors).
        reason: one of `REASONS`, for counting skips by cause.
        detail: the human-readable rest of the message.
    """

    def __init__(
        self, shard: str, key: str | None, field: str | None, reason: str, detail: str
    ) -> None:
        self.shard = shard
        self.key = key
        self.field = field
        self.reason = reason
        self.detail = detail
        where = shard or "<no shard>"
        if key is not None:
            where += f": sample {key!r}"
        what = f"{field} {detail}" if field else detail
        super().__init__(f"{where}: {what}")

    def __reduce__(self):  # keep the attributes when the error crosses a worker process
        return (type(self), (self.shard, self.key, self.field, self.reason, self.detail))


@dataclass(eq=False)
class ImageRecord:
    """One image and its captions, as stored in one shard sample.

    key: the sample key (unique within a shard; no '.' in its last '/'-component).
    feat: float16 [n, 2048] detector region features.
    loc: float32 [n, 7] boxes `[x1, y1, x2, y2, w, h, w*h]` normalised by the image size.
    soft: float16 [n, 1601] detector class distribution per region (0 = background).
    captions: int32 [len] arrays of WordPiece ids, each without [CLS]/[SEP], 1..60 tokens.
    meta: JSON-serialisable dict (`image_id`, `dataset`, `width`, `height`, ...).
    shard: basename of the shard the record was read from ("" for records not read from one).

    Records produced by `decode_sample` (and by the synthetic generator) hold read-only arrays:
    one image feeds several (caption, image) examples that share these arrays without copies,
    so an in-place edit would silently corrupt the others.
    """

    key: str
    feat: np.ndarray
    loc: np.ndarray
    soft: np.ndarray
    captions: list[np.ndarray]
    meta: dict
    shard: str = ""

    @property
    def num_regions(self) -> int:
        return int(self.feat.shape[0])


# --------------------------------------------------------------------------------------------
# Validation


def validate_record(
    record: ImageRecord,
    *,
    shard: str | None = None,
    vocab: Vocab = BERT_BASE_CASED,
    img_dim: int = IMG_DIM,
    label_dim: int = IMG_LABEL_DIM,
) -> None:
    """Check a record against the schema; raise `ShardFormatError` naming the first problem.

    The region count n must be in [1, MAX_REGIONS]. Converters keep at least MIN_REGIONS (10)
    regions per image, but that is a selection policy, not a format rule: a reader accepts a
    valid image with fewer regions rather than dropping it.

    shard: the shard named in errors (default: `record.shard`).
    """
    shard = record.shard if shard is None else shard
    key = record.key

    def fail(member: str | None, reason: str, detail: str) -> ShardFormatError:
        return ShardFormatError(shard, key, member, reason, detail)

    _check_key(key, shard)
    n = None
    for member, value, dtype, width in (
        ("feat.npy", record.feat, np.float16, img_dim),
        ("loc.npy", record.loc, np.float32, LOC_DIM),
        ("soft.npy", record.soft, np.float16, label_dim),
    ):
        if not isinstance(value, np.ndarray):
            raise fail(member, "type", f"is a {type(value).__name__}, expected a numpy array")
        if value.dtype != dtype:
            raise fail(member, "dtype", f"has dtype {value.dtype}, expected {np.dtype(dtype)}")
        if n is None:
            if value.ndim != 2 or value.shape[1] != width:
                raise fail(member, "shape", f"has shape {value.shape}, expected (n, {width})")
            n = value.shape[0]
            if not 1 <= n <= MAX_REGIONS:
                raise fail(
                    member, "shape", f"has {n} regions, expected between 1 and {MAX_REGIONS}"
                )
        elif value.shape != (n, width):
            raise fail(member, "shape", f"has shape {value.shape}, expected ({n}, {width})")
        nonfinite = _nonfinite(value)
        if nonfinite.any():
            raise fail(member, "nonfinite", f"has {int(nonfinite.sum())} NaN/Inf values")
    if _negative(record.soft).any():
        raise fail("soft.npy", "range", f"has negative probabilities (min {record.soft.min()})")

    captions = record.captions
    if not isinstance(captions, list):
        raise fail("captions.json", "type", f"is a {type(captions).__name__}, expected a list")
    if not captions:
        raise fail("captions.json", "empty_caption", "holds no captions")
    specials = _special_table(vocab)
    for i, caption in enumerate(captions):
        if not isinstance(caption, np.ndarray):
            raise fail(
                "captions.json",
                "type",
                f"caption {i} is a {type(caption).__name__}, expected an int32 array",
            )
        if caption.dtype != np.int32 or caption.ndim != 1:
            raise fail(
                "captions.json",
                "dtype",
                f"caption {i} has dtype {caption.dtype} and shape {caption.shape}, "
                "expected int32 (len,)",
            )
        if caption.size == 0:
            raise fail("captions.json", "empty_caption", f"caption {i} has no tokens")
        if caption.size > MAX_CAPTION_TOKENS:
            raise fail(
                "captions.json",
                "caption_length",
                f"caption {i} has {caption.size} tokens, at most {MAX_CAPTION_TOKENS} allowed",
            )
        outside = (caption < 0) | (caption >= vocab.size)
        if outside.any():
            raise fail(
                "captions.json",
                "token_id",
                f"caption {i} has token id {int(caption[outside][0])} outside [0, {vocab.size})",
            )
        special = specials[caption]  # ids are in range here (checked just above)
        if special.any():
            raise fail(
                "captions.json",
                "special_token",
                f"caption {i} holds special token id {int(caption[special][0])}; raw captions "
                "carry no [PAD]/[CLS]/[SEP]/[MASK] (the task builders add them)",
            )
    if not isinstance(record.meta, dict):
        raise fail("meta.json", "type", f"is a {type(record.meta).__name__}, expected an object")


@functools.lru_cache(maxsize=8)
def _special_table(vocab: Vocab) -> np.ndarray:
    # A lookup table: np.isin costs ~20 us per (short) caption, a gather well under 1 us.
    table = np.zeros(vocab.size, dtype=bool)
    table[[vocab.pad_id, vocab.cls_id, vocab.sep_id, vocab.mask_id]] = True
    table.flags.writeable = False
    return table


def _nonfinite(a: np.ndarray) -> np.ndarray:
    # float16 has no native arithmetic in NumPy: test the exponent bits instead (20x faster than
    # np.isfinite on the features and soft labels every sample carries).
    if a.dtype == np.float16:
        return (a.view(np.uint16) & 0x7C00) == 0x7C00
    return ~np.isfinite(a)


def _negative(a: np.ndarray) -> np.ndarray:
    if a.dtype == np.float16:  # sign bit set, -0.0 (0x8000) excepted; NaNs are caught before
        return a.view(np.uint16) > 0x8000
    return a < 0


def _check_key(key: Any, shard: str) -> None:
    # WebDataset splits a member name at the first '.' of its last path component, so such a
    # dot would move part of the key into the field name and break the sample apart.
    if not isinstance(key, str) or not key or key.endswith("/"):
        raise ShardFormatError(shard, str(key), "__key__", "key", "must be a non-empty string")
    if "." in key.rsplit("/", 1)[-1]:
        raise ShardFormatError(
            shard,
            key,
            "__key__",
            "key",
            "must not hold a '.' in its last '/'-component (WebDataset would split the sample)",
        )


# --------------------------------------------------------------------------------------------
# Encoding and decoding one sample


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _json_bytes(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def encode_sample(record: ImageRecord) -> dict[str, bytes | str]:
    """The WebDataset sample of a record: `__key__` plus the members of SHARD_FIELDS as bytes.

    Arrays are written as they are (no casts): `ShardWriter.write` validates the record first.
    """
    return {
        "__key__": record.key,
        "feat.npy": _npy_bytes(record.feat),
        "loc.npy": _npy_bytes(record.loc),
        "soft.npy": _npy_bytes(record.soft),
        "captions.json": _json_bytes({"input_ids": [c.tolist() for c in record.captions]}),
        "meta.json": _json_bytes(record.meta),
    }


def decode_sample(
    raw: dict,
    *,
    shard: str,
    vocab: Vocab = BERT_BASE_CASED,
    img_dim: int = IMG_DIM,
    label_dim: int = IMG_LABEL_DIM,
) -> ImageRecord:
    """Decode and validate one WebDataset sample dict (member suffix -> bytes).

    Allow-list: only the members of SHARD_FIELDS are decoded, `.npy` through NumPy's own .npy
    reader with `allow_pickle=False` (so object arrays and pickles are refused) and `.json`
    through `json`. A sample with any other member is refused before anything is decoded.
    WebDataset's own keys (`__key__`, `__url__`, `__local_path__`) are accepted and ignored.

    Returns an `ImageRecord` with read-only arrays; raises `ShardFormatError` otherwise.
    """
    if not isinstance(raw, dict):
        raise TypeError(f"decode_sample expects a dict of members, got {type(raw).__name__}")
    key = raw.get("__key__")
    if key is None:
        raise ShardFormatError(shard, None, "__key__", "missing_field", "is missing")
    key = str(key)
    for member in raw:
        if member in _WDS_META_KEYS or member in SHARD_FIELDS:
            continue
        raise ShardFormatError(
            shard,
            key,
            str(member),
            "forbidden_member",
            f"is not an allowed member (allowed: {', '.join(SHARD_FIELDS)}); refused undecoded",
        )
    missing = [m for m in SHARD_FIELDS if m not in raw]
    if missing:
        raise ShardFormatError(
            shard, key, missing[0], "missing_field", f"is missing (missing: {', '.join(missing)})"
        )
    for member in SHARD_FIELDS:
        if not isinstance(raw[member], (bytes, bytearray, memoryview)):
            raise TypeError(
                f"{shard}: sample {key!r}: {member} is a {type(raw[member]).__name__}; "
                "decode_sample takes the raw member bytes (no upstream decoder)"
            )

    arrays = {m: _load_npy(raw[m], shard, key, m) for m in _NPY_FIELDS}
    captions_obj = _load_json(raw["captions.json"], shard, key, "captions.json")
    meta = _load_json(raw["meta.json"], shard, key, "meta.json")
    record = ImageRecord(
        key=key,
        feat=arrays["feat.npy"],
        loc=arrays["loc.npy"],
        soft=arrays["soft.npy"],
        captions=_parse_captions(captions_obj, shard, key),
        meta=meta,
        shard=shard,
    )
    validate_record(record, vocab=vocab, img_dim=img_dim, label_dim=label_dim)
    return record


# The header `np.save` writes for a plain C-order array of a simple dtype. Members written that
# way (all of ours) are read without a copy; anything else goes through NumPy's own reader.
_NPY_FAST_HEADER = re.compile(
    rb"\{'descr': '(<f2|<f4|<f8|<i4|<i8|\|b1)', 'fortran_order': False, "
    rb"'shape': \(((?:\d+, ?)*\d*)\), \} *\n"
)


def _load_npy_fast(data: bytes) -> np.ndarray | None:
    if not isinstance(data, bytes) or data[:6] != b"\x93NUMPY" or len(data) < 10:
        return None
    if data[6] == 1:
        start, size = 10, int.from_bytes(data[8:10], "little")
    elif data[6] in (2, 3):
        start, size = 12, int.from_bytes(data[8:12], "little")
    else:
        return None
    match = _NPY_FAST_HEADER.fullmatch(data, start, start + size)
    if match is None:
        return None
    dtype = np.dtype(match.group(1).decode())
    shape = tuple(int(x) for x in match.group(2).split(b",") if x.strip())
    count = math.prod(shape)
    if len(data) - (start + size) != count * dtype.itemsize:
        return None  # let NumPy's reader say what is wrong
    # A view on the immutable bytes: read-only, no copy.
    return np.frombuffer(data, dtype=dtype, count=count, offset=start + size).reshape(shape)


def _load_npy(data: bytes, shard: str, key: str, member: str) -> np.ndarray:
    fast = _load_npy_fast(data)
    if fast is not None:
        return fast
    # `read_array` parses exactly one .npy payload: unlike `np.load` it never dispatches to the
    # .npz or pickle readers whatever the leading bytes are.
    try:
        array = np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)
    except ValueError as e:  # object arrays end up here: they would need pickle
        raise ShardFormatError(
            shard, key, member, "decode", f"is not a plain .npy array ({e})"
        ) from None
    except Exception as e:  # truncated or garbled payloads raise assorted errors
        raise ShardFormatError(
            shard, key, member, "decode", f"is not a valid .npy ({type(e).__name__}: {e})"
        ) from None
    array = np.ascontiguousarray(array)
    array.flags.writeable = False
    return array


def _load_json(data: bytes, shard: str, key: str, member: str) -> Any:
    try:
        return json.loads(bytes(data).decode("utf-8"))
    except (ValueError, RecursionError) as e:
        # ValueError covers bad UTF-8 and JSON, and integers past Python's digit limit;
        # RecursionError, absurdly deep nesting.
        raise ShardFormatError(
            shard, key, member, "decode", f"is not valid UTF-8 JSON ({type(e).__name__}: {e})"
        ) from None


def _parse_captions(obj: Any, shard: str, key: str) -> list[np.ndarray]:
    def fail(reason: str, detail: str) -> ShardFormatError:
        return ShardFormatError(shard, key, "captions.json", reason, detail)

    if not isinstance(obj, dict) or "input_ids" not in obj:
        raise fail("type", 'must be an object with an "input_ids" list')
    ids = obj["input_ids"]
    if not isinstance(ids, list):
        raise fail("type", f'"input_ids" is a {type(ids).__name__}, expected a list of lists')
    captions = []
    for i, caption in enumerate(ids):
        # bool is an int subclass in Python; JSON true/false are not token ids.
        if not isinstance(caption, list) or not all(type(t) is int for t in caption):
            raise fail("type", f"caption {i} is not a list of integers")
        try:
            ids_i = np.asarray(caption, dtype=np.int64) if caption else np.zeros(0, np.int64)
        except OverflowError:
            raise fail("token_id", f"caption {i} has a token id outside the int64 range") from None
        # Range-check before the int32 cast so that a huge id cannot wrap around into range.
        if ids_i.size and (ids_i.min() < 0 or ids_i.max() > np.iinfo(np.int32).max):
            bad = int(ids_i[(ids_i < 0) | (ids_i > np.iinfo(np.int32).max)][0])
            raise fail("token_id", f"caption {i} has token id {bad} outside the int32 range")
        ids_i = ids_i.astype(np.int32)
        ids_i.flags.writeable = False
        captions.append(ids_i)
    return captions


# --------------------------------------------------------------------------------------------
# Writing shards


def _tar_member_bytes(name: str, size: int) -> int:
    blocks = 1 + math.ceil(size / _TAR_BLOCK)
    if len(name.encode()) > 100:  # PAX extended header (its own header + one data block)
        blocks += 2
    return blocks * _TAR_BLOCK


def _archive_bytes(member_bytes: int) -> int:
    # Two zero blocks end the archive; tarfile then pads the file to a whole record.
    return math.ceil((member_bytes + 2 * _TAR_BLOCK) / _TAR_RECORD) * _TAR_RECORD


class ShardWriter:
    """Write `ImageRecord`s into `{prefix}-{index:06d}.tar` shards under `out_dir`.

    A shard is rolled over when it holds `max_samples` samples or when the next sample would
    make the file larger than `max_bytes` (the size is computed exactly, tar padding included; a
    single sample larger than `max_bytes` gets a shard of its own). Each shard is written under
    a hidden temporary name in `out_dir` and renamed into place (after an fsync) only once it is
    whole, so a crash never leaves a partial `.tar` under a final name. On an exception inside
    the `with` block the unfinished shard is deleted and the exception propagates; the shards
    finished before it stay.

    Records are validated (`validate_record`) before they are written.

    overwrite: existing `{prefix}-NNNNNN.tar` files in `out_dir` raise FileExistsError unless
        this is set, in which case they are deleted up front (so that a smaller rewrite never
        leaves stale shards of an older run beside the new ones).
    vocab: the vocabulary captions are checked against.
    start_index: the index of the first shard written (resuming a conversion). Shards below it
        are left alone (they belong to the run being resumed); only those at or above it count
        as existing for `overwrite`.
    on_shard_finished: called with the shard's entry of `finished` right after each shard is
        renamed into place (a converter journals its progress there).

    `finished` lists one dict per finished shard: `name`, `samples`, `pairs` (captions),
    `bytes`, `sha256` (of the file, computed while writing), `first_key`, `last_key`.
    """

    class _HashingSink:
        """A write-only file wrapper that hashes what goes through (no second read of a shard)."""

        def __init__(self, file, digest) -> None:
            self._file = file
            self._digest = digest

        def write(self, data) -> int:
            self._digest.update(data)
            return self._file.write(data)

    def __init__(
        self,
        out_dir: str | os.PathLike,
        *,
        prefix: str = "shard",
        max_samples: int = 1000,
        max_bytes: int = 256 * 2**20,
        overwrite: bool = False,
        vocab: Vocab = BERT_BASE_CASED,
        start_index: int = 0,
        on_shard_finished: Callable[[dict], None] | None = None,
    ) -> None:
        if not prefix or "/" in prefix or os.sep in prefix or prefix.startswith("."):
            raise ValueError(f"ShardWriter prefix must be a plain file-name stem, got {prefix!r}")
        if max_samples < 1:
            raise ValueError(f"ShardWriter max_samples must be >= 1, got {max_samples}")
        if max_bytes < 1:
            raise ValueError(f"ShardWriter max_bytes must be >= 1, got {max_bytes}")
        if start_index < 0:
            raise ValueError(f"ShardWriter start_index must be >= 0, got {start_index}")
        self.out_dir = Path(out_dir)
        self.prefix = prefix
        self.max_samples = int(max_samples)
        self.max_bytes = int(max_bytes)
        self.vocab = vocab
        self.out_dir.mkdir(parents=True, exist_ok=True)
        existing = sorted(self.out_dir.glob(glob_escape(prefix) + "-" + "[0-9]" * 6 + ".tar"))
        existing = [p for p in existing if int(p.stem.rsplit("-", 1)[1]) >= start_index]
        if existing and not overwrite:
            raise FileExistsError(
                f"{self.out_dir} already holds {len(existing)} shard(s) named {prefix}-*.tar "
                f"(e.g. {existing[0].name}); pass overwrite=True to replace them"
            )
        for path in existing:
            path.unlink()

        self._paths: list[Path] = []
        self._index = int(start_index)
        self._on_shard_finished = on_shard_finished
        self.finished: list[dict] = []
        self._digest = None
        self._pairs = 0
        self._first_key: str | None = None
        self._last_key: str | None = None
        self._file: io.BufferedWriter | None = None
        self._tar: TarWriter | None = None
        self._tmp: Path | None = None
        self._count = 0
        self._bytes = 0
        self._keys: set[str] = set()
        self._closed = False
        self.num_samples = 0  # samples in finished shards

    @property
    def paths(self) -> list[Path]:
        """The finished shards, in the order they were written."""
        return list(self._paths)

    def _name(self, index: int) -> str:
        return f"{self.prefix}-{index:0{_SHARD_INDEX_DIGITS}d}.tar"

    def write(self, record: ImageRecord) -> None:
        """Validate `record` and append it to the current shard (rolling over first if full)."""
        if self._closed:
            raise ValueError("ShardWriter.write on a closed writer")
        if not isinstance(record, ImageRecord):
            raise TypeError(f"ShardWriter.write takes an ImageRecord, got {type(record).__name__}")
        # Errors name the shard the record is headed for (the next one if this one is full).
        index = self._index + (self._tar is not None and self._count >= self.max_samples)
        validate_record(record, shard=self._name(index), vocab=self.vocab)
        self.write_sample(record.key, encode_sample(record), pairs=len(record.captions))

    def write_sample(self, key: str, sample: dict[str, bytes | str], *, pairs: int) -> None:
        """Append an encoded sample (`{"__key__": key, member: bytes, ...}`, validated by the
        caller) to the current shard, rolling over first if full. `pairs`: the examples it holds
        (captions; a task shard's questions), for the shard's entry in `finished`."""
        if self._closed:
            raise ValueError("ShardWriter.write_sample on a closed writer")
        members = [m for m in sample if m != "__key__"]
        size = sum(_tar_member_bytes(f"{key}.{m}", len(sample[m])) for m in members)
        if self._tar is not None and (
            self._count >= self.max_samples or _archive_bytes(self._bytes + size) > self.max_bytes
        ):
            self._finish()
        if key in self._keys:
            raise ShardFormatError(
                self._name(self._index),
                key,
                "__key__",
                "duplicate_key",
                "appears twice in one shard",
            )
        if self._tar is None:
            self._open()
        try:
            self._tar.write(sample)
        except BaseException:
            # The shard may now be torn: drop it and refuse further writes, so that the records
            # already in it are not silently lost behind a shard that looks complete.
            self.abort()
            raise
        self._keys.add(key)
        self._count += 1
        self._bytes += size
        self._pairs += pairs
        if self._first_key is None:
            self._first_key = key
        self._last_key = key

    def _open(self) -> None:
        final = self._name(self._index)
        # A hidden name that matches no '*.tar' pattern: readers never pick it up.
        self._tmp = self.out_dir / f".{final}.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial"
        self._file = open(self._tmp, "xb")  # closed in _finish / _abort
        import hashlib

        self._digest = hashlib.sha256()
        sink = ShardWriter._HashingSink(self._file, self._digest)
        # encoder=False: members go in as the bytes we made (never through a pickle encoder).
        self._tar = TarWriter(sink, encoder=False, mtime=_MEMBER_MTIME, format="PAX_FORMAT")

    def _finish(self) -> None:
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        final = self.out_dir / self._name(self._index)
        os.replace(self._tmp, final)
        self._paths.append(final)
        self.num_samples += self._count
        info = {
            "name": final.name,
            "samples": self._count,
            "pairs": self._pairs,
            "bytes": final.stat().st_size,
            "sha256": self._digest.hexdigest(),
            "first_key": self._first_key,
            "last_key": self._last_key,
        }
        self.finished.append(info)
        self._tar = self._file = self._tmp = self._digest = None
        self._index += 1
        self._count = 0
        self._bytes = 0
        self._keys = set()
        self._pairs = 0
        self._first_key = self._last_key = None
        if self._on_shard_finished is not None:
            self._on_shard_finished(dict(info))

    def _abort(self) -> None:
        tmp = self._tmp
        try:
            if self._tar is not None:
                # The shard is discarded and the original error is on its way up: a second
                # error while flushing the doomed tar (disk full, closed file) adds nothing.
                with contextlib.suppress(Exception):
                    self._tar.close()
            if self._file is not None:
                self._file.close()
        finally:
            self._tar = self._file = self._tmp = self._digest = None
            self._count = 0
            self._bytes = 0
            self._keys = set()
            self._pairs = 0
            self._first_key = self._last_key = None
            if tmp is not None:
                tmp.unlink(missing_ok=True)

    def close(self) -> None:
        """Finish the current shard (if it holds any sample). Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._tar is not None:
            try:
                self._finish()
            except BaseException:
                self._abort()
                raise

    def abort(self) -> None:
        """Drop the unfinished shard (finished shards stay) and close the writer."""
        self._closed = True
        self._abort()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


# --------------------------------------------------------------------------------------------
# Listing and reading shards


def _is_url(pattern: str) -> bool:
    return bool(_URL_RE.match(pattern))


def list_shards(patterns: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Expand shard patterns into a sorted, deduplicated list of shard paths.

    Each pattern may be a brace pattern (`data/shard-{000000..000009}.tar`), a glob
    (`data/*/shard-*.tar`), a directory (all `*.tar` directly inside it) or a file; a pattern
    may combine braces with the others. URLs (`pipe:...`, `scheme://...`) are brace-expanded but
    not checked; they follow the local paths, in the order given.

    Raises FileNotFoundError naming the pattern when a pattern, or one of its brace expansions,
    matches nothing (a missing shard in an explicit range is an error, not a silent gap).
    """
    if isinstance(patterns, (str, os.PathLike)):
        patterns = [patterns]
    patterns = [os.fspath(p) for p in patterns]
    if not patterns:
        raise ValueError("no shard patterns given")
    local: set[str] = set()
    remote: list[str] = []
    for pattern in patterns:
        if not pattern:
            raise ValueError("empty shard pattern")
        if _is_url(pattern):
            remote.extend(u for u in braceexpand(pattern) if u not in remote)
            continue
        for item in braceexpand(pattern):
            item = os.path.expanduser(item)
            if os.path.isdir(item):
                found = [p for p in glob(os.path.join(glob_escape(item), "*.tar"))]
                found = [p for p in found if os.path.isfile(p)]
                what = f"no *.tar files in directory {item!r}"
            elif _GLOB_MAGIC.search(item):
                found = [p for p in glob(item) if os.path.isfile(p)]
                what = f"no files match {item!r}"
            elif os.path.isfile(item):
                found = [item]
            else:
                found = []
                what = f"no such shard {item!r}"
            if not found:
                source = "" if item == pattern else f" (from pattern {pattern!r})"
                raise FileNotFoundError(f"{what}{source}")
            local.update(os.path.normpath(p) for p in found)
    return sorted(local) + remote


class _Prefixed:
    """A read-only stream with `head` put back in front of it."""

    def __init__(self, head: bytes, stream) -> None:
        self.head, self.stream = head, stream

    def read(self, n: int = -1) -> bytes:
        if self.head:
            if n < 0:
                data, self.head = self.head + self.stream.read(), b""
                return data
            data, self.head = self.head[:n], self.head[n:]
            return data if len(data) == n else data + self.stream.read(n - len(data))
        return self.stream.read(n)

    def seekable(self) -> bool:
        return False


def _maybe_gunzip(stream):
    # WebDataset reads .tar.gz / .tgz shards transparently; so do we (by content, not name).
    head = stream.read(2)
    try:
        seekable = stream.seekable()
    except (AttributeError, OSError):
        seekable = False
    if seekable:
        stream.seek(0)  # keep the file itself: skipping samples then seeks over them
        rest = stream
    else:
        rest = _Prefixed(head, stream)
    return gzip.GzipFile(fileobj=rest, mode="rb") if head == _GZIP_MAGIC else rest


def shard_name(url: str) -> str:
    """The basename a shard is known by in errors and records (`pipe:` commands included)."""
    url = str(url)
    if url.startswith("pipe:"):
        # The shard is the command's argument that names a tar (`pipe:aws s3 cp s3://b/x.tar -`
        # ends with "-"); failing that, its last word.
        words = [w.split("?", 1)[0] for w in url[5:].split()]
        tars = [w for w in words if _TAR_NAME.search(w)]
        url = tars[-1] if tars else (words[-1] if words else url)
    elif _is_url(url):
        url = url.split("?", 1)[0].split("#", 1)[0]
    return url.rstrip("/").rsplit("/", 1)[-1]


def iter_shard(
    url: str,
    *,
    vocab: Vocab = BERT_BASE_CASED,
    on_bad: Callable[[ShardFormatError], None] | None = None,
    skip: int = 0,
    positions: bool = False,
    decode: Callable[..., Any] | None = None,
) -> Iterator[ImageRecord] | Iterator[tuple[int, ImageRecord]]:
    """Yield the validated records of one shard, in file order; `record.shard` is its basename.

    Reads the tar stream with `tarstream.iter_samples` (local files and `pipe:` URLs, opened
    with WebDataset's `gopen`), which sees damaged headers and truncation instead of taking
    them for the end of the archive, then decodes each sample with `decode_sample`.

    on_bad: None (default) raises the first problem as `ShardFormatError`. Otherwise each bad
        sample is passed to `on_bad` and skipped, and reading goes on: a damaged header costs
        the samples it touches, a truncated stream ends the shard (reason "tar"), a sample
        whose key was seen before in the shard is skipped as "duplicate_key", and a shard that
        cannot be opened at all is reported once with reason "io". Only `ShardFormatError`
        (bad data) is handled this way; any other exception (a bug) propagates.
    skip: sample groups to pass over unread first (resuming inside a shard).
    positions: yield `(index, record)`, where index is the sample's ordinal in the shard
        (the `skip` that resumes right after it is index + 1).
    decode: `decode(members, shard=name)` -> record, for shards of another layout (the
        downstream tasks' `uniter_fast.data.task_shards`); default `decode_sample`.
    """
    name = shard_name(url)
    url = os.fspath(url)

    def bad(err: ShardFormatError) -> None:
        if on_bad is None:
            raise err
        on_bad(err)

    try:
        # We open (and close) the stream ourselves: WebDataset's url_opener leaves files to
        # the garbage collector, which a loader going through thousands of shards should not.
        stream = gopen(url, "rb")
    except OSError as e:
        # list_shards checked the files at start-up: one that has gone since is bad data.
        if on_bad is None:
            raise
        bad(ShardFormatError(name, None, None, "io", f"cannot be opened: {e}"))
        return
    finished = False
    # Damage met right after the last good sample, not yet blamed on a lost sample: if the next
    # sample decodes too, the damage cost no sample and is counted on its own.
    pending: str | None = None
    last_key = None
    # The stream's last word when it ends without the end-of-archive blocks. A pipe whose
    # command failed ends that way too, and then the failure (io) is the one thing to count,
    # which is known only once the pipe is closed.
    held: ShardFormatError | None = None

    def flush() -> None:
        nonlocal pending
        if pending is not None:
            bad(ShardFormatError(name, None, None, "tar", f"{pending} (after {last_key!r})"))
            pending = None

    try:
        for item in iter_samples(_maybe_gunzip(stream), skip=skip):
            if isinstance(item, SampleDamage):
                flush()
                if item.key is None:
                    where = "at the start" if last_key is None else f"after sample {last_key!r}"
                    err = ShardFormatError(name, None, None, "tar", f"{item.detail} ({where})")
                    if item.fatal:
                        held = err
                    else:
                        bad(err)
                else:
                    bad(ShardFormatError(name, item.key, None, item.reason, item.detail))
                continue
            try:
                reserved = [m for m in item.members if m in _WDS_META_KEYS]
                if reserved:
                    # A member named like WebDataset's own keys would replace the sample's key.
                    raise ShardFormatError(
                        name, item.key, reserved[0], "forbidden_member", "is a reserved name"
                    )
                members = {**item.members, "__key__": item.key}
                if decode is None:
                    record = decode_sample(members, shard=name, vocab=vocab)
                else:
                    record = decode(members, shard=name)
            except ShardFormatError as err:
                damage = item.damage_before or item.damage_after
                if damage is not None and err.reason == "missing_field":
                    # Members lost to the damage: the sample was lost to it, not mis-written.
                    err = ShardFormatError(name, item.key, err.field, "tar", f"lost to {damage}")
                    if pending == item.damage_before:
                        pending = None
                flush()
                bad(err)
                continue
            flush()
            last_key = item.key
            pending = item.damage_after
            yield (item.index, record) if positions else record
        if pending is not None:
            held = ShardFormatError(name, None, None, "tar", f"{pending} (after {last_key!r})")
        finished = True
    except OSError as e:
        # A pipe whose command fails, or a file that goes away mid-read.
        bad(ShardFormatError(name, None, None, "io", f"read failed: {e}"))
    finally:
        try:
            # WebDataset's pipes raise here when the command exited with an error.
            stream.close()
        except OSError as e:
            # Closed early (the reader stopped, or an error is on its way): the command's
            # complaint about a closed pipe is expected, not news.
            if finished:
                bad(ShardFormatError(name, None, None, "io", f"{e}"))
        else:
            if finished and held is not None:
                bad(held)
