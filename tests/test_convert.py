"""Feature converters (uniter_fast/convert): real-format inputs built here, shards checked
against them, manifests, verify, resuming after a kill, bad and pickle-carrying records.

The WordPiece vocab written here has the real size (28996 lines) with the special tokens at
bert-base-cased's ids and a handful of words from id 999 on, so the converter's vocabulary
check runs unrelaxed and token ids are predictable.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import pickle
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from uniter_fast.convert import common
from uniter_fast.convert.__main__ import main
from uniter_fast.convert.common import (
    JOURNAL_NAME,
    MANIFEST_NAME,
    ConvertError,
    ConvertOptions,
    RegionPolicy,
    run_conversion,
)
from uniter_fast.data.schema import BERT_BASE_CASED, IMG_DIM, IMG_LABEL_DIM
from uniter_fast.data.shards import ImageRecord, ShardWriter, iter_shard, list_shards

lmdb = pytest.importorskip("lmdb")
msgpack = pytest.importorskip("msgpack")
lz4_frame = pytest.importorskip("lz4.frame")
pytest.importorskip("tokenizers")

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["!", ".", ",", "a", "A", "man", "riding", "horse", "##s", "on", "dog", "The", "street"]
WORD_ID = {w: 999 + i for i, w in enumerate(WORDS)}
META = {"bert": "bert-base-cased", "UNK": 100, "CLS": 101, "SEP": 102, "MASK": 103}
META["v_range"] = [999, 28996]


# --------------------------------------------------------------------------------------------
# Source builders


def write_vocab(path: Path) -> Path:
    tokens = ["[PAD]"] + [f"[unused{i}]" for i in range(1, 100)]
    tokens += ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokens += [f"[unused{i}]" for i in range(100, 995)]
    tokens += WORDS
    tokens += [f"zz{i}" for i in range(BERT_BASE_CASED.size - len(tokens))]
    assert tokens[999] == "!" and len(tokens) == BERT_BASE_CASED.size
    path.write_text("\n".join(tokens) + "\n", encoding="utf-8")
    return path


def make_image(rng, n: int, above: int, *, fp16: bool = False) -> dict:
    """Detector output for one image: n regions, `above` of them with confidence > 0.2."""
    conf = np.concatenate([rng.uniform(0.3, 1.0, above), rng.uniform(0.0, 0.19, n - above)])
    conf = rng.permutation(conf).astype(np.float32)
    above_idx = np.flatnonzero(conf > 0.2)
    if len(above_idx) >= 2:  # a tie: the stable order must keep source order
        conf[above_idx[1]] = conf[above_idx[0]]
    xy = np.sort(rng.random((n, 2, 2)), axis=1)
    wh = xy[:, 1] - xy[:, 0]
    norm_bb = np.concatenate([xy[:, 0], xy[:, 1], wh], axis=1).astype(np.float32)
    soft = rng.dirichlet(np.full(IMG_LABEL_DIM, 0.1), n).astype(np.float32)
    feat = rng.standard_normal((n, IMG_DIM)).astype(np.float16 if fp16 else np.float32)
    return {"features": feat, "norm_bb": norm_bb, "conf": conf, "soft_labels": soft}


def expected_regions(img: dict, loc7: np.ndarray, conf=None):
    """The oracle: keep clamp(#(conf > .2), 10, 100) regions, descending conf, ties in order."""
    conf = img["conf"] if conf is None else conf
    n = len(conf)
    keep = min(max(int((conf > 0.2).sum()), 10), 100, n)
    idx = sorted(range(n), key=lambda i: (-float(conf[i]), i))[:keep]
    return (
        img["features"][idx].astype(np.float16),
        loc7[idx].astype(np.float32),
        img["soft_labels"][idx].astype(np.float16),
    )


def npz_bytes(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def msgpack_numpy(array: np.ndarray) -> dict:
    """msgpack_numpy's encoding of an array (the package itself is not needed to write it)."""
    return {
        b"nd": True,
        b"type": array.dtype.str,
        b"kind": b"",
        b"shape": list(array.shape),
        b"data": array.tobytes(),
    }


class MakeFile:
    """Unpickling this creates a file: proof that something was (or was not) unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def write_lmdb(path: Path, items: dict[bytes, bytes]) -> None:
    env = lmdb.open(str(path), map_size=1 << 28, subdir=True)
    with env.begin(write=True) as txn:
        for k, v in items.items():
            txn.put(k, v)
    env.close()


def text_value(example: dict) -> bytes:
    return lz4_frame.compress(msgpack.dumps(example, use_bin_type=True))


def caption_ids(rng, length: int) -> list[int]:
    return [int(t) for t in rng.integers(999, 28996, length)]


@pytest.fixture
def lmdb_source(tmp_path, rng):
    """An image DB + text DB in the reference's formats, with known good and bad entries."""
    img_db, txt_db = tmp_path / "img_db", tmp_path / "txt_db"
    images, values = {}, {}
    plan = {  # name: (regions, regions above 0.2)
        "coco_a_000001.npz": (40, 5),  # keeps 10
        "coco_a_000002.npz": (50, 30),  # keeps 30
        "coco_a_000003.npz": (120, 110),  # keeps 100
        "coco_a_000004.npz": (7, 1),  # fewer than 10: keeps all 7
        "coco_a_000005.npz": (20, 12),
        "coco_a_000006.npz": (15, 3),
        "coco_a_000007.npz": (12, 12),
        "coco_a_000008.npz": (30, 4),
    }
    for i, (name, (n, above)) in enumerate(plan.items()):
        img = make_image(rng, n, above, fp16=i % 2 == 0)
        images[name] = img
        if name == "coco_a_000005.npz":  # the uncompressed variant: msgpack_numpy, 7-d boxes
            loc7 = np.concatenate(
                [img["norm_bb"], img["norm_bb"][:, 4:5] * img["norm_bb"][:, 5:]], 1
            )
            img["norm_bb"] = loc7
            dump = {k: msgpack_numpy(v) for k, v in img.items()}
            values[name.encode()] = msgpack.dumps(dump, use_bin_type=True)
        else:
            values[name.encode()] = npz_bytes(**img)
    bad = make_image(rng, 20, 10)
    bad["features"][3, 7] = np.nan
    values[b"coco_b_nan.npz"] = npz_bytes(**bad)
    wrong = make_image(rng, 20, 10)
    wrong["features"] = wrong["features"][:, :1000]
    values[b"coco_b_shape.npz"] = npz_bytes(**wrong)
    huge = make_image(rng, 20, 10)
    huge["features"][huge["conf"].argmax(), 0] = 1e6  # in a kept region
    values[b"coco_b_overflow.npz"] = npz_bytes(**huge)
    values[b"coco_c_nocaption.npz"] = npz_bytes(**make_image(rng, 12, 3))
    write_lmdb(img_db, values)

    txt, txt2img, captions = {}, {}, {}
    next_id = 0

    def add(img_name: str, ids: list[int]) -> str:
        nonlocal next_id
        tid = str(next_id)
        next_id += 1
        txt[tid.encode()] = text_value({"input_ids": ids, "img_fname": img_name, "raw": "x"})
        txt2img[tid] = img_name
        captions.setdefault(img_name, []).append((tid, ids))
        return tid

    for name in [*plan, "coco_b_nan.npz", "coco_b_shape.npz", "coco_b_overflow.npz"]:
        for _ in range(int(rng.integers(1, 4))):
            add(name, caption_ids(rng, int(rng.integers(1, 61))))
    add("coco_a_000001.npz", caption_ids(rng, 61))  # too long: left out
    add("coco_a_000006.npz", caption_ids(rng, 60))  # exactly 60: kept
    add("coco_missing.npz", caption_ids(rng, 5))  # no features
    # Every caption of this image is too long: the image is skipped.
    for name in ("coco_a_000008.npz",):
        captions.pop(name)
        for tid in [t for t, img in txt2img.items() if img == name]:
            del txt2img[tid], txt[tid.encode()]
        add(name, caption_ids(rng, 70))
    write_lmdb(txt_db, txt)
    (txt_db / "meta.json").write_text(json.dumps(META))
    (txt_db / "txt2img.json").write_text(json.dumps(txt2img))
    return {"img_db": img_db, "txt_db": txt_db, "images": images, "captions": captions}


def lmdb_args(src, out: Path, *extra: str) -> list[str]:
    return [
        "lmdb",
        "--img-db",
        str(src["img_db"]),
        "--txt-db",
        str(src["txt_db"]),
        "--out",
        str(out),
        "--prefix",
        "coco",
        "--shard-size",
        "1200000",
        "--max-bad-fraction",
        "0.5",
        "--no-progress",
        *extra,
    ]


def read_all(out: Path) -> dict:
    return {r.key: r for url in list_shards(str(out)) for r in iter_shard(url)}


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}


# --------------------------------------------------------------------------------------------
# Region selection


def test_parse_size():
    assert common.parse_size("256MB") == 256 * 10**6
    assert common.parse_size("1.5GiB") == int(1.5 * 2**30)
    assert common.parse_size("64k") == 64000 and common.parse_size("123") == 123
    for bad in ("", "MB", "-1", "0", "12XB"):
        with pytest.raises(ValueError):
            common.parse_size(bad)


def test_region_policy_clamps_and_orders():
    policy = RegionPolicy()
    conf = np.array([0.5, 0.9, 0.1, 0.9, 0.3] + [0.05] * 10, dtype=np.float32)
    idx = policy.select(conf, len(conf))
    assert len(idx) == 10  # 4 above 0.2, clamped up to 10
    assert list(idx[:5]) == [1, 3, 0, 4, 2]  # descending, the 0.9 tie in source order
    assert len(policy.select(np.full(150, 0.9, np.float32), 150)) == 100
    assert list(policy.select(np.full(7, 0.1, np.float32), 7)) == [6, 5, 4, 3, 2, 1, 0][::-1]
    assert list(policy.select(None, 130)) == list(range(100))  # no confidence: file order
    with pytest.raises(ValueError):
        RegionPolicy(min_regions=20, max_regions=10)


# --------------------------------------------------------------------------------------------
# LMDB


def test_lmdb_converts_real_format_and_counts_skips(lmdb_source, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(lmdb_args(lmdb_source, out)) == 0
    records = read_all(out)
    good = [f"coco_a_00000{i}" for i in range(1, 8)]
    assert sorted(records) == good
    for key in good:
        name = f"{key}.npz"
        img = lmdb_source["images"][name]
        nb = img["norm_bb"]
        loc7 = nb if nb.shape[1] == 7 else np.concatenate([nb, nb[:, 4:5] * nb[:, 5:6]], 1)
        feat, loc, soft = expected_regions(img, loc7)
        rec = records[key]
        assert rec.feat.tobytes() == feat.tobytes()
        assert rec.loc.tobytes() == loc.tobytes()
        assert rec.soft.tobytes() == soft.tobytes()
        kept = [(t, ids) for t, ids in lmdb_source["captions"][name] if len(ids) <= 60]
        kept.sort(key=lambda c: c[0].encode())
        assert [c.tolist() for c in rec.captions] == [ids for _, ids in kept]
        assert rec.meta["txt_ids"] == [t for t, _ in kept]
        assert rec.meta["source_key"] == name and rec.meta["dataset"] == "coco"
    assert [records[k].num_regions for k in good[:4]] == [10, 30, 100, 7]

    manifest = json.loads((out / MANIFEST_NAME).read_text())
    totals = manifest["totals"]
    assert totals["images"] == 7 and totals["pairs"] == sum(
        len(r.captions) for r in records.values()
    )
    assert totals["skipped_images"] == {
        "fp16_overflow": 1,
        "no_caption": 1,
        "no_caption_left": 1,
        "no_features": 1,
        "nonfinite": 1,
        "shape": 1,
    }
    assert totals["left_out_captions"] == {"too_long": 2}
    assert totals["source_images"] == 13 and totals["bad_images"] == 4
    assert any("coco_b_nan.npz" in e and "features" in e for e in manifest["examples"]["nonfinite"])
    regions = Counter(r.num_regions for r in records.values())
    assert manifest["histograms"]["regions"]["counts"] == {
        str(k): regions[k] for k in sorted(regions)
    }
    tokens = manifest["histograms"]["caption_tokens"]
    assert tokens["total"] == totals["pairs"] and tokens["max"] == 60
    assert manifest["vocab"]["special_ids"]["CLS"] == 101
    assert manifest["region_selection"]["confidence_source"] == {"conf": 7}
    assert len(manifest["shards"]) > 1
    for entry in manifest["shards"]:
        data = (out / entry["name"]).read_bytes()
        assert entry["bytes"] == len(data) and entry["sha256"] == hashlib.sha256(data).hexdigest()
    assert sum(s["samples"] for s in manifest["shards"]) == 7
    assert not list(out.glob(".*"))  # no journal, no temporary file left
    assert "nonfinite: 1" in capsys.readouterr().err

    # verify: clean
    assert main(["verify", str(out), "--deep", "--no-progress"]) == 0
    assert "OK" in capsys.readouterr().out


def test_lmdb_refuses_other_vocabulary(lmdb_source, tmp_path, capsys):
    meta = dict(META, bert="bert-base-uncased", CLS=1)
    (lmdb_source["txt_db"] / "meta.json").write_text(json.dumps(meta))
    assert main(lmdb_args(lmdb_source, tmp_path / "out")) == 1
    err = capsys.readouterr().err
    assert "another vocabulary" in err and "CLS is 1" in err and "bert-base-uncased" in err


def test_pickle_payloads_are_refused_never_unpickled(tmp_path, rng, capsys):
    marker = tmp_path / "unpickled"
    probe = tmp_path / "probe"
    evil = np.array([MakeFile(marker)], dtype=object)
    pickle.loads(pickle.dumps(np.array([MakeFile(probe)], dtype=object)))
    assert probe.exists()  # the payload works: unpickling it would create `marker`

    img = make_image(rng, 12, 12)
    values = {
        b"a_good.npz": npz_bytes(**img),
        b"b_npz_object.npz": npz_bytes(**{**img, "features": evil}),
        b"c_msgpack_object.npz": msgpack.dumps(
            {
                **{k: msgpack_numpy(v) for k, v in img.items() if k != "conf"},
                "conf": {
                    b"nd": True,
                    b"type": "|O",
                    b"kind": b"O",
                    b"shape": [1],
                    b"data": pickle.dumps(evil),
                },
            },
            use_bin_type=True,
        ),
    }
    img_db, txt_db = tmp_path / "img", tmp_path / "txt"
    write_lmdb(img_db, values)
    txt = {
        str(i).encode(): text_value({"input_ids": [1000, 1001], "img_fname": k.decode()})
        for i, k in enumerate(values)
    }
    write_lmdb(txt_db, txt)
    (txt_db / "meta.json").write_text(json.dumps(META))
    (txt_db / "txt2img.json").write_text(
        json.dumps({str(i): k.decode() for i, k in enumerate(values)})
    )
    out = tmp_path / "out"
    src = {"img_db": img_db, "txt_db": txt_db}
    assert main(lmdb_args(src, out, "--max-bad-fraction", "1")) == 0
    assert not marker.exists()
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["totals"]["skipped_images"] == {"pickle": 2}
    assert sorted(read_all(out)) == ["a_good"]


# --------------------------------------------------------------------------------------------
# BUTD TSV


def b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array, dtype=np.float32).tobytes()).decode()


def coco_json(path: Path, images: list[dict], captions: list[tuple[int, str]]) -> Path:
    annotations = [{"id": i, "image_id": im, "caption": c} for i, (im, c) in enumerate(captions)]
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    return path


@pytest.fixture
def tsv_source(tmp_path, rng):
    """Two TSV files (soft labels and confidences appended) and a COCO caption JSON."""
    rows, truth = [], {}
    for image_id, n in ((42, 36), (7, 12), (99, 50), (13, 10), (8, 25)):
        w, h = int(rng.integers(300, 700)), int(rng.integers(300, 700))
        x1 = rng.uniform(0, w / 2, n)
        y1 = rng.uniform(0, h / 2, n)
        boxes = np.stack([x1, y1, x1 + rng.uniform(1, w / 2, n), y1 + rng.uniform(1, h / 2, n)], 1)
        feat = rng.random((n, IMG_DIM)).astype(np.float32)
        cls_prob = rng.dirichlet(np.full(IMG_LABEL_DIM, 0.1), n).astype(np.float32)
        truth[image_id] = dict(
            w=w, h=h, boxes=boxes.astype(np.float32), features=feat, soft_labels=cls_prob
        )
        rows.append([str(image_id), str(w), str(h), str(n), b64(boxes), b64(feat), b64(cls_prob)])
    rows.insert(2, ["11", "640", "480", "3", b64(np.zeros((2, 4))), "", ""])  # wrong size: bad
    rows.append(rows[0])  # image 42 again: a duplicate
    files = [tmp_path / "feat.tsv.0", tmp_path / "feat.tsv.1"]
    for path, part in zip(files, (rows[:3], rows[3:]), strict=True):
        path.write_text("".join("\t".join(r) + "\n" for r in part))
    images = [
        {"id": i, "file_name": f"COCO_{i:012d}.jpg", "width": 1, "height": 1}
        for i in (42, 7, 99, 13, 8, 5, 11)
    ]
    caps = [
        (42, "A man riding horses."),
        (42, "The dog on the street!"),
        (7, "a man"),
        (99, " ".join(["a"] * 61)),
        (99, "A dog."),
        (13, "horses , horses"),
        (8, "a"),
        (5, "A horse."),
        (11, "a dog"),
    ]  # 5 has no features; 99's first caption is too long
    captions = coco_json(tmp_path / "captions.json", images, caps)
    vocab = write_vocab(tmp_path / "vocab.txt")
    return {"files": files, "captions": captions, "vocab": vocab, "truth": truth}


def tsv_args(src, out: Path, *extra: str, fields: str = "cls_prob") -> list[str]:
    args = ["butd-tsv"]
    for f in src["files"]:
        args += ["--tsv", str(f)]
    return [
        *args,
        "--fields",
        "image_id,image_w,image_h,num_boxes,boxes,features" + (f",{fields}" if fields else ""),
        "--captions",
        str(src["captions"]),
        "--vocab",
        str(src["vocab"]),
        "--out",
        str(out),
        "--max-samples",
        "2",
        "--max-bad-fraction",
        "0.5",
        "--no-progress",
        *extra,
    ]


def test_butd_tsv_normalises_boxes_and_tokenises(tsv_source, tmp_path):
    out = tmp_path / "out"
    assert main(tsv_args(tsv_source, out)) == 0
    records = read_all(out)
    assert sorted(records) == ["13", "42", "7", "8", "99"]
    for key, rec in records.items():
        t = tsv_source["truth"][int(key)]
        b = t["boxes"].astype(np.float64) / [t["w"], t["h"], t["w"], t["h"]]
        wh = b[:, 2:] - b[:, :2]
        loc7 = np.concatenate([b, wh, wh[:, :1] * wh[:, 1:]], 1).astype(np.float32)
        conf = t["soft_labels"][:, 1:].max(1)
        feat, loc, soft = expected_regions(t, loc7, conf)
        assert rec.feat.tobytes() == feat.tobytes() and rec.soft.tobytes() == soft.tobytes()
        np.testing.assert_array_equal(rec.loc, loc)
        assert rec.meta["width"] == t["w"]
    w = WORD_ID
    assert [c.tolist() for c in records["42"].captions] == [
        [w["A"], w["man"], w["riding"], w["horse"], w["##s"], w["."]],
        [w["The"], w["dog"], w["on"], 100, w["street"], w["!"]],  # "the" is not in the vocab
    ]
    assert [c.tolist() for c in records["99"].captions] == [[w["A"], w["dog"], w["."]]]
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    totals = manifest["totals"]
    assert totals["skipped_images"] == {"duplicate_image": 1, "no_features": 1, "shape": 1}
    assert totals["source_images"] == 8 and totals["bad_images"] == 3
    assert totals["left_out_captions"] == {"too_long": 1}
    assert manifest["region_selection"]["confidence_source"] == {"cls_prob_max": 5}
    assert manifest["soft_labels"] == "source" and manifest["warnings"] == []
    assert [s["samples"] for s in manifest["shards"]] == [2, 2, 1]
    assert manifest["vocab"]["lowercase"] is False


def test_butd_tsv_without_soft_labels(tsv_source, tmp_path, capsys):
    # The files hold a cls_prob column; naming only six fields makes every row one too long,
    # so write a six-column copy.
    for f in tsv_source["files"]:
        f.write_text(
            "".join("\t".join(line.split("\t")[:6]) + "\n" for line in f.read_text().splitlines())
        )
    out = tmp_path / "out"
    assert main(tsv_args(tsv_source, out, fields="")) == 1
    assert "no cls_prob column" in capsys.readouterr().err
    assert not (out / MANIFEST_NAME).exists()
    assert main(tsv_args(tsv_source, out, "--missing-soft-labels", "uniform", fields="")) == 0
    assert "MRC and MRC-kl targets are meaningless" in capsys.readouterr().err
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["soft_labels"] == "uniform" and len(manifest["warnings"]) == 2
    assert manifest["region_selection"]["confidence_source"] == {"file_order": 5}
    rec = read_all(out)["99"]
    t = tsv_source["truth"][99]
    assert rec.num_regions == 50  # no confidence: the first (up to 100) in file order
    assert rec.feat.tobytes() == t["features"].astype(np.float16).tobytes()
    assert np.allclose(rec.soft[:, 1:].astype(np.float64), 1 / 1600, rtol=1e-3)
    assert (rec.soft[:, 0] == 0).all()


# --------------------------------------------------------------------------------------------
# Per-image npz + captions


def test_npz_captions_and_vocab_check(tmp_path, rng, capsys):
    npz_dir = tmp_path / "npz"
    npz_dir.mkdir()
    a = make_image(rng, 30, 15)
    np.savez_compressed(npz_dir / "COCO_000000000001.npz", **a)  # by file_name stem
    b = make_image(rng, 14, 2)
    boxes = np.array([[10, 20, 110, 220]] * 14, dtype=np.float32)
    np.savez_compressed(
        npz_dir / "2.npz",  # by image id, pixel boxes and no conf: max soft label ranks
        features=b["features"],
        boxes=boxes,
        soft_labels=b["soft_labels"],
        image_w=200,
        image_h=400,
    )
    np.savez_compressed(npz_dir / "3.npz", **make_image(rng, 12, 12))  # captions all too long
    np.savez_compressed(npz_dir / "orphan.npz", **make_image(rng, 12, 12))  # no image listed
    images = [
        {"id": 2, "file_name": "x/COCO_000000000002.jpg"},
        {"id": 1, "file_name": "COCO_000000000001.jpg", "width": 640, "height": 480},
        {"id": 3},
    ]
    caps = [(1, "A man."), (2, "a dog"), (3, " ".join(["dog"] * 61)), (1, "horses")]
    captions = coco_json(tmp_path / "caps.json", images, caps)
    vocab = write_vocab(tmp_path / "vocab.txt")
    out = tmp_path / "out"
    args = [
        "npz-captions",
        "--npz-dir",
        str(npz_dir),
        "--captions",
        str(captions),
        "--vocab",
        str(vocab),
        "--out",
        str(out),
        "--no-progress",
        "--max-bad-fraction",
        "0",
    ]
    assert main(args) == 0
    records = read_all(out)
    assert sorted(records) == ["1", "2"]
    w = WORD_ID
    assert [c.tolist() for c in records["1"].captions] == [
        [w["A"], w["man"], w["."]],
        [w["horse"], w["##s"]],
    ]
    nb = a["norm_bb"]
    feat, loc, soft = expected_regions(a, np.concatenate([nb, nb[:, 4:5] * nb[:, 5:6]], 1))
    assert (
        records["1"].feat.tobytes() == feat.tobytes()
        and records["1"].loc.tobytes() == loc.tobytes()
    )
    rec2 = records["2"]
    assert rec2.num_regions == 10
    np.testing.assert_allclose(rec2.loc[0], [0.05, 0.05, 0.55, 0.55, 0.5, 0.5, 0.25], rtol=1e-6)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["totals"]["skipped_images"] == {"no_caption": 1, "no_caption_left": 1}
    assert manifest["region_selection"]["confidence_source"] == {"conf": 1, "soft_labels_max": 1}
    # Images in order of id.
    assert [s["first_key"] for s in manifest["shards"]] == ["1"]

    bad_vocab = tmp_path / "bad_vocab.txt"
    lines = vocab.read_text().splitlines()
    lines[101], lines[102] = lines[102], lines[101]
    bad_vocab.write_text("\n".join(lines[:-5]) + "\n")
    args[args.index(str(vocab))] = str(bad_vocab)
    args[args.index(str(out))] = str(tmp_path / "out2")
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "not the model's vocabulary" in err and "id 101 is '[SEP]'" in err and "28991" in err


# --------------------------------------------------------------------------------------------
# Karpathy's split files (retrieval): dataset_coco.json, dataset_flickr30k.json


def karpathy_entry(split: str, sentences: list[tuple[int, str]], *, cocoid=None, filename=None):
    """One image of a Karpathy split file (COCO's carry a cocoid, Flickr30k's do not)."""
    entry = {
        "filepath": "val2014",
        "filename": filename or f"COCO_val2014_{cocoid:012d}.jpg",
        "imgid": 0,
        "split": split,
        "sentids": [sid for sid, _ in sentences],
        "sentences": [
            {"raw": raw, "tokens": raw.lower().split(), "sentid": sid, "imgid": 0}
            for sid, raw in sentences
        ],
    }
    if cocoid is not None:
        entry["cocoid"] = cocoid
    return entry


def karpathy_json(path: Path, images: list[dict], dataset: str = "coco") -> Path:
    path.write_text(json.dumps({"dataset": dataset, "images": images}))
    return path


def test_npz_captions_karpathy_splits(tmp_path, rng, capsys):
    npz_dir = tmp_path / "npz"
    npz_dir.mkdir()
    for name in ("COCO_val2014_000000391895", "42", "COCO_val2014_000000000007", "11"):
        np.savez_compressed(npz_dir / f"{name}.npz", **make_image(rng, 12, 4))
    np.savez_compressed(npz_dir / "COCO_val2014_000000000009.npz", **make_image(rng, 12, 4))
    images = [
        karpathy_entry(
            "test", [(770337, "A man riding horses."), (771687, "The dog")], cocoid=391895
        ),
        karpathy_entry("restval", [(5, "a dog")], cocoid=42),  # .npz named by cocoid
        karpathy_entry("train", [(6, "A horse.")], cocoid=7),
        karpathy_entry("val", [(8, "a man")], cocoid=9),  # not chosen: its .npz is not counted
        karpathy_entry("train", [(12, " ".join(["a"] * 61))], cocoid=11),  # too long
    ]
    captions = karpathy_json(tmp_path / "dataset_coco.json", images)
    vocab = write_vocab(tmp_path / "vocab.txt")

    def run(out: str, *extra: str, file: Path = captions) -> int:
        return main(
            ["npz-captions", "--npz-dir", str(npz_dir), "--captions", str(file), "--vocab",
             str(vocab), "--out", str(tmp_path / out), "--no-progress", *extra]
        )  # fmt: skip

    assert run("train", "--karpathy-split", "train,restval") == 0
    records = read_all(tmp_path / "train")
    assert sorted(records, key=int) == ["7", "42"]
    assert records["42"].meta["caption_ids"] == ["5"] and records["7"].meta["caption_ids"] == ["6"]
    assert [c.tolist() for c in records["42"].captions] == [[WORD_ID["a"], WORD_ID["dog"]]]
    manifest = json.loads((tmp_path / "train" / MANIFEST_NAME).read_text())
    assert manifest["totals"]["skipped_images"] == {"no_caption_left": 1}
    assert manifest["source"]["arguments"]["karpathy_split"] == ["train", "restval"]
    assert manifest["source"]["inputs"][0]["karpathy_split"] == ["train", "restval"]

    assert run("test", "--karpathy-split", "test") == 0
    (test,) = read_all(tmp_path / "test").values()
    assert test.key == "391895" and test.meta["caption_ids"] == ["770337", "771687"]
    w = WORD_ID
    assert test.captions[0].tolist() == [
        w["A"],
        w["man"],
        w["riding"],
        w["horse"],
        w["##s"],
        w["."],
    ]

    # The option is required for Karpathy's files, refused for COCO's, checked for names.
    capsys.readouterr()
    assert run("none") == 1
    assert "Karpathy's split files: choose its splits with --karpathy-split" in (
        capsys.readouterr().err
    )
    coco = coco_json(tmp_path / "coco.json", [{"id": 42}], [(42, "a dog")])
    assert run("coco", "--karpathy-split", "test", file=coco) == 1
    assert "not one of Karpathy's split files" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        run("bad", "--karpathy-split", "train,bogus")
    assert info.value.code == 2 and "bogus" in capsys.readouterr().err


def test_npz_captions_karpathy_flickr(tmp_path, rng):
    npz_dir = tmp_path / "npz"
    npz_dir.mkdir()
    img = make_image(rng, 14, 6)
    np.savez_compressed(npz_dir / "1000092795.npz", **img)  # Flickr30k: named by filename stem
    images = [
        karpathy_entry("test", [(0, "A man."), (1, "a dog")], filename="1000092795.jpg"),
        karpathy_entry("train", [(2, "a horse")], filename="10002456.jpg"),
    ]
    captions = karpathy_json(tmp_path / "dataset_flickr30k.json", images, "flickr30k")
    out = tmp_path / "out"
    args = ["npz-captions", "--npz-dir", str(npz_dir), "--captions", str(captions), "--vocab"]
    args += [str(write_vocab(tmp_path / "vocab.txt")), "--out", str(out), "--no-progress"]
    # restval does not exist in Flickr30k: said, not fatal.
    assert main([*args, "--karpathy-split", "test,restval"]) == 0
    (rec,) = read_all(out).values()
    assert rec.key == "1000092795" and rec.meta["image_id"] == "1000092795"
    assert rec.meta["caption_ids"] == ["0", "1"] and len(rec.captions) == 2
    assert rec.meta["file_name"] == "1000092795.jpg"
    feat, _, _ = expected_regions(img, loc_from_norm_bb_7(img["norm_bb"]))
    assert rec.feat.tobytes() == feat.tobytes()
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert any("no image in Karpathy split(s) restval" in w for w in manifest["warnings"])


def loc_from_norm_bb_7(nb: np.ndarray) -> np.ndarray:
    return np.concatenate([nb, nb[:, 4:5] * nb[:, 5:6]], 1)


def test_butd_tsv_karpathy_split(tsv_source, tmp_path):
    images = [
        karpathy_entry("test", [(100, "A man riding horses."), (101, "a dog")], cocoid=42),
        karpathy_entry("test", [(102, "a man")], cocoid=7),
        *(karpathy_entry("train", [(200 + i, "a dog")], cocoid=i) for i in (99, 13, 8)),
    ]
    tsv_source["captions"] = karpathy_json(tmp_path / "dataset_coco.json", images)
    out = tmp_path / "out"
    assert main(tsv_args(tsv_source, out, "--karpathy-split", "test")) == 0
    records = read_all(out)
    assert sorted(records) == ["42", "7"]
    assert records["42"].meta["caption_ids"] == ["100", "101"]
    assert records["7"].meta["caption_ids"] == ["102"]
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["source"]["arguments"]["captions"] == str(tsv_source["captions"].resolve())
    assert {"karpathy_split": ["test"]}.items() <= manifest["source"]["inputs"][2].items()
    # The train images' TSV lines are not captioned in this split: skipped by policy.
    assert manifest["totals"]["skipped_images"]["no_caption"] == 4  # 99, 13, 8 and 11
    # Without the option the file is refused.
    assert main(tsv_args(tsv_source, tmp_path / "out2")) == 1


# --------------------------------------------------------------------------------------------
# Bad fraction, refusals, resume


def test_bad_fraction_fails_then_finishes_with_a_higher_threshold(lmdb_source, tmp_path, capsys):
    out = tmp_path / "out"
    args = lmdb_args(lmdb_source, out)
    args[args.index("--max-bad-fraction") + 1] = "0.01"
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "more than --max-bad-fraction 0.01" in err
    assert "nonfinite: 1 (e.g. coco_b_nan.npz: features: has 1 NaN/Inf values)" in err
    assert not (out / MANIFEST_NAME).exists() and (out / JOURNAL_NAME).exists()
    first = shard_bytes(out)
    assert main(lmdb_args(lmdb_source, out)) == 0  # same command, higher threshold: finishes
    assert shard_bytes(out) == first and not (out / JOURNAL_NAME).exists()


def test_refuses_finished_or_different_output(lmdb_source, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(lmdb_args(lmdb_source, out)) == 0
    assert main(lmdb_args(lmdb_source, out)) == 1
    assert "already holds a finished conversion" in capsys.readouterr().err
    assert main(lmdb_args(lmdb_source, out, "--overwrite", "--max-samples", "1")) == 0
    assert len(list(out.glob("*.tar"))) == 7
    # An unfinished conversion by another command is refused.
    (out / MANIFEST_NAME).unlink()
    journal = {"format": common.JOURNAL_FORMAT, "identity": {"other": 1}, "shards": []}
    (out / JOURNAL_NAME).write_text(json.dumps(journal))
    assert main(lmdb_args(lmdb_source, out)) == 1
    assert "different command" in capsys.readouterr().err


class Killed(BaseException):
    """Stands in for a kill: not an Exception, so nothing on the way up handles it."""


def test_resume_in_process_is_byte_identical(lmdb_source, tmp_path, monkeypatch):
    ref = tmp_path / "ref"
    two = ("--max-samples", "2")
    assert main(lmdb_args(lmdb_source, ref, *two)) == 0
    out = tmp_path / "out"
    write = ShardWriter.write
    calls = []

    def dying_write(self, record):
        calls.append(record.key)
        if len(calls) == 4:
            raise Killed
        return write(self, record)

    monkeypatch.setattr(ShardWriter, "write", dying_write)
    with pytest.raises(Killed):
        main(lmdb_args(lmdb_source, out, *two))
    monkeypatch.setattr(ShardWriter, "write", write)
    # What a kill at other moments leaves: a torn shard and a half-written journal.
    (out / ".coco-000007.tar.123.0badcafe.partial").write_bytes(b"torn")
    (out / f".{JOURNAL_NAME}.123.tmp").write_text("{")
    journal = json.loads((out / JOURNAL_NAME).read_text())
    assert (
        1 <= len(journal["shards"]) < len(json.loads((ref / MANIFEST_NAME).read_text())["shards"])
    )
    assert main(lmdb_args(lmdb_source, out, *two)) == 0
    assert shard_bytes(out) == shard_bytes(ref)
    assert (out / MANIFEST_NAME).read_bytes() == (ref / MANIFEST_NAME).read_bytes()
    assert not list(out.glob(".*"))


def test_resume_after_sigkill_is_byte_identical(tsv_source, tmp_path):
    ref = tmp_path / "ref"
    assert main(tsv_args(tsv_source, ref)) == 0
    out = tmp_path / "out"
    # Kill the CLI (SIGKILL: no cleanup at all) in the middle of its second shard.
    script = textwrap.dedent(
        """
        import os, signal, sys
        from uniter_fast.data.shards import ShardWriter
        from uniter_fast.convert.__main__ import main
        write, calls = ShardWriter.write, []
        def dying_write(self, record):
            calls.append(1)
            if len(calls) == 4:
                os.kill(os.getpid(), signal.SIGKILL)
            return write(self, record)
        ShardWriter.write = dying_write
        main(sys.argv[1:])
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, *tsv_args(tsv_source, out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -9, proc.stderr
    assert [p.name for p in out.glob("*.tar")] == ["shard-000000.tar"]
    assert list(out.glob(".shard-000001.tar.*.partial"))  # the torn second shard
    assert main(tsv_args(tsv_source, out)) == 0
    assert shard_bytes(out) == shard_bytes(ref)
    assert (out / MANIFEST_NAME).read_bytes() == (ref / MANIFEST_NAME).read_bytes()
    assert not list(out.glob(".*"))


# --------------------------------------------------------------------------------------------
# verify


def test_verify_names_corrupted_shard_and_sample(lmdb_source, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(lmdb_args(lmdb_source, out)) == 0
    capsys.readouterr()
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    victim = manifest["shards"][1]
    path = out / victim["name"]
    data = bytearray(path.read_bytes())
    # Break the .npy header of the shard's last sample's features.
    key = victim["last_key"]
    member = data.index(f"{key}.feat.npy".encode())
    magic = data.index(b"\x93NUMPY", member)
    data[magic : magic + 6] = b"garbag"
    path.write_bytes(bytes(data))
    assert main(["verify", str(out), "--no-progress"]) == 1
    text = capsys.readouterr().out
    assert f"{victim['name']}: sample {key!r}: feat.npy" in text
    assert f"{victim['name']}: sha256" in text and "FAILED" in text

    # Keys must be unique across the set: a copy of a shard under another name.
    path.write_bytes((out / manifest["shards"][0]["name"]).read_bytes())
    assert main(["verify", str(out / "coco-*.tar"), "--no-progress"]) == 1
    assert "duplicate_key" in capsys.readouterr().out


def test_imports_stay_lazy():
    code = (
        "import sys, uniter_fast, uniter_fast.convert, uniter_fast.convert.common;"
        "print(sorted(m for m in ('lmdb', 'tokenizers', 'msgpack', 'lz4') if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_run_conversion_api(lmdb_source, tmp_path):
    from uniter_fast.convert.lmdb import LmdbSource

    opts = ConvertOptions(out=tmp_path / "api", prefix="coco", max_bad_fraction=0.5, progress=False)
    src = LmdbSource(lmdb_source["img_db"], lmdb_source["txt_db"], dataset="coco")
    manifest = run_conversion(src, opts, log=lambda line: None)
    assert manifest["totals"]["images"] == 7 and manifest["options"]["dataset"] == "coco"
    with pytest.raises(ConvertError, match="finished conversion"):
        run_conversion(src, opts, log=lambda line: None)
    assert os.path.exists(tmp_path / "api" / "coco-000000.tar")


def test_lmdb_caption_map_without_txt2img(lmdb_source, tmp_path):
    """img2txts.json, or a scan of the text DB, group the captions as txt2img.json does."""
    txt_db = lmdb_source["txt_db"]
    ref = tmp_path / "ref"
    assert main(lmdb_args(lmdb_source, ref)) == 0
    txt2img = json.loads((txt_db / "txt2img.json").read_text())
    img2txts: dict[str, list[str]] = {}
    for tid, img in txt2img.items():
        img2txts.setdefault(img, []).append(tid)
    (txt_db / "txt2img.json").unlink()
    (txt_db / "img2txts.json").write_text(json.dumps(img2txts))
    assert main(lmdb_args(lmdb_source, tmp_path / "by_img2txts")) == 0
    assert shard_bytes(tmp_path / "by_img2txts") == shard_bytes(ref)
    (txt_db / "img2txts.json").unlink()
    assert main(lmdb_args(lmdb_source, tmp_path / "by_scan")) == 0
    assert shard_bytes(tmp_path / "by_scan") == shard_bytes(ref)


def test_shard_writer_start_index_and_finished_info(tmp_path):
    """The ShardWriter additions resuming relies on: start_index, `finished`, the callback."""

    def make_record(key: str, seed: int = 0) -> ImageRecord:
        rng = np.random.default_rng(seed)
        return ImageRecord(
            key=key,
            feat=rng.standard_normal((10, IMG_DIM)).astype(np.float16),
            loc=rng.random((10, 7)).astype(np.float32),
            soft=np.full((10, IMG_LABEL_DIM), 1 / IMG_LABEL_DIM, np.float16),
            captions=[np.array([1000, 1001], np.int32)] * 3,
            meta={},
        )

    seen = []
    with ShardWriter(tmp_path, prefix="s", max_samples=2, on_shard_finished=seen.append) as w:
        for i in range(3):
            w.write(make_record(key=f"k{i}", seed=i))
    assert [s["name"] for s in w.finished] == [
        "s-000000.tar",
        "s-000001.tar",
    ] and seen == w.finished
    first = w.finished[0]
    data = (tmp_path / "s-000000.tar").read_bytes()
    assert first["sha256"] == hashlib.sha256(data).hexdigest() and first["bytes"] == len(data)
    assert (first["samples"], first["first_key"], first["last_key"]) == (2, "k0", "k1")
    assert first["pairs"] == 6
    # Shards below start_index are the resumed run's: kept; those at or above it conflict.
    with pytest.raises(FileExistsError):
        ShardWriter(tmp_path, prefix="s", start_index=1)
    with ShardWriter(tmp_path, prefix="s", start_index=1, overwrite=True) as w:
        w.write(make_record(key="k9"))
    assert (tmp_path / "s-000000.tar").read_bytes() == data
    assert [s["first_key"] for s in w.finished] == ["k9"]
