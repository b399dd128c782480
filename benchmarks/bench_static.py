"""What static shapes cost: padded rows per real token, and the host's time to pad a batch.

    python benchmarks/bench_static.py                  # base and large at the recipes' budgets
    python benchmarks/bench_static.py --quick          # a smoke run: small budget, few batches

The CUDA-graph step (`TorchStep(graphs="capture")`, `bench_e2e.py --providers fast_graphs`) runs
batches padded to one `StaticShape`. Two costs come with it, both measured here on the CPU, on
the batches `bench_e2e.py` trains on (realistic pairs, the recipe's token budget, every task of
the mix, random order):

- GPU work: the encoder runs on `shape.rows` rows instead of the real N (dummy pairs, filler
  sequences, the cap's slack). Reported as padded rows per real token, for the shape covering
  the batches (what fast_graphs uses) and for `StaticShape.for_budget` (a shape fixed in
  advance, with the covering shape's pair cap); and the caps over the mean real counts of pair
  slots (ITM pooler, one IPOT program each) and of MLM and MRM targets (the heads' rows).
- Host work: `pad_static` per batch (a loader worker's job, beside collation), median ms, with
  the collation time of the same batch beside it.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch
from common import command_line, environment, save_result
from workload import fill_task_batches, make_pairs, pairs_needed

import uniter_fast as uf
from uniter_fast.config import DEFAULT_MIX
from uniter_fast.data.static import StaticShape, pad_static

RECIPES = {"base": 10240, "large": 6144}  # real tokens per micro-batch (configs/pretrain/)


def _cap_over_mean(cap: int, collated, field: str) -> float:
    sizes = [getattr(b, field).shape[0] for _, b in collated if getattr(b, field) is not None]
    return cap / statistics.mean(sizes)


def measure(model: str, tokens: int, batches: int, seed: int) -> dict:
    pairs, negatives = make_pairs(pairs_needed(batches, tokens), 1, seed)
    collated, collate_ms = [], []
    for task in DEFAULT_MIX:
        for examples in fill_task_batches(
            task,
            pairs,
            negatives,
            count=batches,
            tokens_per_batch=tokens,
            order="random",
            seed=seed,
        ):
            t0 = time.perf_counter()
            collated.append((task, uf.data.collate(examples, task)))
            collate_ms.append((time.perf_counter() - t0) * 1e3)
    covering = StaticShape.covering(b for _, b in collated)
    budget = StaticShape.for_budget(tokens, covering.pairs)
    real = sum(b.num_tokens for _, b in collated)
    pad_ms = []
    for _, b in collated:
        t0 = time.perf_counter()
        padded = pad_static(b, covering)
        pad_ms.append((time.perf_counter() - t0) * 1e3)
        assert padded is not None
    fits_budget = sum(pad_static(b, budget) is not None for _, b in collated)
    return {
        "model": model,
        "tokens_per_batch": tokens,
        "batches": len(collated),
        "real_tokens_per_batch": real / len(collated),
        "pairs_per_batch": statistics.mean(b.num_pairs for _, b in collated),
        "covering_shape": dataclasses.asdict(covering),
        "covering_rows": covering.rows,
        "covering_rows_per_real_token": covering.rows * len(collated) / real,
        "budget_shape": dataclasses.asdict(budget),
        "budget_rows": budget.rows,
        "budget_rows_per_real_token": budget.rows * len(collated) / real,
        "budget_fits": fits_budget,
        # Caps over means: the GPU work padding adds to the pair slots (pooler, IPOT programs)
        # and to the MLM and MRM heads.
        "pairs_cap_over_mean": covering.pairs / statistics.mean(b.num_pairs for _, b in collated),
        "mlm_cap_over_mean": _cap_over_mean(covering.mlm_targets, collated, "mlm_index"),
        "mrm_cap_over_mean": _cap_over_mean(covering.mrm_targets, collated, "mrm_index"),
        "pad_ms_median": statistics.median(pad_ms),
        "collate_ms_median": statistics.median(collate_ms),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    p.add_argument("--batches", type=int, default=8, help="batches per task (default 8)")
    p.add_argument("--quick", action="store_true", help="smoke run: 1024 tokens, 2 batches")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="result file or folder (default: runs/bench/)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for model in args.models:
        tokens = 1024 if args.quick else RECIPES[model]
        r = measure(model, tokens, 2 if args.quick else args.batches, args.seed)
        rows.append(r)
        print(
            f"{model}: {r['batches']} batches of {r['real_tokens_per_batch']:.0f} real tokens, "
            f"{r['pairs_per_batch']:.0f} pairs: covering shape {r['covering_rows']} rows "
            f"({r['covering_rows_per_real_token']:.3f} per real token), budget shape "
            f"{r['budget_rows']} rows ({r['budget_rows_per_real_token']:.3f}; "
            f"{r['budget_fits']}/{r['batches']} fit); caps over means: pairs "
            f"{r['pairs_cap_over_mean']:.2f}, MLM {r['mlm_cap_over_mean']:.2f}, MRM "
            f"{r['mrm_cap_over_mean']:.2f}; pad {r['pad_ms_median']:.2f} ms vs collate "
            f"{r['collate_ms_median']:.2f} ms per batch"
        )
    payload = {
        "benchmark": "static",
        "command": command_line(),
        "environment": environment("cpu"),
        "quick": args.quick,
        "models": rows,
    }
    print(f"bench_static: wrote {save_result('static', payload, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
