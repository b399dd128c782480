"""VQA, SNLI-VE and NLVR2 on packed batches against the authors' padded models, weight for
weight; their collates; loading pretraining and fine-tuned checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TINY, ragged_sizes, random_examples

import uniter_fast as uf
from uniter_fast.authors import downstream as authors

VARIANTS = ["paired-attn", "paired", "triplet"]


def _vqa_examples(rng, count, classes, **kw):
    examples = random_examples(rng, ragged_sizes(rng, count, **kw))
    out = []
    for ex in examples:
        targets = np.zeros(classes, dtype=np.float32)
        hot = rng.choice(classes, size=min(3, classes), replace=False)
        targets[hot] = rng.choice([0.3, 0.6, 0.9, 1.0], size=hot.size)
        out.append({k: ex[k] for k in ("input_ids", "img_feat", "img_loc")} | {"targets": targets})
    return out


def _nlvr2_examples(rng, count, **kw):
    left = random_examples(rng, ragged_sizes(rng, count, **kw))
    right = random_examples(rng, ragged_sizes(rng, count, **kw))
    return [
        {
            "input_ids": a["input_ids"],
            "img_feat": (a["img_feat"], b["img_feat"]),
            "img_loc": (a["img_loc"], b["img_loc"]),
            "target": bool(rng.integers(2)),
        }
        for a, b in zip(left, right, strict=True)
    ]


def _models(kind, variant=None):
    """Ours and the authors', float64, the authors' loaded from ours in the reference layout."""
    if kind == "vqa":
        ours = uf.UniterForVqa(TINY, img_dim=2048, num_answers=11)
        theirs = authors.UniterForVisualQuestionAnswering(TINY, 2048, 11)
    elif kind == "ve":
        ours = uf.UniterForVisualEntailment(TINY, img_dim=2048)
        theirs = authors.UniterForVisualEntailment(TINY, 2048)
    else:
        ours = uf.UniterForNlvr2(TINY, img_dim=2048, variant=variant)
        theirs = authors.NLVR2[variant](TINY, 2048)
        theirs.init_type_embedding()
    ours, theirs = ours.double(), theirs.double()
    result = theirs.load_state_dict(uf.export_reference(ours), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    theirs.double()
    return ours, theirs


def _authors_batch(examples, task):
    batch = authors.collate(examples, task)
    return {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}


CASES = [("vqa", None), ("ve", None)] + [("nlvr2", v) for v in VARIANTS]


def _examples(rng, kind, count=5, **kw):
    if kind == "vqa":
        return _vqa_examples(rng, count, 11, **kw)
    if kind == "ve":
        return _vqa_examples(rng, count, 3, **kw)
    return _nlvr2_examples(rng, count, **kw)


@pytest.mark.parametrize(("kind", "variant"), CASES)
def test_scores_and_loss_match_authors(kind, variant, rng):
    ours, theirs = _models(kind, variant)
    ours.eval(), theirs.eval()
    examples = _examples(rng, kind)
    batch = uf.data.collate(examples, task=ours.task)
    with torch.no_grad():
        got = ours(batch)
        theirs_batch = _authors_batch(examples, ours.task)
        scores = theirs(theirs_batch, compute_loss=False)
        loss = authors.reduce_loss(kind, theirs(theirs_batch), theirs_batch)
    assert got["scores"].shape == scores.shape
    torch.testing.assert_close(got["scores"], scores, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(got["loss"].double(), loss, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize(("kind", "variant"), CASES)
def test_gradients_match_authors(kind, variant, rng):
    # Training mode, dropout off (TINY): every parameter's gradient, in the reference layout.
    ours, theirs = _models(kind, variant)
    examples = _examples(rng, kind, count=4, max_txt=16, max_img=20)
    ours(uf.data.collate(examples, task=ours.task))["loss"].backward()
    theirs_batch = _authors_batch(examples, ours.task)
    authors.reduce_loss(kind, theirs(theirs_batch), theirs_batch).backward()
    assert_same_gradients(ours, theirs)


def assert_same_gradients(ours, theirs):
    """Every parameter's gradient of our model equals the authors' model's, in the reference
    layout (a parameter without a gradient counts as zeros)."""
    grads = {
        name: p.grad if p.grad is not None else torch.zeros_like(p)
        for name, p in ours.named_parameters()
    }
    mine = uf.export_reference(_Grads(ours, grads))
    for name, p in theirs.named_parameters():
        want = p.grad if p.grad is not None else torch.zeros_like(p)
        torch.testing.assert_close(mine[name].double(), want, rtol=1e-7, atol=1e-10, msg=name)


class _Grads(torch.nn.Module):
    """A model's gradients presented as its state dict (for export_reference's key mapping)."""

    def __init__(self, model, grads):
        super().__init__()
        self.model, self.grads = model, grads

    def state_dict(self, *args, keep_vars=False, **kwargs):
        names = dict(self.model.named_parameters())
        out = {}
        for key, t in self.model.state_dict(keep_vars=True).items():
            out[key] = self.grads.get(key, torch.zeros_like(t)) if key in names else t
        return out


def test_task_names_and_batch_fields(rng):
    assert uf.UniterForVqa(TINY, img_dim=2048).task == "vqa"
    assert uf.UniterForVisualEntailment(TINY, img_dim=2048).task == "ve"
    assert uf.UniterForNlvr2(TINY, img_dim=2048).task == "nlvr2"
    assert uf.UniterForNlvr2(TINY, img_dim=2048, variant="paired").task == "nlvr2"
    assert uf.UniterForNlvr2(TINY, img_dim=2048, variant="triplet").task == "nlvr2-triplet"
    examples = _nlvr2_examples(rng, 3)
    paired = uf.data.collate(examples, task="nlvr2")
    assert paired.num_pairs == 6 and paired.target.tolist() == [int(e["target"]) for e in examples]
    n_left = [len(e["img_feat"][0]) for e in examples]
    types = paired.img_type_ids.split([n for e in examples for n in map(len, e["img_feat"])])
    assert all((t == 1 + k % 2).all() for k, t in enumerate(types))
    assert int(paired.img_len[0]) == n_left[0]
    triplet = uf.data.collate(examples, task="nlvr2-triplet")
    assert triplet.num_pairs == 3 and int(triplet.img_len[0]) == sum(
        map(len, examples[0]["img_feat"])
    )
    # Inference batches: no targets at all, and no loss.
    model = uf.UniterForVqa(TINY, img_dim=2048, num_answers=11).eval()
    plain = [{k: v for k, v in ex.items() if k != "targets"} for ex in _vqa_examples(rng, 2, 11)]
    batch = uf.data.collate(plain, task="vqa")
    assert batch.targets is None
    with torch.no_grad():
        out = model(batch)
    assert set(out) == {"scores"} and out["scores"].shape == (2, 11)
    # A batch of another task is refused, named.
    with pytest.raises(ValueError, match="task='vqa'"):
        model(uf.data.collate(_vqa_examples(rng, 2, 3), task="ve"))


@pytest.mark.parametrize("backend", ["cpp", "numpy"])
def test_collate_backends_agree(backend, rng):
    examples = _nlvr2_examples(rng, 4)
    want = uf.data.collate(examples, task="nlvr2", backend="cpp")
    got = uf.data.collate(examples, task="nlvr2", backend=backend)
    for name, t in want.tensors().items():
        assert torch.equal(getattr(got, name), t), name


def test_collate_names_bad_examples(rng):
    examples = _vqa_examples(rng, 3, 11)
    del examples[1]["targets"]
    with pytest.raises(ValueError, match=r"example 1: missing field 'targets'"):
        uf.data.collate(examples, task="vqa")
    examples = _vqa_examples(rng, 2, 11)
    examples[1]["targets"] = np.full(11, 1.5, dtype=np.float32)
    with pytest.raises(ValueError, match=r"example 1: targets must lie in \[0, 1\]"):
        uf.data.collate(examples, task="vqa")
    examples = _nlvr2_examples(rng, 2)
    examples[0]["img_feat"] = examples[0]["img_feat"][0]
    with pytest.raises(ValueError, match=r"example 0: NLVR2's img_feat must be a \(left, right\)"):
        uf.data.collate(examples, task="nlvr2")
    examples = _nlvr2_examples(rng, 2)
    left, right = examples[1]["img_loc"]
    examples[1]["img_loc"] = (left, right[:, :5])
    with pytest.raises(ValueError, match=r"example 1 \(right image\): img_loc"):
        uf.data.collate(examples, task="nlvr2")
    examples = _nlvr2_examples(rng, 2)
    examples[0]["target"] = 2
    with pytest.raises(ValueError, match="example 0: target must be 0, 1 or a bool"):
        uf.data.collate(examples, task="nlvr2")


def test_load_pretraining_checkpoint_into_nlvr2(tmp_path):
    pretrained = uf.UniterForPretraining(TINY)
    path = uf.save_reference(pretrained, tmp_path / "pretrained.pt")
    model = uf.UniterForNlvr2(TINY, img_dim=2048)
    report = uf.load_pretrained(model, path, verbose=False)
    rows = model.uniter.embeddings.token_type_embeddings.weight
    source = pretrained.uniter.embeddings.token_type_embeddings.weight
    assert torch.equal(rows[:2], source) and torch.equal(rows[2], source[1])
    assert report.adapted and "2 rows -> 3" in report.adapted[0]
    assert "adapted" in str(report)
    # The encoder loads; the heads are new; the pretraining heads are left over.
    assert all(
        k.startswith(("attn1", "attn2", "fc", "attn_pool", "nlvr2_output")) for k in report.missing
    )
    assert any(k.startswith("cls.") for k in report.unexpected)
    assert any(k.startswith("itm_output") for k in report.unexpected)


@pytest.mark.parametrize(("kind", "variant"), CASES)
def test_load_the_references_finetuned_checkpoint(kind, variant, tmp_path):
    # The authors' fine-tuned weights (their state_dict keys) load key for key.
    ours, theirs = _models(kind, variant)
    torch.manual_seed(1)
    for p in theirs.parameters():
        p.data.normal_()
    torch.save(theirs.state_dict(), tmp_path / "finetuned.pt")
    report = uf.load_pretrained(ours, tmp_path / "finetuned.pt", verbose=False)
    assert not report.missing and not report.unexpected and not report.adapted
    for key, value in uf.export_reference(ours).items():
        torch.testing.assert_close(value.double(), theirs.state_dict()[key].double(), msg=key)
