"""Static shapes: a padded batch gives the unpadded batch's losses and gradients, and the
graphed step (its bookkeeping on the CPU, its capture on CUDA) trains as the eager one."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from conftest import TINY, ragged_sizes, random_examples

import uniter_fast as uf
from uniter_fast.config import OptimConfig
from uniter_fast.data.schema import TASKS
from uniter_fast.data.static import (
    IGNORE_INDEX,
    StaticShape,
    fit_problem,
    pad_static,
    static_key,
)
from uniter_fast.train.step import TorchStep


def _batches(rng, task, count=1, pairs=6, max_txt=20, max_img=30):
    return [
        uf.data.collate(random_examples(rng, ragged_sizes(rng, pairs, max_txt, max_img)), task)
        for _ in range(count)
    ]


def _roomy(batch: uf.Batch, **more) -> StaticShape:
    """A shape with room to spare above `batch`, so every kind of padding is exercised."""
    s = StaticShape.covering([batch])
    grow = {"pairs": 3, "tokens": 40, "txt_tokens": 16, "regions": 24, "max_img_len": 5}
    values = {f.name: getattr(s, f.name) for f in dataclasses.fields(s)}
    for name, extra in grow.items():
        values[name] += extra
    values["mlm_targets"] += 16 if s.mlm_targets else 0
    values["mrm_targets"] += 16 if s.mrm_targets else 0
    values.update(more)
    return StaticShape(**values)


@pytest.mark.parametrize("task", TASKS)
def test_padded_layout(task, rng):
    batch = _batches(rng, task)[0]
    shape = _roomy(batch)
    p = pad_static(batch, shape)
    s = shape
    # Every size is the cap's; the real sizes are recorded.
    assert p.input_ids.shape == (s.txt_tokens,) and p.img_feat.shape == (s.regions, 2048)
    assert p.cu_seqlens.shape == (s.sequences + 1,) and p.txt_len.shape == (s.pairs,)
    assert p.pad_index.shape == (s.sequences, s.lpad) and p.unpad_index.shape == (s.rows,)
    assert (p.max_seqlen, p.max_txt_len, p.max_img_len) == (
        s.max_seqlen,
        s.max_txt_len,
        s.max_img_len,
    )
    assert (p.num_tokens, p.num_pairs, p.num_txt_tokens) == (
        batch.num_tokens,
        batch.num_pairs,
        batch.num_txt_tokens,
    )
    assert p.num_rows == s.rows and p.num_pair_slots == s.pairs
    # Every packed row is in exactly one sequence, none empty, none past max_seqlen.
    lengths = p.cu_seqlens.diff()
    assert int(p.cu_seqlens[-1]) == s.rows
    assert int(lengths.min()) >= 1 and int(lengths.max()) <= s.max_seqlen
    # Pair slots: the real pairs, then dummies of one token and one region.
    b = batch.num_pairs
    assert torch.equal(p.cu_seqlens[: b + 1], batch.cu_seqlens)
    assert torch.equal(p.txt_len[:b], batch.txt_len) and (p.txt_len[b:] == 1).all()
    assert (p.img_len[b:] == 1).all() and (lengths[b : s.pairs] == 2).all()
    # The padded view and its inverse.
    flat = p.pad_index.reshape(-1)
    assert torch.equal(flat[p.unpad_index], torch.arange(s.rows))
    assert int((flat < s.rows).sum()) == s.rows
    # Real tokens keep their rows; padded ones land past the packed rows, each on its own.
    dest = torch.cat([p.txt_dest, p.img_dest])
    assert dest.unique().numel() == dest.numel()
    assert torch.equal(p.txt_dest[: batch.num_txt_tokens], batch.txt_dest)
    assert (p.txt_dest[batch.num_txt_tokens :] >= s.rows).all()
    assert (p.img_dest[batch.img_dest.shape[0] :] >= s.rows).all()
    assert int(dest.max()) < p.padding.embed_rows
    # Targets: padded entries are ignored or flagged.
    if batch.mlm_labels is not None:
        m = batch.mlm_labels.shape[0]
        assert torch.equal(p.mlm_labels[:m], batch.mlm_labels)
        assert (p.mlm_labels[m:] == IGNORE_INDEX).all()
    if batch.mrm_index is not None:
        r = batch.mrm_index.shape[0]
        assert int(p.mrm_valid.sum()) == r and p.mrm_valid[:r].all()
        if p.mrc_label is not None:
            assert (p.mrc_label[r:] == 0).all() and (p.mrc_soft_target[r:] == 0).all()
        if p.mrfr_target is not None:
            assert (p.mrfr_target[r:] == 0).all()
    if batch.itm_target is not None:
        assert (p.itm_target[b:] == IGNORE_INDEX).all()
    # Same shape, same key: one graph serves both.
    other = pad_static(_batches(rng, task)[0], shape)
    if other is not None:
        assert static_key(other, task) == static_key(p, task)
    assert pad_static(p, shape) is p


def _grads(model):
    return [p.grad.clone() if p.grad is not None else None for p in model.parameters()]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("task", TASKS)
def test_padded_batch_gives_the_same_losses_and_gradients(task, attention, rng):
    # float64, training mode (dropout is 0 in TINY): every loss part, every metric and every
    # parameter's gradient, padded against unpadded.
    model = uf.UniterForPretraining(TINY, attention=attention).double()
    batch = _batches(rng, task)[0]
    padded = pad_static(batch, _roomy(batch))
    results = []
    for b in (batch, padded):
        model.zero_grad(set_to_none=True)
        out = model(b, task, metrics=True)
        out["loss"].backward()
        results.append((out, _grads(model)))
    (want, want_grads), (got, got_grads) = results
    assert set(got) == set(want)
    for key, value in want.items():
        if torch.is_tensor(value):
            torch.testing.assert_close(got[key], value, rtol=1e-12, atol=1e-14, msg=key)
        else:
            assert got[key] == value, key
    for (name, _), g, w in zip(model.named_parameters(), got_grads, want_grads, strict=True):
        # The same parameters get a gradient (the padding reaches none of the others) ...
        assert (g is None) == (w is None), name
        if w is not None:
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-13, msg=name)


@pytest.mark.parametrize("task", ["mlm", "mrc", "mrckl", "itm"])
def test_padded_batch_through_the_triton_kernels(task, rng):
    # The fused kernels (interpreted on the CPU) take the padded targets as they come: MLM's
    # ignored labels, MRC's label 0 and MRC-kl's zero rows, WRA's dummy pairs of 1 x 1.
    model = uf.UniterForPretraining(TINY, kernels="triton")
    batch = _batches(rng, task, pairs=4, max_txt=12, max_img=14)[0]
    padded = pad_static(batch, _roomy(batch))
    results = []
    for b in (batch, padded):
        model.zero_grad(set_to_none=True)
        out = model(b, task)
        out["loss"].backward()
        results.append((out, _grads(model)))
    (want, want_grads), (got, got_grads) = results
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=2e-5, atol=1e-6, msg=key)
    for g, w in zip(got_grads, want_grads, strict=True):
        assert (g is None) == (w is None)
        if w is not None:
            torch.testing.assert_close(g, w, rtol=1e-4, atol=2e-6)


def test_fit_and_covering(rng):
    batches = _batches(rng, "mlm", count=4) + _batches(rng, "itm", count=2)
    shape = StaticShape.covering(batches)
    assert all(fit_problem(b, shape) is None for b in batches)
    assert shape.pairs % 8 == 0 and shape.tokens % 64 == 0 and shape.mlm_targets % 16 == 0
    # One size over its cap, and the batch is refused, named.
    big = _batches(rng, "mlm", pairs=shape.pairs + 1, max_txt=4, max_img=2)[0]
    assert fit_problem(big, shape).startswith("pairs")
    assert pad_static(big, shape) is None
    tight = dataclasses.replace(shape, mlm_targets=int(batches[0].mlm_index.shape[0]) - 1)
    assert "MLM targets" in fit_problem(batches[0], tight)
    # A budget's shape takes any batch within the budget and the pairs.
    budget = StaticShape.for_budget(1024, pairs=8)
    for b in batches:
        if b.num_tokens <= 1024 and b.num_pairs <= 8:
            assert pad_static(b, budget) is not None
    with pytest.raises(ValueError, match="pairs"):
        StaticShape(tokens=10, pairs=0, txt_tokens=10, regions=10)
    with pytest.raises(ValueError, match="unpadded"):
        StaticShape.covering([pad_static(batches[0], shape)])


# --- the graphed step -----------------------------------------------------------------------


def _plan(rng, steps):
    """Steps of (task, batch) micro-batches; the last step has no ITM batch, so the ITM head's
    parameters get no gradient in it (AdamW must skip them, as in eager training)."""
    tasks = [["mlm", "itm", "mrfr"], ["mrckl", "mlm", "itm"], ["mlm", "mrc"]][:steps]
    return [[(t, _batches(rng, t, pairs=int(rng.integers(3, 7)))[0]) for t in ts] for ts in tasks]


def _train(plan, graphs, shape=None, device="cpu", dtype=torch.float64):
    torch.manual_seed(0)
    model = uf.UniterForPretraining(TINY).to(device, dtype).train()
    cfg = OptimConfig(lr=1e-3, warmup_steps=1, grad_accum=3, weight_decay=0.01)
    precision = "fp32"
    step = TorchStep(model, cfg, total_steps=10, device=device, precision=precision, graphs=graphs)
    losses = []
    for micro in plan:
        for task, batch in micro:
            if shape is not None:
                batch = pad_static(batch, shape) or batch
            out = step.micro(batch.to(device), task)
            losses.append(float(out["loss"].detach()))
        step.step()
    return model, losses, step


def test_graphed_step_bookkeeping_trains_as_eager(rng):
    # graphs="eager" runs the graphed step's buffers, static copies and optimizer hand-over
    # without capture: three optimizer steps on padded batches end where eager training on the
    # unpadded batches ends, parameter for parameter.
    plan = _plan(rng, 3)
    shape = StaticShape.covering([b for micro in plan for _, b in micro])
    want_model, want_losses, _ = _train(plan, "off")
    got_model, got_losses, step = _train(plan, "eager", shape)
    np.testing.assert_allclose(got_losses, want_losses, rtol=1e-10)
    for (name, w), g in zip(want_model.named_parameters(), got_model.parameters(), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12, msg=name)
    stats = step.graphs.describe()
    assert stats["eager"] == 0 and stats["graphs"] == 5  # one per task and shape


def test_graphed_step_runs_unpadded_batches_eagerly(rng):
    plan = _plan(rng, 2)
    want_model, _, _ = _train(plan, "off")
    got_model, _, step = _train(plan, "eager")  # no shape: nothing padded
    for w, g in zip(want_model.parameters(), got_model.parameters(), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)
    stats = step.graphs.describe()
    assert stats["eager"] == 6 and stats["graphs"] == 0
    assert "not padded" in next(iter(stats["eager_reasons"]))


def test_graphs_need_cuda_for_capture():
    model = uf.UniterForPretraining(TINY)
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        TorchStep(
            model, OptimConfig(), total_steps=1, device="cpu", precision="fp32", graphs="capture"
        )
    with pytest.raises(ValueError, match="graphs must be one of"):
        TorchStep(model, OptimConfig(), total_steps=1, device="cpu", precision="fp32", graphs="yes")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_captured_step_trains_as_eager_on_cuda(rng):
    # Captured and replayed (fp32, dropout off): the same parameters as eager training on the
    # unpadded batches after three steps, to fp32 accumulation-order tolerance; every micro-step
    # after the first of each task is a replay.
    plan = _plan(rng, 3) * 2
    shape = StaticShape.covering([b for micro in plan for _, b in micro])
    want_model, want_losses, _ = _train(plan, "off", device="cuda", dtype=torch.float32)
    got_model, got_losses, step = _train(plan, "capture", shape, device="cuda", dtype=torch.float32)
    np.testing.assert_allclose(got_losses, want_losses, rtol=2e-4, atol=1e-5)
    for w, g in zip(want_model.parameters(), got_model.parameters(), strict=True):
        torch.testing.assert_close(g, w, rtol=2e-3, atol=2e-5)
    stats = step.graphs.describe()
    assert stats["captures"] == 5 and stats["eager"] == 0
    assert stats["replays"] == sum(len(m) for m in plan)
