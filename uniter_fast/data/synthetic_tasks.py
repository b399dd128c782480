"""Synthetic task shards for the downstream quick starts: worlds where the answer is in the regions.

Every image holds a few "concepts" out of `CONCEPTS`; a region's feature is its concept's fixed
prototype (the same in every split and run) plus noise, so a model can tell the concepts apart
only by looking at the regions. Each concept also has a word (a token id), so a text can name
one. The tasks:

- VQA: a question of filler words; the answer is the concept most regions of the image show
  (one of `CONCEPTS` answers, soft score 1.0; the runner-up gets 0.3). Chance: 1 / CONCEPTS.
- VE: a hypothesis naming a concept: entailment when the image shows it, contradiction when it
  does not, neutral when the hypothesis carries the "maybe" word (whatever the image). Labels
  are drawn uniformly first. Chance: 1/3.
- NLVR2: a statement naming a concept: true when either image of the pair shows it. Drawn
  balanced. Chance: 1/2.

    write_task_data(out_dir / "train", "vqa", images=600, seed=0)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .schema import BERT_BASE_CASED, IMG_DIM
from .task_shards import TaskRecord, write_task_shards

CONCEPTS = 8
_PROTOTYPE_SEED = 1234  # the world: fixed, so that every split and run shares it
_WORD = BERT_BASE_CASED.word_start + 100  # concept c is the word _WORD + c
_MAYBE = _WORD + 50
_FILLER = (_WORD + 60, _WORD + 80)  # filler words are drawn from this range

CHANCE = {"vqa": 1 / CONCEPTS, "ve": 1 / 3, "nlvr2": 1 / 2}
NUM_CLASSES = {"vqa": CONCEPTS, "ve": 3, "nlvr2": 2}


def _prototypes(img_dim: int) -> np.ndarray:
    rng = np.random.default_rng(_PROTOTYPE_SEED)
    return rng.standard_normal((CONCEPTS, img_dim)).astype(np.float32)


def _image(rng, protos) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(feat float16 [n, D], loc float32 [n, 7], concept of each region [n])."""
    n = int(rng.integers(10, 21))
    present = rng.choice(CONCEPTS, size=int(rng.integers(1, 4)), replace=False)
    weights = rng.dirichlet(np.ones(present.size))
    concept = rng.choice(present, size=n, p=weights)
    feat = protos[concept] + 0.5 * rng.standard_normal((n, protos.shape[1]))
    xy = rng.random((n, 2)) * 0.7
    wh = 0.05 + rng.random((n, 2)) * 0.25
    loc = np.concatenate([xy, xy + wh, wh, wh[:, :1] * wh[:, 1:]], axis=1)
    return feat.astype(np.float16), loc.astype(np.float32), concept


def _filler(rng, k: int) -> list[int]:
    return [int(t) for t in rng.integers(*_FILLER, size=k)]


def _vqa_items(rng, key: str, concept: np.ndarray) -> list[dict]:
    counts = np.bincount(concept, minlength=CONCEPTS)
    order = np.argsort(-counts, kind="stable")
    answers = [[int(order[0]), 1.0]]
    if counts[order[1]] > 0:
        answers.append([int(order[1]), 0.3])
    return [
        {
            "id": f"{key}-q{j}",
            "input_ids": _filler(rng, int(rng.integers(3, 8))),
            "answers": answers,
        }
        for j in range(int(rng.integers(1, 4)))
    ]


def _ve_items(rng, key: str, concept: np.ndarray) -> list[dict]:
    present = set(concept.tolist())
    absent = [c for c in range(CONCEPTS) if c not in present]
    items = []
    for j in range(int(rng.integers(1, 4))):
        label = int(rng.integers(3))
        if label == 1 or (label == 0 and not absent):
            label, c = 1, int(rng.choice(sorted(present)))
        elif label == 0:
            c = int(rng.choice(absent))
        else:
            c = int(rng.integers(CONCEPTS))
        ids = _filler(rng, int(rng.integers(2, 5))) + [_WORD + c]
        if label == 2:
            ids.insert(int(rng.integers(len(ids) + 1)), _MAYBE)
        items.append({"id": f"{key}-h{j}", "input_ids": ids, "label": label})
    return items


def _nlvr2_items(rng, key: str, left: np.ndarray, right: np.ndarray) -> list[dict]:
    # "<concept>": true when either image shows it (each image holds at most 3 of the 8
    # concepts, so a concept neither shows always exists).
    shown = set(left.tolist()) | set(right.tolist())
    items = []
    for j in range(int(rng.integers(1, 4))):
        want = bool(rng.integers(2))
        pool = sorted(shown) if want else [c for c in range(CONCEPTS) if c not in shown]
        c = int(rng.choice(pool))
        ids = [*_filler(rng, int(rng.integers(1, 4))), _WORD + c]
        items.append({"id": f"{key}-s{j}", "input_ids": ids, "target": want})
    return items


def task_records(task: str, images: int, *, seed: int, img_dim: int = IMG_DIM):
    """`images` TaskRecords of `task` (NLVR2: image pairs), deterministic in `seed`."""
    if task not in NUM_CLASSES:
        raise ValueError(f"unknown synthetic task {task!r}; expected one of {sorted(NUM_CLASSES)}")
    protos = _prototypes(img_dim)
    rng = np.random.default_rng(seed)
    for i in range(images):
        key = f"syn{task}-{seed}-{i:06d}"
        feat, loc, concept = _image(rng, protos)
        if task == "nlvr2":
            feat1, loc1, concept1 = _image(rng, protos)
            yield TaskRecord(
                key, task, [(feat, loc), (feat1, loc1)], _nlvr2_items(rng, key, concept, concept1)
            )
        else:
            items = (_vqa_items if task == "vqa" else _ve_items)(rng, key, concept)
            yield TaskRecord(key, task, [(feat, loc)], items, {"image_id": key})


def write_task_data(out_dir: str | Path, task: str, images: int, *, seed: int) -> list[dict]:
    """Write `images` synthetic samples of `task` as shards under `out_dir`."""
    return write_task_shards(
        out_dir,
        task_records(task, images, seed=seed),
        prefix=f"synthetic-{task}",
        num_classes=NUM_CLASSES[task] if task == "vqa" else None,
    )


__all__ = ["CHANCE", "CONCEPTS", "NUM_CLASSES", "task_records", "write_task_data"]
