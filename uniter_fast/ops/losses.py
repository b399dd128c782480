"""The masked pretraining losses, index-based and sync-free: the reference form.

The reference model selects masked positions with boolean masks (`hidden[mask]`), which makes the
GPU wait for the host to learn how many rows survive. Here the collator has already computed the
row indices, so a gather is an `index_select` with a known output size. Each function states the
reference's reduction; the fused Triton kernels will be held to these (float64-checkable).

Shapes: M masked tokens, R masked regions, H hidden, V vocabulary, D region-feature width,
C region classes (1601, background at 0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _widen(x: torch.Tensor) -> torch.Tensor:
    """At least fp32 for the loss arithmetic (bf16/fp16 widen; float64 stays float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def gather_rows(hidden: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """hidden: (N, H), index: (M,) int64 rows -> (M, H)."""
    return hidden.index_select(0, index)


def gather_padded(packed: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Padded view of packed rows: packed (N, F), index (*S) with N at padding -> (*S, F).

    Index N reads an appended zero row, so padded positions are zero without a mask.
    """
    rows = torch.cat([packed, packed.new_zeros(1, packed.shape[1])])
    return rows.index_select(0, index.reshape(-1)).view(*index.shape, packed.shape[1])


def mlm_loss(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """Cross-entropy of the tied MLM decoder, mean over the masked tokens.

    x: (M, H) transformed hidden states; weight: (V, H) word embeddings; bias: (V,);
    labels: (M,) original token ids. Returns a scalar.
    """
    logits = F.linear(x, weight, bias)
    return F.cross_entropy(_widen(logits), labels)


def mrfr_loss(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, target: torch.Tensor
) -> torch.Tensor:
    """Squared error of the tied feature regression, mean over all elements (R x D).

    x: (R, H) transformed hidden states; weight: (H, D), the image embedder's `img_linear.weight`
    (the regression uses its transpose); bias: (D,); target: (R, D) original features.
    """
    pred = F.linear(x, weight.t(), bias)
    pred = _widen(pred)
    return F.mse_loss(pred, target.to(pred.dtype))


def mrc_loss(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on the hard region label, ignore index 0, mean over the masked regions.

    logits: (R, C); label: (R,) in 1..C-1. The reference takes `reduction='none'` then `.mean()`,
    which counts ignored rows in the denominator; labels are never 0, so this equals the mean.
    """
    per_row = F.cross_entropy(_widen(logits), label, ignore_index=0, reduction="none")
    return per_row.mean()


def mrckl_loss(logits: torch.Tensor, soft_target: torch.Tensor) -> torch.Tensor:
    """KL(soft_target || softmax(logits)) element-wise, mean over all elements (R x C).

    logits: (R, C); soft_target: (R, C) detector distributions (zeros contribute zero).
    """
    log_prob = F.log_softmax(_widen(logits), dim=-1)
    return F.kl_div(log_prob, soft_target.to(log_prob.dtype), reduction="none").mean()


def itm_loss(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Two-way cross-entropy on the pooled [CLS], mean over pairs. scores: (B, 2); target: (B,)."""
    return F.cross_entropy(_widen(scores), target)


def wra_loss(distance: torch.Tensor, itm_target: torch.Tensor) -> dict[str, torch.Tensor]:
    """The WRA objective from per-pair distances, without a host sync.

    distance: (B,); itm_target: (B,) 1 for matching pairs. Returns
    `wra` = (sum of positive distances - sum of negative distances) / B, and the mean distance of
    the positive and of the negative pairs (`wra_pos`, `wra_neg`; 0 when a batch has none).
    """
    pos = itm_target.to(distance.dtype)
    neg = 1 - pos
    pos_sum = (distance * pos).sum()
    neg_sum = (distance * neg).sum()
    return {
        "wra": (pos_sum - neg_sum) / distance.shape[0],
        "wra_pos": pos_sum / pos.sum().clamp_min(1),
        "wra_neg": neg_sum / neg.sum().clamp_min(1),
    }
