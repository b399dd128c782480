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
    images = {name: make_image(rng, int(rng.integers(12, 40)), 15) for name in ("111", "222")}
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
