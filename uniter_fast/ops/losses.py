"""The masked pretraining losses, index-based and sync-free: reference forms and dispatchers.

The reference model selects masked positions with boolean masks (`hidden[mask]`), which makes the
GPU wait for the host to learn how many rows survive. Here the collator has already computed the
row indices, so a gather is an `index_select` with a known output size.

The four masked losses come in two forms with one signature: `*_reference` states the
reference's maths and reduction in plain PyTorch (float64-checkable: the CPU path, the debug path
and the test oracle), and the fused Triton kernels of `uniter_fast.kernels.masked_losses` are
held to it. `mlm_loss`, `mrfr_loss`, `mrc_loss` and `mrckl_loss` dispatch between them with
`backend`: "reference", "triton" (forced: CUDA tensors, or CPU tensors under Triton's
interpreter), or "auto" (the default): the reference on the CPU, and on CUDA the path named in
`AUTO_BACKEND`, the one switch per loss.

Shapes: M masked tokens, R masked regions, H hidden, V vocabulary, D region-feature width,
C region classes (1601, background at 0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kernels import triton_runs_on

BACKENDS = ("auto", "triton", "reference")
# The dtypes the kernels take (kernels/masked_losses.py), mirrored so that dispatching never
# imports triton; "auto" sends anything else (float64) to the reference.
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# What backend="auto" runs on CUDA tensors, per loss (on the CPU "auto" is always the reference).
# Flip an entry after measuring with benchmarks/bench_masked_losses.py on the target GPU; the
# targets are no host sync, peak memory no higher than eager and time no worse than eager
# (benchmarks/NOTES.md, "Masked losses").
# - mlm "triton": chosen for memory, which is certain. The reference materialises the (M, V)
#   logits in fp32 three times over (about 12 * M * V bytes at its backward's peak: 0.7 GB at
#   M = 2048, V = 28996); the chunked path holds at most H x V logits in bf16 (the size of W:
#   45 MB at H = 768) and the fp32 weight gradient it returns anyway, at or below the eager
#   peak at every M (kernels/masked_losses.py, `mlm_chunk_rows`). Same GEMM FLOPs and about a
#   third of the bytes moved, so it is predicted faster (about 1.5x at M = 2048 and 1.7x at
#   M = 256 on an H100); not yet measured.
# - mrfr, mrc, mrckl "reference": the fused kernels save a handful of elementwise launches over
#   R x 2048 or R x 1601 values (tens of microseconds a step, megabytes of memory), a gain too
#   small to enable unmeasured kernels for. Predicted to win by launch count once measured.
AUTO_BACKEND = {"mlm": "triton", "mrfr": "reference", "mrc": "reference", "mrckl": "reference"}


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


def mlm_loss_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """Cross-entropy of the tied MLM decoder, mean over the masked tokens.

    x: (M, H) transformed hidden states; weight: (V, H) word embeddings; bias: (V,);
    labels: (M,) original token ids. Returns a scalar.
    """
    logits = F.linear(x, weight, bias)
    return F.cross_entropy(_widen(logits), labels)


def mrfr_loss_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, target: torch.Tensor
) -> torch.Tensor:
    """Squared error of the tied feature regression, mean over all elements (R x D).

    x: (R, H) transformed hidden states; weight: (H, D), the image embedder's `img_linear.weight`
    (the regression uses its transpose); bias: (D,); target: (R, D) original features.
    """
    pred = F.linear(x, weight.t(), bias)
    pred = _widen(pred)
    return F.mse_loss(pred, target.to(pred.dtype))


def mrfr_loss_padded(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    target: torch.Tensor,
    valid: torch.Tensor,
) -> torch.Tensor:
    """`mrfr_loss_reference` over the `valid` rows of a static batch (`uniter_fast.data.static`).

    valid: (R,) bool; target: zero on the other rows. The predictions of the other rows are
    zeroed, so they add nothing to the loss or any gradient; the sum is divided by the real
    element count on the device. (Always this PyTorch form: `AUTO_BACKEND` runs MRFR on the
    reference, and the fused kernel has no row mask.)
    """
    pred = _widen(F.linear(x, weight.t(), bias)) * valid[:, None]
    error = F.mse_loss(pred, target.to(pred.dtype), reduction="sum")
    return error / (valid.sum() * pred.shape[1])


def mrc_loss_reference(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on the hard region label, ignore index 0, mean over the masked regions.

    logits: (R, C); label: (R,) in 1..C-1. The reference takes `reduction='none'` then `.mean()`,
    which counts ignored rows in the denominator; labels are never 0, so this equals the mean.
    """
    per_row = F.cross_entropy(_widen(logits), label, ignore_index=0, reduction="none")
    return per_row.mean()


def mrckl_loss_reference(logits: torch.Tensor, soft_target: torch.Tensor) -> torch.Tensor:
    """KL(soft_target || softmax(logits)) element-wise, mean over all elements (R x C).

    logits: (R, C); soft_target: (R, C) detector distributions (zeros contribute zero).
    """
    log_prob = F.log_softmax(_widen(logits), dim=-1)
    return F.kl_div(log_prob, soft_target.to(log_prob.dtype), reduction="none").mean()


def _resolve_backend(loss: str, backend: str, *tensors: torch.Tensor) -> str:
    """Which path runs `loss` on its float inputs `tensors`: "triton" or "reference" (the rule
    of the module docstring); raises for an unknown backend or a forced one that cannot run."""
    device = tensors[0].device
    if backend not in BACKENDS:
        raise ValueError(f"{loss}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type != "cuda":
            return "reference"
        choice = AUTO_BACKEND[loss]
        if choice not in ("triton", "reference"):
            raise ValueError(
                f"AUTO_BACKEND[{loss!r}] must be 'triton' or 'reference', got {choice!r}"
            )
        # Without triton installed, or for float64, CUDA runs the reference rather than failing.
        if not triton_runs_on("cuda") or any(t.dtype not in _KERNEL_DTYPES for t in tensors):
            return "reference"
        return choice
    if backend == "triton" and not triton_runs_on(device.type):
        raise RuntimeError(
            f"{loss}: backend='triton' needs CUDA tensors with triton installed, or CPU tensors "
            f"with TRITON_INTERPRET=1 set before triton is first imported (Triton's "
            f"interpreter); got {device.type} tensors"
        )
    return backend


def _kernels():
    # Imported on first use, so that importing uniter_fast never needs triton.
    from ..kernels import masked_losses

    return masked_losses


def mlm_loss(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    labels: torch.Tensor,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """`mlm_loss_reference`, or the fused chunked kernel (`backend`: module docstring)."""
    if _resolve_backend("mlm", backend, x, weight, bias) == "triton":
        return _kernels().mlm_loss(x, weight, bias, labels)
    return mlm_loss_reference(x, weight, bias, labels)


def mrfr_loss(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    target: torch.Tensor,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """`mrfr_loss_reference`, or the fused kernels (`backend`: module docstring)."""
    if _resolve_backend("mrfr", backend, x, weight, bias, target) == "triton":
        return _kernels().mrfr_loss(x, weight, bias, target)
    return mrfr_loss_reference(x, weight, bias, target)


def mrc_loss(logits: torch.Tensor, label: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """`mrc_loss_reference`, or the fused kernels (`backend`: module docstring)."""
    if _resolve_backend("mrc", backend, logits) == "triton":
        return _kernels().mrc_loss(logits, label)
    return mrc_loss_reference(logits, label)


def mrckl_loss(
    logits: torch.Tensor, soft_target: torch.Tensor, *, backend: str = "auto"
) -> torch.Tensor:
    """`mrckl_loss_reference`, or the fused kernels (`backend`: module docstring)."""
    if _resolve_backend("mrckl", backend, logits, soft_target) == "triton":
        return _kernels().mrckl_loss(logits, soft_target)
    return mrckl_loss_reference(logits, soft_target)


def itm_loss(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Two-way cross-entropy on the pooled [CLS], mean over pairs. scores: (B, 2); target: (B,)."""
    return F.cross_entropy(_widen(scores), target)


def wra_loss(distance: torch.Tensor, itm_target: torch.Tensor) -> dict[str, torch.Tensor]:
    """The WRA objective from per-pair distances, without a host sync.

    distance: (B,); itm_target: (B,) 1 for matching pairs, 0 for negatives, -100 for a static
    batch's padded slots (not counted). Returns
    `wra` = (sum of positive distances - sum of negative distances) / B, and the mean distance of
    the positive and of the negative pairs (`wra_pos`, `wra_neg`; 0 when a batch has none).
    """
    pos = (itm_target == 1).to(distance.dtype)
    neg = (itm_target == 0).to(distance.dtype)
    pos_sum = (distance * pos).sum()
    neg_sum = (distance * neg).sum()
    # Pairs counted on the device: B, less a static batch's padded slots (target -100).
    pairs = pos.sum() + neg.sum()
    return {
        "wra": (pos_sum - neg_sum) / pairs,
        "wra_pos": pos_sum / pos.sum().clamp_min(1),
        "wra_neg": neg_sum / neg.sum().clamp_min(1),
    }
