"""The UNITER network over packed batches."""

from .pretrain import UniterForPretraining, UniterModel

__all__ = ["UniterForPretraining", "UniterModel"]
