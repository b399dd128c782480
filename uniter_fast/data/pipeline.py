"""From shards to packed batches: the training loader.

Each DataLoader worker on each rank plays one *role*, and a role owns its own slice of the data:

    shards --(split by rank and worker; order per epoch: shuffled, or drawn with replacement)
           --> images (bad samples skipped and counted) --> shuffle block of `block_images`
           --> (caption, image) pairs, one per caption --> token-budget batches (C++ bucketing)
           --> task drawn by mix ratio --> task builder --> packed Batch (C++ packer)

    loader = Loader(sources, tokens_per_batch=4096, seed=0, num_workers=4)
    for step in range(steps):
        task, batch = next(loader)          # batches arrive pinned when the device is CUDA
    state = loader.state_dict()             # into the checkpoint; Loader(..., state=state) resumes

Two modes. `resampled` (the training default) draws shards with replacement, endlessly.
`exact` walks the role's shards in a fresh shuffled order every epoch, so each sample is seen once
per epoch, and its position (epoch, shard, sample offset, block) goes into the checkpoint: a
resumed run produces the same batches as the uninterrupted one. Both modes are endless, so every
rank gets as many batches as it asks for (the trainer stops all ranks at the same step).

Exact resumption without storing the shuffle buffer: the shuffle is done in blocks. A block of
`block_images` images is read, cut into batches and shuffled with a generator seeded by the
block's number; the state records where the block started and how many of its batches were
taken. Resuming re-reads that one block (not the whole epoch) and skips the batches taken. Every
other random choice (task, masking, negatives) comes from generators seeded by counters in the
state, so nothing else needs saving.

The task of the k-th batch is the same on every rank: the task mixer of worker w is seeded by w,
not by the rank. Ranks must run the same heads in the same order, because ZeRO's gradient
reduction and ZeRO-3's parameter gathering are collectives over the parameters a step touches (a
different task per rank is a collective mismatch, seen as a hang or a gloo size error). The data,
masks and negatives still differ per rank.

Bad samples (see `shards.REASONS`) are skipped and counted by reason and shard; the counts travel
with the batches to the main process, which logs them and stops the run, naming the worst
shards, once the bad fraction passes `max_bad_fraction`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..errors import RunError
from ..tasks import NegativeImageSampler, TaskMixer, build_example
from .batching import token_bucket_batches
from .collate import Allocator, collate
from .handover import (
    Returns,
    SharedBuffers,
    Ticket,
    batch_from_layout,
    flat_layout,
    layout_end,
    release_table,
)
from .schema import BERT_BASE_CASED, Batch, Vocab
from .shards import ImageRecord, ShardFormatError, iter_shard, list_shards

log = logging.getLogger("uniter_fast.data")

MODES = ("resampled", "exact")
# The bad fraction is judged only after this many samples, so that one early bad sample in a
# healthy corpus does not stop a run.
BAD_CHECK_MIN_SAMPLES = 1000
# Bad-sample messages a worker forwards per batch, and that the main process logs in full.
_MESSAGES_PER_BATCH = 5
_MESSAGES_LOGGED = 20


def pair_tokens(caption: np.ndarray, image: ImageRecord) -> int:
    """Real positions the pair occupies in a packed batch: [CLS] caption [SEP] then regions."""
    return len(caption) + 2 + image.num_regions


@dataclass
class TrainSource:
    """One dataset of the mix: its name, shard patterns and task ratios."""

    name: str
    shards: Sequence[str]
    mix: dict[str, float]

    def __post_init__(self) -> None:
        shards = [self.shards] if isinstance(self.shards, (str, os.PathLike)) else self.shards
        self.shards = [os.fspath(s) for s in shards]


@dataclass(frozen=True)
class StreamSettings:
    """How every role of a loader turns its shards into batches (one object, shared by all).

    tokens_per_batch: real tokens (text + regions) per batch; seed: of every random choice;
    mode: "resampled" or "exact"; block_images: images per shuffle block; length_buckets: sort
    a block by length before cutting it (see `BlockBatcher`); max_bad_fraction and
    bad_check_min_samples: when a reader gives up on its data (see `BadSamples`).
    """

    tokens_per_batch: int
    seed: int
    mode: str = "resampled"
    block_images: int = 500
    length_buckets: bool = False
    max_bad_fraction: float = 1.0
    bad_check_min_samples: int = BAD_CHECK_MIN_SAMPLES
    vocab: Vocab = BERT_BASE_CASED

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"data mode must be one of {MODES}, got {self.mode!r}")
        if self.tokens_per_batch < 1 or self.block_images < 1:
            raise ValueError(
                "tokens_per_batch and block_images must be >= 1, got "
                f"{self.tokens_per_batch} and {self.block_images}"
            )
        if not 0 <= self.max_bad_fraction <= 1:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {self.max_bad_fraction}")


class BadDataError(RunError, RuntimeError):
    """Too many bad samples: the run stops (the message names the worst shards)."""


class DataSetupError(RunError, ValueError):
    """Shards that cannot be split between the readers as the settings ask."""


class DataStateError(RunError, ValueError):
    """A saved data position that this loader (other shards, seed or settings) cannot restore."""


# --------------------------------------------------------------------------------------------
# Counting bad samples


class BadSamples:
    """Samples read and skipped, by shard and reason; mergeable across workers and ranks.

    limit: (max_bad_fraction, min_samples) checked on every bad sample against the counts
        since creation (`take` resets only the delta), so that a reader meeting nothing but bad
        data stops by itself instead of reading on without ever producing a batch.
    """

    def __init__(self, limit: tuple[float, int] | None = None) -> None:
        self.good: Counter[str] = Counter()  # shard -> samples kept
        self.bad: Counter[tuple[str, str]] = Counter()  # (shard, reason) -> samples skipped
        self.messages: list[str] = []  # first few messages, not yet forwarded
        self.limit = limit
        self.lifetime = BadSamples() if limit else None

    def add_good(self, shard: str) -> None:
        self.good[shard] += 1
        if self.lifetime is not None:
            self.lifetime.good[shard] += 1

    def add_bad(self, err: ShardFormatError) -> None:
        self.bad[(err.shard, err.reason)] += 1
        if len(self.messages) < _MESSAGES_PER_BATCH:
            self.messages.append(str(err))
        if self.lifetime is not None:
            self.lifetime.bad[(err.shard, err.reason)] += 1
            self.lifetime.check(*self.limit)

    @property
    def num_good(self) -> int:
        return sum(self.good.values())

    @property
    def num_bad(self) -> int:
        return sum(self.bad.values())

    def by_reason(self) -> dict[str, int]:
        out: Counter[str] = Counter()
        for (_, reason), n in self.bad.items():
            out[reason] += n
        return dict(sorted(out.items()))

    def take(self) -> dict:
        """The counts since the last `take` (and reset them): what a worker sends along."""
        delta = {
            "good": dict(self.good),
            "bad": [[shard, reason, n] for (shard, reason), n in self.bad.items()],
            "messages": self.messages,
        }
        self.good, self.bad, self.messages = Counter(), Counter(), []
        return delta

    def merge(self, delta: dict) -> list[str]:
        """Add a `take()` or `state_dict()`; returns its messages."""
        self.good.update(delta.get("good", {}))
        for shard, reason, n in delta.get("bad", []):
            self.bad[(shard, reason)] += n
        return list(delta.get("messages", []))

    def state_dict(self) -> dict:
        return {
            "good": dict(self.good),
            "bad": [[shard, reason, n] for (shard, reason), n in self.bad.items()],
        }

    def worst_shards(self, n: int = 5) -> list[str]:
        """'name: bad of read (reason n, ...)' for the n shards with the most bad samples."""
        per_shard: dict[str, Counter[str]] = {}
        for (shard, reason), count in self.bad.items():
            per_shard.setdefault(shard, Counter())[reason] += count
        ranked = sorted(per_shard.items(), key=lambda kv: (-sum(kv[1].values()), kv[0]))
        lines = []
        for shard, reasons in ranked[:n]:
            bad = sum(reasons.values())
            read = bad + self.good.get(shard, 0)
            detail = ", ".join(f"{r} {c}" for r, c in reasons.most_common())
            lines.append(f"{shard or '<unknown shard>'}: {bad} bad of {read} read ({detail})")
        return lines

    def check(self, max_fraction: float, min_samples: int = BAD_CHECK_MIN_SAMPLES) -> None:
        """Raise BadDataError when more than `max_fraction` of the samples read were bad."""
        bad, total = self.num_bad, self.num_bad + self.num_good
        if bad and total >= min_samples and bad > max_fraction * total:
            raise BadDataError(
                f"{bad} of {total} samples read were bad ({bad / total:.2%}, more than "
                f"max_bad_fraction {max_fraction:.2%}); by reason: {self.by_reason()}; worst "
                f"shards: {'; '.join(self.worst_shards())}"
            )


# --------------------------------------------------------------------------------------------
# One role's images of one dataset


def _seed(*parts: int) -> np.random.Generator:
    return np.random.default_rng([int(p) for p in parts])


def _shard_digest(patterns: Sequence[str]) -> list:
    """[number of shards, sha1 of their names in order]: what a resume must find unchanged."""
    urls = list_shards(patterns)
    names = "\n".join(os.path.basename(u) if "://" not in u else u for u in urls)
    return [len(urls), hashlib.sha1(names.encode()).hexdigest()]


def shard_order(urls: Sequence[str], mode: str, seed: int, epoch: int) -> list[str]:
    """The shards read in `epoch`: a permutation (exact) or draws with replacement (resampled)."""
    rng = _seed(seed, epoch, 0x5A4D)
    if mode == "exact":
        return [urls[i] for i in rng.permutation(len(urls))]
    return [urls[i] for i in rng.integers(len(urls), size=len(urls))]


@dataclass
class Position:
    """Where an `ImageStream` reads next: sample `offset` of shard `index` of `epoch`'s order."""

    epoch: int = 0
    index: int = 0
    offset: int = 0


class ImageStream:
    """Endless validated images from a list of shards, from a `Position`; bad ones counted."""

    def __init__(
        self,
        urls: Sequence[str],
        *,
        mode: str,
        seed: int,
        bad: BadSamples,
        vocab: Vocab = BERT_BASE_CASED,
        position: Position | None = None,
    ) -> None:
        if not urls:
            raise ValueError("ImageStream: no shards")
        self.urls = list(urls)
        self.mode = mode
        self.seed = seed
        self.bad = bad
        self.vocab = vocab
        self.position = dataclasses.replace(position) if position else Position()
        self._records: Iterator[tuple[int, ImageRecord]] | None = None
        self._order = shard_order(self.urls, mode, seed, self.position.epoch)
        self._barren: set[str] = set()  # shards read to the end without a usable image
        self._got_one = False

    def __iter__(self) -> ImageStream:
        return self

    def __next__(self) -> ImageRecord:
        pos = self.position
        while True:
            if self._records is None:
                url = self._order[pos.index]
                self._records = iter_shard(
                    url, vocab=self.vocab, on_bad=self._on_bad, skip=pos.offset, positions=True
                )
                self._got_one = pos.offset > 0
            try:
                index, record = next(self._records)
            except StopIteration:
                self._records = None
                if self._got_one:
                    self._barren.clear()
                else:
                    self._barren.add(self._order[pos.index])
                if len(self._barren) == len(set(self.urls)):
                    names = sorted(os.path.basename(u) for u in self._barren)
                    raise BadDataError(
                        f"none of the {len(names)} shards of this reader gives a usable sample "
                        f"({', '.join(names[:5])}{', ...' if len(names) > 5 else ''}); skipped so "
                        f"far: {self.bad.by_reason()}; worst shards: "
                        f"{'; '.join(self.bad.worst_shards())}"
                    ) from None
                pos.index, pos.offset = pos.index + 1, 0
                if pos.index == len(self._order):
                    pos.epoch, pos.index = pos.epoch + 1, 0
                    self._order = shard_order(self.urls, self.mode, self.seed, pos.epoch)
                continue
            pos.offset = index + 1
            self._got_one = True
            self.bad.add_good(record.shard)
            return record

    def _on_bad(self, err: ShardFormatError) -> None:
        # Looked up per call: a resumed BlockBatcher swaps `self.bad` while it re-reads a block,
        # and the shard opened then goes on reporting after the swap back.
        self.bad.add_bad(err)

    def close(self) -> None:
        if self._records is not None:
            self._records.close()
            self._records = None


# --------------------------------------------------------------------------------------------
# Shuffle blocks and batches of one dataset


class BlockBatcher:
    """Pair batches of one dataset: blocks of images, cut by token budget and shuffled.

    State (`state_dict`): the block's number, where it started, and how many of its batches were
    taken. ITM negatives are drawn from the block's other images.
    """

    def __init__(
        self,
        urls: Sequence[str],
        *,
        mode: str,
        seed: int,
        tokens_per_batch: int,
        block_images: int,
        bad: BadSamples,
        vocab: Vocab = BERT_BASE_CASED,
        state: dict | None = None,
        length_buckets: bool = False,
    ) -> None:
        self.seed = seed
        self.length_buckets = length_buckets
        self.tokens_per_batch = tokens_per_batch
        self.block_images = block_images
        self.bad = bad
        state = state or {}
        start = Position(**state["block_start"]) if "block_start" in state else Position()
        self.images = ImageStream(urls, mode=mode, seed=seed, bad=bad, vocab=vocab, position=start)
        self.block_number = int(state.get("block_number", 0))
        self.taken = 0
        self._batches: list[np.ndarray] = []
        self._pairs: list[tuple[np.ndarray, ImageRecord]] = []
        self.negatives = NegativeImageSampler(max(block_images, 1))
        if state:
            # Re-read the interrupted block without counting its samples a second time.
            counting, self.images.bad = self.images.bad, BadSamples()
            self._read_block()
            self.images.bad = counting
            self.taken = int(state["taken"])
            if self.taken > len(self._batches):
                raise ValueError(
                    f"data state says {self.taken} batches were taken from block "
                    f"{self.block_number}, which has {len(self._batches)}: the shards changed "
                    "since the checkpoint was written"
                )

    def _read_block(self) -> None:
        self.block_start = dataclasses.replace(self.images.position)
        images = [next(self.images) for _ in range(self.block_images)]
        self.negatives = NegativeImageSampler(len(images))
        for image in images:
            self.negatives.add(image)
        self._pairs = [(caption, image) for image in images for caption in image.captions]
        lengths = np.array([pair_tokens(c, i) for c, i in self._pairs], dtype=np.int64)
        block_seed = int(_seed(self.seed, self.block_number, 0xB10C).integers(2**63))
        # The whole block is one bucket, shuffled and cut into batches of at most
        # `tokens_per_batch` real tokens. With length buckets it is sorted by length first (the
        # reference's token buckets): less padding for a padded attention backend, but a
        # block holds all captions of its images, and those have nearly equal lengths, so they
        # would often share a batch.
        self._batches = token_bucket_batches(
            lengths,
            max_tokens=self.tokens_per_batch,
            bucket_size=max(len(lengths), 1),
            size_multiple=1,
            mode="packed",
            seed=block_seed,
            sort_by_length=self.length_buckets,
        )
        self.taken = 0

    @property
    def block_batches(self) -> int:
        """Batches the current block was cut into."""
        return len(self._batches)

    def next_batch(self) -> list[tuple[np.ndarray, ImageRecord]]:
        if self.taken == len(self._batches):
            if self._batches:
                self.block_number += 1
            self._read_block()
        index = self._batches[self.taken]
        self.taken += 1
        return [self._pairs[i] for i in index]

    def state_dict(self) -> dict:
        if not self._batches:  # nothing read yet: start from the configured beginning
            return {}
        return {
            "block_number": self.block_number,
            "block_start": dataclasses.asdict(self.block_start),
            "taken": self.taken,
        }

    def close(self) -> None:
        self.images.close()


# --------------------------------------------------------------------------------------------
# One role: all datasets, the task mix, the builders


def split_shards(urls: Sequence[str], role: int, num_roles: int, mode: str, what: str) -> list[str]:
    """The shards of `role` out of `num_roles` (every num_roles-th shard, from `role`).

    Exact mode needs at least one shard per role. Resampled mode, with fewer shards than
    roles, lets every role draw from all of them (with its own seed).
    """
    urls = list(urls)
    if len(urls) >= num_roles:
        return urls[role::num_roles]
    if mode == "exact":
        raise DataSetupError(
            f"{what}: exact mode splits shards over ranks x workers = {num_roles} readers, but "
            f"there are only {len(urls)} shards; write smaller shards, use fewer workers, or "
            "use mode 'resampled'"
        )
    return urls


class RoleStream:
    """Endless `(task, Batch)` of one role (one worker of one rank), resumable from its state."""

    def __init__(
        self,
        sources: Sequence[TrainSource],
        settings: StreamSettings,
        *,
        role: int,
        num_roles: int,
        task_stream: int | None = None,
        state: dict | None = None,
        pack_into: str | Allocator | None = None,
    ) -> None:
        """task_stream: seeds the task mixer (default: the role); roles with equal task streams
        draw the same task sequence (the loader gives worker w of every rank task stream w)."""
        state = state or {}
        seed = settings.seed
        self.role = role
        self.seed = seed
        self.vocab = settings.vocab
        self.pack_into = pack_into
        self.bad = BadSamples(limit=(settings.max_bad_fraction, settings.bad_check_min_samples))
        task_stream = role if task_stream is None else task_stream
        mixer_seed = int(_seed(seed, task_stream, 0x313).integers(2**62))
        self.mixer = TaskMixer(
            [(s.name, task, ratio) for s in sources for task, ratio in s.mix.items()],
            seed=mixer_seed,
        )
        if "mixer" in state:
            self.mixer.load_state_dict(state["mixer"])
        self.batch_number = int(state.get("batch_number", 0))
        self.datasets: dict[str, BlockBatcher] = {}
        for i, s in enumerate(sources):
            if s.name in self.datasets:
                raise ValueError(f"dataset name {s.name!r} used twice")
            urls = split_shards(
                list_shards(s.shards), role, num_roles, settings.mode, f"dataset {s.name!r}"
            )
            self.datasets[s.name] = BlockBatcher(
                urls,
                mode=settings.mode,
                seed=int(_seed(seed, role, i, 0xDA7A).integers(2**62)),
                tokens_per_batch=settings.tokens_per_batch,
                block_images=settings.block_images,
                bad=self.bad,
                vocab=settings.vocab,
                state=state.get("datasets", {}).get(s.name),
                length_buckets=settings.length_buckets,
            )

    def __iter__(self) -> RoleStream:
        return self

    def __next__(self) -> tuple[str, Batch]:
        name, task = self.mixer.sample()
        dataset = self.datasets[name]
        pairs = dataset.next_batch()
        rng = _seed(self.seed, self.role, self.batch_number, 0xE7A)
        self.batch_number += 1
        examples = [
            build_example(task, caption, image, rng, vocab=self.vocab, negatives=dataset.negatives)
            for caption, image in pairs
        ]
        return task, collate(examples, task, out=self.pack_into)

    def state_dict(self) -> dict:
        return {
            "mixer": self.mixer.state_dict(),
            "batch_number": self.batch_number,
            "datasets": {name: d.state_dict() for name, d in self.datasets.items()},
        }

    def close(self) -> None:
        for d in self.datasets.values():
            d.close()


# --------------------------------------------------------------------------------------------
# Across DataLoader workers


@dataclass
class LoadedBatch:
    """What a worker hands over: the batch, the role that made it, its state after, the counts,
    and which shared arena holds the batch (see `handover`).

    ticket: the ring slot the batch was packed into (None: not from a ring). arena / layout:
    set on the receiving side when the batch crossed as one buffer; the batch views the arena.
    pinned_from: after `pin_memory`, the arena the batch was copied out of (kept so that the
    training process keeps the slot mapped, and releases it at once).
    """

    task: str
    batch: Batch
    role: int
    state: dict
    stats: dict
    ticket: Ticket | None = None
    arena: torch.Tensor | None = None
    layout: dict | None = None
    pinned_from: torch.UntypedStorage | None = None

    def __reduce__(self):
        flat = flat_layout(self.batch)
        if flat is None:
            return super().__reduce__()
        arena, layout = flat  # one shared buffer crosses, not one per field
        fields = (self.task, arena, layout, self.role, self.state, self.stats, self.ticket)
        return (LoadedBatch._rebuild, fields)

    @staticmethod
    def _rebuild(task, arena, layout, role, state, stats, ticket) -> LoadedBatch:
        batch = batch_from_layout(arena, layout)
        return LoadedBatch(task, batch, role, state, stats, ticket, arena, layout)

    def pin_memory(self) -> LoadedBatch:  # DataLoader's pin thread calls this
        source = self.source_storage()
        if self.layout is None:
            batch = self.batch.pin_memory()
        else:  # one copy of the used part of the arena into one pinned block
            batch = batch_from_layout(
                self.arena[: layout_end(self.layout)].pin_memory(), self.layout
            )
        return dataclasses.replace(self, batch=batch, arena=None, layout=None, pinned_from=source)

    def source_storage(self) -> torch.UntypedStorage:
        """The storage the batch came in (its ring slot's arena, for a ring batch)."""
        if self.pinned_from is not None:
            return self.pinned_from
        return next(iter(self.batch.tensors().values())).untyped_storage()


@dataclass
class WorkerFailure:
    """A worker's `RunError` (bad data past the limit, say), handed over like a batch so that
    the training process raises it with its own message: the DataLoader would re-raise it
    wrapped in the worker's traceback."""

    error: RunError


class PretrainData(IterableDataset):
    """The roles of one rank as an IterableDataset: worker w plays role (w + first_role) % W.

    `first_role` lets a resumed loader start with the role whose batch comes next (DataLoader
    takes batches from workers 0, 1, ... in turn).
    """

    def __init__(
        self,
        sources: Sequence[TrainSource],
        settings: StreamSettings,
        *,
        rank: int = 0,
        world_size: int = 1,
        states: dict[int, dict] | None = None,
        first_role: int = 0,
        release: torch.Tensor | None = None,
        pin_in_process: bool = False,
    ) -> None:
        """release: the ring's `release_table` (workers only; None: a fresh block per batch).
        pin_in_process: without workers, pack straight into pinned memory."""
        self.sources = list(sources)
        self.settings = settings
        self.rank = rank
        self.world_size = world_size
        self.states = dict(states or {})
        self.first_role = first_role
        self.release = release
        self.pin_in_process = pin_in_process

    def __iter__(self) -> Iterator[LoadedBatch]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        local = (worker + self.first_role) % workers
        ring = None
        if info is None:
            pack_into = "pinned" if self.pin_in_process else None
        elif self.release is None:
            pack_into = "shared"
        else:
            # In a worker, pack straight into shared memory: the hand-over moves no bytes.
            ring = SharedBuffers(self.release[worker], worker)
            pack_into = ring.allocate
        stream = None
        try:
            stream = RoleStream(
                self.sources,
                self.settings,
                role=self.rank * workers + local,
                num_roles=self.world_size * workers,
                task_stream=local,
                state=self.states.get(local),
                pack_into=pack_into,
            )
            while True:
                task, batch = next(stream)
                ticket = ring.ticket if ring is not None else None
                yield LoadedBatch(
                    task, batch, local, stream.state_dict(), stream.bad.take(), ticket
                )
        except RunError as e:
            if info is None:
                raise
            yield WorkerFailure(e)
        finally:
            if stream is not None:
                stream.close()


class Loader:
    """The training loader of one rank: endless `(task, Batch)`, checkpointable.

    num_workers: DataLoader worker processes building batches (0: in this process).
    pin_memory: hand batches over in pinned memory (for asynchronous copies to a GPU).
    state: a `state_dict()` to resume from (same sources, mode, seed, workers and world size).
    length_buckets: sort each block by length before cutting batches (see `BlockBatcher`).
    max_bad_fraction: stop (BadDataError) once more than this fraction of samples were bad;
    bad_check_min_samples: ... judged from this many samples read on.
    recycle_buffers: workers pack into a ring of shared arenas that this process releases
    (`handover`); False: a fresh shared block per batch (the DataLoader's way; for comparison).
    """

    def __init__(
        self,
        sources: Sequence[TrainSource],
        *,
        tokens_per_batch: int,
        seed: int,
        mode: str = "resampled",
        block_images: int = 500,
        num_workers: int = 0,
        pin_memory: bool = False,
        prefetch_factor: int = 4,
        rank: int = 0,
        world_size: int = 1,
        vocab: Vocab = BERT_BASE_CASED,
        max_bad_fraction: float = 0.01,
        bad_check_min_samples: int = BAD_CHECK_MIN_SAMPLES,
        state: dict | None = None,
        length_buckets: bool = False,
        recycle_buffers: bool = True,
    ) -> None:
        settings = StreamSettings(
            tokens_per_batch=tokens_per_batch,
            seed=seed,
            mode=mode,
            block_images=block_images,
            length_buckets=length_buckets,
            max_bad_fraction=max_bad_fraction,
            bad_check_min_samples=bad_check_min_samples,
            vocab=vocab,
        )
        if not sources:
            raise ValueError("Loader: no training sources")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        sources = [s if isinstance(s, TrainSource) else TrainSource(*s) for s in sources]
        itm = [s.name for s in sources if "itm" in s.mix]
        if block_images < (2 if itm else 1):
            raise ValueError(
                f"block_images must be at least {2 if itm else 1}, got {block_images}"
                + (
                    f" (ITM negatives of {itm[0]!r} come from the block's other images)"
                    if itm
                    else ""
                )
            )
        self.num_roles = max(num_workers, 1)
        self.settings = settings
        self.bad = BadSamples()
        self.identity = {
            "mode": mode,
            "seed": seed,
            "num_workers": num_workers,
            "world_size": world_size,
            "rank": rank,
            "tokens_per_batch": tokens_per_batch,
            "block_images": block_images,
            "length_buckets": length_buckets,
            # The expanded shard lists, not the patterns: a shard added to a folder since the
            # checkpoint would shift every reader's split.
            "sources": [[s.name, _shard_digest(s.shards)] for s in sources],
        }
        states, first_role = {}, 0
        if state:
            different = {
                k: (state["identity"].get(k), v)
                for k, v in self.identity.items()
                if state["identity"].get(k) != v
            }
            if different:
                raise DataStateError(
                    "the data state was written by a different loader setup, so the data "
                    f"position cannot be restored: {different} (saved, now)"
                )
            states = {int(k): v for k, v in state["roles"].items()}
            first_role = int(state["next_role"])
            self.bad.merge(state["bad"])
        self.role_states: dict[int, dict] = dict(states)
        self.one_off_buffers = 0  # batches a worker packed outside its ring (all slots lent)
        self.next_role = first_role
        self._logged = 0
        # Workers pack into a ring of shared arenas that this process releases (handover.py);
        # room for the DataLoader's prefetch, the pin thread's batch and the two the training
        # loop holds (the current one and, until next() returns, the previous one).
        self.ring_slots = 2 * prefetch_factor + 4
        ring = num_workers > 0 and recycle_buffers
        table = release_table(num_workers, self.ring_slots) if ring else None
        self._returns = Returns(table) if ring else None
        dataset = PretrainData(
            sources,
            settings,
            rank=rank,
            world_size=world_size,
            states=states,
            first_role=first_role,
            release=table,
            pin_in_process=pin_memory and not num_workers,
        )
        if num_workers:
            self._loader = DataLoader(
                dataset,
                batch_size=None,
                num_workers=num_workers,
                pin_memory=pin_memory,
                prefetch_factor=prefetch_factor,
            )
        else:
            self._loader = dataset
        self._it = iter(self._loader)

    def __iter__(self) -> Loader:
        return self

    def __next__(self) -> tuple[str, Batch]:
        if self._returns is not None:
            self._returns.release_unused()
        item: LoadedBatch | WorkerFailure = next(self._it)
        if isinstance(item, WorkerFailure):
            raise item.error
        if item.ticket is not None:
            copied = item.pinned_from is not None
            self._returns.hold(item.ticket, item.source_storage(), copied=copied)
        elif self._returns is not None:
            self.one_off_buffers += 1
        self.role_states[item.role] = item.state
        self.next_role = (item.role + 1) % self.num_roles
        for message in self.bad.merge(item.stats):
            self._logged += 1
            if self._logged <= _MESSAGES_LOGGED:
                log.warning("skipped bad sample: %s", message)
            if self._logged == _MESSAGES_LOGGED:
                log.warning("(further bad samples are counted, not logged one by one)")
        self.bad.check(self.settings.max_bad_fraction, self.settings.bad_check_min_samples)
        return item.task, item.batch

    def state_dict(self) -> dict:
        """JSON-serialisable: each role's stream state, the next role, the bad-sample counts."""
        return {
            "identity": self.identity,
            "roles": {str(k): v for k, v in self.role_states.items()},
            "next_role": self.next_role,
            "bad": self.bad.state_dict(),
        }

    def close(self) -> None:
        """Stop the worker processes."""
        it, self._it = self._it, iter(())
        if hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        elif hasattr(it, "close"):  # our own generator: closes the open shard
            it.close()


# --------------------------------------------------------------------------------------------
# Validation


def iter_eval_batches(
    urls: Sequence[str],
    task: str,
    *,
    tokens_per_batch: int,
    seed: int = 0,
    vocab: Vocab = BERT_BASE_CASED,
    negatives_pool: int = 1000,
    bad: BadSamples | None = None,
) -> Iterator[Batch]:
    """One deterministic pass over held-out shards for one task (same seed, same batches).

    Images stream through, so memory stays bounded whatever the split's size. ITM negatives are
    drawn from the first `negatives_pool` held-out images (read once ahead), so they are never
    training images either. Bad samples are skipped and counted into `bad`.
    """
    bad = bad if bad is not None else BadSamples()
    rng = np.random.default_rng([seed, 2])
    negatives = None
    if task == "itm":
        negatives = NegativeImageSampler(negatives_pool)
        for _, image in zip(
            range(negatives_pool), _stream(urls, vocab, BadSamples()), strict=False
        ):
            negatives.add(image)
        if len(negatives) < 2:
            raise ValueError(
                f"ITM validation needs at least two images, the shards hold {len(negatives)}"
            )
    examples, tokens = [], 0
    for image in _stream(urls, vocab, bad):
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


def _stream(urls: Sequence[str], vocab: Vocab, bad: BadSamples) -> Iterator[ImageRecord]:
    for url in urls:
        for image in iter_shard(url, vocab=vocab, on_bad=bad.add_bad):
            bad.add_good(image.shard)
            yield image


__all__ = [
    "MODES",
    "BadDataError",
    "BadSamples",
    "DataSetupError",
    "DataStateError",
    "Loader",
    "LoadedBatch",
    "PretrainData",
    "RoleStream",
    "StreamSettings",
    "TrainSource",
    "iter_eval_batches",
    "pair_tokens",
    "shard_order",
    "split_shards",
]
