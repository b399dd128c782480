"""Is the fast step host-bound? Kernels per optimizer step, and the host's time to issue them.

    python benchmarks/host_overhead.py                 # base and large at the recipes' budgets
    python benchmarks/host_overhead.py --quick         # a smoke run: 2 layers, small budget

Runs on the CPU. The `fast` step of `bench_e2e.py` (packed batches, the fused kernels, fused
AdamW, the recipe's micro-batches per step and task mix) is built at the real model's depth,
head count, vocabulary and token budget, but with tiny widths (hidden = 4 x heads), so the
arithmetic all but disappears and what is left is the host's work: Python, the dispatcher, the
autograd engine, the allocator, our launchers.

- Kernels per step: every ATen call that launches device work (a TorchDispatchMode counter over
  the real step; views, metadata and allocation-only ops are not counted) plus every Triton
  launch (counted at the JIT). The Triton kernels run with `kernels="triton"` in the interpreter
  while counting, so the op sequence is the GPU's, except attention, which takes the CPU's
  padded SDPA path (the GPU's varlen / flash call is one kernel per layer and direction too).
- Host time per step: the same step, timed, with the Triton launches replaced by no-ops (the
  interpreter would otherwise time its own emulation); the launchers' own work (checks,
  allocations) stays in.

- With CUDA graphs (`fast_graphs`, `TorchStep(graphs="capture")`): what the host still issues
  per step. Per micro-batch: one copy into the graph's static inputs per tensor field of the
  padded batch, one replay, one copy out per loss output; per step: the optimizer (clipping,
  fused AdamW, the gradient buffers' hand-over). The ops are counted the same way (the step run
  with graphs="eager", which issues exactly these ops around the captured part) and the host time
  is that of the optimizer measured here plus the copies at the eager step's time per kernel;
  the replay call itself (microseconds) is not in it.

The predicted GPU time per step (useful FLOPs over the MFU NOTES.md predicts, at the H200's
measured bf16 rate) is printed beside it: the step is host-bound when the host needs more than
half of it. The CPU here is not the GPU machine's host (16 cores there), so the host time is an
estimate of the right order, not a measurement of that host.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # counting runs the kernels' real launchers
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_e2e as e2e  # noqa: E402
import torch  # noqa: E402
from common import command_line, environment, save_result  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from workload import train_flops  # noqa: E402

from uniter_fast.config import OptimConfig, UniterConfig  # noqa: E402
from uniter_fast.data.static import StaticShape, pad_static  # noqa: E402
from uniter_fast.train.step import TorchStep  # noqa: E402

# ATen ops that launch no device work: views, metadata, allocation without a fill.
NO_KERNEL = {
    "view",
    "_unsafe_view",
    "t",
    "transpose",
    "permute",
    "expand",
    "slice",
    "select",
    "as_strided",
    "detach",
    "alias",
    "unsqueeze",
    "squeeze",
    "reshape",
    "split",
    "split_with_sizes",
    "unbind",
    "narrow",
    "empty",
    "empty_strided",
    "empty_like",
    "new_empty",
    "new_empty_strided",
    "lift_fresh",
    "_reshape_alias",
    "unfold",
    "diagonal",
    "numpy_T",
    "view_as",
    "chunk",
    "set_",
    "resize_",
    "is_same_size",
    "_to_copy_noop",
    "sym_size",
    "sym_stride",
    "sym_numel",
    "sym_storage_offset",
    "_local_scalar_dense",
    "item",
}
# Predicted MFU (NOTES.md, "End to end", prediction) and the H200's measured bf16 rate
# (790 TFLOP/s, device KINDS.md).
PREDICTED_MFU = {"base": 0.40, "large": 0.45, "tiny": 0.40}
PEAK_TFLOPS = 790.0


class CountKernels(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in NO_KERNEL:
            self.ops[name] = self.ops.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


class TritonLaunches:
    """Counts Triton launches; with `skip`, launches nothing (host timing)."""

    def __init__(self, skip: bool):
        self.skip, self.count = skip, 0

    def __enter__(self):
        import triton.runtime.interpreter as interp

        self._cls = interp.InterpretedFunction
        self._orig = self._cls.run

        def run(fn_self, *args, **kwargs):
            self.count += 1
            if self.skip:
                return None
            return self._orig(fn_self, *args, **kwargs)

        self._cls.run = run
        return self

    def __exit__(self, *exc):
        self._cls.run = self._orig


def tiny_width(config: UniterConfig) -> UniterConfig:
    heads = config.num_attention_heads
    return UniterConfig(
        **{**config.__dict__, "hidden_size": 4 * heads, "intermediate_size": 16 * heads}
    )


def _batches(provider, tokens: int, count: int, seed: int) -> tuple[dict, dict]:
    pairs, negatives = e2e.make_pairs(e2e.pairs_needed(count, tokens), 1, seed)
    examples = {
        t: e2e.fill_task_batches(
            t, pairs, negatives, count=count, tokens_per_batch=tokens, order="random", seed=seed
        )
        for t in e2e.DEFAULT_MIX
    }
    return examples, {t: [provider.collate(ex, t) for ex in examples[t]] for t in examples}


def _count(provider, plan, host) -> tuple[CountKernels, int]:
    counter = CountKernels()
    with TritonLaunches(skip=False) as launches, counter:
        e2e.run_steps(provider, plan, {"fast": host}, None)
    return counter, launches.count


def _graphed_host(provider, config, optim, plan, host, steps: int) -> dict:
    """Ops the host issues per step with the micro-steps in CUDA graphs, and the optimizer's
    host time (module docstring): the same model and batches, padded, graphs="eager"."""
    step = TorchStep(
        provider.model, optim, total_steps=10**6, device="cpu", precision="fp32", graphs="eager"
    )
    shape = StaticShape.covering(b for batches in host.values() for b in batches)
    padded = {t: [pad_static(b, shape) for b in bs] for t, bs in host.items()}
    copies, times, optimizer_ops = 0, [], 0
    with TritonLaunches(skip=True):
        for k in range(steps + 1):
            for task, i in plan[0]:
                batch = padded[task][i]
                out = step.micro(batch, task)
                if k == 0:
                    copies += len(batch.tensors()) + len(out)
            counter = CountKernels()
            t0 = time.perf_counter()
            with counter:
                step.step()
            if k:
                times.append(time.perf_counter() - t0)
            optimizer_ops = sum(counter.ops.values())
    return {
        "static_shape": dataclasses.asdict(shape),
        "replays_per_step": len(plan[0]),
        "copies_per_step": copies,
        "optimizer_ops_per_step": optimizer_ops,
        "kernels_per_step": copies + optimizer_ops,
        "optimizer_host_ms": 1000 * sorted(times)[len(times) // 2],
    }


def measure_model(name: str, args) -> dict:
    real = UniterConfig.from_json(e2e.REPO_ROOT / e2e.MODELS[name])
    s = e2e.parse_args(["--device", "cpu", "--models", name, "--providers", "fast"])
    tokens, accum = e2e.recipe_budget(name, s)
    config = tiny_width(real)
    if args.quick:
        config = UniterConfig(**{**config.__dict__, "num_hidden_layers": 2})
        tokens, accum = 1024, 2
    s = dataclasses.replace(s, tokens_per_batch=tokens, grad_accum=accum)
    optim = OptimConfig(lr=5e-5, warmup_steps=10, grad_accum=accum)
    torch.manual_seed(0)
    weights = e2e.uf.UniterForPretraining(config).state_dict()
    provider = e2e._make_ours("fast", "triton", "auto")(config, optim, s, weights)
    # The recipe's mix: the micro-batches of one step in the mixer's order.
    mixer = e2e.TaskMixer.from_recipe({"coco": e2e.DEFAULT_MIX}, seed=0)
    seq = [mixer.sample()[1] for _ in range(accum * (args.steps + 2))]
    plan, _ = e2e.build_plan(seq, 1, accum, 2, 0)
    # Kernels per step at the recipe's budget, the Triton kernels interpreted.
    examples, host = _batches(provider, tokens, 2, 0)
    counter, triton_count = _count(provider, plan, host)
    kernels = sum(counter.ops.values()) + triton_count
    # The host's time: the same op sequence on a few pairs per micro-batch (packed batches run
    # the same ops whatever their size), so that even the CPU's arithmetic is negligible, with
    # the Triton launches skipped.
    _, small = _batches(provider, args.host_tokens, 2, 1)
    small_counter, small_triton = _count(provider, plan, small)
    times = []
    with TritonLaunches(skip=True):
        for k in range(args.steps + 1):
            plan_k, _ = e2e.build_plan(seq, 1, accum, 2, k * accum)
            t0 = time.perf_counter()
            e2e.run_steps(provider, plan_k, {"fast": small}, None)
            if k:  # the first is a warm-up
                times.append(time.perf_counter() - t0)
    host_ms = 1000 * sorted(times)[len(times) // 2]
    if args.profile:
        with TritonLaunches(skip=True), torch.profiler.profile() as prof:
            e2e.run_steps(provider, plan, {"fast": small}, None)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    graphed = _graphed_host(provider, config, optim, plan, small, args.steps)
    # Predicted GPU time of the real-width step at the recipe's budget.
    shapes = {t: [e2e.BatchShape.of(b, t) for b in examples[t]] for t in examples}
    flops_step = sum(train_flops(real, shapes[t][i], t) for t, i in plan[0])
    gpu_ms = flops_step / (PREDICTED_MFU.get(name, 0.4) * PEAK_TFLOPS * 1e12) * 1e3
    small_kernels = sum(small_counter.ops.values()) + small_triton
    return {
        "model": name,
        "layers": config.num_hidden_layers,
        "heads": config.num_attention_heads,
        "tiny_hidden": config.hidden_size,
        "tokens_per_batch": tokens,
        "grad_accum": accum,
        "step_tasks": [t for t, _ in plan[0]],
        "kernels_per_step": kernels,
        "aten_kernels_per_step": sum(counter.ops.values()),
        "triton_launches_per_step": triton_count,
        "top_ops": dict(sorted(counter.ops.items(), key=lambda kv: -kv[1])[:15]),
        "host_tokens_per_batch": args.host_tokens,
        "host_step_kernels": small_kernels,
        "host_ms_per_step": host_ms,
        "host_us_per_kernel": 1000 * host_ms / small_kernels,
        "useful_flops_per_step": flops_step,
        "predicted_gpu_ms_per_step": gpu_ms,
        "host_over_gpu": host_ms / gpu_ms,
        "host_bound": host_ms > gpu_ms / 2,
        "graphed": {
            **graphed,
            "host_ms_per_step": graphed["optimizer_host_ms"]
            + graphed["copies_per_step"] * host_ms / small_kernels,
        },
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["base", "large"], choices=["base", "large"])
    p.add_argument("--steps", type=int, default=3, help="timed steps (median)")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 layers, 1024 tokens x 2")
    p.add_argument(
        "--host-tokens",
        type=int,
        default=160,
        help="real tokens per micro-batch of the host-time run (default 160)",
    )
    p.add_argument("--profile", action="store_true", help="print the host's top ops per step")
    p.add_argument("--out", type=Path, help="result file or folder (default: runs/bench/)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for name in args.models:
        r = measure_model(name, args)
        rows.append(r)
        print(
            f"{name}: {r['layers']} layers, {r['tokens_per_batch']} tokens x {r['grad_accum']}: "
            f"{r['kernels_per_step']} kernels per step ({r['triton_launches_per_step']} Triton), "
            f"host {r['host_ms_per_step']:.0f} ms ({r['host_us_per_kernel']:.1f} us per kernel) "
            f"vs predicted GPU {r['predicted_gpu_ms_per_step']:.0f} ms: "
            f"{'HOST-BOUND' if r['host_bound'] else 'not host-bound'} "
            f"(host/GPU {r['host_over_gpu']:.2f})"
        )
        g = r["graphed"]
        print(
            f"  with CUDA graphs: {g['replays_per_step']} replays + {g['kernels_per_step']} "
            f"kernels per step ({g['copies_per_step']} copies in and out, "
            f"{g['optimizer_ops_per_step']} optimizer), host about {g['host_ms_per_step']:.1f} ms"
        )
    payload = {
        "benchmark": "host_overhead",
        "command": command_line(),
        "environment": environment("cpu"),
        "quick": args.quick,
        "predicted_mfu": PREDICTED_MFU,
        "peak_tflops": PEAK_TFLOPS,
        "models": rows,
    }
    path = save_result("host_overhead", payload, args.out)
    print(f"host_overhead: wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
