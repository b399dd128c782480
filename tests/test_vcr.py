"""VCR on packed batches against the authors' padded model (4 token types, 81 object tags),
weight for weight; loading a pretraining checkpoint grows the embeddings as the reference does."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TINY, ragged_sizes, random_examples
from test_downstream import assert_same_gradients

import uniter_fast as uf
from uniter_fast.authors import downstream as authors

TAGS = 81


def _vcr_examples(rng, questions, **kw):
    """Each question: 4 candidates sharing one image (gt boxes then detected), ids that use the
    object tags (>= 28996), types 0 ([CLS] + question), 2 (answer part), 3 (rationale part)."""
    out = []
    for _ in range(questions):
        (image,) = random_examples(rng, ragged_sizes(rng, 1, **kw))
        q = rng.integers(1000, 28996 + TAGS, size=int(rng.integers(2, 9)))
        rationale = bool(rng.integers(2))
        right = int(rng.integers(4))
        for k in range(4):
            a = rng.integers(1000, 28996 + TAGS, size=int(rng.integers(1, 7)))
            ids = [101, *q, 102, *a, 102]
            types = [0] * (1 + len(q)) + [2] * (len(a) + 2)
            if rationale:
                r = rng.integers(1000, 28996 + TAGS, size=int(rng.integers(1, 7)))
                ids = [101, *q, 102, *a, 102, *r, 102]
                types = [0] * (1 + len(q)) + [2] * (len(a) + 1) + [3] * (len(r) + 2)
            out.append(
                {
                    "input_ids": np.array(ids),
                    "txt_type_ids": np.array(types),
                    "img_feat": image["img_feat"],
                    "img_loc": image["img_loc"],
                    "target": int(k == right),
                }
            )
    return out


def _models():
    ours = uf.UniterForVcr(TINY, img_dim=2048, num_special_tokens=TAGS).double()
    theirs = authors.UniterForVisualCommonsenseReasoning(TINY, 2048)
    theirs.init_type_embedding()
    theirs.init_word_embedding(TAGS)
    theirs = theirs.double()
    result = theirs.load_state_dict(uf.export_reference(ours), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return ours, theirs


def _authors_batch(examples):
    batch = authors.collate(examples, "vcr")
    return {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}


def test_scores_and_loss_match_authors(rng):
    ours, theirs = _models()
    ours.eval(), theirs.eval()
    examples = _vcr_examples(rng, 3)
    batch = uf.data.collate(examples, task=ours.task)
    assert batch.txt_type_ids.shape == batch.input_ids.shape
    with torch.no_grad():
        got = ours(batch)
        theirs_batch = _authors_batch(examples)
        scores = theirs(theirs_batch, compute_loss=False)
        loss = theirs(theirs_batch)
    assert got["scores"].shape == (12, 2)
    torch.testing.assert_close(got["scores"][:, 1:], scores, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(got["loss"], loss, rtol=1e-9, atol=1e-11)


def test_gradients_match_authors(rng):
    ours, theirs = _models()
    examples = _vcr_examples(rng, 2, max_txt=8, max_img=20)
    ours(uf.data.collate(examples, task="vcr"))["loss"].backward()
    theirs(_authors_batch(examples)).backward()
    assert_same_gradients(ours, theirs)


def test_token_types_change_the_scores(rng):
    # The types are read: the same ids typed otherwise score otherwise.
    ours, _ = _models()
    ours.eval()
    examples = _vcr_examples(rng, 1)
    flat = [ex | {"txt_type_ids": np.zeros_like(ex["txt_type_ids"])} for ex in examples]
    with torch.no_grad():
        a = ours(uf.data.collate(examples, task="vcr"))["scores"]
        b = ours(uf.data.collate(flat, task="vcr"))["scores"]
    assert not torch.allclose(a, b)


def test_load_pretraining_checkpoint_grows_embeddings(tmp_path):
    pretrained = uf.UniterForPretraining(TINY)
    path = uf.save_reference(pretrained, tmp_path / "pretrained.pt")
    model = uf.UniterForVcr(TINY, img_dim=2048)
    report = uf.load_pretrained(model, path, verbose=False)
    words = model.uniter.embeddings.word_embeddings.weight
    source = pretrained.uniter.embeddings.word_embeddings.weight
    assert words.shape == (28996 + TAGS, TINY.hidden_size)
    assert torch.equal(words[:28996], source)
    types = model.uniter.embeddings.token_type_embeddings.weight
    src_types = pretrained.uniter.embeddings.token_type_embeddings.weight
    assert types.shape[0] == 4 and torch.equal(types[:2], src_types)
    assert torch.equal(types[2], src_types[0]) and torch.equal(types[3], src_types[0])
    assert len(report.adapted) == 2
    assert all(k.startswith("vcr_output") for k in report.missing)
    # The authors' init_type_embedding / init_word_embedding give the same known rows.
    theirs = authors.UniterForVisualCommonsenseReasoning(TINY, 2048)
    theirs.load_state_dict(torch.load(path), strict=False)
    theirs.init_type_embedding()
    theirs.init_word_embedding(TAGS)
    torch.testing.assert_close(theirs.uniter.embeddings.token_type_embeddings.weight, types)
    # The second-stage pretraining model: the tied decoder and the MLM bias grow too.
    stage2 = uf.UniterForVcrPretraining(TINY)
    report = uf.load_pretrained(stage2, path, verbose=False)
    assert stage2.cls.predictions.bias.shape == (28996 + TAGS,)
    assert torch.equal(stage2.cls.predictions.bias[:28996], pretrained.cls.predictions.bias)
    assert not stage2.cls.predictions.bias[28996:].any()
    decoder = stage2.cls.predictions.decoder.weight
    assert decoder.data_ptr() == stage2.uniter.embeddings.word_embeddings.weight.data_ptr()
    assert not report.missing


def test_reference_vcr_checkpoint_loads_key_for_key(tmp_path):
    ours, theirs = _models()
    torch.manual_seed(1)
    for p in theirs.parameters():
        p.data.normal_()
    torch.save(theirs.state_dict(), tmp_path / "vcr.pt")
    report = uf.load_pretrained(ours, tmp_path / "vcr.pt", verbose=False)
    assert not report.missing and not report.unexpected and not report.adapted
    for key, value in uf.export_reference(ours).items():
        torch.testing.assert_close(value.double(), theirs.state_dict()[key].double(), msg=key)


def test_collate_checks_types(rng):
    examples = _vcr_examples(rng, 1)
    examples[2]["txt_type_ids"] = examples[2]["txt_type_ids"][:-1]
    with pytest.raises(ValueError, match="example 2: txt_type_ids must be"):
        uf.data.collate(examples, task="vcr")
    examples = _vcr_examples(rng, 1)
    del examples[1]["txt_type_ids"]
    with pytest.raises(ValueError, match="example 1: missing field 'txt_type_ids'"):
        uf.data.collate(examples, task="vcr")
