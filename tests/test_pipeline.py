"""The first pipeline: seeded, budgeted, mixed by ratio; validation passes cover every pair once."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from uniter_fast.data.pipeline import PretrainBatches, TrainSource, iter_eval_batches, pair_tokens
from uniter_fast.data.shards import iter_shard, list_shards
from uniter_fast.data.synthetic import write_synthetic


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    write_synthetic(root / "a", 30, seed=3, images_per_shard=10)
    write_synthetic(root / "b", 20, seed=4, images_per_shard=10)
    return root


def _batches(shards, seed, mix=None, budget=1024):
    sources = [
        TrainSource("a", [str(shards / "a")], mix or {"mlm": 1.0, "itm": 1.0}),
        TrainSource("b", [str(shards / "b")], mix or {"mrfr": 1.0, "mrckl": 1.0}),
    ]
    return PretrainBatches(
        sources, tokens_per_batch=budget, seed=seed, shuffle_buffer=40, negatives_buffer=20
    )


def test_same_seed_same_batches(shards):
    a, b = _batches(shards, 7), _batches(shards, 7)
    for _ in range(12):
        (task_a, batch_a), (task_b, batch_b) = next(a), next(b)
        assert task_a == task_b
        for name, tensor in batch_a.tensors().items():
            assert torch.equal(tensor, getattr(batch_b, name)), name

    def signature(seed):
        stream = _batches(shards, seed)
        return [
            (task, batch.num_tokens, batch.num_pairs)
            for task, batch in (next(stream) for _ in range(8))
        ]

    assert signature(7) == signature(7) and signature(7) != signature(8)


def test_token_budget(shards):
    batches = _batches(shards, 1, budget=600)
    for _ in range(30):
        task, batch = next(batches)
        if task != "itm":  # ITM negatives swap in other images, so its budget is approximate
            assert batch.num_tokens <= 600 or batch.num_pairs == 1


def test_tasks_follow_the_mix(shards):
    batches = _batches(shards, 2, budget=256)
    counts = Counter(next(batches)[0] for _ in range(400))
    assert set(counts) == {"mlm", "itm", "mrfr", "mrckl"}
    for task in counts:
        assert 60 < counts[task] < 140, counts  # 100 expected each; binomial sd 8.7


def test_validation_pass_covers_every_pair_once(shards):
    urls = list_shards(str(shards / "b"))
    pairs = sum(len(image.captions) for url in urls for image in iter_shard(url))
    tokens = sum(
        pair_tokens(c, image) for url in urls for image in iter_shard(url) for c in image.captions
    )
    for task in ("mlm", "mrfr", "mrckl"):
        batches = list(iter_eval_batches(urls, task, tokens_per_batch=700, seed=0))
        assert sum(b.num_pairs for b in batches) == pairs
        assert sum(b.num_tokens for b in batches) == tokens
    itm = list(iter_eval_batches(urls, "itm", tokens_per_batch=700, seed=0))
    again = list(iter_eval_batches(urls, "itm", tokens_per_batch=700, seed=0))
    assert sum(b.num_pairs for b in itm) == pairs
    assert all(
        torch.equal(x.itm_target, y.itm_target) and torch.equal(x.img_feat, y.img_feat)
        for x, y in zip(itm, again, strict=True)
    )
    targets = torch.cat([b.itm_target for b in itm]).float()
    assert 0.3 < targets.mean() < 0.7


def test_itm_validation_needs_two_images(tmp_path):
    write_synthetic(tmp_path, 1, seed=0)
    with pytest.raises(ValueError, match="at least two images"):
        list(iter_eval_batches(list_shards(str(tmp_path)), "itm", tokens_per_batch=512))
