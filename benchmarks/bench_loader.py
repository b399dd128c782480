"""How fast does the loader turn shards into packed batches, per worker and in all?

    python benchmarks/bench_loader.py                  # 3000 images, 0/1/2/4 workers
    python benchmarks/bench_loader.py --quick          # a smoke run (seconds)

The data are what the loader sees in production at base size: single-caption images (so pairs
and images are one to one) with 10 to 100 regions (uniform), fp16 2048-d features, fp16
1601-way soft labels and captions of 8 to 60 tokens with [CLS]/[SEP], written as shards by
`ShardWriter`. The task mix is the reference's COCO ratio (itm 6, mlm 8, mrfr 4, mrckl 4).

Reported:
- stages, in this process: read + decode + validate (images/s), build examples, pack (pairs/s);
- the loader end to end with 0 workers (everything in the training process: what one worker
  can do) and with 1, 2 and 4 DataLoader workers: pairs/s and MB/s of shard bytes consumed.
  Workers hand batches over in a ring of recycled shared arenas (`data/handover.py`); with one
  worker the run also times a fresh shared block per batch (the DataLoader's way) beside it.
  The training process reads one value per 4 kB page of each batch's features, as a step reads
  them all, so that page faults of the hand-over are counted.
The shards sit in the page cache after the first pass, so disk speed is not measured: these are
the CPU costs of the loader.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, environment, save_result  # noqa: E402

from uniter_fast.data.collate import collate, extension_loaded  # noqa: E402
from uniter_fast.data.pipeline import (  # noqa: E402
    BadSamples,
    ImageStream,
    Loader,
    TrainSource,
)
from uniter_fast.data.shards import ImageRecord, ShardWriter, list_shards  # noqa: E402
from uniter_fast.tasks import NegativeImageSampler, build_example  # noqa: E402

MIX = {"itm": 6, "mlm": 8, "mrfr": 4, "mrckl": 4}


def write_corpus(out: Path, images: int, seed: int = 0, per_shard: int = 250) -> list[Path]:
    rng = np.random.default_rng(seed)
    with ShardWriter(out, prefix="bench", max_samples=per_shard, overwrite=True) as writer:
        for i in range(images):
            n = int(rng.integers(10, 101))
            soft = rng.random((n, 1601), dtype=np.float32)
            soft /= soft.sum(axis=1, keepdims=True)
            xy = rng.random((n, 2)) * 0.5
            wh = rng.random((n, 2)) * 0.5
            loc = np.concatenate([xy, xy + wh, wh, wh[:, :1] * wh[:, 1:]], axis=1)
            caption = rng.integers(999, 28996, size=int(rng.integers(6, 59))).astype(np.int32)
            writer.write(
                ImageRecord(
                    key=f"img{i:07d}",
                    feat=rng.standard_normal((n, 2048), dtype=np.float32).astype(np.float16),
                    loc=loc.astype(np.float32),
                    soft=soft.astype(np.float16),
                    captions=[caption],
                    meta={"image_id": str(i)},
                )
            )
    return writer.paths


def stage_rates(urls: list[str], images: int, tokens_per_batch: int) -> dict:
    """Per-stage costs in this process: reading `images` images, then building and packing
    examples of the first 500."""
    stream = ImageStream(urls, mode="resampled", seed=0, bad=BadSamples())
    records = [next(stream) for _ in range(min(images, 500))]  # kept for the later stages
    # Steady state, as in the loader: records are dropped as soon as they are read, so the
    # allocator reuses memory instead of faulting in fresh pages for every member.
    t0 = time.perf_counter()
    for _ in range(images):
        next(stream)
    read_s = time.perf_counter() - t0
    stream.close()
    negatives = NegativeImageSampler(len(records))
    for r in records:
        negatives.add(r)
    rng = np.random.default_rng(0)
    out = {"read_decode_validate": {"images_per_s": images / read_s}}
    for task in ("mlm", "mrckl", "itm"):
        t0 = time.perf_counter()
        examples = [
            build_example(task, r.captions[0], r, rng, negatives=negatives) for r in records
        ]
        build_s = time.perf_counter() - t0
        # Pack in batches of about the budget, as the loader does.
        batches, cur, tokens = [], [], 0
        for ex in examples:
            cost = len(ex["input_ids"]) + ex["img_feat"].shape[0]
            if cur and tokens + cost > tokens_per_batch:
                batches.append(cur)
                cur, tokens = [], 0
            cur.append(ex)
            tokens += cost
        batches.append(cur)
        collate(batches[0], task)  # warm-up: first-touch page faults of the allocator
        t0 = time.perf_counter()
        for b in batches:
            collate(b, task)
        pack_s = time.perf_counter() - t0
        out[f"build_{task}"] = {"pairs_per_s": len(examples) / build_s}
        out[f"pack_{task}"] = {"pairs_per_s": len(examples) / pack_s}
    return out


def loader_rate(
    urls: list[str],
    workers: int,
    seconds: float,
    tokens_per_batch: int,
    bytes_per_pair: float,
    recycle: bool = True,
) -> dict:
    loader = Loader(
        [TrainSource("bench", urls, MIX)],
        tokens_per_batch=tokens_per_batch,
        seed=0,
        num_workers=workers,
        block_images=500,
        recycle_buffers=recycle,
    )
    # Warm-up: every worker has read its first block and built a batch.
    for _ in range(max(workers, 1) * 2):
        next(loader)
    pairs = batches = 0
    checksum = 0.0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        _, batch = next(loader)
        pairs += batch.num_pairs
        batches += 1
        # One read per 4 kB page of the features, as the step reads them all (a GPU copy or a
        # CPU forward): a hand-over whose pages are new to this process pays their faults here.
        page = 4096 // batch.img_feat.element_size()
        checksum += float(batch.img_feat.reshape(-1)[::page].float().sum())
    elapsed = time.perf_counter() - t0
    one_off = loader.one_off_buffers
    loader.close()
    rate = pairs / elapsed
    return {
        "workers": workers,
        "handover": ("ring" if recycle else "fresh") if workers else "in process",
        "one_off_buffers": one_off if workers and recycle else None,
        "pairs_per_s": rate,
        "pairs_per_s_per_worker": rate / max(workers, 1),
        "batches_per_s": batches / elapsed,
        "mb_per_s": rate * bytes_per_pair / 1e6,
        "seconds": elapsed,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=3000, help="images in the corpus")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2, 4])
    parser.add_argument("--seconds", type=float, default=10.0, help="timed seconds per setup")
    parser.add_argument("--tokens-per-batch", type=int, default=8192)
    parser.add_argument("--data", type=Path, help="corpus folder (default: a temporary one)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: tiny corpus, 1 s")
    parser.add_argument(
        "--no-fresh",
        action="store_true",
        help="skip the one-worker run with a fresh shared block per batch (the comparison)",
    )
    parser.add_argument("--out", type=Path, help="result file or folder (default: runs/bench/)")
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.seconds, args.workers = 300, 1.0, [0, 1]

    with tempfile.TemporaryDirectory() as tmp:
        root = args.data or Path(tmp)
        urls = list_shards(str(root)) if args.data and any(root.glob("*.tar")) else None
        if urls is None:
            print(f"writing {args.images} images to {root} ...", flush=True)
            urls = [str(p) for p in write_corpus(root, args.images)]
        total_bytes = sum(os.path.getsize(u) for u in urls)
        bytes_per_pair = total_bytes / args.images
        print(
            f"{len(urls)} shards, {total_bytes / 1e6:.0f} MB, "
            f"{bytes_per_pair / 1e3:.0f} kB per pair"
        )
        print(f"C++ extension loaded: {extension_loaded()}")

        stages = stage_rates(urls, min(args.images, 1000), args.tokens_per_batch)
        print("\nstages, in this process:")
        for name, value in stages.items():
            ((unit, rate),) = value.items()
            print(f"  {name:24s} {rate:10,.0f} {unit.replace('_per_s', '/s')}")

        runs = []
        print("\nloader end to end:")
        print(
            f"  {'workers':>7s} {'hand-over':>10s} {'pairs/s':>10s} {'per worker':>11s} "
            f"{'MB/s':>8s}"
        )
        # With one worker, the ring and the DataLoader's way (a fresh shared block per batch)
        # side by side, interleaved so that both see the same machine.
        setups = [(w, True) for w in args.workers]
        if 1 in args.workers and not args.no_fresh:
            setups.insert(args.workers.index(1) + 1, (1, False))
        for workers, recycle in setups:
            r = loader_rate(
                urls, workers, args.seconds, args.tokens_per_batch, bytes_per_pair, recycle
            )
            runs.append(r)
            print(
                f"  {workers:7d} {r['handover']:>10s} {r['pairs_per_s']:10,.0f} "
                f"{r['pairs_per_s_per_worker']:11,.0f} {r['mb_per_s']:8,.0f}"
            )

    result = {
        "benchmark": "loader",
        "environment": environment("cpu"),
        "command": command_line(),
        "cpu_count": os.cpu_count(),
        "extension_loaded": extension_loaded(),
        "corpus": {
            "images": args.images,
            "captions_per_image": 1,
            "regions": [10, 100],
            "caption_tokens": [8, 60],
            "shard_bytes": total_bytes,
            "bytes_per_pair": bytes_per_pair,
        },
        "tokens_per_batch": args.tokens_per_batch,
        "mix": MIX,
        "stages": stages,
        "loader": runs,
    }
    path = save_result("loader", result, args.out)
    print(f"\nsaved {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
