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
    UniterForVcr,
    UniterForVisualEntailment,
    UniterForVqa,
)
from .pretrain import UniterForPretraining, UniterForVcrPretraining, UniterModel

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
    "UniterForVcr",
    "UniterForVcrPretraining",
    "UniterForVisualEntailment",
    "UniterForVqa",
    "UniterModel",
    "resolve_attention",
]
