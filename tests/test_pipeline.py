"""The training loader: seeded, budgeted, mixed by ratio, split by rank and worker, resumable."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from uniter_fast.data.pipeline import (
    BadSamples,
    BlockBatcher,
    Loader,
    TrainSource,
    iter_eval_batches,
    pair_tokens,
    shard_order,
    split_shards,
)
from uniter_fast.data.shards import iter_shard, list_shards
from uniter_fast.data.synthetic import write_synthetic


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    write_synthetic(root / "a", 40, seed=3, images_per_shard=10)
    write_synthetic(root / "b", 20, seed=4, images_per_shard=5)
    return root


def _sources(shards, mix=None):
    return [
        TrainSource("a", [str(shards / "a")], mix or {"mlm": 1.0, "itm": 1.0}),
        TrainSource("b", [str(shards / "b")], mix or {"mrfr": 1.0, "mrckl": 1.0}),
    ]


def _loader(shards, seed=7, budget=1024, mix=None, **kw):
    kw.setdefault("block_images", 16)
    return Loader(_sources(shards, mix), tokens_per_batch=budget, seed=seed, **kw)


def _same(a, b) -> bool:
    (task_a, batch_a), (task_b, batch_b) = a, b
    return task_a == task_b and all(
        torch.equal(t, getattr(batch_b, name)) for name, t in batch_a.tensors().items()
    )


def test_same_seed_same_batches(shards):
    a, b = _loader(shards, 7), _loader(shards, 7)
    assert all(_same(next(a), next(b)) for _ in range(12))

    def signature(seed):
        stream = _loader(shards, seed)
        return [(t, b.num_tokens, b.num_pairs) for t, b in (next(stream) for _ in range(8))]

    assert signature(7) == signature(7) and signature(7) != signature(8)


def test_token_budget(shards):
    loader = _loader(shards, 1, budget=600)
    for _ in range(30):
        task, batch = next(loader)
        if task != "itm":  # ITM negatives swap in other images, so its budget is approximate
            assert batch.num_tokens <= 600 or batch.num_pairs == 1


def test_tasks_follow_the_mix(shards):
    loader = _loader(shards, 2, budget=256)
    counts = Counter(next(loader)[0] for _ in range(400))
    assert set(counts) == {"mlm", "itm", "mrfr", "mrckl"}
    for task in counts:
        assert 60 < counts[task] < 140, counts  # 100 expected each; binomial sd 8.7


def test_a_block_holds_every_caption_of_its_images_once(shards):
    # Exact mode with a block as large as the dataset: the first block is one epoch, so its
    # batches hold each (image, caption) pair exactly once; images with several captions give
    # several pairs.
    urls = list_shards(str(shards / "a"))
    expected = Counter(
        (image.key, caption.tobytes())
        for url in urls
        for image in iter_shard(url)
        for caption in image.captions
    )
    assert max(Counter(key for key, _ in expected).values()) > 1  # several captions per image
    batcher = BlockBatcher(
        urls, mode="exact", seed=0, tokens_per_batch=500, block_images=40, bad=BadSamples()
    )
    seen = Counter()
    first = batcher.next_batch()
    for pairs in [first] + [batcher.next_batch() for _ in range(batcher.block_batches - 1)]:
        assert sum(pair_tokens(c, i) for c, i in pairs) <= 500 or len(pairs) == 1
        seen.update((image.key, caption.tobytes()) for caption, image in pairs)
    assert seen == expected


def test_exact_mode_splits_shards_between_ranks_and_workers(shards):
    urls = list_shards(str(shards / "a")) + list_shards(str(shards / "b"))  # 8 shards
    parts = [split_shards(urls, role, 4, "exact", "test") for role in range(4)]
    assert sorted(u for p in parts for u in p) == sorted(urls)
    assert all(len(p) == 2 for p in parts)
    with pytest.raises(ValueError, match="only 8 shards"):
        split_shards(urls, 0, 9, "exact", "test")
    assert split_shards(urls, 3, 9, "resampled", "test") == urls  # too few: all, own seed
    # Exact: a permutation every epoch, a different one per epoch; resampled: draws.
    order = [shard_order(urls, "exact", 0, epoch) for epoch in range(3)]
    assert all(sorted(o) == sorted(urls) for o in order) and order[0] != order[1]
    assert len(shard_order(urls, "resampled", 0, 0)) == len(urls)


def test_every_rank_gets_the_batches_it_asks_for(shards):
    # Five shards over two ranks (3 and 2 shards): both ranks run as many steps as asked.
    sources = [TrainSource("b", [str(shards / "b")], {"mlm": 1.0})]
    for rank in range(2):
        loader = Loader(
            sources,
            tokens_per_batch=400,
            seed=0,
            mode="exact",
            block_images=4,
            rank=rank,
            world_size=2,
        )
        assert len([next(loader) for _ in range(60)]) == 60


@pytest.mark.parametrize("mode", ["exact", "resampled"])
@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_gives_the_same_batches(shards, mode, num_workers):
    kw = dict(mode=mode, num_workers=num_workers, block_images=8)
    loader = _loader(shards, 3, **kw)
    for _ in range(13):  # not a multiple of the workers, mid-block
        next(loader)
    state = json.loads(json.dumps(loader.state_dict()))  # checkpoints store it as JSON
    expected = [next(loader) for _ in range(25)]
    loader.close()
    resumed = _loader(shards, 3, state=state, **kw)
    got = [next(resumed) for _ in range(25)]
    resumed.close()
    assert all(_same(a, b) for a, b in zip(expected, got, strict=True))


def test_resume_refuses_a_different_setup(shards):
    loader = _loader(shards, 3)
    next(loader)
    state = loader.state_dict()
    with pytest.raises(ValueError, match="num_workers"):
        _loader(shards, 3, num_workers=2, state=state)


def test_workers_match_the_single_process_roles(shards):
    # Worker w of a 2-worker loader plays role w: its batches are those of that role built in
    # this process (DataLoader hands them out alternately).
    a = _loader(shards, 5, num_workers=2)
    got = [next(a) for _ in range(6)]
    a.close()
    from uniter_fast.data.pipeline import RoleStream, StreamSettings

    settings = StreamSettings(tokens_per_batch=1024, seed=5, block_images=16)
    roles = [RoleStream(_sources(shards), settings, role=r, num_roles=2) for r in range(2)]
    want = [next(roles[i % 2]) for i in range(6)]
    assert all(_same(x, y) for x, y in zip(got, want, strict=True))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA for pinned memory")
def test_batches_arrive_pinned(shards):
    for workers in (0, 2):
        loader = _loader(shards, 1, num_workers=workers, pin_memory=True)
        _, batch = next(loader)
        assert all(t.is_pinned() for t in batch.tensors().values())
        loader.close()


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


def test_loader_argument_errors(shards):
    with pytest.raises(ValueError, match="mode"):
        _loader(shards, mode="sometimes")
    with pytest.raises(ValueError, match="no training sources"):
        Loader([], tokens_per_batch=100, seed=0)
    with pytest.raises(ValueError, match="max_bad_fraction"):
        _loader(shards, max_bad_fraction=2.0)


def test_pipe_urls_read_like_local_files(shards):
    local = list_shards(str(shards / "b"))
    piped = [f"pipe:cat {url}" for url in local]
    a = Loader([TrainSource("b", local, {"mlm": 1.0})], tokens_per_batch=500, seed=0)
    b = Loader([TrainSource("b", piped, {"mlm": 1.0})], tokens_per_batch=500, seed=0)
    assert all(_same(next(a), next(b)) for _ in range(10))
