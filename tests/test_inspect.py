"""`python -m uniter_fast.inspect`: the numbers behind the pictures, and the pictures' files.

The alignment must be WRA's own computation (the plan and distance of `ops.ot` on the rows WRA
reads in training, the ITM head's probability); the recomputed attention probabilities must
reproduce the layer's own attention output; the commands must write what they promise and name
what is wrong with bad input.
"""

from __future__ import annotations

import json
import re
from html import escape as html_escape
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import TINY
from PIL import Image

from uniter_fast import UniterForPretraining, UniterForVcrPretraining, save_reference
from uniter_fast.config import RunConfig
from uniter_fast.data import collate
from uniter_fast.data.shards import iter_shard, list_shards
from uniter_fast.data.synthetic import write_synthetic
from uniter_fast.data.synthetic_tasks import task_records, write_task_data
from uniter_fast.data.task_shards import iter_task_shard, write_task_shards
from uniter_fast.inspect import (
    InspectError,
    align_pair,
    build_example,
    encode,
    find_pairs,
    head_attention,
    load_model,
    main,
    pack,
    sample_pairs,
    token_names,
)
from uniter_fast.inspect.pairs import data_kind
from uniter_fast.inspect.render import (
    alignment_figure_size,
    attention_figure_size,
    figure_pixels,
    load_canvas,
)
from uniter_fast.ops.ot import (
    gather_pairs,
    wra_distance_packed_reference,
    wra_distance_reference,
)
from uniter_fast.tasks.vcr import pretrain_example

TAG_BASE = 28996  # VCR's object tags: ids 28996 + p, shown as <person p>


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Synthetic shards, a random tiny pretraining model, its weights file, JSON and run folder."""
    root = tmp_path_factory.mktemp("inspect")
    write_synthetic(root / "shards", 6, seed=0)
    torch.manual_seed(0)
    model = UniterForPretraining(TINY).eval()
    weights = save_reference(model, root / "weights.pt")
    config = root / "tiny.json"
    TINY.to_json(config)
    run = root / "run"
    run.mkdir()
    save_reference(model, run / "model_reference.pt")
    cfg = RunConfig(model_config=str(config), output_dir=str(run))
    (run / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    records = {r.key: r for r in iter_shard(str(next((root / "shards").glob("*.tar"))))}
    return {
        "root": root,
        "shards": str(root / "shards"),
        "model": model,
        "weights": str(weights),
        "config": str(config),
        "run": str(run),
        "records": records,
    }


def _args(world, command: str, out: Path, *rest: str) -> list[str]:
    return [
        command,
        "--checkpoint",
        world["weights"],
        "--model-config",
        world["config"],
        "--data",
        world["shards"],
        "--out",
        str(out),
        "--quiet",
        *rest,
    ]


# --- the numbers -------------------------------------------------------------------------------


def test_alignment_is_wra_of_the_training_rows(world):
    model = world["model"]
    for pair in sample_pairs(world["shards"], 3, seed=0):
        a = align_pair(model, pair)
        m = len(pair.record.captions[pair.caption]) + 2  # [CLS] caption [SEP]
        n = pair.record.num_regions
        assert a.plan.shape == a.cost.shape == (m, n)
        assert a.text_index.tolist() == list(range(m))
        # IPOT's text marginal is exact after its last step: every text row sends 1/m.
        np.testing.assert_allclose(a.plan.sum(axis=1), 1 / m, rtol=1e-4)
        assert a.plan.sum() == pytest.approx(1.0, rel=1e-3)

        # The same pair through training's own path: the packed WRA distance of the encoder's
        # states, with the model's IPOT settings.
        batch = collate([build_example(pair)], task="pairs")
        hidden = encode(model, batch)
        args = (hidden, batch.cu_seqlens, batch.txt_len, batch.img_len)
        lengths = (batch.max_txt_len, batch.max_img_len)
        ipot = {"beta": model.wra_beta, "iterations": model.wra_iterations}
        packed = wra_distance_packed_reference(*args, *lengths, **ipot)
        assert a.wra_distance == pytest.approx(float(packed[0]), rel=1e-5)
        txt, img = gather_pairs(*args, *lengths)
        padded = wra_distance_reference(txt, img, batch.txt_len, batch.img_len, **ipot)
        assert a.wra_distance == pytest.approx(float(padded[0]), rel=1e-5)

        # P(match) is what the model's own ITM loss says: loss on target 1 = -log P(match).
        itm = collate([{**build_example(pair), "itm_target": 1}], task="itm")
        with torch.no_grad():
            loss = model(itm, "itm")["itm"]
        assert a.itm_match == pytest.approx(float(torch.exp(-loss)), rel=1e-5)


def test_caption_only_rows(world):
    pair = sample_pairs(world["shards"], 1, seed=3)[0]
    a = align_pair(world["model"], pair, text_rows="words")
    m = len(pair.record.captions[pair.caption])
    assert a.plan.shape == (m, pair.record.num_regions)
    assert a.text_index.tolist() == list(range(1, m + 1))


def test_attention_recomputation_reproduces_the_layer(world):
    model = world["model"]
    batch = pack(model, find_pairs(world["shards"], ["synthetic_0_0000004/2"])[0])
    length = int(batch.cu_seqlens[1])
    for layer in range(TINY.num_hidden_layers):
        for head in range(TINY.num_attention_heads):
            att = head_attention(model, batch, layer, head)
            assert att.probs.shape == (length, length)
            torch.testing.assert_close(att.probs.sum(dim=1), torch.ones(length))
            torch.testing.assert_close(att.probs @ att.values, att.context, atol=1e-5, rtol=1e-4)


# --- choosing pairs ----------------------------------------------------------------------------


def test_pairs_by_seed_and_by_key(world):
    first = [p.name for p in sample_pairs(world["shards"], 4, seed=7)]
    assert first == [p.name for p in sample_pairs(world["shards"], 4, seed=7)]
    assert len(set(first)) == 4
    total = sum(len(r.captions) for r in world["records"].values())
    assert len(sample_pairs(world["shards"], total + 5, seed=0)) == total

    pairs = find_pairs(world["shards"], ["synthetic_0_0000003/4", "synthetic_0_0000001"])
    assert [(p.key, p.caption) for p in pairs] == [
        ("synthetic_0_0000003", 4),
        ("synthetic_0_0000001", 0),
    ]


# --- the commands ------------------------------------------------------------------------------


def test_align_writes_pictures_index_and_numbers(world, tmp_path):
    out = tmp_path / "align"
    assert main(_args(world, "align", out, "--pairs", "2", "--seed", "1", "--sort", "wra")) == 0
    report = json.loads((out / "pairs.json").read_text())
    assert report["wra_beta"] == 0.5 and report["wra_iterations"] == 50
    pairs = report["pairs"]
    assert len(pairs) == 2
    assert [p["wra_distance"] for p in pairs] == sorted(p["wra_distance"] for p in pairs)
    page = (out / "index.html").read_text()
    assert "http" not in page  # self-contained: no external assets
    for p in pairs:
        record = world["records"][p["key"]]
        m, n = len(p["tokens"]), p["regions"]
        assert np.asarray(p["plan"]).shape == (m, n) and n == record.num_regions
        assert p["tokens"][0] == "[CLS]" and p["tokens"][-1] == "[SEP]"
        assert p["caption"].split() == [f"#{i}" for i in record.captions[p["caption_index"]]]
        assert 0.0 <= p["itm_match_prob"] <= 1.0
        with Image.open(out / p["png"]) as im:
            im.load()
            meta = record.meta
            size = alignment_figure_size(m, n, meta["width"], meta["height"])
            assert im.size == figure_pixels(size)
        assert f'src="{p["png"]}"' in page
        assert f"{p['key']}/{p['caption_index']}" in page
        assert f"{p['wra_distance']:.4f}" in page and f"{p['itm_match_prob']:.3f}" in page
    assert len(list(out.glob("pair-*.png"))) == 2


def test_align_draws_on_the_image_when_there_is_one(world, tmp_path):
    key = "synthetic_0_0000004"
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (200, 100), (30, 120, 200)).save(images / f"{key}.png")
    meta = world["records"][key].meta
    assert load_canvas(images, key, meta).pixels.shape == (100, 200, 3)
    assert load_canvas(images, "synthetic_0_0000003", meta).pixels is None  # no file: blank

    out = tmp_path / "align"
    args = _args(world, "align", out, "--keys", key, "--images", str(images), "--boxes", "3")
    assert main(args) == 0
    p = json.loads((out / "pairs.json").read_text())["pairs"][0]
    with Image.open(out / p["png"]) as im:
        # The figure follows the photo's shape (200x100), not the meta's size.
        size = alignment_figure_size(len(p["tokens"]), p["regions"], 200, 100)
        assert im.size == figure_pixels(size)
        assert size != alignment_figure_size(
            len(p["tokens"]), p["regions"], meta["width"], meta["height"]
        )


def test_run_folder_checkpoint(world, tmp_path):
    model, notes = load_model(world["run"])
    assert isinstance(model, UniterForPretraining) and not notes
    for name, value in world["model"].state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], value, msg=name)

    out = tmp_path / "attention"
    args = ["attention", "--checkpoint", world["run"], "--data", world["shards"]]
    args += ["--out", str(out), "--keys", "synthetic_0_0000002/1", "--layer", "1", "--head", "3"]
    assert main([*args, "--quiet"]) == 0
    record = world["records"]["synthetic_0_0000002"]
    length = len(record.captions[1]) + 2 + record.num_regions
    with Image.open(out / "pair-000.png") as im:
        assert im.size == figure_pixels(attention_figure_size(length))
    page = (out / "index.html").read_text()
    assert 'src="pair-000.png"' in page and "synthetic_0_0000002/1" in page


@pytest.mark.parametrize(
    "change, named",
    [
        (["--keys", "synthetic_0_0000001", "no_such_key"], "no_such_key"),
        (["--keys", "synthetic_0_0000001/9"], "synthetic_0_0000001/9"),
        (["--checkpoint", "missing/model.pt"], "missing/model.pt"),
        (["--data", "missing-shards/*.tar"], "missing-shards"),
        (["--model-config", "missing.json"], "missing.json"),
    ],
)
def test_bad_input_is_named(world, tmp_path, capsys, change, named):
    args = _args(world, "align", tmp_path / "out", *change)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "error" in err and named in err


def test_refused_models_and_options(world, tmp_path, capsys):
    # A weights file alone does not say which architecture it is.
    args = ["align", "--checkpoint", world["weights"], "--data", world["shards"]]
    assert main([*args, "--out", str(tmp_path / "a"), "--quiet"]) == 2
    assert "--model-config" in capsys.readouterr().err

    # A downstream run builds another model: WRA needs the pretraining heads.
    run = tmp_path / "retrieval"
    run.mkdir()
    save_reference(world["model"], run / "model_reference.pt")
    cfg = RunConfig(task="retrieval", model_config=world["config"], output_dir=str(run))
    (run / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    args = ["align", "--checkpoint", str(run), "--data", world["shards"], "--quiet"]
    assert main([*args, "--out", str(tmp_path / "b")]) == 2
    assert re.search(r"UniterForPretraining.*UniterForRetrieval", capsys.readouterr().err)

    # Layers and heads past the model's.
    out = str(tmp_path / "c")
    assert (
        main(_args(world, "attention", Path(out), "--pairs", "1", "--layer", "2", "--head", "0"))
        == 2
    )
    assert "--layer 2" in capsys.readouterr().err
    assert (
        main(_args(world, "attention", Path(out), "--pairs", "1", "--layer", "0", "--head", "4"))
        == 2
    )
    assert "--head 4" in capsys.readouterr().err


# --- the VCR pretraining stage -----------------------------------------------------------------


@pytest.fixture(scope="module")
def vcr(world):
    """Synthetic VCR task shards and a random tiny UniterForVcrPretraining in a run folder."""
    root = world["root"] / "vcr"
    write_task_data(root / "shards", "vcr", 4, seed=0)
    torch.manual_seed(1)
    model = UniterForVcrPretraining(TINY).eval()
    run = root / "run"
    run.mkdir()
    save_reference(model, run / "model_reference.pt")
    cfg = RunConfig(task="pretrain-vcr", model_config=world["config"], output_dir=str(run))
    (run / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    urls = list_shards(str(root / "shards"))
    records = {r.key: r for url in urls for r in iter_task_shard(url, "vcr")}
    return {"root": root, "shards": str(root / "shards"), "run": str(run), "records": records}


def _question_text(record, item) -> str:
    """What the index shows: question | right answer | right rationale, ids as the inspector
    names them (no vocabulary)."""
    parts = [
        item["question"],
        item["answers"][item["answer_label"]],
        item["rationales"][item["rationale_label"]],
    ]
    return " | ".join(" ".join(token_names(part, None)) for part in parts)


def _check_tags(tokens: list[str], ids: list[int]) -> int:
    tags = 0
    for token, i in zip(tokens, ids, strict=True):
        if i >= TAG_BASE:
            assert token == f"<person {i - TAG_BASE}>"
            tags += 1
        else:
            assert not token.startswith("<person")
    return tags


def test_vcr_alignment_is_wra_of_the_stage_sequence(world, vcr):
    model, notes = load_model(vcr["run"])
    assert type(model) is UniterForVcrPretraining
    assert any("neither ITM nor WRA" in note for note in notes)
    assert data_kind(vcr["shards"]) == "vcr" and data_kind(world["shards"]) == "pretrain"
    pairs = sample_pairs(vcr["shards"], 100, seed=0)
    assert len(pairs) == sum(len(r.items) for r in vcr["records"].values())
    tags = 0
    for pair in pairs:
        assert pair.kind == "vcr"
        ex = pretrain_example(pair.record, pair.item)
        a = align_pair(model, pair)
        m, n = len(ex["input_ids"]), len(ex["img_feat"])
        assert a.plan.shape == a.cost.shape == (m, n) and n == pair.record.num_regions
        assert a.text_index.tolist() == list(range(m))
        assert a.input_ids.tolist() == ex["input_ids"].tolist()
        assert a.txt_type_ids.tolist() == ex["txt_type_ids"].tolist()
        tags += _check_tags(token_names(a.input_ids, None), a.input_ids.tolist())

        # Ground-truth boxes first, named by their objects (persons by their tag's rank).
        objects = pair.record.meta["objects"]
        names = pair.region_names()
        gt = len(objects)
        assert pair.ground_truth_regions == gt and names[gt:] == [""] * (n - gt)
        persons = [k for k, o in enumerate(objects) if o == "person"]
        for k, obj in enumerate(objects):
            assert names[k] == (f"person {persons.index(k)}" if obj == "person" else obj)

        # The distance of training's packed WRA on the same states, types included.
        batch = collate([ex], task="pairs")
        assert batch.txt_type_ids is not None
        assert batch.txt_type_ids.tolist() == ex["txt_type_ids"].tolist()
        hidden = encode(model, batch)
        packed = wra_distance_packed_reference(
            hidden,
            batch.cu_seqlens,
            batch.txt_len,
            batch.img_len,
            batch.max_txt_len,
            batch.max_img_len,
            beta=model.wra_beta,
            iterations=model.wra_iterations,
        )
        assert a.wra_distance == pytest.approx(float(packed[0]), rel=1e-5)
        # The token types reach the encoder: all-zero types give other states.
        untyped = collate([{k: v for k, v in ex.items() if k != "txt_type_ids"}], task="pairs")
        assert not torch.allclose(encode(model, untyped), hidden)

        words = align_pair(model, pair, text_rows="words")
        kept = [i for i, t in enumerate(ex["input_ids"].tolist()) if t not in (101, 102)]
        assert words.text_index.tolist() == kept and words.plan.shape == (len(kept), n)
    assert tags > 0  # the synthetic questions name persons by their tags


def test_vcr_commands_write_pictures_and_numbers(vcr, tmp_path):
    out = tmp_path / "align"
    args = ["align", "--checkpoint", vcr["run"], "--data", vcr["shards"], "--out", str(out)]
    assert main([*args, "--pairs", "3", "--seed", "2", "--quiet"]) == 0
    report = json.loads((out / "pairs.json").read_text())
    assert report["data_kind"] == "vcr" and report["model"] == "UniterForVcrPretraining"
    page = (out / "index.html").read_text()
    assert len(report["pairs"]) == 3
    for p in report["pairs"]:
        record = vcr["records"][p["key"]]
        item = record.items[p["caption_index"]]
        ex = pretrain_example(record, item)
        m, n = len(p["tokens"]), p["regions"]
        assert m == len(ex["input_ids"]) and n == len(ex["img_feat"])
        assert np.asarray(p["plan"]).shape == (m, n)
        assert p["token_ids"] == ex["input_ids"].tolist()
        assert p["token_types"] == ex["txt_type_ids"].tolist()
        _check_tags(p["tokens"], p["token_ids"])
        assert p["tokens"].count("[SEP]") == 3 and p["question_id"] == item["id"]
        assert p["caption"] == _question_text(record, item)
        gt = p["ground_truth_regions"]
        assert gt == len(record.meta["objects"])
        assert all(
            label.split()[1:2] == [obj]
            for label, obj in zip(p["region_labels"][:gt], record.meta["objects"], strict=True)
        )
        assert p["region_labels"][gt:] == [f"r{j}" for j in range(gt, n)]
        with Image.open(out / p["png"]) as im:
            im.load()
            meta = record.meta
            assert im.size == figure_pixels(
                alignment_figure_size(m, n, meta["width"], meta["height"])
            )
        assert f'src="{p["png"]}"' in page and f"{p['key']}/{p['caption_index']}" in page
        assert html_escape(p["caption"]) in page

    key = next(k for k, r in vcr["records"].items() if len(r.items) > 1)
    out = tmp_path / "attention"
    args = ["attention", "--checkpoint", vcr["run"], "--data", vcr["shards"], "--out", str(out)]
    args += ["--keys", f"{key}/1", "--layer", "0", "--head", "1", "--data-kind", "vcr"]
    assert main([*args, "--quiet"]) == 0
    record = vcr["records"][key]
    length = len(pretrain_example(record, record.items[1])["input_ids"]) + record.num_regions
    with Image.open(out / "pair-000.png") as im:
        assert im.size == figure_pixels(attention_figure_size(length))
    page = (out / "index.html").read_text()
    assert f"{key}/1" in page and html_escape(_question_text(record, record.items[1])) in page


def test_vcr_refusals(world, vcr, tmp_path, capsys):
    # A first-stage model has neither the tags' words nor 4 token types.
    args = _args(world, "align", tmp_path / "a", "--pairs", "1")
    args[args.index("--data") + 1] = vcr["shards"]
    assert main(args) == 2
    assert "pretrain-vcr" in capsys.readouterr().err
    # Shards of the other kind than asked for.
    args = ["align", "--checkpoint", vcr["run"], "--data", vcr["shards"], "--quiet"]
    assert main([*args, "--out", str(tmp_path / "b"), "--data-kind", "pretrain"]) == 2
    assert "--data-kind auto" in capsys.readouterr().err
    # A test split has no right answer or rationale to build the sequence from.
    records = list(task_records("vcr", 2, seed=3))
    for record in records:
        for item in record.items:
            item.pop("answer_label")
            item.pop("rationale_label")
    write_task_shards(tmp_path / "test", records, prefix="vcr-test")
    with pytest.raises(InspectError, match="test split"):
        sample_pairs(str(tmp_path / "test"), 2)
    with pytest.raises(InspectError, match="test split"):
        find_pairs(str(tmp_path / "test"), [records[0].key])
