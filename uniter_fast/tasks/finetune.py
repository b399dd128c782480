"""Downstream examples, batches and metrics (VQA, SNLI-VE, NLVR2) from task shards.

    loader = FinetuneLoader(urls, "vqa", collate_task="vqa", tokens_per_batch=5120, seed=42,
                            num_classes=3129)
    task, batch = next(loader)                       # endless, reshuffled every epoch
    metrics = evaluate_finetune(model_call, val_examples, ...)

Examples: one per text of a task shard's records (`uniter_fast.data.task_shards`): `input_ids`
[CLS] text [SEP], the record's image(s), and the target in the collate schema
(`uniter_fast.data.downstream`): VQA's soft scores as a dense [num_classes] row, VE's one-hot
row, NLVR2's `target`. As the reference does, training drops texts longer than `max_txt_len`
tokens (without [CLS]/[SEP]); evaluation keeps them.

The loader reads its split into memory once (texts and the features they share; fine for the
synthetic quick starts and for VE and NLVR2 at full size, about 15 GB of features for VQA's
images: a streaming reader like pretraining's `Loader` is the next step), deals each rank a
disjoint share of every epoch's shuffled examples, and fills batches up to the token budget
(text plus regions, every image of an example counted). Its state is (epoch, batches done), so
a resumed run continues with the very batches the uninterrupted one would have seen.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch

from ..data.collate import collate
from ..data.pipeline import BadSamples
from ..data.schema import BERT_BASE_CASED
from ..data.shards import list_shards
from ..data.task_shards import TARGET_FIELD, TaskRecord, iter_task_shard

log = logging.getLogger("uniter_fast.train")

# The collate task of each downstream task (NLVR2's triplet variant packs one sequence).
COLLATE_TASK = {"vqa": "vqa", "ve": "ve", "nlvr2": "nlvr2", "re": "re"}


def examples_of(
    record: TaskRecord, num_classes: int | None, *, max_txt_len: int | None = None
) -> tuple[list[dict], int]:
    """The examples of one record, and how many texts `max_txt_len` dropped (RE: the
    ground-truth-box examples of `uniter_fast.tasks.refexp`)."""
    if record.task == "re":
        from .refexp import re_examples

        return re_examples(record, features="gt", max_txt_len=max_txt_len)
    out, dropped = [], 0
    vocab = BERT_BASE_CASED
    for item in record.items:
        ids = item["input_ids"]
        if max_txt_len is not None and len(ids) > max_txt_len:
            dropped += 1
            continue
        ex = {"id": item["id"], "input_ids": np.array([vocab.cls_id, *ids, vocab.sep_id])}
        if record.task == "nlvr2":
            (lf, ll), (rf, rl) = record.images
            ex["img_feat"], ex["img_loc"] = (lf, rf), (ll, rl)
        else:
            ex["img_feat"], ex["img_loc"] = record.images[0]
        target = item.get(TARGET_FIELD[record.task])
        if target is not None:
            if record.task == "vqa":
                row = np.zeros(num_classes, dtype=np.float32)
                for label, score in target:
                    row[label] = score
                ex["targets"] = row
            elif record.task == "ve":
                ex["targets"] = np.eye(3, dtype=np.float32)[target]
            else:
                ex["target"] = int(target)
        out.append(ex)
    return out, dropped


def example_tokens(ex: dict, collate_task: str) -> int:
    """Real tokens an example adds to a batch (the paired NLVR2 form packs the text twice)."""
    text = len(ex["input_ids"])
    feats = ex["img_feat"]
    if isinstance(feats, tuple):
        regions = sum(len(f) for f in feats)
        return regions + (2 * text if collate_task == "nlvr2" else text)
    return text + len(feats)


def read_examples(
    urls: Sequence[str],
    task: str,
    *,
    num_classes: int | None,
    max_txt_len: int | None,
    bad: BadSamples,
) -> list[dict]:
    """Every example of the shards (bad samples skipped and counted in `bad`)."""
    examples, dropped = [], 0
    for url in urls:
        for record in iter_task_shard(url, task, num_classes=num_classes, on_bad=bad.add_bad):
            bad.add_good(record.shard)
            got, n = examples_of(record, num_classes, max_txt_len=max_txt_len)
            examples += got
            dropped += n
    if dropped:
        log.info(
            "%d %s texts longer than %s tokens dropped, as the reference does",
            dropped,
            task,
            max_txt_len,
        )
    return examples


def greedy_fill(items, tokens: Callable[[object], int], budget: int) -> Iterator[list]:
    """Batches of `items` in their order: a batch takes items while their `tokens` stay within
    `budget` (an item alone over the budget gets a batch of its own)."""
    current, used = [], 0
    for item in items:
        n = tokens(item)
        if current and used + n > budget:
            yield current
            current, used = [], 0
        current.append(item)
        used += n
    if current:
        yield current


def token_batches(
    examples: Sequence[dict], order, budget: int, collate_task: str
) -> list[list[int]]:
    """Greedy fill of `examples` in `order` (indices) within `budget` real tokens a batch."""
    return list(
        greedy_fill(
            (int(i) for i in order), lambda i: example_tokens(examples[i], collate_task), budget
        )
    )


def _collated(examples: list[dict], collate_task: str, pin: bool):
    batch = collate(examples, task=collate_task)
    return batch.pin_memory() if pin else batch


def dealt_batches(
    order: np.ndarray, rank: int, world: int, plan: Callable[[np.ndarray], list]
) -> list:
    """This rank's batches of a shuffled `order` dealt round-robin over `world` ranks: `plan`
    turns a share into batches, and every rank keeps as many as the fewest of any rank (so
    the ranks' collectives stay paired)."""
    batches = plan(order[rank::world])
    if world == 1:
        return batches
    fewest = min(len(plan(order[r::world])) for r in range(world))
    return batches[:fewest]


class EpochLoader:
    """The bookkeeping of an in-memory loader: a fresh plan of batches every epoch (`_plan`,
    drawn from (seed, epoch)), the position in it, and that position as the state a resumed
    loader continues from. Subclasses set `seed`, `rank`, `world` and call `_start(state)`."""

    def _start(self, state: dict | None) -> None:
        self.epoch, self.done = 0, 0
        if state is not None:
            self.epoch, self.done = int(state["epoch"]), int(state["batches"])
        self._epoch_batches: list | None = None

    def _plan(self) -> list:
        raise NotImplementedError

    def _batches(self) -> list:
        """This epoch's batches (planned on first use)."""
        if self._epoch_batches is None:
            self._epoch_batches = self._plan()
        return self._epoch_batches

    def _take(self) -> tuple[int, object]:
        """(its index in the epoch, the next batch of the plan), moving to the next epoch when
        this one is done."""
        if self.done >= len(self._batches()):
            self.epoch, self.done, self._epoch_batches = self.epoch + 1, 0, None
        index = self.done
        self.done += 1
        return index, self._batches()[index]

    def __iter__(self):
        return self

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches": self.done}


class FinetuneLoader(EpochLoader):
    """Endless (task, batch) of one downstream task for one rank (module docstring)."""

    def __init__(
        self,
        patterns: Sequence[str],
        task: str,
        *,
        collate_task: str,
        tokens_per_batch: int,
        seed: int,
        num_classes: int | None = None,
        max_txt_len: int | None = 60,
        rank: int = 0,
        world_size: int = 1,
        pin_memory: bool = False,
        state: dict | None = None,
    ):
        self.task, self.collate_task = task, collate_task
        self.tokens_per_batch, self.seed = tokens_per_batch, seed
        self.rank, self.world = rank, world_size
        self.pin = pin_memory
        self.bad = BadSamples()
        self.examples = read_examples(
            list_shards(patterns),
            task,
            num_classes=num_classes,
            max_txt_len=max_txt_len,
            bad=self.bad,
        )
        if len(self.examples) < world_size:
            raise ValueError(
                f"{task}: {len(self.examples)} training examples for {world_size} ranks"
            )
        self._start(state)

    def _plan(self) -> list[list[int]]:
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.examples))
        return dealt_batches(
            order,
            self.rank,
            self.world,
            lambda share: token_batches(
                self.examples, share, self.tokens_per_batch, self.collate_task
            ),
        )

    def __next__(self) -> tuple[str, object]:
        _, indices = self._take()
        chosen = [self.examples[i] for i in indices]
        return self.task, _collated(chosen, self.collate_task, self.pin)

    def close(self) -> None:
        self.examples = []


class StreamingFinetuneLoader:
    """Endless (task, batch) of one downstream task for one rank, streamed from its shards.

    For splits too large to hold in memory (VQA's features): each rank reads its own shards
    (`urls[rank::world]`; with fewer shards than ranks, every rank reads all of them and keeps
    the examples whose id hashes to it), in a fresh seeded order every pass, through a shuffle
    buffer of `buffer` examples, and fills token-budget batches as `FinetuneLoader` does. The
    stream never ends, so every rank always has a next batch (the ranks' passes need not line
    up). Memory: the buffer's examples and the records they point into.

    State: the batches yielded so far. A resumed loader replays its stream deterministically to
    that point without collating (reading the shards again up to there), so it continues with
    the very batches the uninterrupted one would have seen.
    """

    def __init__(
        self,
        patterns: Sequence[str],
        task: str,
        *,
        collate_task: str,
        tokens_per_batch: int,
        seed: int,
        num_classes: int | None = None,
        max_txt_len: int | None = 60,
        rank: int = 0,
        world_size: int = 1,
        buffer: int = 2000,
        pin_memory: bool = False,
        state: dict | None = None,
    ):
        import zlib

        self.task, self.collate_task = task, collate_task
        self.tokens_per_batch, self.seed = tokens_per_batch, seed
        self.num_classes, self.max_txt_len = num_classes, max_txt_len
        self.rank, self.world, self.buffer, self.pin = rank, world_size, buffer, pin_memory
        self.bad = BadSamples()
        urls = list_shards(patterns)
        if len(urls) >= world_size:
            self.urls, self._mine = urls[rank::world_size], None
        else:
            self.urls = urls
            self._mine = lambda ex: zlib.crc32(ex["id"].encode()) % world_size == rank
        self.done = 0
        self._batches = self._stream_batches()
        skip = int(state["batches"]) if state else 0
        for _ in range(skip):
            next(self._batches)
        self.done = skip

    def _examples(self) -> Iterator[dict]:
        npass = 0
        while True:
            rng = np.random.default_rng([self.seed, self.rank, npass])
            pool: list[dict] = []
            seen = 0
            for i in rng.permutation(len(self.urls)):
                for record in iter_task_shard(
                    self.urls[i], self.task, num_classes=self.num_classes, on_bad=self.bad.add_bad
                ):
                    self.bad.add_good(record.shard)
                    for ex in examples_of(record, self.num_classes, max_txt_len=self.max_txt_len)[
                        0
                    ]:
                        if self._mine is not None and not self._mine(ex):
                            continue
                        seen += 1
                        pool.append(ex)
                        if len(pool) >= self.buffer:
                            yield pool.pop(int(rng.integers(len(pool))))
            rng.shuffle(pool)
            yield from pool
            if not seen:
                raise ValueError(f"{self.task}: no training examples for rank {self.rank}")
            npass += 1

    def _stream_batches(self) -> Iterator[list[dict]]:
        return greedy_fill(
            self._examples(),
            lambda ex: example_tokens(ex, self.collate_task),
            self.tokens_per_batch,
        )

    def __iter__(self) -> Iterator[tuple[str, object]]:
        return self

    def __next__(self) -> tuple[str, object]:
        chosen = next(self._batches)
        self.done += 1
        return self.task, _collated(chosen, self.collate_task, self.pin)

    def state_dict(self) -> dict:
        return {"batches": self.done}

    def close(self) -> None:
        self._batches.close()

    @property
    def examples(self) -> list:
        return []  # nothing held: the trainer's log line says so


@torch.no_grad()
def evaluate_finetune(
    forward: Callable[[object], dict],
    examples: Sequence[dict],
    *,
    collate_task: str,
    tokens_per_batch: int,
    device: torch.device,
    rank: int = 0,
    world: int = 1,
    all_reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
) -> dict:
    """Loss and score over `examples` (sorted by length, batches dealt round-robin over ranks).

    score: VQA's soft accuracy (the target score of the argmax answer; VE's one-hot rows make it
    plain accuracy), NLVR2's accuracy. Returns {"loss", "score", "n"}."""
    order = sorted(range(len(examples)), key=lambda i: example_tokens(examples[i], collate_task))
    batches = token_batches(examples, order, tokens_per_batch, collate_task)
    mine = batches[rank::world]
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # n, loss * n, score sum
    for indices in mine:
        batch = collate([examples[i] for i in indices], task=collate_task).to(device)
        out = forward(batch)
        scores = out["scores"].float()
        pick = scores.argmax(dim=-1)
        if batch.targets is not None:
            right = batch.targets.gather(1, pick[:, None]).squeeze(1)
        else:
            right = (pick == batch.target).float()
        n = right.shape[0]
        totals += torch.stack(
            [
                torch.tensor(float(n), device=device, dtype=torch.float64),
                out["loss"].double() * n,
                right.double().sum(),
            ]
        )
    n, loss, score = all_reduce(totals).tolist()
    return {"loss": loss / max(n, 1), "score": score / max(n, 1), "n": int(n)}


__all__ = [
    "COLLATE_TASK",
    "EpochLoader",
    "FinetuneLoader",
    "StreamingFinetuneLoader",
    "dealt_batches",
    "evaluate_finetune",
    "example_tokens",
    "examples_of",
    "greedy_fill",
    "read_examples",
    "token_batches",
]
