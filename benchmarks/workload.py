"""The UNITER workload the step benchmarks share: pairs, task batches, their shapes and FLOPs.

    from workload import make_pairs, fill_task_batches, BatchShape, train_flops

Pairs are synthetic images (10..100 regions, median 32, mean about 37) with captions of 8..60
tokens (median 13, mean about 15; [CLS]/[SEP] added), from `uniter_fast.data.synthetic`, turned
into task examples by `uniter_fast.tasks.build_example` (ITM: half the images swapped for
negatives). Batches hold up to a real-token budget (text tokens + regions), filled in random
order or sorted by length within pools of 8192 pairs and then shuffled, as the authors'
`TokenBucketSampler` does ("bucketed").

FLOPs (`BatchShape.forward_flops`, `train_flops`) count matrix products only, 2 per multiply-add,
from the real lengths of each sequence; a training step is 3x its forward (the backward computes
the gradients of both operands of every product). What is counted, per micro-batch:

- encoder: 2 x (its matmul weights) per position, plus 4 x L x hidden per position and layer
  for attention's two products over a sequence of length L;
- region embedder: 2 x 2048 x hidden per region (`img_linear`; `pos_linear` is 7 wide, left out);
- heads, on the rows the task selects: MLM transform and tied decoder (hidden x vocab) per
  masked token; MRFR transform and the 2048-wide regression per masked region; MRC transform
  and the 1601-way classifier per masked region; ITM pooler and its 2-way output per pair, and
  WRA's cosine cost (hidden per text-region pair of positions).

Not counted: the IPOT iterations (element-wise and matrix-vector work on the cost matrix, about
200 FLOPs per text-region pair per 50 iterations), LayerNorm, GELU, softmax, dropout, embedding
lookups and the optimizer: memory-bound work that a FLOP count should not reward.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from uniter_fast.config import UniterConfig
from uniter_fast.data.schema import IMG_DIM, IMG_LABEL_DIM, MAX_CAPTION_TOKENS, MAX_REGIONS
from uniter_fast.data.synthetic import generate_images
from uniter_fast.tasks import NegativeImageSampler, build_example

# The authors' TokenBucketSampler sorts pairs by length within buckets of this many (BUCKET_SIZE
# in their utils/const.py) before filling batches.
BUCKET_PAIRS = 8192
# Longest example: 60 caption tokens, [CLS], [SEP] and 100 regions. A budget below it cannot hold
# every example.
MAX_EXAMPLE_TOKENS = MAX_CAPTION_TOKENS + 2 + MAX_REGIONS
ATTENTION_PAD_MULTIPLE = 8  # the packed model's padded attention view (collate.PAD_MULTIPLE)
ORDERS = ("random", "bucketed")


def make_pairs(min_tokens: int, min_pairs: int, seed: int):
    """(caption, image) pairs of synthetic images, all captions of each image, until the pairs
    hold at least `min_tokens` real tokens and number at least `min_pairs`.

    Returns (pairs, negatives): a list of (caption int32 [L], ImageRecord), and a
    NegativeImageSampler holding every generated image (ITM's negatives).
    """
    pairs, images, tokens = [], [], 0
    for image in generate_images(10**9, seed=seed):
        images.append(image)
        for caption in image.captions:
            pairs.append((caption, image))
            tokens += len(caption) + 2 + image.num_regions
        if tokens >= min_tokens and len(pairs) >= min_pairs:
            break
    negatives = NegativeImageSampler(capacity=len(images))
    for image in images:
        negatives.add(image)
    return pairs, negatives


def pairs_needed(batches: int, tokens_per_batch: int) -> int:
    """Real tokens that `make_pairs` must generate for `batches` full batches of a budget (the
    fill leaves at most one example's room unused per batch)."""
    return batches * (tokens_per_batch + MAX_EXAMPLE_TOKENS) + MAX_EXAMPLE_TOKENS


def example_tokens(example: dict) -> int:
    return int(len(example["input_ids"]) + len(example["img_feat"]))


def fill_batches(lengths: list[int], order: np.ndarray, budget: int) -> list[list[int]]:
    """Greedy fill in `order`: a batch takes examples while its real tokens stay within `budget`.

    The last, partly filled batch is dropped, so every batch is full up to one example.
    """
    batches, current, used = [], [], 0
    for i in order:
        if used + lengths[i] > budget:
            batches.append(current)
            current, used = [], 0
        current.append(int(i))
        used += lengths[i]
    return batches


def fill_task_batches(
    task: str,
    pairs,
    negatives,
    *,
    count: int,
    tokens_per_batch: int,
    order: str,
    seed: int,
) -> list[list[dict]]:
    """`count` lists of examples of `task`, each within `tokens_per_batch` real tokens.

    order: "random" (no length bucketing) or "bucketed" (the authors' sampler: shuffle, sort
    pools of 8192 longest first, fill, shuffle the batches).
    """
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    rng = np.random.default_rng([seed, zlib.crc32(task.encode())])
    examples = [
        build_example(task, caption, image, rng, negatives=negatives) for caption, image in pairs
    ]
    lengths = [example_tokens(ex) for ex in examples]
    order_rng = np.random.default_rng([seed, 1])
    if order == "random":
        batches = fill_batches(lengths, order_rng.permutation(len(examples)), tokens_per_batch)
        chosen = batches[:count]
    else:
        ids = order_rng.permutation(len(examples))
        ids = np.concatenate(
            [
                sorted(ids[i : i + BUCKET_PAIRS], key=lambda j: -lengths[j])
                for i in range(0, len(ids), BUCKET_PAIRS)
            ]
        ).astype(np.int64)
        batches = fill_batches(lengths, ids, tokens_per_batch)
        chosen = [batches[i] for i in order_rng.permutation(len(batches))[:count]]
    if len(chosen) < count:
        raise RuntimeError(
            f"{task}: built {len(chosen)} full batches, {count} asked (generate more pairs)"
        )
    return [[examples[i] for i in batch] for batch in chosen]


def encoder_matmul_params(config: UniterConfig) -> int:
    """Weights of the encoder's matmuls: per layer QKV + output (4 h^2) and FFN (2 h f)."""
    h, f = config.hidden_size, config.intermediate_size
    return config.num_hidden_layers * (4 * h * h + 2 * h * f)


@dataclass(frozen=True)
class BatchShape:
    """Sizes of one batch: B pairs, their text and region lengths, the task's target counts.

    masked_tokens: MLM targets; masked_regions: MRM targets (0 where the task has none).
    """

    txt_len: tuple[int, ...]
    img_len: tuple[int, ...]
    masked_tokens: int = 0
    masked_regions: int = 0

    @classmethod
    def of(cls, examples: list[dict], task: str | None = None) -> BatchShape:
        masked_tokens = masked_regions = 0
        if task == "mlm":
            masked_tokens = sum(int((np.asarray(ex["txt_labels"]) != -1).sum()) for ex in examples)
        elif task in ("mrfr", "mrc", "mrckl"):
            masked_regions = sum(int(np.asarray(ex["img_mask"]).sum()) for ex in examples)
        return cls(
            tuple(len(ex["input_ids"]) for ex in examples),
            tuple(len(ex["img_feat"]) for ex in examples),
            masked_tokens,
            masked_regions,
        )

    @property
    def pairs(self) -> int:
        return len(self.txt_len)

    @property
    def seq_len(self) -> list[int]:
        return [t + i for t, i in zip(self.txt_len, self.img_len, strict=True)]

    @property
    def real_tokens(self) -> int:
        return sum(self.txt_len) + sum(self.img_len)

    @property
    def max_len(self) -> int:
        return max(self.seq_len)

    @property
    def authors_tokens(self) -> int:
        """Positions the authors' encoder computes on: B x max(txt_len + img_len)."""
        return self.pairs * self.max_len

    def forward_flops(self, config: UniterConfig, padded: bool) -> int:
        """Forward FLOPs of the encoder and the region embedder's matmul (heads excluded: every
        provider runs them on the same selected rows).

        `padded`: on the authors' B x max_len positions and B x max(img_len) regions; else on
        the real ones only.
        """
        h, n = config.hidden_size, config.num_hidden_layers
        params = encoder_matmul_params(config)
        if padded:
            b, length = self.pairs, self.max_len
            encoder = 2 * params * b * length + 4 * n * h * b * length * length
            regions = b * max(self.img_len)
        else:
            encoder = sum(2 * params * L + 4 * n * h * L * L for L in self.seq_len)
            regions = sum(self.img_len)
        return encoder + 2 * IMG_DIM * h * regions

    def head_forward_flops(self, config: UniterConfig, task: str, wra: bool = True) -> int:
        """Forward FLOPs of `task`'s head on its selected rows (see the module docstring)."""
        h = config.hidden_size
        if task == "mlm":
            return self.masked_tokens * (2 * h * h + 2 * h * config.vocab_size)
        if task == "mrfr":
            return self.masked_regions * (2 * h * h + 2 * h * IMG_DIM)
        if task in ("mrc", "mrckl"):
            return self.masked_regions * (2 * h * h + 2 * h * IMG_LABEL_DIM)
        if task == "itm":
            cost = sum(2 * h * t * i for t, i in zip(self.txt_len, self.img_len, strict=True))
            return self.pairs * (2 * h * h + 2 * h * 2) + (cost if wra else 0)
        raise ValueError(f"unknown task {task!r}")

    def to_dict(self, config: UniterConfig) -> dict:
        lpad = -(-self.max_len // ATTENTION_PAD_MULTIPLE) * ATTENTION_PAD_MULTIPLE
        return {
            "pairs": self.pairs,
            "real_tokens": self.real_tokens,
            "txt_tokens": sum(self.txt_len),
            "img_tokens": sum(self.img_len),
            "max_txt_len": max(self.txt_len),
            "max_img_len": max(self.img_len),
            "max_len": self.max_len,
            "authors_tokens": self.authors_tokens,
            "authors_txt_tokens": self.pairs * max(self.txt_len),
            "authors_img_tokens": self.pairs * max(self.img_len),
            "packed_attention_tokens": self.pairs * lpad,
            "flops_forward_real": self.forward_flops(config, padded=False),
            "flops_forward_authors": self.forward_flops(config, padded=True),
        }


def train_flops(config: UniterConfig, shape: BatchShape, task: str, wra: bool = True) -> int:
    """Useful FLOPs of one training micro-batch (forward + backward = 3x the forward) on the
    real positions: encoder, region embedder and the task's head (module docstring)."""
    forward = shape.forward_flops(config, padded=False) + shape.head_forward_flops(
        config, task, wra
    )
    return 3 * forward


def shape_summary(shapes: list[BatchShape], config: UniterConfig) -> dict:
    per_batch = [shape.to_dict(config) for shape in shapes]

    def total(key: str) -> int:
        return sum(b[key] for b in per_batch)

    real = total("real_tokens")
    return {
        "per_batch": per_batch,
        "real_tokens_per_batch_mean": real / len(per_batch),
        "pairs_per_batch_mean": total("pairs") / len(per_batch),
        # Fractions of the positions computed on that hold no real token, over all batches.
        "padding_fraction": 1 - real / total("authors_tokens"),
        "txt_padding_fraction": 1 - total("txt_tokens") / total("authors_txt_tokens"),
        "img_padding_fraction": 1 - total("img_tokens") / total("authors_img_tokens"),
        "packed_attention_padding_fraction": 1 - real / total("packed_attention_tokens"),
        "flops_ratio_authors_over_real": total("flops_forward_authors")
        / total("flops_forward_real"),
    }
