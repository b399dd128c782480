"""Fused masked pretraining losses: MLM, MRFR, MRC and MRC-kl, forward and backward in Triton.

Each loss takes the rows the collator's precomputed index already gathered (M masked tokens or
R masked regions); nothing here reads a device value on the host, indexes with a boolean mask or
sizes an output from data, so no op waits for the GPU. The maths is the reference's,
`uniter_fast.ops.losses.*_reference`, which the tests hold these kernels to:

- MLM (`mlm_loss`): `cross_entropy(x @ W^T + b, labels)`, mean over the counted tokens
  (`labels != -100`, F.cross_entropy's default `ignore_index`; the collator never emits it), with
  `W (V, H)` the tied word embeddings. The (M, V) logits are the expensive part: in fp32 the
  reference materialises them three times over (the widened logits, log-softmax, its gradient;
  about 12 * M * V bytes at its backward's peak). Here they are made `chunk_rows` rows at a time,
  Liger-Kernel's fused-linear-cross-entropy scheme: per chunk, `logits = b + x_chunk @ W^T` by
  torch's matmul into one reused buffer, `_ce_fwd_kernel` writes each row's loss and overwrites
  the chunk with `d loss / d logits` in place, and the gradients are accumulated right away
  (`grad_x[chunk] = dlogits @ W`, `grad_W += dlogits^T @ x_chunk`, `grad_b += sum(dlogits)`).
  The forward thus does the backward's work; the backward only scales the saved gradients by
  the upstream gradient (a multiply, never a host read of it). `grad_W` accumulates in fp32 and
  is returned in the weight's dtype: under autocast (fp32 master weights, bf16 matmuls) it is
  the parameter's fp32 gradient itself, one fewer rounding than the reference's bf16 gradient
  and no (V, H) cast in the backward. Chunks are at most H rows, balanced (`mlm_chunk_rows`):
  a chunk's logits are never larger than W, and the peak memory stays at or below eager's at
  every M. The logits buffer's rows are padded to a multiple of 64 columns (28996 -> 29056),
  so that every row starts 16-byte aligned and the kernel's accesses are 16 bytes wide. fp16
  gradients are written prescaled by FP16_GRAD_PRESCALE and unscaled in fp32, since the
  upstream gradient (fp16's loss scale) is not known when they are made.
- MRFR (`mrfr_loss`): `mean((x @ W + b - target)^2)` over R x D, `W (H, D)` the image embedder's
  `img_linear.weight` (the regression uses its transpose). The matmul is torch's; the bias add,
  the squared error and its row sums are `_sq_err_fwd_kernel`, and the backward's bias add,
  difference and scaling `_sq_err_bwd_kernel`, which writes the prediction's gradient over the
  saved prediction, followed by the two matmuls and the bias sum.
- MRC (`mrc_loss`): `cross_entropy(logits, label, ignore_index=0, reduction='none').mean()`:
  ignored rows count in the denominator, as the reference's `.mean()` has it.
- MRC-kl (`mrckl_loss`): `kl_div(log_softmax(logits), soft_target, reduction='none').mean()` over
  R x C, pointwise `xlogy(t, t) - t * log_softmax(x)` (zero targets contribute zero). Its gradient
  is `(softmax(x) * sum(t) - t) / (R * C)`; the forward saves each row's log-sum-exp and target
  sum, so the backward reads the logits and targets once more and nothing else.

Every kernel runs one program per row, in fp32 whatever the input dtype (fp32, bf16, fp16), with
an online log-sum-exp over `BLOCK`-wide steps, so any row length works (V = 28996, C = 1601,
D = 2048). Losses are fp32; gradients come back in their input's dtype.

Layers, as every op here: the `@triton.jit` kernels (`_ce_fwd_kernel`, `_ce_bwd_kernel`,
`_kl_fwd_kernel`, `_kl_bwd_kernel`, `_sq_err_fwd_kernel`, `_sq_err_bwd_kernel`), the host
launchers (`mlm_forward`, `mrfr_forward` / `mrfr_backward`, `mrc_forward` / `mrc_backward`,
`mrckl_forward` / `mrckl_backward`: allocate, launch, no host sync), the autograd Functions
(`FusedLinearCrossEntropy`, `LinearSquaredError`, `HardLabelCrossEntropy`, `SoftLabelKLDiv`)
and the functional wrappers (`mlm_loss`, `mrfr_loss`, `mrc_loss`, `mrckl_loss`: validate shapes,
dtypes and devices, pick the matmul dtype under autocast), which the dispatchers of
`uniter_fast.ops.losses` call. Import this module only as
`uniter_fast.kernels.masked_losses`; it needs triton (on the CPU, Triton's interpreter with
`TRITON_INTERPRET=1` set before triton is imported).
"""

from __future__ import annotations

import contextlib
import functools
import logging

import torch
import triton
import triton.language as tl

_log = logging.getLogger(__name__)

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
LABEL_DTYPES = (torch.int32, torch.int64)
MLM_IGNORE_INDEX = -100  # F.cross_entropy's default, which the MLM reference relies on
MRC_IGNORE_INDEX = 0  # background: the reference passes ignore_index=0
# fp16 MLM gradients are written as (softmax - onehot) * this, the 1 / count folded in later in
# fp32: (softmax - onehot) / count falls below fp16's normal range over most of a 28996-way
# softmax's tail (p ~ 1e-5, count ~ 1e3), where the eager path under fp16 loss scaling multiplies
# by the loss scale before rounding. A power of two: exact, and |1024 * (p - onehot)| <= 1024.
FP16_GRAD_PRESCALE = 1024.0
# Widest column step of one program: 16 values per thread at 16 warps. 16384 (two steps of a
# 28996-wide vocabulary row) spilled a few bytes in fp32 under triton 3.6's ptxas at 16 warps
# (benchmarks/aot_compile.py); 8192 compiles clean in every dtype under 3.6 and 3.9.
MAX_BLOCK = 8192
# Fewest rows of an MLM chunk (`mlm_chunk_rows` makes chunks of H rows, at UNITER's H of 768
# and 1024 well above it): below a few hundred rows a chunk's (rows x H) @ (H x V) matmul is too
# small to hide its ~5 launches, and every chunk re-reads and re-writes the fp32 weight
# gradient it accumulates into.
MLM_MIN_CHUNK_ROWS = 256
# MLM chunk starts are rounded to this many rows, and logits rows padded to this many columns.
MLM_ROW_ALIGN = 64
MLM_CHUNK_ALIGN = 16


def _empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer a kernel or matmul must fill completely is allocated here (the tests poison
    them through this one function, so an element left unwritten shows as NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _row_config(n_cols: int, block: int | None) -> tuple[int, int]:
    """(BLOCK, num_warps) for one program per row of `n_cols` values; `block` forces BLOCK."""
    if block is None:
        block = min(triton.next_power_of_2(max(n_cols, 1)), MAX_BLOCK)
    elif block < 16 or block & (block - 1):
        raise ValueError(f"block must be a power of two >= 16, got {block}")
    num_warps = 4 if block <= 2048 else 8 if block < 8192 else 16
    return block, num_warps


def _rne_by_hand(out: torch.Tensor) -> bool:
    """RNE_BF16 for a kernel writing `out`: CPU tensors run only in the interpreter (see
    `_rounded_for`)."""
    return out.dtype == torch.bfloat16 and out.device.type == "cpu"


# --- kernels ------------------------------------------------------------------------------------


@triton.jit
def _row_logsumexp(row_ptr, label, n_cols, n_cols_mem, BLOCK: tl.constexpr):
    """(log(sum(exp(row))), row[label]) of one row of `n_cols` values, online over BLOCK-wide
    steps, in fp32; row[label] is 0 where `label` is outside [0, n_cols).

    The row is read as `n_cols_mem` columns (its allocated width, >= n_cols; padded to a
    multiple of 64 by `mlm_forward`, so the loads are provably aligned and vectorise) and the
    columns past n_cols are masked out by value. The label's logit is taken in this same pass,
    so a kernel that then overwrites the row in place never reads it back (warps of one program
    are not ordered: a later read could see another warp's write).
    """
    m = float("-inf")
    s = 0.0
    target = 0.0
    for start in range(0, n_cols_mem, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(row_ptr + cols, mask=cols < n_cols_mem, other=float("-inf")).to(tl.float32)
        x = tl.where(cols < n_cols, x, float("-inf"))
        target += tl.sum(tl.where(cols == label, x, 0.0), axis=0)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        # Rescale the running sum to the new maximum, so no exp ever overflows.
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    return m + tl.log(s), target


@triton.jit
def _rounded_for(x, out_ptr, RNE_BF16: tl.constexpr):
    """fp32 `x` in the element dtype of `out_ptr`, rounded to nearest even.

    RNE_BF16 is set only for bf16 outputs in Triton's interpreter, whose fp32 -> bf16 cast
    truncates (triton 3.8, `runtime/interpreter.py`), where the GPU's rounds to nearest even: the
    bits are rounded by hand, so the interpreted kernels round as the compiled ones do.
    """
    if RNE_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(out_ptr.dtype.element_ty)


@triton.jit
def _ce_fwd_kernel(
    logits_ptr,
    labels_ptr,
    loss_ptr,
    lse_ptr,
    grad_ptr,
    grad_scale_ptr,
    logits_stride_row,
    grad_stride_row,
    n_cols,
    n_cols_mem,
    IGNORE_INDEX: tl.constexpr,
    STORE_LSE: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    RNE_BF16: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One row: loss = logsumexp(x) - x[label] (0 where label == IGNORE_INDEX).

    With WRITE_GRAD, also (softmax(x) - onehot(label)) * grad_scale into the grad row, which may
    be the logits row itself (each step reads its columns before writing them, in the same
    threads). Rows are `n_cols_mem` wide in memory (see `_row_logsumexp`); the gradient's
    columns past n_cols get zeros.
    """
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * logits_stride_row
    label = tl.load(labels_ptr + row).to(tl.int64)
    counted = label != IGNORE_INDEX
    # A label outside [0, n_cols) breaks the caller's contract (checked on CPU tensors only, as
    # checking on the GPU would sync); its target logit is then 0, and nothing is read past
    # the row.
    lse, target = _row_logsumexp(row_ptr, label, n_cols, n_cols_mem, BLOCK)
    tl.store(loss_ptr + row, tl.where(counted, lse - target, 0.0))
    if STORE_LSE:
        tl.store(lse_ptr + row, lse)
    if WRITE_GRAD:
        scale = tl.where(counted, tl.load(grad_scale_ptr).to(tl.float32), 0.0)
        out_ptr = grad_ptr + row * grad_stride_row
        for start in range(0, n_cols_mem, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            ok = cols < n_cols_mem
            x = tl.load(row_ptr + cols, mask=ok, other=0.0).to(tl.float32)
            # Columns past n_cols hold whatever the buffer held: -inf makes their gradient 0
            # without ever computing on it (exp of stale bits could overflow).
            x = tl.where(cols < n_cols, x, float("-inf"))
            g = (tl.exp(x - lse) - tl.where(cols == label, 1.0, 0.0)) * scale
            tl.store(out_ptr + cols, _rounded_for(g, out_ptr, RNE_BF16), mask=ok)


@triton.jit
def _ce_bwd_kernel(
    logits_ptr,
    labels_ptr,
    lse_ptr,
    grad_out_ptr,
    grad_ptr,
    logits_stride_row,
    grad_stride_row,
    n_cols,
    inv_rows,
    IGNORE_INDEX: tl.constexpr,
    RNE_BF16: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One row of d mean(loss) / d logits = (softmax(x) - onehot(label)) * g / rows."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * logits_stride_row
    out_ptr = grad_ptr + row * grad_stride_row
    label = tl.load(labels_ptr + row).to(tl.int64)
    lse = tl.load(lse_ptr + row)
    # The upstream gradient is read here, on the device: the host never learns its value.
    scale = tl.load(grad_out_ptr).to(tl.float32) * inv_rows
    scale = tl.where(label != IGNORE_INDEX, scale, 0.0)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        ok = cols < n_cols
        x = tl.load(row_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        g = (tl.exp(x - lse) - tl.where(cols == label, 1.0, 0.0)) * scale
        tl.store(out_ptr + cols, _rounded_for(g, out_ptr, RNE_BF16), mask=ok)


@triton.jit
def _kl_fwd_kernel(
    logits_ptr,
    target_ptr,
    loss_ptr,
    lse_ptr,
    target_sum_ptr,
    logits_stride_row,
    target_stride_row,
    n_cols,
    BLOCK: tl.constexpr,
):
    """One row: sum_j xlogy(t_j, t_j) - t_j * (x_j - logsumexp(x)); saves lse and sum_j t_j."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * logits_stride_row
    t_ptr = target_ptr + row * target_stride_row
    lse, _ = _row_logsumexp(row_ptr, -1, n_cols, n_cols, BLOCK)
    acc = 0.0
    t_sum = 0.0
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        ok = cols < n_cols
        x = tl.load(row_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        t = tl.load(t_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        # xlogy(t, t): 0 where t == 0 (log of 1 there, never log 0 times 0).
        t_log_t = t * tl.log(tl.where(t > 0.0, t, 1.0))
        acc += tl.sum(t_log_t - t * (x - lse), axis=0)
        t_sum += tl.sum(t, axis=0)
    tl.store(loss_ptr + row, acc)
    tl.store(lse_ptr + row, lse)
    tl.store(target_sum_ptr + row, t_sum)


@triton.jit
def _kl_bwd_kernel(
    logits_ptr,
    target_ptr,
    lse_ptr,
    target_sum_ptr,
    grad_out_ptr,
    grad_ptr,
    logits_stride_row,
    target_stride_row,
    grad_stride_row,
    n_cols,
    inv_numel,
    RNE_BF16: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One row of d mean(kl) / d logits = (softmax(x) * sum(t) - t) * g / numel."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * logits_stride_row
    t_ptr = target_ptr + row * target_stride_row
    out_ptr = grad_ptr + row * grad_stride_row
    lse = tl.load(lse_ptr + row)
    # Soft labels need not sum to 1 (fp16 storage rounds them), so the row's own sum is used.
    t_sum = tl.load(target_sum_ptr + row)
    scale = tl.load(grad_out_ptr).to(tl.float32) * inv_numel
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        ok = cols < n_cols
        x = tl.load(row_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        t = tl.load(t_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        g = (tl.exp(x - lse) * t_sum - t) * scale
        tl.store(out_ptr + cols, _rounded_for(g, out_ptr, RNE_BF16), mask=ok)


@triton.jit
def _sq_err_fwd_kernel(
    pred_ptr,
    bias_ptr,
    target_ptr,
    loss_ptr,
    pred_stride_row,
    target_stride_row,
    n_cols,
    BLOCK: tl.constexpr,
):
    """One row: sum_j (pred_j + bias_j - target_j)^2, in fp32."""
    row = tl.program_id(0).to(tl.int64)
    p_ptr = pred_ptr + row * pred_stride_row
    t_ptr = target_ptr + row * target_stride_row
    acc = 0.0
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        ok = cols < n_cols
        p = tl.load(p_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        b = tl.load(bias_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        t = tl.load(t_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        d = p + b - t
        acc += tl.sum(d * d, axis=0)
    tl.store(loss_ptr + row, acc)


@triton.jit
def _sq_err_bwd_kernel(
    pred_ptr,
    bias_ptr,
    target_ptr,
    grad_out_ptr,
    grad_ptr,
    pred_stride_row,
    target_stride_row,
    grad_stride_row,
    n_cols,
    two_over_numel,
    RNE_BF16: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One row of d mean((pred + b - t)^2) / d pred = 2 (pred + b - t) * g / numel; the grad row
    may be the pred row itself."""
    row = tl.program_id(0).to(tl.int64)
    p_ptr = pred_ptr + row * pred_stride_row
    t_ptr = target_ptr + row * target_stride_row
    out_ptr = grad_ptr + row * grad_stride_row
    scale = tl.load(grad_out_ptr).to(tl.float32) * two_over_numel
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        ok = cols < n_cols
        p = tl.load(p_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        b = tl.load(bias_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        t = tl.load(t_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        g = (p + b - t) * scale
        tl.store(out_ptr + cols, _rounded_for(g, out_ptr, RNE_BF16), mask=ok)


# --- host helpers -------------------------------------------------------------------------------


def _row_major(t: torch.Tensor) -> torch.Tensor:
    """The kernels step along rows with a stride and along columns by 1."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in KERNEL_DTYPES:
        raise TypeError(
            f"{name}: the Triton path takes float32, bfloat16 or float16, got {t.dtype} "
            f"(use backend='reference' for float64)"
        )


def _check_labels(name: str, labels: torch.Tensor, rows: int, n_cols: int, ignore: int) -> None:
    if labels.dtype not in LABEL_DTYPES:
        raise TypeError(f"{name}: expected int32 or int64 labels, got {labels.dtype}")
    if labels.shape != (rows,):
        raise ValueError(f"{name}: expected shape ({rows},), got {tuple(labels.shape)}")
    # Range is checked on CPU tensors only: on the GPU it would read a device value on the host.
    if labels.device.type == "cpu" and rows:
        bad = (labels != ignore) & ((labels < 0) | (labels >= n_cols))
        if bool(bad.any()):
            raise ValueError(
                f"{name}: labels must lie in [0, {n_cols}) or equal the ignore index {ignore}; "
                f"got {labels[bad][:5].tolist()}"
            )


def _check_same_device(**tensors: torch.Tensor) -> torch.device:
    devices = {name: t.device for name, t in tensors.items()}
    first = next(iter(devices.values()))
    if any(d != first for d in devices.values()):
        raise ValueError(f"all inputs must be on one device, got {devices}")
    return first


def _check_no_target_grad(name: str, t: torch.Tensor) -> None:
    if t.requires_grad:
        raise ValueError(f"{name} requires grad: the Triton path treats targets as data")


def matmul_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype the fused ops' matmuls run in: autocast's when it is on (its fp32 inputs are cast,
    as `F.linear` would be), else the inputs' common dtype."""
    device_type = tensors[0].device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) > 1:
        raise TypeError(
            f"inputs of one matmul must share a dtype outside autocast, got "
            f"{[t.dtype for t in tensors]}"
        )
    return tensors[0].dtype


@functools.cache
def _addmm_widens(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `torch.addmm(..., out_dtype=float32, out=...)` runs on `device` for `dtype`
    operands (CUDA, torch 2.8+): bf16/fp16 products accumulated straight into an fp32 buffer,
    with no widened operand copies.

    A capability probe, run once per device and dtype: the op either exists for this backend and
    dtype or raises at dispatch, before anything is launched. The path taken is logged once
    (a warning for the fallback, which costs a widened copy of each operand).
    """
    if device.type != "cuda":
        return False
    a = torch.zeros(16, 16, dtype=dtype, device=device)
    c = torch.zeros(16, 16, dtype=torch.float32, device=device)
    try:
        torch.addmm(c, a, a, beta=0, out_dtype=torch.float32, out=c)
    except (RuntimeError, TypeError, NotImplementedError) as exc:
        _log.warning(
            "MLM head: torch %s refuses addmm(out_dtype=float32) for %s on %s (%s); the fp32 "
            "weight gradient is accumulated from widened copies in TF32 products, exact for %s "
            "operands",
            torch.__version__,
            dtype,
            device,
            str(exc).splitlines()[0][:120],
            dtype,
        )
        return False
    _log.info("MLM head: %s products accumulate into fp32 with addmm(out_dtype)", dtype)
    return True


def mlm_weight_grad_path(device: torch.device | str, dtype: torch.dtype) -> str:
    """How the fused MLM head accumulates a wider weight gradient from `dtype` products on
    `device`, in a few words (for the start-up log)."""
    device = torch.device(device)
    if dtype == torch.float32:
        return "fp32 GEMMs"
    if _addmm_widens(device, dtype):
        return f"{_short(dtype)} GEMMs into fp32 (addmm out_dtype)"
    if device.type == "cuda":
        return f"widened {_short(dtype)} operands, TF32 GEMMs (torch lacks addmm out_dtype)"
    return f"widened {_short(dtype)} operands, fp32 GEMMs ({device.type})"


def _short(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


@contextlib.contextmanager
def _tf32_products():
    """fp32 GEMMs on tensor cores (TF32) within, for operands that are widened bf16 or fp16:
    their values have at most 11 significant bits, which TF32's 11 hold exactly, so the
    products and the fp32 sums are those of the bf16/fp16 GEMM."""
    matmul = torch.backends.cuda.matmul
    # torch 2.9+ names the setting fp32_precision; older versions allow_tf32.
    if hasattr(matmul, "fp32_precision"):
        name, value = "fp32_precision", "tf32"
    else:
        name, value = "allow_tf32", True
    before = getattr(matmul, name)
    setattr(matmul, name, value)
    try:
        yield
    finally:
        setattr(matmul, name, before)


def _matmul_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, accumulate: bool):
    """out = a @ b, or out += a @ b, with fp32 accumulation and one rounding into out's dtype
    (which may be wider than a's and b's). Without `accumulate`, out's contents are never read."""
    if out.dtype == a.dtype:
        if accumulate:
            out.addmm_(a, b)
        else:
            torch.mm(a, b, out=out)
    elif out.dtype == torch.float32 and _addmm_widens(out.device, a.dtype):
        torch.addmm(out, a, b, beta=1 if accumulate else 0, out_dtype=out.dtype, out=out)
    else:
        # CPU and older torch: widened operands. bf16/fp16 products are exact in fp32, so this is
        # the same sum as the GPU path's, at the cost of a widened copy of each operand; on CUDA
        # the fp32 GEMM runs in TF32, which is exact for such operands (`_tf32_products`), so
        # the fallback keeps the tensor cores.
        a, b = a.to(out.dtype), b.to(out.dtype)
        cores = _tf32_products() if out.device.type == "cuda" else contextlib.nullcontext()
        with cores:
            if accumulate:
                out.addmm_(a, b)
            else:
                torch.mm(a, b, out=out)


# --- MLM: chunked linear + cross-entropy --------------------------------------------------------


def mlm_chunk_rows(rows: int, hidden: int) -> int:
    """Rows of logits made at once: at most H (at least MLM_MIN_CHUNK_ROWS), so that a chunk's
    logits are never larger than W itself and the fused path's peak memory stays at or below the
    eager path's at every row count; as few chunks as that allows, of equal size (rounded up to
    MLM_CHUNK_ALIGN rows), so that no chunk pays a whole weight-gradient pass for a few rows.

    In training's setting (fp32 W, bf16 matmuls under autocast; bytes, for M rows in chunks of
    c rows, V x H the decoder): eager peaks at max(6VH, 2VH + 12MV): its bf16 weight gradient
    beside the fp32 cast of it, or its saved fp32 log-softmax and two fp32 logits gradients
    beside the bf16 copy of W. The fused path peaks at 4VH + 2MV with one chunk (M <= c: the
    bf16 copy of W is released before the fp32 weight gradient is made), no more than eager's
    6VH while M <= H; and at 6VH + 2cV = 8VH with several (the copy of W, the fp32 gradient and
    a chunk alive through the loop), less than eager's 2VH + 12MV > 14VH once M > H.

    Speed pulls the other way: each chunk re-reads and re-writes the fp32 weight gradient
    (8 bytes per element of W) and launches ~5 kernels, so chunks are as large as the memory
    bound allows (Liger's rule, chunk logits no larger than x, would give 64-row chunks here).
    """
    cap = max(hidden, MLM_MIN_CHUNK_ROWS)
    if rows <= cap:
        return max(1, rows)
    # As few chunks as the cap allows, of (nearly) equal size: 770 rows at H = 768 make 400 + 370,
    # not 768 + 2 (a full V x H weight-gradient pass for two rows). Rounded up to whole
    # MLM_CHUNK_ALIGN-row steps, which never adds a chunk.
    chunks = -(-rows // cap)
    even = -(-rows // chunks)
    return min(cap, -(-even // MLM_CHUNK_ALIGN) * MLM_CHUNK_ALIGN)


def mlm_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    labels: torch.Tensor,
    *,
    compute_dtype: torch.dtype,
    need_grads: tuple[bool, bool, bool] = (False, False, False),
    chunk_rows: int | None = None,
    block: int | None = None,
):
    """Loss and, where asked, the gradients of mean cross-entropy of `x @ weight^T + bias`.

    x: (M, H); weight: (V, H); bias: (V,); labels: (M,) in [0, V) or -100 (not counted).
    compute_dtype: the matmuls' dtype (see `matmul_dtype`). need_grads: which of
    (x, weight, bias) to differentiate, for an upstream gradient of 1. chunk_rows: logits rows
    per chunk (default `mlm_chunk_rows`); block: columns per kernel step (default from V).

    Returns (loss () fp32, grad_x (M, H) in compute_dtype (fp32 for fp16) or None, grad_weight
    (V, H) in weight's dtype or None, grad_bias (V,) in bias's dtype or None). The mean divides
    by the number of counted labels, a device tensor: 0 counted labels give NaN, as the
    reference.
    """
    rows, hidden = x.shape
    vocab = weight.shape[0]
    device = x.device
    need_gx, need_gw, need_gb = need_grads
    if chunk_rows is None:
        chunk_rows = mlm_chunk_rows(rows, hidden)
    elif chunk_rows < 1:
        raise ValueError(f"chunk_rows must be positive, got {chunk_rows}")
    chunk_rows = max(1, min(chunk_rows, rows))
    block, num_warps = _row_config(vocab, block)
    x_c = _row_major(x.to(compute_dtype))
    w_c = _row_major(weight.to(compute_dtype))
    b_c = bias.to(compute_dtype)
    labels = labels.contiguous()

    counted = (labels != MLM_IGNORE_INDEX).sum().to(torch.float32)
    # 1 / count as a device scalar: the kernel scales gradients by it without a host read.
    inv_count = torch.reciprocal(counted).reshape(1)
    # fp16: the kernel writes prescaled gradients, unscaled in fp32 after the loop.
    prescaled = compute_dtype == torch.float16
    grad_scale = (
        torch.full((1,), FP16_GRAD_PRESCALE, dtype=torch.float32, device=device)
        if prescaled
        else inv_count
    )
    loss_rows = _empty((rows,), torch.float32, device)
    write_grad = need_gx or need_gw or need_gb
    # x's gradient in the matmul dtype (one rounding, as the reference); fp32 when prescaled, so
    # that unscaling it does not round twice.
    gx_dtype = torch.float32 if prescaled else compute_dtype
    grad_x = _empty((rows, hidden), gx_dtype, device) if need_gx else None
    num_chunks = triton.cdiv(rows, chunk_rows)
    # The weight's gradient is made in fp32 (the first chunk writes it, later chunks add to it),
    # and is the returned gradient when W is fp32; a bf16 W with one chunk gets it in its own
    # dtype (one matmul, one rounding, as the reference). Allocated at first use, after the
    # matmul copy of W is released on the last chunk (see mlm_chunk_rows).
    wide_w = need_gw and (weight.dtype == torch.float32 or num_chunks > 1 or prescaled)
    grad_w = None
    if need_gw and num_chunks == 0:
        grad_w = torch.zeros((vocab, hidden), dtype=weight.dtype, device=device)
    grad_b_acc = torch.zeros((vocab,), dtype=torch.float32, device=device) if need_gb else None

    # Rows padded to a multiple of 64 columns (28996 -> 29056): every row then starts 16-byte
    # aligned, so the kernel's loads and stores vectorise (2-byte accesses otherwise) and the
    # GEMMs get an aligned leading dimension. The padding is never part of `logits`.
    vocab_mem = triton.cdiv(vocab, MLM_ROW_ALIGN) * MLM_ROW_ALIGN
    logits_buf = _empty((chunk_rows, vocab_mem), compute_dtype, device)
    logits = None
    for start in range(0, rows, chunk_rows):
        stop = min(start + chunk_rows, rows)
        n = stop - start
        logits = logits_buf[:n, :vocab]
        x_chunk = x_c[start:stop]
        # b + x W^T in one GEMM (the bias in its epilogue), as F.linear rounds it.
        torch.addmm(b_c, x_chunk, w_c.t(), out=logits)
        _ce_fwd_kernel[(n,)](
            logits,
            labels[start:stop],
            loss_rows[start:stop],
            loss_rows,  # no lse kept (STORE_LSE off)
            logits,  # gradient written over the logits, in place
            grad_scale,
            logits.stride(0),
            logits.stride(0),
            vocab,
            vocab_mem,
            IGNORE_INDEX=MLM_IGNORE_INDEX,
            STORE_LSE=False,
            WRITE_GRAD=write_grad,
            RNE_BF16=_rne_by_hand(logits),
            BLOCK=block,
            num_warps=num_warps,
        )
        if need_gx:
            _matmul_into(grad_x[start:stop], logits, w_c, accumulate=False)
        if stop == rows:
            # The last use of the matmul copy of W: releasing it before the (V, H) weight
            # gradient is allocated keeps one-chunk peaks at 4VH + 2MV (see mlm_chunk_rows).
            del w_c
        if need_gw:
            first = grad_w is None
            if first:
                dtype = torch.float32 if wide_w else weight.dtype
                grad_w = _empty((vocab, hidden), dtype, device)
            _matmul_into(grad_w, logits.t(), x_chunk, accumulate=not first)
        if need_gb:
            grad_b_acc += logits.sum(0, dtype=torch.float32)
    del logits_buf, logits  # before the cast below allocates
    if prescaled:
        unscale = inv_count / FP16_GRAD_PRESCALE
        for grad in (grad_x, grad_w, grad_b_acc):
            if grad is not None:
                grad.mul_(unscale)
    if grad_w is not None and grad_w.dtype != weight.dtype:
        grad_w = grad_w.to(weight.dtype)
    grad_b = None if grad_b_acc is None else grad_b_acc.to(bias.dtype)
    loss = loss_rows.sum() / counted
    return loss, grad_x, grad_w, grad_b


class FusedLinearCrossEntropy(torch.autograd.Function):
    """The MLM loss: cross-entropy of `x @ weight^T + bias` without the full (M, V) logits.

    Gradients for an upstream gradient of 1 are made in the forward (only those of inputs that
    need one, and none when grad mode is off); the backward multiplies them by the upstream
    gradient in place, so the graph can be backpropagated once (a second pass raises: the saved
    gradients have been modified).
    """

    @staticmethod
    def forward(
        ctx, x, weight, bias, labels, compute_dtype, want_grads, chunk_rows, block
    ) -> torch.Tensor:
        needs = ctx.needs_input_grad
        need = tuple(want_grads and bool(n) for n in needs[:3])
        with torch.autocast(x.device.type, enabled=False):
            loss, grad_x, grad_w, grad_b = mlm_forward(
                x,
                weight,
                bias,
                labels,
                compute_dtype=compute_dtype,
                need_grads=need,
                chunk_rows=chunk_rows,
                block=block,
            )
        ctx.x_dtype = x.dtype
        ctx.save_for_backward(grad_x, grad_w, grad_b)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        grad_x, grad_w, grad_b = ctx.saved_tensors
        # Multiplied on the device even when the upstream gradient is 1: testing for 1 would
        # read it on the host. In place, on buffers this node owns.
        if grad_x is not None:
            grad_x = grad_x.to(ctx.x_dtype)
            grad_x.mul_(grad_output)
        if grad_w is not None:
            grad_w.mul_(grad_output)
        if grad_b is not None:
            grad_b.mul_(grad_output)
        return grad_x, grad_w, grad_b, None, None, None, None, None


def mlm_loss(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    labels: torch.Tensor,
    *,
    chunk_rows: int | None = None,
    block: int | None = None,
) -> torch.Tensor:
    """Cross-entropy of the tied MLM decoder, mean over the masked tokens (fused, chunked).

    x: (M, H) transformed hidden states; weight: (V, H) word embeddings; bias: (V,); labels: (M,)
    int64 original ids. Returns a scalar fp32 loss. chunk_rows: logits rows per chunk (default
    `mlm_chunk_rows(M, H)`); block: columns per kernel step (default from V; tests force
    small ones to run the column loop).
    """
    if x.dim() != 2 or weight.dim() != 2 or weight.shape[1] != x.shape[1]:
        raise ValueError(
            f"mlm_loss: expected x (M, H) and weight (V, H), got {tuple(x.shape)} and "
            f"{tuple(weight.shape)}"
        )
    if bias.shape != (weight.shape[0],):
        raise ValueError(f"mlm_loss: expected bias ({weight.shape[0]},), got {tuple(bias.shape)}")
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        _check_float(f"mlm_loss: {name}", t)
    _check_same_device(x=x, weight=weight, bias=bias, labels=labels)
    _check_labels("mlm_loss: labels", labels, x.shape[0], weight.shape[0], MLM_IGNORE_INDEX)
    compute_dtype = matmul_dtype(x, weight, bias)
    want_grads = torch.is_grad_enabled()
    return FusedLinearCrossEntropy.apply(
        x, weight, bias, labels, compute_dtype, want_grads, chunk_rows, block
    )


# --- MRFR: linear + squared error ---------------------------------------------------------------


def mrfr_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    target: torch.Tensor,
    *,
    compute_dtype: torch.dtype,
    block: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """mean((x @ weight + bias - target)^2) over R x D.

    x: (R, H); weight: (H, D); bias: (D,); target: (R, D). Returns (loss () fp32, pred (R, D)
    = x @ weight in compute_dtype, bias not added: the backward kernel reads it).
    """
    rows, dim = target.shape
    device = x.device
    pred = _empty((rows, dim), compute_dtype, device)
    torch.mm(x.to(compute_dtype), weight.to(compute_dtype), out=pred)
    loss_rows = _empty((rows,), torch.float32, device)
    if rows:
        block, num_warps = _row_config(dim, block)
        _sq_err_fwd_kernel[(rows,)](
            pred,
            bias,
            target,
            loss_rows,
            pred.stride(0),
            target.stride(0),
            dim,
            BLOCK=block,
            num_warps=num_warps,
        )
    return loss_rows.sum() / (rows * dim), pred


def mrfr_backward(
    grad_output: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    target: torch.Tensor,
    pred: torch.Tensor,
    *,
    compute_dtype: torch.dtype,
    need_grads: tuple[bool, bool, bool],
    block: int | None = None,
):
    """Gradients of `mrfr_forward`'s loss times grad_output () for (x, weight, bias).

    pred (R, D) is overwritten with the prediction's gradient. Returns (grad_x (R, H) in x's
    dtype, grad_weight (H, D) in weight's dtype, grad_bias (D,) in bias's dtype), None where
    not asked.
    """
    rows, dim = pred.shape
    need_gx, need_gw, need_gb = need_grads
    if rows:
        block, num_warps = _row_config(dim, block)
        _sq_err_bwd_kernel[(rows,)](
            pred,
            bias,
            target,
            grad_output,
            pred,
            pred.stride(0),
            target.stride(0),
            pred.stride(0),
            dim,
            2.0 / (rows * dim),
            RNE_BF16=_rne_by_hand(pred),
            BLOCK=block,
            num_warps=num_warps,
        )
    grad_pred = pred
    grad_x = grad_w = grad_b = None
    if need_gx:
        grad_x = (grad_pred @ weight.to(compute_dtype).t()).to(x.dtype)
    if need_gw:
        x_c = x.to(compute_dtype)
        if weight.dtype == compute_dtype:
            grad_w = x_c.t() @ grad_pred
        else:
            grad_w = _empty(weight.shape, weight.dtype, weight.device)
            _matmul_into(grad_w, x_c.t(), grad_pred, accumulate=False)
    if need_gb:
        grad_b = grad_pred.sum(0, dtype=torch.float32).to(bias.dtype)
    return grad_x, grad_w, grad_b


class LinearSquaredError(torch.autograd.Function):
    """The MRFR loss: mean squared error of `x @ weight + bias` against `target`.

    Saves x, weight, bias, target and the bias-free prediction (R, D) in the matmul dtype (the
    reference keeps an fp32 prediction and an fp32 copy of the target); the backward writes the
    prediction's gradient over it.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, target, compute_dtype, block) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            loss, pred = mrfr_forward(
                x, weight, bias, target, compute_dtype=compute_dtype, block=block
            )
        ctx.compute_dtype = compute_dtype
        ctx.block = block
        ctx.save_for_backward(x, weight, bias, target, pred)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        x, weight, bias, target, pred = ctx.saved_tensors
        # The kernel overwrites pred through a raw pointer; bumping its version makes a second
        # backward over this graph raise instead of reading a gradient as a prediction.
        torch.autograd.graph.increment_version(pred)
        with torch.autocast(x.device.type, enabled=False):
            grads = mrfr_backward(
                grad_output.to(torch.float32).contiguous(),
                x,
                weight,
                bias,
                target,
                pred,
                compute_dtype=ctx.compute_dtype,
                need_grads=tuple(ctx.needs_input_grad[:3]),
                block=ctx.block,
            )
        return (*grads, None, None, None)


def mrfr_loss(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    target: torch.Tensor,
    *,
    block: int | None = None,
) -> torch.Tensor:
    """Squared error of the tied feature regression, mean over all elements (R x D) (fused).

    x: (R, H) transformed hidden states; weight: (H, D), `img_linear.weight` (the regression
    uses its transpose); bias: (D,); target: (R, D) original features (fp16, bf16 or fp32; no
    gradient flows to it). Returns a scalar fp32 loss.
    """
    if x.dim() != 2 or weight.dim() != 2 or weight.shape[0] != x.shape[1]:
        raise ValueError(
            f"mrfr_loss: expected x (R, H) and weight (H, D), got {tuple(x.shape)} and "
            f"{tuple(weight.shape)}"
        )
    dim = weight.shape[1]
    if bias.shape != (dim,) or target.shape != (x.shape[0], dim):
        raise ValueError(
            f"mrfr_loss: expected bias ({dim},) and target ({x.shape[0]}, {dim}), got "
            f"{tuple(bias.shape)} and {tuple(target.shape)}"
        )
    for name, t in (("x", x), ("weight", weight), ("bias", bias), ("target", target)):
        _check_float(f"mrfr_loss: {name}", t)
    _check_same_device(x=x, weight=weight, bias=bias, target=target)
    _check_no_target_grad("mrfr_loss: target", target)
    compute_dtype = matmul_dtype(x, weight, bias)
    return LinearSquaredError.apply(
        x, weight, _row_major(bias), _row_major(target), compute_dtype, block
    )


# --- MRC: hard-label cross-entropy --------------------------------------------------------------


def mrc_forward(
    logits: torch.Tensor, label: torch.Tensor, *, block: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over rows of cross_entropy(logits, label, ignore_index=0), ignored rows counted.

    logits: (R, C); label: (R,). Returns (loss () fp32, lse (R,) fp32 for the backward).
    """
    rows, n_cols = logits.shape
    device = logits.device
    loss_rows = _empty((rows,), torch.float32, device)
    lse = _empty((rows,), torch.float32, device)
    if rows:
        block, num_warps = _row_config(n_cols, block)
        _ce_fwd_kernel[(rows,)](
            logits,
            label,
            loss_rows,
            lse,
            logits,  # unused: WRITE_GRAD is off
            lse,  # unused
            logits.stride(0),
            logits.stride(0),
            n_cols,
            n_cols,
            IGNORE_INDEX=MRC_IGNORE_INDEX,
            STORE_LSE=True,
            WRITE_GRAD=False,
            RNE_BF16=False,
            BLOCK=block,
            num_warps=num_warps,
        )
    return loss_rows.sum() / rows, lse


def mrc_backward(
    grad_output: torch.Tensor,
    logits: torch.Tensor,
    label: torch.Tensor,
    lse: torch.Tensor,
    *,
    block: int | None = None,
) -> torch.Tensor:
    """d loss / d logits (R, C) in logits' dtype, for grad_output () fp32."""
    rows, n_cols = logits.shape
    grad = _empty(logits.shape, logits.dtype, logits.device)
    if rows:
        block, num_warps = _row_config(n_cols, block)
        _ce_bwd_kernel[(rows,)](
            logits,
            label,
            lse,
            grad_output,
            grad,
            logits.stride(0),
            grad.stride(0),
            n_cols,
            1.0 / rows,
            IGNORE_INDEX=MRC_IGNORE_INDEX,
            RNE_BF16=_rne_by_hand(grad),
            BLOCK=block,
            num_warps=num_warps,
        )
    return grad


class HardLabelCrossEntropy(torch.autograd.Function):
    """The MRC loss; saves the logits (already alive) and one fp32 log-sum-exp per row."""

    @staticmethod
    def forward(ctx, logits, label, block) -> torch.Tensor:
        loss, lse = mrc_forward(logits, label, block=block)
        ctx.block = block
        ctx.save_for_backward(logits, label, lse)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        logits, label, lse = ctx.saved_tensors
        grad = mrc_backward(
            grad_output.to(torch.float32).contiguous(), logits, label, lse, block=ctx.block
        )
        return grad, None, None


def mrc_loss(
    logits: torch.Tensor, label: torch.Tensor, *, block: int | None = None
) -> torch.Tensor:
    """Cross-entropy on the hard region label, ignore index 0, mean over the masked regions
    (ignored rows counted in the denominator, as the reference's `.mean()`) (fused).

    logits: (R, C); label: (R,) int64 in 1..C-1. Returns a scalar fp32 loss.
    """
    if logits.dim() != 2:
        raise ValueError(f"mrc_loss: expected logits (R, C), got {tuple(logits.shape)}")
    _check_float("mrc_loss: logits", logits)
    _check_same_device(logits=logits, label=label)
    _check_labels("mrc_loss: label", label, logits.shape[0], logits.shape[1], MRC_IGNORE_INDEX)
    return HardLabelCrossEntropy.apply(_row_major(logits), label.contiguous(), block)


# --- MRC-kl: log-softmax + KL -------------------------------------------------------------------


def mrckl_forward(
    logits: torch.Tensor, soft_target: torch.Tensor, *, block: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mean over R x C of kl_div(log_softmax(logits), soft_target, reduction='none').

    logits, soft_target: (R, C). Returns (loss () fp32, lse (R,), target row sums (R,)).
    """
    rows, n_cols = logits.shape
    device = logits.device
    loss_rows = _empty((rows,), torch.float32, device)
    lse = _empty((rows,), torch.float32, device)
    target_sum = _empty((rows,), torch.float32, device)
    if rows:
        block, num_warps = _row_config(n_cols, block)
        _kl_fwd_kernel[(rows,)](
            logits,
            soft_target,
            loss_rows,
            lse,
            target_sum,
            logits.stride(0),
            soft_target.stride(0),
            n_cols,
            BLOCK=block,
            num_warps=num_warps,
        )
    return loss_rows.sum() / (rows * n_cols), lse, target_sum


def mrckl_backward(
    grad_output: torch.Tensor,
    logits: torch.Tensor,
    soft_target: torch.Tensor,
    lse: torch.Tensor,
    target_sum: torch.Tensor,
    *,
    block: int | None = None,
) -> torch.Tensor:
    """d loss / d logits (R, C) in logits' dtype, for grad_output () fp32."""
    rows, n_cols = logits.shape
    grad = _empty(logits.shape, logits.dtype, logits.device)
    if rows:
        block, num_warps = _row_config(n_cols, block)
        _kl_bwd_kernel[(rows,)](
            logits,
            soft_target,
            lse,
            target_sum,
            grad_output,
            grad,
            logits.stride(0),
            soft_target.stride(0),
            grad.stride(0),
            n_cols,
            1.0 / (rows * n_cols),
            RNE_BF16=_rne_by_hand(grad),
            BLOCK=block,
            num_warps=num_warps,
        )
    return grad


class SoftLabelKLDiv(torch.autograd.Function):
    """The MRC-kl loss; saves the logits and targets (both alive anyway) and two fp32 per row."""

    @staticmethod
    def forward(ctx, logits, soft_target, block) -> torch.Tensor:
        loss, lse, target_sum = mrckl_forward(logits, soft_target, block=block)
        ctx.block = block
        ctx.save_for_backward(logits, soft_target, lse, target_sum)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        logits, soft_target, lse, target_sum = ctx.saved_tensors
        grad = mrckl_backward(
            grad_output.to(torch.float32).contiguous(),
            logits,
            soft_target,
            lse,
            target_sum,
            block=ctx.block,
        )
        return grad, None, None


def mrckl_loss(
    logits: torch.Tensor, soft_target: torch.Tensor, *, block: int | None = None
) -> torch.Tensor:
    """KL(soft_target || softmax(logits)) element-wise, mean over all elements (R x C) (fused).

    logits: (R, C); soft_target: (R, C) detector distributions (zeros contribute zero; no
    gradient flows to them). Returns a scalar fp32 loss.
    """
    if logits.dim() != 2 or soft_target.shape != logits.shape:
        raise ValueError(
            f"mrckl_loss: expected logits (R, C) and soft_target of the same shape, got "
            f"{tuple(logits.shape)} and {tuple(soft_target.shape)}"
        )
    _check_float("mrckl_loss: logits", logits)
    _check_float("mrckl_loss: soft_target", soft_target)
    _check_same_device(logits=logits, soft_target=soft_target)
    _check_no_target_grad("mrckl_loss: soft_target", soft_target)
    return SoftLabelKLDiv.apply(_row_major(logits), _row_major(soft_target), block)


__all__ = [
    "FusedLinearCrossEntropy",
    "HardLabelCrossEntropy",
    "LinearSquaredError",
    "SoftLabelKLDiv",
    "matmul_dtype",
    "mlm_chunk_rows",
    "mlm_forward",
    "mlm_loss",
    "mlm_weight_grad_path",
    "mrc_backward",
    "mrc_forward",
    "mrc_loss",
    "mrckl_backward",
    "mrckl_forward",
    "mrckl_loss",
    "mrfr_backward",
    "mrfr_forward",
    "mrfr_loss",
]
