"""VCR: candidate sequences from "vcr" task shards, the loaders of both stages, the metrics.

A question (one item of a shard sample, `uniter_fast.data.task_shards`) becomes groups of
candidate sequences, each an example of the collate task "vcr":

- Q->A: [CLS] q [SEP] a_k [SEP] for the 4 answers; types 0 for [CLS] and q, 2 for the rest.
- QA->R: [CLS] q [SEP] a [SEP] r_k [SEP] for the 4 rationales; types 0 for [CLS] and q, 2 for
  [SEP] a, 3 for [SEP] r [SEP]. a is the right answer in training and validation (the
  reference's val mode), every answer in test mode (4 x 4 = 16 sequences).

Every candidate holds the image's ground-truth boxes followed by its detected boxes (the
reference's `_get_img_feat`). `target` is 1 for the right candidate. Training draws Q->A and
QA->R groups alike (the reference concatenates the two datasets) and keeps a group's 4
candidates in one batch; batches fill `tokens_per_batch` real tokens of all candidates (the
reference counted each question's text once, padded). Texts longer than `max_txt_len` tokens
(the longest candidate, without [CLS]/[SEP]s) are dropped from training, as the reference does.

The second pretraining stage (`VcrPretrainLoader`) reads the same shards: one sequence per
question, [CLS] q [SEP] a_gt [SEP] r_gt [SEP] with its types, the regions and their soft labels,
masked for MLM (text only) or MRFR / MRC-kl (regions only), the task drawn per micro-batch in
the recipe's ratio (base 2:1:1), the same on every rank.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch

from ..data.collate import collate
from ..data.pipeline import BadSamples
from ..data.schema import BERT_BASE_CASED
from ..data.shards import list_shards
from ..data.task_shards import TaskRecord, iter_task_shard
from .finetune import EpochLoader, dealt_batches, greedy_fill
from .mlm import IGNORE, mask_tokens
from .mrm import mask_regions

VCR_PRETRAIN_TASKS = ("mlm", "mrfr", "mrckl")
_V = BERT_BASE_CASED


def vcr_image(record: TaskRecord) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(feat, loc, soft) of the ground-truth boxes followed by the detected ones."""
    (gf, gl), (df, dl) = record.images
    soft = record.soft or [np.zeros((len(gf), 1601), np.float16), np.zeros((len(df), 1601))]
    return (
        np.concatenate([gf, df]),
        np.concatenate([gl, dl]),
        np.concatenate([soft[0], soft[1]]).astype(np.float16),
    )


def qa_sequence(q: Sequence[int], a: Sequence[int]) -> tuple[list[int], list[int]]:
    ids = [_V.cls_id, *q, _V.sep_id, *a, _V.sep_id]
    return ids, [0] * (1 + len(q)) + [2] * (len(a) + 2)


def qar_sequence(
    q: Sequence[int], a: Sequence[int], r: Sequence[int]
) -> tuple[list[int], list[int]]:
    ids = [_V.cls_id, *q, _V.sep_id, *a, _V.sep_id, *r, _V.sep_id]
    return ids, [0] * (1 + len(q)) + [2] * (len(a) + 1) + [3] * (len(r) + 2)


def question_groups(
    record: TaskRecord, *, mode: str = "train", max_txt_len: int | None = None
) -> tuple[list[dict], int]:
    """The questions of one record as {"id", "qa": [4 examples], "qar": [[4 examples], ...]}
    (one QA->R group in train / val mode, four in test mode: one per answer), and how many
    questions `max_txt_len` dropped."""
    if mode not in ("train", "val", "test"):
        raise ValueError(f"mode must be train, val or test, got {mode!r}")
    feat, loc, _ = vcr_image(record)
    out, dropped = [], 0
    for item in record.items:
        q, answers, rationales = item["question"], item["answers"], item["rationales"]
        labelled = item.get("answer_label") is not None
        if mode != "test" and not labelled:
            raise ValueError(f"{record.shard}: {item['id']}: a {mode} question without labels")
        if max_txt_len is not None:
            longest = len(q) + max(map(len, answers)) + max(map(len, rationales))
            if longest > max_txt_len:
                dropped += 1
                continue

        def example(ids, types, target):
            ex = {
                "input_ids": np.asarray(ids, np.int64),
                "txt_type_ids": np.asarray(types, np.int64),
                "img_feat": feat,
                "img_loc": loc,
            }
            if target is not None:
                ex["target"] = int(target)
            return ex

        a_label = item.get("answer_label")
        r_label = item.get("rationale_label")
        qa = [
            example(*qa_sequence(q, a), None if a_label is None else k == a_label)
            for k, a in enumerate(answers)
        ]
        conditions = range(4) if mode == "test" else [a_label]
        qar = [
            [
                example(
                    *qar_sequence(q, answers[c], r),
                    None if r_label is None else (k == r_label and c == a_label),
                )
                for k, r in enumerate(rationales)
            ]
            for c in conditions
        ]
        out.append(
            {
                "id": item["id"],
                "qa": qa,
                "qar": qar,
                "answer_label": a_label,
                "rationale_label": r_label,
            }
        )
    return out, dropped


def read_questions(
    urls: Sequence[str], *, mode: str, max_txt_len: int | None, bad: BadSamples
) -> list[dict]:
    questions = []
    for url in list_shards(urls):
        for record in iter_task_shard(url, "vcr", on_bad=bad.add_bad):
            bad.add_good(record.shard)
            questions += question_groups(record, mode=mode, max_txt_len=max_txt_len)[0]
    return questions


def _group_tokens(group: list[dict]) -> int:
    return sum(len(ex["input_ids"]) + len(ex["img_feat"]) for ex in group)


def _fill(groups: Sequence[list[dict]], budget: int) -> Iterator[list]:
    """Whole groups in batches of at most `budget` real tokens (a group alone may exceed it)."""
    return greedy_fill(groups, _group_tokens, budget)


def _dealt_groups(loader: EpochLoader, groups: Sequence[list[dict]]) -> list[list[int]]:
    """`loader`'s batches this epoch: `groups` shuffled from (seed, epoch), dealt over the ranks,
    whole groups filled up to its token budget."""
    order = np.random.default_rng([loader.seed, loader.epoch]).permutation(len(groups))

    def tokens(i: int) -> int:
        return _group_tokens(groups[i])

    def plan(share) -> list[list[int]]:
        return list(greedy_fill((int(i) for i in share), tokens, loader.tokens_per_batch))

    return dealt_batches(order, loader.rank, loader.world, plan)


class VcrLoader(EpochLoader):
    """Endless ("vcr", batch) for one rank: every question's Q->A and QA->R groups, shuffled per
    epoch, dealt over ranks, whole groups per batch. State (epoch, batches)."""

    def __init__(
        self,
        patterns: Sequence[str],
        *,
        tokens_per_batch: int,
        seed: int,
        max_txt_len: int | None = 220,
        rank: int = 0,
        world_size: int = 1,
        pin_memory: bool = False,
        state: dict | None = None,
    ):
        self.bad = BadSamples()
        questions = read_questions(patterns, mode="train", max_txt_len=max_txt_len, bad=self.bad)
        self.groups = [q["qa"] for q in questions] + [q["qar"][0] for q in questions]
        if len(self.groups) < world_size:
            raise ValueError(f"vcr: {len(self.groups)} training groups for {world_size} ranks")
        self.tokens_per_batch, self.seed = tokens_per_batch, seed
        self.rank, self.world, self.pin = rank, world_size, pin_memory
        self._start(state)

    @property
    def examples(self) -> list:
        return self.groups

    def _plan(self) -> list[list[int]]:
        return _dealt_groups(self, self.groups)

    def __next__(self):
        _, indices = self._take()
        examples = [ex for g in indices for ex in self.groups[g]]
        batch = collate(examples, task="vcr")
        return "vcr", batch.pin_memory() if self.pin else batch

    def close(self) -> None:
        self.groups = []


def pretrain_example(record: TaskRecord, item: dict) -> dict:
    """[CLS] q [SEP] a_gt [SEP] r_gt [SEP] with its types, and the image with soft labels."""
    feat, loc, soft = vcr_image(record)
    a = item["answers"][item["answer_label"]]
    r = item["rationales"][item["rationale_label"]]
    ids, types = qar_sequence(item["question"], a, r)
    return {
        "id": item["id"],
        "input_ids": np.asarray(ids, np.int64),
        "txt_type_ids": np.asarray(types, np.int64),
        "img_feat": feat,
        "img_loc": loc,
        "soft_labels": soft,
    }


def mask_for(task: str, ex: dict, rng: np.random.Generator) -> dict:
    """`ex` masked for `task`: MLM masks the words (never [CLS] or a [SEP]), MRFR and MRC-kl
    mask regions (conditional masking: one modality at a time)."""
    out = {k: ex[k] for k in ("input_ids", "txt_type_ids", "img_feat", "img_loc")}
    if task == "mlm":
        ids = ex["input_ids"]
        words = (ids != _V.cls_id) & (ids != _V.sep_id)
        masked, labels = mask_tokens(ids[words], rng, _V)
        new_ids, new_labels = ids.copy(), np.full(ids.shape, IGNORE, np.int64)
        new_ids[words], new_labels[words] = masked, labels
        out["input_ids"], out["txt_labels"] = new_ids, new_labels
    else:
        out["img_mask"] = mask_regions(len(ex["img_feat"]), rng)
        out["soft_labels"] = ex["soft_labels"]
    return out


class VcrPretrainLoader(EpochLoader):
    """Endless (task, batch) of the second pretraining stage for one rank (module docstring).
    `mix`: {task: weight} over mlm, mrfr, mrckl. The task of micro-batch k is drawn from
    (seed, k) alone, so every rank runs the same task at the same micro-batch. State as
    `VcrLoader`."""

    def __init__(
        self,
        patterns: Sequence[str],
        *,
        tokens_per_batch: int,
        seed: int,
        mix: dict[str, float],
        rank: int = 0,
        world_size: int = 1,
        pin_memory: bool = False,
        state: dict | None = None,
    ):
        unknown = set(mix) - set(VCR_PRETRAIN_TASKS)
        if unknown or not mix or min(mix.values()) < 0 or sum(mix.values()) <= 0:
            raise ValueError(
                f"pretrain-vcr: the task mix must weigh {', '.join(VCR_PRETRAIN_TASKS)}, got {mix}"
            )
        self.bad = BadSamples()
        self.items = []
        for url in list_shards(patterns):
            for record in iter_task_shard(url, "vcr", on_bad=self.bad.add_bad):
                self.bad.add_good(record.shard)
                for item in record.items:
                    if item.get("answer_label") is not None:
                        self.items.append(pretrain_example(record, item))
        if len(self.items) < world_size:
            raise ValueError(f"pretrain-vcr: {len(self.items)} questions for {world_size} ranks")
        self.tasks = [t for t in VCR_PRETRAIN_TASKS if mix.get(t, 0) > 0]
        weights = np.array([mix[t] for t in self.tasks], dtype=np.float64)
        self.weights = weights / weights.sum()
        self.tokens_per_batch, self.seed = tokens_per_batch, seed
        self.rank, self.world, self.pin = rank, world_size, pin_memory
        self._start(state)
        self.step = int(state["k"]) if state is not None else 0  # micro-batches so far

    @property
    def examples(self) -> list:
        return self.items

    def _plan(self) -> list[list[int]]:
        return _dealt_groups(self, [[ex] for ex in self.items])

    def __next__(self):
        _, indices = self._take()
        draw = np.random.default_rng([self.seed, 7, self.step])
        task = self.tasks[int(draw.choice(len(self.tasks), p=self.weights))]
        rng = np.random.default_rng([self.seed, self.rank, self.step])
        examples = [mask_for(task, self.items[i], rng) for i in indices]
        self.step += 1
        batch = collate(examples, task=task)
        return task, batch.pin_memory() if self.pin else batch

    def state_dict(self) -> dict:
        return {**super().state_dict(), "k": self.step}

    def close(self) -> None:
        self.items = []


@torch.no_grad()
def evaluate_vcr(
    forward: Callable[[object], dict],
    questions: Sequence[dict],
    *,
    tokens_per_batch: int,
    device: torch.device,
    rank: int = 0,
    world: int = 1,
    all_reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
    on_batch: Callable[[int], None] | None = None,
) -> dict:
    """Q->A, QA->R and Q->AR accuracy (when labelled), the mean loss over candidates, and this
    rank's per-question class-1 logits ({"id", "answer": [4], "rationale": [[4] per answer
    condition]}). Questions are dealt round-robin over ranks."""
    mine = list(questions)[rank::world]
    # Every group of every question of this rank, in order, as (question, slot) -> examples.
    groups = []
    for qi, q in enumerate(mine):
        groups.append((qi, "qa", 0, q["qa"]))
        groups += [(qi, "qar", c, g) for c, g in enumerate(q["qar"])]
    logits: dict[tuple, np.ndarray] = {}
    loss_sum, loss_n = 0.0, 0
    batches = _fill([g[3] for g in groups], tokens_per_batch)
    k = 0
    for batch_groups in batches:
        examples = [ex for g in batch_groups for ex in g]
        out = forward(collate(examples, task="vcr").to(device))
        scores = out["scores"][:, 1].float().cpu().numpy()
        if "loss" in out:
            loss_sum += float(out["loss"]) * len(examples)
            loss_n += len(examples)
        offset = 0
        for g in batch_groups:
            qi, kind, cond, _ = groups[k]
            logits[(qi, kind, cond)] = scores[offset : offset + len(g)]
            offset += len(g)
            k += 1
        if on_batch is not None:
            on_batch(len(batch_groups))
    totals = torch.zeros(5, dtype=torch.float64)  # questions, qa right, qar right, both, loss n
    predictions = []
    for qi, q in enumerate(mine):
        answer = logits[(qi, "qa", 0)]
        rationale = [logits[(qi, "qar", c)] for c in range(len(q["qar"]))]
        predictions.append(
            {"id": q["id"], "answer": answer.tolist(), "rationale": [r.tolist() for r in rationale]}
        )
        if q["answer_label"] is None:
            continue
        a_right = int(answer.argmax()) == q["answer_label"]
        cond = q["answer_label"] if len(rationale) == 4 else 0
        r_right = int(rationale[cond].argmax()) == q["rationale_label"]
        totals += torch.tensor(
            [1.0, a_right, r_right, a_right and r_right, 0.0], dtype=torch.float64
        )
    totals[4] = loss_n
    loss_t = torch.tensor([loss_sum], dtype=torch.float64)
    n, qa, qar, both, count = all_reduce(totals.to(device)).tolist()
    loss_total = float(all_reduce(loss_t.to(device))[0])
    return {
        "q2a": qa / max(n, 1),
        "qa2r": qar / max(n, 1),
        "q2ar": both / max(n, 1),
        "loss": loss_total / count if count else None,
        "n": int(n),
        "predictions": predictions,
    }


__all__ = [
    "VCR_PRETRAIN_TASKS",
    "VcrLoader",
    "VcrPretrainLoader",
    "evaluate_vcr",
    "mask_for",
    "pretrain_example",
    "qa_sequence",
    "qar_sequence",
    "question_groups",
    "read_questions",
    "vcr_image",
]
