"""Fused word-region alignment (WRA): cosine cost plus all IPOT iterations in one Triton program.

One program per (text, image) pair. The forward reads the pair's text rows and region rows once,
either straight from the packed encoder output (`hidden (N, H)` through `cu_seqlens`, `txt_len`,
`img_len`: text rows at `cu_seqlens[b]`, regions right after them) or from padded tensors
(`txt (B, m, H)`, `img (B, n, H)`), forms the cosine cost `C = 1 - cos` in fp32, runs every IPOT
iteration on chip and writes one distance per pair (and, when asked, the plan). The maths is the
reference's, `uniter_fast.ops.ot` (and UNITER_FACTS.md): padded rows and columns are zero in `A`,
`T` and `C`, k = 1 inner step, the plan is a constant for the gradient.

What the backward needs, and why it is saved rather than recomputed. With `G = g * T^T` (`g` the
upstream gradient of the pair's distance), `tn`/`vn` the normalised rows and `d = max(|x|, eps)`:

    grad_t_i = (-(G @ vn)_i + p_i * g * r_i * tn_i) / d_i,   r_i = sum_j T_ji cos_ij
    grad_v_j = (-(G^T @ tn)_j + p_j * g * c_j * vn_j) / d_j,  c_j = sum_i T_ji cos_ij

(`p = 1` where `|x| >= eps`, else 0: below eps the normalisation is a plain division by eps, as
`F.normalize`'s `clamp_min` backward has it). The projection terms `r`, `c` need the cosine matrix,
whose recomputation would read every state once more over the hidden size; the forward already holds
it, so it saves the plan `T (B, n_max, m_max)` fp32, the row norms and `r`, `c` (a few floats per
position): at hidden 1024 the plan, padded to the batch's max lengths, is 5-15 % of the bytes of the
pairs' bf16 states, and recomputing it (50 iterations) would cost more. The backward runs two
programs per pair, one per side (text, regions): each reads the pair's states in one pass over the
hidden size and writes its side's gradient once. The two programs of a pair are adjacent in launch
order, so the second read mostly hits L2: the states come from memory about twice in all (forward,
backward), and the gradients are written once.

Exact maths where it is cheap. Compiled Triton turns `tl.exp`, `tl.sqrt` and `/` into the GPU's
approximate instructions (`ex2.approx`, `sqrt.approx`, `div.full`: a few ulps each). The plan
is a product of about 50 factors of `A` and of the per-iteration reciprocals, so those ulps grow
about 50-fold in it, which put a simulated fp32 plan near 1e-5 relative error, past the
reference's tolerance. Every such operation here runs once per element (`A = exp(-C / beta)`) or
once per row and iteration (the reciprocals), never in the m x n inner loop, so they use the
round-to-nearest forms (`libdevice.exp`, `div_rn`, `sqrt_rn`) at negligible cost; the
interpreter computes them exactly anyway, so its tests keep their tolerance.

Block sizes are powers of two chosen from the max lengths (at least 16, `tl.dot`'s minimum). Three
fp32 tiles of `BLOCK_M x BLOCK_N` (the cost, `A`, the plan) stay in registers for the whole
iteration loop, which bounds the pair size the kernel takes: `BLOCK_M * BLOCK_N <= 8192` and each
block at most 128 (64 text x 128 regions holds UNITER's 62 x 100 maxima; 128 x 64 fits too).
`kernel_fits` says whether a batch fits; the dispatcher in `uniter_fast.ops.ot` sends batches that
do not to the reference.

Layers, as every op here: `_ipot_fwd_kernel` / `_ipot_bwd_kernel` (Triton), the host launchers
`ipot_forward_padded`, `ipot_forward_packed`, `ipot_backward_padded`, `ipot_backward_packed`
(validate, allocate, launch; no host sync), the autograd Functions `IpotDistance` and
`PackedIpotDistance`, and the functional wrappers `wra_distance_triton` and
`wra_distance_packed_triton`. Import this module only as `uniter_fast.kernels.ipot`; it needs
triton (on the CPU, Triton's interpreter with `TRITON_INTERPRET=1` set before triton is imported).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

COSINE_EPS = 1e-5
# Register budget of one program: three fp32 tiles of this many elements live through the loop.
MAX_BLOCK_ELEMENTS = 64 * 128
# Longer sides need more shared memory than an H100 has for the backward's fp32 products
# (16 x 512 blocks: 256 KiB in ptxas's report), whatever their area.
MAX_BLOCK = 128
MIN_BLOCK = 16  # tl.dot needs every dimension >= 16
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Products of fp32 operands: three TF32 tensor-core products (about fp32 accuracy) instead of
# plain TF32 (~1e-3 relative, far past the reference) or "ieee" FMA loops (several times slower
# at these sizes). Triton's interpreter ignores the setting and multiplies in fp32.
_FP32_DOT = "tf32x3"
_INDEX_DTYPES = (torch.int32, torch.int64)


# --- kernels ------------------------------------------------------------------------------------


@triton.jit
def _ipot_fwd_kernel(
    txt_ptr,
    img_ptr,
    cu_seqlens_ptr,
    txt_len_ptr,
    img_len_ptr,
    distance_ptr,
    plan_ptr,
    txt_norm_ptr,
    img_norm_ptr,
    txt_dot_ptr,
    img_dot_ptr,
    txt_stride_b,
    txt_stride_row,
    img_stride_b,
    img_stride_row,
    plan_stride_b,
    plan_stride_n,
    plan_stride_m,
    txt_aux_stride_b,
    img_aux_stride_b,
    hidden_size,
    max_txt_len,
    max_img_len,
    beta,
    eps,
    iterations,
    PACKED: tl.constexpr,
    WRITE_PLAN: tl.constexpr,
    SAVE_AUX: tl.constexpr,
    INTERPRETER: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """One pair: cost, IPOT, distance; the plan and backward statistics when asked.

    Tiles are laid out [text, region] (the cost's orientation); the plan is stored transposed,
    (n, m), as the reference returns it.
    """
    b = tl.program_id(0)
    # Lengths past the max lengths break the caller's contract; clamping keeps every access
    # inside the blocks and the outputs.
    m = tl.minimum(tl.load(txt_len_ptr + b).to(tl.int32), max_txt_len)
    n = tl.minimum(tl.load(img_len_ptr + b).to(tl.int32), max_img_len)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_h = tl.arange(0, BLOCK_H)
    row_ok = offs_m < m
    col_ok = offs_n < n
    if PACKED:
        start = tl.load(cu_seqlens_ptr + b).to(tl.int64)
        txt_base = txt_ptr + start * txt_stride_row
        img_base = img_ptr + (start + m) * img_stride_row
    else:
        txt_base = txt_ptr + b.to(tl.int64) * txt_stride_b
        img_base = img_ptr + b.to(tl.int64) * img_stride_b

    # Raw dot products and squared norms in one pass over the hidden size: cos = dot / (dt dv)
    # equals the reference's normalise-then-multiply up to rounding, and reads each state once.
    dots = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    txt_sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    img_sq = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for h0 in range(0, hidden_size, BLOCK_H):
        hh = h0 + offs_h
        h_ok = hh < hidden_size
        t = tl.load(
            txt_base + offs_m[:, None] * txt_stride_row + hh[None, :],
            mask=row_ok[:, None] & h_ok[None, :],
            other=0.0,
        )
        v = tl.load(
            img_base + offs_n[:, None] * img_stride_row + hh[None, :],
            mask=col_ok[:, None] & h_ok[None, :],
            other=0.0,
        )
        tf = t.to(tl.float32)
        vf = v.to(tl.float32)
        txt_sq += tl.sum(tf * tf, axis=1)
        img_sq += tl.sum(vf * vf, axis=1)
        # bf16/fp16 products are exact in fp32 and accumulate in fp32; fp32 states use
        # DOT_PRECISION (see _FP32_DOT).
        dots = _dot(t, tl.trans(v), dots, INTERPRETER, DOT_PRECISION)
    # Exact (round-to-nearest) square roots, divisions and exp: each runs once per element or
    # once per row and iteration, and the plan is a product of ~50 factors of A and of the
    # reciprocals, so the approximate forms' few ulps would grow about 50-fold (module docstring).
    txt_norm = tl.sqrt_rn(txt_sq)
    img_norm = tl.sqrt_rn(img_sq)
    inv_t = tl.div_rn(1.0, tl.maximum(txt_norm, eps))
    inv_v = tl.div_rn(1.0, tl.maximum(img_norm, eps))
    valid = row_ok[:, None] & col_ok[None, :]
    cost = tl.where(valid, 1.0 - dots * inv_t[:, None] * inv_v[None, :], 0.0)

    # IPOT, the reference's recursion in the transposed layout: delta over regions (columns),
    # sigma over text (rows). Padded entries of A and T are zero; the reciprocals of padded
    # positions divide 1 by 1 and are then zeroed, so no inf is ever formed.
    a = tl.where(valid, _exact_exp(tl.div_rn(-cost, beta), INTERPRETER), 0.0)
    plan = tl.where(valid, 1.0, 0.0)
    m_f = m.to(tl.float32)
    n_f = n.to(tl.float32)
    sigma = tl.where(row_ok, tl.div_rn(1.0, m_f), 0.0)
    for _ in range(iterations):
        q = a * plan
        delta_den = tl.where(col_ok, n_f * tl.sum(q * sigma[:, None], axis=0), 1.0)
        delta = tl.where(col_ok, tl.div_rn(1.0, delta_den), 0.0)
        sigma_den = tl.where(row_ok, m_f * tl.sum(q * delta[None, :], axis=1), 1.0)
        sigma = tl.where(row_ok, tl.div_rn(1.0, sigma_den), 0.0)
        plan = q * delta[None, :] * sigma[:, None]

    distance = tl.sum(tl.sum(cost * plan, axis=1), axis=0)
    tl.store(distance_ptr + b, distance)
    if WRITE_PLAN:
        # Every element of the (max_img_len, max_txt_len) block is written, zeros at padding.
        out_ok = (offs_n < max_img_len)[:, None] & (offs_m < max_txt_len)[None, :]
        tl.store(
            plan_ptr
            + b.to(tl.int64) * plan_stride_b
            + offs_n[:, None] * plan_stride_n
            + offs_m[None, :] * plan_stride_m,
            tl.trans(plan),
            mask=out_ok,
        )
    if SAVE_AUX:
        # cos = 1 - cost at real entries; the plan is zero elsewhere.
        weighted = plan * (1.0 - cost)
        txt_out = offs_m < max_txt_len
        img_out = offs_n < max_img_len
        txt_aux = b.to(tl.int64) * txt_aux_stride_b + offs_m
        img_aux = b.to(tl.int64) * img_aux_stride_b + offs_n
        tl.store(txt_norm_ptr + txt_aux, txt_norm, mask=txt_out)
        tl.store(img_norm_ptr + img_aux, img_norm, mask=img_out)
        tl.store(txt_dot_ptr + txt_aux, tl.sum(weighted, axis=1), mask=txt_out)
        tl.store(img_dot_ptr + img_aux, tl.sum(weighted, axis=0), mask=img_out)


@triton.jit
def _dot(a, b, acc, INTERPRETER: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc + a @ b with fp32 accumulation: the compiled kernels' product, on every device.

    Only in Triton's interpreter (`INTERPRETER`), which multiplies bf16 blocks as their uint16
    bit patterns (3.6 to 3.9: its dot calls np.matmul on the raw storage), are bf16 operands
    widened, here at the product itself: bf16 x bf16 is exact in fp32, so the sums are the
    same, and everything around the product (the operands' dtypes, the hi/lo split, the casts)
    runs as on a GPU. Its fp16 and fp32 products are right and run unchanged.
    """
    if INTERPRETER and a.dtype == tl.bfloat16:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _exact_exp(x, INTERPRETER: tl.constexpr):
    """exp(x) rounded to nearest: libdevice's on a GPU (`tl.exp` is `ex2.approx` there); the
    interpreter, which has no libdevice, computes `tl.exp` in numpy, exactly."""
    if INTERPRETER:
        return tl.exp(x)
    return libdevice.exp(x)


@triton.jit
def _zero_rows(
    base_ptr,
    row_start,
    row_end,
    stride_row,
    hidden_size,
    BLOCK_R: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """Zero rows [row_start, row_end) of a (rows, hidden_size) tensor (no-op when empty)."""
    offs_r = tl.arange(0, BLOCK_R)
    offs_h = tl.arange(0, BLOCK_H)
    zeros = tl.zeros((BLOCK_R, BLOCK_H), dtype=base_ptr.dtype.element_ty)
    for r0 in range(row_start, row_end, BLOCK_R):
        rows = r0 + offs_r
        for h0 in range(0, hidden_size, BLOCK_H):
            hh = h0 + offs_h
            tl.store(
                base_ptr + rows[:, None] * stride_row + hh[None, :],
                zeros,
                mask=(rows < row_end)[:, None] & (hh < hidden_size)[None, :],
            )


@triton.jit
def _grad_rows(
    self_base,
    self_stride_row,
    other_base,
    other_stride_row,
    grad_base,
    grad_stride_row,
    plan_base,
    plan_stride_self,
    plan_stride_other,
    self_norm_ptr,
    self_dot_ptr,
    other_norm_ptr,
    n_self,
    n_other,
    rows_out,
    g,
    hidden_size,
    eps,
    SPLIT_DOT: tl.constexpr,
    INTERPRETER: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """Gradient of one side's rows ("self": text or regions) against the other side's.

    grad_x_i = (p_i g r_i x_i / d_i - sum_k (g T_ik / d_k) y_k) / d_i, with x the self rows, y the
    other side's raw rows, T the plan oriented [self, other], d = max(|row|, eps), r the saved
    row statistic and p_i = [|x_i| >= eps]. Rows rows_out.. of the block are not written; rows
    n_self..rows_out are written as zeros (padded layout).
    """
    offs_s = tl.arange(0, BLOCK_S)
    offs_o = tl.arange(0, BLOCK_O)
    offs_h = tl.arange(0, BLOCK_H)
    s_ok = offs_s < n_self
    o_ok = offs_o < n_other
    self_norm = tl.load(self_norm_ptr + offs_s, mask=s_ok, other=0.0)
    other_norm = tl.load(other_norm_ptr + offs_o, mask=o_ok, other=0.0)
    inv_s = tl.div_rn(1.0, tl.maximum(self_norm, eps))
    inv_o = tl.div_rn(1.0, tl.maximum(other_norm, eps))
    # The normalisation's projection term exists only where the norm passed the eps clamp.
    proj = tl.where(self_norm >= eps, g * tl.load(self_dot_ptr + offs_s, mask=s_ok, other=0.0), 0.0)
    # d distance / d cos, with the other side's 1/d folded in, so that the dot below runs on the
    # other side's raw rows (bf16 rows are then exact tensor-core operands).
    a = tl.load(
        plan_base + offs_s[:, None] * plan_stride_self + offs_o[None, :] * plan_stride_other,
        mask=s_ok[:, None] & o_ok[None, :],
        other=0.0,
    )
    a = a * g * inv_o[None, :]
    if SPLIT_DOT:
        # a = a_hi + a_lo in the rows' 16-bit float type (bf16): two tensor-core products with
        # fp32 accumulation carry a to about 2^-16 relative, far below the bf16 gradient's own
        # rounding, at a third of the cost of a tf32x3 product.
        a_hi = a.to(other_base.dtype.element_ty)
        a_lo = (a - a_hi.to(tl.float32)).to(other_base.dtype.element_ty)
    out_ok = offs_s < rows_out
    for h0 in range(0, hidden_size, BLOCK_H):
        hh = h0 + offs_h
        h_ok = hh < hidden_size
        y = tl.load(
            other_base + offs_o[:, None] * other_stride_row + hh[None, :],
            mask=o_ok[:, None] & h_ok[None, :],
            other=0.0,
        )
        x = tl.load(
            self_base + offs_s[:, None] * self_stride_row + hh[None, :],
            mask=s_ok[:, None] & h_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        zero = tl.zeros((BLOCK_S, BLOCK_H), dtype=tl.float32)
        if SPLIT_DOT:
            acc = _dot(a_hi, y, zero, INTERPRETER, DOT_PRECISION)
            acc = _dot(a_lo, y, acc, INTERPRETER, DOT_PRECISION)
        else:
            acc = _dot(a, y.to(tl.float32), zero, INTERPRETER, DOT_PRECISION)
        grad = (proj[:, None] * x * inv_s[:, None] - acc) * inv_s[:, None]
        tl.store(
            grad_base + offs_s[:, None] * grad_stride_row + hh[None, :],
            grad.to(grad_base.dtype.element_ty),
            mask=out_ok[:, None] & h_ok[None, :],
        )


@triton.jit
def _ipot_bwd_kernel(
    txt_ptr,
    img_ptr,
    cu_seqlens_ptr,
    txt_len_ptr,
    img_len_ptr,
    grad_distance_ptr,
    plan_ptr,
    txt_norm_ptr,
    img_norm_ptr,
    txt_dot_ptr,
    img_dot_ptr,
    grad_txt_ptr,
    grad_img_ptr,
    txt_stride_b,
    txt_stride_row,
    img_stride_b,
    img_stride_row,
    grad_txt_stride_b,
    grad_txt_stride_row,
    grad_img_stride_b,
    grad_img_stride_row,
    grad_distance_stride,
    plan_stride_b,
    plan_stride_n,
    plan_stride_m,
    txt_aux_stride_b,
    img_aux_stride_b,
    batch,
    num_rows,
    hidden_size,
    max_txt_len,
    max_img_len,
    eps,
    PACKED: tl.constexpr,
    SPLIT_DOT: tl.constexpr,
    INTERPRETER: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """Two programs per pair: 2b the text rows' gradient, 2b + 1 the regions'; plan constant.

    Splitting the sides keeps one orientation of the plan and one accumulator per program (half
    the registers of doing both) and doubles the programs in flight; the two programs of a pair
    are adjacent in launch order, so the second read of the pair's states mostly hits L2.
    Padded layout: every row of the pair's (max_len, H) blocks is written (zeros at padding).
    Packed layout: the pair's text and region rows are written, and so are the rows no pair owns
    (a gap before the next sequence, rows before cu_seqlens[0] or after cu_seqlens[B]), with
    zeros: the launcher allocates the gradient uninitialised.
    """
    pid = tl.program_id(0)
    b = pid // 2
    m = tl.minimum(tl.load(txt_len_ptr + b).to(tl.int32), max_txt_len)
    n = tl.minimum(tl.load(img_len_ptr + b).to(tl.int32), max_img_len)
    if PACKED:
        start = tl.load(cu_seqlens_ptr + b).to(tl.int64)
        txt_base = txt_ptr + start * txt_stride_row
        img_base = img_ptr + (start + m) * img_stride_row
        grad_txt_base = grad_txt_ptr + start * grad_txt_stride_row
        grad_img_base = grad_img_ptr + (start + m) * grad_img_stride_row
        txt_rows_out = m
        img_rows_out = n
    else:
        txt_base = txt_ptr + b.to(tl.int64) * txt_stride_b
        img_base = img_ptr + b.to(tl.int64) * img_stride_b
        grad_txt_base = grad_txt_ptr + b.to(tl.int64) * grad_txt_stride_b
        grad_img_base = grad_img_ptr + b.to(tl.int64) * grad_img_stride_b
        txt_rows_out = max_txt_len
        img_rows_out = max_img_len
    g = tl.load(grad_distance_ptr + b * grad_distance_stride).to(tl.float32)
    plan_base = plan_ptr + b.to(tl.int64) * plan_stride_b
    txt_aux = b.to(tl.int64) * txt_aux_stride_b
    img_aux = b.to(tl.int64) * img_aux_stride_b

    if pid % 2 == 0:
        _grad_rows(
            txt_base,
            txt_stride_row,
            img_base,
            img_stride_row,
            grad_txt_base,
            grad_txt_stride_row,
            plan_base,
            plan_stride_m,
            plan_stride_n,
            txt_norm_ptr + txt_aux,
            txt_dot_ptr + txt_aux,
            img_norm_ptr + img_aux,
            m,
            n,
            txt_rows_out,
            g,
            hidden_size,
            eps,
            SPLIT_DOT,
            INTERPRETER,
            DOT_PRECISION,
            BLOCK_M,
            BLOCK_N,
            BLOCK_H,
        )
        if PACKED:
            # Rows of the packed buffer that belong to no pair's text or regions get zeros, so
            # the gradient needs no memset (it would cost a full extra write of (N, H)).
            end = tl.load(cu_seqlens_ptr + b + 1).to(tl.int64)
            _zero_rows(
                grad_txt_ptr, start + m + n, end, grad_txt_stride_row, hidden_size, BLOCK_R, BLOCK_H
            )
            # The first pair also owns the rows before the first sequence, the last pair those
            # after the last sequence (both empty in the collator's batches).
            lead = tl.where(b == 0, start, 0)
            _zero_rows(
                grad_txt_ptr,
                start - lead,
                start,
                grad_txt_stride_row,
                hidden_size,
                BLOCK_R,
                BLOCK_H,
            )
            tail_end = tl.where(b == batch - 1, num_rows, end)
            _zero_rows(
                grad_txt_ptr, end, tail_end, grad_txt_stride_row, hidden_size, BLOCK_R, BLOCK_H
            )
    else:
        _grad_rows(
            img_base,
            img_stride_row,
            txt_base,
            txt_stride_row,
            grad_img_base,
            grad_img_stride_row,
            plan_base,
            plan_stride_n,
            plan_stride_m,
            img_norm_ptr + img_aux,
            img_dot_ptr + img_aux,
            txt_norm_ptr + txt_aux,
            n,
            m,
            img_rows_out,
            g,
            hidden_size,
            eps,
            SPLIT_DOT,
            INTERPRETER,
            DOT_PRECISION,
            BLOCK_N,
            BLOCK_M,
            BLOCK_H,
        )


# --- host launchers -----------------------------------------------------------------------------


def _block(length: int) -> int:
    return max(MIN_BLOCK, triton.next_power_of_2(length))


def kernel_fits(max_txt_len: int, max_img_len: int) -> bool:
    """Whether pairs of up to these lengths fit one program's blocks (see the module docstring).

    True for UNITER's maxima (62 text x 100 regions: blocks of 64 x 128) and for 128 x 64;
    False, for example, for 65 x 128, 64 x 129 or 16 x 129.
    """
    block_m, block_n = _block(max_txt_len), _block(max_img_len)
    return max(block_m, block_n) <= MAX_BLOCK and block_m * block_n <= MAX_BLOCK_ELEMENTS


def _launch_config(
    max_txt_len: int,
    max_img_len: int,
    hidden_size: int,
    dtype: torch.dtype = torch.bfloat16,
    backward: bool = False,
) -> dict:
    """Blocks, hidden chunk and warps of one launch, chosen so that no variant spills.

    From ptxas's report for sm_90 over every block pair, dtype, direction, warps {4, 8, 16} and
    hidden chunk {16, 32, 64} (`benchmarks/aot_compile.py`; the table is in benchmarks/NOTES.md,
    "Compiled ahead of time"): warps grow with the block area (4 below 2048 elements, 8 to 4096,
    16 at 8192) and the hidden is read in chunks of 32, except where that spilled:
    - the fp16/fp32 backward multiplies in tf32x3 (three products, each operand split in two),
      which from 2048 elements used all 255 registers at 8 warps and spilled 176-1036 bytes at
      16 (capped at 128 registers), and spilled a few bytes at 4 warps on small blocks: it
      always takes 8 warps, with chunks of 16 from 2048 elements (142-210 registers);
    - the fp32 forward at 8192 elements spilled at 16 warps (its three resident fp32 tiles and
      the tf32x3 product), at 16 x 16 with chunks of 32 on sm_80 and at 32 x 32 with 4 warps
      under triton 3.6: it takes chunks of 16, and 8 warps from 1024 elements (54-192
      registers).
    bf16 (the training dtype) keeps the first rule in both directions. Not yet timed on a GPU:
    `benchmarks/sweep_kernels.py` times the alternatives.
    """
    block_m, block_n = _block(max_txt_len), _block(max_img_len)
    elements = block_m * block_n
    num_warps = 16 if elements >= 8192 else 8 if elements >= 2048 else 4
    chunk = 32
    if dtype != torch.bfloat16 and backward:
        chunk, num_warps = (16 if elements >= 2048 else 32), 8
    elif dtype == torch.float32:
        chunk, num_warps = 16, 8 if elements >= 1024 else 4
    return {
        "BLOCK_M": block_m,
        "BLOCK_N": block_n,
        "BLOCK_H": max(MIN_BLOCK, min(chunk, triton.next_power_of_2(hidden_size))),
        "num_warps": num_warps,
    }


@dataclass
class IpotForward:
    """What the forward launchers return.

    distance: (B,) fp32. plan: (B, max_img_len, max_txt_len) fp32 when asked, else None.
    txt_norm, txt_dot: (B, max_txt_len) fp32 and img_norm, img_dot: (B, max_img_len) fp32, the
    row norms and `r`/`c` of the module docstring, when saved for the backward, else None.
    """

    distance: torch.Tensor | None
    plan: torch.Tensor | None = None
    txt_norm: torch.Tensor | None = None
    img_norm: torch.Tensor | None = None
    txt_dot: torch.Tensor | None = None
    img_dot: torch.Tensor | None = None


def _check_params(beta: float, iterations: int) -> None:
    if not beta > 0:
        raise ValueError(f"ipot: beta must be positive, got {beta}")
    if int(iterations) != iterations or iterations < 1:
        raise ValueError(f"ipot: iterations must be an integer >= 1, got {iterations}")


def _check_lengths(name: str, lengths: torch.Tensor, batch: int, device: torch.device) -> None:
    if lengths.dim() != 1 or lengths.shape[0] != batch:
        raise ValueError(f"ipot: {name} must have shape ({batch},), got {tuple(lengths.shape)}")
    if lengths.dtype not in _INDEX_DTYPES:
        raise TypeError(f"ipot: {name} must be int32 or int64, got {lengths.dtype}")
    if lengths.device != device:
        raise ValueError(f"ipot: {name} is on {lengths.device}, the states on {device}")


def _check_states(name: str, x: torch.Tensor) -> None:
    if x.dtype not in KERNEL_DTYPES:
        raise TypeError(
            f"ipot: {name} must be float32, bfloat16 or float16 for the kernel, got {x.dtype}"
        )


def _check_fits(max_txt_len: int, max_img_len: int) -> None:
    if max_txt_len < 1 or max_img_len < 1:
        raise ValueError(
            f"ipot: max lengths must be at least 1, got {max_txt_len} text x {max_img_len} regions"
        )
    if not kernel_fits(max_txt_len, max_img_len):
        raise ValueError(
            f"ipot: {max_txt_len} text x {max_img_len} regions need blocks of "
            f"{_block(max_txt_len)} x {_block(max_img_len)}, over the kernel's "
            f"{MAX_BLOCK_ELEMENTS} elements or {MAX_BLOCK} per side; use the reference "
            f"(uniter_fast.ops.ot)"
        )


def _interpreted(states: torch.Tensor) -> bool:
    """Whether the kernels run in Triton's interpreter (CPU tensors): the `INTERPRETER` flag of
    `_dot` and `_exact_exp`, the only two places where the interpreted form differs from the
    compiled one."""
    return states.device.type == "cpu"


def _row_major(x: torch.Tensor) -> torch.Tensor:
    # The kernels index the hidden dimension with unit stride; other strides are free.
    return x if x.stride(-1) == 1 else x.contiguous()


def _forward(
    txt: torch.Tensor,
    img: torch.Tensor,
    cu_seqlens: torch.Tensor | None,
    txt_len: torch.Tensor,
    img_len: torch.Tensor,
    max_txt_len: int,
    max_img_len: int,
    *,
    packed: bool,
    beta: float,
    iterations: int,
    return_plan: bool,
    save_for_backward: bool,
    out: IpotForward | None,
) -> IpotForward:
    batch = txt_len.shape[0]
    hidden_size = txt.shape[-1]
    device = txt.device
    f32 = {"device": device, "dtype": torch.float32}
    if out is None:
        need_plan = return_plan or save_for_backward
        out = IpotForward(
            distance=torch.empty(batch, **f32),
            plan=torch.empty(batch, max_img_len, max_txt_len, **f32) if need_plan else None,
        )
        if save_for_backward:
            out.txt_norm = torch.empty(batch, max_txt_len, **f32)
            out.txt_dot = torch.empty(batch, max_txt_len, **f32)
            out.img_norm = torch.empty(batch, max_img_len, **f32)
            out.img_dot = torch.empty(batch, max_img_len, **f32)
    if batch == 0:
        return out
    write_plan = out.plan is not None
    save_aux = out.txt_norm is not None
    dummy = out.distance  # stands in for pointers a disabled branch never touches
    plan = out.plan if write_plan else dummy
    plan_strides = plan.stride() if write_plan else (0, 0, 0)
    aux = (out.txt_norm, out.img_norm, out.txt_dot, out.img_dot) if save_aux else (dummy,) * 4
    aux_strides = (out.txt_norm.stride(0), out.img_norm.stride(0)) if save_aux else (0, 0)
    if packed:
        txt_strides = img_strides = (0, txt.stride(0))
    else:
        txt_strides, img_strides = txt.stride()[:2], img.stride()[:2]
    _ipot_fwd_kernel[(batch,)](
        txt,
        img,
        cu_seqlens if packed else txt_len,
        txt_len,
        img_len,
        out.distance,
        plan,
        *aux,
        *txt_strides,
        *img_strides,
        *plan_strides,
        *aux_strides,
        hidden_size,
        max_txt_len,
        max_img_len,
        float(beta),
        COSINE_EPS,
        int(iterations),
        PACKED=packed,
        WRITE_PLAN=write_plan,
        SAVE_AUX=save_aux,
        INTERPRETER=_interpreted(txt),
        DOT_PRECISION=_FP32_DOT,
        **_launch_config(max_txt_len, max_img_len, hidden_size, txt.dtype),
    )
    return out


def _check_padded(txt: torch.Tensor, img: torch.Tensor, txt_len, img_len) -> None:
    if (
        txt.dim() != 3
        or img.dim() != 3
        or txt.shape[0] != img.shape[0]
        or txt.shape[2] != img.shape[2]
    ):
        raise ValueError(
            f"ipot: expected txt (B, m, H) and img (B, n, H), got {tuple(txt.shape)} and "
            f"{tuple(img.shape)}"
        )
    _check_states("txt", txt)
    _check_states("img", img)
    if txt.dtype != img.dtype:
        raise TypeError(f"ipot: txt and img must share a dtype, got {txt.dtype} and {img.dtype}")
    if img.device != txt.device:
        raise ValueError(f"ipot: txt is on {txt.device}, img on {img.device}")
    _check_lengths("txt_len", txt_len, txt.shape[0], txt.device)
    _check_lengths("img_len", img_len, txt.shape[0], txt.device)
    _check_fits(txt.shape[1], img.shape[1])


def _check_packed(hidden, cu_seqlens, txt_len, img_len, max_txt_len, max_img_len) -> None:
    if hidden.dim() != 2:
        raise ValueError(f"ipot: expected hidden (N, H), got {tuple(hidden.shape)}")
    _check_states("hidden", hidden)
    batch = txt_len.shape[0] if txt_len.dim() == 1 else -1
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] != batch + 1:
        raise ValueError(
            f"ipot: cu_seqlens must have shape (B+1,) = ({batch + 1},), got "
            f"{tuple(cu_seqlens.shape)}"
        )
    _check_lengths("cu_seqlens", cu_seqlens[1:], batch, hidden.device)
    _check_lengths("txt_len", txt_len, batch, hidden.device)
    _check_lengths("img_len", img_len, batch, hidden.device)
    _check_fits(int(max_txt_len), int(max_img_len))


def ipot_forward_padded(
    txt: torch.Tensor,
    img: torch.Tensor,
    txt_len: torch.Tensor,
    img_len: torch.Tensor,
    *,
    beta: float = 0.5,
    iterations: int = 50,
    return_plan: bool = False,
    save_for_backward: bool = False,
    out: IpotForward | None = None,
) -> IpotForward:
    """Fused WRA forward on padded states.

    txt: (B, m, H), img: (B, n, H), fp32/bf16/fp16 (the same dtype), unit stride over H;
    txt_len, img_len: (B,) int32/int64 real lengths, each in 1..m and 1..n (rows past them are
    never read). Returns an `IpotForward`: distance (B,) fp32, and the plan (B, n, m) fp32 when
    `return_plan` or `save_for_backward`. `out` (tests) supplies the output buffers.
    Raises ValueError when m x n does not fit the kernel (`kernel_fits`).
    """
    _check_params(beta, iterations)
    _check_padded(txt, img, txt_len, img_len)
    return _forward(
        _row_major(txt),
        _row_major(img),
        None,
        txt_len,
        img_len,
        txt.shape[1],
        img.shape[1],
        packed=False,
        beta=beta,
        iterations=iterations,
        return_plan=return_plan,
        save_for_backward=save_for_backward,
        out=out,
    )


def ipot_forward_packed(
    hidden: torch.Tensor,
    cu_seqlens: torch.Tensor,
    txt_len: torch.Tensor,
    img_len: torch.Tensor,
    max_txt_len: int,
    max_img_len: int,
    *,
    beta: float = 0.5,
    iterations: int = 50,
    return_plan: bool = False,
    save_for_backward: bool = False,
    out: IpotForward | None = None,
) -> IpotForward:
    """Fused WRA forward straight from the packed encoder output (no padded copy).

    hidden: (N, H) fp32/bf16/fp16, unit stride over H; cu_seqlens: (B+1,) int32/int64, sequence
    b at rows [cu_seqlens[b], cu_seqlens[b+1]), its txt_len[b] text rows first, then its
    img_len[b] regions; max_txt_len, max_img_len: Python ints bounding the lengths (the collator
    knows them; nothing is read back from the device). Returns an `IpotForward` as
    `ipot_forward_padded` does, the plan (B, max_img_len, max_txt_len).
    """
    _check_params(beta, iterations)
    max_txt_len, max_img_len = int(max_txt_len), int(max_img_len)
    _check_packed(hidden, cu_seqlens, txt_len, img_len, max_txt_len, max_img_len)
    hidden = _row_major(hidden)
    return _forward(
        hidden,
        hidden,
        cu_seqlens,
        txt_len,
        img_len,
        max_txt_len,
        max_img_len,
        packed=True,
        beta=beta,
        iterations=iterations,
        return_plan=return_plan,
        save_for_backward=save_for_backward,
        out=out,
    )


def _backward(
    grad_distance: torch.Tensor,
    txt: torch.Tensor,
    img: torch.Tensor,
    cu_seqlens: torch.Tensor | None,
    txt_len: torch.Tensor,
    img_len: torch.Tensor,
    saved: IpotForward,
    grad_txt: torch.Tensor,
    grad_img: torch.Tensor,
    *,
    packed: bool,
) -> None:
    batch = txt_len.shape[0]
    if batch == 0:
        return
    if saved.plan is None or saved.txt_norm is None:
        raise ValueError("ipot backward: the forward was not run with save_for_backward=True")
    max_img_len, max_txt_len = saved.plan.shape[1:]
    hidden_size = txt.shape[-1]
    if packed:
        txt_strides = img_strides = (0, txt.stride(0))
        grad_txt_strides = grad_img_strides = (0, grad_txt.stride(0))
    else:
        txt_strides, img_strides = txt.stride()[:2], img.stride()[:2]
        grad_txt_strides, grad_img_strides = grad_txt.stride()[:2], grad_img.stride()[:2]
    config = _launch_config(max_txt_len, max_img_len, hidden_size, txt.dtype, backward=True)
    _ipot_bwd_kernel[(2 * batch,)](
        txt,
        img,
        cu_seqlens if packed else txt_len,
        txt_len,
        img_len,
        grad_distance,
        saved.plan,
        saved.txt_norm,
        saved.img_norm,
        saved.txt_dot,
        saved.img_dot,
        grad_txt,
        grad_img,
        *txt_strides,
        *img_strides,
        *grad_txt_strides,
        *grad_img_strides,
        grad_distance.stride(0),
        *saved.plan.stride(),
        saved.txt_norm.stride(0),
        saved.img_norm.stride(0),
        batch,
        txt.shape[0] if packed else 0,
        hidden_size,
        max_txt_len,
        max_img_len,
        COSINE_EPS,
        PACKED=packed,
        SPLIT_DOT=txt.dtype == torch.bfloat16,
        INTERPRETER=_interpreted(txt),
        DOT_PRECISION=_FP32_DOT,
        BLOCK_R=16,
        **config,
    )


def ipot_backward_padded(
    grad_distance: torch.Tensor,
    txt: torch.Tensor,
    img: torch.Tensor,
    txt_len: torch.Tensor,
    img_len: torch.Tensor,
    saved: IpotForward,
    *,
    grad_txt: torch.Tensor | None = None,
    grad_img: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of `sum_b grad_distance[b] * distance[b]` in txt and img, the plan constant.

    grad_distance: (B,); txt, img, txt_len, img_len: the forward's inputs; saved: the forward's
    `IpotForward` (run with save_for_backward=True). Returns grad_txt (B, m, H) and grad_img
    (B, n, H) in the states' dtype, zero past each pair's lengths. `grad_txt`/`grad_img` (tests)
    supply the output buffers; every element is written.
    """
    txt, img = _row_major(txt), _row_major(img)
    grad_txt = (
        torch.empty_like(txt, memory_format=torch.contiguous_format)
        if grad_txt is None
        else grad_txt
    )
    grad_img = (
        torch.empty_like(img, memory_format=torch.contiguous_format)
        if grad_img is None
        else grad_img
    )
    _backward(
        grad_distance, txt, img, None, txt_len, img_len, saved, grad_txt, grad_img, packed=False
    )
    return grad_txt, grad_img


def ipot_backward_packed(
    grad_distance: torch.Tensor,
    hidden: torch.Tensor,
    cu_seqlens: torch.Tensor,
    txt_len: torch.Tensor,
    img_len: torch.Tensor,
    saved: IpotForward,
    *,
    grad_hidden: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gradient of `sum_b grad_distance[b] * distance[b]` in the packed hidden (N, H).

    The pairs' text and region rows get their gradients; every other row is zero (WRA does not
    read it). Every element is written, so the output needs no memset; `grad_hidden` (tests)
    supplies the buffer.
    """
    hidden = _row_major(hidden)
    if grad_hidden is None:
        grad_hidden = torch.empty_like(hidden, memory_format=torch.contiguous_format)
    _backward(
        grad_distance,
        hidden,
        hidden,
        cu_seqlens,
        txt_len,
        img_len,
        saved,
        grad_hidden,
        grad_hidden,
        packed=True,
    )
    return grad_hidden


# --- autograd -----------------------------------------------------------------------------------


class IpotDistance(torch.autograd.Function):
    """WRA distance of padded pairs; differentiable in txt and img with the plan constant."""

    @staticmethod
    def forward(ctx, txt, img, txt_len, img_len, beta, iterations):
        needs_grad = txt.requires_grad or img.requires_grad
        result = ipot_forward_padded(
            txt,
            img,
            txt_len,
            img_len,
            beta=beta,
            iterations=iterations,
            save_for_backward=needs_grad,
        )
        if needs_grad:
            ctx.save_for_backward(
                txt,
                img,
                txt_len,
                img_len,
                result.plan,
                result.txt_norm,
                result.img_norm,
                result.txt_dot,
                result.img_dot,
            )
        return result.distance

    @staticmethod
    def backward(ctx, grad_distance):
        txt, img, txt_len, img_len, *stats = ctx.saved_tensors
        grad_txt, grad_img = ipot_backward_padded(
            grad_distance, txt, img, txt_len, img_len, IpotForward(None, *stats)
        )
        return grad_txt, grad_img, None, None, None, None


class PackedIpotDistance(torch.autograd.Function):
    """WRA distance of packed sequences; differentiable in hidden with the plan constant."""

    @staticmethod
    def forward(
        ctx, hidden, cu_seqlens, txt_len, img_len, max_txt_len, max_img_len, beta, iterations
    ):
        needs_grad = hidden.requires_grad
        result = ipot_forward_packed(
            hidden,
            cu_seqlens,
            txt_len,
            img_len,
            max_txt_len,
            max_img_len,
            beta=beta,
            iterations=iterations,
            save_for_backward=needs_grad,
        )
        if needs_grad:
            ctx.save_for_backward(
                hidden,
                cu_seqlens,
                txt_len,
                img_len,
                result.plan,
                result.txt_norm,
                result.img_norm,
                result.txt_dot,
                result.img_dot,
            )
        return result.distance

    @staticmethod
    def backward(ctx, grad_distance):
        hidden, cu_seqlens, txt_len, img_len, *stats = ctx.saved_tensors
        grad_hidden = ipot_backward_packed(
            grad_distance, hidden, cu_seqlens, txt_len, img_len, IpotForward(None, *stats)
        )
        return grad_hidden, None, None, None, None, None, None, None


# --- functional ---------------------------------------------------------------------------------


def wra_distance_triton(
    txt: torch.Tensor,
    img: torch.Tensor,
    txt_len: torch.Tensor,
    img_len: torch.Tensor,
    *,
    beta: float = 0.5,
    iterations: int = 50,
) -> torch.Tensor:
    """The fused kernel behind `uniter_fast.ops.wra_distance(..., backend="triton")`.

    txt: (B, m, H), img: (B, n, H) (fp32/bf16/fp16); txt_len, img_len: (B,). Returns (B,) fp32.
    """
    return IpotDistance.apply(txt, img, txt_len, img_len, beta, iterations)


def wra_distance_packed_triton(
    hidden: torch.Tensor,
    cu_seqlens: torch.Tensor,
    txt_len: torch.Tensor,
    img_len: torch.Tensor,
    max_txt_len: int,
    max_img_len: int,
    *,
    beta: float = 0.5,
    iterations: int = 50,
) -> torch.Tensor:
    """The fused kernel behind `uniter_fast.ops.wra_distance_packed(..., backend="triton")`.

    hidden: (N, H); cu_seqlens: (B+1,); txt_len, img_len: (B,); max lengths: Python ints.
    Returns (B,) fp32.
    """
    return PackedIpotDistance.apply(
        hidden, cu_seqlens, txt_len, img_len, max_txt_len, max_img_len, beta, iterations
    )
