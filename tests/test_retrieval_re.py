"""Retrieval and referring expressions on packed batches against the authors' padded models,
weight for weight; zero-shot initialisation from the ITM head; recall@K."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TINY, ragged_sizes, random_examples
from test_downstream import assert_same_gradients

import uniter_fast as uf
from uniter_fast.authors import downstream as authors
from uniter_fast.tasks.retrieval import recall_at_k


def _plain(examples):
    return [{k: ex[k] for k in ("input_ids", "img_feat", "img_loc")} for ex in examples]


def _retrieval_examples(rng, groups, size, **kw):
    """`groups` groups of `size` sequences: a positive then its negatives."""
    examples = _plain(random_examples(rng, ragged_sizes(rng, groups * size, **kw)))
    return [ex | {"target": int(k % size == 0)} for k, ex in enumerate(examples)]


def _re_examples(rng, count, **kw):
    examples = _plain(random_examples(rng, ragged_sizes(rng, count, **kw)))
    return [ex | {"target": int(rng.integers(len(ex["img_feat"])))} for ex in examples]


def _models(kind, mlp=1):
    if kind == "retrieval":
        ours = uf.UniterForRetrieval(TINY, img_dim=2048, margin=0.2)
        theirs = authors.UniterForImageTextRetrieval(TINY, 2048, margin=0.2)
    else:
        ours = uf.UniterForReferringExpressions(TINY, img_dim=2048, mlp=mlp)
        theirs = authors.UniterForReferringExpressionComprehension(TINY, 2048, mlp=mlp)
    ours, theirs = ours.double(), theirs.double()
    result = theirs.load_state_dict(uf.export_reference(ours), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return ours, theirs.double()


def _authors_batch(examples, task):
    batch = authors.collate(examples, task)
    return {
        k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
        for k, v in batch.items()
    }


CASES = [("retrieval", 1), ("re", 1), ("re", 2)]


def _examples(rng, kind, **kw):
    if kind == "retrieval":
        return _retrieval_examples(rng, 2, 3, **kw)
    return _re_examples(rng, 5, **kw)


@pytest.mark.parametrize(("kind", "mlp"), CASES)
def test_scores_and_loss_match_authors(kind, mlp, rng):
    ours, theirs = _models(kind, mlp)
    ours.eval(), theirs.eval()
    examples = _examples(rng, kind)
    batch = uf.data.collate(examples, task=ours.task)
    with torch.no_grad():
        got = ours(batch)
        theirs_batch = _authors_batch(examples, ours.task)
        scores = theirs(theirs_batch, compute_loss=False)
        loss = authors.reduce_loss(kind, theirs(theirs_batch), theirs_batch)
    if kind == "retrieval":
        scores = scores.squeeze(-1)
        assert got["scores"].shape == (len(examples),)
    else:
        regions = [len(ex["img_feat"]) for ex in examples]
        assert got["scores"].shape == (len(examples), max(regions))
        for b, n in enumerate(regions):  # past an example's regions: the reference's -1e4
            assert (got["scores"][b, n:] <= -1e4).all()
    torch.testing.assert_close(got["scores"], scores, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(got["loss"].double(), loss, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize(("kind", "mlp"), CASES)
def test_gradients_match_authors(kind, mlp, rng):
    ours, theirs = _models(kind, mlp)
    examples = _examples(rng, kind, max_txt=16, max_img=20)
    ours(uf.data.collate(examples, task=ours.task))["loss"].backward()
    theirs_batch = _authors_batch(examples, ours.task)
    authors.reduce_loss(kind, theirs(theirs_batch), theirs_batch).backward()
    assert_same_gradients(ours, theirs)


def test_retrieval_loss_with_ragged_groups(rng):
    # Groups of different sizes: the mean over every negative of its own group's hinge.
    model = uf.UniterForRetrieval(TINY, img_dim=2048, margin=0.3).double().eval()
    examples = _plain(random_examples(rng, ragged_sizes(rng, 7)))
    targets = [1, 0, 0, 0, 1, 0, 1]
    batch = uf.data.collate(
        [ex | {"target": t} for ex, t in zip(examples, targets, strict=True)], task="retrieval"
    )
    with torch.no_grad():
        out = model(batch)
    p = torch.sigmoid(out["scores"])
    want = [0.3 + p[k] - p[g] for g, k in [(0, 1), (0, 2), (0, 3), (4, 5)]]
    want = torch.stack([torch.clamp(w, min=0) for w in want]).mean()
    torch.testing.assert_close(out["loss"], want)


def test_re_rank_loss(rng):
    model = uf.UniterForReferringExpressions(TINY, img_dim=2048, loss="rank", hard_ratio=1.0)
    model = model.double().eval()
    examples = _re_examples(rng, 4, max_img=12)
    batch = uf.data.collate(examples, task="re")
    with torch.no_grad():
        out = model(batch)
    p = torch.sigmoid(out["scores"])
    want = 0.0
    for b, ex in enumerate(examples):
        n, t = len(ex["img_feat"]), ex["target"]
        others = [r for r in range(n) if r != t]
        if not others:
            continue  # no negative: adds nothing
        hard = max(others, key=lambda r: float(out["scores"][b, r]))
        want += max(0.2 + float(p[b, hard]) - float(p[b, t]), 0.0)
    assert float(out["loss"]) == pytest.approx(want, rel=1e-9, abs=1e-12)
    # Random negatives: always a real region other than the target.
    model.hard_ratio = 0.0
    two = [ex | {"img_feat": ex["img_feat"][:2], "img_loc": ex["img_loc"][:2]} for ex in examples]
    two = [ex | {"target": ex["target"] % 2} for ex in two]
    batch = uf.data.collate(two, task="re")
    with torch.no_grad():
        out = model(batch)
    p = torch.sigmoid(out["scores"])
    want = sum(
        max(0.2 + float(p[b, 1 - ex["target"]]) - float(p[b, ex["target"]]), 0.0)
        for b, ex in enumerate(two)
    )
    assert float(out["loss"]) == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_pretraining_checkpoint_scores_zero_shot(tmp_path, rng):
    # The rank head starts as the ITM head's "match" row: the retrieval score of a pretrained
    # model is its ITM match logit, with no training.
    pretrained = uf.UniterForPretraining(TINY).double().eval()
    path = uf.save_reference(pretrained, tmp_path / "pretrained.pt")
    model = uf.UniterForRetrieval(TINY, img_dim=2048)
    report = uf.load_pretrained(model, path, verbose=False)
    model.double().eval()
    assert report.adapted and "itm_output" in report.adapted[0]
    assert not report.missing
    torch.testing.assert_close(model.rank_output.weight[0], pretrained.itm_output.weight[1])
    examples = random_examples(rng, ragged_sizes(rng, 4))  # every task's fields
    with torch.no_grad():
        got = model(uf.data.collate(examples, task="retrieval"))["scores"]
        itm = uf.data.collate(examples, task="itm")
        hidden = pretrained.uniter(itm)
        logits = pretrained.itm_output(pretrained.uniter.pooler(hidden, itm.cu_seqlens[:-1].long()))
    torch.testing.assert_close(got, logits[:, 1], rtol=1e-9, atol=1e-11)
    # The authors' init_output gives the same head.
    theirs = authors.UniterForImageTextRetrieval(TINY, 2048)
    theirs.load_state_dict(torch.load(path), strict=False)
    theirs.init_output()
    torch.testing.assert_close(theirs.rank_output.weight, model.rank_output.weight.float())


@pytest.mark.parametrize(("kind", "mlp"), CASES)
def test_load_the_references_finetuned_checkpoint(kind, mlp, tmp_path):
    ours, theirs = _models(kind, mlp)
    torch.manual_seed(1)
    for p in theirs.parameters():
        p.data.normal_()
    torch.save(theirs.state_dict(), tmp_path / "finetuned.pt")
    report = uf.load_pretrained(ours, tmp_path / "finetuned.pt", verbose=False)
    assert not report.missing and not report.unexpected and not report.adapted
    for key, value in uf.export_reference(ours).items():
        torch.testing.assert_close(value.double(), theirs.state_dict()[key].double(), msg=key)


def test_collate_names_bad_examples(rng):
    examples = _retrieval_examples(rng, 1, 3)
    examples[0]["target"] = 0
    with pytest.raises(ValueError, match="example 0: target must be 1"):
        uf.data.collate(examples, task="retrieval")
    examples = [ex | {"target": 1} for ex in _retrieval_examples(rng, 1, 2)]
    with pytest.raises(ValueError, match="no negative"):
        uf.data.collate(examples, task="retrieval")
    examples = _re_examples(rng, 3)
    examples[2]["target"] = len(examples[2]["img_feat"])
    with pytest.raises(ValueError, match=r"example 2: target must be the referred region's"):
        uf.data.collate(examples, task="re")
    examples = _re_examples(rng, 2)
    del examples[1]["target"]
    with pytest.raises(ValueError, match="example 1: missing field 'target'"):
        uf.data.collate(examples, task="re")
    # Inference batches: no target, no loss.
    model = uf.UniterForReferringExpressions(TINY, img_dim=2048).eval()
    batch = uf.data.collate(_plain(_re_examples(rng, 2)), task="re")
    with torch.no_grad():
        assert set(model(batch)) == {"scores"}


def _hand_matrix():
    # 3 images, 2 captions each (texts 0,1 -> image 0; 2,3 -> 1; 4,5 -> 2).
    txt2img = [0, 0, 1, 1, 2, 2]
    img2txts = [[0, 1], [2, 3], [4, 5]]
    s = np.array(
        [
            [0.9, 0.1, 0.0],  # text 0: its image first
            [0.2, 0.8, 0.1],  # text 1: its image second
            [0.1, 0.7, 0.3],  # text 2: first
            [0.5, 0.4, 0.6],  # text 3: third
            [0.3, 0.2, 0.1],  # text 4: third
            [0.0, 0.5, 0.4],  # text 5: second
        ],
        dtype=np.float32,
    )
    return s, txt2img, img2txts


def test_recall_on_a_hand_made_matrix():
    s, txt2img, img2txts = _hand_matrix()
    got = recall_at_k(s, txt2img, img2txts)
    # Image retrieval ranks: 0, 1, 0, 2, 2, 1 -> R@1 2/6; R@5 and R@10 all.
    assert got["img_r1"] == pytest.approx(2 / 6)
    assert got["img_r5"] == got["img_r10"] == 1.0
    # Text retrieval: image 0's column ranks text 0 first; image 1's column ranks text 1 first
    # (0.8), its own texts 2 (0.7) second; image 2's column: text 3 (0.6) first, text 5 (0.4)
    # second... its own texts 4 (0.1) and 5 (0.4): best rank 2 (after 3 and 2).
    assert got["txt_r1"] == pytest.approx(1 / 3)
    assert got["txt_r5"] == 1.0
    assert got["r_mean"] == pytest.approx((got["txt_r_mean"] + got["img_r_mean"]) / 2)


def test_recall_matches_the_reference_on_random_matrices(rng):
    n_img, per = 12, 3
    txt2img = [j for j in range(n_img) for _ in range(per)]
    img2txts = [[j * per + k for k in range(per)] for j in range(n_img)]
    s = rng.standard_normal((n_img * per, n_img)).astype(np.float32)
    ids_t = [f"t{k}" for k in range(len(txt2img))]
    ids_i = [f"i{j}" for j in range(n_img)]
    ref = authors.itm_eval(
        torch.from_numpy(s),
        ids_t,
        ids_i,
        {f"t{k}": f"i{j}" for k, j in enumerate(txt2img)},
        {f"i{j}": [f"t{k}" for k in own] for j, own in enumerate(img2txts)},
    )
    got = recall_at_k(s, txt2img, img2txts)
    # The reference's image retrieval counts `(rank < K).sum()` over the (text, position) pairs
    # of `nonzero()`: texts with index < K whose image is in their top 10 count once more. That
    # is its only difference from the definition (ours).
    top10 = np.argsort(-s, axis=1, kind="stable")[:, :10]
    found = [(top10[t] == txt2img[t]).any() for t in range(len(txt2img))]
    for key, value in ref.items():
        if key.startswith("img_r") and key != "img_r_mean":
            k = int(key[len("img_r") :])
            value -= sum(found[:k]) / len(txt2img)
        if key.startswith("txt") or key in ("img_r1", "img_r5", "img_r10"):
            assert got[key] == pytest.approx(value), key
