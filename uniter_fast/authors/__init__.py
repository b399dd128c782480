"""A faithful re-implementation of the authors' UNITER step, for tests and benchmarks only.

`model.UniterForPretraining` uses the reference's parameter layout, padded batches from
`collate.collate`, and `model.reduce_losses` reduces its outputs as the authors' trainer does.
"""

from . import collate, model

__all__ = ["collate", "model"]
