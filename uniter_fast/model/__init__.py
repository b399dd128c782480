"""The UNITER network over packed batches."""

from .attention import (
    ATTENTION_BACKENDS,
    VARLEN_DROPOUT,
    AttentionChoice,
    AttentionLayout,
    SelfAttention,
    resolve_attention,
)
from .downstream import (
    NLVR2_VARIANTS,
    UniterForDownstream,
    UniterForNlvr2,
    UniterForReferringExpressions,
    UniterForRetrieval,
    UniterForVisualEntailment,
    UniterForVqa,
)
from .pretrain import UniterForPretraining, UniterModel

__all__ = [
    "ATTENTION_BACKENDS",
    "VARLEN_DROPOUT",
    "AttentionChoice",
    "AttentionLayout",
    "NLVR2_VARIANTS",
    "SelfAttention",
    "UniterForDownstream",
    "UniterForNlvr2",
    "UniterForPretraining",
    "UniterForReferringExpressions",
    "UniterForRetrieval",
    "UniterForVisualEntailment",
    "UniterForVqa",
    "UniterModel",
    "resolve_attention",
]
