"""Downstream fine-tuning: task shards, the loader, the metric, the head's lr, train.py --task."""

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

from uniter_fast.config import OptimConfig, RunConfig
from uniter_fast.data.pipeline import BadSamples
from uniter_fast.data.shards import ShardWriter, list_shards
from uniter_fast.data.synthetic_tasks import task_records, write_task_data
from uniter_fast.data.task_shards import (
    encode_task_sample,
    iter_task_shard,
    validate_task_record,
)
from uniter_fast.model import UniterForVqa
from uniter_fast.tasks.finetune import FinetuneLoader, evaluate_finetune, examples_of
from uniter_fast.train.engine import param_groups

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("task", ["vqa", "ve", "nlvr2"])
def test_task_shards_round_trip(task, tmp_path):
    records = list(task_records(task, 12, seed=3))
    finished = write_task_data(tmp_path, task, 12, seed=3)
    assert sum(f["samples"] for f in finished) == 12
    assert sum(f["pairs"] for f in finished) == sum(len(r.items) for r in records)
    got = [r for url in list_shards(str(tmp_path)) for r in iter_task_shard(url, task)]
    assert [r.key for r in got] == [r.key for r in records]
    for want, have in zip(records, got, strict=True):
        assert have.items == json.loads(json.dumps(want.items))
        for (wf, wl), (hf, hl) in zip(want.images, have.images, strict=True):
            assert np.array_equal(wf, hf) and np.array_equal(wl, hl)


def test_bad_task_samples_are_skipped_and_counted(tmp_path):
    records = list(task_records("vqa", 4, seed=0))
    with ShardWriter(tmp_path, prefix="bad") as writer:
        for i, record in enumerate(records):
            sample = encode_task_sample(record)
            if i == 1:
                sample["extra.pyd"] = b"not allowed"
            if i == 2:
                record.items[0]["answers"] = [[99, 1.0]]  # outside the 8 answers
                sample = encode_task_sample(record)
            if i == 3:
                del sample["loc.npy"]
            writer.write_sample(record.key, sample, pairs=len(record.items))
    bad = BadSamples()
    (url,) = list_shards(str(tmp_path))
    good = list(iter_task_shard(url, "vqa", num_classes=8, on_bad=bad.add_bad))
    assert [r.key for r in good] == [records[0].key]
    assert bad.by_reason() == {"forbidden_member": 1, "missing_field": 1, "range": 1}
    with pytest.raises(Exception, match="items.json"):
        validate_task_record(records[2], shard="s", num_classes=8)


def test_examples_and_the_soft_accuracy():
    record = next(task_records("vqa", 1, seed=1))
    record.items[0]["input_ids"] = list(range(1000, 1070))  # longer than 60: dropped in training
    train, dropped = examples_of(record, 8, max_txt_len=60)
    kept, none = examples_of(record, 8, max_txt_len=None)
    assert dropped == 1 and none == 0 and len(kept) == len(train) + 1
    assert kept[0]["input_ids"][0] == 101 and kept[0]["input_ids"][-1] == 102
    # The metric: the target score of the argmax answer, averaged (VQA soft accuracy).
    targets = torch.tensor([[0.0, 1.0, 0.3], [0.6, 0.0, 0.0]])
    scores = torch.tensor([[0.0, 2.0, 1.0], [0.0, 0.0, 3.0]])

    class Batch:
        pass

    def forward(batch):
        return {"scores": scores, "loss": torch.tensor(0.5)}

    examples = [
        {
            "input_ids": np.array([101, 5, 102]),
            "img_feat": np.zeros((10, 2048), np.float16),
            "img_loc": np.zeros((10, 7), np.float32),
            "targets": t.numpy(),
        }
        for t in targets
    ]
    out = evaluate_finetune(
        forward, examples, collate_task="vqa", tokens_per_batch=1000, device=torch.device("cpu")
    )
    assert out == {"loss": 0.5, "score": 0.5, "n": 2}


def test_loader_resumes_and_deals_ranks_apart(tmp_path):
    write_task_data(tmp_path, "nlvr2", 40, seed=0)
    kw = dict(collate_task="nlvr2", tokens_per_batch=600, seed=5)
    first = FinetuneLoader([str(tmp_path)], "nlvr2", **kw)
    seen = [next(first)[1] for _ in range(7)]
    state = first.state_dict()
    after = [next(first)[1] for _ in range(3)]
    resumed = FinetuneLoader([str(tmp_path)], "nlvr2", state=state, **kw)
    again = [next(resumed)[1] for _ in range(3)]
    for a, b in zip(after, again, strict=True):
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.target, b.target)
    # Every batch within the budget, unless it is one example (two sequences) alone.
    assert all(b.task == "nlvr2" and (b.num_tokens <= 600 or b.num_pairs == 2) for b in seen)
    # Two ranks: disjoint examples within an epoch, the same number of batches each.
    ranks = [FinetuneLoader([str(tmp_path)], "nlvr2", rank=r, world_size=2, **kw) for r in (0, 1)]
    batches = [r._batches() for r in ranks]
    assert len(batches[0]) == len(batches[1])
    ids = [{ranks[r].examples[i]["id"] for b in batches[r] for i in b} for r in (0, 1)]
    assert not ids[0] & ids[1]


def test_head_parameters_get_their_own_lr():

    model = UniterForVqa(TINY, num_answers=5)
    heads = model.head_parameters()
    groups = param_groups(model, 0.01, head_params=heads, head_lr=1e-3)
    assert len(groups) == 4 and groups[2]["lr"] == groups[3]["lr"] == 1e-3
    assert {id(p) for g in groups[2:] for p in g["params"]} == {id(p) for p in heads}
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert len(param_groups(model, 0.01)) == 2
    assert OptimConfig().lr == 5e-5


def test_finetune_recipes_are_the_references():
    want = {
        ("vqa", "base"): (5120, 5, 8e-5, 10.0, 6000, 600),
        ("vqa", "large"): (3072, 4, 5e-5, 10.0, 5000, 500),
        ("ve", "base"): (4096, 4, 8e-5, 1.0, 4000, 400),
        ("ve", "large"): (4096, 2, 3e-5, 1.0, 4000, 400),
        ("nlvr2", "base"): (10240, 1, 3e-5, 1.0, 8000, 800),
        ("nlvr2", "large"): (5120, 2, 2e-5, 1.0, 5000, 500),
    }
    for (task, size), values in want.items():
        cfg = RunConfig.from_file(f"configs/finetune/{task}-{size}.yaml")
        got = (
            cfg.data.tokens_per_batch,
            cfg.optim.grad_accum,
            cfg.optim.lr,
            cfg.finetune.head_lr_mul,
            cfg.max_steps,
            cfg.optim.warmup_steps,
        )
        assert cfg.task == task and got == values, (task, size)
        assert cfg.optim.grad_clip == 2.0 and cfg.finetune.max_txt_len == 60
    for task in ("vqa", "ve", "nlvr2"):
        assert RunConfig.from_file(f"configs/finetune/{task}-tiny-cpu.yaml").task == task


def _train(tmp_path, *args, timeout=600):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "train.py", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


@pytest.mark.parametrize("task", ["vqa", "nlvr2"])
def test_train_task_writes_the_summary(task, tmp_path):
    # The quick start's recipe, cut to a few steps: the run writes its synthetic task shards,
    # trains through the DeepSpeed engine, validates and writes the pinned summary fields.
    out = tmp_path / "run"
    proc = _train(
        tmp_path,
        "--task",
        task,
        "--output-dir",
        str(out),
        "--max-steps",
        "4",
        "--log-every",
        "2",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == task
    assert summary["metric"] in ("vqa_soft_accuracy", "accuracy")
    assert 0 <= summary["value"] <= 1 and summary["chance"] == {"vqa": 0.125, "nlvr2": 0.5}[task]
    assert summary["validation"]["n"] > 0
    assert (out / "model_reference.pt").is_file()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("task") == task and "loss" in r for r in records)
    # The exported weights load key for key into a fresh model of the task.
    import uniter_fast as uf
    from uniter_fast.config import UniterConfig

    cfg = UniterConfig.from_json(REPO / "configs/model/uniter-tiny.json")
    model = uf.UniterForVqa(cfg, num_answers=8) if task == "vqa" else uf.UniterForNlvr2(cfg)
    report = uf.load_pretrained(model, out / "model_reference.pt", verbose=False)
    assert not report.missing and not report.unexpected
    # The evaluation command on the run folder gives the run's validation figure back and
    # writes the server's prediction format.
    from uniter_fast.evaluate.__main__ import main as evaluate

    ev = tmp_path / "eval"
    argv = ["--task", task, "--checkpoint", str(out), "--data", str(out / "data" / "val")]
    assert evaluate([*argv, "--output", str(ev), "--tokens-per-batch", "2048"]) == 0
    metrics = json.loads((ev / "metrics.json").read_text())
    assert metrics["examples"] == summary["validation"]["n"]
    assert metrics[summary["metric"]] == pytest.approx(summary["value"], abs=1e-6)
    if task == "vqa":
        rows = json.loads((ev / "predictions.json").read_text())
        assert len(rows) == metrics["examples"] and set(rows[0]) == {"question_id", "answer"}
        # On two ranks (torchrun, gloo): the batches dealt out, the results gathered, the same
        # figure and predictions.
        ev2 = tmp_path / "eval2"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
        cmd += ["--standalone", "-m", "uniter_fast.evaluate", *argv]
        proc = subprocess.run(
            [*cmd, "--output", str(ev2), "--tokens-per-batch", "512"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        two = json.loads((ev2 / "metrics.json").read_text())
        assert two["examples"] == metrics["examples"]
        assert two[summary["metric"]] == pytest.approx(metrics[summary["metric"]], abs=1e-6)
        by_id = {r["question_id"]: r["answer"] for r in rows}
        assert {
            r["question_id"]: r["answer"]
            for r in json.loads((ev2 / "predictions.json").read_text())
        } == by_id
    else:
        lines = (ev / "predictions.csv").read_text().splitlines()
        assert len(lines) == metrics["examples"] and lines[0].split(",")[1] in ("True", "False")
        assert 0 <= metrics["consistency"] <= 1


def test_prediction_formats(tmp_path):
    from uniter_fast.evaluate.formats import (
        nlvr2_consistency,
        read_answer_vocabulary,
        write_predictions,
    )

    # Consistency: a sentence (identifier without its pair number) counts only if all its
    # image pairs are right.
    ids = ["dev-1-0-0", "dev-1-1-0", "dev-2-0-1", "dev-2-1-1"]
    assert nlvr2_consistency(ids, [True, True, True, False]) == 0.5
    vocab = tmp_path / "ans2label.json"
    vocab.write_text(json.dumps({"yes": 0, "no": 1, "2": 2}))
    answers = read_answer_vocabulary(vocab)
    assert answers == ["yes", "no", "2"]
    scores = np.array([[0.1, 0.9, 0.0], [3.0, 0.0, 1.0]])
    write_predictions("vqa", tmp_path, ["17", "q2"], scores, answers=answers, logits=True)
    rows = json.loads((tmp_path / "predictions.json").read_text())
    assert rows == [{"question_id": 17, "answer": "no"}, {"question_id": "q2", "answer": "yes"}]
    assert np.load(tmp_path / "logits.npy").dtype == np.float16
    with pytest.raises(ValueError, match="3 answers, the model 2"):
        write_predictions("vqa", tmp_path, ["1"], np.zeros((1, 2)), answers=answers)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"yes": 0, "no": 0}))
    with pytest.raises(ValueError, match="once each"):
        read_answer_vocabulary(bad)


def test_task_and_config_must_agree(tmp_path):
    proc = _train(tmp_path, "--task", "ve", "--config", "configs/finetune/vqa-tiny-cpu.yaml")
    assert proc.returncode == 2 and "--task ve but the recipe" in proc.stderr
    proc = _train(
        tmp_path, "--config", "configs/finetune/vqa-base.yaml", "--output-dir", str(tmp_path / "r")
    )
    assert proc.returncode == 2 and "init_checkpoint for you to set" in proc.stderr


@pytest.mark.parametrize("shards", [1, 4])
def test_streaming_loader_resumes_and_splits_ranks(shards, tmp_path):
    from uniter_fast.tasks.finetune import StreamingFinetuneLoader

    for i in range(shards):
        write_task_data(tmp_path / f"s{i}", "vqa", 30 // shards, seed=i)
    urls = [str(tmp_path / f"s{i}") for i in range(shards)]
    kw = dict(collate_task="vqa", tokens_per_batch=400, seed=3, num_classes=8, buffer=16)
    first = StreamingFinetuneLoader(urls, "vqa", **kw)
    # Endless: more batches than one pass holds, each within the budget (or one example).
    batches = [next(first)[1] for _ in range(40)]
    assert all(b.num_tokens <= 400 or b.num_pairs == 1 for b in batches)
    state = first.state_dict()
    after = [next(first)[1] for _ in range(3)]
    again = StreamingFinetuneLoader(urls, "vqa", state=state, **kw)
    for a, b in zip(after, [next(again)[1] for _ in range(3)], strict=True):
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.targets, b.targets)
    # Two ranks read disjoint examples (by shard, or by id hash when shards are few), and
    # between them all of them.
    ranks = [StreamingFinetuneLoader(urls, "vqa", rank=r, world_size=2, **kw) for r in (0, 1)]
    total = sum(
        len(r.items) for u in urls for url in list_shards(u) for r in iter_task_shard(url, "vqa")
    )
    ids = []
    for r in ranks:
        stream = r._examples()
        ids.append({next(stream)["id"] for _ in range(total)})
    assert not ids[0] & ids[1]
    every = {
        item["id"]
        for u in urls
        for url in list_shards(u)
        for record in iter_task_shard(url, "vqa")
        for item in record.items
    }
    assert ids[0] | ids[1] == every
    every = {
        item["id"]
        for u in urls
        for url in list_shards(u)
        for record in iter_task_shard(url, "vqa")
        for item in record.items
    }
    assert ids[0] | ids[1] == every


def test_recipes_choose_the_loader():
    assert RunConfig.from_file("configs/finetune/vqa-tiny-cpu.yaml").data.mode == "exact"
    assert RunConfig.from_file("configs/finetune/vqa-base.yaml").data.mode == "resampled"
