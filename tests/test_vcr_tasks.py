"""VCR's candidates, loaders (both stages), metrics, evaluation command and train.py runs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_finetune import _train

import uniter_fast as uf
from uniter_fast.data.pipeline import BadSamples
from uniter_fast.data.shards import list_shards
from uniter_fast.data.synthetic_tasks import task_records, write_task_data
from uniter_fast.data.task_shards import iter_task_shard
from uniter_fast.evaluate.__main__ import main as evaluate
from uniter_fast.tasks.vcr import (
    VcrLoader,
    VcrPretrainLoader,
    evaluate_vcr,
    mask_for,
    pretrain_example,
    question_groups,
    read_questions,
)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def vcr_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("vcr")
    write_task_data(root / "val", "vcr", 12, seed=5)
    return root / "val"


def test_candidates_types_and_modes():
    record = next(task_records("vcr", 1, seed=3))
    item = record.items[0]
    g = question_groups(record, mode="val")[0][0]
    q, a_label, r_label = item["question"], item["answer_label"], item["rationale_label"]
    # Q->A: [CLS] q [SEP] a [SEP], types 0 then 2.
    ex = g["qa"][1]
    a = item["answers"][1]
    assert ex["input_ids"].tolist() == [101, *q, 102, *a, 102]
    assert ex["txt_type_ids"].tolist() == [0] * (1 + len(q)) + [2] * (len(a) + 2)
    assert [e["target"] for e in g["qa"]] == [int(k == a_label) for k in range(4)]
    # QA->R in val mode: one group, conditioned on the right answer.
    assert len(g["qar"]) == 1
    ex = g["qar"][0][2]
    a, r = item["answers"][a_label], item["rationales"][2]
    assert ex["input_ids"].tolist() == [101, *q, 102, *a, 102, *r, 102]
    assert ex["txt_type_ids"].tolist() == [0] * (1 + len(q)) + [2] * (len(a) + 1) + [3] * (
        len(r) + 2
    )
    assert [e["target"] for e in g["qar"][0]] == [int(k == r_label) for k in range(4)]
    # Regions: ground-truth boxes, then detected ones.
    (gf, _), (df, _) = record.images
    assert len(ex["img_feat"]) == len(gf) + len(df)
    # Test mode: 4 answers x 4 rationales, no targets.
    for it in record.items:
        del it["answer_label"], it["rationale_label"]
    t = question_groups(record, mode="test")[0][0]
    assert len(t["qar"]) == 4 and all("target" not in e for grp in t["qar"] for e in grp)


def test_loaders_resume_and_keep_groups(vcr_data):
    kw = dict(tokens_per_batch=900, seed=2)
    first = VcrLoader([str(vcr_data)], **kw)
    for _ in range(2):
        next(first)
    state = first.state_dict()
    want = [next(first)[1] for _ in range(2)]
    again = VcrLoader([str(vcr_data)], state=state, **kw)
    for a, b in zip(want, [next(again)[1] for _ in range(2)], strict=True):
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.txt_type_ids, b.txt_type_ids)
    # Whole groups of 4 candidates with exactly one right one each.
    for batch in want:
        assert batch.num_pairs % 4 == 0
        assert (batch.target.view(-1, 4).sum(1) == 1).all()
    # The second stage: every rank draws the same task at the same micro-batch; MLM never
    # masks [CLS] or a [SEP]; resumes to the same batches.
    mix = {"mlm": 2, "mrfr": 1, "mrckl": 1}
    ranks = [
        VcrPretrainLoader(
            [str(vcr_data)], tokens_per_batch=700, seed=4, mix=mix, rank=r, world_size=2
        )
        for r in range(2)
    ]
    tasks = [[next(rk)[0] for _ in range(6)] for rk in ranks]
    assert tasks[0] == tasks[1] and set(tasks[0]) <= {"mlm", "mrfr", "mrckl"}
    state = ranks[0].state_dict()
    nxt = next(ranks[0])
    resumed = VcrPretrainLoader(
        [str(vcr_data)], tokens_per_batch=700, seed=4, mix=mix, rank=0, world_size=2, state=state
    )
    again = next(resumed)
    assert nxt[0] == again[0] and torch.equal(nxt[1].input_ids, again[1].input_ids)
    record = next(iter_task_shard(list_shards(str(vcr_data))[0], "vcr"))
    ex = pretrain_example(record, record.items[0])
    masked = mask_for("mlm", ex, np.random.default_rng(0))
    special = (ex["input_ids"] == 101) | (ex["input_ids"] == 102)
    assert (masked["input_ids"][special] == ex["input_ids"][special]).all()
    assert (masked["txt_labels"][special] == -1).all() and (masked["txt_labels"] >= 0).any()
    with pytest.raises(ValueError, match="task mix"):
        VcrPretrainLoader([str(vcr_data)], tokens_per_batch=700, seed=0, mix={"itm": 1})


def test_metrics_and_the_leaderboard_csv(vcr_data, tmp_path):
    questions = read_questions([str(vcr_data)], mode="val", max_txt_len=None, bad=BadSamples())

    def oracle(batch):  # class-1 logit 1 for the right candidates: every figure is 1
        scores = torch.zeros(batch.num_pairs, 2)
        scores[:, 1] = batch.target.float()
        return {"scores": scores}

    got = evaluate_vcr(oracle, questions, tokens_per_batch=700, device=torch.device("cpu"))
    assert got["q2a"] == got["qa2r"] == got["q2ar"] == 1.0 and got["n"] == len(questions)

    def wrong_rationale(batch):  # right answers, wrong rationales: Q->AR 0
        scores = torch.zeros(batch.num_pairs, 2)
        qar = batch.txt_type_ids.new_zeros(batch.num_pairs).index_add_(
            0,
            torch.repeat_interleave(torch.arange(batch.num_pairs), batch.txt_len),
            (batch.txt_type_ids == 3).long(),
        )
        scores[:, 1] = torch.where(qar > 0, 1 - batch.target.float(), batch.target.float())
        return {"scores": scores}

    got = evaluate_vcr(wrong_rationale, questions, tokens_per_batch=700, device=torch.device("cpu"))
    assert got["q2a"] == 1.0 and got["qa2r"] == 0.0 and got["q2ar"] == 0.0
    # The command, test mode: the leaderboard's columns, 16 rationale logits per question.
    model = uf.UniterForVcr(uf.UniterConfig.from_json(REPO / "configs/model/uniter-tiny.json"))
    weights = uf.save_reference(model, tmp_path / "vcr.pt")
    argv = [
        "--task",
        "vcr",
        "--checkpoint",
        str(weights),
        "--model-config",
        str(REPO / "configs/model/uniter-tiny.json"),
        "--data",
        str(vcr_data),
    ]
    assert evaluate([*argv, "--output", str(tmp_path / "test"), "--vcr-mode", "test"]) == 0
    rows = list(csv.reader((tmp_path / "test" / "predictions.csv").open()))
    assert rows[0][:5] == ["annot_id", "answer_0", "answer_1", "answer_2", "answer_3"]
    assert rows[0][5] == "rationale_conditioned_on_a0_0" and len(rows[0]) == 21
    assert len(rows) == 1 + len(questions)
    assert evaluate([*argv, "--output", str(tmp_path / "val")]) == 0
    metrics = json.loads((tmp_path / "val" / "metrics.json").read_text())
    assert metrics["questions"] == len(questions) and 0 <= metrics["q2ar"] <= metrics["q2a"] <= 1


@pytest.mark.parametrize("task", ["vcr", "pretrain-vcr"])
def test_train_task_writes_the_summary(task, tmp_path):
    out = tmp_path / "run"
    proc = _train(
        tmp_path, "--task", task, "--output-dir", str(out), "--max-steps", "3", "--log-every", "1"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == task
    if task == "vcr":
        assert summary["metric"] == "q2ar" and summary["chance"] == pytest.approx(1 / 16)
        assert set(summary["validation"]) >= {"q2a", "qa2r", "q2ar"}
        model = uf.UniterForVcr(uf.UniterConfig.from_json(REPO / "configs/model/uniter-tiny.json"))
    else:
        assert summary["metric"] == "mlm_acc"
        assert set(summary["validation"]) >= {"mlm_loss", "mrfr_loss", "mrckl_loss"}
        assert set(summary["loss_first"]) <= {"mlm", "mrfr", "mrckl"}
        model = uf.UniterForVcrPretraining(
            uf.UniterConfig.from_json(REPO / "configs/model/uniter-tiny.json")
        )
    report = uf.load_pretrained(model, out / "model_reference.pt", verbose=False)
    assert not report.missing and not report.unexpected and not report.adapted


def test_recipes_parse():
    from uniter_fast.config import RunConfig

    for name, task in [
        ("pretrain/vcr-base", "pretrain-vcr"),
        ("pretrain/vcr-large", "pretrain-vcr"),
        ("pretrain/vcr-tiny-cpu", "pretrain-vcr"),
        ("finetune/vcr-base", "vcr"),
        ("finetune/vcr-large", "vcr"),
        ("finetune/vcr-tiny-cpu", "vcr"),
    ]:
        assert RunConfig.from_file(REPO / f"configs/{name}.yaml").task == task
    large = RunConfig.from_file(REPO / "configs/pretrain/vcr-large.yaml")
    assert large.data.train[0].mix == {"mlm": 10, "mrfr": 1, "mrckl": 1}
