"""Word-region alignment (WRA): cosine cost plus IPOT, the reference form.

This is the oracle the fused Triton kernel is held to, so it states the maths plainly and runs in
float64 as well as float32. The maths, for one pair with m text positions and n regions:

    C[i, j] = 1 - cos(w_i, v_j)                       cost, [m, n]  (L2 normalisation eps 1e-5)
    A = exp(-C^T / beta), T = 1, sigma = 1/m          [n, m], [n, m], [m]
    repeat `iterations` times (one inner step, k = 1):
        Q = A * T
        delta = 1 / (n * Q @ sigma)                   [n]
        sigma = 1 / (m * Q^T @ delta)                 [m]
        T = delta[:, None] * Q * sigma[None, :]
    distance = sum_ij C[i, j] * T[j, i]

The plan T is a constant: it is computed without a graph, and the gradient of the distance flows
through the cost only (as in the reference). Padded rows and columns are zero in A, T and C, so
padding never changes the result.

`wra_distance` and `wra_distance_packed` dispatch between this reference
(`wra_distance_reference`, `wra_distance_packed_reference`) and the fused Triton kernel
(`uniter_fast.kernels.ipot`); `backend` picks:

- "auto" (default): the kernel on CUDA tensors when triton is installed, the reference anywhere
  else (on the CPU even when Triton's interpreter could run the kernel: it is far slower);
- "triton": the kernel; on CPU tensors only under Triton's interpreter (TRITON_INTERPRET=1 set
  before triton is imported), otherwise a RuntimeError says why;
- "reference": the reference.

Whatever the backend, a batch the kernel cannot take runs on the reference: max lengths whose
power-of-two blocks exceed the kernel's register and shared-memory budget (`kernel_fits`: 64 text x
128 regions and 128 x 64 fit; 65 x 128, 64 x 129 and 16 x 129 do not), and float64 states (the
kernel computes in fp32; the reference keeps float64). Neither check reads the device: both use
shapes, dtypes and the Python-int max lengths.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kernels import triton_runs_on
from .losses import gather_padded

COSINE_EPS = 1e-5
BACKENDS = ("auto", "triton", "reference")
# The kernel's tile budget, mirrored here so that choosing a backend never imports triton:
# power-of-two blocks of 16 to 128 per side, at most 64 x 128 elements (kernels/ipot.py).
_KERNEL_MIN_BLOCK = 16
_KERNEL_MAX_BLOCK = 128
_KERNEL_MAX_BLOCK_ELEMENTS = 64 * 128
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # fp32 at least (the reference runs WRA in fp32 whatever the training precision); float64 kept.
    return torch.promote_types(dtype, torch.float32)


def length_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """lengths: (batch,) -> bool (batch, max_len), True at real positions."""
    return torch.arange(max_len, device=lengths.device) < lengths[:, None]


def cosine_cost(txt: torch.Tensor, img: torch.Tensor, eps: float = COSINE_EPS) -> torch.Tensor:
    """txt: (batch, m, hidden), img: (batch, n, hidden) -> cost (batch, m, n) = 1 - cosine."""
    txt = F.normalize(txt, p=2, dim=-1, eps=eps)
    img = F.normalize(img, p=2, dim=-1, eps=eps)
    return 1 - txt @ img.transpose(1, 2)


@torch.no_grad()
def ipot_plan(
    cost: torch.Tensor,
    txt_len: torch.Tensor,
    img_len: torch.Tensor,
    *,
    beta: float = 0.5,
    iterations: int = 50,
) -> torch.Tensor:
    """The IPOT transport plan with uniform marginals over the real positions.

    cost: (batch, m, n), zero at padding; txt_len, img_len: (batch,), each at least 1.
    Returns T: (batch, n, m), zero at padding, rows summing to 1/img_len, columns to 1/txt_len
    once converged.
    """
    if beta <= 0:
        raise ValueError(f"ipot_plan: beta must be positive, got {beta}")
    if iterations < 1:
        raise ValueError(f"ipot_plan: iterations must be at least 1, got {iterations}")
    _, m, n = cost.shape
    txt_valid = length_mask(txt_len, m)  # [B, m]
    img_valid = length_mask(img_len, n)  # [B, n]
    joint = img_valid[:, :, None] & txt_valid[:, None, :]  # [B, n, m]
    m_len = txt_len.to(cost.dtype)[:, None]  # [B, 1]
    n_len = img_len.to(cost.dtype)[:, None]

    zero = cost.new_zeros(())
    A = torch.where(joint, torch.exp(-cost.transpose(1, 2) / beta), zero)
    T = joint.to(cost.dtype)
    sigma = torch.where(txt_valid, 1 / m_len, zero)  # [B, m]
    for _ in range(iterations):
        Q = A * T
        # Padded rows of Q are all zero: mask the division result (not the input) so that no
        # 1/0 ever reaches a product.
        delta = torch.where(img_valid, 1 / (n_len * (Q @ sigma[:, :, None]).squeeze(-1)), zero)
        sigma = torch.where(txt_valid, 1 / (m_len * (delta[:, None, :] @ Q).squeeze(1)), zero)
        T = delta[:, :, None] * Q * sigma[:, None, :]
    return T


def wra_distance_reference(
    txt: torch.Tensor,
    img: torch.Tensor,
    txt_len: torch.Tensor,
    img_len: torch.Tensor,
    *,
    beta: float = 0.5,
    iterations: int = 50,
) -> torch.Tensor:
    """Optimal-transport distance between each pair's text and region states (padded inputs).

    txt: (batch, m, hidden), img: (batch, n, hidden), any float dtype (computed in at least fp32);
    txt_len, img_len: (batch,) real lengths, each at least 1; positions past them are ignored.
    Returns (batch,) distances in the compute dtype; differentiable in txt and img with the plan
    held constant.
    """
    if (
        txt.dim() != 3
        or img.dim() != 3
        or txt.shape[0] != img.shape[0]
        or txt.shape[2] != img.shape[2]
    ):
        raise ValueError(
            f"wra_distance: expected txt (B, m, H) and img (B, n, H), got {tuple(txt.shape)} "
            f"and {tuple(img.shape)}"
        )
    dtype = _compute_dtype(txt.dtype)
    cost = cosine_cost(txt.to(dtype), img.to(dtype))
    joint = (
        length_mask(txt_len, txt.shape[1])[:, :, None]
        & length_mask(img_len, img.shape[1])[:, None, :]
    )
    cost = cost.masked_fill(~joint, 0)
    plan = ipot_plan(cost.detach(), txt_len, img_len, beta=beta, iterations=iterations)
    return (cost * plan.transpose(1, 2)).sum(dim=(1, 2))


def gather_pairs(
    hidden: torch.Tensor,
    cu_seqlens: torch.Tensor,
    txt_len: torch.Tensor,
    img_len: torch.Tensor,
    max_txt_len: int,
    max_img_len: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded text and region blocks of each packed sequence, without a host sync.

    hidden: (N, hidden) packed states; returns txt (B, max_txt_len, hidden) and
    img (B, max_img_len, hidden), zero past each pair's lengths.
    """
    start = cu_seqlens[:-1].long()[:, None]
    pad_row = hidden.shape[0]
    t = torch.arange(max_txt_len, device=hidden.device)
    i = torch.arange(max_img_len, device=hidden.device)
    txt_rows = torch.where(t < txt_len[:, None], start + t, pad_row)
    img_rows = torch.where(i < img_len[:, None], start + txt_len[:, None] + i, pad_row)
    return gather_padded(hidden, txt_rows), gather_padded(hidden, img_rows)


def wra_distance_packed_reference(
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
    """WRA distance of every packed sequence (text block then region block): (B,).

    hidden: (N, hidden) encoder output; cu_seqlens: (B+1,); txt_len, img_len: (B,);
    max_txt_len, max_img_len: Python ints bounding the lengths (known to the collator).
    """
    txt, img = gather_pairs(hidden, cu_seqlens, txt_len, img_len, max_txt_len, max_img_len)
    return wra_distance_reference(txt, img, txt_len, img_len, beta=beta, iterations=iterations)


# --- dispatch -----------------------------------------------------------------------------------


def _kernel_block(length: int) -> int:
    return max(_KERNEL_MIN_BLOCK, 1 << max(0, int(length) - 1).bit_length())


def kernel_fits(max_txt_len: int, max_img_len: int) -> bool:
    """Whether the fused kernel takes pairs of up to these lengths (64 x 128 does, 65 x 128 not)."""
    if max_txt_len < 1 or max_img_len < 1:
        return False
    block_m, block_n = _kernel_block(max_txt_len), _kernel_block(max_img_len)
    return max(block_m, block_n) <= _KERNEL_MAX_BLOCK and (
        block_m * block_n <= _KERNEL_MAX_BLOCK_ELEMENTS
    )


def _use_kernel(
    backend: str, device: torch.device, dtype: torch.dtype, max_txt_len: int, max_img_len: int
) -> bool:
    """The dispatch rule of the module docstring; raises for a forced backend that cannot run."""
    if backend not in BACKENDS:
        raise ValueError(f"wra_distance: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return False
    if backend == "auto" and device.type != "cuda":
        return False
    if not triton_runs_on(device.type):
        # Only a forced backend gets here: "auto" on CUDA without triton is the reference.
        if backend == "auto":
            return False
        hint = (
            "install triton"
            if device.type == "cuda"
            else "set TRITON_INTERPRET=1 before triton is first imported (the interpreter is "
            "slow; it is meant for tests)"
        )
        raise RuntimeError(
            f"wra_distance(backend='triton'): Triton kernels cannot run on {device.type} tensors "
            f"here; {hint}, or use backend='auto' or 'reference'"
        )
    return dtype in _KERNEL_DTYPES and kernel_fits(max_txt_len, max_img_len)


def wra_distance(
    txt: torch.Tensor,
    img: torch.Tensor,
    txt_len: torch.Tensor,
    img_len: torch.Tensor,
    *,
    beta: float = 0.5,
    iterations: int = 50,
    backend: str = "auto",
) -> torch.Tensor:
    """Optimal-transport distance between each pair's text and region states (padded inputs).

    txt: (batch, m, hidden), img: (batch, n, hidden); txt_len, img_len: (batch,) real lengths,
    each at least 1. Returns (batch,) distances in fp32 (float64 for float64 states),
    differentiable in txt and img with the plan held constant. `backend`: see the module
    docstring ("auto", "triton" or "reference").
    """
    if txt.dim() != 3 or img.dim() != 3:
        # The reference's message, whichever backend was asked for.
        return wra_distance_reference(txt, img, txt_len, img_len, beta=beta, iterations=iterations)
    dtype = torch.promote_types(txt.dtype, img.dtype)
    if not _use_kernel(backend, txt.device, dtype, txt.shape[1], img.shape[1]):
        return wra_distance_reference(txt, img, txt_len, img_len, beta=beta, iterations=iterations)
    from ..kernels import ipot  # triton is imported only when the kernel runs

    return ipot.wra_distance_triton(
        txt.to(dtype), img.to(dtype), txt_len, img_len, beta=beta, iterations=iterations
    )


def wra_distance_packed(
    hidden: torch.Tensor,
    cu_seqlens: torch.Tensor,
    txt_len: torch.Tensor,
    img_len: torch.Tensor,
    max_txt_len: int,
    max_img_len: int,
    *,
    beta: float = 0.5,
    iterations: int = 50,
    backend: str = "auto",
) -> torch.Tensor:
    """WRA distance of every packed sequence (text block then region block): (B,).

    hidden: (N, hidden) encoder output; cu_seqlens: (B+1,); txt_len, img_len: (B,);
    max_txt_len, max_img_len: Python ints bounding the lengths (known to the collator). The
    kernel reads the pairs straight from `hidden` (no padded copy); its gradient in `hidden` is
    zero on rows that are no pair's text or regions. `backend`: see the module docstring.
    """
    if not _use_kernel(backend, hidden.device, hidden.dtype, max_txt_len, max_img_len):
        return wra_distance_packed_reference(
            hidden,
            cu_seqlens,
            txt_len,
            img_len,
            max_txt_len,
            max_img_len,
            beta=beta,
            iterations=iterations,
        )
    from ..kernels import ipot

    return ipot.wra_distance_packed_triton(
        hidden,
        cu_seqlens,
        txt_len,
        img_len,
        max_txt_len,
        max_img_len,
        beta=beta,
        iterations=iterations,
    )
