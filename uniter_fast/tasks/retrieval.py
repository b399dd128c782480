"""Image-text retrieval: splits, training loaders (plain and hard negatives), the full evaluation.

    split = read_retrieval_split(urls, bad=BadSamples())       # pretraining shards of one split
    scores = score_matrix(forward, split, out_dir="eval/flickr-test")  # [texts, images], resumable
    recall_at_k(scores, split.txt2img, split.img2txts)         # txt_r1 .. img_r10, r_mean

A split is read from shards in the pretraining layout (`uniter_fast.data.shards`: one sample per
image with its captions), so the converters that write pretraining shards also write retrieval
splits (`npz-captions --karpathy-split test` reads Karpathy's split JSON). A text's id is the
sample's `meta.caption_ids[j]` when the converter stored it, else `<key>/<j>`; an image's id is
its sample key.

The full evaluation scores every text against every image. The matrix is cut into chunks of
`chunk_texts` rows; rank r of W scores chunks r, r + W, ...; each finished chunk is written
atomically under `out_dir/chunks/`, so an interrupted evaluation resumes with the chunks not yet
written (any number of ranks). Within a chunk, the (text, image) sequences are packed into
batches of `tokens_per_batch` real tokens: no padding, unlike the reference's chunks of 400
images padded to the longest. The split's region features are uploaded to the device once
(`ResidentImages`) and gathered there, never copied per pair.

Recall (`recall_at_k`): image retrieval R@K is the share of texts whose image ranks in the top K
of its row; text retrieval R@K the share of images with any of their captions in the top K of
its column (the reference's `itm_eval`). Ties rank by index, as a stable sort would (the
reference's `topk` leaves them unspecified).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..data.collate import collate
from ..data.pipeline import BadSamples
from ..data.schema import BERT_BASE_CASED
from ..data.shards import iter_shard, list_shards
from ..model.downstream import rank_hinge_loss
from .finetune import EpochLoader, greedy_fill

log = logging.getLogger("uniter_fast.retrieval")

RECALL_KS = (1, 5, 10)
RECALL_KEYS = (
    "txt_r1",
    "txt_r5",
    "txt_r10",
    "txt_r_mean",
    "img_r1",
    "img_r5",
    "img_r10",
    "img_r_mean",
    "r_mean",
)


@dataclass
class RetrievalSplit:
    """Every image and text of a split. texts: [CLS] caption [SEP] ids; txt2img: each text's
    image (index); img2txts: each image's texts (indices)."""

    img_ids: list[str] = field(default_factory=list)
    images: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    txt_ids: list[str] = field(default_factory=list)
    texts: list[np.ndarray] = field(default_factory=list)
    txt2img: list[int] = field(default_factory=list)
    img2txts: list[list[int]] = field(default_factory=list)

    @property
    def num_texts(self) -> int:
        return len(self.texts)

    @property
    def num_images(self) -> int:
        return len(self.images)

    def example(self, t: int, i: int) -> dict:
        """The (text t, image i) sequence."""
        feat, loc = self.images[i]
        return {"input_ids": self.texts[t], "img_feat": feat, "img_loc": loc}

    def tokens(self, t: int, i: int) -> int:
        return len(self.texts[t]) + len(self.images[i][0])

    def fingerprint(self) -> str:
        """What identifies the split's rows and columns (a resumed evaluation checks it)."""
        h = hashlib.sha256()
        for name in (*self.txt_ids, "|", *self.img_ids):
            h.update(name.encode() + b"\0")
        return h.hexdigest()[:16]


def read_retrieval_split(
    urls: Sequence[str] | str,
    *,
    bad: BadSamples,
    max_txt_len: int | None = None,
) -> RetrievalSplit:
    """The split held in pretraining shards (bad samples skipped and counted in `bad`).
    max_txt_len: drop captions longer than this many tokens (training, as the reference)."""
    vocab = BERT_BASE_CASED
    split = RetrievalSplit()
    for url in list_shards(urls):
        for record in iter_shard(url, on_bad=bad.add_bad):
            bad.add_good(record.shard)
            names = record.meta.get("caption_ids")
            if not (isinstance(names, list) and len(names) == len(record.captions)):
                names = [f"{record.key}/{j}" for j in range(len(record.captions))]
            i = len(split.images)
            mine = []
            for name, caption in zip(names, record.captions, strict=True):
                if max_txt_len is not None and len(caption) > max_txt_len:
                    continue
                mine.append(len(split.texts))
                split.txt_ids.append(str(name))
                split.texts.append(np.array([vocab.cls_id, *caption, vocab.sep_id]))
                split.txt2img.append(i)
            if not mine:
                continue
            split.img_ids.append(record.key)
            split.images.append((record.feat, record.loc))
            split.img2txts.append(mine)
    return split


# --------------------------------------------------------------------------------------------
# Recall


def _ranks(scores: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """Rank (0-based) of column gt[r] in each row r, ties broken by index (a stable sort)."""
    rows = np.arange(scores.shape[0])
    own = scores[rows, gt][:, None]
    cols = np.arange(scores.shape[1])[None, :]
    return (scores > own).sum(1) + ((scores == own) & (cols < gt[:, None])).sum(1)


def recall_at_k(
    scores: np.ndarray | torch.Tensor,
    txt2img: Sequence[int],
    img2txts: Sequence[Sequence[int]],
    *,
    block: int = 4096,
) -> dict[str, float]:
    """Recall@1/5/10 of image retrieval (per text) and text retrieval (per image, any of its
    captions), their means and the overall mean, as the reference's `itm_eval` names them.
    scores: [texts, images]."""
    s = scores.float().cpu().numpy() if isinstance(scores, torch.Tensor) else np.asarray(scores)
    num_txt, num_img = s.shape
    if len(txt2img) != num_txt or len(img2txts) != num_img:
        raise ValueError(
            f"scores are {num_txt} x {num_img}; txt2img has {len(txt2img)} texts and img2txts "
            f"{len(img2txts)} images"
        )
    gt = np.asarray(txt2img, dtype=np.int64)
    img_rank = np.concatenate(
        [_ranks(s[a : a + block], gt[a : a + block]) for a in range(0, num_txt, block)]
    )
    # Text retrieval: column j, the best-ranked of image j's captions.
    txt_rank = np.empty(num_img, dtype=np.int64)
    for j, own in enumerate(img2txts):
        own = np.asarray(own, dtype=np.int64)
        if own.size == 0:
            raise ValueError(f"image {j} has no caption")
        col = s[:, j]
        txt_rank[j] = _ranks(np.broadcast_to(col, (own.size, num_txt)), own).min()
    out = {}
    for k in RECALL_KS:
        out[f"txt_r{k}"] = float((txt_rank < k).mean())
    out["txt_r_mean"] = sum(out[f"txt_r{k}"] for k in RECALL_KS) / len(RECALL_KS)
    for k in RECALL_KS:
        out[f"img_r{k}"] = float((img_rank < k).mean())
    out["img_r_mean"] = sum(out[f"img_r{k}"] for k in RECALL_KS) / len(RECALL_KS)
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    return out


# --------------------------------------------------------------------------------------------
# The full evaluation


def _pack_pairs(pairs, tokens: Callable[[int, int], int], budget: int) -> Iterator[list]:
    """(text, image) pairs in batches of at most `budget` real tokens, in order."""
    return greedy_fill(pairs, lambda pair: tokens(*pair), budget)


class ResidentImages:
    """Every image's region features in one table on the device, uploaded once.

    The full evaluation pairs each image with every text: collating its features into every
    batch would copy them (100 regions x 2048 fp16 = 400 KB an image) once per text, through
    the host and across PCIe. Instead the batch is collated with a one-column placeholder of the
    right length (the packer still lays out every index), and `img_feat` is gathered from this
    table on the device."""

    def __init__(self, split: RetrievalSplit, device: torch.device):
        counts = np.array([len(f) for f, _ in split.images], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
        self.counts = counts
        feats = np.concatenate([np.asarray(f) for f, _ in split.images])
        self.table = torch.from_numpy(feats).to(device)
        self._stub = np.zeros((int(counts.max()), 1), dtype=feats.dtype)

    def example(self, split: RetrievalSplit, t: int, i: int) -> dict:
        return {
            "input_ids": split.texts[t],
            "img_feat": self._stub[: self.counts[i]],
            "img_loc": split.images[i][1],
        }

    def batch(self, split: RetrievalSplit, pairs: list[tuple[int, int]], device) -> object:
        batch = collate([self.example(split, t, i) for t, i in pairs], task="retrieval")
        starts = self.offsets[[i for _, i in pairs]]
        counts = self.counts[[i for _, i in pairs]]
        # The rows of each pair's image, batch-major (the order of the packed regions).
        rows = np.repeat(starts - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
        rows += np.arange(int(counts.sum()))
        index = torch.from_numpy(rows).to(device, non_blocking=True)
        batch = batch.to(device, non_blocking=True)
        return dataclasses.replace(batch, img_feat=self.table.index_select(0, index))


@torch.no_grad()
def score_rows(
    forward: Callable[[object], dict],
    split: RetrievalSplit,
    rows: range,
    *,
    tokens_per_batch: int,
    device: torch.device,
    on_batch: Callable[[int], None] | None = None,
    images: ResidentImages | None = None,
) -> np.ndarray:
    """Scores [len(rows), images] of texts `rows` against every image (float32). images: the
    split's features already on the device (built here when not given)."""
    images = images or ResidentImages(split, device)
    out = np.empty((len(rows), split.num_images), dtype=np.float32)
    pairs = ((t, i) for t in rows for i in range(split.num_images))
    for chosen in _pack_pairs(pairs, split.tokens, tokens_per_batch):
        scores = forward(images.batch(split, chosen, device))["scores"].float().cpu().numpy()
        t_idx = np.fromiter((t - rows.start for t, _ in chosen), np.int64, len(chosen))
        i_idx = np.fromiter((i for _, i in chosen), np.int64, len(chosen))
        out[t_idx, i_idx] = scores
        if on_batch is not None:
            on_batch(len(chosen))
    return out


class _Progress:
    """Pairs scored out of this rank's total, with a rate and an ETA (stderr, or the log)."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.done, self.enabled = total, 0, enabled
        self.start, self.last = time.perf_counter(), 0.0
        self.fresh = 0  # pairs scored by this invocation (the rate's numerator)

    def skip(self, pairs: int) -> None:
        self.done += pairs

    def __call__(self, pairs: int) -> None:
        self.done += pairs
        self.fresh += pairs
        now = time.perf_counter()
        if self.enabled and (now - self.last > 2.0 or self.done == self.total):
            self.last = now
            rate = self.fresh / max(now - self.start, 1e-9)
            eta = (self.total - self.done) / rate if rate else float("nan")
            line = (
                f"retrieval: {self.done:,}/{self.total:,} pairs "
                f"({100 * self.done / self.total:.1f}%), {rate:,.0f} pairs/s, eta {eta:,.0f}s"
            )
            if sys.stderr.isatty():
                end = "\n" if self.done == self.total else ""
                print(f"\r{line}", end=end, file=sys.stderr, flush=True)
            else:
                log.info("%s", line)


def _chunk_path(out_dir: Path, k: int) -> Path:
    return out_dir / "chunks" / f"rows-{k:06d}.npy"


def _load_chunk(path: Path, shape: tuple[int, int]) -> np.ndarray | None:
    try:
        a = np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        return None
    return a if a.shape == shape and a.dtype == np.float32 else None


def _save_atomic(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _check_plan(out_dir: Path, plan: dict, rank: int) -> None:
    path = out_dir / "chunks" / "plan.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if old != plan:
            diff = sorted(k for k in plan if old.get(k) != plan[k])
            raise ValueError(
                f"{out_dir}: holds the chunks of another evaluation (different {', '.join(diff)});"
                " use another --output, or delete its chunks/ folder to start over"
            )
    elif rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(plan, indent=1) + "\n")
        os.replace(tmp, path)


def score_matrix(
    forward: Callable[[object], dict],
    split: RetrievalSplit,
    *,
    out_dir: str | os.PathLike | None = None,
    identity: str = "",
    chunk_texts: int = 64,
    tokens_per_batch: int = 8192,
    device: torch.device | str = "cpu",
    rank: int = 0,
    world: int = 1,
    barrier: Callable[[], None] = lambda: None,
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    progress: bool = True,
    on_chunk: Callable[[int], None] | None = None,
) -> np.ndarray | None:
    """The [texts, images] score matrix (float32), every text against every image.

    out_dir: where the chunks go (resumable); None keeps them in memory (a training run's
    validation: with several ranks, `all_reduce` (a sum) assembles the matrix on every rank).
    identity: what else must match for chunks to be reused (the checkpoint). Rank r scores
    chunks r, r + world, ...; with out_dir, every rank returns after the barrier, rank 0 with
    the assembled matrix, the others with None. on_chunk(n): called after each chunk this call
    scored (n so far; the evaluation CLI's fault hook kills the process there).
    """
    device = torch.device(device)
    num_chunks = max(math.ceil(split.num_texts / chunk_texts), 1)
    shapes = [
        (min(chunk_texts, split.num_texts - k * chunk_texts), split.num_images)
        for k in range(num_chunks)
    ]
    mine = list(range(rank, num_chunks, world))
    held: dict[int, np.ndarray] = {}
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        plan = {
            "split": split.fingerprint(),
            "texts": split.num_texts,
            "images": split.num_images,
            "chunk_texts": chunk_texts,
            "identity": identity,
        }
        _check_plan(out, plan, rank)
        (out / "chunks").mkdir(parents=True, exist_ok=True)
    total = sum(shapes[k][0] for k in mine) * split.num_images
    bar = _Progress(total, enabled=progress and rank == 0)
    images = ResidentImages(split, device)
    scored = 0
    for k in mine:
        if out is not None and _load_chunk(_chunk_path(out, k), shapes[k]) is not None:
            bar.skip(shapes[k][0] * split.num_images)
            continue
        rows = range(k * chunk_texts, k * chunk_texts + shapes[k][0])
        block = score_rows(
            forward,
            split,
            rows,
            tokens_per_batch=tokens_per_batch,
            device=device,
            on_batch=bar,
            images=images,
        )
        if out is not None:
            _save_atomic(_chunk_path(out, k), block)
        else:
            held[k] = block
        scored += 1
        if on_chunk is not None:
            on_chunk(scored)
    if scored and out is not None:
        log.info("retrieval: rank %d scored %d chunk(s) of %d", rank, scored, num_chunks)
    if out is None and world > 1:
        if all_reduce is None:
            raise ValueError("score_matrix: several ranks without out_dir need all_reduce")
        full = torch.zeros(split.num_texts, split.num_images, dtype=torch.float32, device=device)
        for k, block in held.items():
            full[k * chunk_texts : k * chunk_texts + shapes[k][0]] = torch.from_numpy(block)
        return all_reduce(full).cpu().numpy()
    barrier()
    if rank != 0:
        return None
    matrix = np.empty((split.num_texts, split.num_images), dtype=np.float32)
    for k in range(num_chunks):
        block = held.get(k)
        if block is None and out is not None:
            block = _load_chunk(_chunk_path(out, k), shapes[k])
        if block is None:
            raise RuntimeError(f"retrieval: chunk {k} is missing after every rank finished")
        matrix[k * chunk_texts : k * chunk_texts + shapes[k][0]] = block
    return matrix


# --------------------------------------------------------------------------------------------
# Training


def _negatives(rng: np.random.Generator, pool: np.ndarray, exclude: set[int], k: int) -> list:
    """k draws from `pool` avoiding `exclude`, distinct while the pool allows (rejection
    sampling; a pool of few candidates falls back to choosing among those left)."""
    out: list[int] = []
    for _ in range(20 * k + 100):
        if len(out) == k:
            return out
        c = int(pool[int(rng.integers(len(pool)))])
        if c not in exclude and c not in out:
            out.append(c)
    rest = pool[~np.isin(pool, np.fromiter(exclude, np.int64, len(exclude)))]
    if rest.size == 0:
        raise ValueError(
            "retrieval: no negative to draw: every candidate belongs to the positive's image"
        )
    more = rng.choice(rest, k - len(out), replace=rest.size < k - len(out))
    return out + [int(c) for c in more]


class RetrievalLoader(EpochLoader):
    """Endless ("retrieval", batch) for one rank: plain fine-tuning (the reference's
    `itm_rank_collate`): every positive (caption, its image) with `negatives` random other images
    and `negatives` random captions of other images, drawn from this rank's share of the split
    (as the reference draws from its GPU's shard). A batch holds as many groups as fill
    `tokens_per_batch` real tokens at the split's mean lengths. State (epoch, batches): a resumed
    loader continues with the very batches the uninterrupted one would have seen."""

    def __init__(
        self,
        patterns: Sequence[str],
        *,
        tokens_per_batch: int,
        seed: int,
        negatives: int = 1,
        max_txt_len: int | None = 60,
        rank: int = 0,
        world_size: int = 1,
        pin_memory: bool = False,
        state: dict | None = None,
    ):
        self.bad = BadSamples()
        self.split = read_retrieval_split(patterns, bad=self.bad, max_txt_len=max_txt_len)
        if self.split.num_images < 2 or self.split.num_texts < world_size:
            raise ValueError(
                f"retrieval: {self.split.num_images} images and {self.split.num_texts} texts: "
                f"too few to draw negatives for {world_size} rank(s)"
            )
        self.tokens_per_batch, self.seed, self.negatives = tokens_per_batch, seed, negatives
        self.rank, self.world, self.pin = rank, world_size, pin_memory
        self._start(state)

    @property
    def examples(self) -> list:
        return self.split.texts

    def _order(self) -> np.ndarray:
        """This epoch's shuffled captions (the same on every rank)."""
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.split.num_texts)

    def _equal_share(self, order: np.ndarray) -> np.ndarray:
        """This rank's deal of `order`, as long on every rank (the smallest share's)."""
        fewest = min(len(order[r :: self.world]) for r in range(self.world))
        return order[self.rank :: self.world][:fewest]

    def _group(self, t: int, rng) -> list[tuple[int, int, int]]:
        """(text, image, target) of positive t and its negatives."""
        s = self.split
        i = s.txt2img[t]
        neg_imgs = _negatives(rng, self._mine_imgs, {i}, self.negatives)
        neg_txts = _negatives(rng, self._mine, set(s.img2txts[i]), self.negatives)
        return [(t, i, 1)] + [(t, j, 0) for j in neg_imgs] + [(u, i, 0) for u in neg_txts]

    def _plan(self) -> list[list[int]]:
        order = self._order()
        # The negatives' pools: this rank's whole share of the captions and their images.
        self._mine = np.sort(order[self.rank :: self.world])
        imgs = np.unique(np.asarray(self.split.txt2img)[self._mine])
        # Another image must exist to draw from: a rank holding one image draws from all.
        self._mine_imgs = imgs if imgs.size > 1 else np.arange(self.split.num_images)
        mean_len = np.mean([len(x) for x in self.split.texts]) + np.mean(
            [len(f) for f, _ in self.split.images]
        )
        per_batch = max(int(self.tokens_per_batch // ((1 + 2 * self.negatives) * mean_len)), 1)
        mine = self._equal_share(order)
        return [list(mine[a : a + per_batch]) for a in range(0, len(mine), per_batch)]

    def __next__(self):
        index, positives = self._take()
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, index])
        examples = []
        for t in positives:
            for u, i, target in self._group(int(t), rng):
                examples.append(self.split.example(u, i) | {"target": target})
        batch = collate(examples, task="retrieval")
        return "retrieval", batch.pin_memory() if self.pin else batch

    def close(self) -> None:
        pass


@dataclass
class HardNegativeWork:
    """One micro-step of hard-negative training, not yet mined: `groups` of (text, image)
    candidates, each a positive then its `negative_size` random negatives (captions to images,
    then images to captions). The plug-in scores them without gradients, keeps each group's
    `hard_neg_size` best-scoring negatives and trains on those (`mine_and_train`).

    num_tokens / num_pairs count the candidates scored (the step's dominant work)."""

    split: RetrievalSplit
    groups: list[list[tuple[int, int]]]
    hard_neg_size: int = 31
    tokens_per_batch: int = 8192
    device: torch.device | None = None
    pin: bool = False

    def to(self, device, non_blocking: bool = False) -> HardNegativeWork:
        self.device = torch.device(device)
        return self

    @property
    def num_tokens(self) -> int:
        return sum(self.split.tokens(t, i) for g in self.groups for t, i in g)

    @property
    def num_pairs(self) -> int:
        return sum(len(g) for g in self.groups)


class HardNegativeLoader(RetrievalLoader):
    """Endless ("retrieval", HardNegativeWork): per micro-step, `positives` captions each with its
    image and `negative_size` random other images, and `positives` images each with one of its
    captions and `negative_size` random captions of other images (the reference's two
    directions; its sizes are 399 and one positive per GPU and micro-step). Candidates come from
    the whole split, as the reference samples them. State as `RetrievalLoader`."""

    def __init__(
        self,
        *args,
        negative_size: int = 399,
        hard_neg_size: int = 31,
        positives: int = 1,
        **kw,
    ):
        super().__init__(*args, **kw)
        self.negative_size, self.hard_neg_size, self.positives = (
            negative_size,
            hard_neg_size,
            positives,
        )

    def _plan(self) -> list[list[int]]:
        mine, p = self._equal_share(self._order()), self.positives
        return [list(mine[a : a + p]) for a in range(0, len(mine) - p + 1, p)] or [list(mine)]

    def __next__(self):
        index, positives = self._take()
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, index])
        s = self.split
        all_imgs, all_txts = np.arange(s.num_images), np.arange(s.num_texts)
        k = min(self.negative_size, s.num_images - 1)
        groups = []
        for t in positives:
            t = int(t)
            i = s.txt2img[t]
            groups.append([(t, i)] + [(t, j) for j in _negatives(rng, all_imgs, {i}, k)])
        for t in positives:
            i = s.txt2img[int(t)]
            pos = int(rng.choice(s.img2txts[i]))
            neg = _negatives(rng, all_txts, set(s.img2txts[i]), self.negative_size)
            groups.append([(pos, i)] + [(u, i) for u in neg])
        work = HardNegativeWork(s, groups, self.hard_neg_size, self.tokens_per_batch, pin=self.pin)
        return "retrieval", work


def mine_and_train(engine, work: HardNegativeWork) -> dict:
    """Score `work`'s candidates in eval mode without gradients (packed, `work.tokens_per_batch`
    real tokens a batch), keep each group's `work.hard_neg_size` best-scoring negatives, run the
    training forward on [positive, hard negatives] of every group. The loss is the mean hinge
    over each direction's negatives, summed over the two directions (the reference's two
    backward passes)."""
    s = work.split
    hard_neg_size = work.hard_neg_size
    flat = [pair for g in work.groups for pair in g]
    scores = np.empty(len(flat), dtype=np.float32)
    module = engine.module
    was_training = module.training
    engine.eval()
    with torch.no_grad():
        start = 0
        for chosen in _pack_pairs(iter(flat), s.tokens, work.tokens_per_batch):
            batch = collate([s.example(t, i) for t, i in chosen], task="retrieval")
            out = engine(batch.to(work.device, non_blocking=True))
            scores[start : start + len(chosen)] = out["scores"].float().cpu().numpy()
            start += len(chosen)
    engine.train(was_training)
    examples, offset = [], 0
    for g in work.groups:
        own = scores[offset : offset + len(g)]
        offset += len(g)
        keep = min(hard_neg_size, len(g) - 1)
        hard = 1 + np.argsort(-own[1:], kind="stable")[:keep]
        for n, j in enumerate([0, *hard.tolist()]):
            t, i = g[j]
            examples.append(s.example(t, i) | {"target": int(n == 0)})
    batch = collate(examples, task="retrieval")
    if work.pin:
        batch = batch.pin_memory()
    batch = batch.to(work.device, non_blocking=True)
    scores = engine(batch)["scores"]
    # The first half of the groups ranks images for a caption, the second captions for an image.
    half = sum(min(hard_neg_size, len(g) - 1) + 1 for g in work.groups[: len(work.groups) // 2])
    margin = module.margin
    loss = rank_hinge_loss(scores[:half], batch.target[:half], margin) + rank_hinge_loss(
        scores[half:], batch.target[half:], margin
    )
    return {"loss": loss}


__all__ = [
    "RECALL_KEYS",
    "HardNegativeLoader",
    "HardNegativeWork",
    "RetrievalLoader",
    "RetrievalSplit",
    "mine_and_train",
    "read_retrieval_split",
    "recall_at_k",
    "score_matrix",
    "score_rows",
]
