"""Prediction files in each benchmark server's format, and the metrics that need whole splits.

- VQA: `predictions.json`, `[{"question_id": ..., "answer": ...}]` (EvalAI's format); the answer
  is the vocabulary's string when an `ans2label` file is given, else the answer index as a
  string. `logits.npy` (float16 [N, C]) and `logits_ids.json` on request, for ensembling.
- NLVR2: `predictions.csv`, one `identifier,True|False` line per example (the official
  evaluation script's input), plus accuracy and consistency: the share of sentences whose every
  image pair is answered right, a sentence being the identifier without its pair number
  (`split-set-pair-sentence` -> `split-set-sentence`).
- VE: `predictions.csv`, `id,label` with the label's name.
- VCR: test mode, the leaderboard's `predictions.csv`: `annot_id`, `answer_0..3` and
  `rationale_conditioned_on_a{i}_{j}` (i the answer, j the rationale), each the candidate's
  class-1 logit (the reference's file holds logits); val mode, `predictions.json` with the same
  logits per question (rationales conditioned on the right answer only).
"""

from __future__ import annotations

import csv
import json
import os
from collections import defaultdict
from pathlib import Path

import numpy as np

VE_NAMES = ("contradiction", "entailment", "neutral")


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_answer_vocabulary(path: str | os.PathLike) -> list[str]:
    """The answers of an `ans2label.json` ({answer: index}) or of a JSON list, by index."""
    obj = json.loads(Path(path).read_text())
    if isinstance(obj, list) and all(isinstance(a, str) for a in obj):
        return obj
    if isinstance(obj, dict) and all(isinstance(v, int) for v in obj.values()):
        answers = [""] * len(obj)
        for answer, index in obj.items():
            if not 0 <= index < len(obj) or answers[index]:
                raise ValueError(f"{path}: answer indices must be 0..{len(obj) - 1}, once each")
            answers[index] = answer
        return answers
    raise ValueError(f"{path}: expected {{answer: index}} or a list of answers")


def nlvr2_consistency(ids: list[str], correct: list[bool]) -> float:
    """Share of sentences all of whose image pairs are right (NLVR2's consistency)."""
    groups: dict[str, bool] = defaultdict(lambda: True)
    for identifier, ok in zip(ids, correct, strict=True):
        parts = identifier.split("-")
        key = "-".join(parts[:2] + parts[3:]) if len(parts) >= 4 else identifier
        groups[key] = groups[key] and ok
    return sum(groups.values()) / max(len(groups), 1)


def write_predictions(
    task: str,
    out_dir: Path,
    ids: list[str],
    scores: np.ndarray,
    *,
    answers: list[str] | None = None,
    logits: bool = False,
) -> list[Path]:
    """Write `task`'s prediction file(s) for `scores` [N, C] of the examples `ids`."""
    pick = scores.argmax(axis=1)
    written = []
    if task == "vqa":
        if answers is not None and len(answers) != scores.shape[1]:
            raise ValueError(
                f"the answer vocabulary has {len(answers)} answers, the model {scores.shape[1]}"
            )
        rows = [
            {"question_id": _qid(i), "answer": answers[p] if answers else str(int(p))}
            for i, p in zip(ids, pick, strict=True)
        ]
        path = out_dir / "predictions.json"
        _atomic_write(path, json.dumps(rows) + "\n")
        written.append(path)
        if logits:
            np.save(out_dir / "logits.npy", scores.astype(np.float16))
            _atomic_write(out_dir / "logits_ids.json", json.dumps(ids) + "\n")
            written += [out_dir / "logits.npy", out_dir / "logits_ids.json"]
        return written
    path = out_dir / "predictions.csv"
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        for identifier, p in zip(ids, pick, strict=True):
            value = ("True" if p == 1 else "False") if task == "nlvr2" else VE_NAMES[int(p)]
            writer.writerow([identifier, value])
    os.replace(tmp, path)
    return [path]


def write_vcr_predictions(out_dir: Path, predictions: list[dict], *, test: bool) -> Path:
    """VCR's predictions (module docstring); `predictions`: {"id", "answer": [4], "rationale":
    [[4], ...]} per question, as `uniter_fast.tasks.vcr.evaluate_vcr` returns them."""
    if not test:
        path = out_dir / "predictions.json"
        _atomic_write(path, json.dumps(predictions) + "\n")
        return path
    path = out_dir / "predictions.csv"
    tmp = path.with_name(path.name + ".tmp")
    header = ["annot_id", *(f"answer_{i}" for i in range(4))]
    header += [f"rationale_conditioned_on_a{i}_{j}" for i in range(4) for j in range(4)]
    with tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for p in predictions:
            if len(p["rationale"]) != 4:
                raise ValueError(f"{p['id']}: test mode needs the 16 answer-rationale scores")
            row = [p["id"], *p["answer"], *(v for r in p["rationale"] for v in r)]
            writer.writerow(row)
    os.replace(tmp, path)
    return path


def _qid(identifier: str):
    """VQA question ids are ints on the server; keep strings that are not."""
    return int(identifier) if identifier.isdigit() else identifier


__all__ = [
    "VE_NAMES",
    "nlvr2_consistency",
    "read_answer_vocabulary",
    "write_predictions",
    "write_vcr_predictions",
]
