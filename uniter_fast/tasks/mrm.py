"""Masked region modelling (MRFR, MRC, MRC-kl): mask regions, keep the text whole.

The three MRM tasks share one example: the builder only decides which regions are masked.
Features stay unmasked in the example; the collator zeroes the masked rows (and keeps the
originals as MRFR targets), and the model adds the mask embedding to them.
"""

from __future__ import annotations

import numpy as np

from ..data.schema import BERT_BASE_CASED, Vocab
from ..data.shards import ImageRecord
from .mlm import check_prob, wrap_caption

__all__ = ["build_mrm_example", "mask_regions"]


def mask_regions(num_regions: int, rng: np.random.Generator, prob: float = 0.15) -> np.ndarray:
    """bool [num_regions]: each region masked with probability `prob`; if none was drawn,
    exactly one uniformly chosen region is (the reference's `_get_img_mask`)."""
    if isinstance(num_regions, bool) or not isinstance(num_regions, (int, np.integer)):
        raise TypeError(f"num_regions must be an int, got {type(num_regions).__name__}")
    if num_regions < 1:
        raise ValueError(f"num_regions must be >= 1, got {num_regions}")
    check_prob("prob", prob)
    mask = rng.random(num_regions) < prob
    if not mask.any():
        mask[rng.integers(num_regions)] = True
    return mask


def build_mrm_example(
    caption: np.ndarray,
    image: ImageRecord,
    rng: np.random.Generator,
    vocab: Vocab = BERT_BASE_CASED,
    *,
    prob: float = 0.15,
) -> dict:
    """An MRM example (for mrfr, mrc and mrckl alike).

    input_ids int64 [L+2] = [CLS] caption [SEP] (not masked); img_feat [n, D] (unmasked, shared
    with `image`); img_loc [n, 7]; img_mask bool [n] (at least one True); soft_labels [n, 1601].
    """
    return {
        "input_ids": wrap_caption(caption, vocab),
        "img_feat": image.feat,
        "img_loc": image.loc,
        "img_mask": mask_regions(image.num_regions, rng, prob),
        "soft_labels": image.soft,
    }
