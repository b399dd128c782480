"""Task example builders and the task mixer (uniter_fast/tasks)."""

from __future__ import annotations

import json
import zlib

import numpy as np
import pytest

from uniter_fast.data.schema import (
    BERT_BASE_CASED,
    IMG_DIM,
    IMG_LABEL_DIM,
    LOC_DIM,
    MRM_TASKS,
    TASKS,
    Vocab,
)
from uniter_fast.data.shards import ImageRecord
from uniter_fast.tasks import (
    NegativeImageSampler,
    TaskMixer,
    build_example,
    build_itm_example,
    build_mlm_example,
    build_mrm_example,
    mask_regions,
    mask_tokens,
)

V = BERT_BASE_CASED


def make_image(key: str, n: int = 5) -> ImageRecord:
    rng = np.random.default_rng(zlib.crc32(key.encode()))
    soft = np.full((n, IMG_LABEL_DIM), 1.0 / IMG_LABEL_DIM, dtype=np.float16)
    return ImageRecord(
        key=key,
        feat=rng.random((n, IMG_DIM)).astype(np.float16),
        loc=rng.random((n, LOC_DIM)).astype(np.float32),
        soft=soft,
        captions=[np.array([2000, 3000, 4000], dtype=np.int32)],
        meta={},
    )


def words(rng: np.random.Generator, length: int) -> np.ndarray:
    return rng.integers(V.word_start, V.word_end, size=length).astype(np.int32)


# ---------------------------------------------------------------------------------------------
# MLM


def test_mask_tokens_statistics():
    rng = np.random.default_rng(0)
    length, count = 40, 1000
    chosen = masked_n = random_n = kept_n = 0
    for _ in range(count):
        ids = words(rng, length)
        masked, labels = mask_tokens(ids, rng)
        assert masked.dtype == np.int64 and labels.dtype == np.int64
        target = labels != -1
        assert target.any()
        assert np.array_equal(labels[target], ids[target])
        assert np.array_equal(masked[~target], ids[~target])  # non-targets untouched
        is_mask = masked == V.mask_id
        is_random = target & ~is_mask & (masked != ids)
        assert not (is_mask & ~target).any()
        assert ((masked[is_random] >= V.word_start) & (masked[is_random] < V.word_end)).all()
        chosen += int(target.sum())
        masked_n += int(is_mask.sum())
        random_n += int(is_random.sum())
        kept_n += int((target & (masked == ids)).sum())
    # Expected rate with the at-least-one rule: p + (1 - p)^L / L (the forced token is extra).
    expected = 0.15 + 0.85**length / length
    assert abs(chosen / (length * count) - expected) < 0.01
    assert abs(masked_n / chosen - 0.8) < 0.03
    assert abs(random_n / chosen - 0.1) < 0.02
    assert abs(kept_n / chosen - 0.1) < 0.02


def test_mask_tokens_at_least_one_rule():
    rng = np.random.default_rng(1)
    for length in (1, 2, 7):
        ids = words(rng, length)
        # With a vanishing probability nothing is drawn: the first token becomes a [MASK] target.
        masked, labels = mask_tokens(ids, rng, prob=1e-12)
        assert labels[0] == ids[0] and (labels[1:] == -1).all()
        assert masked[0] == V.mask_id and np.array_equal(masked[1:], ids[1:])
    # One-token captions always carry exactly one target.
    ids = words(rng, 1)
    for _ in range(200):
        masked, labels = mask_tokens(ids, rng)
        assert labels.tolist() == ids.tolist()


def test_mask_tokens_custom_vocab_and_inputs():
    vocab = Vocab(size=2000, mask_id=103, word_start=1500, word_end=1600)
    rng = np.random.default_rng(2)
    ids = rng.integers(1000, 2000, size=20000)
    masked, labels = mask_tokens(ids, rng, vocab=vocab)
    replaced = (labels != -1) & (masked != vocab.mask_id) & (masked != ids)
    assert replaced.sum() > 100
    assert ((masked[replaced] >= 1500) & (masked[replaced] < 1600)).all()
    with pytest.raises(ValueError, match="non-empty"):
        mask_tokens(np.zeros(0, np.int32), rng)
    with pytest.raises(ValueError, match="prob"):
        mask_tokens(ids, rng, prob=0.0)
    before = ids.copy()
    mask_tokens(ids, rng)
    assert np.array_equal(ids, before)  # the caption is not edited in place


def test_build_mlm_example_wraps_and_never_labels_specials():
    image = make_image("img")
    rng = np.random.default_rng(3)
    for length in (1, 5, 60):
        caption = words(rng, length)
        ex = build_mlm_example(caption, image, rng)
        assert set(ex) == {"input_ids", "txt_labels", "img_feat", "img_loc"}
        assert ex["input_ids"].shape == ex["txt_labels"].shape == (length + 2,)
        assert ex["input_ids"][0] == V.cls_id and ex["input_ids"][-1] == V.sep_id
        assert ex["txt_labels"][0] == -1 and ex["txt_labels"][-1] == -1
        assert (ex["txt_labels"] != -1).sum() >= 1
        assert ex["img_feat"] is image.feat and ex["img_loc"] is image.loc


def test_builders_are_reproducible():
    image, other = make_image("a"), make_image("b")
    negatives = NegativeImageSampler(4)
    negatives.add(image)
    negatives.add(other)
    caption = words(np.random.default_rng(0), 30)

    def run(seed):
        rng = np.random.default_rng(seed)
        return [build_example(t, caption, image, rng, negatives=negatives) for t in TASKS * 5]

    a, b, c = run(5), run(5), run(6)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        assert all(np.array_equal(x[k], y[k]) for k in x)
    differs = [not np.array_equal(x[k], y[k]) for x, y in zip(a, c, strict=True) for k in x]
    assert any(differs)


# ---------------------------------------------------------------------------------------------
# MRM


def test_mask_regions_statistics():
    rng = np.random.default_rng(4)
    masks = [mask_regions(50, rng) for _ in range(1000)]
    assert all(m.dtype == np.bool_ and m.shape == (50,) and m.any() for m in masks)
    rate = np.mean([m.mean() for m in masks])
    assert abs(rate - (0.15 + 0.85**50 / 50)) < 0.01
    for n in (1, 2, 3, 10):
        assert all(mask_regions(n, rng).any() for _ in range(100))


def test_mask_regions_fallback_is_one_uniform_region():
    rng = np.random.default_rng(5)
    picks = np.zeros(4, dtype=int)
    for _ in range(4000):
        mask = mask_regions(4, rng, prob=1e-12)
        assert mask.sum() == 1
        picks += mask
    assert (np.abs(picks - 1000) < 150).all()
    with pytest.raises(ValueError, match="num_regions"):
        mask_regions(0, rng)


def test_build_mrm_example():
    image = make_image("img", n=7)
    caption = words(np.random.default_rng(6), 9)
    ex = build_mrm_example(caption, image, np.random.default_rng(6))
    assert set(ex) == {"input_ids", "img_feat", "img_loc", "img_mask", "soft_labels"}
    assert ex["input_ids"].tolist() == [V.cls_id, *caption.tolist(), V.sep_id]
    assert ex["img_mask"].shape == (7,) and ex["img_mask"].dtype == np.bool_
    assert ex["img_feat"] is image.feat and ex["soft_labels"] is image.soft


# ---------------------------------------------------------------------------------------------
# ITM


def test_itm_negative_rate_and_keys():
    images = [make_image(f"img_{i}") for i in range(10)]
    negatives = NegativeImageSampler(100)
    for image in images:
        negatives.add(image)
    rng = np.random.default_rng(7)
    caption = words(rng, 12)
    targets = []
    for i in range(4000):
        image = images[i % 10]
        ex = build_itm_example(caption, image, rng, negatives)
        targets.append(ex["itm_target"])
        assert ex["input_ids"].tolist() == [V.cls_id, *caption.tolist(), V.sep_id]
        if ex["itm_target"] == 1:
            assert ex["img_feat"] is image.feat and ex["img_loc"] is image.loc
        else:
            assert ex["itm_target"] == 0
            assert ex["img_feat"] is not image.feat
            assert any(ex["img_feat"] is other.feat for other in images)
    assert abs(np.mean(targets) - 0.5) < 0.03


def test_sampler_never_returns_the_positive_key():
    a, b = make_image("a"), make_image("b")
    copy_of_a = make_image("a")  # another record with the same key (e.g. re-read)
    sampler = NegativeImageSampler(50)
    for _ in range(30):
        sampler.add(a)
    sampler.add(copy_of_a)
    sampler.add(b)
    rng = np.random.default_rng(8)
    assert all(sampler.sample(rng, "a") is b for _ in range(500))
    counts = {"a": 0, "b": 0}
    for _ in range(2000):
        counts[sampler.sample(rng, "c").key] += 1
    assert abs(counts["b"] / 2000 - 1 / 32) < 0.02  # uniform over the 32 buffered entries


def test_sampler_errors_and_ring_buffer():
    rng = np.random.default_rng(9)
    sampler = NegativeImageSampler(3)
    with pytest.raises(RuntimeError, match="no negative image"):
        sampler.sample(rng, "a")
    sampler.add(make_image("a"))
    sampler.add(make_image("a"))
    with pytest.raises(RuntimeError, match="'a'"):
        sampler.sample(rng, "a")
    for key in ("b", "c", "d"):
        sampler.add(make_image(key))
    assert len(sampler) == 3
    # The oldest entries went first: "a", "a", then nothing of "a" is left.
    assert {sampler.sample(rng, "zzz").key for _ in range(200)} == {"b", "c", "d"}
    with pytest.raises(ValueError, match="capacity"):
        NegativeImageSampler(0)
    single = NegativeImageSampler(1)
    single.add(make_image("a"))
    single.add(make_image("b"))
    assert len(single) == 1 and single.sample(rng, "a").key == "b"


def test_uniform_over_other_keys():
    sampler = NegativeImageSampler(10)
    for key in "abcd":
        sampler.add(make_image(key))
    rng = np.random.default_rng(10)
    counts = {k: 0 for k in "bcd"}
    for _ in range(3000):
        counts[sampler.sample(rng, "a").key] += 1
    assert all(abs(c - 1000) < 120 for c in counts.values())


# ---------------------------------------------------------------------------------------------
# build_example: the schema of every task


@pytest.mark.parametrize("task", TASKS)
def test_build_example_schema(task):
    image, other = make_image("img", n=6), make_image("other", n=9)
    negatives = NegativeImageSampler()
    negatives.add(image)
    negatives.add(other)
    caption = words(np.random.default_rng(11), 13)
    rng = np.random.default_rng(12)
    for _ in range(20):
        ex = build_example(task, caption, image, rng, negatives=negatives)
        ids = ex["input_ids"]
        assert ids.dtype == np.int64 and ids.shape == (15,)
        assert ids[0] == V.cls_id and ids[-1] == V.sep_id
        n = ex["img_feat"].shape[0]
        assert ex["img_feat"].dtype == np.float16 and ex["img_feat"].shape == (n, IMG_DIM)
        assert ex["img_loc"].dtype == np.float32 and ex["img_loc"].shape == (n, LOC_DIM)
        if task == "mlm":
            assert set(ex) == {"input_ids", "txt_labels", "img_feat", "img_loc"}
            assert ex["txt_labels"].dtype == np.int64 and ex["txt_labels"].shape == (15,)
        elif task in MRM_TASKS:
            assert set(ex) == {"input_ids", "img_feat", "img_loc", "img_mask", "soft_labels"}
            assert np.array_equal(ids[1:-1], caption)
            assert ex["img_mask"].dtype == np.bool_ and ex["img_mask"].shape == (n,)
            assert ex["soft_labels"].shape == (n, IMG_LABEL_DIM)
        else:
            assert set(ex) == {"input_ids", "img_feat", "img_loc", "itm_target"}
            assert type(ex["itm_target"]) is int and ex["itm_target"] in (0, 1)
            assert n == (6 if ex["itm_target"] else 9)


def test_build_example_errors():
    image = make_image("img")
    rng = np.random.default_rng(13)
    caption = np.array([2000], dtype=np.int32)
    with pytest.raises(ValueError, match="negatives"):
        build_example("itm", caption, image, rng)
    with pytest.raises(ValueError, match="unknown task"):
        build_example("vqa", caption, image, rng)
    with pytest.raises(ValueError, match="caption"):
        build_example("mrc", np.zeros(0, np.int32), image, rng)


# ---------------------------------------------------------------------------------------------
# TaskMixer

COCO = {"coco": {"itm": 6, "mlm": 8, "mrfr": 4, "mrckl": 4}}


def test_mixer_frequencies_match_ratios():
    mixer = TaskMixer.from_recipe(
        {"coco": COCO["coco"], "vg": {"itm": 9, "mlm": 12, "mrfr": 6, "mrckl": 6}}, seed=0
    )
    draws = 30000
    counts = {entry: 0 for entry in mixer.entries}
    for _ in range(draws):
        counts[mixer.sample()] += 1
    ratios = np.array([6, 8, 4, 4, 9, 12, 6, 6], dtype=float)
    expected = draws * ratios / ratios.sum()
    observed = np.array([counts[e] for e in mixer.entries])
    chi2 = ((observed - expected) ** 2 / expected).sum()
    assert chi2 < 24.3  # chi-square, 7 degrees of freedom, p = 0.001
    assert np.allclose(mixer.probabilities, ratios / ratios.sum())


def test_mixer_forms_agree_and_are_deterministic():
    by_recipe = TaskMixer.from_recipe(COCO, seed=3)
    by_list = TaskMixer([("coco", t, r) for t, r in COCO["coco"].items()], seed=3)
    by_map = TaskMixer({("coco", t): r for t, r in COCO["coco"].items()}, seed=3)
    seqs = [[m.sample() for _ in range(200)] for m in (by_recipe, by_list, by_map)]
    assert seqs[0] == seqs[1] == seqs[2]
    other = TaskMixer.from_recipe(COCO, seed=4)
    assert [other.sample() for _ in range(200)] != seqs[0]


def test_mixer_state_dict_round_trip():
    mixer = TaskMixer.from_recipe(COCO, seed=5)
    for _ in range(100):
        mixer.sample()
    state = mixer.state_dict()
    state = json.loads(json.dumps(state))  # plain data: survives any checkpoint format
    expected = [mixer.sample() for _ in range(50)]
    resumed = TaskMixer.from_recipe(COCO, seed=99)
    resumed.load_state_dict(state)
    assert [resumed.sample() for _ in range(50)] == expected
    state["bit_generator"] = "MT19937"
    with pytest.raises(ValueError, match="PCG64"):
        resumed.load_state_dict(state)


@pytest.mark.parametrize(
    ("ratios", "match"),
    [
        ([("coco", "vqa", 1)], "vqa"),
        ([("coco", "mlm", 0)], "ratio"),
        ([("coco", "mlm", -2)], "ratio"),
        ([("coco", "mlm", float("nan"))], "ratio"),
        ([("coco", "mlm", float("inf"))], "ratio"),
        ([("coco", "mlm", "3")], "ratio"),
        ([("coco", "mlm", True)], "ratio"),
        ([("coco", "mlm", 1), ("coco", "mlm", 2)], "twice"),
        ([("", "mlm", 1)], "dataset"),
        ([("coco", "mlm")], "dataset, task, ratio"),
        ([], "at least one"),
    ],
)
def test_mixer_rejects_bad_entries(ratios, match):
    with pytest.raises(ValueError, match=match):
        TaskMixer(ratios, seed=0)


def test_mixer_recipe_errors_name_the_entry():
    with pytest.raises(ValueError, match="'sbu', 'wra'"):
        TaskMixer.from_recipe({"coco": {"mlm": 1}, "sbu": {"wra": 1}}, seed=0)
    with pytest.raises(ValueError, match="seed"):
        TaskMixer.from_recipe(COCO, seed=-1)
