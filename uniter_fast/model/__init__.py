"""The UNITER network over packed batches."""

from .attention import (
    ATTENTION_BACKENDS,
    VARLEN_DROPOUT,
    AttentionChoice,
    AttentionLayout,
    SelfAttention,
    resolve_attention,
)
from .pretrain import UniterForPretraining, UniterModel

__all__ = [
    "ATTENTION_BACKENDS",
    "VARLEN_DROPOUT",
    "AttentionChoice",
    "AttentionLayout",
    "SelfAttention",
    "UniterForPretraining",
    "UniterModel",
    "resolve_attention",
]
