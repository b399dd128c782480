"""The training run, top to bottom: prepare, train, validate, save, summarise.

    python train.py                      # the CPU quick start (tiny model, synthetic data)
    python train.py --config configs/pretrain/tiny-cpu.yaml --max-steps 50
    deepspeed --num_gpus 8 train.py --config configs/pretrain/uniter-base.yaml --output-dir runs/b

`prepare(cfg)` checks everything a user can get wrong (files, patterns, devices, the DeepSpeed
config, a folder that already holds checkpoints) before any work starts, raising `RunError` with a
one-line message; `train(run)` then runs on every rank. Errors inside the loop are not caught: a
bug surfaces with its traceback (and the launcher stops the other ranks).

Every rank runs the same steps, the same task at each micro-batch (see data/pipeline.py), the
same saves and the same validations, so every collective is entered by all ranks. Rank 0 alone
writes the logs, the progress bar, metrics.jsonl, TensorBoard and the summary; the losses it
logs are averaged over ranks.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import random
import signal
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml

from ..config import DEFAULT_MIX, DataConfig, RunConfig, UniterConfig
from ..convert import load_pretrained, save_reference
from ..data.pipeline import BadSamples, Loader, TrainSource, iter_eval_batches, split_shards
from ..data.shards import list_shards
from ..errors import RunError, report
from ..ops import describe_kernels
from . import checkpoint as ckpt
from .abort import RunErrorBroadcast
from .engine import (
    Engine,
    barrier,
    build_deepspeed_config,
    config_precision,
    fp32_state_dict,
    init_distributed,
    launched,
    load_deepspeed_config,
    local_rank,
    make_universal,
)
from .logging import MetricsWriter, Progress, environment_info, setup_logging
from .tasks import METRIC, get_task

log = logging.getLogger("uniter_fast.train")

EVAL_TASKS = ("itm", "mlm", "mrckl", "mrfr")
_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}
NO_VALIDATION = "no validation data: data.val (--val-data) is empty, so this run validates nothing"
TASK_CODES = (
    "itm",
    "mlm",
    "mrfr",
    "mrc",
    "mrckl",
    "vqa",
    "ve",
    "nlvr2",
    "retrieval",
    "re",
    "vcr",
)
_NO_BAD = 2**62
# Test hook for the fault tests (tests/test_faults.py): "nan@STEP" makes rank 0's loss NaN from
# optimizer step STEP on; "kill-in-save@STEP" SIGKILLs rank 0 inside the save of step STEP, after
# every file but the completion marker is written.
FAULT_ENV = "UNITER_FAST_FAULT"


@dataclass
class Run:
    """A run's resolved inputs. resume_from / saved: the newest complete checkpoint of the output
    folder and its `state.json`; finished: that checkpoint is at max_steps and the run's summary
    is written, so there is nothing left to do; reschedule: the schedule and optimizer settings
    to rebuild at the resume ('key saved -> now'; --reschedule)."""

    cfg: RunConfig
    output_dir: Path
    device: torch.device
    model_config: UniterConfig
    sources: list[TrainSource]
    val_urls: list[str]
    synthetic: bool
    deepspeed_config: dict = field(default_factory=dict)
    deepspeed_notes: list[str] = field(default_factory=list)
    resume_from: Path | None = None
    saved: dict | None = None
    finished: bool = False
    reschedule: list[str] = field(default_factory=list)


def _device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RunError(f"device {name!r} requested but this torch build sees no CUDA device")
        if device.index is None:  # one GPU per rank: the launcher's LOCAL_RANK
            device = torch.device("cuda", local_rank())
    return device


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))


# What a resumed run takes from its checkpoint rather than from the recipe, unless told otherwise
# (`reschedule`): the learning-rate schedule and AdamW's settings travel in the engine's state.
SCHEDULE_KEYS = ("max_steps", "optim.lr", "optim.warmup_steps")
OPTIMIZER_KEYS = ("optim.betas", "optim.eps", "optim.weight_decay")
# What the loader's saved position depends on (on the same number of ranks).
LOADER_KEYS = (
    "seed",
    "data.mode",
    "data.tokens_per_batch",
    "data.block_images",
    "data.length_buckets",
    "data.num_workers",
)


def _recipe_value(values: dict, key: str):
    for part in key.split("."):
        values = values[part]
    return list(values) if isinstance(values, (list, tuple)) else values


def recipe_changes(saved: dict, cfg: RunConfig, keys=SCHEDULE_KEYS + OPTIMIZER_KEYS) -> list[str]:
    """'key saved -> now' for each of `keys` (by default the schedule and optimizer settings)
    that differs between a checkpoint's recipe (`saved`, its state.json's "config") and `cfg`."""
    now = cfg.to_dict()
    changes = []
    for key in keys:
        old, new = _recipe_value(saved, key), _recipe_value(now, key)
        if old != new:
            changes.append(f"{key} {old} -> {new}")
    return changes


def _summary_step(output_dir: Path) -> int | None:
    """The step the run folder's summary.json was written at (None: no summary). A summary
    of an earlier end (a run extended since, killed before its new summary) is not this one."""
    path = output_dir / "summary.json"
    return json.loads(path.read_text()).get("steps") if path.is_file() else None


def _check_choices(cfg: RunConfig, device: torch.device, model_config: UniterConfig, ds_config):
    """The choices that can fail on this device, checked before any work: the attention backend
    and the loss kernels (the precision is checked with the DeepSpeed config)."""
    from ..kernels import triton_runs_on
    from ..model.attention import resolve_attention

    precision = config_precision(ds_config)
    try:
        resolve_attention(
            cfg.attention,
            device,
            dropout_p=model_config.attention_probs_dropout_prob,
            varlen_dropout=cfg.varlen_dropout,
            dtype=_AUTOCAST.get(precision, torch.float32),
        )
    except ValueError as e:
        raise RunError(f"--attention {cfg.attention}: {e}") from None
    if cfg.kernels == "triton" and not triton_runs_on(device.type):
        hint = (
            "triton is not installed"
            if device.type == "cuda"
            else "Triton kernels run on CUDA (on the CPU only under TRITON_INTERPRET=1, for tests)"
        )
        raise RunError(
            f"--kernels triton cannot run on {device.type} here: {hint}; use auto or reference"
        )


def prepare(cfg: RunConfig) -> Run:
    """Resolve the run's inputs; every user-facing problem raises RunError here."""
    try:
        model_config = UniterConfig.from_json(cfg.model_config)
    except (FileNotFoundError, ValueError) as e:
        raise RunError(f"model config: {e}") from None
    if cfg.init_checkpoint and "???" in cfg.init_checkpoint:
        raise RunError(
            f"the recipe leaves init_checkpoint for you to set ({cfg.init_checkpoint}): edit the "
            "YAML or pass --init-checkpoint"
        )
    if cfg.init_checkpoint and not Path(cfg.init_checkpoint).is_file():
        raise RunError(f"init checkpoint not found: {cfg.init_checkpoint}")
    device = _device(cfg.device)
    try:
        ds_config, notes = build_deepspeed_config(
            load_deepspeed_config(cfg.deepspeed_config),
            optim=cfg.optim,
            precision=cfg.precision,
            device=device,
            source=cfg.deepspeed_config or "the default DeepSpeed config",
        )
    except ValueError as e:
        raise RunError(str(e)) from None
    _check_choices(cfg, device, model_config, ds_config)
    if cfg.output_dir is None and _world_size() > 1:
        raise RunError(
            "set --output-dir when running on several ranks: every rank must write to the same "
            "folder (on a file system all nodes see)"
        )
    output_dir = Path(cfg.output_dir or f"runs/{time.strftime('%Y%m%d-%H%M%S')}")
    resume_from = ckpt.latest_checkpoint(output_dir / "checkpoints")
    saved, finished, changes = None, False, []
    if resume_from is not None:
        if not cfg.resume:
            raise RunError(
                f"{output_dir} already holds checkpoints (newest: {resume_from.name}); run "
                "without --no-resume to resume from it, or choose another --output-dir"
            )
        saved = ckpt.read_state(resume_from)
        if saved["model_config"] != model_config.to_dict():
            raise RunError(
                f"{resume_from} was saved with another model config; resume with the same one "
                f"or choose another --output-dir"
            )
        changes = recipe_changes(saved["config"], cfg)
        if changes and not cfg.reschedule:
            raise RunError(
                f"{resume_from} was trained with other schedule settings ({'; '.join(changes)}), "
                "which a resume would keep: pass --reschedule to rebuild the schedule from "
                "this recipe at this step, or resume with the checkpoint's settings, or choose "
                "another --output-dir"
            )
        data_changes = recipe_changes(saved["config"], cfg, LOADER_KEYS)
        if data_changes and saved["world_size"] == _world_size():
            raise RunError(
                f"{resume_from} was read with other data settings ({'; '.join(data_changes)}), "
                f"so its data position cannot be restored: resume with the checkpoint's "
                f"settings (its recipe: {output_dir / 'config.yaml'}), or choose another "
                "--output-dir"
            )
        if saved["step"] > cfg.max_steps:
            raise RunError(
                f"{resume_from} is at step {saved['step']}, past max_steps {cfg.max_steps}: "
                "resume with --max-steps of at least its step, or choose another --output-dir"
            )
        finished = saved["step"] == cfg.max_steps and _summary_step(output_dir) == saved["step"]
    synthetic = not cfg.data.train
    if synthetic:
        data_dir = output_dir / "data"
        mix = dict(DEFAULT_MIX) if cfg.task == "pretrain" else {}  # pretrain-vcr: its plug-in
        sources = [TrainSource("synthetic", [str(data_dir / "train")], mix)]
        val_urls = [str(data_dir / "val")] if cfg.data.synthetic_val_images else []
    else:
        unset = [
            f"data.train[{d.name}].shards"
            for d in cfg.data.train
            if any("???" in s for s in d.shards)
        ]
        if unset or any("???" in v for v in cfg.data.val):
            unset += ["data.val"] if any("???" in v for v in cfg.data.val) else []
            raise RunError(
                f"the recipe leaves these data paths for you to set: {', '.join(unset)} (edit "
                "the YAML, or pass --data and --val-data)"
            )
        sources = [TrainSource(d.name, d.shards, dict(d.mix)) for d in cfg.data.train]
        readers = _world_size() * max(cfg.data.num_workers, 1)
        for s in sources:
            try:
                urls = list_shards(s.shards)
            except FileNotFoundError as e:
                raise RunError(f"training shards of dataset {s.name!r}: {e}") from None
            if cfg.task == "pretrain":  # a downstream loader deals examples, not shards
                split_shards(urls, 0, readers, cfg.data.mode, f"dataset {s.name!r}")
        try:
            val_urls = list_shards(cfg.data.val) if cfg.data.val else []
        except FileNotFoundError as e:
            raise RunError(f"validation shards (data.val): {e}") from None
    return Run(
        cfg,
        output_dir,
        device,
        model_config,
        sources,
        val_urls,
        synthetic,
        deepspeed_config=ds_config,
        deepspeed_notes=notes,
        resume_from=resume_from,
        saved=saved,
        finished=finished,
        reschedule=changes,
    )


def _write_synthetic(run: Run) -> None:
    from ..data.synthetic import write_synthetic

    data_dir = run.output_dir / "data"
    done = data_dir / "COMPLETE"
    if not done.is_file():  # a resumed run reuses them (same seed, same shards)
        data = run.cfg.data
        log.info(
            "writing synthetic %s shards to %s (%d training and %d validation images)",
            run.cfg.task,
            data_dir,
            data.synthetic_images,
            data.synthetic_val_images,
        )
        start = time.perf_counter()
        if run.cfg.task != "pretrain":
            get_task(run.cfg.task).write_synthetic(data_dir, run.cfg)
            done.write_text("")
            log.info("synthetic shards written in %.1f s", time.perf_counter() - start)
            return
        # A bar on a terminal only: in a file its carriage returns run into the next line.
        bar = sys.stderr.isatty()
        write_synthetic(data_dir / "train", data.synthetic_images, seed=run.cfg.seed, progress=bar)
        if data.synthetic_val_images:
            write_synthetic(
                data_dir / "val", data.synthetic_val_images, seed=run.cfg.seed + 1, progress=bar
            )
        done.write_text("")
        log.info("synthetic shards written in %.1f s", time.perf_counter() - start)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _all_reduce(values: torch.Tensor, op=None) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(values, op=op or dist.ReduceOp.SUM)
    return values


# --------------------------------------------------------------------------------------------
# Validation


@torch.no_grad()
def evaluate(engine, urls, *, tokens_per_batch: int, seed: int = 0) -> dict:
    """Validation metrics per task over held-out shards (one deterministic pass each).

    engine: an `Engine`, or any callable model with `.train()/.eval()/.training` and a `device`
    attribute on the engine (a plain model runs in one process). Collective over ranks: every
    rank walks the same batches and evaluates every world-size-th one; ranks left with one
    fewer batch run a weightless pass, so each rank runs as many forwards as the others (ZeRO-3
    gathers parameters in every forward). The sums are then added over ranks.
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    module = engine.module if isinstance(engine, Engine) else engine
    device = engine.device if isinstance(engine, Engine) else next(module.parameters()).device
    was_training = module.training
    engine.eval()
    names = ("n", "loss", "acc", "pos", "wra_pos", "wra_neg")
    results: dict[str, float] = {}
    for task in EVAL_TASKS:
        totals = torch.zeros(len(names), dtype=torch.float64, device=device)
        batches = list(iter_eval_batches(urls, task, tokens_per_batch=tokens_per_batch, seed=seed))
        mine = batches[rank::world]
        rounds = -(-len(batches) // world)
        for i in range(rounds):
            weightless = i >= len(mine)
            batch = (mine[-1] if mine else batches[0]) if weightless else mine[i]
            n_pos = batch.itm_target.sum() if task == "itm" else None
            batch = batch.to(device)
            out = engine(batch, task, metrics=True)
            weight = {
                "mlm": out.get("mlm_count"),
                "itm": out.get("itm_count"),
                "mrckl": out.get("mrc_count"),
                "mrfr": batch.mrm_index.shape[0] if task == "mrfr" else None,
            }[task]
            weight = torch.as_tensor(weight, dtype=torch.float64, device=device)
            if weightless:
                continue
            row = [weight, out[task].double() * weight]
            acc_key = {"mlm": "mlm_acc", "itm": "itm_acc", "mrckl": "mrc_acc"}.get(task)
            row.append(out[acc_key].double() * weight if acc_key else weight * 0)
            if task == "itm":
                n_pos = n_pos.to(device, torch.float64)
                row.append(n_pos)
                wra = "wra_pos" in out
                row.append(out["wra_pos"].double() * n_pos if wra else n_pos * 0)
                row.append(out["wra_neg"].double() * (weight - n_pos) if wra else n_pos * 0)
            else:
                row += [weight * 0] * 3
            totals += torch.stack(row)
        t = dict(zip(names, _all_reduce(totals).tolist(), strict=True))
        n = max(t["n"], 1)
        results[f"{task}_loss"] = t["loss"] / n
        if task in ("mlm", "itm", "mrckl"):
            results[f"{task}_acc"] = t["acc"] / n
        if task == "itm":
            results["itm_pos_fraction"] = t["pos"] / n
            if module.wra_weight > 0:
                results["wra_pos"] = t["wra_pos"] / max(t["pos"], 1)
                results["wra_neg"] = t["wra_neg"] / max(t["n"] - t["pos"], 1)
    engine.train(was_training)
    return results


# --------------------------------------------------------------------------------------------
# Fault hooks (tests only)


def _fault(kind: str) -> int | None:
    spec = os.environ.get(FAULT_ENV, "")
    name, _, step = spec.partition("@")
    return int(step) if name == kind and step else None


def _kill_self() -> None:
    log.warning("fault hook %s: killing this process now", os.environ.get(FAULT_ENV))
    logging.shutdown()
    os.kill(os.getpid(), signal.SIGKILL)


# --------------------------------------------------------------------------------------------
# The loop's bookkeeping: per-task sums on the device, read only at log points


class Window:
    """Losses and counts since the last log point; sums stay on the device until `reduce`."""

    def __init__(self, device: torch.device):
        self.device = device
        self.sums: dict[str, dict[str, torch.Tensor]] = {}
        self.counts: dict[str, int] = defaultdict(int)
        self.tokens = self.pairs = 0
        self.start = time.perf_counter()

    def add(self, task: str, out: dict, tokens: int, pairs: int) -> None:
        acc = self.sums.setdefault(task, {})
        for k, v in out.items():
            if isinstance(v, torch.Tensor):
                v = v.detach().float()
                acc[k] = acc[k] + v if k in acc else v
        self.counts[task] += 1
        self.tokens += tokens
        self.pairs += pairs

    def reduce(self) -> tuple[dict[str, dict[str, float]], int, int]:
        """Means per task over this window's micro-batches of all ranks; global tokens, pairs.

        Collective: every rank has the same tasks and keys (the same task sequence)."""
        keys = [(t, k) for t in sorted(self.sums) for k in sorted(self.sums[t])]
        flat = [self.sums[t][k].reshape(()).double() for t, k in keys]
        flat += [torch.tensor(float(self.tokens)), torch.tensor(float(self.pairs))]
        values = _all_reduce(torch.stack([v.to(self.device) for v in flat])).tolist()
        world = dist.get_world_size() if dist.is_initialized() else 1
        means: dict[str, dict[str, float]] = defaultdict(dict)
        for (t, k), v in zip(keys, values, strict=False):  # values ends with tokens, pairs
            means[t][k] = v / (self.counts[t] * world)
        return dict(means), int(values[-2]), int(values[-1])

    def state_dict(self) -> dict:
        return {
            "sums": {t: {k: float(v) for k, v in d.items()} for t, d in self.sums.items()},
            "counts": dict(self.counts),
            "tokens": self.tokens,
            "pairs": self.pairs,
        }

    def load_state_dict(self, state: dict) -> None:
        self.sums = {
            t: {k: torch.tensor(v, device=self.device) for k, v in d.items()}
            for t, d in state["sums"].items()
        }
        self.counts = defaultdict(int, state["counts"])
        self.tokens, self.pairs = state["tokens"], state["pairs"]

    def clear(self) -> None:
        self.sums.clear()
        self.counts.clear()
        self.tokens = self.pairs = 0
        self.start = time.perf_counter()


class NonFinite:
    """The first micro-batch whose loss was not finite, tracked on the device (no sync)."""

    def __init__(self, device: torch.device):
        self.first = torch.full((), _NO_BAD, dtype=torch.int64, device=device)

    def add(self, loss: torch.Tensor, step: int, task: str) -> None:
        bad = torch.isfinite(loss.detach()).logical_not().long()
        code = step * len(TASK_CODES) + TASK_CODES.index(task)
        self.first = torch.minimum(self.first, bad * code + (1 - bad) * _NO_BAD)

    def check(self, last_checkpoint: Path | None) -> None:
        """Collective: every rank raises if any rank saw a non-finite loss."""
        code = int(
            _all_reduce(self.first.clone(), dist.ReduceOp.MIN if dist.is_initialized() else None)
        )
        if code == _NO_BAD:
            return
        step, task = divmod(code, len(TASK_CODES))
        where = f"; the newest checkpoint is {last_checkpoint}" if last_checkpoint else ""
        raise FloatingPointError(
            f"step {step}, task {TASK_CODES[task]}: the loss is not finite (NaN or inf); the run "
            f"stops here{where}"
        )


def _truncate_metrics(path: Path, step: int, max_steps: int) -> None:
    """Drop records past `step` (written by a run that died after its last checkpoint); at
    `max_steps`, drop the final validation too (the run died between it and its summary, and
    validates again)."""
    if not path.is_file():
        return

    def wanted(record: dict) -> bool:
        final_val = record["step"] == max_steps and record.get("split") == "val"
        return record["step"] <= step and not final_val

    keep = [line for line in path.read_text().splitlines() if wanted(json.loads(line))]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# The run


def _build_engine(run: Run, rank: int, world: int):
    """Model and engine, resumed if the run folder holds a checkpoint; returns the engine, the
    saved state (None for a new run) and the attention choice."""
    cfg = run.cfg
    _seed_everything(cfg.seed)  # the same initial weights on every rank
    task = get_task(cfg.task)
    model = task.build_model(cfg, run.model_config)
    if cfg.init_checkpoint and run.resume_from is None:
        load_pretrained(model, cfg.init_checkpoint, verbose=rank == 0)
    model.to(run.device).train()
    precision = config_precision(run.deepspeed_config)
    dtype = _AUTOCAST.get(precision, torch.float32)
    # prepare() checked that this choice can run here
    choice = model.set_attention(cfg.attention, run.device, cfg.varlen_dropout, dtype=dtype)
    ds_config = dict(run.deepspeed_config)
    saved = run.saved
    source = run.resume_from
    if source is not None:
        moved = (
            saved["world_size"] != world
            or saved["zero_stage"] != ds_config["zero_optimization"]["stage"]
        )
        if moved:
            universal = source / "universal"
            if rank == 0 and not universal.is_dir():
                log.info(
                    "resuming on %d rank(s) with ZeRO-%d from a checkpoint of %d rank(s) with "
                    "ZeRO-%d: converting it to DeepSpeed's universal layout",
                    world,
                    ds_config["zero_optimization"]["stage"],
                    saved["world_size"],
                    saved["zero_stage"],
                )
                make_universal(source, universal)
            barrier()
            ds_config["checkpoint"] = {**ds_config.get("checkpoint", {}), "load_universal": True}
            source = universal
    heads = task.head_parameters(model) if cfg.task != "pretrain" else []  # VCR stage 2: none
    engine = Engine(
        model,
        cfg.optim,
        total_steps=cfg.max_steps,
        deepspeed_config=ds_config,
        device=run.device,
        head_params=heads,
        head_lr_mul=cfg.finetune.head_lr_mul,
    )
    if source is not None:
        engine.load(source)
        if run.reschedule:  # prepare() refused them unless cfg.reschedule
            lr = engine.set_schedule(cfg.optim, cfg.max_steps)
            log.warning(
                "--reschedule: the schedule and AdamW settings are rebuilt from this recipe at "
                "step %d (%s); the next step's lr is %.3g",
                saved["step"],
                "; ".join(run.reschedule),
                lr,
            )
    n_params = sum(p.numel() for p in model.parameters())
    if getattr(engine.module, "zero3", False) or engine.zero_stage == 3:
        n_params = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())
    log.info("model: %s parameters; engine: %s", f"{n_params:,}", engine.describe())
    for note in run.deepspeed_notes:
        log.info("deepspeed config: %s", note)
    log.info("attention: %s", choice.describe())
    if choice.warning:
        log.warning("attention: %s", choice.warning)
    log.info("loss kernels: %s", describe_kernels(cfg.kernels, run.device, dtype))
    return engine, saved, choice


def _build_loader(run: Run, rank: int, world: int, saved: dict | None, rank_state: dict | None):
    cfg = run.cfg
    state = rank_state["data"] if rank_state else None
    seed = cfg.seed
    if saved is not None and saved["world_size"] != world:
        log.warning(
            "the data position of a %d-rank run cannot be carried to %d ranks (each rank reads "
            "its own shard split): the data stream restarts with seed %d%s",
            saved["world_size"],
            world,
            seed + saved["step"],
            "; in exact mode the current epoch starts over" if cfg.data.mode == "exact" else "",
        )
        state, seed = None, seed + saved["step"]
    if cfg.task != "pretrain":
        urls = [u for source in run.sources for u in source.shards]
        try:
            return get_task(cfg.task).loader(
                urls,
                cfg,
                rank=rank,
                world=world,
                pin_memory=run.device.type == "cuda",
                state=state,
            )
        except (FileNotFoundError, ValueError) as e:
            raise RunError(f"{cfg.task} training data: {e}") from None
    return Loader(
        run.sources,
        tokens_per_batch=cfg.data.tokens_per_batch,
        seed=seed,
        mode=cfg.data.mode,
        block_images=cfg.data.block_images,
        length_buckets=cfg.data.length_buckets,
        num_workers=cfg.data.num_workers,
        pin_memory=run.device.type == "cuda",
        max_bad_fraction=cfg.data.max_bad_fraction,
        bad_check_min_samples=cfg.data.bad_check_min_samples,
        rank=rank,
        world_size=world,
        state=state,
    )


def _export_reference(run: Run, checkpoint: Path) -> Path:
    """fp32 weights of `checkpoint` in the reference's key layout (rank 0; tied keys written)."""
    # DeepSpeed's converter prints as it goes, and draws a progress bar on stderr
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        weights = fp32_state_dict(checkpoint)
    model = get_task(run.cfg.task).build_model(run.cfg, run.model_config)
    model.load_state_dict(weights, strict=True)  # our names, the tied ones included
    return save_reference(model, run.output_dir / "model_reference.pt")


def _already_finished(run: Run) -> dict:
    """A run folder at max_steps with its summary written: say so, change nothing."""
    summary = json.loads((run.output_dir / "summary.json").read_text())
    if int(os.environ.get("RANK", 0)) == 0:
        print(
            f"train.py: {run.output_dir} is already at max_steps ({run.cfg.max_steps}, "
            f"{run.resume_from}): nothing to do; its summary is {run.output_dir / 'summary.json'}. "
            "To train on, raise --max-steps and pass --reschedule.",
            file=sys.stderr,
        )
    return summary


def _resolved_recipe(run: Run, engine: Engine, choice, start_step: int) -> str:
    """The recipe as this invocation ran it, as YAML: what "auto" became (device, precision,
    attention, kernels) and the output folder filled in, so that `--config` on it reproduces the
    run; comments say what a value cannot (the per-op kernel paths, the attention details)."""
    cfg = run.cfg
    values = cfg.to_dict()
    device = run.device
    values["output_dir"] = str(run.output_dir)
    # Under a launcher each rank takes its own GPU: "cuda", not rank 0's "cuda:0".
    values["device"] = device.type if cfg.device in ("auto", "cuda") else cfg.device
    values["precision"] = engine.precision
    values["attention"] = choice.backend
    values["reschedule"] = False  # done, if asked: a one-time action, not a setting to repeat
    kernels = describe_kernels(cfg.kernels, device)
    if cfg.kernels == "auto" and kernels.startswith("reference"):
        values["kernels"] = "reference"
    header = [
        "# The recipe as this invocation of train.py ran it (`--config` on this file repeats it).",
        f"# Started {time.strftime('%Y-%m-%d %H:%M:%S')} at step {start_step}, on "
        f"{engine.world_size} rank(s); rank 0 on {device}.",
        f"# attention: {choice.describe()}",
        f"# loss kernels: {kernels}",
        f"# engine: {engine.describe()}",
    ]
    return "\n".join(header) + "\n" + yaml.safe_dump(values, sort_keys=False)


def _write_recipe(run: Run, text: str) -> Path:
    """config.yaml for the first invocation; each later one (a resume) writes the next free
    config-resume-N.yaml, so that no invocation's recipe overwrites another's."""
    path = run.output_dir / "config.yaml"
    n = 0
    while path.exists():
        n += 1
        path = run.output_dir / f"config-resume-{n}.yaml"
    path.write_text(text)
    return path


def train(run: Run) -> dict:
    """Train as `run.cfg` says, on every rank; returns the summary (written to summary.json).

    A RunError on one rank stops every rank with its message (`abort.RunErrorBroadcast`)."""
    if run.finished:
        return _already_finished(run)
    rank, world = init_distributed(run.device)
    broadcast = RunErrorBroadcast.for_default_group(rank, world)
    try:
        summary = _train(run, rank, world)
    except RunError as e:
        if broadcast.active:  # said first: this process may be killed once the others exit
            report(e)
            broadcast.announce(str(e))
        raise
    except RuntimeError:  # a collective failed: because another rank stopped on purpose?
        stopped = broadcast.stopped_elsewhere()
        if stopped is None:
            raise
        raise stopped from None
    finally:
        broadcast.stop()
    barrier()  # the watchers are gone: rank 0 may now exit and take the store with it
    return summary


def _train(run: Run, rank: int, world: int) -> dict:
    cfg = run.cfg
    if rank == 0:
        run.output_dir.mkdir(parents=True, exist_ok=True)
    barrier()
    setup_logging(run.output_dir, rank=rank)
    checkpoints = run.output_dir / "checkpoints"
    if rank == 0:
        for leftover in ckpt.remove_incomplete(checkpoints):
            log.warning("removed %s, left by a save that did not finish", leftover)
        (run.output_dir / "deepspeed.json").write_text(
            json.dumps(run.deepspeed_config, indent=2) + "\n"
        )
        env = environment_info(run.device)
        env.update(world_size=world, launched=launched())
        (run.output_dir / "env.json").write_text(json.dumps(env, indent=2) + "\n")
        log.info(
            "output folder %s; device %s; %d rank(s); torch %s",
            run.output_dir,
            run.device,
            world,
            env["torch"],
        )
        if run.synthetic:
            _write_synthetic(run)
    barrier()
    if run.synthetic:
        run.val_urls = list_shards(run.val_urls) if run.val_urls else []

    engine, saved, choice = _build_engine(run, rank, world)
    start_step = saved["step"] if saved else 0
    if rank == 0:
        recipe = _write_recipe(run, _resolved_recipe(run, engine, choice, start_step))
        log.info("recipe as resolved: %s", recipe)
    if not run.val_urls:
        log.warning(NO_VALIDATION)
    rank_state = None
    if saved is not None and saved["world_size"] == world:
        rank_state = ckpt.load_rank_state(run.resume_from, rank)
    batches = _build_loader(run, rank, world, saved, rank_state)
    plugin = get_task(cfg.task)
    validate = _validator(run, engine, rank, world)
    window = Window(run.device)
    if rank_state is not None:
        ckpt.set_rng_state(rank_state["rng"])
        window.load_state_dict(rank_state["window"])
    else:
        _seed_everything(cfg.seed + 1000 * (rank + 1) + start_step)  # dropout differs per rank
    if saved:
        log.info("resumed from %s at step %d", run.resume_from, start_step)
    if cfg.task == "pretrain":
        log.info(
            "data: %s mode, %d worker(s) per rank, blocks of %d images, %d real tokens per batch",
            cfg.data.mode,
            cfg.data.num_workers,
            cfg.data.block_images,
            cfg.data.tokens_per_batch,
        )
    else:
        held = len(batches.examples)
        log.info(
            "data: %s, %d real tokens per batch",
            f"{held} {cfg.task} training examples held (exact mode)"
            if held
            else f"{cfg.task} examples streamed from the shards (resampled mode)",
            cfg.data.tokens_per_batch,
        )

    metrics = None
    if rank == 0:
        # A finished checkpoint without a summary (killed after its last save) validates again.
        _truncate_metrics(run.output_dir / "metrics.jsonl", start_step, cfg.max_steps)
        metrics = MetricsWriter(run.output_dir, purge_step=start_step + 1 if saved else None)
    progress = Progress(cfg.max_steps, initial=start_step, enabled=rank == 0)
    history = saved.get("history", {}) if saved else {}
    loss_first: dict[str, float] = dict(history.get("loss_first", {}))
    latest: dict[str, float] = dict(history.get("loss_last", {}))
    total_tokens = int(history.get("tokens", 0))
    train_seconds = float(history.get("train_seconds", 0.0))
    invocations = int(history.get("invocations", 0)) + 1
    my_tokens = 0  # this rank's, this invocation's
    nonfinite = NonFinite(run.device)
    last_checkpoint = run.resume_from
    rates = (0.0, 0.0)  # tokens/s and pairs/s of the last window, shown until the next
    bad_logged = 0
    nan_step, kill_step = _fault("nan"), _fault("kill-in-save")
    run_start = time.perf_counter()

    def save(step: int) -> Path:
        nonfinite.check(last_checkpoint)  # never save weights that saw a NaN
        state = {
            "step": step,
            "world_size": world,
            "zero_stage": engine.zero_stage,
            "precision": engine.precision,
            "config": cfg.to_dict(),
            "model_config": run.model_config.to_dict(),
            "history": {
                "loss_first": loss_first,
                "loss_last": latest,
                "tokens": total_tokens,
                "train_seconds": train_seconds + time.perf_counter() - run_start,
                "invocations": invocations,
            },
        }
        rank_part = {
            "rng": ckpt.rng_state(),
            "data": batches.state_dict(),
            "window": window.state_dict(),
        }
        kill = _kill_self if kill_step == step else None
        path = ckpt.save_checkpoint(
            checkpoints,
            step,
            engine,
            rank_state=rank_part,
            state=state,
            keep=cfg.keep_checkpoints,
            before_commit=kill,
        )
        log.info("saved checkpoint %s", path)
        return path

    step = start_step
    for step in range(start_step + 1, cfg.max_steps + 1):
        stepped = None
        for _ in range(engine.grad_accum):
            task, batch = next(batches)
            tokens, pairs = batch.num_tokens, batch.num_pairs
            my_tokens += tokens
            batch = batch.to(run.device, non_blocking=True)
            out = plugin.forward(engine, batch, task)
            loss = out["loss"]
            if nan_step is not None and step >= nan_step and rank == 0:
                loss = loss * float("nan")
                out = {**out, "loss": loss}
            nonfinite.add(loss, step, task)
            engine.backward(loss)
            stepped = engine.step(step) or stepped
            window.add(task, out, tokens, pairs)

        if step % cfg.log_every == 0 or step == cfg.max_steps:
            nonfinite.check(last_checkpoint)
            means, tokens, pairs = window.reduce()
            elapsed = time.perf_counter() - window.start
            rates = (tokens / elapsed, pairs / elapsed)
            total_tokens += tokens
            grad_norm = stepped.grad_norm if stepped is not None else None
            grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
            if metrics is not None:
                for task in sorted(means):
                    record = {
                        "step": step,
                        "task": task,
                        "lr": stepped.lr if stepped else float("nan"),
                        "tokens_per_s": rates[0],
                        "samples_per_s": rates[1],
                        "grad_norm": grad_norm,
                        **means[task],
                    }
                    metrics.write(record)
                    loss_first.setdefault(task, record["loss"])
                    latest[task] = record["loss"]
            bad_logged = _log_bad(batches.bad, bad_logged, step, metrics)
            window.clear()
            progress.update(step, latest, *rates, log_line=True)
        else:
            progress.update(step, latest, *rates, log_line=False)

        if cfg.save_every and step % cfg.save_every == 0 and step != cfg.max_steps:
            last_checkpoint = save(step)
        if cfg.val_every and step % cfg.val_every == 0 and run.val_urls and step != cfg.max_steps:
            val = validate()
            if metrics is not None:
                metrics.write({"step": step, "split": "val", **val}, prefix="val")
    progress.close()
    my_seconds = time.perf_counter() - run_start
    train_seconds += my_seconds

    if start_step < cfg.max_steps or last_checkpoint is None:
        last_checkpoint = save(cfg.max_steps)
    bad, bad_per_rank = _gather_bad(batches.bad)
    batches.close()
    my_tokens = int(_all_reduce(torch.tensor(my_tokens, dtype=torch.float64, device=run.device)))
    reference = None
    if rank == 0:
        reference = _export_reference(run, last_checkpoint)
    val = {}
    if run.val_urls:
        val = validate()
        if metrics is not None:
            metrics.write({"step": cfg.max_steps, "split": "val", **val}, prefix="val")
    summary = {
        "task": cfg.task,
        **_headline(run, val),
        "steps": cfg.max_steps,
        "resumed_from_step": start_step,
        "world_size": world,
        "engine": engine.describe(),
        "train_seconds": train_seconds,
        "tokens_per_s": total_tokens / train_seconds if train_seconds > 0 else 0.0,
        "invocations": invocations,
        "this_invocation": {
            "first_step": start_step + 1,
            "steps": cfg.max_steps - start_step,
            "train_seconds": my_seconds,
            "tokens": my_tokens,
            "tokens_per_s": my_tokens / my_seconds if my_seconds > 0 else 0.0,
        },
        "loss_first": loss_first,
        "loss_last": latest,
        "validation": val,
        "validation_note": None if run.val_urls else NO_VALIDATION,
        "data": _data_summary(bad, bad_per_rank, cfg.data),
        "checkpoint": str(last_checkpoint),
        "reference_weights": str(reference),
        "output_dir": str(run.output_dir),
    }
    if rank == 0:
        metrics.close()
        (run.output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(format_summary(summary))
    return summary


def _validator(run: Run, engine, rank: int, world: int):
    """The run's validation as a call: pretraining's per-task losses and accuracies, or the
    downstream task's loss and metric (its examples read once)."""
    cfg = run.cfg
    if cfg.task == "pretrain":
        return lambda: evaluate(engine, run.val_urls, tokens_per_batch=cfg.data.tokens_per_batch)
    task = get_task(cfg.task)
    cache: dict = {}

    def validate() -> dict:
        if "examples" not in cache:
            cache["examples"], bad = task.validation_examples(run.val_urls, cfg)
            if bad.num_bad:
                log.warning(
                    "validation: %d bad samples skipped, by reason %s", bad.num_bad, bad.by_reason()
                )
        return task.evaluate(
            engine,
            cache["examples"],
            cfg,
            device=run.device,
            rank=rank,
            world=world,
            all_reduce=_all_reduce,
        )

    return validate


def _headline(run: Run, val: dict) -> dict:
    """A downstream run's validation figure: metric, value and the task's chance level."""
    if run.cfg.task == "pretrain":
        return {}
    metric = METRIC[run.cfg.task]  # pretrain-vcr: the validation's MLM accuracy
    return {
        "metric": metric,
        "value": val.get(metric),
        "chance": get_task(run.cfg.task).chance(run.cfg) if run.synthetic else None,
        "split": "val (synthetic)" if run.synthetic else "val",
    }


def _data_summary(bad: BadSamples, per_rank: list[BadSamples], data: DataConfig) -> dict:
    """Samples read and skipped (all ranks); a note for each rank whose bad fraction passed the
    limit on fewer samples than the limit waits for (`data.bad_check_min_samples`, counted per
    rank, as the loader checks it), so that the limit was never applied there."""
    summary = {
        "samples_read": bad.num_good + bad.num_bad,
        "bad_samples": bad.by_reason(),
        "worst_shards": bad.worst_shards(),
        "limit_note": None,
    }
    unchecked = []
    for rank, counts in enumerate(per_rank):
        read = counts.num_good + counts.num_bad
        if counts.num_bad > data.max_bad_fraction * read and read < data.bad_check_min_samples:
            where = f" on rank {rank}" if len(per_rank) > 1 else ""
            unchecked.append(
                f"{counts.num_bad} of {read} samples{where} were bad ({counts.num_bad / read:.1%})"
            )
    if unchecked:
        summary["limit_note"] = (
            f"{'; '.join(unchecked)}: over max_bad_fraction {data.max_bad_fraction:.1%}, but the "
            f"limit is applied only once a rank has read data.bad_check_min_samples "
            f"({data.bad_check_min_samples}), so it was never checked"
        )
    return summary


def _log_bad(bad: BadSamples, logged: int, step: int, metrics) -> int:
    if bad.num_bad == logged:
        return logged
    log.warning(
        "bad samples skipped so far on this rank: %d of %d read, by reason %s",
        bad.num_bad,
        bad.num_bad + bad.num_good,
        bad.by_reason(),
    )
    if metrics is not None:
        metrics.write(
            {
                "step": step,
                "data_bad_samples": bad.num_bad,
                "data_samples_read": bad.num_bad + bad.num_good,
            },
            prefix="data",
        )
    return bad.num_bad


def _gather_bad(bad: BadSamples) -> tuple[BadSamples, list[BadSamples]]:
    """Every rank's bad-sample counts, merged, and each rank's (collective)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return bad, [bad]
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, bad.state_dict())
    merged, ranks = BadSamples(), []
    for state in states:
        merged.merge(state)
        ranks.append(BadSamples())
        ranks[-1].merge(state)
    return merged, ranks


def format_summary(s: dict) -> str:
    now = s["this_invocation"]
    if now["steps"] == 0:  # the last save was made, the summary not: validated and exported
        head = f"{s['steps']} steps, all trained before; validated and exported again"
    elif s["invocations"] == 1:
        head = (
            f"{s['steps']} steps in {now['train_seconds']:.1f} s, "
            f"{now['tokens_per_s']:,.0f} tokens/s"
        )
    else:
        head = (
            f"steps {now['first_step']}-{s['steps']} in {now['train_seconds']:.1f} s, "
            f"{now['tokens_per_s']:,.0f} tokens/s; {s['steps']} steps in "
            f"{s['train_seconds']:.1f} s over {s['invocations']} invocations"
        )
    lines = ["", f"== done: {head} ==", "training loss by task (first logged -> last logged):"]
    for task in sorted(s["loss_first"]):
        lines.append(f"  {task:6s} {s['loss_first'][task]:8.4f} -> {s['loss_last'][task]:8.4f}")
    v = s["validation"]
    if v and s.get("metric"):
        chance = f" (chance {s['chance']:.3f})" if s.get("chance") is not None else ""
        lines.append(f"validation ({s['split']}, {v['n']} examples):")
        loss = f", loss {v['loss']:.4f}" if v.get("loss") is not None else ""
        lines.append(f"  {s['metric']} {s['value']:.4f}{chance}{loss}")
    elif v:
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
    if s["validation_note"]:
        lines.append(f"validation: none ({s['validation_note']})")
    d = s["data"]
    bad = sum(d["bad_samples"].values())
    lines.append(
        f"data: {d['samples_read']} samples read, {bad} bad ones skipped"
        + (f" {d['bad_samples']}; worst: {d['worst_shards'][0]}" if bad else "")
    )
    if d["limit_note"]:
        lines.append(f"data: {d['limit_note']}")
    lines.append(f"checkpoint: {s['checkpoint']}")
    lines.append(f"reference-layout weights: {s['reference_weights']}")
    lines.append(f"logs: {s['output_dir']}/metrics.jsonl, train.log, tensorboard/")
    return "\n".join(lines)


__all__ = ["Run", "RunError", "evaluate", "format_summary", "prepare", "train"]
