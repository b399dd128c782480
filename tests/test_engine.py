"""The optimisation engine: the reference's schedule, decay groups, summed accumulation, clip,
and the DeepSpeed config it completes from the recipe."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from conftest import TINY, random_examples

import uniter_fast as uf
from uniter_fast.config import REPO_ROOT as REPO
from uniter_fast.config import OptimConfig
from uniter_fast.train.engine import (
    Engine,
    Schedule,
    build_deepspeed_config,
    config_precision,
    init_distributed,
    load_deepspeed_config,
    param_groups,
)
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


def _ds(values=None, **kw):
    args = {"optim": OptimConfig(grad_accum=3, grad_clip=2.0), "precision": "auto"}
    args.update(kw)
    args.setdefault("device", torch.device("cpu"))
    return build_deepspeed_config(values or {"zero_optimization": {"stage": 2}}, **args)


def test_deepspeed_config_is_completed_from_the_recipe():
    cfg, notes = _ds()
    assert cfg["gradient_accumulation_steps"] == 3 and cfg["gradient_clipping"] == 2.0
    assert cfg["train_micro_batch_size_per_gpu"] == 1 and not notes
    assert config_precision(cfg) == "fp32"  # auto on the CPU with no precision in the JSON
    cuda, _ = _ds(device=torch.device("cuda"))
    assert config_precision(cuda) == "bf16"
    # The JSON's own values win, and the log says so.
    cfg, notes = _ds({"zero_optimization": {"stage": 3}, "gradient_accumulation_steps": 6})
    assert cfg["gradient_accumulation_steps"] == 6 and "optim.grad_accum 3 is not used" in notes[0]
    # The precision sections keep the JSON's other options (bf16's overflow check, say).
    bf16 = {
        "zero_optimization": {"stage": 1},
        "bf16": {"enabled": True, "check_grad_overflow": False},
    }
    cfg, _ = _ds(bf16, device=torch.device("cuda"))
    assert cfg["bf16"] == {"enabled": True, "check_grad_overflow": False}
    cfg, _ = _ds(bf16, precision="fp32")
    assert cfg["bf16"] == {"enabled": False, "check_grad_overflow": False}


@pytest.mark.parametrize("name", ["zero1", "zero2", "zero3"])
def test_shipped_configs(name):
    path = REPO / "configs" / "deepspeed" / f"{name}.json"
    cfg, _ = _ds(load_deepspeed_config(path), device=torch.device("cuda"))
    assert cfg["zero_optimization"]["stage"] == int(name[-1])
    assert config_precision(cfg) == "bf16"  # bf16 is the default
    fp16, notes = _ds(load_deepspeed_config(path), precision="fp16", device=torch.device("cuda"))
    assert fp16["fp16"]["enabled"] and fp16["fp16"]["loss_scale"] == 0  # dynamic scaling
    assert not fp16["bf16"]["enabled"] and "precision fp16" in notes[0]


@pytest.mark.parametrize(
    "values, message",
    [
        ({"optimizer": {"type": "Adam"}}, "remove the 'optimizer' section"),
        ({"scheduler": {}}, "remove the 'scheduler' section"),
        ({"train_micro_batch_size_per_gpu": 4}, "must be 1"),
        ({"train_batch_size": 64}, "remove train_batch_size"),
        ({"zero_optimization": {"stage": 0}}, "stage must be 1, 2 or 3"),
    ],
)
def test_deepspeed_config_errors(values, message):
    with pytest.raises(ValueError, match=message):
        _ds(values)


def test_fp16_needs_cuda():
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        _ds(precision="fp16")


def test_bad_deepspeed_files_are_named(tmp_path):
    with pytest.raises(ValueError, match="not found: .*nope.json"):
        load_deepspeed_config(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{stage: 2")
    with pytest.raises(ValueError, match="bad.json: not valid JSON"):
        load_deepspeed_config(bad)


def test_schedule_factor_gives_the_lr_of_the_next_step():
    schedule = Schedule(OptimConfig(lr=1e-3, warmup_steps=10), total_steps=100)
    for done in (0, 4, 9, 50, 99):
        assert schedule(done) * 1e-3 == pytest.approx(learning_rate(done + 1, 1e-3, 10, 100))


def test_engine_step_sums_micro_batches_clips_and_schedules(rng):
    """One DeepSpeed step over two micro-batches equals AdamW on the summed, clipped gradient."""
    launcher_vars = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "DS_ACCELERATOR")
    before = {k: os.environ.get(k) for k in launcher_vars}
    assert init_distributed(torch.device("cpu")) == (0, 1)
    # A group of one leaves nothing a train.py started from here would take for a launcher's
    # (it would try to join this process's store: the CI failure of EADDRINUSE on MASTER_PORT).
    assert {k: os.environ.get(k) for k in launcher_vars} == before
    optim = OptimConfig(lr=1e-3, warmup_steps=10, grad_clip=0.5, grad_accum=2)
    torch.manual_seed(0)
    model = uf.UniterForPretraining(TINY)
    twin = copy.deepcopy(model)
    cfg, _ = build_deepspeed_config(
        {"zero_optimization": {"stage": 1}},
        optim=optim,
        precision="fp32",
        device=torch.device("cpu"),
    )
    engine = Engine(model, optim, total_steps=100, deepspeed_config=cfg, device=torch.device("cpu"))
    assert engine.grad_accum == 2 and engine.micro_batch == 1 and engine.zero_stage == 1
    batches = [
        uf.data.collate(random_examples(rng, [(6, 5), (8, 3)]), "mlm"),
        uf.data.collate(random_examples(rng, [(5, 7)]), "mlm"),
    ]
    results = []
    for batch in batches:
        engine.backward(engine(batch, "mlm")["loss"] * 1000)
        results.append(engine.step(1))
    assert results[0] is None and results[1].applied
    assert results[1].lr == pytest.approx(learning_rate(1, 1e-3, 10, 100))

    # The same step by hand: summed gradients, clipped to 0.5, torch AdamW.
    opt = torch.optim.AdamW(
        param_groups(twin, optim.weight_decay), lr=results[1].lr, betas=optim.betas, eps=optim.eps
    )
    sum(twin(b, "mlm")["loss"] * 1000 for b in batches).backward()
    norm = torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.5)
    assert float(results[1].grad_norm) == pytest.approx(float(norm), rel=1e-4) and norm > 0.5
    opt.step()
    for (name, a), b in zip(engine.module.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
