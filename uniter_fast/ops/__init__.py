"""Ops in two forms: a plain PyTorch reference (this package) and fused Triton kernels
(`uniter_fast.kernels`), picked per call by `backend` ("auto", "triton", "reference")."""

from __future__ import annotations

import torch

from ..kernels import triton_runs_on
from .losses import (
    AUTO_BACKEND,
    gather_padded,
    gather_rows,
    itm_loss,
    mlm_loss,
    mlm_loss_reference,
    mrc_loss,
    mrc_loss_reference,
    mrckl_loss,
    mrckl_loss_reference,
    mrfr_loss,
    mrfr_loss_padded,
    mrfr_loss_reference,
    wra_loss,
)
from .ot import (
    cosine_cost,
    gather_pairs,
    ipot_plan,
    kernel_fits,
    wra_distance,
    wra_distance_packed,
    wra_distance_packed_reference,
    wra_distance_reference,
)


def describe_kernels(
    backend: str, device: torch.device | str, matmul_dtype: torch.dtype | None = None
) -> str:
    """Which path each loss op takes for `backend` on `device`, in one line (for the logs).

    matmul_dtype: the autocast dtype of the run, when known: on CUDA the line then also says how
    the fused MLM head accumulates its fp32 weight gradient (probed once, see
    `kernels.masked_losses.mlm_weight_grad_path`)."""
    device = torch.device(device)
    line = _kernel_paths(backend, device)
    if device.type == "cuda" and matmul_dtype is not None and not line.startswith("reference"):
        from ..kernels.masked_losses import mlm_weight_grad_path

        line += f"; MLM weight gradient: {mlm_weight_grad_path(device, matmul_dtype)}"
    return line


def _kernel_paths(backend: str, device: torch.device) -> str:
    if backend == "reference":
        return "reference PyTorch ops (fused kernels switched off)"
    if backend == "triton":
        return "Triton kernels forced for every op (WRA pairs past 64 x 128 use the reference)"
    if device.type != "cuda":
        return f"reference PyTorch ops (the fused kernels run on CUDA; this is {device.type})"
    if not triton_runs_on("cuda"):
        return "reference PyTorch ops (triton is not installed)"
    paths = {"wra": "triton", **AUTO_BACKEND}
    return "auto: " + ", ".join(f"{op}={path}" for op, path in paths.items())


__all__ = [
    "AUTO_BACKEND",
    "cosine_cost",
    "describe_kernels",
    "gather_padded",
    "gather_pairs",
    "gather_rows",
    "ipot_plan",
    "itm_loss",
    "kernel_fits",
    "mlm_loss",
    "mlm_loss_reference",
    "mrc_loss",
    "mrc_loss_reference",
    "mrckl_loss",
    "mrckl_loss_reference",
    "mrfr_loss",
    "mrfr_loss_padded",
    "mrfr_loss_reference",
    "wra_distance",
    "wra_distance_packed",
    "wra_distance_packed_reference",
    "wra_distance_reference",
    "wra_loss",
]
