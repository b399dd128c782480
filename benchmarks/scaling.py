"""Scaling on paper: tokens/s at 8, 64 and 512 GPUs for ZeRO 1, 2 and 3, from a measured step.

    python benchmarks/scaling.py --e2e E2E.json --allreduce AR8.json --allreduce-inter AR64.json
    python benchmarks/scaling.py --assume-mfu 0.5 --assume-peak-tflops 800   # targets, no GPU

The single-GPU step comes from a `bench_e2e.py` result (the `fast` provider, or --provider), or,
with --assume-mfu, from the model's useful FLOPs per real token (workload.py, at the recipe's
batches) at that MFU of the given peak. The collectives' bus bandwidths come from
`bench_allreduce.py` results (one node for 8 GPUs; several nodes for 64 and 512), or from the
assumed figures below, which the output marks as assumptions.

The model of a step, per optimizer step of A micro-batches (A: the recipe's accumulation), for
P parameters moved as bf16 (2 bytes; S = 2P bytes), n ranks:

- ZeRO-1: one reduce-scatter of the gradients at the accumulation boundary, one all-gather of
  the updated weights after the optimizer step (DeepSpeed stage 1 reduces only at the boundary);
- ZeRO-2: a reduce-scatter after every micro-batch's backward (the gradients are partitioned, so
  each micro-batch's are reduced into their owner's partition), one all-gather after the step;
- ZeRO-3: per micro-batch an all-gather of the weights for the forward, another for the
  backward, and a reduce-scatter of the gradients.

A collective of S bytes takes `latency + f x S / busbw`, with f = (n-1)/n (NCCL's bus-bandwidth
convention makes f S / busbw the time) and latency `2 x log2(n) x alpha` (tree algorithms).
Two bounds: "serial" adds every collective to the compute; "overlapped" hides reduce-scatters
behind the backward they follow (at most the backward's share of a micro-batch, 2/3) and
ZeRO-3's all-gathers behind the forward and backward (prefetching), and leaves the post-step
all-gather exposed. Tokens/s = n x real tokens per step / step time. Not modelled: stragglers,
data-loader stalls, the optimizer step's own time shrinking with partitioning (it is counted whole,
which is pessimistic for ZeRO), and network contention between jobs.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from common import REPO_ROOT, command_line, save_result

NAME = "scaling"
GPUS = (8, 64, 512)
GPUS_PER_NODE = 8
BACKWARD_SHARE = 2 / 3  # of a micro-batch's compute: the backward is 2x the forward
# Assumptions for an H100 SXM cluster where nothing was measured (stated in the output):
# NVLink 4 all-reduce bus bandwidth seen in NCCL tests at large sizes, less a margin; one
# 400 Gb/s NIC per GPU (50 GB/s line rate) at about 90 %; per-hop latencies.
ASSUMED = {
    "intra_busbw_gbps": 360.0,
    "inter_busbw_gbps": 45.0,
    "intra_alpha_us": 5.0,
    "inter_alpha_us": 15.0,
}
MODELS = {"base": "configs/model/uniter-base.json", "large": "configs/model/uniter-large.json"}


def _busbw(result: dict, op: str, nbytes: int) -> float:
    """Bus bandwidth (GB/s) of `op` at the measured size nearest `nbytes` (at least 1 MiB)."""
    best = None
    for entry in result["sizes"].values():
        r = entry.get(op, {})
        if "busbw_gbps" not in r:
            continue
        gap = abs(math.log(r["bytes"] / nbytes))
        if best is None or gap < best[0]:
            best = (gap, r["busbw_gbps"])
    if best is None:
        raise ValueError(f"the all-reduce result has no {op} figures")
    return best[1]


def collective_ms(nbytes: int, n: int, busbw_gbps: float, alpha_us: float) -> float:
    if n == 1:
        return 0.0
    return 2 * math.log2(n) * alpha_us / 1e3 + (n - 1) / n * nbytes / (busbw_gbps * 1e9) * 1e3


def step_model(stage: int, *, compute_ms: float, accum: int, rs_ms: float, ag_ms: float) -> dict:
    """Serial and overlapped step times (ms) of one ZeRO stage (see the module docstring)."""
    micro = compute_ms / accum
    backward = BACKWARD_SHARE * micro
    if stage == 1:
        comm = rs_ms + ag_ms
        exposed = max(0.0, rs_ms - backward) + ag_ms
    elif stage == 2:
        comm = accum * rs_ms + ag_ms
        exposed = accum * max(0.0, rs_ms - backward) + ag_ms
    else:
        per_micro = 2 * ag_ms + rs_ms
        comm = accum * per_micro
        exposed = accum * max(0.0, per_micro - micro)
    return {"comm_ms": comm, "serial_ms": compute_ms + comm, "overlapped_ms": compute_ms + exposed}


def from_e2e(path: Path, provider: str) -> dict[str, dict]:
    result = json.loads(path.read_text())
    steps = {}
    for model, entry in result["models"].items():
        p = entry["providers"].get(provider)
        if p is None:
            raise ValueError(f"{path}: model {model} has no provider {provider!r}")
        tokens = sum(r["tokens"] for r in p["rounds"])
        n_steps = result["settings"]["steps"] * result["settings"]["rounds"]
        steps[model] = {
            "source": f"measured: {path.name}, provider {provider}",
            "step_ms": p["step_ms"],
            "tokens_per_step": tokens / n_steps,
            "grad_accum": entry["grad_accum"],
            "parameters": entry["parameters"],
            "device": result["environment"]["device_name"],
        }
    return steps


def from_assumed_mfu(mfu: float, peak_tflops: float) -> dict[str, dict]:
    import torch  # noqa: F401  (workload imports uniter_fast, which needs it)
    from workload import BatchShape, fill_task_batches, make_pairs, pairs_needed, train_flops

    import uniter_fast as uf
    from uniter_fast.config import DEFAULT_MIX, RunConfig, UniterConfig

    steps = {}
    for model, path in MODELS.items():
        config = UniterConfig.from_json(REPO_ROOT / path)
        run = RunConfig.from_file(REPO_ROOT / f"configs/pretrain/uniter-{model}.yaml")
        budget, accum = run.data.tokens_per_batch, run.optim.grad_accum
        pairs, negatives = make_pairs(pairs_needed(4, budget), 1, 0)
        weight = sum(DEFAULT_MIX.values())
        flops_per_token = 0.0
        for task, ratio in DEFAULT_MIX.items():
            batches = fill_task_batches(
                task, pairs, negatives, count=4, tokens_per_batch=budget, order="random", seed=0
            )
            shapes = [BatchShape.of(b, task) for b in batches]
            per_token = sum(train_flops(config, sh, task) for sh in shapes) / sum(
                sh.real_tokens for sh in shapes
            )
            flops_per_token += ratio / weight * per_token
        tokens_per_step = budget * accum  # budgets are filled to within one pair
        step_ms = tokens_per_step * flops_per_token / (mfu * peak_tflops * 1e12) * 1e3
        params = sum(p.numel() for p in uf.UniterForPretraining(config).parameters())
        steps[model] = {
            "source": f"ASSUMED: MFU {mfu:.0%} of {peak_tflops:g} TFLOP/s "
            f"({flops_per_token / 1e9:.2f} GFLOP per real token)",
            "step_ms": step_ms,
            "tokens_per_step": tokens_per_step,
            "grad_accum": accum,
            "parameters": params,
            "device": None,
        }
    return steps


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--e2e", type=Path, help="bench_e2e.py result (the single-GPU step)")
    p.add_argument("--provider", default="fast", help="which provider's step (default fast)")
    p.add_argument("--assume-mfu", type=float, help="no e2e result: this MFU of the peak")
    p.add_argument("--assume-peak-tflops", type=float, default=800.0)
    p.add_argument("--allreduce", type=Path, help="bench_allreduce.py result on one node")
    p.add_argument("--allreduce-inter", type=Path, help="bench_allreduce.py result across nodes")
    p.add_argument("--out", type=Path, help="result file or folder (default: runs/bench/)")
    a = p.parse_args(argv)
    if (a.e2e is None) == (a.assume_mfu is None):
        p.error("give --e2e (a measured step) or --assume-mfu (an assumed one), not both")
    try:
        steps = (
            from_e2e(a.e2e, a.provider)
            if a.e2e
            else from_assumed_mfu(a.assume_mfu, a.assume_peak_tflops)
        )
        networks = {}
        for key, path, busbw_key, alpha_key in (
            ("intra", a.allreduce, "intra_busbw_gbps", "intra_alpha_us"),
            ("inter", a.allreduce_inter, "inter_busbw_gbps", "inter_alpha_us"),
        ):
            networks[key] = {
                "result": json.loads(path.read_text()) if path else None,
                "source": f"measured: {path.name}" if path else "ASSUMED",
                "assumed_busbw_gbps": ASSUMED[busbw_key],
                "alpha_us": ASSUMED[alpha_key],
            }
    except (OSError, ValueError, KeyError) as e:
        print(f"scaling: {e}", file=sys.stderr)
        return 2

    table = {}
    for model, st in steps.items():
        nbytes = 2 * st["parameters"]
        rows = []
        for n in GPUS:
            net = networks["intra" if n <= GPUS_PER_NODE else "inter"]
            bw = {}
            for op in ("reduce_scatter", "all_gather"):
                bw[op] = (
                    _busbw(net["result"], op, nbytes)
                    if net["result"]
                    else net["assumed_busbw_gbps"]
                )
            rs = collective_ms(nbytes, n, bw["reduce_scatter"], net["alpha_us"])
            ag = collective_ms(nbytes, n, bw["all_gather"], net["alpha_us"])
            for stage in (1, 2, 3):
                m = step_model(
                    stage, compute_ms=st["step_ms"], accum=st["grad_accum"], rs_ms=rs, ag_ms=ag
                )
                single = st["tokens_per_step"] / st["step_ms"] * 1e3
                rows.append(
                    {
                        "gpus": n,
                        "zero": stage,
                        "network": net["source"],
                        "busbw_gbps": bw,
                        "reduce_scatter_ms": rs,
                        "all_gather_ms": ag,
                        **m,
                        "tokens_per_s_serial": n * st["tokens_per_step"] / m["serial_ms"] * 1e3,
                        "tokens_per_s_overlapped": n
                        * st["tokens_per_step"]
                        / m["overlapped_ms"]
                        * 1e3,
                        "efficiency_overlapped": st["step_ms"] / m["overlapped_ms"],
                        "single_gpu_tokens_per_s": single,
                    }
                )
        table[model] = {"step": st, "rows": rows}
        print(
            f"\n{model}: single-GPU step {st['step_ms']:.1f} ms for {st['tokens_per_step']:,.0f} "
            f"real tokens ({st['source']}); {st['parameters'] / 1e6:.0f}M parameters, "
            f"{st['grad_accum']} micro-batches per step"
        )
        print(
            f"  {'GPUs':>5s} {'ZeRO':>4s} {'comm ms':>8s} {'tokens/s serial':>16s} "
            f"{'tokens/s overlapped':>20s} {'efficiency':>10s}"
        )
        for r in rows:
            print(
                f"  {r['gpus']:5d} {r['zero']:4d} {r['comm_ms']:8.1f} "
                f"{r['tokens_per_s_serial']:16,.0f} {r['tokens_per_s_overlapped']:20,.0f} "
                f"{r['efficiency_overlapped']:10.1%}"
            )
    for key, net in networks.items():
        if net["result"] is None:
            print(
                f"{key}-node bandwidth ASSUMED: {net['assumed_busbw_gbps']} GB/s bus, "
                f"{net['alpha_us']} us per hop (measure it with bench_allreduce.py)"
            )
    payload = {
        "benchmark": NAME,
        "command": command_line(),
        "environment": {"device_class": "paper"},
        "assumed": ASSUMED,
        "networks": {
            k: {kk: vv for kk, vv in v.items() if kk != "result"} for k, v in networks.items()
        },
        "models": table,
    }
    path = save_result(NAME, payload, a.out)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
