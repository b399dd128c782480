"""What does the packed, sync-free step buy over the authors' padded step, per task?

    python benchmarks/bench_packed_vs_padded.py                    # CUDA if present, else CPU
    python benchmarks/bench_packed_vs_padded.py --device cpu --tasks mlm itm
    python benchmarks/bench_packed_vs_padded.py --quick            # a smoke run, tiny sizes
    python benchmarks/bench_packed_vs_padded.py --plan-only        # batch shapes and FLOPs only
    python benchmarks/plot_packed_vs_padded.py benchmarks/results/packed_vs_padded-*.json

Providers, on the same weights and the same examples:

- `packed`: `uniter_fast.UniterForPretraining` on `uniter_fast.data.collate` (a flat buffer of
  real positions; every index prepared by the collator; no host sync in the step);
- `authors`: `uniter_fast.authors`, the authors' step re-implemented (padded text and region
  tensors, `gather_index`, an additive attention mask, boolean-mask target selection, the WRA
  scatter into a padded copy), loaded with `export_reference(packed)`.

Examples are realistic UNITER pairs: synthetic images (10..100 regions, mean about 37) with
captions of 8..60 tokens (mean about 15, [CLS]/[SEP] added) from `uniter_fast.data.synthetic`,
turned into task examples by `uniter_fast.tasks.build_example` (ITM: half the images swapped for
negatives; WRA/IPOT with 50 iterations in both providers). Batches are filled in order up to a
real-token budget (text tokens + regions), either in random order (`--order random`, the default:
no length bucketing) or sorted by length within a pool of 8192 pairs and then shuffled, as the
authors' `TokenBucketSampler` does (`--order bucketed`).

Per task: a loss check first (eval mode, fp32, both providers within rtol 1e-4; the run stops
if they disagree), then (a) collate alone (CPU), (b) forward and (c) forward+backward (training
mode: dropout on, autograd recording; no optimizer step), each provider cycling over the same
`--batches` batches, the providers' calls interleaved (call i of each, one after the other, on
the same batch) so that a busy spell of a shared machine lands on both alike. Reported: ms per
step, real tokens/s, the padded positions the authors' encoder computes on (B x max_len) and the
padding fraction, bytes saved for backward, peak memory (each provider alone). Results go to
`runs/bench/packed_vs_padded-<device>-<UTC time>.json`;
`--out benchmarks/results/` for the figures the project commits.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from common import (
    command_line,
    cpu_peak_rss,
    environment,
    measure_interleaved,
    peak_memory,
    save_result,
    saved_tensor_bytes,
)
from workload import (
    BUCKET_PAIRS,
    MAX_EXAMPLE_TOKENS,
    BatchShape,
    encoder_matmul_params,
    fill_task_batches,
    make_pairs,
    pairs_needed,
    shape_summary,
)

import uniter_fast as uf
from uniter_fast.authors import collate as authors_collate
from uniter_fast.authors import model as authors_model
from uniter_fast.config import UniterConfig
from uniter_fast.data.schema import TASKS

NAME = "packed_vs_padded"
QUESTION = (
    "What does the packed, sync-free step buy over the authors' padded step, per task, at "
    "realistic UNITER lengths?"
)
DEFAULT_TASKS = ("mlm", "mrfr", "mrckl", "itm")
PROVIDERS = ("packed", "authors")
LOSS_RTOL, LOSS_ATOL = 1e-4, 1e-6
WRA_ITERATIONS = 50  # the authors' optimal_transport_dist default, and ours


# --- settings -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """The resolved command line.

    device: where the steps run (collation always runs on the CPU).
    model_config: architecture JSON; model_config_source: how it was chosen (flag or default).
    tokens_per_batch: real tokens (text + regions) per batch, at most.
    dtype: "fp32", or "bf16" (autocast, CUDA only); the loss check is fp32 either way.
    iters, warmup: timed and untimed calls per measurement.
    batches: distinct batches per task, cycled over the calls.
    tasks: the pretraining tasks to time; order: "random" or "bucketed" (see the module doc).
    seed: seeds the examples, the batch order and the weights.
    """

    device: torch.device
    model_config: Path
    model_config_source: str
    tokens_per_batch: int
    dtype: str
    iters: int
    warmup: int
    batches: int
    tasks: tuple[str, ...]
    order: str
    seed: int
    quick: bool
    plan_only: bool
    out: Path | None

    def __post_init__(self) -> None:
        if self.tokens_per_batch < MAX_EXAMPLE_TOKENS:
            raise ValueError(
                f"--tokens-per-batch must be at least {MAX_EXAMPLE_TOKENS} (the longest "
                f"example), got {self.tokens_per_batch}"
            )
        for name in ("iters", "batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ValueError(f"--warmup must be non-negative, got {self.warmup}")
        if self.dtype == "bf16" and self.device.type != "cuda":
            raise ValueError(f"--dtype bf16 needs a CUDA device (autocast), got {self.device}")
        if self.seed < 0:
            raise ValueError(f"--seed must be non-negative, got {self.seed}")


def parse_args(argv: list[str] | None = None) -> Settings:
    p = argparse.ArgumentParser(description=QUESTION)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--model-config",
        help="default: configs/model/uniter-base.json on CUDA, configs/model/uniter-tiny.json on "
        "the CPU (base is slow there)",
    )
    p.add_argument(
        "--tokens-per-batch", type=int, help="real-token budget; default 8192 on CUDA, 2048 on CPU"
    )
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--iters", type=int, help="timed calls; default 20 on CUDA, 10 on CPU")
    p.add_argument("--warmup", type=int, help="untimed calls first; default 5 on CUDA, 2 on CPU")
    p.add_argument("--batches", type=int, help="distinct batches cycled per task; default 4")
    p.add_argument("--tasks", nargs="+", choices=TASKS, default=list(DEFAULT_TASKS))
    p.add_argument("--order", choices=("random", "bucketed"), default="random")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 512 tokens per batch, 1 batch, 2 iterations after 1 warm-up "
        "(explicit flags still win)",
    )
    p.add_argument(
        "--plan-only", action="store_true", help="print batch shapes and FLOPs; time nothing"
    )
    p.add_argument("--out", type=Path, help="result file or folder (default: runs/bench/)")
    a = p.parse_args(argv)

    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available")
    cuda = device.type == "cuda"
    if a.model_config:
        model_config, source = a.model_config, "--model-config"
    else:
        model_config = (
            "configs/model/uniter-base.json" if cuda else "configs/model/uniter-tiny.json"
        )
        source = f"default for {device.type}"

    def pick(given, quick, on_cuda, on_cpu):
        if given is not None:
            return given
        if a.quick:
            return quick
        return on_cuda if cuda else on_cpu

    try:
        return Settings(
            device=device,
            model_config=Path(model_config),
            model_config_source=source,
            tokens_per_batch=pick(a.tokens_per_batch, 512, 8192, 2048),
            dtype=a.dtype,
            iters=pick(a.iters, 2, 20, 10),
            warmup=pick(a.warmup, 1, 5, 2),
            batches=pick(a.batches, 1, 4, 4),
            tasks=tuple(dict.fromkeys(a.tasks)),
            order=a.order,
            seed=a.seed,
            quick=a.quick,
            plan_only=a.plan_only,
            out=a.out,
        )
    except ValueError as e:
        p.error(str(e))


# --- examples and batches: workload.py -----------------------------------------------------


def build_task_batches(task: str, pairs, negatives, s: Settings) -> list[list[dict]]:
    """`s.batches` lists of examples of `task`, each within `s.tokens_per_batch` real tokens."""
    return fill_task_batches(
        task,
        pairs,
        negatives,
        count=s.batches,
        tokens_per_batch=s.tokens_per_batch,
        order=s.order,
        seed=s.seed,
    )


# --- providers ----------------------------------------------------------------------------------


def _tensor_bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, uf.Batch):
        return sum(_tensor_bytes(t) for t in obj.tensors().values())
    return 0


@dataclass
class Provider:
    """One way of running a UNITER step: its collate, its device transfer and its loss dict."""

    name: str
    model: torch.nn.Module
    collate: Callable[[list[dict], str], object]
    to_device: Callable[[object, torch.device], object]
    losses: Callable[[object, str], dict]


def make_providers(config: UniterConfig, device: torch.device, seed: int) -> dict[str, Provider]:
    torch.manual_seed(seed)
    ours = uf.UniterForPretraining(config)
    theirs = authors_model.UniterForPretraining(config)
    theirs.load_state_dict(uf.export_reference(ours), strict=True)
    if ours.wra_iterations != WRA_ITERATIONS:
        raise ValueError(f"packed model runs {ours.wra_iterations} IPOT iterations, not 50")
    ours.to(device)
    theirs.to(device)

    def ours_losses(batch, task):
        return ours(batch, task)

    def theirs_losses(batch, task):
        return authors_model.reduce_losses(task, theirs(batch, task))

    def ours_to(batch, dev):
        return batch.to(dev)

    return {
        "packed": Provider("packed", ours, uf.data.collate, ours_to, ours_losses),
        "authors": Provider(
            "authors", theirs, authors_collate.collate, authors_collate.batch_to, theirs_losses
        ),
    }


def check_losses(providers: dict[str, Provider], examples: list[dict], task: str, device) -> dict:
    """Both providers' losses on one batch, eval mode, fp32; raises if any part disagrees."""
    values = {}
    for name, p in providers.items():
        p.model.eval()
        with torch.no_grad():
            out = p.losses(p.to_device(p.collate(examples, task), device), task)
        values[name] = {k: float(v) for k, v in out.items() if isinstance(v, torch.Tensor)}
        p.model.train()
    report, bad = {}, []
    for key, want in values["authors"].items():
        got = values["packed"][key]
        diff = abs(got - want)
        ok = math.isfinite(got) and diff <= LOSS_ATOL + LOSS_RTOL * abs(want)
        report[key] = {
            "packed": got,
            "authors": want,
            "abs_diff": diff,
            "rel_diff": diff / abs(want) if want else None,
            "ok": ok,
        }
        if not ok:
            bad.append(f"{key}: packed {got!r} vs authors {want!r}")
    if bad:
        raise RuntimeError(
            f"{task}: the providers' losses disagree (rtol {LOSS_RTOL}, atol {LOSS_ATOL}, fp32, "
            f"eval mode): " + "; ".join(bad)
        )
    return {"rtol": LOSS_RTOL, "atol": LOSS_ATOL, "dtype": "fp32", "mode": "eval", **report}


# --- timing -------------------------------------------------------------------------------------


def _timing(m, tokens: list[int]) -> dict:
    """A Measurement as a dict, with real tokens/s: the median over calls of tokens_i / time_i."""
    k = len(tokens)
    rates = [tokens[i % k] / (t / 1e3) for i, t in enumerate(m.times_ms)]
    return {"tokens_per_s": statistics.median(rates), **m.to_dict()}


def _speedup(packed: dict, authors: dict, k: int) -> dict:
    """Authors' time over packed time, two ways that compare like with like.

    median_of_call_ratios: call i of both providers ran on the same batch, one right after the
    other. median_over_batches_of_min_ratio: per batch, the fastest authors' call over the
    fastest packed call (robust to slow spells when a batch is timed more than once).
    """
    a_times, p_times = authors["times_ms"], packed["times_ms"]
    ratios = [a / p for a, p in zip(a_times, p_times, strict=True)]
    per_batch = [min(a_times[j::k]) / min(p_times[j::k]) for j in range(min(k, len(p_times)))]
    return {
        "median_of_call_ratios": statistics.median(ratios),
        "median_over_batches_of_min_ratio": statistics.median(per_batch),
    }


def _autocast(dtype: str):
    if dtype == "bf16":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class _Step:
    """One provider's timed work on one task; call i uses batch i % len(batches)."""

    def __init__(self, provider: Provider, task: str, batches: list[list[dict]], s: Settings):
        self.provider = provider
        self.task = task
        self.batches = batches
        self.dtype = s.dtype
        self.on_device = [provider.to_device(provider.collate(b, task), s.device) for b in batches]

    def loss(self, i: int) -> torch.Tensor:
        with _autocast(self.dtype):
            out = self.provider.losses(self.on_device[i % len(self.on_device)], self.task)
        return out["loss"]

    def forward(self, i: int) -> None:
        self.loss(i)

    def forward_backward(self, i: int) -> None:
        self.loss(i).backward()

    def zero_grad(self, i: int = 0) -> None:
        self.provider.model.zero_grad(set_to_none=True)


class _CollateOnly:
    """Collate call i: the examples of batch i % len(batches) into the provider's host batch."""

    def __init__(self, provider: Provider, task: str, batches: list[list[dict]]):
        self.provider, self.task, self.batches = provider, task, batches

    def __call__(self, i: int):
        return self.provider.collate(self.batches[i % len(self.batches)], self.task)


def bench_task(task: str, providers, batches: list[list[dict]], s: Settings) -> dict:
    """Collate, forward and forward+backward of every provider, interleaved call by call."""
    tokens = [BatchShape.of(b).real_tokens for b in batches]
    results = {name: {} for name in providers}
    for name, p in providers.items():
        results[name]["batch_bytes_mean"] = statistics.mean(
            _tensor_bytes(p.collate(b, task)) for b in batches
        )
    collate = measure_interleaved(
        {name: _CollateOnly(p, task, batches) for name, p in providers.items()},
        device="cpu",
        warmup=s.warmup,
        iters=s.iters,
    )
    for name, m in collate.items():
        results[name]["collate"] = _timing(m, tokens)

    steps = {name: _Step(p, task, batches, s) for name, p in providers.items()}
    for p in providers.values():
        p.model.train()
    for name, step in steps.items():
        params = list(step.provider.model.parameters())
        results[name]["saved_for_backward_bytes"] = saved_tensor_bytes(
            lambda step=step: step.loss(0), exclude=params
        )
    forward = measure_interleaved(
        {name: step.forward for name, step in steps.items()},
        device=s.device,
        warmup=s.warmup,
        iters=s.iters,
    )
    forward_backward = measure_interleaved(
        {name: step.forward_backward for name, step in steps.items()},
        device=s.device,
        warmup=s.warmup,
        iters=s.iters,
        setups={name: step.zero_grad for name, step in steps.items()},
    )
    for name, step in steps.items():
        results[name]["forward"] = _timing(forward[name], tokens)
        results[name]["forward_backward"] = _timing(forward_backward[name], tokens)
        step.zero_grad()
        if s.device.type == "cuda":
            # Each provider alone, one call per kind: the interleaved calls shared one peak.
            for kind in ("forward", "forward_backward"):
                results[name][kind]["memory"] = peak_memory(
                    lambda step=step, kind=kind: getattr(step, kind)(0), device=s.device
                )
                step.zero_grad()
        else:
            # Peak RSS is process-wide: another call would not isolate a provider, only cost time.
            for kind in ("forward", "forward_backward"):
                results[name][kind]["memory"] = cpu_peak_rss()
    del steps

    speedup = {
        kind: _speedup(results["packed"][kind], results["authors"][kind], len(batches))
        for kind in ("collate", "forward", "forward_backward")
    }
    return {"providers": results, "speedup_authors_time_over_packed": speedup}


# --- report -------------------------------------------------------------------------------------


def _mib(n: float) -> str:
    return f"{n / 2**20:8.1f}"


def print_plan(task: str, summary: dict) -> None:
    print(
        f"{task:6s} pairs/batch {summary['pairs_per_batch_mean']:6.1f}  "
        f"real tokens/batch {summary['real_tokens_per_batch_mean']:7.0f}  "
        f"padding {summary['padding_fraction']:.3f} (text {summary['txt_padding_fraction']:.3f}, "
        f"regions {summary['img_padding_fraction']:.3f})  "
        f"FLOPs authors/real {summary['flops_ratio_authors_over_real']:.2f}"
    )


def print_task(task: str, summary: dict, result: dict, cuda: bool) -> None:
    print(
        f"\n{task}: {summary['pairs_per_batch_mean']:.1f} pairs, "
        f"{summary['real_tokens_per_batch_mean']:.0f} real tokens per batch; the authors' encoder "
        f"computes on {summary['padding_fraction']:.1%} padding"
    )
    # Peak memory per provider exists on CUDA only (on the CPU, RSS is process-wide).
    peak_header = f" {'f+b peak MiB':>12s}" if cuda else ""
    print(
        f"  {'provider':9s} {'collate ms':>10s} {'fwd ms':>9s} {'fwd+bwd ms':>10s} "
        f"{'fwd tok/s':>11s} {'f+b tok/s':>11s} {'saved MiB':>9s}{peak_header}"
    )
    for name in PROVIDERS:
        r = result["providers"][name]
        fb = r["forward_backward"]
        peak = f" {_mib(fb['memory']['peak_delta_bytes']):>12s}" if cuda else ""
        print(
            f"  {name:9s} {r['collate']['median_ms']:10.2f} {r['forward']['median_ms']:9.2f} "
            f"{fb['median_ms']:10.2f} {r['forward']['tokens_per_s']:11,.0f} "
            f"{fb['tokens_per_s']:11,.0f} {_mib(r['saved_for_backward_bytes']):>9s}{peak}"
        )
    sp = {
        k: v["median_of_call_ratios"] for k, v in result["speedup_authors_time_over_packed"].items()
    }
    print(
        f"  {'speed-up':9s} {sp['collate']:9.2f}x {sp['forward']:8.2f}x "
        f"{sp['forward_backward']:9.2f}x   (authors' time / packed time, median over calls)"
    )
    if not cuda:
        rss = result["providers"]["authors"]["forward_backward"]["memory"]["peak_rss_bytes"]
        print(f"  process peak RSS so far: {rss / 2**20:.0f} MiB (process-wide)")


def main(argv: list[str] | None = None) -> int:
    s = parse_args(argv)
    torch.manual_seed(s.seed)
    np.random.seed(s.seed)
    config = UniterConfig.from_json(s.model_config)
    # Enough pairs for the asked batches (the fill leaves at most one example's room unused per
    # batch), and for the bucketed order a whole bucket of the authors' size.
    min_tokens = pairs_needed(s.batches, s.tokens_per_batch)
    pairs, negatives = make_pairs(min_tokens, BUCKET_PAIRS if s.order == "bucketed" else 1, s.seed)

    print(
        f"{NAME}: device {s.device}, model {s.model_config} ({s.model_config_source}), "
        f"{s.tokens_per_batch} real tokens per batch, {s.dtype}, order {s.order}, "
        f"{s.batches} batch(es), {s.warmup} warm-up + {s.iters} timed calls; "
        f"{len(pairs)} pairs generated"
    )
    task_batches = {task: build_task_batches(task, pairs, negatives, s) for task in s.tasks}
    summaries = {
        task: shape_summary([BatchShape.of(b) for b in batches], config)
        for task, batches in task_batches.items()
    }
    for task in s.tasks:
        print_plan(task, summaries[task])
    if s.plan_only:
        return 0

    providers = make_providers(config, s.device, s.seed)
    payload = {
        "benchmark": NAME,
        "question": QUESTION,
        "command": command_line(),
        "environment": environment(s.device),
        "settings": {
            "model_config": str(s.model_config),
            "model_config_source": s.model_config_source,
            "model": config.to_dict(),
            "encoder_matmul_params": encoder_matmul_params(config),
            "tokens_per_batch": s.tokens_per_batch,
            "dtype": s.dtype,
            "iters": s.iters,
            "warmup": s.warmup,
            "batches": s.batches,
            "order": s.order,
            "seed": s.seed,
            "quick": s.quick,
            "wra_iterations": WRA_ITERATIONS,
            "modes": {
                "collate": "CPU, the examples of one batch to the provider's host batch",
                "forward": "training mode (dropout on), autograd recording, no backward",
                "forward_backward": "the same plus loss.backward(); gradients set to None "
                "before each call, untimed; no optimizer step",
                "tokens_per_s": "real tokens (text + regions) of the call's batch over its "
                "time, median over the timed calls",
                "saved_for_backward_bytes": "distinct storages autograd saves in one training "
                "forward on the first batch, parameters excluded",
                "speedup_authors_time_over_packed": "see _speedup in the script: per-call "
                "ratios on the same batch, and per-batch ratios of the fastest calls",
                "memory": "CUDA: each provider alone, one call, max_memory_allocated above "
                "the allocation before it; CPU: process-wide peak RSS (not per provider)",
            },
        },
        "tasks": {},
    }
    for task in s.tasks:
        agreement = check_losses(providers, task_batches[task][0], task, s.device)
        result = bench_task(task, providers, task_batches[task], s)
        payload["tasks"][task] = {
            "agreement": agreement,
            "batches": summaries[task],
            **result,
        }
        print_task(task, summaries[task], result, s.device.type == "cuda")

    path = save_result(NAME, payload, s.out)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
