"""Triton kernels, installed as `uniter_fast.kernels` (never import this folder as `kernels`).

Each op keeps its kernel, host launcher and autograd Function here, and its plain PyTorch
reference twin in `uniter_fast.ops`, which is also the path taken wherever Triton cannot run.
"""

from __future__ import annotations

import functools
import importlib.util
import os


@functools.cache
def triton_importable() -> bool:
    """True when the `triton` package can be imported (it is optional on CPU-only machines)."""
    return importlib.util.find_spec("triton") is not None


def triton_runs_on(device_type: str) -> bool:
    """Whether a Triton kernel can run on tensors of `device_type`.

    On CUDA it needs triton; on the CPU only Triton's interpreter runs kernels, and only when
    `TRITON_INTERPRET=1` was set before triton was first imported.
    """
    if not triton_importable():
        return False
    if device_type == "cuda":
        return True
    return device_type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


__all__ = ["triton_importable", "triton_runs_on"]
