r"""Evaluate a fine-tuned model on task shards: metrics.json and the server's prediction format.

    python -m uniter_fast.evaluate --task vqa --checkpoint runs/vqa --data 'shards/vqa/test-*.tar' \
        --output eval/vqa-test --answers ans2label.json [--logits]
    python -m uniter_fast.evaluate --task nlvr2 --checkpoint model.pt --model-config \
        configs/model/uniter-base.json --data 'shards/nlvr2/dev-*.tar' --output eval/nlvr2-dev
    torchrun --nproc_per_node 8 -m uniter_fast.evaluate ...     # the split dealt over ranks

--checkpoint: a run folder (its `model_reference.pt` and `config.yaml` give the weights, the
model config and the task's settings) or a weights file in any layout `load_pretrained` reads
(with --model-config). Writes into --output: `metrics.json` (examples, loss and the task's metric
when the split has targets, and for NLVR2 consistency) and the predictions (see
`uniter_fast.evaluate.formats`). Packed batches sorted by length; progress with an ETA on
stderr; bad samples skipped and counted in metrics.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
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
from .formats import nlvr2_consistency, read_answer_vocabulary, write_predictions

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
    p.add_argument("--answers", help="VQA: ans2label.json, to write answer strings")
    p.add_argument("--logits", action="store_true", help="VQA: also save fp16 logits")
    p.add_argument("--tokens-per-batch", type=int, default=8192)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--split", default=None, help="a name for the split in metrics.json")
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
    load_pretrained(model, weights, verbose=False)
    model.to(device).eval()
    dtype = torch.bfloat16 if device.type == "cuda" else None
    model.set_attention(cfg.attention, device, cfg.varlen_dropout, dtype=dtype)

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
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dtype else _null()
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
