"""Self-attention over packed sequences.

The encoder keeps hidden states packed, `(N, hidden)` with no padding, so every matrix product
runs on real positions only. Attention is the one place where sequences must be kept apart; the
backend that runs everywhere gathers the packed rows into a padded view through the collator's
`pad_index`, runs `scaled_dot_product_attention` with a key-padding mask, and scatters back
through `unpad_index`. Varlen backends (flash-attn, PyTorch's varlen attention) slot in here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import UniterConfig
from ..ops import gather_padded


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


class SelfAttention(nn.Module):
    """Multi-head self-attention with one fused QKV projection.

    `qkv.weight` is `[query; key; value]` stacked on the output dimension, so the reference's
    three `query/key/value` matrices map to it by concatenation (see `uniter_fast.convert`).
    """

    def __init__(self, config: UniterConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.dropout_p = config.attention_probs_dropout_prob
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)

    def forward(self, x: torch.Tensor, layout: AttentionLayout) -> torch.Tensor:
        """x: (N, hidden) -> context (N, hidden), before the output projection."""
        qkv = layout.pad(self.qkv(x))  # [B, L, 3H]
        b, length, _ = qkv.shape
        q, k, v = qkv.view(b, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        ctx = F.scaled_dot_product_attention(
            q, k, v, attn_mask=layout.key_mask, dropout_p=self.dropout_p if self.training else 0.0
        )  # [B, heads, L, head_dim]
        return layout.unpad(ctx.transpose(1, 2).reshape(b, length, -1))
