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
- RE: an image of 4..10 ground-truth boxes, each showing one concept at a random place; an
  expression names a concept that exactly one box shows, and that box is the target. The
  detected boxes are the ground-truth ones jittered a little (IoU with their own box above 0.5)
  plus 2..5 distractors, shuffled. Chance: the mean of 1 / boxes.
- VCR: a frame of 2..4 objects (ground-truth boxes, each showing one concept; objects of the
  first 3 concepts are persons) plus 4..8 detected boxes, with soft labels. A question names
  an object (a person by its tag id, 28996 + its rank among the persons; another object by its
  concept word); of the 4 answers, the right one names a concept the frame shows, the others
  concepts it does not; the right rationale restates the right answer's concept, the others
  name other concepts. Chance: Q->A 1/4, QA->R 1/4, Q->AR 1/16.
- Retrieval: the pretraining synthetic shards (`uniter_fast.data.synthetic`) with short
  captions that name every concept an image shows (`RETRIEVAL_SPEC`). Chance of recall@1:
  1 / images of the split.

    write_task_data(out_dir / "train", "vqa", images=600, seed=0)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .schema import BERT_BASE_CASED, IMG_DIM, IMG_LABEL_DIM
from .synthetic import SyntheticSpec, write_synthetic
from .task_shards import TaskRecord, write_task_shards

CONCEPTS = 8
_PROTOTYPE_SEED = 1234  # the world: fixed, so that every split and run shares it
_WORD = BERT_BASE_CASED.word_start + 100  # concept c is the word _WORD + c
_MAYBE = _WORD + 50
_FILLER = (_WORD + 60, _WORD + 80)  # filler words are drawn from this range

_RE_BOXES = (4, 10)  # ground-truth boxes per RE image, inclusive
CHANCE = {
    "vqa": 1 / CONCEPTS,
    "ve": 1 / 3,
    "nlvr2": 1 / 2,
    "re": float(np.mean([1 / n for n in range(_RE_BOXES[0], _RE_BOXES[1] + 1)])),
    "vcr": 1 / 16,
}
NUM_CLASSES = {"vqa": CONCEPTS, "ve": 3, "nlvr2": 2, "re": None, "vcr": None}
_PERSONS = 3  # concepts 0..2 are persons
_TAG = BERT_BASE_CASED.size  # the first object tag id
RE_SIZE = (640, 480)  # the synthetic images' width and height in pixels


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


def _boxes_loc(xy: np.ndarray, wh: np.ndarray) -> np.ndarray:
    return np.concatenate([xy, xy + wh, wh, wh[:, :1] * wh[:, 1:]], axis=1).astype(np.float32)


def _re_record(rng, protos, key: str) -> TaskRecord:
    n = int(rng.integers(_RE_BOXES[0], _RE_BOXES[1] + 1))
    concept = rng.integers(CONCEPTS, size=n)
    # At least one concept shown by exactly one box: force box 0's concept to be unique.
    concept[1:][concept[1:] == concept[0]] = (concept[0] + 1) % CONCEPTS
    unique = [r for r in range(n) if (concept == concept[r]).sum() == 1]
    wh = 0.1 + rng.random((n, 2)) * 0.3
    xy = rng.random((n, 2)) * (1 - wh)
    feat = protos[concept] + 0.5 * rng.standard_normal((n, protos.shape[1]))
    # Detected: each ground-truth box jittered by at most 5% of its size, plus distractors.
    jit_wh = wh * (1 + rng.uniform(-0.05, 0.05, size=wh.shape))
    jit_xy = np.clip(xy + wh * rng.uniform(-0.05, 0.05, size=xy.shape), 0, 1 - jit_wh)
    k = int(rng.integers(2, 6))
    d_wh = 0.1 + rng.random((k, 2)) * 0.3
    d_xy = rng.random((k, 2)) * (1 - d_wh)
    d_concept = rng.integers(CONCEPTS, size=k)
    det_feat = np.concatenate([protos[concept], protos[d_concept]])
    det_feat = det_feat + 0.5 * rng.standard_normal(det_feat.shape)
    det_loc = _boxes_loc(np.concatenate([jit_xy, d_xy]), np.concatenate([jit_wh, d_wh]))
    order = rng.permutation(n + k)
    width, height = RE_SIZE
    items = []
    for j in range(int(rng.integers(1, 4))):
        r = int(rng.choice(unique))
        ids = [*_filler(rng, int(rng.integers(1, 4))), _WORD + int(concept[r])]
        bbox = [
            float(xy[r, 0] * width),
            float(xy[r, 1] * height),
            float(wh[r, 0] * width),
            float(wh[r, 1] * height),
        ]
        items.append({"id": f"{key}-e{j}", "input_ids": ids, "target": r, "bbox": bbox})
    meta = {"image_id": key, "width": width, "height": height, "ann_ids": list(range(n))}
    return TaskRecord(
        key,
        "re",
        [
            (feat.astype(np.float16), _boxes_loc(xy, wh)),
            (det_feat[order].astype(np.float16), det_loc[order]),
        ],
        items,
        meta,
    )


def _soft(concept: np.ndarray) -> np.ndarray:
    soft = np.zeros((concept.size, IMG_LABEL_DIM), np.float16)
    soft[:, 0] = 0.2
    soft[np.arange(concept.size), 1 + concept] = 0.8
    return soft


def _vcr_record(rng, protos, key: str) -> TaskRecord:
    n = int(rng.integers(2, 5))
    concept = rng.choice(CONCEPTS, size=n, replace=False)
    wh = 0.1 + rng.random((n, 2)) * 0.3
    xy = rng.random((n, 2)) * (1 - wh)
    feat = protos[concept] + 0.5 * rng.standard_normal((n, protos.shape[1]))
    k = int(rng.integers(4, 9))
    d_concept = rng.choice(concept, size=k)
    d_wh = 0.1 + rng.random((k, 2)) * 0.3
    d_xy = rng.random((k, 2)) * (1 - d_wh)
    d_feat = protos[d_concept] + 0.5 * rng.standard_normal((k, protos.shape[1]))
    objects = ["person" if c < _PERSONS else f"concept{c}" for c in concept]
    absent = [c for c in range(CONCEPTS) if c not in set(concept.tolist())]
    items = []
    for j in range(int(rng.integers(1, 4))):
        o = int(rng.integers(n))
        if objects[o] == "person":
            ref = _TAG + sum(1 for x in objects[:o] if x == "person")
        else:
            ref = _WORD + int(concept[o])
        question = [*_filler(rng, int(rng.integers(1, 4))), ref]
        right = int(rng.choice(concept))
        wrong = [int(c) for c in rng.choice(absent, size=3, replace=False)]
        a_label, r_label = int(rng.integers(4)), int(rng.integers(4))
        shown = wrong[:a_label] + [right] + wrong[a_label:]
        answers = [[*_filler(rng, int(rng.integers(1, 3))), _WORD + c] for c in shown]
        others = [c for c in range(CONCEPTS) if c != right]
        r_wrong = [int(c) for c in rng.choice(others, size=3, replace=False)]
        stated = r_wrong[:r_label] + [right] + r_wrong[r_label:]
        rationales = [[_WORD + c, *_filler(rng, int(rng.integers(1, 3)))] for c in stated]
        items.append(
            {
                "id": f"{key}-q{j}",
                "question": question,
                "answers": answers,
                "rationales": rationales,
                "answer_label": a_label,
                "rationale_label": r_label,
            }
        )
    width, height = RE_SIZE
    meta = {"image_id": key, "width": width, "height": height, "objects": objects}
    return TaskRecord(
        key,
        "vcr",
        [
            (feat.astype(np.float16), _boxes_loc(xy, wh)),
            (d_feat.astype(np.float16), _boxes_loc(d_xy, d_wh)),
        ],
        items,
        meta,
        soft=[_soft(concept), _soft(d_concept)],
    )


def task_records(task: str, images: int, *, seed: int, img_dim: int = IMG_DIM):
    """`images` TaskRecords of `task` (NLVR2: image pairs), deterministic in `seed`."""
    if task not in NUM_CLASSES:
        raise ValueError(f"unknown synthetic task {task!r}; expected one of {sorted(NUM_CLASSES)}")
    protos = _prototypes(img_dim)
    rng = np.random.default_rng(seed)
    for i in range(images):
        key = f"syn{task}-{seed}-{i:06d}"
        if task in ("re", "vcr"):
            yield (_re_record if task == "re" else _vcr_record)(rng, protos, key)
            continue
        feat, loc, concept = _image(rng, protos)
        if task == "nlvr2":
            feat1, loc1, concept1 = _image(rng, protos)
            yield TaskRecord(
                key, task, [(feat, loc), (feat1, loc1)], _nlvr2_items(rng, key, concept, concept1)
            )
        else:
            items = (_vqa_items if task == "vqa" else _ve_items)(rng, key, concept)
            yield TaskRecord(key, task, [(feat, loc)], items, {"image_id": key})


# Retrieval's world: more concepts than the other tasks', 2 or 3 per image, named by captions of
# 3..8 tokens, few regions; nearly every image shows its own set of concepts.
RETRIEVAL_SPEC = SyntheticSpec(
    num_concepts=12,
    min_objects=1,
    max_objects=2,
    min_regions=8,
    max_regions=16,
    median_regions=10,
    captions_per_image=2,
    min_caption_tokens=3,
    max_caption_tokens=8,
    median_caption_tokens=4,
    max_clause_fillers=1,
)


def write_task_data(out_dir: str | Path, task: str, images: int, *, seed: int) -> list:
    """Write `images` synthetic samples of `task` as shards under `out_dir`."""
    if task == "retrieval":
        return write_synthetic(
            out_dir, images, seed=seed, spec=RETRIEVAL_SPEC, prefix="synthetic-retrieval"
        )
    return write_task_shards(
        out_dir,
        task_records(task, images, seed=seed),
        prefix=f"synthetic-{task}",
        num_classes=NUM_CLASSES[task] if task == "vqa" else None,
    )


__all__ = [
    "CHANCE",
    "CONCEPTS",
    "NUM_CLASSES",
    "RETRIEVAL_SPEC",
    "RE_SIZE",
    "task_records",
    "write_task_data",
]
