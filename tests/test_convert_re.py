"""Referring-expression converters (re-refs, re-lmdb) on hand-made files, and the restricted
unpickler that reads refer's pickles: globals refused, nothing run."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
from test_convert import (
    WORD_ID,
    MakeFile,
    expected_regions,
    make_image,
    npz_bytes,
    text_value,
    write_lmdb,
    write_vocab,
)

from uniter_fast.convert.__main__ import main
from uniter_fast.convert.common import ConvertError, loc_from_norm_bb, loc_from_pixel_boxes
from uniter_fast.convert.refexp import (
    RestrictedUnpickler,
    UnsafePickleError,
    load_refs,
    safe_unpickle,
)
from uniter_fast.data.shards import list_shards
from uniter_fast.data.task_shards import iter_task_shard

META = {"bert": "bert-base-cased", "UNK": 100, "CLS": 101, "SEP": 102, "MASK": 103}


class Ref:
    """A custom class: its pickle names test_convert_re.Ref, which must be refused."""

    def __init__(self, ref_id: int) -> None:
        self.ref_id = ref_id


class System:
    """Unpickling this would run a shell command creating `path`."""

    def __init__(self, path) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def _ref(ref_id, ann_id, image_id, split, *sents):
    sentences = [{"sent_id": sid, "sent": text, "raw": text, "tokens": []} for sid, text in sents]
    return {
        "ref_id": ref_id,
        "ann_id": ann_id,
        "image_id": image_id,
        "split": split,
        "category_id": 1,
        "sent_ids": [sid for sid, _ in sents],
        "sentences": sentences,
    }


def _records(out):
    return {r.key: r for u in list_shards(str(out)) for r in iter_task_shard(u, "re")}


# --------------------------------------------------------------------------------------------
# The restricted unpickler


def test_plain_pickles_load_in_every_protocol(tmp_path):
    for protocol in (0, 2, 3, pickle.HIGHEST_PROTOCOL):
        data = [_ref(1, 10, 5, "train", (7, "a man")), {"x": (1, 2.5, None, True, "é")}]
        if protocol >= 3:  # Python 3 bytes have opcodes from protocol 3 (before: _codecs.encode)
            data.append(b"\x00\xff")
        path = tmp_path / f"p{protocol}.p"
        path.write_bytes(pickle.dumps(data, protocol=protocol))
        assert safe_unpickle(path) == data


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_pickles_asking_for_globals_are_refused_and_nothing_runs(tmp_path, protocol):
    made = tmp_path / "made"
    cases = {
        "system": ([System(made)], ".system"),  # posix.system (nt.system on Windows)
        "open": ({"refs": MakeFile(made)}, ".open"),  # builtins/__builtin__.open
        # protocol 0 rebuilds instances through copy_reg._reconstructor, asked for first
        "class": ([Ref(1)], "_reconstructor" if protocol < 2 else f"{Ref.__module__}.Ref"),
    }
    if protocol < 4:  # before protocol 4 even a set is built by a global (builtins.set)
        cases["set"] = ([{1, 2}], ".set")
    for name, (obj, asked) in cases.items():
        path = tmp_path / f"{name}.p"
        path.write_bytes(pickle.dumps(obj, protocol=protocol))
        with pytest.raises(UnsafePickleError) as info:
            load_refs(path)
        assert str(path) in str(info.value) and asked in str(info.value), info.value
        assert not made.exists()
    # The class itself refuses, whoever calls it.
    with open(tmp_path / "system.p", "rb") as f, pytest.raises(UnsafePickleError):
        RestrictedUnpickler(f, path="x").load()
    assert not made.exists()


def test_refs_file_errors_name_the_file_and_the_ref(tmp_path):
    bad = tmp_path / "truncated.p"
    bad.write_bytes(pickle.dumps([_ref(1, 10, 5, "train", (7, "a"))], protocol=2)[:-9])
    with pytest.raises(ConvertError, match="truncated.p: not a readable pickle"):
        load_refs(bad)
    refs = [_ref(1, 10, 5, "train", (7, "a")), _ref(2, 11, 5, "val", (8, "b"))]
    del refs[1]["ann_id"]
    path = tmp_path / "refs.json"
    path.write_text(json.dumps(refs))
    with pytest.raises(ConvertError, match=r"refs\[1\] \(ref_id 2\): ann_id is None"):
        load_refs(path)
    refs[1]["ann_id"] = 11
    refs[1]["sentences"][0].pop("sent_id")
    path.write_text(json.dumps(refs))
    with pytest.raises(ConvertError, match=r"refs\[1\] .*sentences\[0\] has no integer sent_id"):
        load_refs(path)
    path.write_text(json.dumps({"refs": refs}))
    with pytest.raises(ConvertError, match="expected a list of refs"):
        load_refs(path)


# --------------------------------------------------------------------------------------------
# re-refs


@pytest.fixture
def refer_files(tmp_path, rng):
    """instances.json, refs (pickle and JSON), ground-truth and detected .npz of five images."""
    gt_dir, det_dir = tmp_path / "gt", tmp_path / "det"
    gt_dir.mkdir()
    det_dir.mkdir()
    images = [
        {"id": 1, "width": 640, "height": 480, "file_name": "COCO_train2014_000000000001.jpg"},
        {"id": 2, "width": 500, "height": 400, "file_name": "b.jpg"},
        {"id": 3, "width": 300, "height": 300, "file_name": "c.jpg"},
        {"id": 4, "width": 300, "height": 300, "file_name": "d.jpg"},
        {"id": 5, "width": 300, "height": 300, "file_name": "e.jpg"},
        {"id": 6, "width": 0, "height": 300, "file_name": "f.jpg"},
    ]
    anns_of = {1: [10, 11, 12], 2: [20, 21], 3: [30, 31], 4: [40], 5: [50], 6: [60]}
    annotations = [
        {"id": a, "image_id": i, "bbox": [5.0 + k, 6.0, 50.0, 40.0 + k], "category_id": 1}
        for i, anns in anns_of.items()
        for k, a in enumerate(anns)
    ]
    annotations.append({"id": 99, "image_id": 1, "bbox": [1, 2, 0, 4], "category_id": 1})
    anns_of[1].append(99)  # a zero-width box: the sentences about it are left out
    instances = {"images": images, "annotations": annotations, "categories": []}
    (tmp_path / "instances.json").write_text(json.dumps(instances))

    gt, det = {}, {}
    gt[1] = make_image(rng, 4, 4)
    np.savez(gt_dir / "1.npz", **gt[1])
    gt[2] = make_image(rng, 2, 2)  # stored in another order than instances.json lists them
    np.savez(gt_dir / "visual_grounding_coco_gt_000000000002.npz", **gt[2], ann_ids=[21, 20])
    np.savez(gt_dir / "3.npz", **make_image(rng, 3, 3))  # 3 regions for 2 annotations
    np.savez(gt_dir / "5.npz", **make_image(rng, 1, 1), ann_ids=[51])  # not image 5's annotation
    np.savez(gt_dir / "6.npz", **make_image(rng, 1, 1))
    det[1] = make_image(rng, 30, 14)
    np.savez(det_dir / "visual_grounding_det_coco_000000000001.npz", **det[1])
    det[2] = make_image(rng, 12, 3)
    corners = np.sort(rng.uniform(0, 400, (12, 2, 2)), axis=1)  # [box, corner, (x, y)]
    det[2]["boxes"] = corners.reshape(12, 4).astype(np.float32)  # x1 y1 x2 y2
    np.savez(det_dir / "2.npz", **{k: v for k, v in det[2].items() if k != "norm_bb"})
    for image_id in (3, 5, 6):
        np.savez(det_dir / f"{image_id}.npz", **make_image(rng, 12, 3))
    # image 4: no features at all

    refs = [
        _ref(100, 11, 1, "train", (1000, "A man riding"), (1001, "The dog")),
        _ref(101, 10, 1, "train", (1002, "horses on the street")),
        _ref(102, 99, 1, "train", (1003, "a dog")),  # bad bbox
        _ref(103, 20, 2, "train", (1004, "A horse")),
        _ref(104, 30, 2, "train", (1005, "a man")),  # annotation of another image
        _ref(105, 31, 3, "train", (1006, "a dog")),
        _ref(106, 40, 4, "train", (1007, "a dog")),
        _ref(107, 60, 6, "train", (1008, "a dog")),
        _ref(110, 50, 5, "train", (1010, "a dog")),
        _ref(108, 12, 1, "val", (1009, "a dog")),  # another split: not read
        _ref(109, 21, 2, "train", (1004, "again")),  # sent_id 1004 already read
    ]
    (tmp_path / "refs.p").write_bytes(pickle.dumps(refs, protocol=2))
    (tmp_path / "refs.json").write_text(json.dumps(refs))
    return {"path": tmp_path, "gt": gt, "det": det, "images": images, "annotations": annotations}


def _refs_args(src, out, refs="refs.p", *extra):
    p = src["path"]
    return [
        "re-refs",
        "--refs", str(p / refs), "--instances", str(p / "instances.json"), "--split", "train",
        "--gt-npz-dir", str(p / "gt"), "--det-npz-dir", str(p / "det"),
        "--vocab", str(write_vocab(p / "vocab.txt")), "--out", str(out), "--no-progress",
        "--max-bad-fraction", "0.9", "--dataset", "refcoco", *extra,
    ]  # fmt: skip


def test_re_refs_converts_and_counts(refer_files, capsys):
    src = refer_files
    out = src["path"] / "out"
    assert main(_refs_args(src, out)) == 0, capsys.readouterr().err
    records = _records(out)
    assert sorted(records) == ["1", "2"]

    one = records["1"]
    assert one.meta["ann_ids"] == [10, 11, 12, 99]
    assert one.meta["width"] == 640 and one.meta["height"] == 480
    assert one.meta["dataset"] == "refcoco" and one.meta["image_id"] == 1
    assert [i["id"] for i in one.items] == ["1000", "1001", "1002"]
    assert [i["target"] for i in one.items] == [1, 1, 0]
    assert [i["ref_id"] for i in one.items] == [100, 100, 101]
    assert one.items[0]["bbox"] == [6.0, 6.0, 50.0, 41.0]
    w = WORD_ID
    assert one.items[0]["input_ids"] == [w["A"], w["man"], w["riding"]]
    gt_feat, gt_loc = one.images[0]
    assert gt_feat.tobytes() == src["gt"][1]["features"].astype(np.float16).tobytes()
    np.testing.assert_array_equal(gt_loc, loc_from_norm_bb(src["gt"][1]["norm_bb"]))
    feat, loc, _ = expected_regions(src["det"][1], loc_from_norm_bb(src["det"][1]["norm_bb"]))
    assert one.images[1][0].tobytes() == feat.tobytes()
    np.testing.assert_array_equal(one.images[1][1], loc)

    two = records["2"]  # the npz's ann_ids order, and pixel boxes normalised by 500 x 400
    assert two.meta["ann_ids"] == [21, 20] and [i["target"] for i in two.items] == [1]
    assert two.images[0][0].tobytes() == src["gt"][2]["features"].astype(np.float16).tobytes()
    det = src["det"][2]
    pixel = loc_from_pixel_boxes(det["boxes"], 500, 400)
    feat, loc, _ = expected_regions(det, pixel)
    assert two.images[1][0].tobytes() == feat.tobytes()
    np.testing.assert_array_equal(two.images[1][1], loc)

    totals = json.loads((out / "manifest.json").read_text())["totals"]
    assert totals["skipped_images"] == {
        "ann_ids": 1,
        "image_size": 1,
        "no_features": 1,
        "region_count": 1,
    }
    assert totals["left_out_captions"] == {"bbox": 1, "duplicate_sentence": 1, "unknown_ann": 1}
    assert totals["pairs"] == 4
    manifest = json.loads((out / "manifest.json").read_text())
    assert any("3.npz: 3 ground-truth regions" in e for e in manifest["examples"]["region_count"])

    # The JSON export of the same refs gives the same shards, byte for byte.
    out_json = src["path"] / "out_json"
    assert main(_refs_args(src, out_json, "refs.json")) == 0
    tars = sorted(p.name for p in out.glob("*.tar"))
    assert tars and all((out / t).read_bytes() == (out_json / t).read_bytes() for t in tars)


def test_re_refs_refuses_unsafe_pickle_and_empty_split(refer_files, capsys):
    src = refer_files
    made = src["path"] / "made"
    (src["path"] / "evil.p").write_bytes(pickle.dumps([System(made)], protocol=2))
    assert main(_refs_args(src, src["path"] / "out", "evil.p")) == 1
    err = capsys.readouterr().err
    assert "evil.p" in err and "system: refused" in err
    assert not made.exists()
    args = _refs_args(src, src["path"] / "out2")
    args[args.index("train")] = "testB"
    assert main(args) == 1
    assert "no ref of split 'testB' (refs: train 10, val 1)" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# re-lmdb


def test_re_lmdb(tmp_path, rng, capsys):
    txt_db = tmp_path / "txt_db"
    images = [
        {"id": 1, "file_name": "a.jpg", "ann_ids": [10, 11, 12], "height": 480, "width": 640},
        {"id": 2, "file_name": "b.jpg", "ann_ids": [20, 21], "height": 400, "width": 500},
        {"id": 3, "file_name": "c.jpg", "ann_ids": [30], "height": 300, "width": 300},
    ]
    gt = {i: make_image(rng, n, n) for i, n in ((1, 3), (2, 3), (3, 1))}  # 2: one too many
    det = {i: make_image(rng, 20, 12) for i in (1, 2, 3)}
    write_lmdb(
        tmp_path / "gt_db",
        {f"visual_grounding_coco_gt_{i:012}.npz".encode(): npz_bytes(**v) for i, v in gt.items()},
    )
    write_lmdb(
        tmp_path / "det_db",
        {f"visual_grounding_det_coco_{i:012}.npz".encode(): npz_bytes(**det[i]) for i in (1, 2)},
    )

    def example(sent_id, ref_id, ann_id, image_id, ids, bbox=(1.0, 2.0, 30.0, 40.0)):
        return {
            "sent_id": sent_id, "sent": "x", "ref_id": ref_id, "ann_id": ann_id,
            "image_id": image_id, "bbox": list(bbox), "input_ids": ids,
        }  # fmt: skip

    examples = {
        "5": example(5, 50, 12, 1, [1005, 1006]),
        "6": example(6, 51, 10, 1, [1007]),
        "7": example(7, 52, 20, 2, [1008]),  # image 2: region count differs
        "8": example(8, 53, 30, 3, [1009]),  # image 3: not in the detection DB
        "9": example(9, 54, 11, 1, [1010]),  # a val ref: left out by --split train
        "10": example(10, 50, 77, 1, [1011]),  # not an annotation of image 1
    }
    values = {k.encode(): text_value(v) for k, v in examples.items()}
    values[b"11"] = b"not lz4"
    write_lmdb(txt_db, values)
    refs = [_ref(r, 0, 0, "val" if r == 54 else "train", (r, "x")) for r in range(50, 55)]
    for name, obj in (
        ("meta.json", META),
        ("images.json", images),
        ("refs.json", refs),
        ("annotations.json", []),
        ("categories.json", []),
        ("id2len.json", {k: 1 for k in examples}),
    ):
        (txt_db / name).write_text(json.dumps(obj))
    out = tmp_path / "out"
    args = [
        "re-lmdb", "--txt-db", str(txt_db), "--gt-img-db", str(tmp_path / "gt_db"),
        "--det-img-db", str(tmp_path / "det_db"), "--split", "train", "--out", str(out),
        "--no-progress", "--max-bad-fraction", "0.9",
    ]  # fmt: skip
    assert main(args) == 0, capsys.readouterr().err
    records = _records(out)
    assert sorted(records) == ["1"]
    rec = records["1"]
    assert [i["id"] for i in rec.items] == ["5", "6"]  # text DB key order
    assert [i["target"] for i in rec.items] == [2, 0]  # images[1]["ann_ids"].index(ann_id)
    assert rec.items[0]["input_ids"] == [1005, 1006] and rec.items[0]["bbox"] == [1, 2, 30, 40]
    assert rec.meta["ann_ids"] == [10, 11, 12] and rec.meta["width"] == 640
    assert rec.images[0][0].tobytes() == gt[1]["features"].astype(np.float16).tobytes()
    feat, _, _ = expected_regions(det[1], loc_from_norm_bb(det[1]["norm_bb"]))
    assert rec.images[1][0].tobytes() == feat.tobytes()
    totals = json.loads((out / "manifest.json").read_text())["totals"]
    assert totals["skipped_images"] == {"no_features": 1, "region_count": 1}
    assert totals["left_out_captions"] == {"decode": 1, "unknown_ann": 1}
    # Without --split every example of the text DB is read (the val one too).
    assert main([*args[:7], *args[9:], "--overwrite"]) == 0
    assert [i["id"] for i in _records(out)["1"].items] == ["5", "6", "9"]
