"""Synthetic UNITER shards with a simple, learnable cross-modal structure.

Run (writes 600 images in 3 shards, in about a second):

    python -m uniter_fast.data.synthetic data/synthetic --images 600 --seed 0

A fixed "world" (drawn from `world_seed`) holds `num_concepts` object concepts. Each concept has a
Visual Genome class id (1..1600, distinct), a caption word (a WordPiece id in the vocabulary's
word range) and a prototype feature vector (non-negative, like ReLU-pooled detector features).
A small set of filler words, caption openers and clause templates (filler sequences with one
concept slot) make the words around the concepts predictable from context.

Each image shows 1..4 distinct concepts ("objects"). Every region belongs to one object (each
object gets at least one region): its feature is the concept prototype plus a per-object offset
plus per-region noise; its box lies near the object's box; its soft label puts 0.55..0.9 of the
mass on the object's class (on a random class with a small probability, like a detector error),
a little on background and on 1..3 other classes. Every caption mentions each object's word
(in a random order, inside template clauses) and may mention some again.

So every pretraining task has signal: MLM predicts concept words from the regions and filler
words from the template; MRFR/MRC predict a masked region from its object's other regions (same
prototype, nearby boxes) and the caption; ITM tells a caption from another image's (different
concepts). Train and validation splits share `world_seed` and use different `seed`s.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .schema import (
    BERT_BASE_CASED,
    IMG_DIM,
    IMG_LABEL_DIM,
    MAX_CAPTION_TOKENS,
    MAX_REGIONS,
    MIN_REGIONS,
    Vocab,
)
from .shards import ImageRecord, ShardWriter

__all__ = ["SyntheticSpec", "SyntheticWorld", "generate_images", "make_world", "write_synthetic"]

# Entropy tags keep the world's random stream apart from the images' streams.
_WORLD_STREAM = 0x5EED_0001
_IMAGE_STREAM = 0x5EED_0002
# Spread (log-space std) of the skewed region-count and caption-length distributions: with the
# default medians it gives a mean of about 37 regions and captions of mostly 10..20 tokens
# (mean 15), with a tail to the maxima.
_SKEW_SIGMA = 0.6


@dataclass(frozen=True)
class SyntheticSpec:
    """What the synthetic images and captions look like.

    num_concepts: object concepts in the world (distinct class ids and caption words).
    min_objects / max_objects: distinct concepts per image.
    min_regions / max_regions: regions per image: a log-normal count with median
        `median_regions`, clamped to the bounds like the detector's clamp(#(conf > 0.2), 10, 100)
        (the default gives a mean of about 37, a few percent at each bound).
    captions_per_image: captions per image (pairs per image).
    min_caption_tokens / max_caption_tokens: caption length without [CLS]/[SEP];
        median_caption_tokens sets the skew. A caption is longer than its drawn length when
        mentioning all of the image's objects takes more tokens (never above the maximum).
    feature_noise: std of the per-region Gaussian noise on features.
    instance_noise: std of a per-object offset shared by the object's regions.
    label_flip_prob: probability that a region's soft label peaks on a random wrong class.
    num_fillers: filler (function) words; num_openers / num_templates: caption openers and
        clause templates built from them; max_clause_fillers: a clause is its concept word and
        1..max_clause_fillers fillers (fewer fillers: concept words are denser in captions).
    vocab: the vocabulary the word ids come from (its word range, special ids avoided).
    """

    num_concepts: int = 8
    min_objects: int = 1
    max_objects: int = 2
    min_regions: int = MIN_REGIONS
    max_regions: int = MAX_REGIONS
    median_regions: int = 32
    captions_per_image: int = 5
    min_caption_tokens: int = 8
    max_caption_tokens: int = MAX_CAPTION_TOKENS
    median_caption_tokens: int = 13
    feature_noise: float = 0.5
    instance_noise: float = 0.25
    label_flip_prob: float = 0.05
    num_fillers: int = 30
    num_openers: int = 4
    num_templates: int = 8
    max_clause_fillers: int = 1
    vocab: Vocab = BERT_BASE_CASED

    def __post_init__(self) -> None:
        ints = [f.name for f in dataclasses.fields(self) if f.type in ("int", int)]
        for name in ints:
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise ValueError(f"SyntheticSpec.{name} must be a positive integer, got {value!r}")

        def ordered(lo: str, mid: str | None, hi: str, top: int | None = None) -> None:
            names = [n for n in (lo, mid, hi) if n]
            values = [getattr(self, n) for n in names]
            if values != sorted(values):
                shown = " <= ".join(f"{n} ({v})" for n, v in zip(names, values, strict=True))
                raise ValueError(f"SyntheticSpec needs {shown}")
            if top is not None and getattr(self, hi) > top:
                raise ValueError(
                    f"SyntheticSpec.{hi} must be at most {top}, got {getattr(self, hi)}"
                )

        ordered("min_objects", None, "max_objects")
        ordered("min_regions", "median_regions", "max_regions", MAX_REGIONS)
        ordered(
            "min_caption_tokens", "median_caption_tokens", "max_caption_tokens", MAX_CAPTION_TOKENS
        )
        if self.max_objects > self.num_concepts:
            raise ValueError(
                f"SyntheticSpec.max_objects ({self.max_objects}) must be at most num_concepts "
                f"({self.num_concepts}): an image's objects are distinct concepts"
            )
        if self.num_concepts > IMG_LABEL_DIM - 1:
            raise ValueError(
                f"SyntheticSpec.num_concepts must be at most {IMG_LABEL_DIM - 1} (one distinct "
                f"detector class each), got {self.num_concepts}"
            )
        if self.max_objects > self.min_regions:
            raise ValueError(
                f"SyntheticSpec.max_objects ({self.max_objects}) must be at most min_regions "
                f"({self.min_regions}): every object gets at least one region"
            )
        if self.max_objects > self.max_caption_tokens:
            raise ValueError(
                f"SyntheticSpec.max_objects ({self.max_objects}) must be at most "
                f"max_caption_tokens ({self.max_caption_tokens}): every caption names every object"
            )
        for name in ("feature_noise", "instance_noise"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and np.isfinite(value) and value >= 0):
                raise ValueError(
                    f"SyntheticSpec.{name} must be a finite number >= 0, got {value!r}"
                )
        if not 0.0 <= self.label_flip_prob <= 1.0:
            raise ValueError(
                f"SyntheticSpec.label_flip_prob must be in [0, 1], got {self.label_flip_prob!r}"
            )
        if not isinstance(self.vocab, Vocab):
            raise ValueError(
                f"SyntheticSpec.vocab must be a Vocab, got {type(self.vocab).__name__}"
            )
        needed = self.num_concepts + self.num_fillers
        if len(_word_ids(self.vocab)) < needed:
            raise ValueError(
                f"SyntheticSpec.vocab word range [{self.vocab.word_start}, {self.vocab.word_end}) "
                f"holds fewer than num_concepts + num_fillers = {needed} usable ids"
            )


def _word_ids(vocab: Vocab) -> np.ndarray:
    ids = np.arange(vocab.word_start, vocab.word_end)
    specials = [vocab.pad_id, vocab.unk_id, vocab.cls_id, vocab.sep_id, vocab.mask_id]
    return ids[~np.isin(ids, specials)]


@dataclass(frozen=True, eq=False)
class SyntheticWorld:
    """The fixed structure shared by every split drawn with the same (spec, world_seed).

    class_ids: int64 [C] detector class (1..1600) of each concept, distinct.
    concept_words: int64 [C] caption word id of each concept, distinct.
    fillers: int64 [F] filler word ids (disjoint from the concept words).
    prototypes: float32 [C, 2048] non-negative feature prototypes.
    openers: caption openers, tuples of filler ids.
    templates: clause templates, tuples of filler ids with -1 at the concept slot.
    """

    class_ids: np.ndarray
    concept_words: np.ndarray
    fillers: np.ndarray
    prototypes: np.ndarray
    openers: tuple[tuple[int, ...], ...]
    templates: tuple[tuple[int, ...], ...]


@functools.lru_cache(maxsize=8)
def make_world(spec: SyntheticSpec = SyntheticSpec(), world_seed: int = 0) -> SyntheticWorld:
    """Draw the world of `spec` from `world_seed` (cached; the same inputs give the same world)."""
    _check_seed("world_seed", world_seed)
    rng = np.random.default_rng([_WORLD_STREAM, world_seed])
    c, f = spec.num_concepts, spec.num_fillers
    class_ids = rng.choice(np.arange(1, IMG_LABEL_DIM), size=c, replace=False)
    words = rng.choice(_word_ids(spec.vocab), size=c + f, replace=False)
    prototypes = np.maximum(rng.standard_normal((c, IMG_DIM), dtype=np.float32), 0)
    fillers = words[c:]
    openers = tuple(
        tuple(int(t) for t in rng.choice(fillers, size=rng.integers(1, 3)))
        for _ in range(spec.num_openers)
    )
    templates = []
    for _ in range(spec.num_templates):
        body = [
            int(t) for t in rng.choice(fillers, size=rng.integers(1, spec.max_clause_fillers + 1))
        ]
        body.insert(int(rng.integers(0, len(body) + 1)), -1)
        templates.append(tuple(body))
    world = SyntheticWorld(
        class_ids=class_ids,
        concept_words=words[:c].copy(),
        fillers=fillers.copy(),
        prototypes=prototypes,
        openers=openers,
        templates=tuple(templates),
    )
    # The world is cached and shared: read-only so that no caller can change it for the others.
    for array in (world.class_ids, world.concept_words, world.fillers, world.prototypes):
        array.flags.writeable = False
    return world


def _check_seed(name: str, value: int) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")


def _skewed(rng: np.random.Generator, lo: int, median: int, hi: int) -> int:
    """lo + a log-normal draw with median `median - lo`, clipped to `hi`."""
    if median == lo:
        return lo
    return min(hi, lo + round(float(rng.lognormal(np.log(median - lo), _SKEW_SIGMA))))


def _caption(
    rng: np.random.Generator, world: SyntheticWorld, words: np.ndarray, spec: SyntheticSpec
) -> np.ndarray:
    """One caption (int32 [len]) that names every word in `words` at least once."""
    target = _skewed(
        rng, spec.min_caption_tokens, spec.median_caption_tokens, spec.max_caption_tokens
    )
    templates = world.templates

    def clause(word: int) -> list[int]:
        template = templates[rng.integers(len(templates))]
        return [word if t < 0 else t for t in template]

    order = words[rng.permutation(len(words))]
    tokens = list(world.openers[rng.integers(len(world.openers))])
    for word in order:
        tokens += clause(int(word))
    if len(tokens) > spec.max_caption_tokens:  # only with tight length limits
        tokens = [int(w) for w in order]
    required = len(tokens)
    while len(tokens) < target:  # mention objects again until the drawn length is reached
        tokens += clause(int(words[rng.integers(len(words))]))
    return np.asarray(tokens[: max(target, required)], dtype=np.int32)


def _image(
    i: int, seed: int, spec: SyntheticSpec, world: SyntheticWorld, world_seed: int, key: str
) -> ImageRecord:
    # One generator per image: image i is the same whatever num_images is, and shards can be
    # written in parallel slices later without changing the data.
    rng = np.random.default_rng([_IMAGE_STREAM, world_seed, seed, i])
    k = int(rng.integers(spec.min_objects, spec.max_objects + 1))
    concepts = rng.choice(spec.num_concepts, size=k, replace=False)
    # Like a detector's clamp(#(conf > 0.2), 10, 100): a log-normal count, clamped (so a few
    # percent of the images sit at each bound).
    drawn = round(float(rng.lognormal(np.log(spec.median_regions), _SKEW_SIGMA)))
    n = max(k, min(spec.max_regions, max(spec.min_regions, drawn)))

    # Region -> object: one region each first, the rest by object "size" weights.
    weights = rng.dirichlet(np.full(k, 2.0))
    region_obj = np.concatenate([np.arange(k), rng.choice(k, size=n - k, p=weights)])
    region_obj = region_obj[rng.permutation(n)]
    region_concept = concepts[region_obj]

    feat = world.prototypes[region_concept]  # fancy indexing: a fresh float32 [n, 2048]
    if spec.instance_noise:
        offsets = rng.standard_normal((k, IMG_DIM), dtype=np.float32) * spec.instance_noise
        feat += offsets[region_obj]
    if spec.feature_noise:
        feat += rng.standard_normal((n, IMG_DIM), dtype=np.float32) * np.float32(spec.feature_noise)
    np.maximum(feat, 0, out=feat)
    feat = feat.astype(np.float16)

    # Boxes: regions scatter around their object's box and stay inside the image.
    obj_size = rng.uniform(0.15, 0.7, size=(k, 2))
    obj_center = rng.uniform(0.2, 0.8, size=(k, 2))
    size = np.clip(obj_size[region_obj] * rng.uniform(0.5, 1.2, size=(n, 2)), 0.02, 1.0)
    center = obj_center[region_obj] + rng.normal(0.0, 0.08, size=(n, 2)) * obj_size[region_obj]
    center = np.clip(center, size / 2, 1 - size / 2)
    lo, hi = center - size / 2, center + size / 2
    wh = hi - lo
    loc = np.concatenate([lo, hi, wh, wh[:, :1] * wh[:, 1:]], axis=1).astype(np.float32)

    # Soft labels: peak on the object's class, the rest on background and 1..3 other classes.
    peak_class = world.class_ids[region_concept].copy()
    flip = rng.random(n) < spec.label_flip_prob
    peak_class[flip] = rng.integers(1, IMG_LABEL_DIM, size=int(flip.sum()))
    peak = rng.uniform(0.55, 0.9, size=n)
    spread = rng.gamma(1.0, size=(n, 4))
    spread[:, 1:] *= np.arange(3) < rng.integers(1, 4, size=n)[:, None]
    spread *= ((1.0 - peak) / spread.sum(axis=1))[:, None]
    others = rng.integers(1, IMG_LABEL_DIM, size=(n, 3))
    soft = np.zeros((n, IMG_LABEL_DIM), dtype=np.float32)
    rows = np.arange(n)
    soft[:, 0] = spread[:, 0]
    np.add.at(soft, (np.repeat(rows, 3), others.ravel()), spread[:, 1:].ravel())
    np.add.at(soft, (rows, peak_class), peak)  # add.at: a distractor may share the class
    soft = soft.astype(np.float16)

    words = world.concept_words[concepts]
    captions = [_caption(rng, world, words, spec) for _ in range(spec.captions_per_image)]
    for array in (feat, loc, soft, *captions):
        array.flags.writeable = False
    meta = {
        "image_id": key,
        "dataset": "synthetic",
        "width": int(rng.integers(320, 641)),
        "height": int(rng.integers(240, 481)),
        "objects": [int(c) for c in concepts],
    }
    return ImageRecord(key=key, feat=feat, loc=loc, soft=soft, captions=captions, meta=meta)


def generate_images(
    num_images: int,
    *,
    seed: int,
    spec: SyntheticSpec = SyntheticSpec(),
    world_seed: int = 0,
    key_prefix: str = "synthetic",
) -> Iterator[ImageRecord]:
    """Yield `num_images` synthetic images; the same arguments give the same records.

    Keys are `f"{key_prefix}_{seed}_{i:07d}"`; image i does not depend on `num_images`. Use the
    same `world_seed` and different `seed`s for the splits of one dataset.
    """
    if not isinstance(num_images, (int, np.integer)) or isinstance(num_images, bool):
        raise TypeError(f"num_images must be an int, got {type(num_images).__name__}")
    if num_images < 0:
        raise ValueError(f"num_images must be >= 0, got {num_images}")
    _check_seed("seed", seed)
    if not isinstance(spec, SyntheticSpec):
        raise TypeError(f"spec must be a SyntheticSpec, got {type(spec).__name__}")
    if not key_prefix or "." in key_prefix or "/" in key_prefix:
        raise ValueError(f"key_prefix must be non-empty without '.' or '/', got {key_prefix!r}")
    world = make_world(spec, world_seed)
    for i in range(num_images):
        yield _image(i, seed, spec, world, world_seed, f"{key_prefix}_{seed}_{i:07d}")


@dataclass
class _Totals:
    images: int = 0
    pairs: int = 0
    regions: int = 0


def _write(
    out_dir: str | os.PathLike,
    num_images: int,
    *,
    seed: int,
    spec: SyntheticSpec,
    world_seed: int,
    images_per_shard: int,
    prefix: str,
    progress: bool,
    overwrite: bool,
) -> tuple[list[Path], _Totals]:
    from tqdm import tqdm

    if images_per_shard < 1:
        raise ValueError(f"images_per_shard must be >= 1, got {images_per_shard}")
    records = generate_images(num_images, seed=seed, spec=spec, world_seed=world_seed)
    totals = _Totals()
    with (
        ShardWriter(
            out_dir,
            prefix=prefix,
            max_samples=images_per_shard,
            overwrite=overwrite,
            vocab=spec.vocab,
        ) as writer,
        tqdm(total=num_images, unit="img", disable=not progress, leave=False) as bar,
    ):
        for record in records:
            writer.write(record)
            totals.images += 1
            totals.pairs += len(record.captions)
            totals.regions += record.num_regions
            bar.update()
    return writer.paths, totals


def write_synthetic(
    out_dir: str | os.PathLike,
    num_images: int,
    *,
    seed: int = 0,
    spec: SyntheticSpec = SyntheticSpec(),
    world_seed: int = 0,
    images_per_shard: int = 200,
    prefix: str = "synthetic",
    progress: bool = False,
    overwrite: bool = True,
) -> list[Path]:
    """Write `generate_images(num_images, seed=seed, ...)` as `{prefix}-NNNNNN.tar` shards.

    overwrite: existing `{prefix}-NNNNNN.tar` shards in `out_dir` are replaced (the data is
        cheap to regenerate); with False they raise FileExistsError.
    Returns the shard paths in order.
    """
    paths, _ = _write(
        out_dir,
        num_images,
        seed=seed,
        spec=spec,
        world_seed=world_seed,
        images_per_shard=images_per_shard,
        prefix=prefix,
        progress=progress,
        overwrite=overwrite,
    )
    return paths


def _int_at_least(minimum: int, what: str):
    """An argparse type: an integer >= minimum, else a one-line error naming `what`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected a {what} integer, got {text!r}")
        return value

    return parse


_positive_int = _int_at_least(1, "positive")
_seed = _int_at_least(0, "non-negative")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m uniter_fast.data.synthetic",
        description="Write synthetic UNITER shards with learnable image-text structure.",
    )
    parser.add_argument("out_dir", type=Path, help="output directory (created if missing)")
    parser.add_argument("--images", type=_positive_int, required=True, help="number of images")
    parser.add_argument("--seed", type=_seed, default=0, help="split seed (default 0)")
    parser.add_argument("--world-seed", type=_seed, default=0, help="world seed (default 0)")
    parser.add_argument(
        "--images-per-shard", type=_positive_int, default=200, help="images per shard (200)"
    )
    parser.add_argument("--prefix", default="synthetic", help="shard name prefix (synthetic)")
    parser.add_argument(
        "--no-overwrite",
        action="store_true",
        help="refuse to replace existing PREFIX-NNNNNN.tar shards in OUT_DIR",
    )
    args = parser.parse_args(argv)
    try:
        paths, totals = _write(
            args.out_dir,
            args.images,
            seed=args.seed,
            spec=SyntheticSpec(),
            world_seed=args.world_seed,
            images_per_shard=args.images_per_shard,
            prefix=args.prefix,
            progress=sys.stderr.isatty(),
            overwrite=not args.no_overwrite,
        )
    except (OSError, ValueError) as e:
        detail = f"{e.strerror}: {e.filename}" if isinstance(e, OSError) and e.strerror else e
        parser.exit(1, f"{parser.prog}: error: {detail}\n")
    size = sum(p.stat().st_size for p in paths)
    for path in paths:
        print(path)
    print(
        f"wrote {len(paths)} shard(s): {totals.images} images, {totals.pairs} pairs, "
        f"{totals.regions} regions, {size} bytes ({size / 2**20:.1f} MiB)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
