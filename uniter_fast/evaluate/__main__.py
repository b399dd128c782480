r"""Evaluate a fine-tuned model on task shards: metrics.json and the server's prediction format.

    python -m uniter_fast.evaluate --task vqa --checkpoint runs/vqa --data 'shards/vqa/test-*.tar' \
        --output eval/vqa-test --answers ans2label.json [--logits]
    python -m uniter_fast.evaluate --task nlvr2 --checkpoint model.pt --model-config \
        configs/model/uniter-base.json --data 'shards/nlvr2/dev-*.tar' --output eval/nlvr2-dev
    torchrun --nproc_per_node 8 -m uniter_fast.evaluate ...     # the split dealt over ranks
    python -m uniter_fast.evaluate --task retrieval --checkpoint uniter-base.pt \
        --model-config configs/model/uniter-base.json --data 'shards/flickr_test/*.tar' \
        --output eval/flickr-test-zeroshot          # zero-shot: a pretraining checkpoint
    python -m uniter_fast.evaluate --task re --checkpoint runs/refcoco+ \
        --data val='shards/refcoco+/val-*.tar' testA='shards/refcoco+/testA-*.tar' \
        testB='shards/refcoco+/testB-*.tar' --output eval/refcoco+

--checkpoint: a run folder (its `model_reference.pt` and `config.yaml` give the weights, the
model config and the task's settings) or a weights file in any layout `load_pretrained` reads
(with --model-config). Writes into --output: `metrics.json` (examples, loss and the task's metric
when the split has targets, and for NLVR2 consistency) and the predictions (see
`uniter_fast.evaluate.formats`). Packed batches sorted by length; progress with an ETA on
stderr; bad samples skipped and counted in metrics.json.

Retrieval (`uniter_fast.tasks.retrieval`): every text of the split against every image, in
chunks of --chunk-texts texts written under OUTPUT/chunks/ as they finish (ranks take every
W-th chunk); run the same command again after an interruption and it scores only the chunks
not yet written. Then `scores.npy` (float32 [texts, images]), `scores_ids.json` (the row and
column ids) and recall@1/5/10 of image and text retrieval in metrics.json. A pretraining
checkpoint evaluates zero-shot (its ITM "match" row becomes the rank head).

VCR (`uniter_fast.tasks.vcr`): --vcr-mode val scores each question's 4 answers and its 4
rationales conditioned on the right answer, and writes Q->A, QA->R and Q->AR to metrics.json;
--vcr-mode test scores the 4 answers and all 16 answer-rationale pairs and writes the
leaderboard's `predictions.csv` (annot_id, answer_0..3, rationale_conditioned_on_a{i}_{j}: the
class-1 logits, as the reference's file holds logits, not probabilities).

Referring expressions (`uniter_fast.tasks.refexp`): --data takes NAME=PATTERN entries, one per
split (val, testA, testB; RefCOCOg val, test); each is scored with its ground-truth boxes and
its detected boxes (--features). metrics.json holds the IoU accuracy of each split and feature
set, `predictions_<split>_<features>.json` each expression's chosen region and box.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..config import RunConfig, UniterConfig
from ..convert import load_pretrained
from ..data.collate import collate
from ..data.pipeline import BadSamples
from ..data.shards import list_shards
from ..tasks.finetune import example_tokens, read_examples, token_batches
from ..train.tasks import FINETUNE_TASKS, METRIC, get_task
from .formats import (
    nlvr2_consistency,
    read_answer_vocabulary,
    write_predictions,
    write_vcr_predictions,
)

log = logging.getLogger("uniter_fast.evaluate")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m uniter_fast.evaluate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--task", required=True, choices=FINETUNE_TASKS)
    p.add_argument("--checkpoint", required=True, help="a run folder or a weights file")
    p.add_argument("--data", required=True, nargs="+", metavar="PATTERN", help="task shards")
    p.add_argument("--output", required=True, help="folder for metrics.json and predictions")
    p.add_argument("--model-config", help="model JSON (default: the run folder's)")
    p.add_argument("--num-answers", type=int, help="VQA answers (default: the run's, or 3129)")
    p.add_argument("--nlvr2-variant", choices=["paired-attn", "paired", "triplet"])
    p.add_argument("--re-mlp", type=int, choices=[1, 2], help="RE: the head's layers (default 1)")
    p.add_argument("--answers", help="VQA: ans2label.json, to write answer strings")
    p.add_argument("--logits", action="store_true", help="VQA: also save fp16 logits")
    p.add_argument("--tokens-per-batch", type=int, default=8192)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--split", default=None, help="a name for the split in metrics.json")
    p.add_argument(
        "--chunk-texts",
        type=int,
        default=64,
        help="retrieval: texts per chunk, the unit of resumption (64)",
    )
    p.add_argument(
        "--vcr-mode",
        choices=["val", "test"],
        default="val",
        help="VCR: val (4 + 4 per question, metrics) or test (4 + 16, the leaderboard CSV)",
    )
    p.add_argument(
        "--features",
        nargs="+",
        choices=["gt", "det"],
        default=["gt", "det"],
        help="RE: which boxes to score with (ground-truth, detected; both by default)",
    )
    return p


def _settings(args) -> tuple[RunConfig, Path, str]:
    """The task's settings, the weights file and the model config path."""
    source = Path(args.checkpoint)
    cfg = RunConfig(task=args.task)
    if source.is_dir():
        recipe, weights = source / "config.yaml", source / "model_reference.pt"
        if not weights.is_file():
            raise FileNotFoundError(f"{source} holds no model_reference.pt (a finished run does)")
        if recipe.is_file():
            cfg = RunConfig.from_file(recipe)
            if cfg.task != args.task:
                raise ValueError(f"{source} was trained for {cfg.task!r}, not {args.task!r}")
    elif source.is_file():
        weights = source
    else:
        raise FileNotFoundError(f"checkpoint not found: {source}")
    values = cfg.to_dict()
    if args.num_answers is not None:
        values["finetune"]["num_answers"] = args.num_answers
    if args.nlvr2_variant is not None:
        values["finetune"]["nlvr2_variant"] = args.nlvr2_variant
    if args.re_mlp is not None:
        values["finetune"]["re_mlp"] = args.re_mlp
    model_config = args.model_config or (cfg.model_config if source.is_dir() else None)
    if model_config is None:
        raise ValueError("--model-config is needed with a weights file (a run folder has one)")
    return RunConfig.from_dict(values), weights, model_config


def _device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: CUDA is not available")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return device


def _progress(done: int, total: int, examples: int, start: float, final: bool = False) -> None:
    elapsed = time.perf_counter() - start
    rate = examples / elapsed if elapsed else 0.0
    eta = elapsed / done * (total - done) if done else float("nan")
    line = f"{done}/{total} batches, {examples} examples, {rate:,.1f} examples/s, eta {eta:.0f}s"
    if sys.stderr.isatty():
        print(f"\r{line}", end="\n" if final else "", file=sys.stderr, flush=True)
    elif final or done % max(total // 10, 1) == 0:
        log.info("%s", line)


def evaluate(args) -> dict:
    cfg, weights, model_config = _settings(args)
    task = get_task(args.task)
    device = _device(args.device)
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if launched and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1

    model = task.build_model(cfg, UniterConfig.from_json(model_config))
    report = load_pretrained(model, weights, verbose=False)
    if report.missing:
        raise ValueError(
            f"{weights} does not hold {len(report.missing)} of the model's weights (e.g. "
            f"{', '.join(report.missing[:3])}): an untrained head would score at random. Is it "
            "the task's checkpoint, with the right --model-config, --num-answers, "
            "--nlvr2-variant or --re-mlp?"
        )
    for note in report.adapted:
        log.info("checkpoint: %s", note)
    model.to(device).eval()
    dtype = torch.bfloat16 if device.type == "cuda" else None
    model.set_attention(cfg.attention, device, cfg.varlen_dropout, dtype=dtype)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dtype else _null()
    if args.task in ("retrieval", "re", "vcr"):
        run = {"retrieval": _evaluate_retrieval, "re": _evaluate_re, "vcr": _evaluate_vcr}[
            args.task
        ]
        with autocast:
            metrics = run(args, model, weights, device, rank, world)
        if launched:
            dist.destroy_process_group()
        return metrics

    bad = BadSamples()
    examples = read_examples(
        list_shards(args.data),
        args.task,
        num_classes=task.num_classes(cfg),
        max_txt_len=None,
        bad=bad,
    )
    if not examples:
        raise ValueError(f"no examples in {args.data}")
    collate_task = task.collate_task(cfg)
    order = sorted(range(len(examples)), key=lambda i: example_tokens(examples[i], collate_task))
    batches = token_batches(examples, order, args.tokens_per_batch, collate_task)
    mine = batches[rank::world]
    ids, rows, losses = [], [], []
    start = time.perf_counter()
    with torch.no_grad(), autocast:
        for k, indices in enumerate(mine, 1):
            chosen = [examples[i] for i in indices]
            batch = collate(chosen, task=collate_task).to(device, non_blocking=True)
            out = model(batch)
            ids += [ex["id"] for ex in chosen]
            rows.append(out["scores"].float().cpu().numpy())
            if "loss" in out:
                losses.append((float(out["loss"]), len(chosen)))
            if rank == 0:
                _progress(k, len(mine), len(ids), start, final=k == len(mine))
    gathered = [(ids, rows, losses, bad.state_dict())]
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, (ids, rows, losses, bad.state_dict()))
    if launched:
        dist.destroy_process_group()
    if rank != 0:
        return {}
    all_ids = [i for g in gathered for i in g[0]]
    scores = np.concatenate([r for g in gathered for r in g[1]])
    by_id = {e["id"]: e for e in examples}
    metrics = {
        "task": args.task,
        "split": args.split,
        "checkpoint": str(weights),
        "data": list(args.data),
        "examples": len(all_ids),
        "bad_samples": bad.by_reason(),
        "seconds": time.perf_counter() - start,
    }
    pairs = [p for g in gathered for p in g[2]]
    if pairs and len(pairs) == sum(len(g[1]) for g in gathered):
        pick = scores.argmax(axis=1)
        if args.task == "nlvr2":
            correct = [bool(p == by_id[i]["target"]) for i, p in zip(all_ids, pick, strict=True)]
            metrics[METRIC[args.task]] = float(np.mean(correct))
            metrics["consistency"] = nlvr2_consistency(all_ids, correct)
        else:
            got = [float(by_id[i]["targets"][p]) for i, p in zip(all_ids, pick, strict=True)]
            metrics[METRIC[args.task]] = float(np.mean(got))
        metrics["loss"] = sum(v * n for v, n in pairs) / sum(n for _, n in pairs)
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    answers = read_answer_vocabulary(args.answers) if args.answers else None
    files = write_predictions(
        args.task, out_dir, all_ids, scores, answers=answers, logits=args.logits
    )
    metrics["predictions"] = [str(f) for f in files]
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def _evaluate_retrieval(args, model, weights: Path, device, rank: int, world: int) -> dict:
    from ..tasks.retrieval import read_retrieval_split, recall_at_k, score_matrix

    bad = BadSamples()
    split = read_retrieval_split(list_shards(args.data), bad=bad)
    if not split.num_texts:
        raise ValueError(f"no captions in {args.data}")
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    stat = weights.stat()
    identity = f"{weights.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    if rank == 0:
        log.info(
            "retrieval: %d texts x %d images = %s pairs, chunks of %d texts, %d rank(s)",
            split.num_texts,
            split.num_images,
            f"{split.num_texts * split.num_images:,}",
            args.chunk_texts,
            world,
        )
    start = time.perf_counter()
    kill_after = _fault_chunks()
    scores = score_matrix(
        model,
        split,
        out_dir=out_dir,
        identity=identity,
        chunk_texts=args.chunk_texts,
        tokens_per_batch=args.tokens_per_batch,
        device=device,
        rank=rank,
        world=world,
        barrier=dist.barrier if dist.is_initialized() else (lambda: None),
        on_chunk=(lambda n: _kill_self() if n >= kill_after else None) if kill_after else None,
    )
    if rank != 0:
        return {}
    np.save(out_dir / "scores.npy.tmp.npy", scores)
    os.replace(out_dir / "scores.npy.tmp.npy", out_dir / "scores.npy")
    ids = {"texts": split.txt_ids, "images": split.img_ids}
    (out_dir / "scores_ids.json").write_text(json.dumps(ids) + "\n")
    recall = recall_at_k(scores, split.txt2img, split.img2txts)
    metrics = {
        "task": "retrieval",
        "split": args.split,
        "checkpoint": str(weights),
        "data": list(args.data),
        "texts": split.num_texts,
        "images": split.num_images,
        "pairs": split.num_texts * split.num_images,
        "bad_samples": bad.by_reason(),
        "seconds_this_invocation": time.perf_counter() - start,
        **recall,
        "scores": str(out_dir / "scores.npy"),
    }
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    # The matrix is whole: the chunks have served (a rerun recomputes nothing).
    for chunk in (out_dir / "chunks").glob("rows-*.npy"):
        chunk.unlink()
    return metrics


def _evaluate_vcr(args, model, weights: Path, device, rank: int, world: int) -> dict:
    from ..tasks.vcr import evaluate_vcr, read_questions

    bad = BadSamples()
    questions = read_questions(
        list_shards(args.data), mode=args.vcr_mode, max_txt_len=None, bad=bad
    )
    if not questions:
        raise ValueError(f"no VCR questions in {args.data}")
    start = time.perf_counter()
    result = evaluate_vcr(
        model,
        questions,
        tokens_per_batch=args.tokens_per_batch,
        device=device,
        rank=rank,
        world=world,
        all_reduce=_all_reduce_sum if dist.is_initialized() else (lambda t: t),
    )
    predictions = result["predictions"]
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, predictions)
        predictions = [p for g in gathered for p in g]
    if rank != 0:
        return {}
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = {
        "task": "vcr",
        "mode": args.vcr_mode,
        "split": args.split,
        "checkpoint": str(weights),
        "data": list(args.data),
        "questions": len(predictions),
        "bad_samples": bad.by_reason(),
        "seconds": time.perf_counter() - start,
    }
    if result["n"]:
        metrics |= {k: result[k] for k in ("q2a", "qa2r", "q2ar", "loss")}
    files = [write_vcr_predictions(out_dir, predictions, test=args.vcr_mode == "test")]
    metrics["predictions"] = [str(f) for f in files]
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def _named_splits(patterns: list[str], default: str | None) -> dict[str, list[str]]:
    """`NAME=PATTERN` entries grouped by name; bare patterns form one split (--split or "eval")."""
    out: dict[str, list[str]] = {}
    for entry in patterns:
        name, sep, pattern = entry.partition("=")
        if not sep or "/" in name or not name:
            name, pattern = default or "eval", entry
        out.setdefault(name, []).append(pattern)
    return out


def _evaluate_re(args, model, weights: Path, device, rank: int, world: int) -> dict:
    from ..data.task_shards import iter_task_shard
    from ..tasks.refexp import evaluate_re, re_examples

    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics: dict = {
        "task": "re",
        "checkpoint": str(weights),
        "data": list(args.data),
        "splits": {},
    }
    start = time.perf_counter()
    all_reduce = _all_reduce_sum if dist.is_initialized() else (lambda t: t)
    for name, patterns in _named_splits(args.data, args.split).items():
        bad = BadSamples()
        records = [
            record
            for url in list_shards(patterns)
            for record in iter_task_shard(url, "re", on_bad=bad.add_bad)
        ]
        if not records:
            raise ValueError(f"split {name}: no referring expressions in {patterns}")
        row: dict = {"bad_samples": bad.by_reason()}
        for features in args.features:
            examples = [ex for r in records for ex in re_examples(r, features=features)[0]]
            result = evaluate_re(
                model,
                examples,
                tokens_per_batch=args.tokens_per_batch,
                device=device,
                rank=rank,
                world=world,
                all_reduce=all_reduce,
            )
            predictions = result["predictions"]
            if world > 1:
                gathered = [None] * world
                dist.all_gather_object(gathered, predictions)
                predictions = [p for g in gathered for p in g]
            key = "accuracy" if features == "gt" else "accuracy_detected"
            row[key] = result["accuracy"]
            row["examples"] = result["n"]
            if features == "gt" and result["loss"] is not None:
                row["loss"] = result["loss"]
            if rank == 0:
                path = out_dir / f"predictions_{name}_{features}.json"
                tmp = path.with_suffix(".tmp")
                tmp.write_text(json.dumps(predictions) + "\n")
                os.replace(tmp, path)
                row.setdefault("predictions", []).append(str(path))
                log.info("re %s (%s boxes): accuracy %.4f", name, features, result["accuracy"])
        metrics["splits"][name] = row
    metrics["seconds"] = time.perf_counter() - start
    if rank == 0:
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        return metrics
    return {}


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(t)
    return t


FAULT_ENV = "UNITER_FAST_FAULT"  # "kill-eval@K": SIGKILL after K retrieval chunks (tests)


def _fault_chunks() -> int | None:
    name, _, count = os.environ.get(FAULT_ENV, "").partition("@")
    return int(count) if name == "kill-eval" and count else None


def _kill_self() -> None:
    log.warning("fault hook %s: killing this process now", os.environ.get(FAULT_ENV))
    logging.shutdown()
    os.kill(os.getpid(), signal.SIGKILL)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    try:
        metrics = evaluate(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"uniter_fast.evaluate: error: {e}", file=sys.stderr)
        return 2
    if metrics:
        shown = {k: v for k, v in metrics.items() if k not in ("data", "predictions")}
        print(json.dumps(shown, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
