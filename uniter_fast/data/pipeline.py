"""From shards to packed batches: the first, single-process version of the pipeline.

    shards --(resampled, shuffled)--> images --(one pair per caption)--> shuffle buffer
           --(task drawn by mix ratio)--> pairs up to the token budget --(task builder)--> examples
           --(collate)--> Batch

Everything is seeded: the same seed gives the same batches. The loader with DataLoader workers,
node/worker splits, the C++ packer and bad-sample accounting replaces this in the data issue; the
stages and their order stay.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from ..tasks import NegativeImageSampler, TaskMixer, build_example
from .collate import collate
from .schema import BERT_BASE_CASED, Batch, Vocab
from .shards import ImageRecord, iter_shard, list_shards


def pair_tokens(caption: np.ndarray, image: ImageRecord) -> int:
    """Real positions the pair occupies in a packed batch: [CLS] caption [SEP] then regions."""
    return len(caption) + 2 + image.num_regions


class PairStream:
    """Endless stream of (caption, image) pairs from one dataset's shards.

    Shards are drawn at random with replacement (resampled); each image yields one pair per
    caption; pairs pass through a shuffle buffer of `buffer_size`. Every image read is also offered
    to `negatives`, the pool ITM draws its other images from.
    """

    def __init__(
        self,
        urls: Sequence[str],
        *,
        seed: int,
        buffer_size: int,
        negatives: NegativeImageSampler,
        vocab: Vocab = BERT_BASE_CASED,
    ):
        if not urls:
            raise ValueError("PairStream: no shards")
        self.urls = list(urls)
        self.rng = np.random.default_rng(seed)
        self.buffer_size = buffer_size
        self.negatives = negatives
        self.vocab = vocab
        self._buffer: list[tuple[np.ndarray, ImageRecord]] = []
        self._source = self._pairs()

    def _pairs(self) -> Iterator[tuple[np.ndarray, ImageRecord]]:
        while True:
            url = self.urls[self.rng.integers(len(self.urls))]
            for image in iter_shard(url, vocab=self.vocab):
                self.negatives.add(image)
                for caption in image.captions:
                    yield caption, image

    def __iter__(self) -> PairStream:
        return self

    def __next__(self) -> tuple[np.ndarray, ImageRecord]:
        while len(self._buffer) < self.buffer_size:
            self._buffer.append(next(self._source))
        i = self.rng.integers(len(self._buffer))
        # Swap-remove keeps the draw O(1).
        self._buffer[i], self._buffer[-1] = self._buffer[-1], self._buffer[i]
        return self._buffer.pop()


@dataclass
class TrainSource:
    """One dataset of the mix: its name, shard patterns and task ratios."""

    name: str
    shards: Sequence[str]
    mix: dict[str, float]


class PretrainBatches:
    """Endless `(task, Batch)` stream over several datasets mixed by task ratio.

    For each micro-batch a (dataset, task) is drawn in proportion to its ratio; pairs are taken
    from that dataset until the next would pass `tokens_per_batch` real tokens (at least one pair
    per batch), turned into examples by the task's builder, and packed.
    """

    def __init__(
        self,
        sources: Sequence[TrainSource],
        *,
        tokens_per_batch: int,
        seed: int,
        shuffle_buffer: int = 2000,
        negatives_buffer: int = 1000,
        vocab: Vocab = BERT_BASE_CASED,
    ):
        if not sources:
            raise ValueError("PretrainBatches: no training sources")
        self.tokens_per_batch = tokens_per_batch
        self.vocab = vocab
        self.rng = np.random.default_rng([seed, 1])
        self.mixer = TaskMixer(
            [(s.name, task, ratio) for s in sources for task, ratio in s.mix.items()], seed=seed
        )
        self.streams: dict[str, PairStream] = {}
        for i, s in enumerate(sources):
            if s.name in self.streams:
                raise ValueError(f"PretrainBatches: dataset name {s.name!r} used twice")
            self.streams[s.name] = PairStream(
                list_shards(s.shards),
                seed=seed * 1000 + i,
                buffer_size=shuffle_buffer,
                negatives=NegativeImageSampler(negatives_buffer),
                vocab=vocab,
            )
        self._pending: dict[str, tuple[np.ndarray, ImageRecord] | None] = dict.fromkeys(
            self.streams
        )

    def __iter__(self) -> PretrainBatches:
        return self

    def __next__(self) -> tuple[str, Batch]:
        name, task = self.mixer.sample()
        stream = self.streams[name]
        pairs, tokens = [], 0
        while True:
            pair = self._pending[name] or next(stream)
            self._pending[name] = None
            cost = pair_tokens(*pair)
            if pairs and tokens + cost > self.tokens_per_batch:
                self._pending[name] = pair  # first pair of the next batch
                break
            pairs.append(pair)
            tokens += cost
        examples = [
            build_example(
                task, caption, image, self.rng, vocab=self.vocab, negatives=stream.negatives
            )
            for caption, image in pairs
        ]
        return task, collate(examples, task)


def iter_eval_batches(
    urls: Sequence[str],
    task: str,
    *,
    tokens_per_batch: int,
    seed: int = 0,
    vocab: Vocab = BERT_BASE_CASED,
    negatives_pool: int = 1000,
) -> Iterator[Batch]:
    """One deterministic pass over held-out shards for one task (same seed, same batches).

    Images stream through, so memory stays bounded whatever the split's size. ITM negatives are
    drawn from the first `negatives_pool` held-out images (read once ahead), so they are never
    training images either.
    """
    rng = np.random.default_rng([seed, 2])
    negatives = None
    if task == "itm":
        negatives = NegativeImageSampler(negatives_pool)
        for image in itertools.islice(_stream(urls, vocab), negatives_pool):
            negatives.add(image)
        if len(negatives) < 2:
            raise ValueError(
                f"ITM validation needs at least two images, the shards hold {len(negatives)}"
            )
    examples, tokens = [], 0
    for image in _stream(urls, vocab):
        for caption in image.captions:
            cost = pair_tokens(caption, image)
            if examples and tokens + cost > tokens_per_batch:
                yield collate(examples, task)
                examples, tokens = [], 0
            examples.append(
                build_example(task, caption, image, rng, vocab=vocab, negatives=negatives)
            )
            tokens += cost
    if examples:
        yield collate(examples, task)


def _stream(urls: Sequence[str], vocab: Vocab) -> Iterator[ImageRecord]:
    for url in urls:
        yield from iter_shard(url, vocab=vocab)
