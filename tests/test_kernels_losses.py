"""Fused masked losses (kernels/masked_losses.py) against their references: loss and every gradient.

Without CUDA, conftest sets TRITON_INTERPRET=1 and the kernels run in Triton's interpreter on the
CPU; on a GPU the same tests run compiled, plus the CUDA-only checks at the end (no host sync,
peak memory against the eager path). Sizes are small and odd (one row, non-powers of two, row
lengths that are not multiples of the column step, MLM row counts that are not multiples of the
chunk), and every buffer a kernel must fill starts as NaN, so an element left unwritten shows.

Tolerances. fp32: against the float64 reference, tight. bf16/fp16: the 2x rule, our error
against the float64 reference (run on the same low-precision input values) at most twice the
error of the same-dtype PyTorch reference, plus a floor of a few fp32 roundings for quantities
that both compute in fp32 (the loss itself: bf16 logits are widened before the softmax, so both
errors are fp32 rounding noise and their ratio means nothing). The error of a tensor is the norm
of its difference: where the fused path rounds at other places than the reference (fp16's
prescaled MLM gradients, MRFR's bias added after the matmul), the largest single error of a
few hundred elements is one rounding each side, and the ratio of the two scatters up to 2 by
chance (seen: 2.03 once in 80 runs); the norm's ratio stays within 1.3. The largest single
error is held to 4x as well, which a misplaced or missing element would break (the fp32 tests
and the NaN-poisoned buffers catch those first).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from uniter_fast.kernels import triton_runs_on
from uniter_fast.ops import losses as L

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if not triton_runs_on(DEVICE):
    pytest.skip(
        f"Triton kernels cannot run on {DEVICE} here (triton missing, or on the CPU "
        "TRITON_INTERPRET=1 was not set before triton was imported)",
        allow_module_level=True,
    )

from uniter_fast.kernels import masked_losses as K  # noqa: E402  (needs triton, checked above)

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
LOW = {"bf16": torch.bfloat16, "fp16": torch.float16}
# fp32 against float64: relative to the largest magnitude of the quantity compared.
FP32_RTOL = 2e-5
# The 2x rule's floor, relative to the largest magnitude: a few fp32 roundings.
FP32_FLOOR = 2e-6


@pytest.fixture(autouse=True)
def poisoned_buffers(monkeypatch):
    """Buffers the kernels and matmuls must fill start as NaN (integer ones would not occur)."""

    def poisoned(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(K, "_empty", poisoned)


# --- helpers ------------------------------------------------------------------------------------


def _tensor(rng, shape, scale=1.0, dtype=torch.float32):
    return torch.tensor(rng.standard_normal(shape) * scale, dtype=dtype, device=DEVICE)


def _loss_and_grads(fn, inputs, diff, upstream=1.0):
    """fn(*inputs) and its gradients w.r.t. the inputs at positions `diff`, on fresh leaves."""
    leaves = [
        t.detach().clone().requires_grad_(i in diff) if t.is_floating_point() else t
        for i, t in enumerate(inputs)
    ]
    loss = fn(*leaves)
    grads = torch.autograd.grad(loss * upstream, [leaves[i] for i in diff])
    return loss.detach(), grads


def _max_err(got: torch.Tensor, want: torch.Tensor) -> float:
    assert got.shape == want.shape, (got.shape, want.shape)
    assert not torch.isnan(got).any(), "NaN: an element was left unwritten"
    return (got.double() - want.double()).abs().max().item() if got.numel() else 0.0


def _norm_err(got: torch.Tensor, want: torch.Tensor) -> float:
    _max_err(got, want)  # shape and NaN checks
    return (got.double() - want.double()).norm().item()


def _scale(t: torch.Tensor) -> float:
    return max(t.double().abs().max().item(), 1e-30) if t.numel() else 1.0


def assert_fp32_close(got, want, names):
    for name, g, w in zip(names, got, want, strict=True):
        err = _max_err(g, w)
        assert err <= FP32_RTOL * _scale(w), f"{name}: max error {err:.3e}, scale {_scale(w):.3e}"


def assert_2x_rule(got, same_dtype, exact, names, loss_bound=None):
    """The 2x rule for every tensor (module docstring); with `loss_bound`, the loss (first) is held
    to that absolute bound instead (see `_mrfr_loss_bound`)."""
    for k, (name, g, s, e) in enumerate(zip(names, got, same_dtype, exact, strict=True)):
        assert g.dtype == s.dtype, f"{name}: dtype {g.dtype}, the reference gives {s.dtype}"
        ours, theirs = _norm_err(g, e), _norm_err(s, e)
        floor = FP32_FLOOR * max(e.double().norm().item(), 1e-30)
        if k == 0 and loss_bound is not None:
            assert ours <= loss_bound + floor, f"{name}: error {ours:.3e} > bound {loss_bound:.3e}"
            continue
        assert ours <= 2 * theirs + floor, (
            f"{name}: our error norm {ours:.3e} > 2 x the same-dtype reference's {theirs:.3e} + "
            f"{floor:.3e}"
        )
        ours_max, theirs_max = _max_err(g, e), _max_err(s, e)
        assert ours_max <= 4 * theirs_max + FP32_FLOOR * _scale(e), (
            f"{name}: our largest error {ours_max:.3e} > 4 x the same-dtype reference's "
            f"{theirs_max:.3e}"
        )


def check_against_reference(
    fused, reference, inputs, diff, names, low=None, upstream=1.0, loss_bound=None
):
    """fp32 inputs: fused vs the float64 reference. `low` (a dtype): the float inputs at `diff`
    cast to it, fused vs the same-dtype reference by the 2x rule. `loss_bound(low_inputs)`: an
    absolute bound for the loss's error in place of the 2x rule."""
    if low is None:
        exact = _loss_and_grads(reference, [_wide(t) for t in inputs], diff, upstream)
        got = _loss_and_grads(fused, inputs, diff, upstream)
        assert got[0].dtype == torch.float32
        assert_fp32_close([got[0], *got[1]], [exact[0], *exact[1]], names)
        return
    low_inputs = [t.to(low) if i in diff else t for i, t in enumerate(inputs)]
    exact = _loss_and_grads(reference, [_wide(t) for t in low_inputs], diff, upstream)
    same = _loss_and_grads(reference, low_inputs, diff, upstream)
    got = _loss_and_grads(fused, low_inputs, diff, upstream)
    bound = None if loss_bound is None else abs(upstream) * loss_bound(low_inputs)
    assert_2x_rule(
        [got[0], *got[1]], [same[0], *same[1]], [exact[0], *exact[1]], names, loss_bound=bound
    )


def _wide(t: torch.Tensor) -> torch.Tensor:
    return t.double() if t.is_floating_point() else t


# --- MLM ----------------------------------------------------------------------------------------


def _mlm_inputs(rng, m, h, v, ignored=0):
    x = _tensor(rng, (m, h))
    weight = _tensor(rng, (v, h), scale=h**-0.5)
    bias = _tensor(rng, (v,), scale=0.1)
    labels = torch.tensor(rng.integers(0, v, m), device=DEVICE)
    labels[rng.permutation(m)[:ignored]] = K.MLM_IGNORE_INDEX
    return [x, weight, bias, labels]


MLM_CASES = [
    # (M, H, V, chunk_rows, block, ignored labels)
    pytest.param(1, 8, 50, None, None, 0, id="one-row"),
    pytest.param(37, 24, 300, 8, 64, 3, id="ragged-chunks-and-columns"),
    pytest.param(64, 16, 129, 32, 128, 0, id="chunks-divide-M-V-one-past-block"),
    pytest.param(45, 20, 97, None, 16, 0, id="default-chunk"),
]


@pytest.mark.parametrize("m, h, v, chunk_rows, block, ignored", MLM_CASES)
def test_mlm_fp32(rng, m, h, v, chunk_rows, block, ignored):
    def fused(*a):
        return K.mlm_loss(*a, chunk_rows=chunk_rows, block=block)

    check_against_reference(
        fused,
        L.mlm_loss_reference,
        _mlm_inputs(rng, m, h, v, ignored),
        diff=(0, 1, 2),
        names=("loss", "grad_x", "grad_weight", "grad_bias"),
    )


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize(
    "m, chunk_rows", [pytest.param(41, 16, id="chunked"), pytest.param(23, None, id="one-chunk")]
)
def test_mlm_low_precision(rng, dtype, m, chunk_rows):
    def fused(*a):
        return K.mlm_loss(*a, chunk_rows=chunk_rows, block=64)

    check_against_reference(
        fused,
        L.mlm_loss_reference,
        _mlm_inputs(rng, m, 32, 211, ignored=2),
        diff=(0, 1, 2),
        names=("loss", "grad_x", "grad_weight", "grad_bias"),
        low=LOW[dtype],
    )


def test_mlm_fp16_under_loss_scaling(rng):
    """fp16 training scales the loss (GradScaler), so the eager path rounds scaled gradients; the
    fused path writes its fp16 logits gradients prescaled (FP16_GRAD_PRESCALE), else most of a
    wide softmax's (p - onehot) / count would be fp16 subnormals, and must hold the 2x rule."""
    check_against_reference(
        lambda *a: K.mlm_loss(*a, chunk_rows=64),
        L.mlm_loss_reference,
        _mlm_inputs(rng, 150, 16, 2000),
        diff=(0, 1, 2),
        names=("loss", "grad_x", "grad_weight", "grad_bias"),
        low=torch.float16,
        upstream=65536.0,
    )


def test_mlm_autocast_keeps_fp32_weight_gradient(rng):
    """Training's setting: fp32 parameters, bf16 matmuls under autocast. The fused path returns
    the fp32 gradients directly (the weight's from an fp32 accumulator), held by the 2x rule
    to the reference under the same autocast."""
    x, weight, bias, labels = _mlm_inputs(rng, 29, 24, 150, ignored=1)
    names = ("loss", "grad_x", "grad_weight", "grad_bias")

    def under_autocast(fn):
        def run(*a):
            with torch.autocast(DEVICE, dtype=torch.bfloat16):
                return fn(*a)

        return run

    inputs = [x, weight, bias, labels]
    rounded = [t.to(torch.bfloat16).double() if t.is_floating_point() else t for t in inputs]
    exact = _loss_and_grads(L.mlm_loss_reference, rounded, (0, 1, 2))
    same = _loss_and_grads(under_autocast(L.mlm_loss_reference), inputs, (0, 1, 2))
    got = _loss_and_grads(
        under_autocast(lambda *a: K.mlm_loss(*a, chunk_rows=8)), inputs, (0, 1, 2)
    )
    assert all(g.dtype == torch.float32 for g in got[1])
    assert_2x_rule([got[0], *got[1]], [same[0], *same[1]], [exact[0], *exact[1]], names)


def test_mlm_upstream_gradient_and_single_backward(rng):
    inputs = _mlm_inputs(rng, 19, 16, 70)
    check_against_reference(
        lambda *a: K.mlm_loss(*a, chunk_rows=4),
        L.mlm_loss_reference,
        inputs,
        diff=(0, 1, 2),
        names=("loss", "grad_x", "grad_weight", "grad_bias"),
        upstream=-3.5,
    )
    x, weight, bias, labels = (t.requires_grad_() if t.is_floating_point() else t for t in inputs)
    loss = K.mlm_loss(x, weight, bias, labels)
    loss.backward(retain_graph=True)
    # The saved gradients were scaled in place: a second pass must fail, not double them.
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_mlm_grads_only_where_needed(rng):
    x, weight, bias, labels = _mlm_inputs(rng, 13, 8, 60)
    want = L.mlm_loss_reference(x.double(), weight.double(), bias.double(), labels)
    with torch.no_grad():
        loss = K.mlm_loss(x.requires_grad_(), weight, bias, labels)
    assert not loss.requires_grad
    torch.testing.assert_close(loss.double(), want, rtol=FP32_RTOL, atol=0)
    # Only x asks: the weight and bias gradients are neither made nor returned.
    x = x.detach().requires_grad_()
    loss = K.mlm_loss(x, weight, bias, labels)
    assert loss.grad_fn.saved_tensors[1] is None and loss.grad_fn.saved_tensors[2] is None
    (grad_x,) = torch.autograd.grad(loss, x)
    x64 = x.detach().double().requires_grad_()
    (want_x,) = torch.autograd.grad(
        L.mlm_loss_reference(x64, weight.double(), bias.double(), labels), x64
    )
    assert_fp32_close([grad_x], [want_x], ["grad_x"])


def test_mlm_chunk_rows_rule():
    # At most H rows (at least MLM_MIN_CHUNK_ROWS): a chunk's logits are never larger than W.
    assert K.mlm_chunk_rows(100, 768) == 100
    assert K.mlm_chunk_rows(768, 768) == 768
    assert K.mlm_chunk_rows(2048, 1024) == 1024
    assert K.mlm_chunk_rows(0, 768) == 1
    # Balanced: 770 rows are 400 + 370, not 768 + 2.
    assert K.mlm_chunk_rows(770, 768) == 400
    for hidden in (32, 768, 1024):
        cap = max(hidden, K.MLM_MIN_CHUNK_ROWS)
        for rows in range(cap + 1, 6 * cap, 7):
            chunk = K.mlm_chunk_rows(rows, hidden)
            chunks = -(-rows // chunk)
            last = rows - (chunks - 1) * chunk
            assert chunk <= cap and chunks == -(-rows // cap), (rows, hidden, chunk)
            assert chunk - last <= K.MLM_CHUNK_ALIGN * chunks, (rows, hidden, chunk, last)


# --- MRFR ---------------------------------------------------------------------------------------


def _mrfr_inputs(rng, r, h, d, target_dtype=torch.float16):
    x = _tensor(rng, (r, h))
    weight = _tensor(rng, (h, d), scale=h**-0.5)
    bias = _tensor(rng, (d,), scale=0.1)
    target = _tensor(rng, (r, d)).to(target_dtype)
    return [x, weight, bias, target]


@pytest.mark.parametrize(
    "r, h, d, block",
    [
        pytest.param(1, 8, 50, None, id="one-row"),
        pytest.param(23, 16, 300, 64, id="ragged-columns"),
        pytest.param(40, 12, 129, 128, id="one-past-block"),
    ],
)
@pytest.mark.parametrize("target_dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_mrfr_fp32(rng, r, h, d, block, target_dtype):
    check_against_reference(
        lambda *a: K.mrfr_loss(*a, block=block),
        L.mrfr_loss_reference,
        _mrfr_inputs(rng, r, h, d, target_dtype),
        diff=(0, 1, 2),
        names=("loss", "grad_x", "grad_weight", "grad_bias"),
        upstream=1.5,
    )


# Unit roundoff: half the gap between 1 and the next value (8 and 11 significant bits).
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def _mrfr_loss_bound(x, weight, bias, target, dtype):
    """Worst-case error of the MRFR loss when each `x @ weight` element is rounded once to
    `dtype` (|delta| <= u |xW|): |mean(2 d delta + delta^2)|, d = xW + b - target.

    The 2x rule does not fit this scalar: the fused path rounds `x @ W` and adds the bias in
    fp32, the reference rounds `x @ W + b`; two different roundings of similar size, whose
    errors in a sum are independent, so their ratio exceeds 2 about 30 % of the time.
    """
    xw = x.double() @ weight.double()
    d = xw + bias.double() - target.double()
    delta = UNIT_ROUNDOFF[dtype] * xw.abs()
    return ((2 * d.abs() * delta + delta**2).sum() / d.numel()).item()


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_mrfr_low_precision(rng, dtype):
    check_against_reference(
        lambda *a: K.mrfr_loss(*a, block=64),
        L.mrfr_loss_reference,
        _mrfr_inputs(rng, 31, 24, 200),
        diff=(0, 1, 2),
        names=("loss", "grad_x", "grad_weight", "grad_bias"),
        low=LOW[dtype],
        loss_bound=lambda a: _mrfr_loss_bound(*a, LOW[dtype]),
    )


def test_mrfr_autocast(rng):
    inputs = _mrfr_inputs(rng, 17, 16, 90)
    names = ("loss", "grad_x", "grad_weight", "grad_bias")

    def under_autocast(fn):
        def run(*a):
            with torch.autocast(DEVICE, dtype=torch.bfloat16):
                return fn(*a)

        return run

    # Autocast rounds x and the weight to bf16; the fused path keeps the fp32 bias as it is.
    rounded = [inputs[0].bfloat16(), inputs[1].bfloat16(), inputs[2], inputs[3]]
    exact = _loss_and_grads(L.mrfr_loss_reference, [_wide(t) for t in rounded], (0, 1, 2))
    same = _loss_and_grads(under_autocast(L.mrfr_loss_reference), inputs, (0, 1, 2))
    got = _loss_and_grads(under_autocast(K.mrfr_loss), inputs, (0, 1, 2))
    assert all(g.dtype == torch.float32 for g in got[1])
    bound = _mrfr_loss_bound(*rounded, torch.bfloat16)
    assert_2x_rule(
        [got[0], *got[1]], [same[0], *same[1]], [exact[0], *exact[1]], names, loss_bound=bound
    )


def test_mrfr_single_backward(rng):
    x, weight, bias, target = _mrfr_inputs(rng, 5, 8, 20)
    loss = K.mrfr_loss(x.requires_grad_(), weight, bias, target)
    loss.backward(retain_graph=True)
    # The backward wrote the gradient over the saved prediction.
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


# --- MRC and MRC-kl -----------------------------------------------------------------------------


def _soft_labels(rng, r, c):
    soft = rng.dirichlet(np.full(c, 0.2), r)
    soft[rng.random((r, c)) < 0.1] = 0.0  # exact zeros contribute nothing
    soft /= soft.sum(1, keepdims=True).clip(1e-12)
    # fp16 as the data stores them: the rows no longer sum to exactly 1.
    return torch.tensor(soft, dtype=torch.float16, device=DEVICE)


def _mrc_inputs(rng, r, c, ignored=0):
    logits = _tensor(rng, (r, c), scale=2.0)
    soft = _soft_labels(rng, r, c)
    label = 1 + soft[:, 1:].float().argmax(1)
    label[torch.tensor(rng.permutation(r)[:ignored], dtype=torch.long, device=DEVICE)] = 0
    return logits, soft, label


MRC_CASES = [
    # (R, C, block, ignored rows)
    pytest.param(1, 31, None, 0, id="one-row"),
    pytest.param(45, 257, 64, 4, id="ragged-columns-ignored-rows"),
    pytest.param(7, 1601, None, 0, id="uniter-classes"),
]


@pytest.mark.parametrize("r, c, block, ignored", MRC_CASES)
def test_mrc_fp32(rng, r, c, block, ignored):
    logits, _, label = _mrc_inputs(rng, r, c, ignored)
    check_against_reference(
        lambda *a: K.mrc_loss(*a, block=block),
        L.mrc_loss_reference,
        [logits, label],
        diff=(0,),
        names=("loss", "grad_logits"),
        upstream=0.75,
    )


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_mrc_low_precision(rng, dtype):
    logits, _, label = _mrc_inputs(rng, 33, 1601, ignored=1)
    check_against_reference(
        K.mrc_loss,
        L.mrc_loss_reference,
        [logits, label],
        diff=(0,),
        names=("loss", "grad_logits"),
        low=LOW[dtype],
    )


@pytest.mark.parametrize("r, c, block, ignored", MRC_CASES)
def test_mrckl_fp32(rng, r, c, block, ignored):
    logits, soft, _ = _mrc_inputs(rng, r, c)
    check_against_reference(
        lambda *a: K.mrckl_loss(*a, block=block),
        L.mrckl_loss_reference,
        [logits, soft],
        diff=(0,),
        names=("loss", "grad_logits"),
        upstream=2.0,
    )


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_mrckl_low_precision(rng, dtype):
    logits, soft, _ = _mrc_inputs(rng, 29, 300)
    check_against_reference(
        lambda *a: K.mrckl_loss(*a, block=128),
        L.mrckl_loss_reference,
        [logits, soft],
        diff=(0,),
        names=("loss", "grad_logits"),
        low=LOW[dtype],
    )


def test_mrckl_fp32_soft_target_of_any_float_dtype(rng):
    logits, soft, _ = _mrc_inputs(rng, 6, 40)
    want = L.mrckl_loss_reference(logits.double(), soft.double())
    for target in (soft, soft.float(), soft.bfloat16()):
        got = K.mrckl_loss(logits, target)
        wanted = L.mrckl_loss_reference(logits.double(), target.double())
        torch.testing.assert_close(got.double(), wanted, rtol=FP32_RTOL, atol=0)
    torch.testing.assert_close(K.mrckl_loss(logits, soft).double(), want, rtol=FP32_RTOL, atol=0)


# --- shared behaviour ---------------------------------------------------------------------------


def test_no_rows_match_the_reference():
    """Zero masked rows: NaN losses (a mean over nothing) and zero gradients, as the reference."""
    h, v, c, d = 8, 30, 17, 12
    z = torch.zeros
    cases = [
        (K.mlm_loss, L.mlm_loss_reference, [z(0, h), z(v, h), z(v), z(0, dtype=torch.long)], 3),
        (K.mrfr_loss, L.mrfr_loss_reference, [z(0, h), z(h, d), z(d), z(0, d)], 3),
        (K.mrc_loss, L.mrc_loss_reference, [z(0, c), z(0, dtype=torch.long)], 1),
        (K.mrckl_loss, L.mrckl_loss_reference, [z(0, c), z(0, c)], 1),
    ]
    for fused, reference, inputs, n in cases:
        inputs = [t.to(DEVICE) for t in inputs]
        got = _loss_and_grads(fused, inputs, tuple(range(n)))
        want = _loss_and_grads(reference, inputs, tuple(range(n)))
        assert torch.isnan(got[0]) and torch.isnan(want[0]), fused.__name__
        for g, w in zip(got[1], want[1], strict=True):
            torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_shape_dtype_and_label_errors(rng):
    x, weight, bias, labels = _mlm_inputs(rng, 4, 8, 20)
    with pytest.raises(ValueError, match=r"expected x \(M, H\) and weight \(V, H\)"):
        K.mlm_loss(x, weight.t(), bias, labels)
    with pytest.raises(ValueError, match=r"expected bias \(20,\)"):
        K.mlm_loss(x, weight, bias[:-1], labels)
    with pytest.raises(TypeError, match="float64"):
        K.mlm_loss(x.double(), weight.double(), bias.double(), labels)
    with pytest.raises(TypeError, match="share a dtype"):
        K.mlm_loss(x.bfloat16(), weight, bias, labels)
    with pytest.raises(TypeError, match="int32 or int64 labels"):
        K.mlm_loss(x, weight, bias, labels.float())
    with pytest.raises(ValueError, match=r"expected shape \(4,\)"):
        K.mlm_loss(x, weight, bias, labels[:3])
    with pytest.raises(ValueError, match="chunk_rows"):
        K.mlm_loss(x, weight, bias, labels, chunk_rows=0)
    with pytest.raises(ValueError, match="power of two"):
        K.mlm_loss(x, weight, bias, labels, block=48)
    if DEVICE == "cpu":  # the range check would read the labels on the host: CPU only
        with pytest.raises(ValueError, match=r"\[0, 20\)"):
            K.mlm_loss(x, weight, bias, torch.tensor([0, 1, 20, 2]))
    x, weight, bias, target = _mrfr_inputs(rng, 3, 8, 10)
    with pytest.raises(ValueError, match=r"target \(3, 10\)"):
        K.mrfr_loss(x, weight, bias, target[:, :9])
    with pytest.raises(ValueError, match="target requires grad"):
        K.mrfr_loss(x, weight, bias, target.float().requires_grad_())
    logits, soft, label = _mrc_inputs(rng, 3, 9)
    with pytest.raises(ValueError, match=r"expected logits \(R, C\)"):
        K.mrc_loss(logits[None], label)
    with pytest.raises(ValueError, match="same shape"):
        K.mrckl_loss(logits, soft[:, :-1])
    with pytest.raises(ValueError, match="soft_target requires grad"):
        K.mrckl_loss(logits, soft.float().requires_grad_())


# --- dispatch -----------------------------------------------------------------------------------


def _all_inputs(rng):
    logits, soft, label = _mrc_inputs(rng, 5, 23)
    return {
        "mlm": (L.mlm_loss, L.mlm_loss_reference, _mlm_inputs(rng, 6, 8, 40)),
        "mrfr": (L.mrfr_loss, L.mrfr_loss_reference, _mrfr_inputs(rng, 4, 8, 30)),
        "mrc": (L.mrc_loss, L.mrc_loss_reference, [logits, label]),
        "mrckl": (L.mrckl_loss, L.mrckl_loss_reference, [logits, soft]),
    }


def test_auto_backend_table():
    assert set(L.AUTO_BACKEND) == {"mlm", "mrfr", "mrc", "mrckl"}
    assert set(L.AUTO_BACKEND.values()) <= {"triton", "reference"}


def test_dispatch_reference_and_triton(rng):
    for name, (dispatch, reference, inputs) in _all_inputs(rng).items():
        want = reference(*inputs)
        assert torch.equal(dispatch(*inputs, backend="reference"), want), name
        if DEVICE == "cpu":
            # "auto" on the CPU is the reference itself, bit for bit.
            assert torch.equal(dispatch(*inputs), want), name
        got = dispatch(*inputs, backend="triton")
        torch.testing.assert_close(got, want.float(), rtol=FP32_RTOL, atol=1e-7, msg=name)
        with pytest.raises(ValueError, match="backend must be one of"):
            dispatch(*inputs, backend="fused")


def test_auto_on_cpu_keeps_float64(rng):
    x, weight, bias, labels = (_wide(t).cpu() for t in _mlm_inputs(rng, 5, 8, 30))
    assert L.mlm_loss(x, weight, bias, labels).dtype == torch.float64


@pytest.mark.skipif(DEVICE != "cpu", reason="the interpreter's switch is a CPU matter")
def test_forced_triton_on_cpu_needs_the_interpreter(rng, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    for name, (dispatch, reference, inputs) in _all_inputs(rng).items():
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            dispatch(*inputs, backend="triton")
        assert torch.equal(dispatch(*inputs), reference(*inputs)), name


# --- CUDA only: host syncs and peak memory at UNITER's sizes ------------------------------------


def _uniter_case(name: str, rows: int, hidden: int, seed: int = 0):
    """(fused, reference, inputs, diff) at UNITER's sizes, fp32 parameters as in training."""
    rng = np.random.default_rng(seed)
    if name == "mlm":
        return K.mlm_loss, L.mlm_loss_reference, _mlm_inputs(rng, rows, hidden, 28996), (0, 1, 2)
    if name == "mrfr":
        return K.mrfr_loss, L.mrfr_loss_reference, _mrfr_inputs(rng, rows, hidden, 2048), (0, 1, 2)
    logits, soft, label = _mrc_inputs(rng, rows, 1601)
    logits = logits.bfloat16()  # the classifier's output under autocast
    if name == "mrc":
        return K.mrc_loss, L.mrc_loss_reference, [logits, label], (0,)
    return K.mrckl_loss, L.mrckl_loss_reference, [logits, soft], (0,)


def _step(fn, inputs, diff):
    leaves = [t.detach().requires_grad_(i in diff) for i, t in enumerate(inputs)]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = fn(*leaves)
    loss.backward()
    return loss


@cuda_only
@pytest.mark.gpu
@pytest.mark.parametrize("name", ["mlm", "mrfr", "mrc", "mrckl"])
def test_cuda_forward_backward_never_syncs(name):
    fused, _, inputs, diff = _uniter_case(name, 1000, 768)
    _step(fused, inputs, diff)  # compile and probe first, outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _step(fused, inputs, diff)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


@cuda_only
@pytest.mark.gpu
@pytest.mark.parametrize("name", ["mlm", "mrfr", "mrc", "mrckl"])
@pytest.mark.parametrize("rows, hidden", [(128, 768), (2048, 1024)])
def test_cuda_peak_memory_no_higher_than_eager(name, rows, hidden):
    fused, reference, inputs, diff = _uniter_case(name, rows, hidden)
    peaks = {}
    for label, fn in (("fused", fused), ("eager", reference)):
        _step(fn, inputs, diff)  # warm: compiled kernels, cuBLAS workspaces
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        _step(fn, inputs, diff)
        torch.cuda.synchronize()
        peaks[label] = torch.cuda.max_memory_allocated() - base
    assert peaks["fused"] <= peaks["eager"], peaks


@cuda_only
@pytest.mark.gpu
def test_cuda_mlm_fallback_without_addmm_out_dtype_matches(monkeypatch):
    """Where torch refuses addmm(out_dtype=fp32), the MLM head widens its operands and runs the
    fp32 GEMMs in TF32 (exact for bf16 values): the same gradients to fp32 rounding."""
    fused, _, inputs, diff = _uniter_case("mlm", 1000, 768)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        fast = _loss_and_grads(fused, inputs, diff)
    monkeypatch.setattr(K, "_addmm_widens", lambda device, dtype: False)
    before = torch.backends.cuda.matmul.fp32_precision
    with torch.autocast("cuda", dtype=torch.bfloat16):
        slow = _loss_and_grads(fused, inputs, diff)
    assert torch.backends.cuda.matmul.fp32_precision == before
    for a, b in zip((fast[0], *fast[1]), (slow[0], *slow[1]), strict=True):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-5, atol=1e-6 * b.abs().max())


def test_mlm_weight_gradient_path_is_described():
    assert K.mlm_weight_grad_path("cpu", torch.float32) == "fp32 GEMMs"
    path = K.mlm_weight_grad_path("cpu", torch.bfloat16)
    assert path == "widened bf16 operands, fp32 GEMMs (cpu)"
    from uniter_fast.ops import describe_kernels

    # Only CUDA lines carry it (the probe needs the device).
    assert "MLM weight gradient" not in describe_kernels("triton", "cpu", torch.bfloat16)


def test_tf32_products_restores_the_setting():
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    with K._tf32_products():
        assert matmul.fp32_precision == "tf32"
    assert matmul.fp32_precision == before
    with pytest.raises(RuntimeError), K._tf32_products():
        raise RuntimeError("inside")
    assert matmul.fp32_precision == before
