"""How fast does the C++ packer build a batch, next to the NumPy oracle, the authors' collate and
the memory-copy floor? And how long does token-bucket batching take?

    python benchmarks/bench_collate.py                        # batch sizes 32..512, 4 tasks
    python benchmarks/bench_collate.py --tasks mlm --batch-sizes 256
    python benchmarks/bench_collate.py --quick                # a smoke run, tiny sizes

Providers, on the same examples (one batch's example dicts in, one host batch out):

- `cpp`: `uniter_fast.data.collate_cpp` (the C++ packer, fresh NumPy outputs: what `collate`
  does by default, page faults of the new buffers included);
- `cpp_into`: the same plan packed into buffers allocated once and reused (what a loader that
  recycles pinned or shared buffers pays: validation plus the one pass);
- `cpp_shared`: `uniter_fast.data.collate(..., out="shared")`, the whole `Batch` packed into one
  new shared-memory buffer (what a DataLoader worker would hand to the main process);
- `numpy`: `uniter_fast.data.collate_numpy`, the oracle (same arrays);
- `authors`: `uniter_fast.authors.collate.collate`, the authors' collate re-implemented (features
  widened to float32, torch padding to the longest sequence, gather index, boolean-mask targets;
  ITM with its OT inputs);
- `floor`: `np.copyto` of as many bytes as the packed batch holds, between two buffers allocated
  once: the memory traffic any packer must at least pay (every output byte written once, about
  as many input bytes read).

Examples are realistic UNITER pairs: synthetic images (10..100 regions, mean about 37; 2048-d
float16 features; 1601 float16 soft labels) with captions of 8..60 tokens (mean about 15,
[CLS]/[SEP] added), built by the task builders; every pair of a batch has its own image (the
inputs do not sit in cache). Calls are interleaved (call i of every provider on the same batch,
one after the other), torch on one thread as in a DataLoader worker. Reported per task and batch
size: ms per batch (median), pairs/s, output MB/s, and the authors' time over each provider's
(median of per-call ratios). Then the token-bucket call on `--bucket-lengths` lengths, C++ and
the Python reference, both modes.
Results go to `runs/bench/collate-<device>-<UTC time>.json`;
`--out benchmarks/results/` for the figures the project commits.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from common import command_line, environment, measure_interleaved, save_result

from uniter_fast.authors import collate as authors_collate
from uniter_fast.data import (
    collate,
    collate_cpp,
    collate_numpy,
    extension_error,
    extension_loaded,
)
from uniter_fast.data.batching import (
    BUCKET_SIZE,
    SIZE_MULTIPLE,
    token_bucket_batches,
    token_bucket_batches_reference,
)
from uniter_fast.data.collate import PAD_MULTIPLE
from uniter_fast.data.schema import MAX_CAPTION_TOKENS, MAX_REGIONS, TASKS
from uniter_fast.data.synthetic import generate_images
from uniter_fast.tasks import NegativeImageSampler, build_example

NAME = "collate"
QUESTION = (
    "How fast does the C++ packer build a batch, next to the NumPy oracle, the authors' collate "
    "and a plain copy of the same bytes; and how long does token-bucket batching take?"
)
DEFAULT_TASKS = ("mlm", "mrfr", "mrckl", "itm")
DEFAULT_BATCH_SIZES = (32, 64, 128, 256, 512)
PROVIDERS = ("cpp", "cpp_into", "cpp_shared", "numpy", "authors", "floor")
MAX_EXAMPLE_TOKENS = MAX_CAPTION_TOKENS + 2 + MAX_REGIONS


@dataclass(frozen=True)
class Settings:
    """The resolved command line.

    tasks, batch_sizes: what to time. batches: distinct batches per size, cycled over the calls.
    iters, warmup: timed and untimed calls per measurement. bucket_lengths: lengths handed to
    the token bucketer (0: skip). torch_threads: torch's intra-op threads for the authors'
    collate (1, as in a DataLoader worker). seed: seeds the images, the builders, the lengths.
    """

    tasks: tuple[str, ...]
    batch_sizes: tuple[int, ...]
    batches: int
    iters: int
    warmup: int
    bucket_lengths: int
    torch_threads: int
    seed: int
    quick: bool
    out: Path | None

    def __post_init__(self) -> None:
        for name in ("batches", "iters"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        if self.warmup < 0 or self.bucket_lengths < 0 or self.seed < 0:
            raise ValueError("--warmup, --bucket-lengths and --seed must be non-negative")
        if self.torch_threads < 1:
            raise ValueError(f"--torch-threads must be at least 1, got {self.torch_threads}")
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ValueError(f"--batch-sizes must be positive, got {self.batch_sizes}")


def parse_args(argv: list[str] | None = None) -> Settings:
    p = argparse.ArgumentParser(description=QUESTION)
    p.add_argument("--tasks", nargs="+", choices=TASKS, default=list(DEFAULT_TASKS))
    p.add_argument("--batch-sizes", nargs="+", type=int, help="pairs per batch (default 32..512)")
    p.add_argument("--batches", type=int, help="distinct batches per size; default 2")
    p.add_argument("--iters", type=int, help="timed calls; default 10")
    p.add_argument("--warmup", type=int, help="untimed calls first; default 2")
    p.add_argument("--bucket-lengths", type=int, help="lengths to bucket; default 8192")
    p.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: DataLoader workers run collate with one)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: batch sizes 4 and 8, 1 batch, 2 calls after 1 warm-up, 512 lengths "
        "(explicit flags still win)",
    )
    p.add_argument("--out", type=Path, help="result file or folder (default: runs/bench/)")
    a = p.parse_args(argv)

    def pick(given, quick, default):
        if given is not None:
            return given
        return quick if a.quick else default

    try:
        return Settings(
            tasks=tuple(dict.fromkeys(a.tasks)),
            batch_sizes=tuple(pick(a.batch_sizes, (4, 8), DEFAULT_BATCH_SIZES)),
            batches=pick(a.batches, 1, 2),
            iters=pick(a.iters, 2, 10),
            warmup=pick(a.warmup, 1, 2),
            bucket_lengths=pick(a.bucket_lengths, 512, 8192),
            torch_threads=a.torch_threads,
            seed=a.seed,
            quick=a.quick,
            out=a.out,
        )
    except ValueError as e:
        p.error(str(e))


# --- examples -------------------------------------------------------------------------------------


def make_task_batches(s: Settings) -> dict[str, dict[int, list[list[dict]]]]:
    """{task: {batch size: [examples of one batch] * s.batches}}, one image per pair."""
    need = max(s.batch_sizes) * s.batches
    images = list(generate_images(need + 1, seed=s.seed))
    negatives = NegativeImageSampler(capacity=len(images))
    for image in images:
        negatives.add(image)
    out: dict[str, dict[int, list[list[dict]]]] = {}
    for task in s.tasks:
        rng = np.random.default_rng([s.seed, zlib.crc32(task.encode())])
        pairs = [(image.captions[rng.integers(len(image.captions))], image) for image in images]
        examples = [build_example(task, c, im, rng, negatives=negatives) for c, im in pairs]
        out[task] = {
            size: [examples[k * size : (k + 1) * size] for k in range(s.batches)]
            for size in s.batch_sizes
        }
    return out


def batch_bytes(arrays: dict) -> int:
    return sum(v.nbytes for v in arrays.values() if isinstance(v, np.ndarray))


def real_tokens(examples: list[dict]) -> int:
    return sum(len(ex["input_ids"]) + len(ex["img_feat"]) for ex in examples)


# --- providers ------------------------------------------------------------------------------------


class _Provider:
    """Call i packs batch i % len(batches)."""

    def __init__(self, batches: list[list[dict]], task: str):
        self.batches, self.task = batches, task

    def examples(self, i: int) -> list[dict]:
        return self.batches[i % len(self.batches)]


class _Cpp(_Provider):
    def __call__(self, i: int):
        return collate_cpp(self.examples(i), self.task)


class _CppInto(_Provider):
    """The plan is rebuilt every call (validation is part of the cost); the outputs are not."""

    def __init__(self, batches, task):
        super().__init__(batches, task)
        from uniter_fast import _C

        self._C = _C
        self.outputs = []
        for examples in batches:
            plan = _C.PackPlan(examples, task, PAD_MULTIPLE)
            self.outputs.append({n: np.zeros(sh, dt) for n, sh, dt in plan.outputs()})

    def __call__(self, i: int):
        plan = self._C.PackPlan(self.examples(i), self.task, PAD_MULTIPLE)
        plan.pack_into(self.outputs[i % len(self.batches)])


class _CppShared(_Provider):
    def __call__(self, i: int):
        return collate(self.examples(i), self.task, out="shared", backend="cpp")


class _Numpy(_Provider):
    def __call__(self, i: int):
        return collate_numpy(self.examples(i), self.task)


class _Authors(_Provider):
    def __call__(self, i: int):
        return authors_collate.collate(self.examples(i), self.task)


class _Floor:
    """np.copyto of each batch's packed bytes between two buffers made (and touched) once."""

    def __init__(self, sizes: list[int]):
        self.pairs = [(np.ones(n, np.uint8), np.zeros(n, np.uint8)) for n in sizes]

    def __call__(self, i: int):
        src, dst = self.pairs[i % len(self.pairs)]
        np.copyto(dst, src)


def _summary(times_ms: list[float], pairs: list[int], nbytes: list[int]) -> dict:
    k = len(pairs)
    return {
        "median_ms": statistics.median(times_ms),
        "min_ms": min(times_ms),
        "times_ms": times_ms,
        "pairs_per_s": statistics.median(pairs[i % k] / (t / 1e3) for i, t in enumerate(times_ms)),
        "output_mb_per_s": statistics.median(
            nbytes[i % k] / 1e6 / (t / 1e3) for i, t in enumerate(times_ms)
        ),
    }


def bench_case(task: str, batches: list[list[dict]], s: Settings) -> dict:
    packed = [collate_numpy(b, task) for b in batches]
    nbytes = [batch_bytes(p) for p in packed]
    pairs = [len(b) for b in batches]
    fns = {
        "cpp": _Cpp(batches, task),
        "cpp_into": _CppInto(batches, task),
        "cpp_shared": _CppShared(batches, task),
        "numpy": _Numpy(batches, task),
        "authors": _Authors(batches, task),
        "floor": _Floor(nbytes),
    }
    timed = measure_interleaved(fns, device="cpu", warmup=s.warmup, iters=s.iters)
    providers = {n: _summary(m.times_ms, pairs, nbytes) for n, m in timed.items()}
    authors = timed["authors"].times_ms
    speedup = {
        n: statistics.median(a / t for a, t in zip(authors, timed[n].times_ms, strict=True))
        for n in ("cpp", "cpp_into", "cpp_shared", "numpy")
    }
    authors_bytes = [
        sum(
            t.numel() * t.element_size()
            for t in authors_collate.collate(b, task).values()
            if hasattr(t, "numel")
        )
        for b in batches
    ]
    return {
        "pairs": pairs[0],
        "real_tokens_mean": statistics.mean(real_tokens(b) for b in batches),
        "output_bytes_mean": statistics.mean(nbytes),
        "authors_batch_bytes_mean": statistics.mean(authors_bytes),
        "providers": providers,
        "speedup_authors_time_over": speedup,
        "cpp_time_over_floor": providers["cpp"]["median_ms"] / providers["floor"]["median_ms"],
        "cpp_into_time_over_floor": providers["cpp_into"]["median_ms"]
        / providers["floor"]["median_ms"],
    }


def bench_bucketing(s: Settings) -> dict:
    """token_bucket_batches on `s.bucket_lengths` realistic lengths, C++ and Python reference."""
    rng = np.random.default_rng([s.seed, 7])
    # Real lengths of pairs: [CLS] caption [SEP] + regions, as the synthetic data draws them.
    lengths = np.array(
        [len(im.captions[0]) + 2 + im.num_regions for im in generate_images(256, seed=s.seed)]
    )
    lengths = rng.choice(lengths, s.bucket_lengths)
    out = {"lengths": int(s.bucket_lengths), "bucket_size": BUCKET_SIZE, "modes": {}}
    for mode, budget in (("padded", 8192), ("packed", 8192)):
        kwargs = dict(max_tokens=budget, mode=mode, size_multiple=SIZE_MULTIPLE)
        fns = {
            "cpp": lambda i, kw=kwargs: token_bucket_batches(lengths, seed=i, **kw),
            "python": lambda i, kw=kwargs: token_bucket_batches_reference(lengths, seed=i, **kw),
        }
        timed = measure_interleaved(fns, device="cpu", warmup=s.warmup, iters=s.iters)
        batches = token_bucket_batches(lengths, seed=0, **kwargs)
        out["modes"][mode] = {
            "max_tokens": budget,
            "batches": len(batches),
            "mean_pairs_per_batch": float(np.mean([len(b) for b in batches])),
            "cpp_ms": timed["cpp"].median_ms,
            "python_ms": timed["python"].median_ms,
            "speedup_python_over_cpp": timed["python"].median_ms / timed["cpp"].median_ms,
        }
    return out


# --- report -------------------------------------------------------------------------------------


def print_header() -> None:
    print(
        f"{'task':6s} {'pairs':>5s} {'out MB':>7s} "
        + " ".join(f"{p + ' ms':>11s}" for p in PROVIDERS)
        + f" {'cpp pairs/s':>12s} {'cpp MB/s':>9s} {'x authors':>9s} {'x numpy':>8s}"
        f" {'cpp/floor':>9s}"
    )


def print_case(task: str, r: dict) -> None:
    p = r["providers"]
    sp = r["speedup_authors_time_over"]
    x_numpy = p["numpy"]["median_ms"] / p["cpp"]["median_ms"]
    print(
        f"{task:6s} {r['pairs']:5d} {r['output_bytes_mean'] / 1e6:7.1f} "
        + " ".join(f"{p[n]['median_ms']:11.2f}" for n in PROVIDERS)
        + f" {p['cpp']['pairs_per_s']:12,.0f} {p['cpp']['output_mb_per_s']:9,.0f}"
        f" {sp['cpp']:8.1f}x {x_numpy:7.1f}x {r['cpp_time_over_floor']:8.2f}x"
    )


def main(argv: list[str] | None = None) -> int:
    s = parse_args(argv)
    # Collate runs in DataLoader workers, which torch limits to one intra-op thread; with more,
    # the authors' padding ops contend with the other providers (and anything else on the
    # machine) and their times scatter by 10x.
    torch.set_num_threads(s.torch_threads)
    if not extension_loaded():
        print(f"{NAME}: uniter_fast._C is not built ({extension_error()}); nothing to time")
        return 1
    print(
        f"{NAME}: tasks {' '.join(s.tasks)}; batch sizes {list(s.batch_sizes)}; {s.batches} "
        f"batch(es) each; {s.warmup} warm-up + {s.iters} timed calls, interleaved"
    )
    task_batches = make_task_batches(s)
    payload = {
        "benchmark": NAME,
        "question": QUESTION,
        "command": command_line(),
        "environment": environment("cpu"),
        "settings": {
            "tasks": list(s.tasks),
            "batch_sizes": list(s.batch_sizes),
            "batches": s.batches,
            "iters": s.iters,
            "warmup": s.warmup,
            "bucket_lengths": s.bucket_lengths,
            "torch_threads": s.torch_threads,
            "seed": s.seed,
            "quick": s.quick,
            "providers": {
                "cpp": "collate_cpp: C++ packer, fresh NumPy outputs (page faults included)",
                "cpp_into": "PackPlan + pack_into reused buffers (validation + one pass)",
                "cpp_shared": "collate(out='shared'): the Batch in one new shared-memory buffer",
                "numpy": "collate_numpy, the oracle",
                "authors": "uniter_fast.authors.collate.collate (float32 features, padding)",
                "floor": "np.copyto of the packed batch's bytes between reused buffers",
            },
            "speedup": "authors' time over the provider's, median of per-call ratios",
        },
        "tasks": {},
    }
    print_header()
    for task in s.tasks:
        payload["tasks"][task] = {}
        for size, batches in task_batches[task].items():
            result = bench_case(task, batches, s)
            payload["tasks"][task][str(size)] = result
            print_case(task, result)
            sys.stdout.flush()
    if s.bucket_lengths:
        payload["bucketing"] = bench_bucketing(s)
        for mode, r in payload["bucketing"]["modes"].items():
            print(
                f"bucketing {s.bucket_lengths} lengths, {mode}: C++ {r['cpp_ms']:.3f} ms, "
                f"Python reference {r['python_ms']:.2f} ms ({r['speedup_python_over_cpp']:.0f}x); "
                f"{r['batches']} batches of {r['mean_pairs_per_batch']:.1f} pairs"
            )
    path = save_result(NAME, payload, s.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
