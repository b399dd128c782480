"""Retrieval's full evaluation (chunks, ranks, resume after a kill, zero-shot), the loaders,
referring expressions' IoU evaluation, and train.py --task retrieval | re."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY
from test_finetune import _train

import uniter_fast as uf
from uniter_fast.authors import downstream as authors
from uniter_fast.data.pipeline import BadSamples
from uniter_fast.data.shards import list_shards
from uniter_fast.data.synthetic_tasks import RE_SIZE, write_task_data
from uniter_fast.data.task_shards import iter_task_shard
from uniter_fast.evaluate.__main__ import main as evaluate
from uniter_fast.tasks.refexp import evaluate_re, iou, pixel_boxes, re_examples
from uniter_fast.tasks.retrieval import (
    HardNegativeLoader,
    RetrievalLoader,
    mine_and_train,
    read_retrieval_split,
    recall_at_k,
    score_matrix,
)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def retrieval_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("retrieval")
    write_task_data(root / "test", "retrieval", 9, seed=4)
    config = root / "tiny.json"
    config.write_text(json.dumps(TINY.to_dict()))
    return root


def _split(root):
    return read_retrieval_split(list_shards(str(root / "test")), bad=BadSamples())


def test_score_matrix_is_every_pair_and_chunks_over_ranks(retrieval_data, tmp_path):
    split = _split(retrieval_data)
    assert split.num_images == 9 and split.num_texts == 18
    model = uf.UniterForRetrieval(TINY, img_dim=2048).double().eval()
    whole = score_matrix(model, split, chunk_texts=5, tokens_per_batch=300, progress=False)
    assert whole.shape == (18, 9)
    # Entry (t, i) is the model's score of that one pair.
    for t, i in [(0, 0), (7, 3), (17, 8)]:
        with torch.no_grad():
            one = model(uf.data.collate([split.example(t, i)], task="retrieval"))["scores"]
        assert whole[t, i] == pytest.approx(float(one), rel=1e-5, abs=1e-6)
    # Two ranks writing chunks to one folder: rank 1 first (it returns None), then rank 0
    # assembles the same matrix.
    kw = dict(out_dir=tmp_path / "ev", chunk_texts=5, tokens_per_batch=300, progress=False)
    assert score_matrix(model, split, rank=1, world=2, **kw) is None
    assert len(list((tmp_path / "ev" / "chunks").glob("rows-*.npy"))) == 2  # chunks 1, 3
    np.testing.assert_allclose(score_matrix(model, split, rank=0, world=2, **kw), whole, 1e-6)
    # Another evaluation into the same folder is refused, named.
    with pytest.raises(ValueError, match="chunk_texts"):
        score_matrix(model, split, **(kw | {"chunk_texts": 4}))


def _evaluate_cmd(data, checkpoint, config, output, *extra):
    return [
        sys.executable,
        "-m",
        "uniter_fast.evaluate",
        "--task",
        "retrieval",
        "--checkpoint",
        str(checkpoint),
        "--model-config",
        str(config),
        "--data",
        str(data),
        "--output",
        str(output),
        "--chunk-texts",
        "4",
        "--tokens-per-batch",
        "400",
        *extra,
    ]


def test_killed_evaluation_resumes_to_the_same_figures(retrieval_data, tmp_path):
    # A pretraining checkpoint: the evaluation is zero-shot (the ITM match row ranks).
    pretrained = uf.UniterForPretraining(TINY)
    weights = uf.save_reference(pretrained, tmp_path / "pretrained.pt")
    config, data = retrieval_data / "tiny.json", retrieval_data / "test"
    env = {**os.environ, "PYTHONPATH": str(REPO), "UNITER_FAST_FAULT": "kill-eval@2"}
    out = tmp_path / "killed"
    proc = subprocess.run(
        _evaluate_cmd(data, weights, config, out), env=env, capture_output=True, text=True
    )
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert len(list((out / "chunks").glob("rows-*.npy"))) == 2  # of 5
    assert not (out / "metrics.json").exists()
    env.pop("UNITER_FAST_FAULT")
    proc = subprocess.run(
        _evaluate_cmd(data, weights, config, out), env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    resumed = json.loads((out / "metrics.json").read_text())
    # The uninterrupted evaluation, in this process.
    fresh = tmp_path / "fresh"
    argv = _evaluate_cmd(data, weights, config, fresh)[3:]
    assert evaluate(argv) == 0
    whole = json.loads((fresh / "metrics.json").read_text())
    for key in ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean"):
        assert resumed[key] == whole[key], key
    assert resumed["texts"] == 18 and resumed["images"] == 9 and resumed["pairs"] == 162
    np.testing.assert_array_equal(np.load(out / "scores.npy"), np.load(fresh / "scores.npy"))
    ids = json.loads((out / "scores_ids.json").read_text())
    assert len(ids["texts"]) == 18 and len(ids["images"]) == 9
    # Zero-shot: the matrix holds the pretrained model's ITM match logits.
    split = _split(retrieval_data)
    pretrained.eval()
    ex = [split.example(3, 5) | {"itm_target": 1}]
    batch = uf.data.collate(
        [e | {"txt_labels": np.full(len(e["input_ids"]), -1)} for e in ex], task="itm"
    )
    with torch.no_grad():
        hidden = pretrained.uniter(batch)
        logit = pretrained.itm_output(pretrained.uniter.pooler(hidden, batch.cu_seqlens[:-1]))
    assert np.load(fresh / "scores.npy")[3, 5] == pytest.approx(float(logit[0, 1]), abs=1e-5)
    assert recall_at_k(np.load(fresh / "scores.npy"), split.txt2img, split.img2txts) == {
        k: whole[k] for k in recall_at_k(np.zeros((18, 9)), split.txt2img, split.img2txts)
    }


def test_retrieval_loaders_resume_and_mine(retrieval_data):
    urls = [str(retrieval_data / "test")]
    kw = dict(tokens_per_batch=200, seed=3)
    first = RetrievalLoader(urls, **kw)
    for _ in range(3):
        next(first)
    state = first.state_dict()
    want = [next(first)[1] for _ in range(2)]
    again = RetrievalLoader(urls, state=state, **kw)
    for a, b in zip(want, [next(again)[1] for _ in range(2)], strict=True):
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.target, b.target)
    # Groups: a positive (its own image), one random other image, one random other caption.
    split = first.split
    task, batch = next(RetrievalLoader(urls, **kw))
    assert task == "retrieval" and batch.target.tolist()[:3] == [1, 0, 0]
    # Hard negatives: candidates scored without gradients, the best-scoring ones trained on.
    hard = HardNegativeLoader(urls, negative_size=6, hard_neg_size=2, positives=2, **kw)
    _, work = next(hard)
    assert len(work.groups) == 4 and all(len(g) == 7 for g in work.groups)
    for g in work.groups[:2]:  # caption -> images: the positive's image first, then others
        (t, i), rest = g[0], g[1:]
        assert split.txt2img[t] == i and all(tt == t and ii != i for tt, ii in rest)
    for g in work.groups[2:]:  # image -> captions: none of the image's own captions negative
        (t, i), rest = g[0], g[1:]
        assert split.txt2img[t] == i and all(ii == i and split.txt2img[tt] != i for tt, ii in rest)
    model = uf.UniterForRetrieval(TINY, img_dim=2048).double()
    calls = []

    class Engine:
        module = model

        def __call__(self, batch):
            calls.append((model.training, torch.is_grad_enabled(), batch.num_pairs))
            return model(batch)

        def eval(self):
            model.eval()

        def train(self, mode=True):
            model.train(mode)

    out = mine_and_train(Engine(), work.to("cpu"))
    assert all(not training and not grad for training, grad, _ in calls[:-1])
    assert calls[-1][:2] == (True, True) and calls[-1][2] == 4 * (1 + 2)
    assert sum(n for _, _, n in calls[:-1]) == 4 * 7
    # The two directions' mean hinges, summed: check against scoring the kept pairs directly.
    model.eval()
    with torch.no_grad():
        scores = {}
        for g in work.groups:
            batch = uf.data.collate([split.example(t, i) for t, i in g], task="retrieval")
            scores[id(g)] = model(batch)["scores"]
    total = 0.0
    for half in (work.groups[:2], work.groups[2:]):
        hinges = []
        for g in half:
            s = torch.sigmoid(scores[id(g)])
            hard_idx = 1 + torch.argsort(-scores[id(g)][1:], stable=True)[:2]
            hinges += [torch.clamp(0.2 + s[j] - s[0], min=0) for j in hard_idx]
        total += float(torch.stack(hinges).mean())
    assert float(out["loss"].detach()) == pytest.approx(total, rel=1e-9)


def test_re_boxes_iou_and_evaluation(tmp_path):
    rng = np.random.default_rng(0)
    for _ in range(200):
        a = [*(rng.random(2) * 50), *(1 + rng.random(2) * 30)]
        b = [*(rng.random(2) * 50), *(1 + rng.random(2) * 30)]
        assert iou(a, b) == authors.compute_iou(a, b)
    loc = np.array([[0.1, 0.2, 0.5, 0.6, 0.4, 0.4, 0.16]], dtype=np.float32)
    np.testing.assert_allclose(pixel_boxes(loc, 640, 480), [[64, 96, 256, 192]], rtol=1e-6)
    write_task_data(tmp_path / "val", "re", 6, seed=2)
    records = [r for url in list_shards(str(tmp_path / "val")) for r in iter_task_shard(url, "re")]
    gt = [ex for r in records for ex in re_examples(r, features="gt")[0]]
    det = [ex for r in records for ex in re_examples(r, features="det")[0]]
    assert len(gt) == len(det) and "target" in gt[0] and "target" not in det[0]
    assert gt[0]["boxes"].shape == (len(gt[0]["img_feat"]), 4)
    # The target's own ground-truth box has IoU 1 with the target box.
    ex = gt[0]
    assert iou(ex["boxes"][ex["target"]], ex["tgt_box"]) == pytest.approx(1.0, abs=1e-4)
    # An oracle that scores the target region highest: ground-truth accuracy 1.

    def oracle(batch):
        scores = torch.zeros(batch.region_index.shape)
        scores[torch.arange(len(batch.target)), batch.target] = 1.0
        return {"scores": scores}

    result = evaluate_re(oracle, gt, tokens_per_batch=500, device=torch.device("cpu"))
    assert result["accuracy"] == 1.0 and result["n"] == len(gt)
    assert {p["id"] for p in result["predictions"]} == {e["id"] for e in gt}
    # The evaluation command: named splits, both box sets, predictions per split.
    model = uf.UniterForReferringExpressions(TINY, img_dim=2048, mlp=2)
    weights = uf.save_reference(model, tmp_path / "re.pt")
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY.to_dict()))
    out = tmp_path / "ev"
    argv = ["--task", "re", "--checkpoint", str(weights), "--model-config", str(config)]
    argv += ["--data", f"val={tmp_path / 'val'}", f"testA={tmp_path / 'val'}"]
    with pytest.raises(SystemExit):
        evaluate([*argv, "--output", str(out), "--features", "xyz"])
    # A weights file alone builds mlp=1: the mlp=2 head is missing, and that is refused.
    assert evaluate([*argv, "--output", str(out)]) == 2
    assert evaluate([*argv, "--output", str(out / "flag"), "--re-mlp", "2"]) == 0
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "model_reference.pt").write_bytes(weights.read_bytes())
    cfg = uf.config.RunConfig(task="re", model_config=str(config))
    values = cfg.to_dict()
    values["finetune"]["re_mlp"] = 2
    import yaml

    (run_dir / "config.yaml").write_text(yaml.safe_dump(values))
    argv = ["--task", "re", "--checkpoint", str(run_dir)]
    argv += ["--data", f"val={tmp_path / 'val'}", f"testA={tmp_path / 'val'}"]
    assert evaluate([*argv, "--output", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["splits"]) == {"val", "testA"}
    row = metrics["splits"]["val"]
    assert 0 <= row["accuracy"] <= 1 and 0 <= row["accuracy_detected"] <= 1
    assert metrics["splits"]["testA"]["accuracy"] == row["accuracy"]
    preds = json.loads((out / "predictions_val_det.json").read_text())
    assert len(preds) == len(det) and set(preds[0]) == {"id", "region", "pred_box", "tgt_box"}
    assert RE_SIZE == (640, 480)


@pytest.mark.parametrize("task", ["retrieval", "re"])
def test_train_task_writes_the_summary(task, tmp_path):
    # The quick start cut to a few steps (retrieval: the hard-negative form, small sizes).
    out = tmp_path / "run"
    args = ["--task", task, "--output-dir", str(out), "--max-steps", "4", "--log-every", "2"]
    if task == "retrieval":
        recipe = (REPO / "configs/finetune/retrieval-tiny-cpu.yaml").read_text()
        recipe = recipe.replace("hard_negatives: false", "hard_negatives: true")
        recipe = recipe.replace("negative_size: 399", "negative_size: 15")
        recipe = recipe.replace("hard_neg_size: 31", "hard_neg_size: 3")
        recipe = recipe.replace("synthetic_images: 600", "synthetic_images: 60")
        recipe = recipe.replace("synthetic_val_images: 100", "synthetic_val_images: 20")
        (tmp_path / "recipe.yaml").write_text(recipe)
        args += ["--config", str(tmp_path / "recipe.yaml")]
    proc = _train(tmp_path, *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == task
    if task == "retrieval":
        assert summary["metric"] == "recall_at_1" and summary["chance"] == pytest.approx(1 / 20)
        assert set(summary["validation"]) >= {"img_r1", "txt_r10", "r_mean"}
    else:
        assert summary["metric"] == "accuracy" and 0.1 < summary["chance"] < 0.2
        assert 0 <= summary["validation"]["accuracy_detected"] <= 1
    assert 0 <= summary["value"] <= 1
    model = (
        uf.UniterForRetrieval(uf.UniterConfig.from_json(REPO / "configs/model/uniter-tiny.json"))
        if task == "retrieval"
        else uf.UniterForReferringExpressions(
            uf.UniterConfig.from_json(REPO / "configs/model/uniter-tiny.json")
        )
    )
    report = uf.load_pretrained(model, out / "model_reference.pt", verbose=False)
    assert not report.missing and not report.unexpected


def test_recipes_parse():
    from uniter_fast.config import RunConfig

    for name, task in [
        ("retrieval-base", "retrieval"),
        ("retrieval-large", "retrieval"),
        ("re-base", "re"),
        ("retrieval-tiny-cpu", "retrieval"),
        ("re-tiny-cpu", "re"),
    ]:
        cfg = RunConfig.from_file(REPO / f"configs/finetune/{name}.yaml")
        assert cfg.task == task
    hard = RunConfig.from_file(REPO / "configs/finetune/retrieval-base.yaml").finetune
    assert (hard.hard_negatives, hard.negative_size, hard.hard_neg_size) == (True, 399, 31)
    assert RunConfig.from_file(REPO / "configs/finetune/re-base.yaml").finetune.re_mlp == 2
