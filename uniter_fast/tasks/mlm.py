"""Masked language modelling (MLM): mask caption tokens, keep the image whole.

The rule is the reference's `random_word`, vectorised: one uniform draw u per token; the token
is a target when u < prob, and u / prob then splits the targets 80% [MASK] / 10% random word /
10% unchanged. When no token is drawn, the first token becomes a [MASK] target, so every caption
has at least one target. [CLS] and [SEP] are added after masking and are never targets.
"""

from __future__ import annotations

import numpy as np

from ..data.schema import BERT_BASE_CASED, Vocab
from ..data.shards import ImageRecord

__all__ = ["IGNORE", "build_mlm_example", "check_prob", "mask_tokens", "wrap_caption"]

IGNORE = -1  # label of positions that are not MLM targets


def check_prob(name: str, prob: float) -> None:
    """Raise ValueError unless 0 < prob <= 1 (shared by the task builders)."""
    if not isinstance(prob, (int, float, np.floating)) or not 0.0 < prob <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {prob!r}")


def wrap_caption(ids: np.ndarray, vocab: Vocab = BERT_BASE_CASED) -> np.ndarray:
    """[CLS] ids [SEP] as int64 [L+2]; `ids` must be a non-empty 1-D int array."""
    ids = np.asarray(ids)
    if ids.ndim != 1 or ids.size == 0 or ids.dtype.kind not in "iu":
        raise ValueError(
            f"a caption must be a non-empty 1-D int array, got dtype {ids.dtype} shape {ids.shape}"
        )
    out = np.empty(ids.size + 2, dtype=np.int64)
    out[0] = vocab.cls_id
    out[1:-1] = ids
    out[-1] = vocab.sep_id
    return out


def mask_tokens(
    ids: np.ndarray,
    rng: np.random.Generator,
    vocab: Vocab = BERT_BASE_CASED,
    prob: float = 0.15,
) -> tuple[np.ndarray, np.ndarray]:
    """Mask a raw caption (no [CLS]/[SEP]).

    ids: int [L], L >= 1.
    Returns (masked ids int64 [L], labels int64 [L]): labels hold the original id at the target
    positions and -1 elsewhere.
    """
    ids = np.asarray(ids)
    if ids.ndim != 1 or ids.size == 0 or ids.dtype.kind not in "iu":
        raise ValueError(
            "mask_tokens expects a non-empty 1-D int array, "
            f"got dtype {ids.dtype} shape {ids.shape}"
        )
    check_prob("prob", prob)
    u = rng.random(ids.size)
    chosen = u < prob
    split = u / prob
    to_mask = chosen & (split < 0.8)
    to_random = chosen & (split >= 0.8) & (split < 0.9)
    if not chosen.any():
        chosen[0] = to_mask[0] = True
    masked = ids.astype(np.int64)  # a copy: the image record's caption stays intact
    labels = np.where(chosen, masked, IGNORE)
    masked[to_mask] = vocab.mask_id
    masked[to_random] = rng.integers(vocab.word_start, vocab.word_end, size=int(to_random.sum()))
    return masked, labels


def build_mlm_example(
    caption: np.ndarray,
    image: ImageRecord,
    rng: np.random.Generator,
    vocab: Vocab = BERT_BASE_CASED,
    *,
    prob: float = 0.15,
) -> dict:
    """An MLM example: input_ids int64 [L+2] = [CLS] masked [SEP], txt_labels int64 [L+2]
    (-1 at [CLS]/[SEP] and non-targets), img_feat [n, D] and img_loc [n, 7] of `image` (shared,
    not copied)."""
    masked, labels = mask_tokens(caption, rng, vocab, prob)
    return {
        "input_ids": wrap_caption(masked, vocab),
        "txt_labels": np.concatenate([[IGNORE], labels, [IGNORE]]).astype(np.int64),
        "img_feat": image.feat,
        "img_loc": image.loc,
    }
