"""The optimisation engine: the reference's schedule, decay groups, summed accumulation, clip."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY, random_examples

import uniter_fast as uf
from uniter_fast.config import OptimConfig
from uniter_fast.train.engine import Engine, param_groups
from uniter_fast.train.schedule import MIN_LR, learning_rate, warmup_linear


def test_schedule_is_the_references():
    # warmup_linear(step, warmup, total): step/warmup, then (total-step)/(total-warmup), floor 1e-8.
    assert warmup_linear(5, 10, 100) == 0.5
    assert warmup_linear(10, 10, 100) == 1.0
    assert warmup_linear(55, 10, 100) == pytest.approx(0.5)
    assert warmup_linear(100, 10, 100) == 0.0
    assert learning_rate(100, 5e-5, 10, 100) == MIN_LR
    assert learning_rate(1, 5e-5, 0, 100) == pytest.approx(5e-5 * 99 / 100)


def test_decay_groups_follow_the_references_name_rule():
    model = uf.UniterForPretraining(TINY)
    decay, no_decay = param_groups(model, 0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert "uniter.encoder.layer.0.attention.self.qkv.bias" in kept
    assert "uniter.embeddings.LayerNorm.weight" in kept
    # LayerNorms not named LayerNorm are decayed by the reference's rule, and so here.
    assert "uniter.img_embeddings.img_layer_norm.weight" in decayed
    assert "feat_regress.net.2.weight" in decayed
    assert "uniter.embeddings.word_embeddings.weight" in decayed
    assert len(decayed) + len(kept) == len(list(model.parameters()))  # tied params counted once


def test_accumulated_gradients_are_summed(rng):
    torch.manual_seed(0)
    model = uf.UniterForPretraining(TINY)
    a = uf.data.collate(random_examples(rng, [(6, 5), (8, 3)]), "mlm")
    b = uf.data.collate(random_examples(rng, [(5, 7)]), "mlm")
    model(a, "mlm")["loss"].backward()
    model(b, "mlm")["loss"].backward()
    summed = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    (model(a, "mlm")["loss"] + model(b, "mlm")["loss"]).backward()
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(summed[n], p.grad, msg=n)


def test_step_clips_sets_lr_and_clears_grads(rng):
    model = uf.UniterForPretraining(TINY)
    engine = Engine(
        model,
        OptimConfig(lr=1e-3, warmup_steps=10, grad_clip=0.5),
        total_steps=100,
        device=torch.device("cpu"),
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = uf.data.collate(random_examples(rng, [(6, 5)]), "mlm")
    engine.backward(model(batch, "mlm")["loss"] * 1000)
    total = torch.nn.utils.get_total_norm(
        [p.grad for p in model.parameters() if p.grad is not None]
    )
    out = engine.step(5)
    assert out["lr"] == pytest.approx(5e-4)
    assert float(out["grad_norm"]) == pytest.approx(float(total), rel=1e-5) and float(total) > 0.5
    assert all(p.grad is None for p in model.parameters())
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())


def test_fp16_needs_cuda():
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        Engine(
            uf.UniterForPretraining(TINY),
            OptimConfig(),
            total_steps=1,
            device=torch.device("cpu"),
            precision="fp16",
        )
