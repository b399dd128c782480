"""Synthetic shards: deterministic, realistic in shape, and with cross-modal structure."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from uniter_fast.data.schema import IMG_LABEL_DIM, MAX_CAPTION_TOKENS, Vocab
from uniter_fast.data.shards import iter_shard, list_shards, validate_record
from uniter_fast.data.synthetic import (
    SyntheticSpec,
    generate_images,
    make_world,
    write_synthetic,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
SPEC = SyntheticSpec()


@pytest.fixture(scope="module")
def images():
    return list(generate_images(300, seed=7))


def same_records(a, b) -> bool:
    return (
        a.key == b.key
        and a.meta == b.meta
        and all(np.array_equal(getattr(a, f), getattr(b, f)) for f in ("feat", "loc", "soft"))
        and len(a.captions) == len(b.captions)
        and all(np.array_equal(x, y) for x, y in zip(a.captions, b.captions, strict=True))
    )


def test_deterministic_per_seed():
    a = list(generate_images(6, seed=3))
    b = list(generate_images(6, seed=3))
    assert all(same_records(x, y) for x, y in zip(a, b, strict=True))
    # Image i does not depend on how many images are drawn.
    assert all(same_records(x, y) for x, y in zip(a, generate_images(2, seed=3), strict=False))
    other_seed = list(generate_images(6, seed=4))
    assert not any(np.array_equal(x.feat, y.feat) for x, y in zip(a, other_seed, strict=True))
    assert [r.key for r in a] == [f"synthetic_3_{i:07d}" for i in range(6)]
    assert [r.key for r in other_seed] == [f"synthetic_4_{i:07d}" for i in range(6)]


def test_world_depends_on_world_seed_only():
    w0, w0_again, w1 = make_world(SPEC, 0), make_world(SyntheticSpec(), 0), make_world(SPEC, 1)
    assert np.array_equal(w0.class_ids, w0_again.class_ids)
    assert not np.array_equal(w0.concept_words, w1.concept_words)
    assert len(set(w0.class_ids.tolist())) == SPEC.num_concepts
    assert w0.class_ids.min() >= 1 and w0.class_ids.max() < IMG_LABEL_DIM
    words = set(w0.concept_words.tolist())
    assert len(words) == SPEC.num_concepts and not words & set(w0.fillers.tolist())
    assert min(words) >= SPEC.vocab.word_start and max(words) < SPEC.vocab.word_end
    a = next(generate_images(1, seed=0, world_seed=0))
    b = next(generate_images(1, seed=0, world_seed=1))
    assert not np.array_equal(a.feat, b.feat)


def test_shapes_and_bounds(images):
    for record in images:
        validate_record(record)  # dtypes, shapes, finite values, token ids
        assert SPEC.min_regions <= record.num_regions <= SPEC.max_regions
        assert len(record.captions) == SPEC.captions_per_image
        assert SPEC.min_objects <= len(record.meta["objects"]) <= SPEC.max_objects
        assert record.meta["dataset"] == "synthetic" and record.meta["image_id"] == record.key
        for caption in record.captions:
            assert SPEC.min_caption_tokens <= caption.size <= MAX_CAPTION_TOKENS
        loc = record.loc
        assert (loc[:, :4] >= 0).all() and (loc[:, :4] <= 1).all()
        assert (loc[:, 2] > loc[:, 0]).all() and (loc[:, 3] > loc[:, 1]).all()
        np.testing.assert_allclose(loc[:, 4:6], loc[:, 2:4] - loc[:, :2], atol=1e-6)
        np.testing.assert_allclose(loc[:, 6], loc[:, 4] * loc[:, 5], atol=1e-6)
        assert (record.feat >= 0).all()
    regions = np.array([r.num_regions for r in images])
    assert 30 <= regions.mean() <= 45
    lengths = np.array([c.size for r in images for c in r.captions])
    assert 10 <= np.median(lengths) <= 20
    assert ((lengths >= 10) & (lengths <= 20)).mean() > 0.7
    assert lengths.max() > 30  # a tail
    assert len({r.key for r in images}) == len(images)


def test_captions_name_exactly_the_image_objects(images):
    world = make_world(SPEC, 0)
    all_words = set(world.concept_words.tolist())
    for record in images:
        objects = set(world.concept_words[record.meta["objects"]].tolist())
        for caption in record.captions:
            tokens = set(caption.tolist())
            assert objects <= tokens  # every object is named
            assert tokens & all_words == objects  # and no other concept is
            assert tokens <= all_words | set(world.fillers.tolist())


def test_soft_labels_and_features_point_at_the_objects(images):
    world = make_world(SPEC, 0)
    protos = world.prototypes / np.linalg.norm(world.prototypes, axis=1, keepdims=True)
    # One matmul for all regions: the concept whose prototype is closest to each feature.
    nearest = (np.concatenate([r.feat for r in images]).astype(np.float32) @ protos.T).argmax(1)
    nearest = np.split(nearest, np.cumsum([r.num_regions for r in images])[:-1])
    label_hits = feature_hits = agree = total = 0
    for record, near in zip(images, nearest, strict=True):
        soft = record.soft.astype(np.float32)
        assert (soft >= 0).all()
        np.testing.assert_allclose(soft.sum(axis=1), 1.0, atol=5e-3)
        classes = world.class_ids[record.meta["objects"]]
        label = 1 + soft[:, 1:].argmax(axis=1)
        label_hits += int(np.isin(label, classes).sum())
        feature_hits += int(np.isin(near, record.meta["objects"]).sum())
        agree += int((world.class_ids[near] == label).sum())
        total += record.num_regions
    assert label_hits / total > 0.9  # a few regions carry a "detector error"
    assert feature_hits == total
    assert agree / total > 0.9


def test_spec_validation():
    with pytest.raises(ValueError, match="max_objects"):
        SyntheticSpec(max_objects=0)
    with pytest.raises(ValueError, match="min_regions"):
        SyntheticSpec(min_regions=50, median_regions=40)
    with pytest.raises(ValueError, match="num_concepts"):
        SyntheticSpec(num_concepts=SyntheticSpec().max_objects - 1)
    with pytest.raises(ValueError, match="max_caption_tokens"):
        SyntheticSpec(max_caption_tokens=61)
    with pytest.raises(ValueError, match="feature_noise"):
        SyntheticSpec(feature_noise=-1.0)
    with pytest.raises(ValueError, match="vocab"):
        too_few = SyntheticSpec().num_concepts + SyntheticSpec().num_fillers - 1  # ids needed - 1
        SyntheticSpec(vocab=Vocab(size=1100, word_start=1000, word_end=1000 + too_few))
    with pytest.raises(ValueError, match="seed"):
        next(generate_images(1, seed=-1))


def test_small_spec_and_vocab():
    spec = SyntheticSpec(
        num_concepts=5,
        max_objects=2,
        min_regions=2,
        median_regions=3,
        max_regions=4,
        captions_per_image=2,
        min_caption_tokens=2,
        median_caption_tokens=2,
        max_caption_tokens=3,
        vocab=Vocab(size=1200, word_start=1100, word_end=1200),
    )
    for record in generate_images(50, seed=0, spec=spec):
        validate_record(record, vocab=spec.vocab)
        assert 2 <= record.num_regions <= 4
        assert all(2 <= c.size <= 3 for c in record.captions)
        assert all((c >= 1100).all() for c in record.captions)


def test_write_synthetic_replaces_older_shards(tmp_path):
    first = write_synthetic(tmp_path, 9, images_per_shard=2)
    assert [p.name for p in first] == [f"synthetic-{i:06d}.tar" for i in range(5)]
    second = write_synthetic(tmp_path, 3, seed=1, images_per_shard=2)
    assert sorted(os.listdir(tmp_path)) == [p.name for p in second]
    read = [r for url in list_shards(str(tmp_path)) for r in iter_shard(url)]
    assert [r.key for r in read] == [f"synthetic_1_{i:07d}" for i in range(3)]
    with pytest.raises(FileExistsError):
        write_synthetic(tmp_path, 3, overwrite=False)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "uniter_fast.data.synthetic", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_writes_readable_shards(tmp_path):
    out = tmp_path / "shards"
    result = run_cli(str(out), "--images", "25", "--seed", "2", "--images-per-shard", "10")
    assert result.returncode == 0, result.stderr
    names = [f"synthetic-{i:06d}.tar" for i in range(3)]
    assert sorted(os.listdir(out)) == names
    assert all(name in result.stdout for name in names)
    assert "25 images, 125 pairs" in result.stdout
    read = [r for url in list_shards(str(out)) for r in iter_shard(url)]
    expected = list(generate_images(25, seed=2))
    assert all(same_records(a, b) for a, b in zip(read, expected, strict=True))
    assert f"{sum(r.num_regions for r in expected)} regions" in result.stdout


def test_cli_errors_are_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = run_cli(str(blocker / "sub"), "--images", "3")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert str(blocker) in result.stderr
    result = run_cli(str(tmp_path / "x"), "--images", "0")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--images" in result.stderr.strip().splitlines()[-1]
