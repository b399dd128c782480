"""SNLI-VE and NLVR2 JSONL converters, tried on hand-made files, broken ones included."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_convert import WORD_ID, expected_regions, make_image, write_vocab

from uniter_fast.convert.__main__ import main
from uniter_fast.convert.common import loc_from_norm_bb
from uniter_fast.data.shards import list_shards
from uniter_fast.data.task_shards import iter_task_shard
from uniter_fast.tasks.finetune import examples_of


def _npz(path, img):
    np.savez(path, **img)


def _run(capsys, *args):
    code = main(list(args))
    return code, capsys.readouterr()


def _common(tmp_path, kind, jsonl):
    npz = tmp_path / "npz"
    return [
        kind,
        "--jsonl",
        str(jsonl),
        "--npz-dir",
        str(npz),
        "--vocab",
        str(write_vocab(tmp_path / "vocab.txt")),
        "--out",
        str(tmp_path / "out"),
        "--no-progress",
        "--max-bad-fraction",
        "0.6",
    ]


def test_ve_jsonl(tmp_path, rng, capsys):
    (tmp_path / "npz").mkdir()
    images = {name: make_image(rng, int(rng.integers(16, 40)), 15) for name in ("111", "222")}
    for name, img in images.items():
        _npz(tmp_path / "npz" / f"{name}.npz", img)
    lines = [
        {
            "pairID": "p1",
            "Flikr30kID": "111.jpg",
            "sentence2": "A man riding",
            "gold_label": "entailment",
        },
        {"pairID": "p2", "Flikr30kID": "111.jpg", "sentence2": "The dog", "gold_label": "neutral"},
        {
            "pairID": "p3",
            "Flickr30kID": "222.jpg",
            "sentence2": "a horse",
            "gold_label": "contradiction",
        },
        {
            "pairID": "p4",
            "Flikr30kID": "222.jpg",
            "sentence2": "horses",
            "gold_label": "-",
        },  # no label
        {
            "pairID": "p5",
            "Flikr30kID": "333.jpg",
            "sentence2": "a dog",
            "gold_label": "neutral",
        },  # no npz
    ]
    jsonl = tmp_path / "ve.jsonl"
    jsonl.write_text("\n".join(json.dumps(x) for x in lines) + "\n{not json\n")
    code, out = _run(capsys, *_common(tmp_path, "ve-jsonl", jsonl))
    assert code == 0, out.err
    records = {
        r.key: r for u in list_shards(str(tmp_path / "out")) for r in iter_task_shard(u, "ve")
    }
    assert sorted(records) == ["111", "222"]
    first = records["111"]
    assert [i["id"] for i in first.items] == ["p1", "p2"]
    assert [i["label"] for i in first.items] == [1, 2]
    assert first.items[0]["input_ids"] == [WORD_ID["A"], WORD_ID["man"], WORD_ID["riding"]]
    feat, loc, _ = expected_regions(images["111"], loc_from_norm_bb(images["111"]["norm_bb"]))
    assert np.array_equal(first.images[0][0], feat) and np.array_equal(first.images[0][1], loc)
    # Examples for the loader: one-hot targets over the three labels.
    examples, _ = examples_of(first, 3)
    assert examples[0]["targets"].tolist() == [0.0, 1.0, 0.0]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    totals = manifest["totals"]
    assert totals["images"] == 2 and totals["pairs"] == 3
    assert totals["skipped_images"] == {"no_features": 1}
    assert totals["left_out_captions"] == {"decode": 1, "label": 1}


def test_nlvr2_jsonl_and_resume_refusal(tmp_path, rng, capsys):
    (tmp_path / "npz").mkdir()
    for pair in ("dev-1-0", "dev-1-1"):
        for side in (0, 1):
            _npz(tmp_path / "npz" / f"{pair}-img{side}.npz", make_image(rng, 15, 12))
    bad = make_image(rng, 15, 12)
    bad["features"][3, 5] = np.nan  # a corrupt right image: its pair is skipped
    _npz(tmp_path / "npz" / "dev-2-0-img0.npz", make_image(rng, 15, 12))
    _npz(tmp_path / "npz" / "dev-2-0-img1.npz", bad)
    lines = [
        {"identifier": "dev-1-0-0", "sentence": "a dog on the street", "label": "True"},
        {"identifier": "dev-1-0-1", "sentence": "The man", "label": "False"},
        {"identifier": "dev-1-1-0", "sentence": "a dog on the street", "label": True},
        {"identifier": "dev-2-0-0", "sentence": "horses", "label": "False"},
        {"identifier": "dev-3-0-0", "sentence": "", "label": "True"},  # empty text
    ]
    jsonl = tmp_path / "nlvr2.json"
    jsonl.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    args = _common(tmp_path, "nlvr2-jsonl", jsonl)
    code, out = _run(capsys, *args)
    assert code == 0, out.err
    records = {
        r.key: r for u in list_shards(str(tmp_path / "out")) for r in iter_task_shard(u, "nlvr2")
    }
    assert sorted(records) == ["dev-1-0", "dev-1-1"]
    pair = records["dev-1-0"]
    assert len(pair.images) == 2 and [i["target"] for i in pair.items] == [True, False]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["totals"]["skipped_images"] == {"nonfinite": 1}
    assert manifest["totals"]["left_out_captions"] == {"decode": 1}
    # A finished conversion is not redone or overwritten without --overwrite.
    code, out = _run(capsys, *args)
    assert code == 1 and "overwrite" in out.err
    # Too many bad inputs fail the conversion, saying by reason.
    args[args.index("0.6")] = "0.01"
    code, out = _run(capsys, *args, "--overwrite")
    assert code == 1 and "nonfinite" in out.err


def test_missing_inputs_are_refused(tmp_path, capsys):
    jsonl = tmp_path / "x.jsonl"
    jsonl.write_text("")
    code, out = _run(capsys, *_common(tmp_path, "ve-jsonl", jsonl))
    assert code == 1 and "not a directory" in out.err
    with pytest.raises(SystemExit):
        main(["nlvr2-jsonl", "--jsonl", str(jsonl)])


def test_vqa_answer_normalisation_and_scores():
    from uniter_fast.convert.vqa import normalize_answer, soft_score

    cases = {
        "Two": "2",
        "the dog!": "dog",
        "yes.": "yes",
        "isnt": "isn't",
        "10,000": "10000",
        "A  Red-Car": "red car",
        "3.5": "3.5",
    }
    assert {a: normalize_answer(a) for a in cases} == cases
    assert [soft_score(n) for n in range(6)] == [0.0, 0.3, 0.6, 0.9, 1.0, 1.0]


def _vqa_files(tmp_path, rng):
    (tmp_path / "npz").mkdir(exist_ok=True)
    _npz(tmp_path / "npz" / "COCO_val2014_000000000042.npz", make_image(rng, 14, 11))
    _npz(tmp_path / "npz" / "7.npz", make_image(rng, 20, 12))
    questions = {
        "questions": [
            {"question_id": 1, "image_id": 42, "question": "A man riding"},
            {"question_id": 2, "image_id": 42, "question": "The dog"},
            {"question_id": 3, "image_id": 7, "question": "a horse"},
            {"question_id": 4, "image_id": 9, "question": "a dog"},  # no features
            {"question_id": "x", "image_id": 7},  # malformed
        ]
    }

    def answers(*words):
        return [{"answer": w} for w in words]

    def ann(qid, mc, *words):
        return {"question_id": qid, "multiple_choice_answer": mc, "answers": answers(*words)}

    annotations = {
        "annotations": [
            ann(1, "yes", *["yes"] * 3, "Yes.", "no", *["two"] * 5),
            ann(2, "2", "2", "two", "Two"),
            ann(3, "yes", "yes", "red"),
            ann(4, "two", "no"),
            ann(99, "no"),  # a question the questions file does not have
        ]
    }
    (tmp_path / "q.json").write_text(json.dumps(questions))
    (tmp_path / "a.json").write_text(json.dumps(annotations))


def test_vqa_json(tmp_path, rng, capsys):
    _vqa_files(tmp_path, rng)
    vocab = write_vocab(tmp_path / "vocab.txt")
    base = ["vqa-json", "--questions", str(tmp_path / "q.json"), "--npz-dir", str(tmp_path / "npz")]
    base += ["--vocab", str(vocab), "--no-progress", "--max-bad-fraction", "0.9"]
    args = [*base, "--annotations", str(tmp_path / "a.json"), "--out", str(tmp_path / "out")]
    code, out = _run(capsys, *args, "--min-answer-count", "2")
    assert code == 0, out.err
    # Answers seen as the (normalised) multiple-choice answer at least twice: "2" and "yes".
    label = json.loads((tmp_path / "out" / "ans2label.json").read_text())
    assert label == {"2": 0, "yes": 1}
    records = {
        r.key: r for u in list_shards(str(tmp_path / "out")) for r in iter_task_shard(u, "vqa")
    }
    assert sorted(records) == ["42", "7"]
    q1, q2 = records["42"].items
    # q1: "yes" x4 (with "Yes.") -> 1.0, "two" x5 -> "2" -> 1.0; "no" is outside the vocabulary.
    assert q1["answers"] == [[0, 1.0], [1, 1.0]] and q2["answers"] == [[0, 0.9]]
    assert records["7"].items[0]["answers"] == [[1, 0.3]]
    assert records["42"].meta["num_classes"] == 2
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["totals"]["skipped_images"] == {"no_features": 1}
    assert manifest["totals"]["left_out_captions"] == {"decode": 1, "unknown_question": 1}
    # The test split: no annotations; the training vocabulary is required, and used.
    code, out = _run(capsys, *base, "--out", str(tmp_path / "test"))
    assert code == 1 and "pass --answers" in out.err
    test_args = [*base, "--answers", str(tmp_path / "out" / "ans2label.json")]
    code, out = _run(capsys, *test_args, "--out", str(tmp_path / "test"), "--overwrite")
    assert code == 0, out.err
    (url,) = list_shards(str(tmp_path / "test"))
    assert all("answers" not in item for r in iter_task_shard(url, "vqa") for item in r.items)


def test_task_lmdb(tmp_path, rng, capsys):
    from test_convert import npz_bytes, text_value, write_lmdb

    meta = {"bert": "bert-base-cased", "UNK": 100, "CLS": 101, "SEP": 102, "MASK": 103}
    images = {
        f"nlvr2_dev-1-{p}-img{s}.npz": make_image(rng, 14, 11) for p in (0, 1) for s in (0, 1)
    }
    write_lmdb(tmp_path / "img_db", {k.encode(): npz_bytes(**v) for k, v in images.items()})
    examples = {
        "dev-1-0-0": {"input_ids": [1005, 1006], "target": 1,
                      "img_fname": ["nlvr2_dev-1-0-img0.npz", "nlvr2_dev-1-0-img1.npz"]},
        "dev-1-0-1": {"input_ids": [1007], "target": 0,
                      "img_fname": ["nlvr2_dev-1-0-img0.npz", "nlvr2_dev-1-0-img1.npz"]},
        "dev-1-1-0": {"input_ids": [1008], "target": None,  # a test-split example
                      "img_fname": ["nlvr2_dev-1-1-img0.npz", "nlvr2_dev-1-1-img1.npz"]},
        "dev-1-2-0": {"input_ids": [1009], "target": 1,  # images not in the DB
                      "img_fname": ["nlvr2_dev-1-2-img0.npz", "nlvr2_dev-1-2-img1.npz"]},
        "dev-1-3-0": {"input_ids": [1009], "target": 5,
                      "img_fname": ["nlvr2_dev-1-0-img0.npz", "nlvr2_dev-1-0-img1.npz"]},
    }  # fmt: skip
    values = {k.encode(): text_value(v) for k, v in examples.items()}
    values[b"dev-9-9-9"] = b"not lz4"
    write_lmdb(tmp_path / "txt_db", values)
    (tmp_path / "txt_db" / "meta.json").write_text(json.dumps(meta))
    out = tmp_path / "out"
    code, io = _run(
        capsys,
        "task-lmdb", "--task", "nlvr2", "--img-db", str(tmp_path / "img_db"),
        "--txt-db", str(tmp_path / "txt_db"), "--out", str(out), "--no-progress",
        "--max-bad-fraction", "0.9",
    )  # fmt: skip
    assert code == 0, io.err
    records = {r.key: r for u in list_shards(str(out)) for r in iter_task_shard(u, "nlvr2")}
    assert sorted(records) == ["nlvr2_dev-1-0", "nlvr2_dev-1-1"]
    assert [i.get("target") for i in records["nlvr2_dev-1-0"].items] == [True, False]
    assert "target" not in records["nlvr2_dev-1-1"].items[0]
    totals = json.loads((out / "manifest.json").read_text())["totals"]
    assert totals["skipped_images"] == {"no_features": 1}
    assert totals["left_out_captions"] == {"decode": 1, "label": 1}
