"""Post-LayerNorm BERT encoder over packed hidden states, and the pooler.

Module names follow the reference (`attention.self`, `attention.output.dense`, ...) so that
checkpoint keys map one to one, the fused `attention.self.qkv` aside.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import UniterConfig
from .attention import AttentionLayout, SelfAttention


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
    def __init__(self, config: UniterConfig):
        super().__init__()
        self.layer = nn.ModuleList(Layer(config) for _ in range(config.num_hidden_layers))

    def forward(self, x: torch.Tensor, layout: AttentionLayout) -> torch.Tensor:
        """x: (N, hidden) packed -> (N, hidden)."""
        for layer in self.layer:
            x = layer(x, layout)
        return x


class Pooler(nn.Module):
    """tanh(dense(h)) on each sequence's first position ([CLS])."""

    def __init__(self, config: UniterConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden: torch.Tensor, cls_rows: torch.Tensor) -> torch.Tensor:
        """hidden: (N, hidden); cls_rows: (B,) -> (B, hidden)."""
        return torch.tanh(self.dense(hidden.index_select(0, cls_rows)))
