"""Packing examples into the packed, unpadded `Batch`.

    batch = collate(examples, "mlm")                 # tensors over freshly allocated NumPy arrays
    batch = collate(examples, "mlm", out="pinned")   # packed straight into one pinned buffer
    batch = collate(examples, "mlm", out="shared")   # ... or into shared memory (loader workers)

`collate` packs with the C++ extension `uniter_fast._C` when it is importable (`collate_cpp`),
else with `collate_numpy`, which logs one warning naming the import error. `collate_numpy` is the
plain NumPy statement of the packing and the oracle: the tests hold the C++ packer to it array by
array, dtypes included. `extension_loaded()` and `extension_error()` say which path runs, and why.

The C++ packer works in two phases, so that outputs can live anywhere: `_C.PackPlan` reads and
validates the examples and sizes every output, the caller allocates them (NumPy arrays, or NumPy
views of one pinned or shared-memory torch buffer), and `PackPlan.pack_into` fills them in one
pass with the GIL released.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from .schema import LOC_DIM, MRM_TASKS, PACK_TASKS, Batch, check_task

PAD_MULTIPLE = 8
# uniter_fast.data.downstream
DOWNSTREAM_TASKS = ("vqa", "ve", "nlvr2", "nlvr2-triplet", "retrieval", "re", "vcr")

logger = logging.getLogger("uniter_fast.data")

try:
    # import_module, not `from .. import _C`: inside the package's own __init__ that form reports
    # a missing extension as "partially initialized module (most likely a circular import)".
    _C = importlib.import_module("uniter_fast._C")
except ImportError as e:  # not built (no compiler at install time) or built for another Python
    _C = None
    EXTENSION_ERROR: str | None = f"{type(e).__name__}: {e}"
else:
    EXTENSION_ERROR = None

_fallback_warned = False


def extension_loaded() -> bool:
    """True when the C++ packer `uniter_fast._C` imported; else `extension_error()` says why not."""
    return _C is not None


def extension_error() -> str | None:
    """Why `uniter_fast._C` did not import ("ImportError: ..."), or None when it did."""
    return EXTENSION_ERROR


def _field(ex: dict, i: int, name: str) -> Any:
    try:
        return ex[name]
    except KeyError:
        raise ValueError(f"example {i}: missing field {name!r}") from None
    except TypeError:
        raise TypeError(f"example {i}: expected a dict, got {type(ex).__name__}") from None


def _check_2d(arr: np.ndarray, i: int, name: str, rows: int | None, cols: int | None) -> None:
    if (
        arr.ndim != 2
        or (rows is not None and arr.shape[0] != rows)
        or (cols is not None and arr.shape[1] != cols)
    ):
        want = f"({rows if rows is not None else 'n'}, {cols if cols is not None else 'd'})"
        raise ValueError(f"example {i}: {name} has shape {arr.shape}, expected {want}")


def _feature_dtype(arrays: Sequence[np.ndarray], name: str) -> np.dtype:
    # float16 in, float16 out (half the bytes to move); anything else widens to float32 so that
    # full-precision inputs are never rounded.
    for i, a in enumerate(arrays):
        if a.dtype.kind != "f":
            raise TypeError(f"example {i}: {name} must be floating point, got {a.dtype}")
    if all(a.dtype == np.float16 for a in arrays):
        return np.dtype(np.float16)
    return np.dtype(np.float32)


def collate_numpy(
    examples: Sequence[dict], task: str, *, pad_multiple: int = PAD_MULTIPLE
) -> dict[str, Any]:
    """Pack examples (schema in `uniter_fast.data.schema`) into the `Batch` fields as NumPy arrays.

    Sequence b is its text (`input_ids`, [CLS] ... [SEP]) followed by its regions. Returns a dict
    of the `Batch` fields other than `task`; `collate` wraps it in a `Batch`.
    """
    check_task(task, PACK_TASKS)
    if len(examples) == 0:
        raise ValueError("collate: no examples")
    mrm = task in MRM_TASKS

    ids = [np.asarray(_field(ex, i, "input_ids")) for i, ex in enumerate(examples)]
    feats = [np.asarray(_field(ex, i, "img_feat")) for i, ex in enumerate(examples)]
    locs = [np.asarray(_field(ex, i, "img_loc")) for i, ex in enumerate(examples)]
    for i, (t, f, loc) in enumerate(zip(ids, feats, locs, strict=True)):
        if t.ndim != 1 or t.shape[0] == 0 or t.dtype.kind not in "iu":
            raise ValueError(
                f"example {i}: input_ids must be a non-empty 1-d integer array, got shape "
                f"{t.shape} dtype {t.dtype}"
            )
        _check_2d(f, i, "img_feat", None, feats[0].shape[1] if feats[0].ndim == 2 else None)
        if f.shape[0] == 0:
            raise ValueError(f"example {i}: img_feat has no regions")
        _check_2d(loc, i, "img_loc", f.shape[0], LOC_DIM)

    txt_len = np.array([t.shape[0] for t in ids], dtype=np.int64)
    img_len = np.array([f.shape[0] for f in feats], dtype=np.int64)
    seq_len = txt_len + img_len
    cu_seqlens = np.zeros(len(examples) + 1, dtype=np.int64)
    np.cumsum(seq_len, out=cu_seqlens[1:])
    starts = cu_seqlens[:-1]
    num_rows = int(cu_seqlens[-1])

    # Position of every text token within its caption, and every region within its image.
    txt_pos = np.arange(int(txt_len.sum())) - np.repeat(np.cumsum(txt_len) - txt_len, txt_len)
    img_pos = np.arange(int(img_len.sum())) - np.repeat(np.cumsum(img_len) - img_len, img_len)
    txt_dest = np.repeat(starts, txt_len) + txt_pos
    img_dest = np.repeat(starts + txt_len, img_len) + img_pos

    img_feat = np.concatenate(feats).astype(_feature_dtype(feats, "img_feat"), copy=False)
    out: dict[str, Any] = {
        "input_ids": np.concatenate(ids).astype(np.int64, copy=False),
        "txt_pos": txt_pos.astype(np.int64, copy=False),
        "txt_dest": txt_dest.astype(np.int64, copy=False),
        "img_loc": np.concatenate(locs).astype(np.float32, copy=False),
        "img_dest": img_dest.astype(np.int64, copy=False),
        "cu_seqlens": cu_seqlens.astype(np.int32),
        "txt_len": txt_len,
        "img_len": img_len,
        "max_seqlen": int(seq_len.max()),
        "max_txt_len": int(txt_len.max()),
        "max_img_len": int(img_len.max()),
    }

    # Padded view: row-major (b, l) positions; padding points at row N, one past the packed rows.
    lpad = -(-out["max_seqlen"] // pad_multiple) * pad_multiple
    seq_pos = np.arange(num_rows) - np.repeat(starts, seq_len)
    seq_id = np.repeat(np.arange(len(examples)), seq_len)
    pad_index = np.full((len(examples), lpad), num_rows, dtype=np.int64)
    pad_index[seq_id, seq_pos] = np.arange(num_rows)
    out["pad_index"] = pad_index
    out["unpad_index"] = (seq_id * lpad + seq_pos).astype(np.int64)

    if task == "mlm":
        labels = []
        for i, (ex, t) in enumerate(zip(examples, ids, strict=True)):
            lab = np.asarray(_field(ex, i, "txt_labels"))
            if lab.shape != t.shape:
                raise ValueError(
                    f"example {i}: txt_labels has shape {lab.shape}, input_ids {t.shape}"
                )
            labels.append(lab)
        labels = np.concatenate(labels).astype(np.int64, copy=False)
        target = labels != -1
        if not target.any():
            raise ValueError("collate: MLM batch has no masked token (every txt_labels is -1)")
        out["mlm_index"] = out["txt_dest"][target]
        out["mlm_labels"] = labels[target]

    if mrm:
        masks = []
        for i, (ex, f) in enumerate(zip(examples, feats, strict=True)):
            m = np.asarray(_field(ex, i, "img_mask"))
            if m.shape != (f.shape[0],) or m.dtype != np.bool_:
                raise ValueError(
                    f"example {i}: img_mask must be bool of shape ({f.shape[0]},), got "
                    f"{m.dtype} {m.shape}"
                )
            masks.append(m)
        img_masked = np.concatenate(masks)
        if not img_masked.any():
            raise ValueError("collate: region-masking batch has no masked region")
        out["mrm_index"] = out["img_dest"][img_masked]
        if task == "mrfr":
            out["mrfr_target"] = img_feat[img_masked]  # a copy, taken before the zeroing below
        else:
            soft = []
            for i, (ex, m) in enumerate(zip(examples, masks, strict=True)):
                s = np.asarray(_field(ex, i, "soft_labels"))
                _check_2d(s, i, "soft_labels", m.shape[0], None)
                soft.append(s[m])
            soft_dtype = _feature_dtype(soft, "soft_labels")
            soft = np.concatenate(soft).astype(soft_dtype, copy=False)
            out["mrc_soft_target"] = soft
            # Background (class 0) is never the hard target: argmax over classes 1..C-1.
            out["mrc_label"] = (1 + soft[:, 1:].argmax(axis=1)).astype(np.int64)
        img_feat[img_masked] = 0  # img_feat is a fresh array from np.concatenate
    else:
        img_masked = np.zeros(out["img_dest"].shape[0], dtype=np.bool_)
    out["img_feat"] = img_feat
    out["img_masked"] = img_masked

    if task == "itm":
        target = np.array([_field(ex, i, "itm_target") for i, ex in enumerate(examples)])
        if target.dtype.kind not in "iub" or not np.isin(target, (0, 1)).all():
            raise ValueError(f"collate: itm_target must be 0 or 1, got {target.tolist()}")
        out["itm_target"] = target.astype(np.int64)
    return out


# --- the C++ packer, and where its outputs live --------------------------------------------------

Allocator = Callable[[int], torch.Tensor]
"""`alloc(nbytes)` -> a CPU, contiguous, 64-byte aligned uint8 tensor of at least nbytes."""

_ALIGN = 64  # every output starts on a cache line of the arena


def _pinned(nbytes: int) -> torch.Tensor:
    # One pinned block per batch rather than one per field: pinning is an expensive call, and
    # the caching host allocator recycles blocks of the same size.
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)


def _shared(nbytes: int) -> torch.Tensor:
    # A new shared-memory block, as the DataLoader's default_collate makes in a worker: the batch
    # then crosses to the main process without another copy. (share_memory_() on a fresh tensor
    # would allocate, then copy the uninitialised bytes over.)
    storage = torch.UntypedStorage._new_shared(nbytes)
    return torch.empty(0, dtype=torch.uint8).set_(storage)


ALLOCATORS: dict[str, Allocator] = {"pinned": _pinned, "shared": _shared}

_TORCH_DTYPES = {
    "bool": torch.bool,
    "int32": torch.int32,
    "int64": torch.int64,
    "float16": torch.float16,
    "float32": torch.float32,
}

Specs = list[tuple[str, tuple[int, ...], str]]


def _allocate(
    specs: Specs, out: str | Allocator | None
) -> tuple[dict[str, np.ndarray], dict[str, torch.Tensor] | None]:
    """Output arrays for `specs` [(name, shape, dtype name)]: fresh NumPy arrays (`out=None`), or
    NumPy views of torch tensors carved out of one `out` arena (returned too, by name)."""
    if out is None:
        return {name: np.empty(shape, dtype=dtype) for name, shape, dtype in specs}, None
    alloc = ALLOCATORS.get(out) if isinstance(out, str) else out
    if alloc is None or not callable(alloc):
        raise ValueError(
            f"collate: out must be None, 'pinned', 'shared' or a callable, got {out!r}"
        )
    layout, total = [], 0
    for name, shape, dtype in specs:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        layout.append((name, shape, dtype, total, nbytes))
        total += -(-nbytes // _ALIGN) * _ALIGN
    arena = alloc(total)
    if (
        not isinstance(arena, torch.Tensor)
        or arena.dtype != torch.uint8
        or arena.device.type != "cpu"
        or not arena.is_contiguous()
        or arena.numel() < total
    ):
        got = (
            f"{arena.dtype} {tuple(arena.shape)} on {arena.device}"
            if isinstance(arena, torch.Tensor)
            else type(arena).__name__
        )
        raise ValueError(
            f"collate: the allocator must return a contiguous CPU uint8 tensor of at least {total} "
            f"bytes, got {got}"
        )
    tensors = {
        name: arena[offset : offset + nbytes].view(_TORCH_DTYPES[dtype]).view(shape)
        for name, shape, dtype, offset, nbytes in layout
    }
    return {name: t.numpy() for name, t in tensors.items()}, tensors


def _require_extension() -> Any:
    if _C is None:
        raise RuntimeError(
            f"the C++ packer uniter_fast._C is not importable ({EXTENSION_ERROR}); rebuild with "
            "`pip install -v -e .` (needs a C++17 compiler), or use backend='numpy'"
        )
    return _C


def _pack_cpp(
    examples: Sequence[dict], task: str, pad_multiple: int, out: str | Allocator | None
) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None]:
    plan = _require_extension().PackPlan(examples, task, pad_multiple)
    arrays, tensors = _allocate(plan.outputs(), out)
    plan.pack_into(arrays)
    arrays.update(plan.scalars())
    return arrays, tensors


def collate_cpp(
    examples: Sequence[dict],
    task: str,
    *,
    pad_multiple: int = PAD_MULTIPLE,
    out: str | Allocator | None = None,
) -> dict[str, Any]:
    """`collate_numpy`'s arrays (same names, shapes, dtypes and values), packed by `uniter_fast._C`.

    out: None for fresh NumPy arrays; "pinned", "shared" or an `Allocator` to pack into one
    torch buffer (the arrays are then NumPy views of it). Raises RuntimeError when the extension
    is not loaded; ValueError/TypeError naming the example and field for bad examples.
    """
    check_task(task, PACK_TASKS)
    return _pack_cpp(examples, task, pad_multiple, out)[0]


def _warn_fallback_once() -> None:
    global _fallback_warned
    if not _fallback_warned:
        _fallback_warned = True
        logger.warning(
            "the C++ packer uniter_fast._C is not available (%s): collate falls back to the "
            "NumPy packer (the same batches, up to 4x slower, holding the GIL). Rebuild it with "
            "`pip install -v -e .` (needs a C++17 compiler such as g++); set "
            "UNITER_FAST_REQUIRE_EXT=1 to make a failed build fatal.",
            EXTENSION_ERROR,
        )


def collate(
    examples: Sequence[dict],
    task: str,
    *,
    out: str | Allocator | None = None,
    backend: str = "auto",
) -> Batch:
    """Pack examples (schema in `uniter_fast.data.schema`) into a `Batch` of CPU tensors.

    out: where the tensors live. None: over fresh NumPy arrays. "pinned": one page-locked buffer
        (needs CUDA or another accelerator; for non_blocking copies to it). "shared": one
        shared-memory buffer (a DataLoader worker's batch then reaches the main process without
        a copy). A callable `alloc(nbytes) -> uint8 CPU tensor` for anything else.
    backend: "auto" (the C++ packer when loaded, else NumPy with one warning), "cpp" (raise if
        the extension is missing) or "numpy" (`collate_numpy`, the oracle).

    The layout is `collate_numpy`'s; both backends give equal batches. The downstream tasks
    ("vqa", "ve", "nlvr2", "nlvr2-triplet") are packed by `uniter_fast.data.downstream`.
    """
    if task in DOWNSTREAM_TASKS:
        from .downstream import collate_downstream

        return collate_downstream(examples, task, out=out, backend=backend)
    check_task(task, PACK_TASKS)
    types = txt_type_ids(examples)
    if backend not in ("auto", "cpp", "numpy"):
        raise ValueError(f"collate: backend must be 'auto', 'cpp' or 'numpy', got {backend!r}")
    if backend == "cpp" or (backend == "auto" and _C is not None):
        arrays, tensors = _pack_cpp(examples, task, PAD_MULTIPLE, out)
    else:
        if backend == "auto":
            _warn_fallback_once()
        arrays = collate_numpy(examples, task)
        tensors = None
        if out is not None:
            specs = [
                (k, v.shape, v.dtype.name) for k, v in arrays.items() if isinstance(v, np.ndarray)
            ]
            views, tensors = _allocate(specs, out)
            for name, view in views.items():
                np.copyto(view, arrays[name])
    batch = Batch.from_numpy(task, {**arrays, **tensors} if tensors else arrays)
    return with_arrays(batch, {"txt_type_ids": types} if types is not None else {}, out)


def txt_type_ids(examples: Sequence[dict]) -> np.ndarray | None:
    """The examples' `txt_type_ids` (one type per token of `input_ids`) concatenated in packing
    order, or None when no example has them (all text is type 0). All or none must have them."""
    have = [isinstance(ex, dict) and "txt_type_ids" in ex for ex in examples]
    if not any(have):
        return None
    if not all(have):
        missing = have.index(False)
        raise ValueError(
            f"example {missing}: missing field 'txt_type_ids' (other examples of the batch have "
            "it: give it for all examples or none)"
        )
    parts = []
    for i, ex in enumerate(examples):
        t = np.asarray(ex["txt_type_ids"])
        n = len(np.asarray(_field(ex, i, "input_ids")))
        if t.ndim != 1 or t.shape[0] != n or t.dtype.kind not in "iu":
            raise ValueError(
                f"example {i}: txt_type_ids must be {n} integers (one per input_ids token), got "
                f"shape {t.shape} dtype {t.dtype}"
            )
        if t.size and (t.min() < 0 or t.max() > 15):
            raise ValueError(f"example {i}: txt_type_ids must lie in [0, 15]")
        parts.append(t.astype(np.int64, copy=False))
    return np.concatenate(parts)


def with_arrays(batch: Batch, extra: dict[str, np.ndarray], out) -> Batch:
    """`batch` with more fields from NumPy arrays, in `out`'s kind of memory (see `collate`)."""
    if not extra:
        return batch
    if out is None:
        tensors = {k: torch.from_numpy(v) for k, v in extra.items()}
    else:
        views, tensors = _allocate([(k, v.shape, v.dtype.name) for k, v in extra.items()], out)
        for name, view in views.items():
            np.copyto(view, extra[name])
    return dataclasses.replace(batch, **tensors)
