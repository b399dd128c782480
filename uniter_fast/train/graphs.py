"""The micro-step (forward and backward of one micro-batch) captured in a CUDA graph, replayed.

Why: the fast step issues about 6,700 kernels (base) to 8,600 (large) per optimizer step, and
the host needs longer to issue them than the GPU needs to run them (benchmarks/NOTES.md, "Is the
fast step host-bound?"). A CUDA graph issues a whole captured micro-step with one call. A graph
fixes every kernel, shape and address, so it replays only for batches padded to one
`StaticShape` (`uniter_fast.data.static`); each (task, shape) is captured once, on first use.

    step = TorchStep(model, optim, total_steps=..., device="cuda", graphs="capture")
    for task, batch in micro_batches:              # batches from pad_static(...), pinned
        out = step.micro(batch, task)              # copy in, replay; eager if not padded
    step.step()

How the gradients stay right:

- Every parameter's gradient lives in one persistent buffer (`buffers`), attached as `.grad`.
  A micro-step adds its gradients into the buffers (`torch._foreach_add_` of
  `torch.autograd.grad`'s results, so it is the same code captured or not) for the parameters
  its task reaches, which the first (warm-up) run of each task learns.
- Before the optimizer runs, parameters no micro-batch of the step reached get `.grad = None`,
  so AdamW skips them exactly as in eager training (a zero gradient would still move them
  through the moments); after it, the buffers that were used are zeroed in place and attached
  again, so the captured addresses stay valid.
- Dropout draws fresh numbers on every replay (PyTorch registers the CUDA generator with the
  graph and advances its offset per replay).

Memory: all graphs share one memory pool, so the captured micro-steps together hold about one
micro-step's activations, not one per graph. That is safe because replays run one at a time on
one stream and a replay's outputs are copied out before the next replay (`run`).

`capture="eager"` runs the same bookkeeping, buffers and static copies without capturing, on
any device: what the CPU tests hold to plain eager training.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from dataclasses import dataclass

import torch

from ..data.static import static_key

logger = logging.getLogger("uniter_fast.train")

GRAPH_MODES = ("off", "capture", "eager")


@dataclass
class _Captured:
    """One (task, shape): its static inputs, the parameters it reaches, its graph and outputs."""

    inputs: dict[str, torch.Tensor]
    batch: object  # the Batch over `inputs`
    params: tuple[int, ...]
    graph: torch.cuda.CUDAGraph | None = None
    outputs: dict[str, torch.Tensor] | None = None

    def load(self, batch) -> None:
        for name, src in batch.tensors().items():
            self.inputs[name].copy_(src, non_blocking=True)


class GraphedMicroSteps:
    """Forward and backward of padded micro-batches, per (task, shape) captured and replayed.

    step: the `TorchStep` whose model, autocast and parameters are used. mode: "capture" (CUDA
    graphs) or "eager" (the same buffers and bookkeeping, not captured). warmup: eager runs of a
    new (task, shape) before its capture (the kernels compile, libraries pick their
    algorithms). `stats` counts replays, captures and eager micro-steps with their reasons.
    """

    def __init__(self, step, *, mode: str = "capture", warmup: int = 2):
        if mode not in ("capture", "eager"):
            raise ValueError(f"GraphedMicroSteps mode must be 'capture' or 'eager', got {mode!r}")
        if mode == "capture" and step.device.type != "cuda":
            raise ValueError(
                f"CUDA graphs need a CUDA device, got {step.device}; graphs='eager' runs the same "
                "static-shape step without capture"
            )
        if warmup < 1:
            raise ValueError(f"warmup must be at least 1, got {warmup}")
        self.step = step
        self.mode = mode
        self.warmup = warmup
        self.params = step.params
        with torch.no_grad():
            self.buffers = [torch.zeros_like(p) for p in self.params]
        self._attach()
        self.touched: set[int] = set()  # parameters given a gradient since the last step
        self._captured: dict[tuple, _Captured] = {}
        self._task_params: dict[str, tuple[int, ...]] = {}
        self.pool = torch.cuda.graph_pool_handle() if mode == "capture" else None
        self.stats = {"replays": 0, "captures": 0, "eager": 0, "eager_reasons": Counter()}

    # --- the optimizer's side -------------------------------------------------------------

    def _attach(self) -> None:
        for p, buf in zip(self.params, self.buffers, strict=True):
            p.grad = buf

    def before_optimizer(self) -> None:
        """Parameters that no micro-batch reached since the last step get no gradient."""
        for i, p in enumerate(self.params):
            if i not in self.touched:
                p.grad = None

    def after_optimizer(self) -> None:
        """Zero the used buffers in place and attach every buffer again."""
        used = [self.buffers[i] for i in sorted(self.touched)]
        if used:
            torch._foreach_zero_(used)
        self.touched.clear()
        self._attach()

    # --- micro-steps ------------------------------------------------------------------------

    def _accumulate(self, loss: torch.Tensor, indices: tuple[int, ...] | None) -> tuple[int, ...]:
        """Add d loss / d params into the buffers (all parameters the loss reaches when
        `indices` is None); returns the indices that got a gradient."""
        chosen = range(len(self.params)) if indices is None else indices
        grads = torch.autograd.grad(
            loss, [self.params[i] for i in chosen], allow_unused=indices is None
        )
        pairs = [(i, g) for i, g in zip(chosen, grads, strict=True) if g is not None]
        if pairs:
            torch._foreach_add_([self.buffers[i] for i, _ in pairs], [g for _, g in pairs])
        return tuple(i for i, _ in pairs)

    def backward_eager(self, loss: torch.Tensor) -> None:
        """The eager backward of a micro-batch in this mode (`TorchStep.backward`)."""
        self.touched.update(self._accumulate(loss, None))

    def _eager(self, batch, task: str, reason: str) -> dict:
        self.stats["eager"] += 1
        if not self.stats["eager_reasons"][reason]:
            logger.info("micro-step runs eagerly: %s", reason)
        self.stats["eager_reasons"][reason] += 1
        out = self.step.forward(batch, task)
        self.backward_eager(out["loss"])
        return {k: v.detach() if torch.is_tensor(v) else v for k, v in out.items()}

    def run(self, batch, task: str) -> dict:
        """Forward and backward of one micro-batch; returns its losses (detached copies).

        A batch padded by `pad_static` (on the host or the device) replays its (task, shape)'s
        graph, captured on first use; any other batch, or a model in eval mode, runs eagerly."""
        if batch.padding is None:
            return self._eager(batch, task, "the batch is not padded to a static shape")
        if not self.step.model.training:
            return self._eager(batch, task, "the model is in eval mode (graphs are for training)")
        key = static_key(batch, task)
        captured = self._captured.get(key)
        if captured is None:
            captured = self._capture(batch, task, key)
        else:
            captured.load(batch)
        if self.mode == "eager":
            out = self.step.forward(captured.batch, task)
            self._accumulate(out["loss"], captured.params)
            outputs = {k: v.detach() for k, v in out.items() if torch.is_tensor(v)}
        else:
            captured.graph.replay()
            self.stats["replays"] += 1
            # Copied out now: the next replay of any graph may reuse the pool's memory.
            outputs = {k: v.clone() for k, v in captured.outputs.items()}
        self.touched.update(captured.params)
        return outputs

    def prepare(self, batch, task: str) -> bool:
        """Capture `batch`'s (task, shape) now, without running it (no gradient changes): so that
        no timed step pays for a capture. False when the batch would run eagerly."""
        if batch.padding is None or not self.step.model.training:
            return False
        key = static_key(batch, task)
        if key not in self._captured:
            self._capture(batch, task, key)
        return True

    def _capture(self, batch, task: str, key: tuple) -> _Captured:
        device = self.step.device
        inputs = {
            name: t.to(device, copy=True, non_blocking=True) for name, t in batch.tensors().items()
        }
        static_batch = dataclasses.replace(batch, **inputs)
        params = self._task_params.get(task)
        if self.mode == "eager":
            if params is None:
                params = self._discover(static_batch, task)
            captured = _Captured(inputs=inputs, batch=static_batch, params=params)
            self._captured[key] = captured
            return captured

        # Warm-up on a side stream (as torch.cuda.graph asks): kernels compile, cuBLAS and
        # flash-attn set up, and the first run learns which parameters the task reaches.
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                found = self._discover(static_batch, task)
                params = params or found
        torch.cuda.current_stream(device).wait_stream(side)

        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self.step.forward(static_batch, task)
            self._accumulate(out["loss"], params)
            outputs = {k: v.detach() for k, v in out.items() if torch.is_tensor(v)}
        del out
        self.stats["captures"] += 1
        shape = batch.padding.shape
        logger.info(
            "captured the %s micro-step for static shape %s (%d graphs)",
            task,
            shape.describe(),
            len(self._captured) + 1,
        )
        captured = _Captured(
            inputs=inputs, batch=static_batch, params=params, graph=graph, outputs=outputs
        )
        self._captured[key] = captured
        return captured

    def _discover(self, batch, task: str) -> tuple[int, ...]:
        """Run forward and backward without touching the buffers; the parameters reached."""
        out = self.step.forward(batch, task)
        grads = torch.autograd.grad(out["loss"], self.params, allow_unused=True)
        params = tuple(i for i, g in enumerate(grads) if g is not None)
        self._task_params.setdefault(task, params)
        return params

    def describe(self) -> dict:
        """Counts for the logs and the benchmarks' JSON."""
        return {
            "mode": self.mode,
            "graphs": len(self._captured),
            "replays": self.stats["replays"],
            "captures": self.stats["captures"],
            "eager": self.stats["eager"],
            "eager_reasons": dict(self.stats["eager_reasons"]),
        }


__all__ = ["GRAPH_MODES", "GraphedMicroSteps"]
