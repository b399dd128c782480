"""Example builders for the pretraining tasks, and the task mixer.

Each builder turns one (caption, image) pair into an example dict (see `uniter_fast.data.schema`)
using only the `numpy.random.Generator` it is given, so a seeded run is reproducible:

    rng = np.random.default_rng(0)
    example = build_example("mlm", record.captions[0], record, rng)
"""

from __future__ import annotations

import numpy as np

from ..data.schema import BERT_BASE_CASED, MRM_TASKS, Vocab, check_task
from ..data.shards import ImageRecord
from .itm import NegativeImageSampler, build_itm_example
from .mix import TaskMixer
from .mlm import build_mlm_example, mask_tokens
from .mrm import build_mrm_example, mask_regions

__all__ = [
    "NegativeImageSampler",
    "TaskMixer",
    "build_example",
    "build_itm_example",
    "build_mlm_example",
    "build_mrm_example",
    "mask_regions",
    "mask_tokens",
]


def build_example(
    task: str,
    caption: np.ndarray,
    image: ImageRecord,
    rng: np.random.Generator,
    *,
    vocab: Vocab = BERT_BASE_CASED,
    negatives: NegativeImageSampler | None = None,
) -> dict:
    """The example of `task` for one pair: mlm, mrfr/mrc/mrckl (one MRM example), or itm
    (which needs `negatives`)."""
    check_task(task)
    if task == "mlm":
        return build_mlm_example(caption, image, rng, vocab)
    if task in MRM_TASKS:
        return build_mrm_example(caption, image, rng, vocab)
    if negatives is None:
        raise ValueError("build_example('itm', ...) needs negatives=NegativeImageSampler(...)")
    return build_itm_example(caption, image, rng, negatives, vocab)
