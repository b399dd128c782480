"""The optimisation engine: optimizer, precision, gradient clipping and the schedule.

This is the plain-PyTorch engine for one process; the DeepSpeed engine (ZeRO, many ranks) will
sit beside it behind the same small interface: `autocast()`, `backward(loss)`, `step(step)`,
`state_dict()`.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..config import OptimConfig
from .schedule import learning_rate

# The reference's rule, applied to parameter names: any name containing one of these is not
# decayed. It leaves `img_layer_norm.weight`, `pos_layer_norm.weight` and the heads' `net.2.weight`
# (LayerNorms under other names) decayed, and so must we to match its training.
NO_DECAY = ("bias", "LayerNorm.bias", "LayerNorm.weight")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():  # tied parameters appear once
        if not p.requires_grad:
            continue
        (no_decay if any(nd in name for nd in NO_DECAY) else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("precision fp16 needs a CUDA device (use fp32 or bf16 on the CPU)")
    return precision


class Engine:
    """AdamW (betas, eps, decoupled weight decay), optional autocast and fp16 loss scaling.

    Gradients of the micro-batches of one step are summed (the caller calls `backward` on each
    micro-batch's loss, undivided), then clipped by global norm, then applied.
    """

    def __init__(
        self,
        model: nn.Module,
        cfg: OptimConfig,
        *,
        total_steps: int,
        device: torch.device,
        precision: str = "fp32",
    ):
        self.model = model
        self.cfg = cfg
        self.total_steps = total_steps
        self.device = device
        self.precision = resolve_precision(precision, device)
        fused = device.type == "cuda"
        self.optimizer = torch.optim.AdamW(
            param_groups(model, cfg.weight_decay),
            lr=cfg.lr,
            betas=cfg.betas,
            eps=cfg.eps,
            **({"fused": True} if fused else {}),
        )
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None
        self._dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)

    def autocast(self):
        if self._dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self._dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self, step: int) -> dict:
        """Apply the accumulated gradients as optimizer step `step` (1-based).

        Returns the learning rate used and the pre-clip gradient norm (a device tensor: reading
        it is the caller's choice, and costs a sync).
        """
        lr = learning_rate(step, self.cfg.lr, self.cfg.warmup_steps, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if self.cfg.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
        else:
            grad_norm = torch.nn.utils.get_total_norm(
                [p.grad for p in params if p.grad is not None]
            )
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"lr": lr, "grad_norm": grad_norm}

    def state_dict(self) -> dict:
        state = {"optimizer": self.optimizer.state_dict()}
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state
