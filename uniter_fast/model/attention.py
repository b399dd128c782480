"""Self-attention over packed sequences, and the choice of attention backend.

The encoder keeps hidden states packed, `(N, hidden)` with no padding, so every matrix product
runs on real positions only. Attention is the one place where sequences must be kept apart.
Four backends do it; one is chosen once, at start-up, by `resolve_attention`:

- "flash": `flash_attn.flash_attn_varlen_func` on the packed `(N, heads, head_dim)` rows with
  `cu_seqlens`. Needs flash-attn (optional, imported lazily), CUDA (compute capability 8.0+) and
  fp16/bf16 activations. Applies attention dropout itself.
- "varlen": PyTorch's `torch.nn.attention.varlen.varlen_attn`, same packed layout, CUDA only.
  It has no attention-dropout argument while the recipe trains with attention dropout (0.1), so
  `varlen_dropout` says what to do in training: "keep" (default) keeps the recipe and runs the
  training forwards that need dropout through "sdpa" (evaluation, and p == 0, stay on varlen);
  "drop" runs varlen in training too, with attention dropout off (a change from the recipe that
  `AttentionChoice.warning` spells out for the caller to log).
- "sdpa": gathers the packed rows into a padded view through the collator's `pad_index`, runs
  `scaled_dot_product_attention` with a key-padding mask, scatters back through `unpad_index`.
  Any device; applies dropout.
- "eager": the reference's plain math on the padded view, `softmax(QK^T/sqrt(d) + mask) V` with
  -10000 added at padded keys and dropout on the probabilities. Slow; the oracle in the tests.
- "auto": flash if usable, else varlen if usable, else sdpa.

When the choice is made: `UniterModel` resolves its request for the device its parameters are on,
at construction (the CPU, where "auto" gives sdpa) and again whenever `.to()`/`.cuda()` moves it
to another device type, so `UniterForPretraining(cfg).cuda()` runs a varlen backend. A request
that cannot run where the model is ("flash" or "varlen" on the CPU) stays pending: the model
keeps it, `attention_choice` is None, and a forward raises the reason. The trainer calls
`model.set_attention(requested, device, varlen_dropout, dtype=...)` after moving the model and
logs `model.attention_choice.describe()` and `.warning`. Nothing is probed per call: a forward
reads the stored choice, `self.training`, and the activations' dtype (flash and varlen run
fp16/bf16 only; float32/float64 activations, e.g. a CUDA model evaluated outside autocast, take
sdpa, and `describe()` says so unless the choice was resolved for a half-precision dtype).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import UniterConfig
from ..ops import gather_padded

ATTENTION_BACKENDS = ("auto", "flash", "varlen", "sdpa", "eager")
VARLEN_DROPOUT = ("keep", "drop")

# The dtypes the flash and varlen kernels take.
_HALF = (torch.float16, torch.bfloat16)

_NAMES = {
    "flash": "flash-attn varlen",
    "varlen": "torch varlen",
    "sdpa": "sdpa padded",
    "eager": "eager reference",
}


@dataclass
class AttentionLayout:
    """How packed rows map to sequences; built once per forward, shared by every layer.

    pad_index: (B, Lpad) packed row of each padded position, N at padding.
    unpad_index: (N,) flat padded position of each packed row.
    key_mask: (B, 1, 1, Lpad) bool, True at real positions (attention allowed).
    cu_seqlens: (B+1,) int32; max_seqlen: Python int.
    """

    pad_index: torch.Tensor
    unpad_index: torch.Tensor
    key_mask: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int

    @classmethod
    def from_batch(cls, batch, num_rows: int) -> AttentionLayout:
        return cls(
            pad_index=batch.pad_index,
            unpad_index=batch.unpad_index,
            key_mask=(batch.pad_index < num_rows)[:, None, None, :],
            cu_seqlens=batch.cu_seqlens,
            max_seqlen=batch.max_seqlen,
        )

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """(N, F) -> (B, Lpad, F), zeros at padding."""
        return gather_padded(x, self.pad_index)

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        """(B, Lpad, F) -> (N, F)."""
        return x.reshape(-1, x.shape[-1]).index_select(0, self.unpad_index)


# ---------------------------------------------------------------------------------------------
# Availability. Module-level functions so that tests can monkeypatch them.


@functools.cache
def _import_flash() -> tuple[Callable | None, str | None]:
    """(flash_attn_varlen_func, None), or (None, why it does not import)."""
    try:
        from flash_attn import flash_attn_varlen_func
    except Exception as e:  # ImportError, or a broken build failing to load its CUDA library
        return None, f"{type(e).__name__}: {e}"
    return flash_attn_varlen_func, None


@functools.cache
def _import_varlen() -> tuple[Callable | None, str | None]:
    """(torch.nn.attention.varlen.varlen_attn, None), or (None, why this torch lacks it)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except Exception as e:
        return None, f"{type(e).__name__}: {e}"
    return varlen_attn, None


def _flash_available() -> bool:
    """flash-attn imports (it is optional: `pip install uniter-fast[flash]`)."""
    return _import_flash()[0] is not None


def _varlen_available() -> bool:
    """This torch has `torch.nn.attention.varlen.varlen_attn`."""
    return _import_varlen()[0] is not None


def _device_problem(device: torch.device) -> str | None:
    """Why the flash and varlen kernels cannot run on `device`, or None when they can."""
    if device.type != "cuda":
        return f"CUDA only (the device is {device.type})"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return f"needs compute capability 8.0 or newer (this GPU is {major}.{minor})"
    return None


def _flash_attn(q, k, v, cu_seqlens, max_seqlen, dropout_p):
    return _import_flash()[0](
        q,
        k,
        v,
        cu_seqlens,
        cu_seqlens,
        max_seqlen,
        max_seqlen,
        dropout_p=dropout_p,
        softmax_scale=None,
        causal=False,
    )


def _varlen_attn(q, k, v, cu_seqlens, max_seqlen):
    # Positional only: the keywords after these seven differ between torch versions (2.11 has
    # `is_causal`, 2.13 `window_size`); their defaults are non-causal, full attention.
    return _import_varlen()[0](q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen)


# ---------------------------------------------------------------------------------------------
# The choice.


@dataclass(frozen=True)
class AttentionChoice:
    """Which backend runs attention, made once by `resolve_attention`.

    requested: what was asked for ("auto", ...). backend: what it resolved to ("flash",
    "varlen", "sdpa", "eager"). train_backend / eval_backend: what runs in training and in
    evaluation forwards (they differ for varlen with varlen_dropout "keep" and dropout on).
    train_dropout: whether training forwards apply attention dropout (False only when
    varlen_dropout "drop" switched it off). device: the device it was resolved for.
    dtype: the activation dtype it was resolved for, None when not given. dropout_p: the
    recipe's attention dropout. varlen_dropout: the policy. reason: why this backend, for the log.
    warning: a change from the recipe the caller should log as a warning, else None.
    """

    requested: str
    backend: str
    train_backend: str
    eval_backend: str
    train_dropout: bool
    device: str
    dtype: str | None
    dropout_p: float
    varlen_dropout: str
    reason: str = ""
    warning: str | None = None

    def describe(self) -> str:
        """One line for the logs, e.g. "torch varlen (eval); sdpa padded (training: ...)"."""
        p = f"{self.dropout_p:g}"
        if self.train_backend != self.eval_backend:
            text = (
                f"{_NAMES[self.eval_backend]} (eval); {_NAMES[self.train_backend]} (training: "
                f"torch varlen has no attention dropout, recipe has {p}; "
                f"varlen_dropout: drop trains without it)"
            )
        elif not self.train_dropout:
            text = (
                f"{_NAMES[self.backend]} (training and eval; attention dropout {p} of the recipe "
                f"OFF in training: varlen_dropout=drop)"
            )
        else:
            text = _NAMES[self.backend]
        if self.backend in ("flash", "varlen") and self.dtype is None:
            text += "; float32/float64 activations take sdpa padded"
        if self.reason and self.reason != "requested":
            text += f" [{self.reason}]"
        return text


def check_attention_request(requested: str, varlen_dropout: str) -> None:
    """Raise ValueError unless both names are known (usable or not here)."""
    if requested not in ATTENTION_BACKENDS:
        raise ValueError(
            f"attention backend must be one of {', '.join(ATTENTION_BACKENDS)}, got {requested!r}"
        )
    if varlen_dropout not in VARLEN_DROPOUT:
        raise ValueError(
            f"varlen_dropout must be one of {', '.join(VARLEN_DROPOUT)}, got {varlen_dropout!r}"
        )


def _unusable(backend: str, device: torch.device, dtype: torch.dtype | None) -> str | None:
    """Why `backend` ("flash" or "varlen") cannot run on `device` with `dtype`, or None."""
    # The device first: on a CPU-only machine, flash-attn is not even imported.
    problem = _device_problem(device)
    if problem is not None:
        return problem
    if dtype is not None and dtype not in _HALF:
        return f"fp16/bf16 only (the activations are {dtype})"
    if backend == "flash" and not _flash_available():
        return f"flash-attn is not importable ({_import_flash()[1]})"
    if backend == "varlen" and not _varlen_available():
        return f"torch {torch.__version__} has no torch.nn.attention.varlen.varlen_attn"
    return None


def resolve_attention(
    requested: str,
    device: torch.device | str,
    *,
    dropout_p: float,
    varlen_dropout: str = "keep",
    dtype: torch.dtype | None = None,
) -> AttentionChoice:
    """Choose the attention backend for `device`, once.

    requested: one of ATTENTION_BACKENDS. dropout_p: the attention dropout of the recipe
    (`config.attention_probs_dropout_prob`). varlen_dropout: "keep" or "drop", what torch varlen
    does in training when dropout_p > 0 (module docstring). dtype: the dtype attention will run
    in (the autocast dtype, else the parameters'); float32 rules flash and varlen out, None
    leaves them in and float32 activations then take sdpa at run time.

    Raises ValueError for an unknown name, or for "flash"/"varlen" where they cannot run.
    """
    check_attention_request(requested, varlen_dropout)
    device = torch.device(device)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    common = dict(
        requested=requested,
        device=str(device),
        dtype=None if dtype is None else str(dtype).removeprefix("torch."),
        dropout_p=float(dropout_p),
        varlen_dropout=varlen_dropout,
    )

    if requested in ("flash", "varlen"):
        problem = _unusable(requested, device, dtype)
        if problem is not None:
            other = "varlen, sdpa or auto" if requested == "flash" else "sdpa or auto"
            raise ValueError(
                f"attention backend {requested!r} cannot run here: {problem}; use {other}"
            )
        backend, reason = requested, "requested"
    elif requested == "auto":
        flash_problem = _unusable("flash", device, dtype)
        varlen_problem = _unusable("varlen", device, dtype) if flash_problem else None
        if flash_problem is None:
            backend, reason = "flash", "auto"
        elif varlen_problem is None:
            backend, reason = "varlen", f"auto; flash-attn: {flash_problem}"
        elif varlen_problem == flash_problem:
            backend, reason = "sdpa", f"auto; flash-attn and torch varlen: {flash_problem}"
        else:
            backend = "sdpa"
            reason = f"auto; flash-attn: {flash_problem}; torch varlen: {varlen_problem}"
    else:
        backend, reason = requested, "requested"

    if backend != "varlen" or dropout_p == 0:
        return AttentionChoice(
            backend=backend,
            train_backend=backend,
            eval_backend=backend,
            train_dropout=True,
            reason=reason,
            **common,
        )
    if varlen_dropout == "keep":
        return AttentionChoice(
            backend="varlen",
            train_backend="sdpa",
            eval_backend="varlen",
            train_dropout=True,
            reason=reason,
            **common,
        )
    return AttentionChoice(
        backend="varlen",
        train_backend="varlen",
        eval_backend="varlen",
        train_dropout=False,
        reason=reason,
        warning=(
            f"attention dropout is off in training (varlen_dropout=drop): torch varlen has no "
            f"attention dropout, the recipe has {dropout_p:g}; varlen_dropout=keep keeps it"
        ),
        **common,
    )


# ---------------------------------------------------------------------------------------------
# The backends. Each maps qkv (N, 3 * hidden) packed to the context (N, hidden).


def _split_packed(qkv: torch.Tensor, heads: int, head_dim: int):
    """(N, 3H) -> q, k, v, each (N, heads, head_dim) (views; the last dim stays contiguous)."""
    return qkv.view(qkv.shape[0], 3, heads, head_dim).unbind(1)


def _split_padded(qkv: torch.Tensor, layout: AttentionLayout, heads: int, head_dim: int):
    """(N, 3H) -> q, k, v, each (B, heads, Lpad, head_dim), zeros at padding."""
    padded = layout.pad(qkv)
    b, length, _ = padded.shape
    return padded.view(b, length, 3, heads, head_dim).permute(2, 0, 3, 1, 4)


def _merge_padded(ctx: torch.Tensor, layout: AttentionLayout) -> torch.Tensor:
    """(B, heads, Lpad, head_dim) -> (N, hidden)."""
    b, _, length, _ = ctx.shape
    return layout.unpad(ctx.transpose(1, 2).reshape(b, length, -1))


def attention_sdpa(
    qkv: torch.Tensor, layout: AttentionLayout, heads: int, head_dim: int, dropout_p: float
) -> torch.Tensor:
    q, k, v = _split_padded(qkv, layout, heads, head_dim)
    ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=layout.key_mask, dropout_p=dropout_p)
    return _merge_padded(ctx, layout)


def attention_eager(
    qkv: torch.Tensor, layout: AttentionLayout, heads: int, head_dim: int, dropout_p: float
) -> torch.Tensor:
    """The reference's computation: additive -10000 at padded keys, dropout on probabilities."""
    q, k, v = _split_padded(qkv, layout, heads, head_dim)
    scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim)
    scores = scores + (1.0 - layout.key_mask.to(scores.dtype)) * -10000.0
    probs = F.dropout(scores.softmax(dim=-1), p=dropout_p, training=dropout_p > 0)
    return _merge_padded(probs @ v, layout)


def attention_flash(
    qkv: torch.Tensor, layout: AttentionLayout, heads: int, head_dim: int, dropout_p: float
) -> torch.Tensor:
    q, k, v = _split_packed(qkv, heads, head_dim)
    ctx = _flash_attn(q, k, v, layout.cu_seqlens, layout.max_seqlen, dropout_p)
    return ctx.reshape(qkv.shape[0], heads * head_dim)


def attention_varlen(
    qkv: torch.Tensor, layout: AttentionLayout, heads: int, head_dim: int, dropout_p: float
) -> torch.Tensor:
    if dropout_p:
        raise ValueError(f"torch varlen attention has no dropout, got dropout_p={dropout_p}")
    q, k, v = _split_packed(qkv, heads, head_dim)
    ctx = _varlen_attn(q, k, v, layout.cu_seqlens, layout.max_seqlen)
    return ctx.reshape(qkv.shape[0], heads * head_dim)


_RUN = {
    "flash": attention_flash,
    "varlen": attention_varlen,
    "sdpa": attention_sdpa,
    "eager": attention_eager,
}


class SelfAttention(nn.Module):
    """Multi-head self-attention with one fused QKV projection.

    `qkv.weight` is `[query; key; value]` stacked on the output dimension, so the reference's
    three `query/key/value` matrices map to it by concatenation (see `uniter_fast.convert`).
    choice: the backend (`resolve_attention`); None resolves "auto" for the CPU (sdpa). The
    owning model replaces `attention_choice` when it resolves again; `pending` holds why no
    backend can run (then `attention_choice` is None and a forward raises it).
    """

    def __init__(self, config: UniterConfig, choice: AttentionChoice | None = None):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.dropout_p = config.attention_probs_dropout_prob
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        if choice is None:
            choice = resolve_attention("auto", "cpu", dropout_p=self.dropout_p)
        self.attention_choice: AttentionChoice | None = choice
        self.pending: str | None = None

    def forward(self, x: torch.Tensor, layout: AttentionLayout) -> torch.Tensor:
        """x: (N, hidden) -> context (N, hidden), before the output projection."""
        choice = self.attention_choice
        if choice is None:
            raise ValueError(self.pending or "no attention backend chosen")
        qkv = self.qkv(x)  # (N, 3H)
        if self.training:
            backend = choice.train_backend
            p = self.dropout_p if choice.train_dropout else 0.0
        else:
            backend, p = choice.eval_backend, 0.0
        if backend in ("flash", "varlen") and qkv.dtype not in _HALF:
            backend = "sdpa"  # the kernels run fp16/bf16 only (see describe())
        return _RUN[backend](qkv, layout, self.num_heads, self.head_dim, p)
