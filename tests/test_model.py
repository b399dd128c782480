"""The packed model against the authors' padded model (uniter_fast.authors), weight for weight."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TINY, ragged_sizes, random_examples

import uniter_fast as uf
from uniter_fast.authors import collate as authors_collate
from uniter_fast.authors import model as authors_model
from uniter_fast.data.schema import TASKS


def _pair(config=TINY, dtype=torch.float64):
    ours = uf.UniterForPretraining(config).to(dtype)
    theirs = authors_model.UniterForPretraining(config).to(dtype)
    result = theirs.load_state_dict(uf.export_reference(ours), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    theirs.to(dtype)
    return ours, theirs


def _authors_batch(examples, task, dtype):
    batch = authors_collate.collate(examples, task)
    return {
        k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
        for k, v in batch.items()
    }


@pytest.mark.parametrize("task", TASKS)
def test_losses_match_authors_float64(task, rng):
    ours, theirs = _pair()
    ours.eval(), theirs.eval()
    examples = random_examples(rng, ragged_sizes(rng, 7))
    with torch.no_grad():
        got = ours(uf.data.collate(examples, task), task)
        want = authors_model.reduce_losses(
            task, theirs(_authors_batch(examples, task, torch.float64), task)
        )
    assert set(want) <= set(got)
    for key, value in want.items():
        # The authors compute WRA in fp32 whatever the model's dtype: those keys agree to fp32.
        fp32 = key in ("loss", "wra", "wra_pos", "wra_neg") and task == "itm"
        rtol, atol = (2e-6, 1e-7) if fp32 else (1e-9, 1e-12)
        torch.testing.assert_close(got[key].double(), value.double(), rtol=rtol, atol=atol, msg=key)


@pytest.mark.parametrize("task", TASKS)
def test_gradients_match_authors(task, rng):
    # Training mode with dropout off (TINY): every parameter's gradient, in the reference layout.
    ours, theirs = _pair()
    examples = random_examples(rng, ragged_sizes(rng, 5, max_txt=20, max_img=30))
    ours(uf.data.collate(examples, task), task)["loss"].backward()
    authors_model.reduce_losses(task, theirs(_authors_batch(examples, task, torch.float64), task))[
        "loss"
    ].backward()
    ours_grads = uf.export_reference(_GradView(ours))
    for name, p in theirs.state_dict(keep_vars=True).items():
        want = p.grad if p.grad is not None else torch.zeros_like(p)
        # The authors' WRA runs in fp32: on ITM, gradients agree to fp32 relative to their scale.
        atol = max(1e-5 * float(want.abs().max()), 1e-10) if task == "itm" else 1e-10
        torch.testing.assert_close(ours_grads[name].double(), want.double(), rtol=1e-7, atol=atol)


class _GradView(torch.nn.Module):
    """Presents a model's gradients as its state dict, so export_reference maps them by name."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def state_dict(self, *args, keep_vars=False, **kwargs):
        return {
            k: (p.grad if p.grad is not None else torch.zeros_like(p))
            for k, p in self.model.state_dict(keep_vars=True).items()
        }


def test_float32_features_are_not_rounded(rng):
    # float32 examples stay float32 in the batch: results equal the authors' on the same values.
    ours, theirs = _pair()
    ours.eval(), theirs.eval()
    examples = random_examples(rng, ragged_sizes(rng, 4), feat_dtype=np.float32)
    batch = uf.data.collate(examples, "mrfr")
    assert batch.img_feat.dtype == torch.float32
    with torch.no_grad():
        got = ours(batch, "mrfr")["loss"]
        want = theirs(_authors_batch(examples, "mrfr", torch.float64), "mrfr").mean()
    torch.testing.assert_close(got.double(), want, rtol=1e-9, atol=0)


def test_float32_model_within_reference_tolerance(rng):
    # The check users run: fp32 on both sides, losses within 1e-4 relative.
    ours, theirs = _pair(dtype=torch.float32)
    ours.eval(), theirs.eval()
    examples = random_examples(rng, ragged_sizes(rng, 16))
    for task in TASKS:
        with torch.no_grad():
            got = ours(uf.data.collate(examples, task), task)
            want = authors_model.reduce_losses(
                task, theirs(_authors_batch(examples, task, torch.float32), task)
            )
        for key, value in want.items():
            torch.testing.assert_close(got[key], value, rtol=1e-4, atol=1e-6, msg=f"{task}/{key}")


def test_single_pair_and_single_region(rng):
    ours, theirs = _pair()
    ours.eval(), theirs.eval()
    examples = random_examples(rng, [(3, 1)])
    for task in TASKS:
        with torch.no_grad():
            got = ours(uf.data.collate(examples, task), task)["loss"]
            want = authors_model.reduce_losses(
                task, theirs(_authors_batch(examples, task, torch.float64), task)
            )["loss"]
        torch.testing.assert_close(got.double(), want.double(), rtol=2e-6, atol=1e-7, msg=task)


def test_tied_weights_are_one_tensor():
    model = uf.UniterForPretraining(TINY)
    assert model.cls.predictions.decoder.weight is model.uniter.embeddings.word_embeddings.weight
    assert model.feat_regress.weight is model.uniter.img_embeddings.img_linear.weight


def test_task_without_its_targets_is_refused(rng):
    model = uf.UniterForPretraining(TINY)
    batch = uf.data.collate(random_examples(rng, [(5, 4)]), "itm")
    with pytest.raises(ValueError, match="mlm_index"):
        model(batch, "mlm")
    with pytest.raises(ValueError, match="unknown task"):
        model(batch, "vqa")


def test_metrics_report_accuracies(rng):
    model = uf.UniterForPretraining(TINY).eval()
    examples = random_examples(rng, ragged_sizes(rng, 6))
    out = model(uf.data.collate(examples, "itm"), "itm", metrics=True)
    assert out["itm_count"] == 6 and 0.0 <= float(out["itm_acc"]) <= 1.0
    assert float(out["loss"].detach()) == pytest.approx(
        float((out["itm"] + 0.1 * out["wra"]).detach()), rel=1e-6
    )
    out = model(uf.data.collate(examples, "mlm"), "mlm", metrics=True)
    assert out["mlm_count"] == sum(int((e["txt_labels"] != -1).sum()) for e in examples)


def test_wra_weight_zero_drops_wra(rng):
    model = uf.UniterForPretraining(TINY, wra_weight=0.0).eval()
    out = model(uf.data.collate(random_examples(rng, [(6, 5), (9, 3)]), "itm"), "itm")
    assert "wra" not in out and torch.equal(out["loss"], out["itm"])


@pytest.mark.parametrize("task", TASKS)
def test_fused_kernels_give_the_reference_losses_and_gradients(task, rng):
    # The model with every op forced onto its Triton kernel (interpreted on the CPU) against the
    # same weights on the reference ops. fp32: the kernels compute in fp32.
    pytest.importorskip("triton")
    from uniter_fast.kernels import triton_runs_on

    if not triton_runs_on("cpu") and not torch.cuda.is_available():
        pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1 (set by conftest)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = uf.UniterForPretraining(TINY).to(device).eval()
    batch = uf.data.collate(random_examples(rng, ragged_sizes(rng, 3, 12, 9)), task).to(device)
    results = {}
    for kernels in ("reference", "triton"):
        model.kernels = kernels
        model.zero_grad()
        out = model(batch, task)
        out["loss"].backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[kernels] = (out, grads)
    (ref, ref_grads), (fused, fused_grads) = results["reference"], results["triton"]
    for key in ref:
        if isinstance(ref[key], torch.Tensor):
            torch.testing.assert_close(fused[key], ref[key], rtol=1e-4, atol=1e-5, msg=key)
    assert fused_grads.keys() == ref_grads.keys()
    for name, grad in ref_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-3, atol=1e-5, msg=name)


def test_kernels_switch_is_checked():
    with pytest.raises(ValueError, match="kernels must be one of"):
        uf.UniterForPretraining(TINY, kernels="fast")
