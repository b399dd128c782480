"""Referring expressions: examples from "re" task shards, the reference's IoU accuracy.

    examples = re_examples(record, features="gt")       # or "det": the detected boxes
    result = evaluate_re(model_call, examples, tokens_per_batch=8192, device=device)
    result["accuracy"], result["predictions"]

An example is one referring sentence about an image: `input_ids` ([CLS] sentence [SEP]),
`img_feat`/`img_loc` of the image's ground-truth boxes (`features="gt"`, what training uses) or
its detected boxes ("det"), `boxes`: every region's [x, y, w, h] in pixels (the reference's
`obj_boxes`: x1 * width, y1 * height, w * width, h * height from the normalised box), and, where
the split has targets, `tgt_box` (the referred object's [x, y, w, h]) and, with ground-truth
boxes, `target` (its region index, for the loss).

Accuracy (the reference's `validate`): the highest-scoring region's box is right when its IoU
with `tgt_box` is above 0.5, IoU counted in inclusive pixels as the reference's `computeIoU`
does (a box [x, y, w, h] spans pixels x .. x + w - 1).

Unlike the reference, whose RE training loader is never shuffled (its sampler has shuffle=False
and `shuffle()` rebuilds a list the dataset never reads), training here deals a fresh shuffled
order every epoch, like every other task.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from ..data.collate import collate
from ..data.schema import BERT_BASE_CASED
from ..data.task_shards import TaskRecord

RE_FEATURES = ("gt", "det")


def pixel_boxes(loc: np.ndarray, width: float, height: float) -> np.ndarray:
    """[n, 4] boxes [x, y, w, h] in pixels from normalised [x1, y1, x2, y2, w, h, area] rows."""
    loc = np.asarray(loc, dtype=np.float64)
    return np.stack(
        [loc[:, 0] * width, loc[:, 1] * height, loc[:, 4] * width, loc[:, 5] * height], axis=1
    )


def iou(box1: Sequence[float], box2: Sequence[float]) -> float:
    """The reference's IoU of two [x, y, w, h] boxes in inclusive pixels."""
    x1, y1 = max(box1[0], box2[0]), max(box1[1], box2[1])
    x2 = min(box1[0] + box1[2] - 1, box2[0] + box2[2] - 1)
    y2 = min(box1[1] + box1[3] - 1, box2[1] + box2[3] - 1)
    inter = (x2 - x1 + 1) * (y2 - y1 + 1) if x1 < x2 and y1 < y2 else 0.0
    return float(inter) / (box1[2] * box1[3] + box2[2] * box2[3] - inter)


def re_examples(
    record: TaskRecord, *, features: str = "gt", max_txt_len: int | None = None
) -> tuple[list[dict], int]:
    """The examples of one "re" record and how many sentences `max_txt_len` dropped."""
    if features not in RE_FEATURES:
        raise ValueError(f"features must be one of {RE_FEATURES}, got {features!r}")
    feat, loc = record.images[0 if features == "gt" else 1]
    boxes = pixel_boxes(loc, record.meta["width"], record.meta["height"])
    vocab = BERT_BASE_CASED
    out, dropped = [], 0
    for item in record.items:
        ids = item["input_ids"]
        if max_txt_len is not None and len(ids) > max_txt_len:
            dropped += 1
            continue
        ex = {
            "id": item["id"],
            "input_ids": np.array([vocab.cls_id, *ids, vocab.sep_id]),
            "img_feat": feat,
            "img_loc": loc,
            "boxes": boxes,
        }
        if "target" in item:
            ex["tgt_box"] = np.asarray(item["bbox"], dtype=np.float64)
            if features == "gt":
                ex["target"] = int(item["target"])
        out.append(ex)
    return out, dropped


@torch.no_grad()
def evaluate_re(
    forward: Callable[[object], dict],
    examples: Sequence[dict],
    *,
    tokens_per_batch: int,
    device: torch.device,
    rank: int = 0,
    world: int = 1,
    all_reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
    on_batch: Callable[[int], None] | None = None,
) -> dict:
    """Accuracy (IoU > 0.5), loss (when the examples have `target`) and this rank's
    predictions ({"id", "region", "pred_box", "tgt_box"}) over `examples`, sorted by length and
    dealt round-robin over ranks. Returns {"accuracy", "loss", "n", "predictions"}."""
    from .finetune import example_tokens, token_batches

    order = sorted(range(len(examples)), key=lambda i: example_tokens(examples[i], "re"))
    batches = token_batches(examples, order, tokens_per_batch, "re")[rank::world]
    totals = torch.zeros(4, dtype=torch.float64)  # n, right, loss sum, n with loss
    predictions = []
    for indices in batches:
        chosen = [examples[i] for i in indices]
        fields = ("input_ids", "img_feat", "img_loc", "target")
        inputs = [{k: ex[k] for k in fields if k in ex} for ex in chosen]
        batch = collate(inputs, task="re").to(device)
        out = forward(batch)
        pick = out["scores"].float().argmax(dim=1).cpu().numpy()
        right = 0
        for ex, r in zip(chosen, pick, strict=True):
            pred = [float(v) for v in ex["boxes"][r]]
            row = {"id": ex["id"], "region": int(r), "pred_box": pred}
            if "tgt_box" in ex:
                row["tgt_box"] = [float(v) for v in ex["tgt_box"]]
                right += iou(pred, ex["tgt_box"]) > 0.5
            predictions.append(row)
        if "loss" in out:  # summed over the batch, as the reference's
            totals[2] += float(out["loss"])
            totals[3] += len(chosen)
        totals[0] += len(chosen)
        totals[1] += right
        if on_batch is not None:
            on_batch(len(chosen))
    n, right, loss, with_loss = all_reduce(totals.to(device)).tolist()
    return {
        "accuracy": right / max(n, 1),
        "loss": loss / with_loss if with_loss else None,
        "n": int(n),
        "predictions": predictions,
    }


__all__ = ["RE_FEATURES", "evaluate_re", "iou", "pixel_boxes", "re_examples"]
