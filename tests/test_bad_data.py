"""Bad input never kills a run and never passes silently: skipped, counted by reason and shard.

Shards are built with every kind of damage the loader must survive: a corrupt member, a wrong
shape and dtype, NaN features, token ids outside the vocabulary, an empty caption, a duplicate
key, a pickled member, a damaged tar header and a truncated tar.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter

import numpy as np
import pytest
from test_shards import _payload, make_record, raw_sample, write_tar

from uniter_fast.data import shards as shards_module
from uniter_fast.data.pipeline import (
    BadDataError,
    BadSamples,
    DataSetupError,
    Loader,
    TrainSource,
)
from uniter_fast.data.schema import SHARD_FIELDS
from uniter_fast.data.shards import ShardWriter, iter_shard
from uniter_fast.data.tarstream import RawSample, SampleDamage, iter_samples


def _members(record, **replace) -> dict[str, bytes]:
    raw = raw_sample(record)
    raw.update(replace)
    return {f"{record.key}.{m}": raw[m] for m in raw if m != "__key__"}


def _good(i: int):
    return make_record(f"img_{i:03d}", n=10 + i % 5, seed=i, num_captions=1 + i % 3)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Three shards: one clean, one with a bad sample of every kind, one truncated.

    Returns (directory, marker path that unpickling would create, expected bad counts by
    (shard, reason), number of good samples).
    """
    root = tmp_path_factory.mktemp("bad")
    marker = root / "unpickled"
    with ShardWriter(root, prefix="clean", max_samples=100) as writer:
        for i in range(12):
            writer.write(_good(i))

    members: list[tuple[str, bytes]] = []  # a list: the duplicate key repeats member names
    good = 0

    def add(record, **replace):
        nonlocal good
        members.extend(_members(record, **replace).items())
        good += not replace

    add(_good(100))
    nan_feat = np.full((10, 2048), np.nan, np.float16)
    add(make_record("nan_feat", n=10), **{"feat.npy": _npy(nan_feat)})
    add(make_record("wrong_shape", n=10), **{"loc.npy": _npy(np.zeros((10, 6), np.float32))})
    add(make_record("wrong_dtype", n=10), **{"soft.npy": _npy(np.zeros((10, 1601), np.float64))})
    add(make_record("bad_token", n=10), **{"captions.json": b'{"input_ids": [[5, 40000]]}'})
    add(make_record("empty_caption", n=10), **{"captions.json": b'{"input_ids": [[]]}'})
    add(make_record("corrupt", n=10), **{"feat.npy": b"\x93NUMPY\x01\x00garbage"})
    add(_good(101))
    members.extend(_members(make_record("pickled", n=10)).items())
    members.append(("pickled.pyd", _payload(marker)))
    # The same key again, later in the shard: WebDataset would take it for another sample.
    members.extend(_members(make_record("img_100", n=11, seed=5)).items())
    add(_good(102))
    path = root / "mixed-000000.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

    # A clean shard, truncated in the middle of its fourth sample.
    with ShardWriter(root / "tmp", prefix="cut", max_samples=100) as writer:
        for i in range(6):
            writer.write(_good(200 + i))
    data = writer.paths[0].read_bytes()
    with tarfile.open(writer.paths[0]) as tar:
        offsets = [m.offset for m in tar.getmembers()]
    (root / "cut-000000.tar").write_bytes(data[: offsets[3 * len(SHARD_FIELDS) + 2] + 700])

    expected = Counter(
        {
            ("mixed-000000.tar", "nonfinite"): 1,
            ("mixed-000000.tar", "shape"): 1,
            ("mixed-000000.tar", "dtype"): 1,
            ("mixed-000000.tar", "token_id"): 1,
            ("mixed-000000.tar", "empty_caption"): 1,
            ("mixed-000000.tar", "decode"): 1,
            ("mixed-000000.tar", "forbidden_member"): 1,
            ("mixed-000000.tar", "duplicate_key"): 1,
            ("cut-000000.tar", "tar"): 1,
        }
    )
    return root, marker, expected, 12 + good + 3


def _npy(array) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def _read_all(root) -> tuple[BadSamples, list[str]]:
    bad = BadSamples()
    keys = []
    for name in ("clean-000000.tar", "mixed-000000.tar", "cut-000000.tar"):
        for record in iter_shard(str(root / name), on_bad=bad.add_bad):
            bad.add_good(record.shard)
            keys.append(record.key)
    return bad, keys


def test_every_bad_sample_is_skipped_and_counted(corpus):
    root, marker, expected, good = corpus
    bad, keys = _read_all(root)
    assert bad.bad == expected
    assert len(keys) == good == bad.num_good
    assert "img_100" in keys and keys.count("img_100") == 1  # the first of the duplicates
    assert {"img_101", "img_102", "img_200", "img_202"} <= set(keys)
    assert "img_203" not in keys  # cut short by the truncation
    assert not marker.exists()  # the pickled member was refused, never unpickled


def test_loader_goes_on_and_counts_by_reason_and_shard(corpus):
    root, marker, expected, good = corpus
    loader = Loader(
        [TrainSource("d", [str(root)], {"mlm": 1.0, "mrckl": 1.0, "itm": 1.0})],
        tokens_per_batch=400,
        seed=0,
        mode="exact",
        # The first block reads all of epoch 0, then the first sample of epoch 1 (every shard
        # starts with a good one).
        block_images=good + 1,
        max_bad_fraction=0.5,
    )
    next(loader)
    assert loader.bad.bad == expected and loader.bad.num_good == good + 1
    for _ in range(50):  # the run goes on, and later epochs count again
        next(loader)
    assert loader.bad.num_bad > len(expected)
    assert not marker.exists()
    worst = loader.bad.worst_shards()
    assert worst[0].startswith("mixed-000000.tar: ")


def test_too_many_bad_samples_stop_the_run_naming_the_worst_shards(corpus):
    root, _, _, good = corpus
    loader = Loader(
        [TrainSource("d", [str(root)], {"mlm": 1.0})],
        tokens_per_batch=400,
        seed=0,
        mode="exact",
        block_images=good,
        max_bad_fraction=0.05,
        bad_check_min_samples=10,
    )
    with pytest.raises(BadDataError, match=r"max_bad_fraction 5\.00%.*mixed-000000\.tar: 8 bad"):
        next(loader)


def test_a_corpus_with_no_usable_sample_is_an_error_not_a_hang(tmp_path):
    write_tar(tmp_path / "only-000000.tar", _members(make_record("x"), **{"feat.npy": b"junk"}))
    loader = Loader(
        [TrainSource("d", [str(tmp_path)], {"mlm": 1.0})],
        tokens_per_batch=400,
        seed=0,
        max_bad_fraction=1.0,
    )
    with pytest.raises(BadDataError, match="none of the 1 shards"):
        next(loader)


def test_worker_errors_reach_the_training_process(tmp_path):
    write_tar(tmp_path / "only-000000.tar", _members(make_record("x"), **{"feat.npy": b"junk"}))
    loader = Loader(
        [TrainSource("d", [str(tmp_path)], {"mlm": 1.0})],
        tokens_per_batch=400,
        seed=0,
        num_workers=1,
        max_bad_fraction=1.0,
    )
    with pytest.raises(BadDataError, match="none of the 1 shards") as info:
        next(loader)
    loader.close()
    # The worker's own message, not the DataLoader's re-raise wrapped around its traceback.
    assert "\n" not in str(info.value) and "Traceback" not in str(info.value)


def test_code_errors_are_not_swallowed(corpus, monkeypatch):
    root = corpus[0]

    def broken(*args, **kwargs):
        raise TypeError("a bug, not bad data")

    monkeypatch.setattr(shards_module, "validate_record", broken)
    loader = Loader([TrainSource("d", [str(root)], {"mlm": 1.0})], tokens_per_batch=400, seed=0)
    with pytest.raises(TypeError, match="a bug"):
        next(loader)


# --------------------------------------------------------------------------------------------
# The tar reader itself


def _shard_bytes(tmp_path, n=6) -> tuple[bytes, list[int]]:
    with ShardWriter(tmp_path, prefix="s", max_samples=100) as writer:
        for i in range(n):
            writer.write(_good(i))
    with tarfile.open(writer.paths[0]) as tar:
        offsets = [m.offset for m in tar.getmembers()]
    return writer.paths[0].read_bytes(), offsets


def test_damaged_header_costs_only_its_sample(tmp_path):
    data, offsets = _shard_bytes(tmp_path)
    damaged = bytearray(data)
    damaged[offsets[2 * len(SHARD_FIELDS) + 1] + 20] ^= 0xFF  # a header inside sample 2
    items = list(iter_samples(io.BytesIO(bytes(damaged))))
    good = [i.key for i in items if isinstance(i, RawSample)]
    lost = [(i.key, i.reason) for i in items if isinstance(i, SampleDamage)]
    assert good == ["img_000", "img_001", "img_003", "img_004", "img_005"]
    assert lost == [("img_002", "tar")]
    # Python's tarfile would have stopped at the damage, silently:
    with tarfile.open(fileobj=io.BytesIO(bytes(damaged)), mode="r|") as tar:
        assert len([m for m in tar]) == 2 * len(SHARD_FIELDS) + 1


def test_damage_between_samples_is_reported(tmp_path):
    data, offsets = _shard_bytes(tmp_path)
    damaged = bytearray(data)
    damaged[offsets[3 * len(SHARD_FIELDS)] + 20] ^= 0xFF  # the first header of sample 3
    bad = BadSamples()
    keys = [r.key for r in _iter_bytes(tmp_path, bytes(damaged), bad)]
    assert keys == ["img_000", "img_001", "img_002", "img_004", "img_005"]
    assert bad.by_reason() == {"tar": 1}


def _iter_bytes(tmp_path, data, bad):
    path = tmp_path / "damaged.tar"
    path.write_bytes(data)
    return list(iter_shard(str(path), on_bad=bad.add_bad))


def test_skip_resumes_inside_a_shard_without_reading_the_skipped(tmp_path):
    data, _ = _shard_bytes(tmp_path)
    items = list(iter_samples(io.BytesIO(data), skip=4))
    assert [(i.key, i.index) for i in items] == [("img_004", 4), ("img_005", 5)]
    path = tmp_path / "s-000000.tar"
    with_positions = list(iter_shard(str(path), skip=2, positions=True))
    assert [(i, r.key) for i, r in with_positions] == [(2, "img_002"), (3, "img_003")] + [
        (4, "img_004"),
        (5, "img_005"),
    ]


def test_long_member_names_use_pax_or_gnu_headers(tmp_path):
    key = "very/" * 30 + "deep_key"  # past the 100 bytes a plain tar header holds
    record = make_record(key)
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT):
        path = tmp_path / f"long-{fmt}.tar"
        with tarfile.open(path, "w", format=fmt) as tar:
            for name, value in _members(record).items():
                info = tarfile.TarInfo(name)
                info.size = len(value)
                tar.addfile(info, io.BytesIO(value))
        (read,) = list(iter_shard(str(path)))
        assert read.key == key


# --------------------------------------------------------------------------------------------
# Found in review: each of these once lost samples silently or crashed the run


def _offsets(tmp_path, n=6):
    data, offsets = _shard_bytes(tmp_path, n)
    return data, offsets, len(SHARD_FIELDS)


def test_truncation_at_a_header_boundary_is_reported(tmp_path):
    data, offsets, k = _offsets(tmp_path)
    # Cut before sample 3 (sample 2 is whole) and after its first member (sample 3 is lost).
    for cut in (offsets[3 * k], offsets[3 * k + 1]):
        bad = BadSamples()
        keys = [r.key for r in _iter_bytes(tmp_path, data[:cut], bad)]
        assert keys == ["img_000", "img_001", "img_002"]
        assert bad.by_reason() == {"tar": 1}, (cut, bad.bad)


def test_truncation_inside_a_new_samples_first_member_keeps_the_sample_before(tmp_path):
    data, offsets, k = _offsets(tmp_path)
    bad = BadSamples()
    keys = [r.key for r in _iter_bytes(tmp_path, data[: offsets[3 * k] + 700], bad)]
    assert keys == ["img_000", "img_001", "img_002"] and bad.by_reason() == {"tar": 1}


def test_zero_blocks_inside_damaged_data_do_not_end_the_shard(tmp_path):
    records = [_good(i) for i in range(6)]
    zeros = records[2].feat.copy()
    zeros[:5] = 0  # 20 kB of zero bytes: whole zero tar blocks inside the member
    records[2].feat = zeros
    with ShardWriter(tmp_path, prefix="z", max_samples=100) as writer:
        for r in records:
            writer.write(r)
    with tarfile.open(writer.paths[0]) as tar:
        member = next(m for m in tar.getmembers() if m.name == "img_002.feat.npy")
    damaged = bytearray(writer.paths[0].read_bytes())
    damaged[member.offset + 20] ^= 0xFF
    bad = BadSamples()
    keys = [r.key for r in _iter_bytes(tmp_path, bytes(damaged), bad)]
    assert keys == ["img_000", "img_001", "img_003", "img_004", "img_005"]
    assert bad.by_reason() == {"tar": 1}


def test_failing_pipe_commands_are_counted_not_fatal(tmp_path):
    data, _, _ = _offsets(tmp_path)
    good = tmp_path / "s-000000.tar"
    bad = BadSamples()
    everything = [f"img_{i:03d}" for i in range(6)]
    assert [r.key for r in iter_shard(f"pipe:cat {tmp_path}/absent.tar", on_bad=bad.add_bad)] == []
    # A command that fails after its output: what was read before the failure is kept.
    failed = [r.key for r in iter_shard(f"pipe:cat {good}; exit 3", on_bad=bad.add_bad)]
    assert failed == everything[: len(failed)]
    assert [r.key for r in iter_shard(f"pipe:cat {good}", on_bad=bad.add_bad)] == everything
    assert bad.by_reason() == {"io": 2}
    # Stopping early (the loader's close) is not an error, whatever the shell does.
    records = iter_shard(f"pipe:exec cat {good}", on_bad=bad.add_bad)
    next(records)
    records.close()
    assert bad.by_reason() == {"io": 2}


def test_gzipped_shards_are_read(tmp_path):
    import gzip

    data, _, _ = _offsets(tmp_path)
    (tmp_path / "g-000000.tar.gz").write_bytes(gzip.compress(data))
    assert len(list(iter_shard(str(tmp_path / "g-000000.tar.gz")))) == 6


def test_hostile_json_and_reserved_member_names_are_bad_samples(tmp_path):
    deep = b'{"input_ids": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    huge = b'{"image_id": ' + b"9" * 5000 + b"}"
    members = {}
    members.update(_members(make_record("deep"), **{"captions.json": deep}))
    members.update(_members(make_record("huge"), **{"meta.json": huge}))
    members.update(_members(make_record("renamed")))
    members["renamed.__key__"] = b"someone_else"
    members.update(_members(make_record("fine")))
    write_tar(tmp_path / "h-000000.tar", members)
    bad = BadSamples()
    keys = [r.key for r in iter_shard(str(tmp_path / "h-000000.tar"), on_bad=bad.add_bad)]
    assert keys == ["fine"]
    assert bad.by_reason() == {"decode": 2, "forbidden_member": 1}


def test_pipe_urls_are_named_by_their_tar():
    from uniter_fast.data.shards import shard_name

    assert shard_name("pipe:aws s3 cp s3://b/coco-000001.tar -") == "coco-000001.tar"
    assert shard_name("pipe:curl -s https://h/x/vg-000002.tar?sig=abc") == "vg-000002.tar"
    assert shard_name("https://h/x/cc-000003.tar?sig=abc") == "cc-000003.tar"


def test_bad_counts_survive_a_resume(tmp_path):
    members = {}
    for i in range(12):
        if i in (6, 9):
            members.update(_members(make_record(f"bad_{i}"), **{"feat.npy": b"junk"}))
        else:
            members.update(_members(_good(i)))
    write_tar(tmp_path / "r-000000.tar", members)
    kw = dict(tokens_per_batch=60, seed=0, mode="exact", block_images=2, max_bad_fraction=1.0)
    sources = [TrainSource("d", tmp_path, {"mlm": 1.0})]  # a Path, not a list of strings
    for taken in range(1, 8):
        whole = Loader(sources, **kw)
        for _ in range(taken):
            next(whole)
        state = json.loads(json.dumps(whole.state_dict()))
        for _ in range(12):
            next(whole)
        resumed = Loader(sources, state=state, **kw)
        for _ in range(12):
            next(resumed)
        assert resumed.bad.bad == whole.bad.bad, taken
        assert resumed.bad.good == whole.bad.good, taken


def test_resume_refuses_a_changed_shard_set(tmp_path):
    for i in range(2):
        with ShardWriter(tmp_path, prefix=f"p{i}", max_samples=100) as writer:
            writer.write(_good(i))
    sources = [TrainSource("d", str(tmp_path), {"mlm": 1.0})]
    loader = Loader(sources, tokens_per_batch=400, seed=0)
    next(loader)
    state = loader.state_dict()
    with ShardWriter(tmp_path, prefix="p9", max_samples=100) as writer:
        writer.write(_good(9))
    with pytest.raises(ValueError, match="different loader setup"):
        Loader(sources, tokens_per_batch=400, seed=0, state=state)


def test_a_reader_of_nothing_but_bad_data_stops_early(tmp_path):
    for s in range(30):
        members = {}
        for i in range(20):
            members.update(_members(make_record(f"b{s}_{i}"), **{"feat.npy": b"junk"}))
        write_tar(tmp_path / f"bad-{s:06d}.tar", members)
    loader = Loader(
        [TrainSource("d", [str(tmp_path)], {"mlm": 1.0})],
        tokens_per_batch=400,
        seed=0,
        max_bad_fraction=0.5,
        bad_check_min_samples=50,
    )
    with pytest.raises(BadDataError, match="max_bad_fraction") as info:
        next(loader)
    assert "50 of 50 samples read were bad" in str(info.value)  # not the whole corpus first


def test_worker_setup_errors_reach_the_training_process_in_one_line(corpus):
    """Raised while a worker sets its stream up (here: too few shards to split in exact mode)."""
    loader = Loader(
        [TrainSource("d", [str(corpus[0] / "clean-000000.tar")], {"mlm": 1.0})],
        tokens_per_batch=400,
        seed=0,
        mode="exact",
        num_workers=2,
    )
    with pytest.raises(DataSetupError, match="2 readers, but there are only 1 shards") as info:
        next(loader)
    loader.close()
    assert "\n" not in str(info.value) and "Traceback" not in str(info.value)
