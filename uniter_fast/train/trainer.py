"""The training run, top to bottom: prepare, train, validate, save, summarise.

    python train.py                      # the CPU quick start (tiny model, synthetic data)
    python train.py --config configs/pretrain/tiny-cpu.yaml --max-steps 50

`prepare(cfg)` checks everything a user can get wrong (files, patterns, devices) before any work
starts, raising `RunError` with a one-line message; `train(run)` then runs. Errors inside the loop
are not caught: a bug surfaces with its traceback.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from ..config import DEFAULT_MIX, RunConfig, UniterConfig
from ..convert import load_pretrained, save_reference
from ..data.pipeline import Loader, TrainSource, iter_eval_batches
from ..data.shards import list_shards
from ..model import UniterForPretraining
from ..ops import describe_kernels
from .checkpoint import complete_checkpoints, save_checkpoint
from .engine import Engine
from .logging import MetricsWriter, Progress, environment_info, setup_logging

log = logging.getLogger("uniter_fast.train")

EVAL_TASKS = ("itm", "mlm", "mrckl", "mrfr")


class RunError(Exception):
    """A problem with the run's inputs (config, files, device): reported in one line."""


@dataclass
class Run:
    cfg: RunConfig
    output_dir: Path
    device: torch.device
    model_config: UniterConfig
    sources: list[TrainSource]
    val_urls: list[str]
    synthetic: bool


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RunError(f"device {name!r} requested but this torch build sees no CUDA device")
    return device


def prepare(cfg: RunConfig) -> Run:
    """Resolve the run's inputs; every user-facing problem raises RunError here."""
    try:
        model_config = UniterConfig.from_json(cfg.model_config)
    except (FileNotFoundError, ValueError) as e:
        raise RunError(f"model config: {e}") from None
    if cfg.init_checkpoint and not Path(cfg.init_checkpoint).is_file():
        raise RunError(f"init checkpoint not found: {cfg.init_checkpoint}")
    device = _device(cfg.device)
    output_dir = Path(cfg.output_dir or f"runs/{time.strftime('%Y%m%d-%H%M%S')}")
    if complete_checkpoints(output_dir / "checkpoints"):
        raise RunError(
            f"{output_dir} already holds checkpoints; choose another --output-dir "
            "(resuming a run is not supported yet)"
        )
    synthetic = not cfg.data.train
    if synthetic:
        data_dir = output_dir / "data"
        sources = [TrainSource("synthetic", [str(data_dir / "train")], dict(DEFAULT_MIX))]
        val_urls = [str(data_dir / "val")] if cfg.data.synthetic_val_images else []
    else:
        sources = [TrainSource(d.name, d.shards, dict(d.mix)) for d in cfg.data.train]
        try:
            for s in sources:
                list_shards(s.shards)
            val_urls = list_shards(cfg.data.val) if cfg.data.val else []
        except FileNotFoundError as e:
            raise RunError(str(e)) from None
    return Run(cfg, output_dir, device, model_config, sources, val_urls, synthetic)


def _write_synthetic(run: Run) -> None:
    from ..data.synthetic import write_synthetic

    data_dir = run.output_dir / "data"
    log.info("writing synthetic shards to %s", data_dir)
    write_synthetic(
        data_dir / "train", run.cfg.data.synthetic_images, seed=run.cfg.seed, progress=True
    )
    if run.cfg.data.synthetic_val_images:
        write_synthetic(
            data_dir / "val",
            run.cfg.data.synthetic_val_images,
            seed=run.cfg.seed + 1,
            progress=True,
        )
    run.val_urls = list_shards(run.val_urls) if run.val_urls else []


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@torch.no_grad()
def evaluate(
    model: UniterForPretraining, urls, *, engine: Engine, tokens_per_batch: int, seed: int = 0
) -> dict:
    """Validation metrics per task over held-out shards (one deterministic pass each)."""
    was_training = model.training
    model.eval()
    results: dict[str, float] = {}
    for task in EVAL_TASKS:
        totals: dict[str, float] = defaultdict(float)
        for batch in iter_eval_batches(urls, task, tokens_per_batch=tokens_per_batch, seed=seed):
            n_pos = int(batch.itm_target.sum()) if task == "itm" else 0
            batch = batch.to(engine.device)
            with engine.autocast():
                out = model(batch, task, metrics=True)
            weight = {
                "mlm": out.get("mlm_count", 0),
                "itm": out.get("itm_count", 0),
                "mrckl": out.get("mrc_count", 0),
                "mrfr": int(batch.mrm_index.shape[0]) if task == "mrfr" else 0,
            }[task]
            totals["n"] += weight
            totals["loss"] += float(out[task]) * weight
            acc_key = {"mlm": "mlm_acc", "itm": "itm_acc", "mrckl": "mrc_acc"}.get(task)
            if acc_key:
                totals["acc"] += float(out[acc_key]) * weight
            if task == "itm":
                totals["pos"] += n_pos
                if "wra_pos" in out:
                    totals["wra_pos"] += float(out["wra_pos"]) * n_pos
                    totals["wra_neg"] += float(out["wra_neg"]) * (weight - n_pos)
        n = max(totals["n"], 1)
        results[f"{task}_loss"] = totals["loss"] / n
        if "acc" in totals:
            results[f"{task}_acc"] = totals["acc"] / n
        if task == "itm":
            results["itm_pos_fraction"] = totals["pos"] / n
            if "wra_pos" in totals:
                results["wra_pos"] = totals["wra_pos"] / max(totals["pos"], 1)
                results["wra_neg"] = totals["wra_neg"] / max(totals["n"] - totals["pos"], 1)
    model.train(was_training)
    return results


def _checkpoint(run: Run, step: int, model, engine: Engine, loader: Loader) -> Path:
    state = {
        "step": step,
        "config": run.cfg.to_dict(),
        "model_config": run.model_config.to_dict(),
        "data": loader.state_dict(),
    }
    files = {"model.pt": model.state_dict(), "optimizer.pt": engine.state_dict()}
    path = save_checkpoint(run.output_dir / "checkpoints", step, files, state)
    log.info("saved checkpoint %s", path)
    return path


def train(run: Run) -> dict:
    """Train as `run.cfg` says; returns the summary (also written to summary.json)."""
    cfg = run.cfg
    run.output_dir.mkdir(parents=True, exist_ok=True)
    setup_logging(run.output_dir)
    (run.output_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    env = environment_info(run.device)
    (run.output_dir / "env.json").write_text(json.dumps(env, indent=2) + "\n")
    log.info("output folder %s; device %s; torch %s", run.output_dir, run.device, env["torch"])
    _seed_everything(cfg.seed)
    if run.synthetic:
        _write_synthetic(run)

    model = UniterForPretraining(run.model_config, wra_weight=cfg.wra_weight, kernels=cfg.kernels)
    if cfg.init_checkpoint:
        load_pretrained(model, cfg.init_checkpoint, verbose=False)
    model.to(run.device).train()
    n_params = sum(p.numel() for p in model.parameters())
    engine = Engine(
        model, cfg.optim, total_steps=cfg.max_steps, device=run.device, precision=cfg.precision
    )
    log.info("model: %s parameters, %s precision", f"{n_params:,}", engine.precision)
    log.info("loss kernels: %s", describe_kernels(cfg.kernels, run.device))
    batches = Loader(
        run.sources,
        tokens_per_batch=cfg.data.tokens_per_batch,
        seed=cfg.seed,
        mode=cfg.data.mode,
        block_images=cfg.data.block_images,
        length_buckets=cfg.data.length_buckets,
        num_workers=cfg.data.num_workers,
        pin_memory=run.device.type == "cuda",
        max_bad_fraction=cfg.data.max_bad_fraction,
    )
    log.info(
        "data: %s mode, %d worker(s), blocks of %d images, %d real tokens per batch",
        cfg.data.mode,
        cfg.data.num_workers,
        cfg.data.block_images,
        cfg.data.tokens_per_batch,
    )

    metrics = MetricsWriter(run.output_dir)
    progress = Progress(cfg.max_steps)
    history: dict[str, list[tuple[int, float]]] = defaultdict(list)
    latest: dict[str, float] = {}
    # Per-task sums stay on the device between log points: reading them is the only sync.
    sums: dict[str, dict[str, torch.Tensor]] = {}
    counts: dict[str, int] = defaultdict(int)
    window_tokens = window_pairs = 0
    total_tokens = 0
    window_start = run_start = time.perf_counter()
    tokens_per_s = 0.0  # of the last log window, shown on the progress bar until the next
    checkpoint = None
    bad_logged = 0

    for step in range(1, cfg.max_steps + 1):
        for _ in range(cfg.optim.grad_accum):
            task, batch = next(batches)
            window_tokens += batch.num_tokens
            window_pairs += batch.num_pairs
            batch = batch.to(run.device, non_blocking=True)
            with engine.autocast():
                out = model(batch, task)
            engine.backward(out["loss"])
            parts = {k: v.detach() for k, v in out.items() if isinstance(v, torch.Tensor)}
            acc = sums.setdefault(task, {})
            for k, v in parts.items():
                acc[k] = acc[k] + v if k in acc else v.float()
            counts[task] += 1
        stepped = engine.step(step)

        if step % cfg.log_every == 0 or step == cfg.max_steps:
            elapsed = time.perf_counter() - window_start
            tokens_per_s = window_tokens / elapsed
            for task in sorted(sums):
                record = {
                    "step": step,
                    "task": task,
                    "lr": stepped["lr"],
                    "tokens_per_s": tokens_per_s,
                    "samples_per_s": window_pairs / elapsed,
                    "grad_norm": float(stepped["grad_norm"]),
                }
                for k, v in sums[task].items():
                    record[k] = float(v) / counts[task]
                if not math.isfinite(record["loss"]):
                    raise FloatingPointError(f"step {step}: task {task} loss is {record['loss']}")
                metrics.write(record)
                history[task].append((step, record["loss"]))
                latest[task] = record["loss"]
            if batches.bad.num_bad != bad_logged:
                bad_logged = batches.bad.num_bad
                log.warning(
                    "bad samples skipped so far: %d of %d read, by reason %s",
                    bad_logged,
                    bad_logged + batches.bad.num_good,
                    batches.bad.by_reason(),
                )
                metrics.write(
                    {
                        "step": step,
                        "data_bad_samples": bad_logged,
                        "data_samples_read": bad_logged + batches.bad.num_good,
                    },
                    prefix="data",
                )
            total_tokens += window_tokens
            sums.clear()
            counts.clear()
            window_tokens = window_pairs = 0
            window_start = time.perf_counter()
            progress.update(step, latest, tokens_per_s, log_line=True)
        else:
            progress.update(step, latest, tokens_per_s, log_line=False)

        if cfg.save_every and step % cfg.save_every == 0 and step != cfg.max_steps:
            checkpoint = _checkpoint(run, step, model, engine, batches)
        if cfg.val_every and step % cfg.val_every == 0 and run.val_urls and step != cfg.max_steps:
            val = evaluate(
                model, run.val_urls, engine=engine, tokens_per_batch=cfg.data.tokens_per_batch
            )
            metrics.write({"step": step, **val}, prefix="val")
    progress.close()
    train_seconds = time.perf_counter() - run_start

    checkpoint = _checkpoint(run, cfg.max_steps, model, engine, batches)
    batches.close()
    reference = save_reference(model, run.output_dir / "model_reference.pt")
    val = {}
    if run.val_urls:
        val = evaluate(
            model, run.val_urls, engine=engine, tokens_per_batch=cfg.data.tokens_per_batch
        )
        metrics.write({"step": cfg.max_steps, **val}, prefix="val")
    metrics.close()

    summary = {
        "steps": cfg.max_steps,
        "train_seconds": train_seconds,
        "tokens_per_s": total_tokens / train_seconds,
        "loss_first": {t: h[0][1] for t, h in history.items()},
        "loss_last": {t: h[-1][1] for t, h in history.items()},
        "validation": val,
        "data": {
            "samples_read": batches.bad.num_good + batches.bad.num_bad,
            "bad_samples": batches.bad.by_reason(),
            "worst_shards": batches.bad.worst_shards(),
        },
        "checkpoint": str(checkpoint),
        "reference_weights": str(reference),
        "output_dir": str(run.output_dir),
    }
    (run.output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(format_summary(summary))
    return summary


def format_summary(s: dict) -> str:
    lines = [
        "",
        f"== done: {s['steps']} steps in {s['train_seconds']:.1f} s, "
        f"{s['tokens_per_s']:,.0f} tokens/s ==",
        "training loss by task (first logged -> last logged):",
    ]
    for task in sorted(s["loss_first"]):
        lines.append(f"  {task:6s} {s['loss_first'][task]:8.4f} -> {s['loss_last'][task]:8.4f}")
    v = s["validation"]
    if v:
        lines.append("validation (held-out images):")
        lines.append(
            f"  itm accuracy {v['itm_acc']:.3f} (chance 0.5; positives are "
            f"{v['itm_pos_fraction']:.1%} of pairs)"
        )
        lines.append(f"  mlm accuracy {v['mlm_acc']:.3f}, loss {v['mlm_loss']:.4f}")
        lines.append(f"  mrc accuracy {v['mrckl_acc']:.3f}, mrc-kl loss {v['mrckl_loss']:.4f}")
        lines.append(f"  mrfr loss {v['mrfr_loss']:.4f}")
        if "wra_pos" in v:
            lines.append(
                f"  wra distance: matching pairs {v['wra_pos']:.4f}, others {v['wra_neg']:.4f}"
            )
    d = s["data"]
    bad = sum(d["bad_samples"].values())
    lines.append(
        f"data: {d['samples_read']} samples read, {bad} bad ones skipped"
        + (f" {d['bad_samples']}; worst: {d['worst_shards'][0]}" if bad else "")
    )
    lines.append(f"checkpoint: {s['checkpoint']}")
    lines.append(f"reference-layout weights: {s['reference_weights']}")
    lines.append(f"logs: {s['output_dir']}/metrics.jsonl, train.log, tensorboard/")
    return "\n".join(lines)


__all__ = ["Run", "RunError", "evaluate", "format_summary", "prepare", "train"]
