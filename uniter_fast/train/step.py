"""A training step in plain PyTorch, with nothing in it that waits for the host: `TorchStep`.

The trainer steps through DeepSpeed (`engine.py`), which is what scales across ranks. This is
the same optimisation on one device without it: what the step itself costs, the form that
`forbid_host_sync` holds to the rule (tests/test_step.py), and the step of every provider in
`benchmarks/bench_e2e.py`. The maths is the engine's: the reference's AdamW with its no-decay
rule and warm-up then linear decay (`Schedule`), micro-batch gradients summed, the sum clipped
by its global norm.

    step = TorchStep(model, OptimConfig(...), total_steps=..., device=device, precision="bf16")
    for task, batch in micro_batches:          # optim.grad_accum of them
        out = step.forward(batch, task)        # under autocast
        step.backward(out["loss"])
    step.step()                                # clip, AdamW, schedule, gradients to None

What keeps it sync-free on CUDA: bf16 autocast (no loss scaler, whose inf check reads a device
flag on the host); `clip_grad_norm_` with foreach, which scales by `min(1, clip / norm)` on the
device instead of asking whether the norm exceeds the threshold; fused AdamW, whose step
counters live on the device; the learning rate is a host float computed from the step count.
The norm comes back as a device tensor; reading it is the caller's choice (and a sync).

`graphs="capture"` replays the micro-steps of batches padded to a static shape from CUDA graphs
(`uniter_fast.train.graphs`), so the host issues one call per micro-batch instead of a thousand
kernels; `step.micro(batch, task)` then runs forward and backward together:

    step = TorchStep(model, cfg, total_steps=..., device="cuda", graphs="capture")
    for task, batch in micro_batches:          # pad_static(...) batches
        out = step.micro(batch, task)
    step.step()
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn

from ..config import OptimConfig
from .engine import Schedule, param_groups
from .graphs import GRAPH_MODES, GraphedMicroSteps

STEP_PRECISIONS = ("bf16", "fp32")


class TorchStep:
    """One model, its AdamW and schedule, stepped in plain PyTorch.

    forward_fn(model, batch, task) -> dict with "loss": how the model is called (default
    `model(batch, task)`). precision: "bf16" (autocast; the weights and the optimizer stay
    fp32) or "fp32". fused / foreach: the AdamW and clip implementations; None picks fused
    AdamW and foreach clipping on CUDA, foreach elsewhere. False for both gives the
    reference's per-parameter loops (the authors' step in the benchmarks). graphs: "off",
    "capture" (CUDA graphs for padded batches, CUDA only) or "eager" (the same static-shape
    bookkeeping without capture, any device); see `uniter_fast.train.graphs`.
    """

    def __init__(
        self,
        model: nn.Module,
        cfg: OptimConfig,
        *,
        total_steps: int,
        device: torch.device | str,
        precision: str = "bf16",
        fused: bool | None = None,
        foreach: bool | None = None,
        forward_fn: Callable[[nn.Module, object, str], dict] | None = None,
        graphs: str = "off",
    ):
        if precision not in STEP_PRECISIONS:
            raise ValueError(f"precision must be one of {STEP_PRECISIONS}, got {precision!r}")
        self.device = torch.device(device)
        if precision == "bf16" and self.device.type != "cuda":
            raise ValueError(f"precision bf16 (autocast) needs a CUDA device, got {self.device}")
        cuda = self.device.type == "cuda"
        self.fused = cuda if fused is None else fused
        self.foreach = (not self.fused) if foreach is None else foreach
        if self.fused and self.foreach:
            raise ValueError("AdamW takes fused or foreach, not both")
        self.model = model
        self.cfg = cfg
        self.precision = precision
        self.forward_fn = forward_fn or (lambda m, batch, task: m(batch, task))
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            param_groups(model, cfg.weight_decay),
            lr=cfg.lr,
            betas=cfg.betas,
            eps=cfg.eps,
            fused=self.fused,
            foreach=self.foreach,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, Schedule(cfg, total_steps)
        )
        self.steps = 0
        if graphs not in GRAPH_MODES:
            raise ValueError(f"graphs must be one of {GRAPH_MODES}, got {graphs!r}")
        self.graphs = None if graphs == "off" else GraphedMicroSteps(self, mode=graphs)

    def autocast(self):
        if self.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def forward(self, batch, task: str) -> dict:
        with self.autocast():
            return self.forward_fn(self.model, batch, task)

    def backward(self, loss: torch.Tensor) -> None:
        """Gradients of the step's micro-batches add up (summed, as the reference sums them)."""
        if self.graphs is not None:
            self.graphs.backward_eager(loss)
        else:
            loss.backward()

    def micro(self, batch, task: str) -> dict:
        """Forward and backward of one micro-batch; returns the forward's dict (with graphs,
        detached copies of its tensors)."""
        if self.graphs is not None:
            return self.graphs.run(batch, task)
        out = self.forward(batch, task)
        self.backward(out["loss"])
        return out

    def step(self) -> tuple[float, torch.Tensor]:
        """Clip the summed gradient, step AdamW at the scheduled lr, drop the gradients.

        Returns (the lr used, the gradient norm before clipping as a device tensor)."""
        lr = self.optimizer.param_groups[0]["lr"]
        if self.graphs is not None:
            self.graphs.before_optimizer()
        norm = torch.nn.utils.clip_grad_norm_(
            self.params, self.cfg.grad_clip, foreach=self.foreach or self.fused
        )
        self.optimizer.step()
        self.scheduler.step()
        if self.graphs is not None:
            self.graphs.after_optimizer()
        else:
            self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        return lr, norm

    def state_bytes(self) -> int:
        """Bytes of the weights and the optimizer state (gradients come and go with a step)."""
        total = sum(p.numel() * p.element_size() for p in self.model.parameters())
        for state in self.optimizer.state.values():
            total += sum(t.numel() * t.element_size() for t in state.values() if torch.is_tensor(t))
        return total


__all__ = ["STEP_PRECISIONS", "TorchStep"]
