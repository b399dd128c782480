"""Post-LayerNorm BERT encoder over packed hidden states, and the pooler.

Module names follow the reference (`attention.self`, `attention.output.dense`, ...) so that
checkpoint keys map one to one, the fused `attention.self.qkv` aside. The encoder owns the
attention-backend request and resolves it for the device its parameters are on (see
`uniter_fast.model.attention`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import UniterConfig
from .attention import (
    AttentionChoice,
    AttentionLayout,
    SelfAttention,
    check_attention_request,
    resolve_attention,
)


class DenseLayerNorm(nn.Module):
    """LayerNorm(dropout(dense(x)) + residual): the output block of attention and feed-forward."""

    def __init__(self, in_features: int, config: UniterConfig):
        super().__init__()
        self.dense = nn.Linear(in_features, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class Attention(nn.Module):
    def __init__(self, config: UniterConfig):
        super().__init__()
        self.self = SelfAttention(config)
        self.output = DenseLayerNorm(config.hidden_size, config)

    def forward(self, x: torch.Tensor, layout: AttentionLayout) -> torch.Tensor:
        return self.output(self.self(x, layout), x)


class Intermediate(nn.Module):
    def __init__(self, config: UniterConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))  # erf form, as the reference


class Layer(nn.Module):
    def __init__(self, config: UniterConfig):
        super().__init__()
        self.attention = Attention(config)
        self.intermediate = Intermediate(config)
        self.output = DenseLayerNorm(config.intermediate_size, config)

    def forward(self, x: torch.Tensor, layout: AttentionLayout) -> torch.Tensor:
        x = self.attention(x, layout)
        return self.output(self.intermediate(x), x)


class Encoder(nn.Module):
    """The layers, and the attention backend they share.

    attention: one of ATTENTION_BACKENDS; varlen_dropout: "keep" or "drop" (see
    `uniter_fast.model.attention`). The request is resolved now for the CPU and again whenever
    `.to()`/`.cuda()` moves the parameters to another device type; a request that cannot run
    where the parameters are ("flash" or "varlen" on the CPU) leaves `attention_choice` None
    until they move, and a forward raises why.
    """

    def __init__(
        self, config: UniterConfig, *, attention: str = "auto", varlen_dropout: str = "keep"
    ):
        super().__init__()
        check_attention_request(attention, varlen_dropout)
        self.dropout_p = config.attention_probs_dropout_prob
        self.layer = nn.ModuleList(Layer(config) for _ in range(config.num_hidden_layers))
        self.attention_request = attention
        self.varlen_dropout = varlen_dropout
        self.attention_dtype: torch.dtype | None = None
        self.attention_choice: AttentionChoice | None = None
        self._resolved_for: str | None = None  # the device type of the last resolution
        self._resolve_where_parameters_are()

    def forward(self, x: torch.Tensor, layout: AttentionLayout) -> torch.Tensor:
        """x: (N, hidden) packed -> (N, hidden)."""
        for layer in self.layer:
            x = layer(x, layout)
        return x

    def set_attention(
        self,
        requested: str | None = None,
        device: torch.device | str | None = None,
        varlen_dropout: str | None = None,
        *,
        dtype: torch.dtype | None = None,
    ) -> AttentionChoice:
        """Resolve the attention backend now and use it from the next forward.

        requested / varlen_dropout: None keeps the current request. device: where attention
        will run; None means where the parameters are. dtype: the dtype attention runs in (the
        autocast dtype, else the parameters'); None when not known. Raises ValueError where the
        request cannot run (the current choice is then unchanged).
        """
        requested = self.attention_request if requested is None else requested
        varlen_dropout = self.varlen_dropout if varlen_dropout is None else varlen_dropout
        device = self._parameter_device() if device is None else torch.device(device)
        choice = resolve_attention(
            requested,
            device,
            dropout_p=self.dropout_p,
            varlen_dropout=varlen_dropout,
            dtype=dtype,
        )
        self.attention_request, self.varlen_dropout = requested, varlen_dropout
        self.attention_dtype = dtype
        self._resolved_for = device.type
        self._install(choice, None)
        return choice

    def _parameter_device(self) -> torch.device:
        return next(self.parameters()).device

    def _install(self, choice: AttentionChoice | None, pending: str | None) -> None:
        self.attention_choice = choice
        for module in self.modules():
            if isinstance(module, SelfAttention):
                module.attention_choice = choice
                module.pending = pending

    def _resolve_where_parameters_are(self) -> None:
        device = self._parameter_device()
        self._resolved_for = device.type
        try:
            choice = resolve_attention(
                self.attention_request,
                device,
                dropout_p=self.dropout_p,
                varlen_dropout=self.varlen_dropout,
                dtype=self.attention_dtype,
            )
        except ValueError as e:
            # Kept, not raised: models are built on the CPU and then moved to the GPU.
            self._install(None, f"{e} (the model is on {device}; it resolves again when moved)")
        else:
            self._install(choice, None)

    def _apply(self, fn, *args, **kwargs):
        # .to(), .cuda(), .cpu(), .half() all come through here; re-resolve on a device change.
        result = super()._apply(fn, *args, **kwargs)
        if self._parameter_device().type != self._resolved_for:
            self._resolve_where_parameters_are()
        return result


class Pooler(nn.Module):
    """tanh(dense(h)) on each sequence's first position ([CLS])."""

    def __init__(self, config: UniterConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden: torch.Tensor, cls_rows: torch.Tensor) -> torch.Tensor:
        """hidden: (N, hidden); cls_rows: (B,) -> (B, hidden)."""
        return torch.tanh(self.dense(hidden.index_select(0, cls_rows)))
