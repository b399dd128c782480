"""One layer's, one head's attention probabilities over a packed sequence.

The encoder's attention backends (`uniter_fast.model.attention`) never materialise the
probabilities (flash, varlen and SDPA fuse them away), so they are recomputed here: a forward
pre-hook on the layer captures the hidden states entering it, and the layer's own fused QKV
projection gives that head's queries and keys, `softmax(q k^T / sqrt(d))` over one sequence (no
padding, no mask: every position of a pair attends to every other). Eval mode, so no dropout. A
forward hook on the layer's self-attention captures its context output too, so that the
recomputation can be checked: probabilities times the head's values must give that context.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..data.schema import Batch
from .loading import InspectError


@dataclass
class HeadAttention:
    """probs: (L, L) query rows by key columns; values: (L, head_dim) the head's values;
    context: (L, head_dim) the head's slice of the layer's own attention output (before the
    output projection). `probs @ values` reproduces `context`."""

    probs: torch.Tensor
    values: torch.Tensor
    context: torch.Tensor

    def max_error(self) -> float:
        """Largest |probs @ values - context|: the recomputation's check."""
        return float((self.probs @ self.values - self.context).abs().max())


def head_attention(model, batch: Batch, layer: int, head: int, b: int = 0) -> HeadAttention:
    """Attention of `head` in `layer` (0-based) over packed sequence `b` of `batch`."""
    encoder = model.uniter.encoder
    layers = len(encoder.layer)
    if not 0 <= layer < layers:
        raise InspectError(f"--layer {layer}: the model has layers 0..{layers - 1}")
    block = encoder.layer[layer]
    attn = block.attention.self
    heads, head_dim = attn.num_heads, attn.head_dim
    if not 0 <= head < heads:
        raise InspectError(f"--head {head}: the model has heads 0..{heads - 1}")

    captured: dict[str, torch.Tensor] = {}

    def keep_input(module, args):
        captured["input"] = args[0]

    def keep_context(module, args, output):
        captured["context"] = output

    hooks = [
        block.register_forward_pre_hook(keep_input),
        attn.register_forward_hook(keep_context),
    ]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model.uniter(batch)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)

    rows = slice(int(batch.cu_seqlens[b]), int(batch.cu_seqlens[b + 1]))
    with torch.no_grad():
        x = captured["input"][rows]
        # qkv.weight is [query; key; value] stacked on the output dimension (SelfAttention).
        qkv = attn.qkv(x).view(x.shape[0], 3, heads, head_dim).float()
        q, k, v = qkv[:, 0, head], qkv[:, 1, head], qkv[:, 2, head]
        probs = (q @ k.T / math.sqrt(head_dim)).softmax(dim=-1)
        context = captured["context"][rows, head * head_dim : (head + 1) * head_dim].float()
    return HeadAttention(probs=probs, values=v, context=context)
