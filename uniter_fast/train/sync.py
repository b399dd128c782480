"""Catch the operations that make the host wait for the device: `forbid_host_sync()`.

A training step that never waits lets the host queue the next kernels while the GPU runs the
current ones; one `.item()`, one `hidden[mask]` or one `nonzero` per step drains that queue and
leaves the GPU idle while the host catches up. `forbid_host_sync(device)` raises `HostSyncError`
at the first such operation inside its block:

- on CUDA, through `torch.cuda.set_sync_debug_mode("error")`, PyTorch's own check of every
  synchronising CUDA call (device-to-host copies, `cudaStreamSynchronize` behind `.item()`);
- on any device, through a dispatch mode that sees every ATen operation and names the ones that
  need a device value on the host: scalar reads (`.item()`, `bool(t)`, `int(t)`), `nonzero`,
  `masked_select`, boolean-mask indexing, `unique`, `bincount`, `repeat_interleave` without
  `output_size`, `equal`, and copies from the watched device to the CPU. This second check is
  what lets the CPU test suite hold the step to the rule: on a CPU tensor such an operation
  costs nothing, but the same code on a GPU would wait.

Only tensors on the watched device count: the optimizer's step counters live on the CPU beside
CUDA parameters (non-fused AdamW), and reading them does not wait for the GPU. On a CPU-only
check the CPU is the watched device, so wrap the model's forward and backward, not a non-fused
optimizer.
"""

from __future__ import annotations

import contextlib
import sys
import traceback
from collections.abc import Iterable, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# ATen operations (overload packet names) whose result size or value the host must read.
_SYNCING_OPS = frozenset(
    {
        "_local_scalar_dense",  # .item(), bool(t), int(t), float(t)
        "is_nonzero",
        "nonzero",
        "argwhere",
        "masked_select",
        "unique",
        "_unique",
        "_unique2",
        "unique_dim",
        "unique_consecutive",
        "bincount",  # the output size is max(input) + 1
        "equal",  # returns a Python bool
        "allclose",
    }
)


class HostSyncError(RuntimeError):
    """An operation inside `forbid_host_sync` would make the host wait for the device."""


def _tensors(values) -> Iterator[torch.Tensor]:
    for v in values:
        if isinstance(v, torch.Tensor):
            yield v
        elif isinstance(v, (list, tuple)):
            yield from _tensors(v)


def _called_from(names: frozenset[str]) -> bool:
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_name in names:
            return True
        frame = frame.f_back
    return False


class _SyncWatch(TorchDispatchMode):
    def __init__(self, device_type: str, allow: frozenset[str]):
        super().__init__()
        self.device_type = device_type
        self.allow = allow

    def _watched(self, tensors) -> bool:
        return any(t.device.type == self.device_type for t in tensors)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        inputs = list(_tensors(list(args) + list(kwargs.values())))
        reason = None
        if name in _SYNCING_OPS and self._watched(inputs):
            reason = f"aten.{name} reads a {self.device_type} value on the host"
        elif (
            name in ("index", "index_put", "index_put_")
            and self._watched(inputs)
            and any(t.dtype == torch.bool for t in _tensors(args[1:2]))
        ):
            reason = f"aten.{name} with a boolean mask (its output size is read on the host)"
        elif name == "repeat_interleave" and kwargs.get("output_size") is None:
            if self._watched(inputs) and func._overloadname in ("Tensor", "self_Tensor"):
                reason = "aten.repeat_interleave without output_size (its size is read on the host)"
        elif name in ("_to_copy", "copy_") and self.device_type != "cpu":
            reason = self._device_to_host(name, args, kwargs)
        if reason is not None and not (self.allow and _called_from(self.allow)):
            where = "".join(traceback.format_stack(limit=12)[:-2])
            raise HostSyncError(f"host sync: {reason}\n{where}")
        return func(*args, **kwargs)

    def _device_to_host(self, name, args, kwargs) -> str | None:
        if name == "copy_":
            dst, src = args[0], args[1]
            moved = src.device.type == self.device_type and dst.device.type == "cpu"
        else:
            src, dst = args[0], kwargs.get("device")
            moved = src.device.type == self.device_type and dst is not None
            moved = moved and torch.device(dst).type == "cpu"
        return f"a copy from {self.device_type} to the CPU (aten.{name})" if moved else None


@contextlib.contextmanager
def forbid_host_sync(device: torch.device | str, allow: Iterable[str] = ()) -> Iterator[None]:
    """Raise HostSyncError at the first operation in the block that waits for `device`.

    allow: names of functions whose host reads are known and accepted (the dispatch check lets
    an operation through when one of them is on the call stack), e.g. a launcher's validation
    that runs on CPU tensors only and so never waits on a GPU.
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    previous = torch.cuda.get_sync_debug_mode() if cuda else None
    try:
        if cuda:
            torch.cuda.set_sync_debug_mode("error")
        with _SyncWatch(device.type, frozenset(allow)):
            yield
    except RuntimeError as e:
        if cuda and not isinstance(e, HostSyncError) and "synchroniz" in str(e):
            raise HostSyncError(f"host sync (torch.cuda sync debug mode): {e}") from e
        raise
    finally:
        if cuda:
            torch.cuda.set_sync_debug_mode(previous)


__all__ = ["HostSyncError", "forbid_host_sync"]
