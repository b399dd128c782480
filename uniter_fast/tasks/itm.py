"""Image-text matching (ITM, with WRA on the same batches): swap the image half of the time.

Negatives come from a buffer of recently seen images (the stream), not from a global index: a
streaming loader over shards has no random access to the whole corpus. The reference samples a
random other image of the whole dataset; over a buffer of a thousand images from shuffled shards
the negatives are as unrelated to the caption, which is what the task needs.
"""

from __future__ import annotations

import numpy as np

from ..data.schema import BERT_BASE_CASED, Vocab
from ..data.shards import ImageRecord
from .mlm import wrap_caption

__all__ = ["NegativeImageSampler", "build_itm_example"]

# Random draws tried before falling back to an exact scan; the fallback only matters when most
# of the buffer holds the positive image itself.
_REJECTION_TRIES = 8


class NegativeImageSampler:
    """A ring buffer of the last `capacity` images seen; negatives are drawn from it.

    `add` overwrites the oldest slot once the buffer is full (no randomness, so the buffer's
    content depends only on the stream); `sample` draws uniformly among the buffered entries whose
    key differs from the positive's, with the generator it is given.
    """

    def __init__(self, capacity: int = 1000) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, (int, np.integer)):
            raise TypeError(f"capacity must be an int, got {type(capacity).__name__}")
        # 1 is allowed (a buffer that never yields a negative is an error at `sample`, where
        # the caller knows whether ITM is in use at all).
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = int(capacity)
        self._images: list[ImageRecord] = []
        self._next = 0  # slot overwritten by the next add once full

    def __len__(self) -> int:
        return len(self._images)

    def add(self, image: ImageRecord) -> None:
        if not isinstance(image, ImageRecord):
            raise TypeError(f"add takes an ImageRecord, got {type(image).__name__}")
        if len(self._images) < self.capacity:
            self._images.append(image)
        else:
            self._images[self._next] = image
            self._next = (self._next + 1) % self.capacity

    def sample(self, rng: np.random.Generator, exclude_key: str) -> ImageRecord:
        """A buffered image whose key is not `exclude_key`, uniformly over such entries.

        Raises RuntimeError when the buffer holds no such image.
        """
        images = self._images
        if images:
            for _ in range(_REJECTION_TRIES):
                image = images[rng.integers(len(images))]
                if image.key != exclude_key:
                    return image
            others = [i for i, image in enumerate(images) if image.key != exclude_key]
            if others:
                return images[others[rng.integers(len(others))]]
        raise RuntimeError(
            f"no negative image for {exclude_key!r}: the buffer holds {len(images)} image(s) and "
            "none with another key (add more images to the sampler before building ITM examples)"
        )


def build_itm_example(
    caption: np.ndarray,
    image: ImageRecord,
    rng: np.random.Generator,
    negatives: NegativeImageSampler,
    vocab: Vocab = BERT_BASE_CASED,
    neg_prob: float = 0.5,
) -> dict:
    """An ITM example: with probability `neg_prob` the image is replaced by a buffered image
    with another key (itm_target 0), else it is kept (itm_target 1).

    input_ids int64 [L+2] = [CLS] caption [SEP]; img_feat [n, D] and img_loc [n, 7] of the
    chosen image (shared, not copied); itm_target int.
    """
    if not isinstance(negatives, NegativeImageSampler):
        raise TypeError(f"negatives must be a NegativeImageSampler, got {type(negatives).__name__}")
    if not 0.0 <= neg_prob <= 1.0:
        raise ValueError(f"neg_prob must be in [0, 1], got {neg_prob!r}")
    input_ids = wrap_caption(caption, vocab)
    target = 1
    if rng.random() < neg_prob:
        image = negatives.sample(rng, image.key)
        target = 0
    return {
        "input_ids": input_ids,
        "img_feat": image.feat,
        "img_loc": image.loc,
        "itm_target": target,
    }
