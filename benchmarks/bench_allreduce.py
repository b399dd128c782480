"""What do the gradient collectives cost here: all-reduce, reduce-scatter, all-gather bandwidth.

    deepspeed --num_gpus 8 benchmarks/bench_allreduce.py                 # one node, NCCL
    deepspeed --hostfile hosts --num_gpus 8 benchmarks/bench_allreduce.py  # across nodes
    python -m deepspeed.launcher.runner --num_gpus 2 benchmarks/bench_allreduce.py --device cpu \
        --quick                                                           # a smoke run, gloo

Under any launcher that sets RANK/WORLD_SIZE (deepspeed, torchrun): NCCL on CUDA, gloo on the CPU.
Message sizes: a sweep of powers of two, plus the gradients of UNITER-base and -large in the
training dtype (bf16: 2 bytes per parameter), the sizes one ZeRO step moves. Each size: warm-up
calls, then timed calls synchronised by a barrier; reported per size and op: the median time, the
algorithm bandwidth (bytes / time) and the bus bandwidth, NCCL's convention that makes the figures
comparable across world sizes (all-reduce x 2(n-1)/n, reduce-scatter and all-gather x (n-1)/n).
`benchmarks/scaling.py` turns these and a `bench_e2e.py` step into tokens/s at scale.
Rank 0 writes `runs/bench/allreduce-<device class>-<UTC time>.json`;
`--out benchmarks/results/` for the figures the project commits.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

import torch
import torch.distributed as dist
from common import command_line, environment, save_result

NAME = "allreduce"
QUESTION = "What bandwidth do all-reduce, reduce-scatter and all-gather reach on this cluster?"
# Parameters of the pretraining models with their heads (uniter_fast.UniterForPretraining, tied
# weights once; the paper's 86M and 303M count the encoder and embeddings only).
GRADIENTS = {"uniter-base": 112_938_887, "uniter-large": 340_524_935}
OPS = ("all_reduce", "reduce_scatter", "all_gather")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=QUESTION)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--iters", type=int, help="timed calls per size (default 20; quick 3)")
    p.add_argument("--warmup", type=int, help="untimed calls per size (default 5; quick 1)")
    p.add_argument("--max-mib", type=int, help="largest sweep size in MiB (default 1024; quick 4)")
    p.add_argument("--quick", action="store_true", help="smoke run: small sizes, few calls")
    p.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # the deepspeed launcher's
    p.add_argument("--out", help="result file or folder (default: runs/bench/)")
    a = p.parse_args(argv)
    a.iters = a.iters or (3 if a.quick else 20)
    a.warmup = a.warmup if a.warmup is not None else (1 if a.quick else 5)
    a.max_mib = a.max_mib or (4 if a.quick else 1024)
    if a.iters < 1 or a.warmup < 0 or a.max_mib < 1:
        p.error("--iters and --max-mib must be at least 1, --warmup non-negative")
    return a


def bus_factor(op: str, n: int) -> float:
    return 2 * (n - 1) / n if op == "all_reduce" else (n - 1) / n


def sizes_bytes(a, element: int) -> dict[str, int]:
    sizes = {}
    mib = 1
    while mib <= a.max_mib:
        sizes[f"{mib} MiB"] = mib * 2**20
        mib *= 4
    if not a.quick:
        sizes.update({name: n * element for name, n in GRADIENTS.items()})
    return sizes


def time_op(op: str, numel: int, dtype, device, world: int, a) -> dict:
    chunk = -(-numel // world)
    full = torch.ones(chunk * world, dtype=dtype, device=device)
    part = torch.ones(chunk, dtype=dtype, device=device)
    if op == "all_reduce":
        call = lambda: dist.all_reduce(full)  # noqa: E731
    elif op == "reduce_scatter":
        call = lambda: dist.reduce_scatter_tensor(part, full)  # noqa: E731
    else:
        call = lambda: dist.all_gather_into_tensor(full, part)  # noqa: E731
    try:
        for _ in range(a.warmup):
            call()
    except (RuntimeError, NotImplementedError, ValueError) as e:
        return {"unsupported": f"{type(e).__name__}: {str(e).splitlines()[0]}"}
    times = []
    for _ in range(a.iters):
        dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    # Every rank's median, the slowest of them: a collective ends when its last rank does.
    median = torch.tensor([statistics.median(times)], dtype=torch.float64, device=device)
    dist.all_reduce(median, op=dist.ReduceOp.MAX)
    seconds = float(median)
    nbytes = chunk * world * full.element_size()
    algbw = nbytes / seconds
    return {
        "bytes": nbytes,
        "median_ms": seconds * 1e3,
        "algbw_gbps": algbw / 1e9,
        "busbw_gbps": algbw * bus_factor(op, world) / 1e9,
    }


def main(argv=None) -> int:
    a = parse_args(argv)
    # torch 2.13 renames all_gather_into_tensor (all_gather_single); 2.11 has only the old name.
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        print(
            "bench_allreduce: start it under a launcher (deepspeed, torchrun), e.g. "
            "python -m deepspeed.launcher.runner --num_gpus 2 benchmarks/bench_allreduce.py",
            file=sys.stderr,
        )
        return 2
    device = torch.device(a.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    # The deepspeed launcher sets LOCAL_SIZE, torchrun LOCAL_WORLD_SIZE.
    local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 0) or None
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    element = 2 if a.dtype == "bf16" else 4
    results = {}
    for label, nbytes in sizes_bytes(a, element).items():
        results[label] = {op: time_op(op, nbytes // element, dtype, device, world, a) for op in OPS}
        if rank == 0:
            text = ", ".join(
                f"{op} {r['busbw_gbps']:.2f} GB/s" if "busbw_gbps" in r else f"{op} unsupported"
                for op, r in results[label].items()
            )
            print(f"{label:>14s}: {text}")
    if rank == 0:
        payload = {
            "benchmark": NAME,
            "question": QUESTION,
            "command": command_line(),
            "environment": {
                **environment(device),
                "world_size": world,
                "ranks_per_node": local,
                "nodes": world // local if local else None,
                "backend": dist.get_backend(),
                "nccl": ".".join(map(str, torch.cuda.nccl.version()))
                if device.type == "cuda"
                else None,
            },
            "settings": {"dtype": a.dtype, "iters": a.iters, "warmup": a.warmup},
            "sizes": results,
        }
        path = save_result(NAME, payload, a.out)
        print(f"wrote {path}")
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
