"""The optimisation engine: DeepSpeed ZeRO 1, 2 or 3, in one process or many.

This is the only module that imports deepspeed. The same code runs under the launcher

    deepspeed --num_gpus 8 train.py --config configs/pretrain/uniter-base.yaml
    deepspeed --hostfile hosts --num_nodes 4 --num_gpus 8 train.py --config ...

and without it (`python train.py`: a process group of one, made here). The recipe's `optim`
section gives the optimizer and the schedule (the reference's AdamW, its no-decay name rule and
warm-up then linear decay); the DeepSpeed JSON gives ZeRO's stage and buckets, the precision and,
if it sets them, the accumulation and clip (the engine's values are read back and logged).

What the engine does to a step, as the reference does it:
- the gradients of a step's micro-batches are summed, and summed over ranks (DeepSpeed averages
  over ranks, so each rank's loss is scaled by the world size before backward);
- the summed gradient is clipped by its global norm, then AdamW steps with the scheduled lr.

One difference from a plain PyTorch AdamW, under ZeRO-3 only: a parameter that the step's task
does not use (a head of another task) gets a zero gradient rather than none, so its Adam moments
and weight decay still move it. ZeRO 1 and 2 skip it, as torch's AdamW does. (DeepSpeed 0.19's
ZeRO-3 would hand such a parameter the stale gradient of the last step that used it, and a
resumed run zeros, so resumed losses drifted from the uninterrupted run's; the engine clears
ZeRO-3's gradient partitions after every step, making both runs see zeros.)
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..config import OptimConfig
from .schedule import learning_rate

log = logging.getLogger(__name__)

# The reference's rule, applied to parameter names: any name containing one of these is not
# decayed. It leaves `img_layer_norm.weight`, `pos_layer_norm.weight` and the heads' `net.2.weight`
# (LayerNorms under other names) decayed, and so must we to match its training.
NO_DECAY = ("bias", "LayerNorm.bias", "LayerNorm.weight")

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
# DeepSpeed's dynamic loss scaling: start at 2^16, halve on overflow, double after 1000 clean steps.
FP16_DYNAMIC = {
    "enabled": True,
    "loss_scale": 0,
    "initial_scale_power": 16,
    "loss_scale_window": 1000,
    "hysteresis": 2,
    "min_loss_scale": 1,
}
# With no --deepspeed-config: ZeRO-1 over however many ranks there are (one, without a launcher).
DEFAULT_DEEPSPEED = {"zero_optimization": {"stage": 1}}
ENGINE_TAG = "engine"  # the sub-folder of a checkpoint that holds DeepSpeed's files


def param_groups(
    model: nn.Module,
    weight_decay: float,
    *,
    head_params=(),
    head_lr: float | None = None,
) -> list[dict]:
    """AdamW groups: decay and no decay (biases, LayerNorm); with `head_params` and `head_lr`,
    two more for those parameters at their own lr (the reference's VQA head at lr x lr_mul)."""
    heads = {id(p) for p in head_params} if head_lr is not None else set()
    groups = {(False, False): [], (False, True): [], (True, False): [], (True, True): []}
    for name, p in model.named_parameters():  # tied parameters appear once
        if not p.requires_grad:
            continue
        groups[(id(p) in heads, any(nd in name for nd in NO_DECAY))].append(p)
    out = [
        {"params": groups[(False, False)], "weight_decay": weight_decay},
        {"params": groups[(False, True)], "weight_decay": 0.0},
    ]
    if heads:
        out += [
            {"params": groups[(True, False)], "weight_decay": weight_decay, "lr": head_lr},
            {"params": groups[(True, True)], "weight_decay": 0.0, "lr": head_lr},
        ]
    return out


def _with_lr_mul(groups: list[dict], lr: float) -> list[dict]:
    """Record each group's multiple of the base lr (set_schedule rebuilds from it)."""
    for group in groups:
        group["lr_mul"] = group["lr"] / lr if "lr" in group else 1.0
    return groups


# --------------------------------------------------------------------------------------------
# The process group


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launched() -> bool:
    """Whether a launcher (deepspeed, torchrun) started this process."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def init_distributed(device: torch.device) -> tuple[int, int]:
    """Join the launcher's process group, or make a group of one; returns (rank, world size).

    NCCL on CUDA, gloo on the CPU. DeepSpeed's accelerator follows the device, so a CPU run on
    a GPU machine (`--device cpu`) does not pick CUDA.

    A group of one leaves no launcher variables behind: its rendezvous address goes to torch
    directly rather than into `os.environ`, so a process this one starts (`train.py` run by a
    test or a notebook) does not take RANK and MASTER_PORT for a launcher's, and try to join a
    store that is not its own. Only LOCAL_RANK is set (DeepSpeed's engine reads it).
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    group_of_one = {}
    if not launched():
        os.environ.setdefault("LOCAL_RANK", "0")
        group_of_one = dict(init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    accelerator = "cuda" if device.type == "cuda" else "cpu"
    # DeepSpeed reads DS_ACCELERATOR once, when it first picks its accelerator; the variable is
    # set for that moment only, so it is not inherited either.
    saved = os.environ.get("DS_ACCELERATOR")
    os.environ.setdefault("DS_ACCELERATOR", accelerator)
    try:
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        get_accelerator()
    finally:
        if saved is None:
            os.environ.pop("DS_ACCELERATOR", None)
    if accelerator == "cpu":
        _announce_cpu_op_build()
    deepspeed.init_distributed(
        dist_backend="nccl" if device.type == "cuda" else "gloo",
        auto_mpi_discovery=not group_of_one,
        verbose=False,
        **group_of_one,
    )
    return dist.get_rank(), dist.get_world_size()


def _announce_cpu_op_build() -> None:
    """One line before DeepSpeed's CPU accelerator compiles its shared-memory communication op,
    which it does on the first run after an install (about 40 s on 2 cores, silent); later runs
    load the build from torch's extensions folder."""
    from deepspeed.accelerator import get_accelerator
    from torch.utils.cpp_extension import _get_build_directory

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None:
        return
    folder = Path(_get_build_directory(builder.name, verbose=False))
    if not (folder / f"{builder.name}.so").is_file() and int(os.environ.get("RANK", 0)) == 0:
        print(
            f"DeepSpeed is compiling its CPU communication op {builder.name} into {folder}: once "
            "after an install, about 40 s on 2 cores (later runs reuse it)",
            file=sys.stderr,
            flush=True,
        )


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


# --------------------------------------------------------------------------------------------
# The DeepSpeed config


def load_deepspeed_config(path: str | os.PathLike | None) -> dict:
    """The JSON at `path` (None: `DEFAULT_DEEPSPEED`); a bad file raises ValueError naming it."""
    if path is None:
        return json.loads(json.dumps(DEFAULT_DEEPSPEED))
    try:
        values = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"deepspeed config not found: {path}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"deepspeed config {path}: not valid JSON ({e})") from None
    if not isinstance(values, dict):
        raise ValueError(f"deepspeed config {path}: expected a JSON object")
    return values


def build_deepspeed_config(
    values: dict,
    *,
    optim: OptimConfig,
    precision: str,
    device: torch.device,
    source: str = "deepspeed config",
) -> tuple[dict, list[str]]:
    """Complete a DeepSpeed config from the recipe; returns it and notes on what was decided.

    precision: "auto" keeps the JSON's choice (when it names none: bf16 on CUDA, fp32 on the
    CPU); "bf16", "fp16" (dynamic loss scaling) or "fp32" override it.
    """
    cfg = json.loads(json.dumps(values))
    notes: list[str] = []
    for key in ("optimizer", "scheduler"):
        if key in cfg:
            raise ValueError(
                f"{source}: remove the {key!r} section: the optimizer and schedule come from the "
                "recipe's optim section (the reference's AdamW, no-decay rule and warm-up)"
            )
    micro = cfg.setdefault("train_micro_batch_size_per_gpu", 1)
    if micro != 1:
        raise ValueError(
            f"{source}: train_micro_batch_size_per_gpu must be 1, got {micro}: one micro-batch is "
            "one packed batch, sized in real tokens by data.tokens_per_batch"
        )
    if "train_batch_size" in cfg:
        raise ValueError(
            f"{source}: remove train_batch_size: batches are sized in tokens "
            "(data.tokens_per_batch) and the accumulation by gradient_accumulation_steps"
        )
    if "gradient_accumulation_steps" in cfg:
        if cfg["gradient_accumulation_steps"] != optim.grad_accum:
            notes.append(
                f"gradient accumulation {cfg['gradient_accumulation_steps']} from {source} "
                f"(the recipe's optim.grad_accum {optim.grad_accum} is not used)"
            )
    else:
        cfg["gradient_accumulation_steps"] = optim.grad_accum
    if "gradient_clipping" in cfg:
        if cfg["gradient_clipping"] != optim.grad_clip:
            notes.append(
                f"gradient clip {cfg['gradient_clipping']} from {source} "
                f"(the recipe's optim.grad_clip {optim.grad_clip} is not used)"
            )
    else:
        cfg["gradient_clipping"] = optim.grad_clip
    zero = cfg.setdefault("zero_optimization", {"stage": 1})
    stage = zero.setdefault("stage", 1)
    if stage not in (1, 2, 3):
        raise ValueError(
            f"{source}: zero_optimization.stage must be 1, 2 or 3, got {stage} (checkpoints "
            "and the fp32 export read ZeRO's partitions; stage 1 on one rank is plain AdamW)"
        )
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    in_json = next((p for p in ("bf16", "fp16") if cfg.get(p, {}).get("enabled", False)), None)
    if in_json is None and ("bf16" in cfg or "fp16" in cfg):
        in_json = "fp32"  # both named and off: the JSON asks for fp32
    if precision == "auto":
        chosen = in_json or ("bf16" if device.type == "cuda" else "fp32")
    else:
        chosen = precision
    if in_json and chosen != in_json:
        notes.append(f"precision {chosen} (the recipe overrides {in_json} in {source})")
    if chosen == "fp16" and device.type != "cuda":
        raise ValueError("precision fp16 needs a CUDA device (use fp32 or bf16 on the CPU)")
    cfg["bf16"] = {**cfg.get("bf16", {}), "enabled": chosen == "bf16"}  # keep its other options
    fp16 = {**FP16_DYNAMIC, **cfg.get("fp16", {})} if chosen == "fp16" else {}
    cfg["fp16"] = {**fp16, "enabled": chosen == "fp16"}
    cfg.setdefault("steps_per_print", 2**31 - 1)  # the trainer logs; DeepSpeed stays quiet
    cfg.setdefault("wall_clock_breakdown", False)
    return cfg, notes


def config_precision(cfg: dict) -> str:
    return "bf16" if cfg["bf16"]["enabled"] else "fp16" if cfg["fp16"]["enabled"] else "fp32"


# --------------------------------------------------------------------------------------------
# The engine


class Schedule:
    """LambdaLR factor: the reference's lr for the optimizer step about to be taken.

    A class, not a lambda, so the scheduler's state (its step count) is saved with the engine.
    DeepSpeed steps the scheduler after every applied update; an fp16 step skipped for overflow
    does not advance it.
    """

    def __init__(self, cfg: OptimConfig, total_steps: int):
        self.lr, self.warmup, self.total = cfg.lr, cfg.warmup_steps, total_steps

    def __call__(self, done: int) -> float:
        return learning_rate(done + 1, self.lr, self.warmup, self.total) / self.lr


@dataclass
class StepResult:
    """What one optimizer step did. grad_norm may be a device tensor (reading it syncs)."""

    lr: float
    grad_norm: float | torch.Tensor | None
    applied: bool


class Engine:
    """One model under DeepSpeed: `engine(batch, task)`, `backward(loss)`, `step()`.

    The trainer calls `backward` and `step` once per micro-batch; the optimizer steps on the
    last micro-batch of each step (`step()` then returns a StepResult, otherwise None).
    """

    def __init__(
        self,
        model: nn.Module,
        cfg: OptimConfig,
        *,
        total_steps: int,
        deepspeed_config: dict,
        device: torch.device,
        head_params=(),
        head_lr_mul: float = 1.0,
    ):
        import deepspeed

        fused = {"fused": True} if device.type == "cuda" else {}
        head_lr = cfg.lr * head_lr_mul if head_params and head_lr_mul != 1.0 else None
        groups = _with_lr_mul(
            param_groups(model, cfg.weight_decay, head_params=head_params, head_lr=head_lr), cfg.lr
        )
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, **fused)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, Schedule(cfg, total_steps))
        self.ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config
        )
        self.device = device
        self.precision = config_precision(deepspeed_config)
        self.world_size = self.ds.world_size
        self.rank = self.ds.global_rank
        self.zero_stage = self.ds.zero_optimization_stage()
        self.grad_accum = self.ds.gradient_accumulation_steps()
        self.micro_batch = self.ds.train_micro_batch_size_per_gpu()
        self.grad_clip = self.ds.gradient_clipping()
        self.overflows = 0
        self._clear_stale_grads()

    @property
    def module(self) -> nn.Module:
        return self.ds.module

    def __call__(self, *args, **kwargs):
        return self.ds(*args, **kwargs)

    def train(self, mode: bool = True) -> None:
        self.ds.train(mode)

    def eval(self) -> None:
        self.ds.eval()

    def backward(self, loss: torch.Tensor) -> None:
        """Sum, not average: over the step's micro-batches and over ranks (see the docstring)."""
        scaled = loss * self.world_size if self.world_size > 1 else loss
        self.ds.backward(scaled, scale_wrt_gas=False)

    def step(self, step: int) -> StepResult | None:
        """After each micro-batch's backward; `step` (1-based) names the optimizer step."""
        boundary = self.ds.is_gradient_accumulation_boundary()
        if not boundary:
            self.ds.step()
            return None
        lr = self.optimizer.param_groups[0]["lr"]
        scale = self._loss_scale()
        self.ds.step()
        applied = self.ds.was_step_applied()
        self._clear_stale_grads()
        if not applied:
            self.overflows += 1
            log.warning(
                "step %d: fp16 gradients overflowed (inf or NaN somewhere in the backward); "
                "this update was skipped and the loss scale lowered from %g to %g "
                "(%d skipped so far; a few early on are normal, many in a row are not)",
                step,
                scale,
                self._loss_scale(),
                self.overflows,
            )
        return StepResult(lr=lr, grad_norm=self.ds.get_global_grad_norm(), applied=applied)

    def _clear_stale_grads(self) -> None:
        """ZeRO-3 keeps one gradient partition buffer per parameter across steps and refills
        only the used parameters' parts; zero it so an unused parameter's gradient is zero."""
        if self.zero_stage == 3:
            buffer = getattr(self.ds.optimizer, "grad_partitions_flat_buffer", None)
            if buffer is None:
                raise RuntimeError(
                    "this DeepSpeed's ZeRO-3 optimizer has no grad_partitions_flat_buffer; the "
                    "stale-gradient guard cannot run (see uniter_fast/train/engine.py)"
                )
            buffer.zero_()

    def _loss_scale(self) -> float:
        return (
            float(getattr(self.ds.optimizer, "cur_scale", 1.0)) if self.precision == "fp16" else 1.0
        )

    def describe(self) -> str:
        return (
            f"DeepSpeed ZeRO-{self.zero_stage}, {self.precision}, {self.world_size} rank(s), "
            f"{self.grad_accum} micro-batch(es) per step, clip {self.grad_clip:g}"
        )

    # Checkpoints: DeepSpeed's files go to `<checkpoint>/engine/` (see checkpoint.py for the rest)

    def save(self, checkpoint_dir: Path) -> None:
        """Collective: every rank writes its partitions."""
        self.ds.save_checkpoint(str(checkpoint_dir), tag=ENGINE_TAG, save_latest=False)

    def load(self, checkpoint_dir: Path) -> None:
        """Collective: model, optimizer, scheduler, loss scaler and step counters.

        The schedule and AdamW's settings come back as they were saved (the scheduler's state
        holds `Schedule`'s fields, the optimizer's its param groups); `set_schedule` replaces
        them."""
        path, _ = self.ds.load_checkpoint(
            str(checkpoint_dir), tag=ENGINE_TAG, load_module_strict=True
        )
        if path is None:
            raise RuntimeError(f"DeepSpeed found no engine state under {checkpoint_dir}")

    def set_schedule(self, cfg: OptimConfig, total_steps: int) -> float:
        """Rebuild the schedule over `total_steps` and AdamW's settings from `cfg`, at the step
        the engine is at (a resumed run extended with `--reschedule`); returns the next lr.

        The steps taken keep their count: the next step's lr is the new schedule's at that step
        (warm-up then linear decay from step 1 to `total_steps`), not a fresh warm-up."""
        scheduler = self.scheduler
        optimizer = scheduler.optimizer  # the torch AdamW: ZeRO's wrappers share its groups
        groups = optimizer.param_groups
        scheduler.lr_lambdas = [Schedule(cfg, total_steps)] * len(groups)
        # A head group keeps its multiple of the lr (param_groups' "lr_mul").
        scheduler.base_lrs = [cfg.lr * group.get("lr_mul", 1.0) for group in groups]
        lrs = [
            base * schedule(scheduler.last_epoch)
            for base, schedule in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)
        ]
        # param_groups() alternates decayed and no-decay groups, decayed first
        for i, (group, lr, base) in enumerate(zip(groups, lrs, scheduler.base_lrs, strict=True)):
            decay = cfg.weight_decay if i % 2 == 0 else 0.0
            group.update(lr=lr, initial_lr=base, betas=cfg.betas, eps=cfg.eps, weight_decay=decay)
        scheduler._last_lr = lrs
        return lrs[0]


def make_universal(checkpoint_dir: Path, out_dir: Path) -> None:
    """Convert a checkpoint's engine state to DeepSpeed's universal layout (any world size).

    Runs DeepSpeed's own converter in a subprocess, into a temporary folder renamed into place.
    """
    tmp = out_dir.with_name(out_dir.name + f".tmp-{os.getpid()}")
    command = [
        sys.executable,
        "-m",
        "deepspeed.checkpoint.ds_to_universal",
        "--input_folder",
        str(checkpoint_dir / ENGINE_TAG),
        "--output_folder",
        str(tmp / ENGINE_TAG),
        "--num_extract_workers",
        "1",
        "--num_merge_workers",
        "1",
        "--inject_missing_state",
    ]
    from deepspeed.accelerator import get_accelerator

    # The converter picks its own accelerator: give it this process's (no launcher variables).
    env = {**os.environ, "DS_ACCELERATOR": get_accelerator().device_name()}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(
            f"converting {checkpoint_dir} to DeepSpeed's universal layout failed:\n"
            + done.stdout[-2000:]
            + done.stderr[-2000:]
        )
    os.replace(tmp, out_dir)


def fp32_state_dict(checkpoint_dir: Path) -> dict[str, torch.Tensor]:
    """The fp32 master weights of a checkpoint, consolidated from any ZeRO stage and world size.

    Keys are the model's parameter names, tied ones included (DeepSpeed records the ties).
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=ENGINE_TAG)


__all__ = [
    "DEFAULT_DEEPSPEED",
    "Engine",
    "PRECISIONS",
    "StepResult",
    "barrier",
    "build_deepspeed_config",
    "fp32_state_dict",
    "init_distributed",
    "launched",
    "load_deepspeed_config",
    "make_universal",
    "param_groups",
]
