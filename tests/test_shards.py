"""Shard writing, listing, reading and the allow-list decoder (uniter_fast/data/shards.py)."""

from __future__ import annotations

import copy
import io
import json
import os
import pickle
import tarfile

import numpy as np
import pytest

from uniter_fast.data.schema import IMG_DIM, IMG_LABEL_DIM, MAX_CAPTION_TOKENS, SHARD_FIELDS
from uniter_fast.data.shards import (
    REASONS,
    ImageRecord,
    ShardFormatError,
    ShardWriter,
    decode_sample,
    encode_sample,
    iter_shard,
    list_shards,
    shard_name,
    validate_record,
)

SHARD = "shard-000003.tar"
KEY = "coco_123"


def make_record(key: str = KEY, n: int = 12, seed: int = 0, num_captions: int = 3) -> ImageRecord:
    rng = np.random.default_rng(seed)
    soft = rng.random((n, IMG_LABEL_DIM)).astype(np.float32)
    soft /= soft.sum(axis=1, keepdims=True)
    xy = np.sort(rng.random((n, 2, 2)), axis=1)
    wh = xy[:, 1] - xy[:, 0]
    loc = np.concatenate([xy[:, 0], xy[:, 1], wh, wh[:, :1] * wh[:, 1:]], axis=1)
    captions = [
        rng.integers(999, 28996, size=int(rng.integers(1, MAX_CAPTION_TOKENS + 1))).astype(np.int32)
        for _ in range(num_captions)
    ]
    return ImageRecord(
        key=key,
        feat=rng.standard_normal((n, IMG_DIM)).astype(np.float16),
        loc=loc.astype(np.float32),
        soft=soft.astype(np.float16),
        captions=captions,
        meta={"image_id": key, "dataset": "test", "width": 640, "height": 480, "note": "é"},
    )


def npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=array.dtype == object)
    return buf.getvalue()


def raw_sample(record: ImageRecord | None = None) -> dict:
    raw = encode_sample(record or make_record())
    return {k: v.encode() if isinstance(v, str) and k != "__key__" else v for k, v in raw.items()}


def write_tar(path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def assert_same_record(a: ImageRecord, b: ImageRecord) -> None:
    assert a.key == b.key
    for name in ("feat", "loc", "soft"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes(), name
    assert len(a.captions) == len(b.captions)
    for x, y in zip(a.captions, b.captions, strict=True):
        assert x.dtype == y.dtype == np.int32 and np.array_equal(x, y)
    assert a.meta == b.meta


# ---------------------------------------------------------------------------------------------
# Round trip and the writer


def test_round_trip_multiple_shards_bit_exact(tmp_path):
    records = [make_record(f"img_{i}", n=1 + 13 * i, seed=i) for i in range(7)]
    with ShardWriter(tmp_path, prefix="shard", max_samples=3) as writer:
        for record in records:
            writer.write(record)
    assert [p.name for p in writer.paths] == [f"shard-00000{i}.tar" for i in range(3)]
    assert writer.num_samples == 7
    urls = list_shards(str(tmp_path))
    assert urls == sorted(urls) and [os.path.basename(u) for u in urls] == [
        p.name for p in writer.paths
    ]
    read = [r for url in urls for r in iter_shard(url)]
    assert [r.shard for r in read] == ["shard-000000.tar"] * 3 + ["shard-000001.tar"] * 3 + [
        "shard-000002.tar"
    ]
    for a, b in zip(records, read, strict=True):
        assert_same_record(a, b)
    # Shared between the pairs of one image: read-only, so an in-place edit fails loudly.
    with pytest.raises(ValueError):
        read[0].feat[0, 0] = 1
    assert read[3].num_regions == 1 + 13 * 3


def test_writer_rolls_over_by_bytes(tmp_path):
    records = [make_record(f"img_{i}", n=20, seed=i) for i in range(5)]
    one = sum(len(v) for k, v in encode_sample(records[0]).items() if k != "__key__")
    max_bytes = int(2.5 * one) + 20 * 512
    with ShardWriter(tmp_path, max_bytes=max_bytes) as writer:
        for record in records:
            writer.write(record)
    assert len(writer.paths) == 3
    assert all(p.stat().st_size <= max_bytes for p in writer.paths)
    assert [r.key for p in writer.paths for r in iter_shard(str(p))] == [r.key for r in records]


def test_writer_exception_leaves_only_finished_shards(tmp_path):
    records = [make_record(f"img_{i}", seed=i) for i in range(3)]
    with pytest.raises(RuntimeError, match="boom"):
        with ShardWriter(tmp_path, max_samples=2) as writer:
            for record in records:
                writer.write(record)
            # The third record sits in an unfinished shard under a temporary, non-.tar name.
            names = sorted(os.listdir(tmp_path))
            assert len(names) == 2 and names[1] == "shard-000000.tar"
            assert names[0].startswith(".shard-000001.tar.") and not names[0].endswith(".tar")
            assert [os.path.basename(u) for u in list_shards(str(tmp_path))] == [names[1]]
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == ["shard-000000.tar"]
    assert [r.key for r in iter_shard(str(tmp_path / "shard-000000.tar"))] == ["img_0", "img_1"]


def test_writer_io_error_drops_the_torn_shard(tmp_path, monkeypatch):
    from webdataset import TarWriter

    real_write = TarWriter.write
    calls = []

    def failing_write(self, obj):
        calls.append(obj["__key__"])
        if len(calls) == 4:
            raise OSError(28, "No space left on device")
        return real_write(self, obj)

    monkeypatch.setattr(TarWriter, "write", failing_write)
    writer = ShardWriter(tmp_path, max_samples=2)
    for i in range(3):
        writer.write(make_record(f"img_{i}", seed=i))
    with pytest.raises(OSError, match="No space"):
        writer.write(make_record("img_3"))
    # img_2 sat in the torn shard: it is gone with it, and the writer refuses to go on.
    assert os.listdir(tmp_path) == ["shard-000000.tar"]
    with pytest.raises(ValueError, match="closed"):
        writer.write(make_record("img_4"))
    writer.close()
    assert writer.paths == [tmp_path / "shard-000000.tar"]


def test_writer_validates_before_writing(tmp_path):
    bad = make_record("bad")
    bad.loc = bad.loc.astype(np.float16)
    with ShardWriter(tmp_path, prefix="out") as writer:
        writer.write(make_record("good"))
        with pytest.raises(ShardFormatError) as info:
            writer.write(bad)
        assert (info.value.shard, info.value.key, info.value.field, info.value.reason) == (
            "out-000000.tar",
            "bad",
            "loc.npy",
            "dtype",
        )
        with pytest.raises(ShardFormatError, match="twice") as info:
            writer.write(make_record("good"))
        assert info.value.reason == "duplicate_key"
        with pytest.raises(ShardFormatError) as info:
            writer.write(make_record("coco.jpg"))
        assert info.value.reason == "key"
    assert [r.key for r in iter_shard(str(writer.paths[0]))] == ["good"]


def test_writer_refuses_to_mix_with_existing_shards(tmp_path):
    with ShardWriter(tmp_path, max_samples=1) as writer:
        for i in range(3):
            writer.write(make_record(f"a_{i}"))
    with pytest.raises(FileExistsError, match="shard-000000.tar"):
        ShardWriter(tmp_path)
    with ShardWriter(tmp_path, overwrite=True) as writer:
        writer.write(make_record("b_0"))
    assert os.listdir(tmp_path) == ["shard-000000.tar"]
    assert [r.key for r in iter_shard(str(tmp_path / "shard-000000.tar"))] == ["b_0"]


def test_writer_without_samples_writes_nothing(tmp_path):
    with ShardWriter(tmp_path / "new") as writer:
        pass
    assert writer.paths == [] and os.listdir(tmp_path / "new") == []
    with pytest.raises(ValueError, match="closed"):
        writer.write(make_record())
    with pytest.raises(ValueError, match="max_samples"):
        ShardWriter(tmp_path, max_samples=0)


# ---------------------------------------------------------------------------------------------
# list_shards


@pytest.fixture
def shard_tree(tmp_path):
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        for i in range(3):
            (tmp_path / sub / f"shard-{i:06d}.tar").write_bytes(b"")
    (tmp_path / "a" / "notes.txt").write_bytes(b"")
    (tmp_path / "a" / ".shard-000009.tar.1.x.partial").write_bytes(b"")
    (tmp_path / "empty").mkdir()
    return tmp_path


def test_list_shards_patterns(shard_tree):
    a = [str(shard_tree / "a" / f"shard-{i:06d}.tar") for i in range(3)]
    b = [str(shard_tree / "b" / f"shard-{i:06d}.tar") for i in range(3)]
    assert list_shards(str(shard_tree / "a" / "shard-{000000..000002}.tar")) == a
    assert list_shards(str(shard_tree / "a")) == a
    assert list_shards(str(shard_tree / "*" / "shard-*.tar")) == sorted(a + b)
    assert list_shards(str(shard_tree / "{b,a}")) == sorted(a + b)
    # Deduplicated and sorted across patterns; a path given twice appears once.
    assert list_shards([b[1], str(shard_tree / "a"), a[0], b[1]]) == sorted(a + [b[1]])
    assert list_shards(shard_tree / "b") == b  # os.PathLike


def test_list_shards_missing(shard_tree):
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        list_shards(str(shard_tree / "nothing-here" / "*.tar"))
    with pytest.raises(FileNotFoundError, match="shard-000003.tar"):
        list_shards(str(shard_tree / "a" / "shard-{000000..000003}.tar"))
    with pytest.raises(FileNotFoundError, match="empty"):
        list_shards(str(shard_tree / "empty"))
    with pytest.raises(FileNotFoundError, match="missing.tar"):
        list_shards([str(shard_tree / "a"), str(shard_tree / "missing.tar")])
    with pytest.raises(ValueError):
        list_shards([])


def test_list_shards_urls_pass_through_in_order(shard_tree):
    urls = list_shards(["pipe:cat /x/s-{1..2}.tar", "pipe:cat /x/s-0.tar", str(shard_tree / "b")])
    assert urls[:3] == [str(shard_tree / "b" / f"shard-{i:06d}.tar") for i in range(3)]
    assert urls[3:] == ["pipe:cat /x/s-1.tar", "pipe:cat /x/s-2.tar", "pipe:cat /x/s-0.tar"]
    assert shard_name("pipe:curl -s https://host/data/s-000001.tar") == "s-000001.tar"


def test_iter_shard_pipe_url(tmp_path):
    with ShardWriter(tmp_path) as writer:
        writer.write(make_record())
    (record,) = iter_shard(f"pipe:cat {writer.paths[0]}")
    assert record.shard == "shard-000000.tar" and record.key == KEY


# ---------------------------------------------------------------------------------------------
# Decoding errors: every one names shard, key and member, with a countable reason


def _replace_npy(name: str, array: np.ndarray):
    def edit(raw):
        raw[name] = npy(array)

    return edit


def _edit_captions(value):
    def edit(raw):
        raw["captions.json"] = json.dumps(value).encode()

    return edit


def _nan_feat(raw):
    feat = make_record().feat.copy()
    feat[3, 7] = np.nan
    raw["feat.npy"] = npy(feat)


def _inf_loc(raw):
    loc = make_record().loc.copy()
    loc[0, 0] = np.inf
    raw["loc.npy"] = npy(loc)


def _drop(name: str):
    def edit(raw):
        del raw[name]

    return edit


_R = make_record()
DECODE_ERRORS = {
    "soft_width": (_replace_npy("soft.npy", _R.soft[:, :1600]), "soft.npy", "shape"),
    "loc_rows": (_replace_npy("loc.npy", _R.loc[:5]), "loc.npy", "shape"),
    "feat_1d": (_replace_npy("feat.npy", _R.feat[0]), "feat.npy", "shape"),
    "too_many_regions": (
        _replace_npy("feat.npy", np.zeros((101, IMG_DIM), np.float16)),
        "feat.npy",
        "shape",
    ),
    "no_regions": (
        _replace_npy("feat.npy", np.zeros((0, IMG_DIM), np.float16)),
        "feat.npy",
        "shape",
    ),
    "feat_float32": (_replace_npy("feat.npy", _R.feat.astype(np.float32)), "feat.npy", "dtype"),
    "loc_float16": (_replace_npy("loc.npy", _R.loc.astype(np.float16)), "loc.npy", "dtype"),
    "soft_float32": (_replace_npy("soft.npy", _R.soft.astype(np.float32)), "soft.npy", "dtype"),
    "feat_nan": (_nan_feat, "feat.npy", "nonfinite"),
    "loc_inf": (_inf_loc, "loc.npy", "nonfinite"),
    "soft_negative": (_replace_npy("soft.npy", -_R.soft), "soft.npy", "range"),
    "token_too_big": (_edit_captions({"input_ids": [[1000, 28996]]}), "captions.json", "token_id"),
    "token_negative": (_edit_captions({"input_ids": [[1000], [-5]]}), "captions.json", "token_id"),
    "token_huge": (_edit_captions({"input_ids": [[2**70]]}), "captions.json", "token_id"),
    "no_captions": (_edit_captions({"input_ids": []}), "captions.json", "empty_caption"),
    "empty_caption": (
        _edit_captions({"input_ids": [[1000], []]}),
        "captions.json",
        "empty_caption",
    ),
    "long_caption": (
        _edit_captions({"input_ids": [[1000] * (MAX_CAPTION_TOKENS + 1)]}),
        "captions.json",
        "caption_length",
    ),
    "cls_inside": (
        _edit_captions({"input_ids": [[101, 1000, 102]]}),
        "captions.json",
        "special_token",
    ),
    "float_token": (_edit_captions({"input_ids": [[1000.0]]}), "captions.json", "type"),
    "bool_token": (_edit_captions({"input_ids": [[True]]}), "captions.json", "type"),
    "captions_list": (_edit_captions([[1000]]), "captions.json", "type"),
    "meta_list": (lambda raw: raw.update({"meta.json": b"[1, 2]"}), "meta.json", "type"),
    "bad_json": (lambda raw: raw.update({"meta.json": b"{not json"}), "meta.json", "decode"),
    "bad_npy": (lambda raw: raw.update({"loc.npy": b"\x93NUMPY garbage"}), "loc.npy", "decode"),
    **{f"missing_{m}": (_drop(m), m, "missing_field") for m in SHARD_FIELDS},
}


@pytest.mark.parametrize("case", sorted(DECODE_ERRORS))
def test_decode_errors_name_shard_key_field(case):
    edit, field, reason = DECODE_ERRORS[case]
    raw = raw_sample()
    decode_sample(raw, shard=SHARD)  # the unedited sample is fine
    edit(raw)
    with pytest.raises(ShardFormatError) as info:
        decode_sample(raw, shard=SHARD)
    err = info.value
    assert (err.shard, err.key, err.field, err.reason) == (SHARD, KEY, field, reason)
    assert reason in REASONS
    message = str(err)
    assert message.startswith(f"{SHARD}: sample '{KEY}': {field} ")


def test_decode_error_message_format():
    raw = raw_sample()
    raw["soft.npy"] = npy(_R.soft[:, :1600])
    with pytest.raises(ShardFormatError) as info:
        decode_sample(raw, shard=SHARD)
    assert str(info.value) == (
        f"{SHARD}: sample '{KEY}': soft.npy has shape (12, 1600), expected (12, 1601)"
    )
    # Keeps its attributes through copy (and so through a worker process boundary).
    clone = copy.deepcopy(info.value)
    assert (clone.shard, clone.key, clone.field, clone.reason) == (SHARD, KEY, "soft.npy", "shape")


def test_decoder_accepts_small_images_and_wds_keys():
    raw = raw_sample(make_record(n=1))
    raw["__url__"] = "/data/shard-000003.tar"
    raw["__local_path__"] = "/data/shard-000003.tar"
    record = decode_sample(raw, shard=SHARD)
    assert record.num_regions == 1 and record.shard == SHARD


def test_iter_shard_reports_bad_sample(tmp_path):
    records = [make_record("ok_0"), make_record("bad_1"), make_record("ok_2")]
    members = {}
    for record in records:
        raw = raw_sample(record)
        if record.key == "bad_1":
            raw["captions.json"] = b'{"input_ids": [[50000]]}'
        members.update({f"{record.key}.{m}": raw[m] for m in SHARD_FIELDS})
    path = tmp_path / SHARD
    write_tar(path, members)
    stream = iter_shard(str(path))
    assert next(stream).key == "ok_0"
    with pytest.raises(ShardFormatError) as info:
        next(stream)
    assert (info.value.shard, info.value.key, info.value.field, info.value.reason) == (
        SHARD,
        "bad_1",
        "captions.json",
        "token_id",
    )
    assert "50000" in str(info.value)


def test_iter_shard_truncated_tar(tmp_path):
    with ShardWriter(tmp_path) as writer:
        for i in range(4):
            writer.write(make_record(f"img_{i}", seed=i))
    data = writer.paths[0].read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ShardFormatError) as info:
        list(iter_shard(str(cut)))
    assert info.value.reason == "tar" and info.value.shard == "cut.tar"
    assert "truncated member" in str(info.value)
    with pytest.raises(FileNotFoundError):
        list(iter_shard(str(tmp_path / "absent.tar")))


# ---------------------------------------------------------------------------------------------
# No pickle, ever


class _CreatesFile:
    """Unpickling an instance creates `path` (the classic pickle payload, made harmless)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _payload(marker) -> bytes:
    return pickle.dumps(_CreatesFile(str(marker)))


def test_payload_really_would_create_the_marker(tmp_path):
    # Proves the refusal tests below can fail: unpickling the payload does create the file.
    marker = tmp_path / "control"
    pickle.loads(_payload(marker)).close()
    assert marker.exists()


@pytest.mark.parametrize("suffix", ["pickle", "pyd", "pkl", "pth", "feat.pyd", "txt"])
def test_forbidden_member_is_refused_undecoded(tmp_path, suffix):
    marker = tmp_path / "unpickled"
    members = {f"{KEY}.{m}": v for m, v in raw_sample().items() if m != "__key__"}
    members[f"{KEY}.{suffix}"] = _payload(marker)
    path = tmp_path / SHARD
    write_tar(path, members)
    with pytest.raises(ShardFormatError) as info:
        list(iter_shard(str(path)))
    err = info.value
    assert (err.shard, err.key, err.field, err.reason) == (SHARD, KEY, suffix, "forbidden_member")
    assert not marker.exists()


def test_object_npy_is_refused_undecoded(tmp_path):
    marker = tmp_path / "unpickled"
    payload = np.empty((1,), dtype=object)
    payload[0] = _CreatesFile(str(marker))
    raw = raw_sample()
    raw["feat.npy"] = npy(payload)
    with pytest.raises(ShardFormatError) as info:
        decode_sample(raw, shard=SHARD)
    assert (info.value.field, info.value.reason) == ("feat.npy", "decode")
    assert "pickle" in str(info.value)
    assert not marker.exists()


def test_pickle_bytes_in_npy_member_are_refused(tmp_path):
    marker = tmp_path / "unpickled"
    raw = raw_sample()
    raw["soft.npy"] = _payload(marker)  # np.load would dispatch this to pickle
    with pytest.raises(ShardFormatError) as info:
        decode_sample(raw, shard=SHARD)
    assert (info.value.field, info.value.reason) == ("soft.npy", "decode")
    assert not marker.exists()


def test_validate_record_accepts_what_the_writer_writes():
    record = make_record()
    validate_record(record)
    record.captions = [c.astype(np.int64) for c in record.captions]
    with pytest.raises(ShardFormatError, match="int32"):
        validate_record(record, shard=SHARD)
