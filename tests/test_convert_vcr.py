"""VCR converters (vcr-jsonl, vcr-lmdb) on hand-made files, and the rule that turns object
references into token ids (persons -> tags 28996 + rank, other objects -> class words, "and")."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_convert import (
    expected_regions,
    make_image,
    npz_bytes,
    text_value,
    write_lmdb,
)

from uniter_fast.convert.__main__ import main
from uniter_fast.convert.captions import WordPiece
from uniter_fast.convert.common import (
    JOURNAL_NAME,
    MANIFEST_NAME,
    loc_from_norm_bb,
    loc_from_pixel_boxes,
)
from uniter_fast.convert.vcr import MAX_PERSON_TAG, TAG_BASE, vcr_tokens
from uniter_fast.data.schema import BERT_BASE_CASED, IMG_LABEL_DIM
from uniter_fast.data.shards import ShardWriter, list_shards
from uniter_fast.data.task_shards import VCR_VOCAB_SIZE, iter_task_shard

META = {"bert": "bert-base-cased", "UNK": 100, "CLS": 101, "SEP": 102, "MASK": 103}
WORDS = ["Why", "is", "smiling", "at", "?", "and", "car", "dining", "table", "He", "happy", "."]
W = {w: 999 + i for i, w in enumerate(WORDS)}
PERSON_0, PERSON_1, PERSON_2 = TAG_BASE, TAG_BASE + 1, TAG_BASE + 2
OBJECTS = ["person", "car", "person", "dining table", "person"]


def write_vocab(path):
    """bert-base-cased's size and special ids, the words above from id 999."""
    tokens = ["[PAD]"] + [f"[unused{i}]" for i in range(1, 100)]
    tokens += ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokens += [f"[unused{i}]" for i in range(100, 995)]
    tokens += WORDS
    tokens += [f"zz{i}" for i in range(BERT_BASE_CASED.size - len(tokens))]
    path.write_text("\n".join(tokens) + "\n", encoding="utf-8")
    return path


def _records(out):
    return {r.key: r for u in list_shards(str(out)) for r in iter_task_shard(u, "vcr")}


def _shard_bytes(out):
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}


# --------------------------------------------------------------------------------------------
# The rule


def test_object_references_become_tags_class_words_and_and(tmp_path):
    tok = WordPiece(write_vocab(tmp_path / "vocab.txt"))
    question = ["Why", "is", [0], "smiling", "at", [1, 2], "?"]
    assert vcr_tokens(question, OBJECTS, tok) == [
        W["Why"], W["is"], PERSON_0, W["smiling"], W["at"], W["car"], W["and"], PERSON_1, W["?"],
    ]  # fmt: skip
    # person 4 is the third person; "dining table" is two words; three indices, two "and"s
    assert vcr_tokens([[4], "is", "happy"], OBJECTS, tok) == [PERSON_2, W["is"], W["happy"]]
    assert vcr_tokens([[2, 3, 4], "."], OBJECTS, tok) == [
        PERSON_1, W["and"], W["dining"], W["table"], W["and"], PERSON_2, W["."],
    ]  # fmt: skip
    # The rank counts persons only, and stops at the 81st tag.
    assert vcr_tokens([[2]], ["car", "car", "person"], tok) == [PERSON_0]
    crowd = ["person"] * 85 + ["car"]
    tags = [vcr_tokens([[k]], crowd, tok)[0] for k in (0, 79, 80, 84)]
    assert tags == [TAG_BASE, TAG_BASE + 79, TAG_BASE + MAX_PERSON_TAG, TAG_BASE + 80]
    assert TAG_BASE + MAX_PERSON_TAG == VCR_VOCAB_SIZE - 1 == 29076
    assert vcr_tokens([[85], "is", [84]], crowd, tok) == [W["car"], W["is"], 29076]
    # Words tokenised alone or joined by spaces: the same ids.
    assert vcr_tokens(["He", "is", "happy"], [], tok) == tok.encode(["He is happy"])[0]
    with pytest.raises(ValueError, match="refers to object 5, outside the image's 5 objects"):
        vcr_tokens(["Why", [5]], OBJECTS, tok)
    with pytest.raises(ValueError, match="neither a word nor a list of object indices"):
        vcr_tokens(["Why", []], OBJECTS, tok)


# --------------------------------------------------------------------------------------------
# vcr-jsonl


# Choices for frames with at least one object, and for frame A (OBJECTS).
ANSWERS = [["He", "is", "happy"], [[0], "is", "happy"], ["car"], ["."]]
RATIONALES = [["Why", "?"], ["."], [[0], "."], ["He"]]
ANSWERS_A = [*ANSWERS[:3], [[1, 0]]]
RATIONALES_A = [*RATIONALES[:2], [[2], "."], ["He", "is", "at", [3]]]


def _line(annot_id, img_fn, objects, question, answer_label=1, rationale_label=2, **extra):
    line = {
        "annot_id": annot_id,
        "img_fn": img_fn,
        "metadata_fn": img_fn.rsplit(".", 1)[0] + ".json",
        "objects": objects,
        "question": question,
        "answer_choices": ANSWERS_A if objects == OBJECTS else ANSWERS,
        "rationale_choices": RATIONALES_A if objects == OBJECTS else RATIONALES,
        "answer_label": answer_label,
        "rationale_label": rationale_label,
    }
    line.update(extra)
    return {k: v for k, v in line.items() if v is not None}


@pytest.fixture
def vcr_files(tmp_path, rng):
    """The VCR JSONL, ground-truth and detected .npz, and metadata of six frames."""
    gt_dir, det_dir, meta_dir = tmp_path / "gt", tmp_path / "det", tmp_path / "vcr1images"
    for d in (gt_dir, det_dir, meta_dir / "movieclips_x"):
        d.mkdir(parents=True)
    gt, det = {}, {}
    # A: sizes from the npz; gt named after img_fn with '/' -> '_', detections after its stem
    gt["A"] = {**make_image(rng, 5, 5), "image_w": 640, "image_h": 360}
    np.savez(gt_dir / "lsmdc_m_m_00.01@0.npz", **gt["A"])
    det["A"] = make_image(rng, 30, 14)
    np.savez(det_dir / "m_00.01@0.npz", **det["A"])
    # B: 2 ground-truth boxes for 3 objects
    np.savez(gt_dir / "lsmdc_m_m_00.02@0.npz", **make_image(rng, 2, 2), image_w=9, image_h=9)
    np.savez(det_dir / "lsmdc_m_m_00.02@0.npz", **make_image(rng, 12, 3))
    # C: pixel boxes normalised by the metadata's size; detections without soft labels
    gt["C"] = make_image(rng, 2, 2)
    corners = np.sort(rng.uniform(0, 300, (2, 2, 2)), axis=1)
    gt["C"]["boxes"] = corners.reshape(2, 4).astype(np.float32)
    np.savez(gt_dir / "x_1@1.npz", **{k: v for k, v in gt["C"].items() if k != "norm_bb"})
    det["C"] = make_image(rng, 12, 11)
    np.savez(det_dir / "x_1@1.npz", **{k: v for k, v in det["C"].items() if k != "soft_labels"})
    (meta_dir / "movieclips_x" / "x_1@1.json").write_text(
        json.dumps({"boxes": [], "names": ["person", "dog"], "width": 500, "height": 300})
    )
    # D: no features. E: no size anywhere. F: the test split (no labels)
    np.savez(gt_dir / "e_1@0.npz", **make_image(rng, 1, 1))
    np.savez(det_dir / "e_1@0.npz", **make_image(rng, 12, 3))
    gt["F"] = {**make_image(rng, 1, 1), "image_w": 100, "image_h": 80}
    np.savez(gt_dir / "f_1@0.npz", **gt["F"])
    np.savez(det_dir / "f_1@0.npz", **make_image(rng, 12, 3))

    a, b, c = "lsmdc_m/m_00.01@0.jpg", "lsmdc_m/m_00.02@0.jpg", "movieclips_x/x_1@1.jpg"
    q = ["Why", "is", [0], "smiling", "at", [1, 2], "?"]
    lines = [
        _line("train-1", a, OBJECTS, q),
        _line("train-2", a, OBJECTS, [[4], "is", "happy"], answer_label=0, rationale_label=3),
        _line("train-3", a, OBJECTS, ["Why", [7]]),  # refers to an object the frame lacks
        _line("train-4", a, OBJECTS, ["Why"], answer_label=5),  # a bad label
        _line("train-1", a, OBJECTS, ["Why"]),  # annot_id read before
        _line("train-5", b, ["person", "car", "person"], ["Why", [1]]),
        _line("train-6", c, ["person", "dog"], ["Why", "is", [0], "?"]),
        _line("train-7", "lsmdc_m/m_00.03@0.jpg", ["person"], ["Why"]),
        _line("train-8", "e/e_1@0.jpg", ["person"], ["Why"]),
        _line("test-1", "f/f_1@0.jpg", ["car"], ["Why", [0]], None, None),
        {**_line("train-9", a, OBJECTS, ["Why"]), "answer_choices": [["a"]] * 3},
    ]
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text("\n".join(json.dumps(x) for x in lines) + "\n{not json\n")
    write_vocab(tmp_path / "vocab.txt")
    return {"path": tmp_path, "gt": gt, "det": det, "jsonl": jsonl}


def _jsonl_args(src, out, *extra):
    p = src["path"]
    return [
        "vcr-jsonl", "--jsonl", str(src["jsonl"]), "--gt-npz-dir", str(p / "gt"),
        "--det-npz-dir", str(p / "det"), "--metadata-dir", str(p / "vcr1images"),
        "--vocab", str(p / "vocab.txt"), "--out", str(out), "--no-progress",
        "--max-bad-fraction", "0.9", "--dataset", "vcr_train", *extra,
    ]  # fmt: skip


def test_vcr_jsonl_converts_and_counts(vcr_files, capsys):
    src = vcr_files
    out = src["path"] / "out"
    assert main(_jsonl_args(src, out)) == 0, capsys.readouterr().err
    records = _records(out)
    assert sorted(records) == ["f_f_1@0", "lsmdc_m_m_00_01@0"]

    rec = records["lsmdc_m_m_00_01@0"]
    assert rec.meta["image_id"] == "lsmdc_m/m_00.01@0.jpg" and rec.meta["dataset"] == "vcr_train"
    assert rec.meta["objects"] == OBJECTS
    assert (rec.meta["width"], rec.meta["height"]) == (640, 360)
    assert [i["id"] for i in rec.items] == ["train-1", "train-2"]
    first, second = rec.items
    assert first["question"] == [
        W["Why"], W["is"], PERSON_0, W["smiling"], W["at"], W["car"], W["and"], PERSON_1, W["?"],
    ]  # fmt: skip
    assert second["question"] == [PERSON_2, W["is"], W["happy"]]
    assert first["answers"] == [
        [W["He"], W["is"], W["happy"]],
        [PERSON_0, W["is"], W["happy"]],
        [W["car"]],
        [W["car"], W["and"], PERSON_0],
    ]
    assert first["rationales"][2:] == [
        [PERSON_1, W["."]],
        [W["He"], W["is"], W["at"], W["dining"], W["table"]],
    ]
    assert (first["answer_label"], first["rationale_label"]) == (1, 2)
    assert (second["answer_label"], second["rationale_label"]) == (0, 3)
    # Ground truth: every box, region k = object k; detections: the usual selection.
    (gt_feat, gt_loc), (det_feat, det_loc) = rec.images
    gt = src["gt"]["A"]
    assert gt_feat.tobytes() == gt["features"].astype(np.float16).tobytes()
    np.testing.assert_array_equal(gt_loc, loc_from_norm_bb(gt["norm_bb"]))
    assert rec.soft[0].tobytes() == gt["soft_labels"].astype(np.float16).tobytes()
    det = src["det"]["A"]
    feat, loc, soft = expected_regions(det, loc_from_norm_bb(det["norm_bb"]))
    assert det_feat.tobytes() == feat.tobytes() and rec.soft[1].tobytes() == soft.tobytes()
    np.testing.assert_array_equal(det_loc, loc)

    test = records["f_f_1@0"].items[0]  # the test split: no labels
    assert "answer_label" not in test and "rationale_label" not in test
    assert test["question"] == [W["Why"], W["car"]]

    manifest = json.loads((out / MANIFEST_NAME).read_text())
    totals = manifest["totals"]
    assert totals["skipped_images"] == {
        "image_size": 1,
        "missing_field": 1,
        "no_features": 1,
        "region_count": 1,
    }
    assert totals["left_out_captions"] == {
        "decode": 2,
        "duplicate_id": 1,
        "label": 1,
        "object_ref": 1,
    }
    assert totals["pairs"] == 3 and totals["images"] == 2
    examples = manifest["examples"]
    assert any("2 ground-truth regions for 3 objects" in e for e in examples["region_count"])
    assert any("x_1@1.npz: is missing (MRC-kl" in e for e in examples["missing_field"])
    assert any("no e/e_1@0.json in" in e for e in examples["image_size"])
    assert any("train.jsonl line 3 (annot_id train-3)" in e for e in examples["caption:object_ref"])
    assert manifest["soft_labels"] == "source"
    assert manifest["vocab"]["object_tags"]["person_tags"] == [28996, 29076]


def test_vcr_jsonl_uniform_soft_labels_and_metadata_size(vcr_files, capsys):
    src = vcr_files
    out = src["path"] / "out"
    assert main(_jsonl_args(src, out, "--missing-soft-labels", "uniform")) == 0
    rec = _records(out)["movieclips_x_x_1@1"]
    assert (rec.meta["width"], rec.meta["height"]) == (500, 300)
    assert rec.items[0]["question"] == [W["Why"], W["is"], PERSON_0, W["?"]]
    gt = src["gt"]["C"]
    np.testing.assert_array_equal(rec.images[0][1], loc_from_pixel_boxes(gt["boxes"], 500, 300))
    uniform = np.full(IMG_LABEL_DIM, 1 / (IMG_LABEL_DIM - 1), np.float16)
    uniform[0] = 0
    assert rec.soft[1].shape == (11, IMG_LABEL_DIM) and (rec.soft[1] == uniform).all()
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["soft_labels"] == "source, uniform where missing"
    assert "missing_field" not in manifest["totals"]["skipped_images"]
    assert any("uniform" in w for w in manifest["warnings"])


class Killed(BaseException):
    """Stands in for a kill: not an Exception, so nothing on the way up handles it."""


def test_vcr_jsonl_resumes_byte_identical_and_refuses_a_finished_output(
    vcr_files, monkeypatch, capsys
):
    src = vcr_files
    one = ("--missing-soft-labels", "uniform", "--max-samples", "1")
    ref = src["path"] / "ref"
    assert main(_jsonl_args(src, ref, *one)) == 0
    assert len(_shard_bytes(ref)) == 3
    out = src["path"] / "out"
    write = ShardWriter.write_sample
    calls = []

    def dying_write(self, key, sample, *, pairs):
        write(self, key, sample, pairs=pairs)  # the second one finishes the first shard
        calls.append(key)
        if len(calls) == 2:
            raise Killed

    monkeypatch.setattr(ShardWriter, "write_sample", dying_write)
    with pytest.raises(Killed):
        main(_jsonl_args(src, out, *one))
    monkeypatch.setattr(ShardWriter, "write_sample", write)
    assert len(json.loads((out / JOURNAL_NAME).read_text())["shards"]) == 1
    assert main(_jsonl_args(src, out, *one)) == 0
    assert "resuming after 1 finished shard" in capsys.readouterr().err
    assert _shard_bytes(out) == _shard_bytes(ref)
    assert (out / MANIFEST_NAME).read_bytes() == (ref / MANIFEST_NAME).read_bytes()
    # A second run of a finished conversion changes nothing: refused without --overwrite.
    assert main(_jsonl_args(src, out, *one)) == 1
    assert "already holds a finished conversion" in capsys.readouterr().err
    assert _shard_bytes(out) == _shard_bytes(ref) and not list(out.glob(".*"))


# --------------------------------------------------------------------------------------------
# vcr-lmdb


def test_vcr_lmdb(tmp_path, rng, capsys):
    gt = {"a": make_image(rng, 3, 3), "b": make_image(rng, 2, 2), "c": make_image(rng, 1, 1)}
    det = {"a": make_image(rng, 20, 12), "b": make_image(rng, 15, 3)}
    del det["b"]["soft_labels"]
    write_lmdb(
        tmp_path / "gt_db",
        {f"vcr_gt_train_{k}@0.npz".encode(): npz_bytes(**v) for k, v in gt.items()},
    )
    write_lmdb(
        tmp_path / "det_db",
        {f"vcr_train_{k}@0.npz".encode(): npz_bytes(**v) for k, v in det.items()},
    )

    def example(image, question, qa=1, qar=3, n_answers=4, **extra):
        return {
            "input_ids": question,
            "input_ids_as": [[1000 + i, TAG_BASE] for i in range(n_answers)],
            "input_ids_rs": [[1010 + i] for i in range(4)],
            "qa_target": qa,
            "qar_target": qar,
            "img_fname": [f"vcr_gt_train_{image}@0.npz", f"vcr_train_{image}@0.npz"],
            **extra,
        }

    examples = {
        "train-0": example("a", [1005, TAG_BASE, 1006], objects=["person", "car", "person"]),
        "train-1": example("a", [29076], 0, 0, objects=["person", "car", "person"]),
        "train-2": example("a", [29077]),  # outside the vocabulary and its tags
        "train-3": example("a", [1005], qa=7),  # a bad target
        "train-4": example("a", [1005], n_answers=3),
        "train-5": example("b", [1005]),  # detections without soft labels
        "train-6": example("c", [1005]),  # not in the detection DB
        "test-0": example("a", [1007], None, None, objects=["person", "car", "person"]),
    }
    examples["train-2"]["objects"] = ["person", "car", "person"]
    values = {k.encode(): text_value(v) for k, v in examples.items()}
    values[b"train-9"] = b"not lz4"
    txt_db = tmp_path / "txt_db"
    write_lmdb(txt_db, values)
    (txt_db / "meta.json").write_text(json.dumps(META))
    (txt_db / "txt2img.json").write_text(
        json.dumps({k: v["img_fname"] for k, v in examples.items()})
    )
    out = tmp_path / "out"
    args = [
        "vcr-lmdb", "--txt-db", str(txt_db), "--gt-img-db", str(tmp_path / "gt_db"),
        "--det-img-db", str(tmp_path / "det_db"), "--out", str(out), "--no-progress",
        "--max-bad-fraction", "0.9",
    ]  # fmt: skip
    assert main(args) == 0, capsys.readouterr().err
    records = _records(out)
    assert sorted(records) == ["vcr_gt_train_a@0"]
    rec = records["vcr_gt_train_a@0"]
    assert [i["id"] for i in rec.items] == ["test-0", "train-0", "train-1"]  # text DB key order
    test, first, second = rec.items
    assert "answer_label" not in test
    assert first["question"] == [1005, TAG_BASE, 1006] and second["question"] == [29076]
    assert first["answers"][3] == [1003, TAG_BASE] and first["rationales"][0] == [1010]
    assert (first["answer_label"], first["rationale_label"]) == (1, 3)
    assert rec.meta["objects"] == ["person", "car", "person"]
    assert rec.meta["images"] == ["vcr_gt_train_a@0.npz", "vcr_train_a@0.npz"]
    assert rec.images[0][0].tobytes() == gt["a"]["features"].astype(np.float16).tobytes()
    assert rec.soft[0].tobytes() == gt["a"]["soft_labels"].astype(np.float16).tobytes()
    feat, _, soft = expected_regions(det["a"], loc_from_norm_bb(det["a"]["norm_bb"]))
    assert rec.images[1][0].tobytes() == feat.tobytes() and rec.soft[1].tobytes() == soft.tobytes()
    totals = json.loads((out / MANIFEST_NAME).read_text())["totals"]
    assert totals["skipped_images"] == {"missing_field": 1, "no_features": 1}
    assert totals["left_out_captions"] == {"decode": 2, "label": 1, "token_id": 1}
    # --missing-soft-labels uniform keeps the frame whose detections have none.
    assert main([*args, "--overwrite", "--missing-soft-labels", "uniform"]) == 0
    assert sorted(_records(out)) == ["vcr_gt_train_a@0", "vcr_gt_train_b@0"]
