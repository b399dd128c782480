"""Reference ops: WRA/IPOT against the authors' loop and exact OT; losses against maths by hand."""

from __future__ import annotations

import numpy as np
import ot
import pytest
import torch
import torch.nn.functional as F

from uniter_fast import ops
from uniter_fast.authors import model as authors


def _padded_pairs(rng, lengths, hidden=24, dtype=torch.float64, fill=0.0):
    """Random padded txt/img with garbage (`fill`) past each pair's lengths."""
    b = len(lengths)
    m = max(t for t, _ in lengths)
    n = max(i for _, i in lengths)
    txt = torch.tensor(rng.standard_normal((b, m, hidden)), dtype=dtype)
    img = torch.tensor(rng.standard_normal((b, n, hidden)), dtype=dtype)
    for k, (t, i) in enumerate(lengths):
        txt[k, t:] = fill
        img[k, i:] = fill
    txt_len = torch.tensor([t for t, _ in lengths])
    img_len = torch.tensor([i for _, i in lengths])
    return txt, img, txt_len, img_len


def _ragged(rng, b, max_txt=62, max_img=100):
    return [
        (int(rng.integers(1, max_txt + 1)), int(rng.integers(1, max_img + 1))) for _ in range(b)
    ]


def test_wra_matches_authors_ipot_loop(rng):
    lengths = _ragged(rng, 9) + [(1, 1), (62, 100), (1, 100), (62, 1)]
    txt, img, txt_len, img_len = _padded_pairs(rng, lengths)
    got = ops.wra_distance(txt, img, txt_len, img_len)
    txt_pad = torch.arange(txt.shape[1]) >= txt_len[:, None]
    img_pad = torch.arange(img.shape[1]) >= img_len[:, None]
    want = authors.optimal_transport_dist(txt, img, txt_pad, img_pad)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_padding_contents_never_matter(rng):
    lengths = _ragged(rng, 6)
    a = _padded_pairs(np.random.default_rng(1), lengths, fill=0.0)
    b = _padded_pairs(np.random.default_rng(1), lengths, fill=1e3)
    torch.testing.assert_close(ops.wra_distance(*a), ops.wra_distance(*b), rtol=0, atol=0)


@pytest.mark.parametrize(
    # Bounds set from the worst of 150 random draws at each setting, with 5x margin or more:
    # 3.6e-3, 7.3e-5 and 6.6e-5 relative.
    "beta, iterations, rel_tol",
    [(0.5, 50, 2e-2), (0.1, 300, 5e-4), (0.05, 2000, 4e-4)],
)
def test_ipot_approaches_exact_ot(rng, beta, iterations, rel_tol):
    lengths = _ragged(rng, 6)
    txt, img, txt_len, img_len = _padded_pairs(rng, lengths)
    got = ops.wra_distance(txt, img, txt_len, img_len, beta=beta, iterations=iterations)
    cost = ops.cosine_cost(txt, img)
    for k, (m, n) in enumerate(lengths):
        exact = ot.emd2(np.full(m, 1 / m), np.full(n, 1 / n), cost[k, :m, :n].numpy())
        assert abs(got[k].item() - exact) <= rel_tol * exact, (k, m, n, got[k].item(), exact)


def test_ipot_error_shrinks_with_beta(rng):
    txt, img, txt_len, img_len = _padded_pairs(rng, [(40, 60)])
    exact = ot.emd2(np.full(40, 1 / 40), np.full(60, 1 / 60), ops.cosine_cost(txt, img)[0].numpy())
    errors = [
        abs(ops.wra_distance(txt, img, txt_len, img_len, beta=beta, iterations=it).item() - exact)
        / exact
        for beta, it in [(1.0, 50), (0.5, 50), (0.1, 1000), (0.02, 5000)]
    ]
    # Strictly better down to beta 0.1; at 0.02 the error is at the level of emd2's own rounding
    # (worst of 150 draws: 1.2e-7).
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[3] < 1e-6, errors


def test_plan_marginals(rng):
    # The last half-step fixes sigma, so column sums (over regions) are exactly 1/m; row sums
    # reach 1/n as IPOT converges.
    lengths = _ragged(rng, 5, 30, 40)
    txt, img, txt_len, img_len = _padded_pairs(rng, lengths)
    cost = ops.cosine_cost(txt, img)
    row_errors = []
    for iterations in (50, 500):
        plan = ops.ipot_plan(cost, txt_len, img_len, beta=0.1, iterations=iterations)  # [B, n, m]
        worst = 0.0
        for k, (m, n) in enumerate(lengths):
            block = plan[k, :n, :m]
            torch.testing.assert_close(
                block.sum(0), torch.full((m,), 1 / m, dtype=plan.dtype), rtol=1e-10, atol=0
            )
            worst = max(worst, float((block.sum(1) * n - 1).abs().max()))
            assert plan[k, n:].abs().sum() == 0 and plan[k, :, m:].abs().sum() == 0
        row_errors.append(worst)
    # Worst of 60 draws after 500 iterations: 3.8e-3 (one pair of length 1 converges at once).
    assert row_errors[1] <= row_errors[0] and row_errors[1] < 2e-2, row_errors


def test_gradient_flows_through_cost_with_plan_constant(rng):
    lengths = _ragged(rng, 4, 20, 30)
    txt, img, txt_len, img_len = _padded_pairs(rng, lengths)
    txt.requires_grad_(True)
    img.requires_grad_(True)
    upstream = torch.tensor(rng.standard_normal(len(lengths)))
    (ops.wra_distance(txt, img, txt_len, img_len) * upstream).sum().backward()

    # By hand: the plan from detached inputs, then the gradient of sum(C * T^T) alone.
    t2, i2 = txt.detach().clone().requires_grad_(True), img.detach().clone().requires_grad_(True)
    mask = (torch.arange(txt.shape[1]) < txt_len[:, None])[:, :, None] & (
        torch.arange(img.shape[1]) < img_len[:, None]
    )[:, None, :]
    tn = t2 / t2.norm(dim=-1, keepdim=True).clamp_min(1e-5)
    vn = i2 / i2.norm(dim=-1, keepdim=True).clamp_min(1e-5)
    cost = (1 - tn @ vn.transpose(1, 2)) * mask
    plan = ops.ipot_plan(cost.detach(), txt_len, img_len)
    ((cost * plan.transpose(1, 2)).sum((1, 2)) * upstream).sum().backward()
    torch.testing.assert_close(txt.grad, t2.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(img.grad, i2.grad, rtol=1e-10, atol=1e-12)
    for k, (m, n) in enumerate(lengths):
        assert txt.grad[k, m:].abs().sum() == 0 and img.grad[k, n:].abs().sum() == 0


def test_packed_form_equals_padded_form(rng):
    lengths = _ragged(rng, 7)
    hidden = 16
    seqs = [torch.tensor(rng.standard_normal((t + i, hidden))) for t, i in lengths]
    packed = torch.cat(seqs).requires_grad_(True)
    txt_len = torch.tensor([t for t, _ in lengths])
    img_len = torch.tensor([i for _, i in lengths])
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(txt_len + img_len, 0)
    got = ops.wra_distance_packed(
        packed, cu, txt_len, img_len, int(txt_len.max()), int(img_len.max())
    )
    txt = torch.nn.utils.rnn.pad_sequence(
        [s[:t] for s, (t, _) in zip(seqs, lengths, strict=True)], batch_first=True
    )
    img = torch.nn.utils.rnn.pad_sequence(
        [s[t:] for s, (t, _) in zip(seqs, lengths, strict=True)], batch_first=True
    )
    torch.testing.assert_close(
        got, ops.wra_distance(txt, img, txt_len, img_len), rtol=1e-12, atol=1e-12
    )
    got.sum().backward()
    assert torch.isfinite(packed.grad).all()


def test_low_precision_inputs_compute_in_fp32(rng):
    txt, img, txt_len, img_len = _padded_pairs(rng, _ragged(rng, 3), dtype=torch.float32)
    out = ops.wra_distance(txt.bfloat16(), img.bfloat16(), txt_len, img_len)
    assert out.dtype == torch.float32
    ref = ops.wra_distance(txt.bfloat16().double(), img.bfloat16().double(), txt_len, img_len)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)


def test_wra_shape_errors():
    with pytest.raises(ValueError, match="expected txt"):
        ops.wra_distance(torch.zeros(2, 3, 4), torch.zeros(2, 5, 6), torch.ones(2), torch.ones(2))
    with pytest.raises(ValueError, match="beta"):
        ops.ipot_plan(torch.zeros(1, 2, 2), torch.tensor([2]), torch.tensor([2]), beta=0.0)


# --- masked losses -----------------------------------------------------------------------------


def _log_softmax_by_hand(x):
    shifted = x - x.max(dim=-1, keepdim=True).values
    return shifted - shifted.exp().sum(dim=-1, keepdim=True).log()


def test_mlm_loss_by_hand(rng):
    m, h, v = 13, 8, 50
    x = torch.tensor(rng.standard_normal((m, h)))
    w = torch.tensor(rng.standard_normal((v, h)))
    b = torch.tensor(rng.standard_normal(v))
    labels = torch.tensor(rng.integers(0, v, m))
    logp = _log_softmax_by_hand(x @ w.T + b)
    want = -logp[torch.arange(m), labels].mean()
    torch.testing.assert_close(ops.mlm_loss(x, w, b, labels), want, rtol=1e-12, atol=0)


def test_mrfr_loss_by_hand(rng):
    r, h, d = 7, 8, 20
    x = torch.tensor(rng.standard_normal((r, h)))
    w = torch.tensor(rng.standard_normal((h, d)))  # img_linear.weight is (hidden, img_dim)
    b = torch.tensor(rng.standard_normal(d))
    target = torch.tensor(rng.standard_normal((r, d))).half()
    want = ((x @ w + b - target.double()) ** 2).sum() / (r * d)
    torch.testing.assert_close(ops.mrfr_loss(x, w, b, target), want, rtol=1e-12, atol=0)


def test_mrc_losses_by_hand(rng):
    r, c = 9, 31
    logits = torch.tensor(rng.standard_normal((r, c)))
    soft = torch.tensor(rng.dirichlet(np.full(c, 0.2), r))
    soft[0, 5] = 0.0  # zero targets contribute nothing (0 * log 0 = 0)
    soft[0] /= soft[0].sum()
    label = 1 + soft[:, 1:].argmax(1)
    logp = _log_softmax_by_hand(logits)
    torch.testing.assert_close(
        ops.mrc_loss(logits, label), -logp[torch.arange(r), label].mean(), rtol=1e-12, atol=0
    )
    kl = torch.where(soft > 0, soft * (soft.log() - logp), torch.zeros_like(soft)).sum() / (r * c)
    torch.testing.assert_close(ops.mrckl_loss(logits, soft), kl, rtol=1e-12, atol=0)


def test_wra_loss_sync_free_reduction():
    d = torch.tensor([0.5, 0.2, 0.9, 0.1], dtype=torch.float64)
    t = torch.tensor([1, 0, 1, 0])
    out = ops.wra_loss(d, t)
    assert out["wra"].item() == pytest.approx((0.5 + 0.9 - 0.2 - 0.1) / 4)
    assert out["wra_pos"].item() == pytest.approx(0.7)
    assert out["wra_neg"].item() == pytest.approx(0.15)
    only_pos = ops.wra_loss(d, torch.ones(4, dtype=torch.long))
    assert only_pos["wra_neg"].item() == 0.0


def test_index_gather_equals_boolean_mask(rng):
    hidden = torch.tensor(rng.standard_normal((40, 6)))
    mask = torch.tensor(rng.random(40) < 0.3)
    index = torch.nonzero(mask).squeeze(1)
    torch.testing.assert_close(ops.gather_rows(hidden, index), hidden[mask])


def test_losses_keep_float64_and_widen_half(rng):
    logits = torch.tensor(rng.standard_normal((4, 5)))
    label = torch.tensor([1, 2, 3, 4])
    assert ops.mrc_loss(logits, label).dtype == torch.float64
    assert ops.mrc_loss(logits.half(), label).dtype == torch.float32
    assert (
        ops.itm_loss(torch.zeros(3, 2, dtype=torch.bfloat16), torch.tensor([0, 1, 1])).dtype
        == torch.float32
    )
    ref = F.cross_entropy(logits.half().double(), label)
    torch.testing.assert_close(ops.mrc_loss(logits.half(), label).double(), ref, rtol=1e-6, atol=0)
