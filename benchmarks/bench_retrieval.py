"""Retrieval throughput: the full evaluation's scoring (pairs/s) and the hard-negative step, our
packed approach against the authors' padded one, in one run.

    python benchmarks/bench_retrieval.py                       # CUDA: base and large
    python benchmarks/bench_retrieval.py --device cpu          # tiny, smaller candidate sets
    python benchmarks/bench_retrieval.py --device cpu --quick  # a smoke run

Workload: images of the shared synthetic workload (`workload.generate_images`: 10..100 regions,
captions of 8..60 tokens), every caption of `--images` images against every one of them.

Full evaluation (every text against every image):
- `fast`: `score_rows` of `uniter_fast.tasks.retrieval`: all (text, image) pairs of a block of
  texts packed into batches of `--tokens-per-batch` real tokens, `UniterForRetrieval`, attention
  `auto`, bf16 autocast on CUDA.
- `authors`: the reference's `inference` (utils/itm_eval.py): per text, its pairs with the images
  in mini-batches of `--eval-images` (the reference's 400), padded to the longest, through the
  re-implemented padded model (`uniter_fast.authors.downstream.UniterForImageTextRetrieval`),
  fp16/bf16 autocast on CUDA as apex O2 would.
The two must give the same scores (fp32, before timing) within rtol 1e-4 (CPU) or 2e-2 (CUDA).

Hard-negative step (both directions: one caption against its image and `--negative-size`
images, one image against one of its captions and `--negative-size` captions; the
`--hard-neg-size` best negatives of each trained on):
- `fast`: `mine_and_train`: candidates scored in packed batches, the hard batch packed.
- `authors`: the reference's `UniterForImageTextRetrievalHardNeg`: each direction's candidates
  as one padded batch of negative_size + 1 sequences, `topk`, the hard batch cut from it.
Timed: scoring, the training forward and backward (no optimizer step, the same for both).

Reported: pairs/s of the evaluation and its speed-up, the hours a COCO 5k test evaluation
(25,010 captions x 5,000 images) would take at that rate on one device, and steps/s of the
hard-negative step with its speed-up (medians of interleaved rounds).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import command_line, environment, save_result  # noqa: E402
from workload import generate_images  # noqa: E402

import uniter_fast as uf  # noqa: E402
from uniter_fast.authors import downstream as authors  # noqa: E402
from uniter_fast.authors.collate import batch_to  # noqa: E402
from uniter_fast.config import UniterConfig  # noqa: E402
from uniter_fast.data.schema import BERT_BASE_CASED  # noqa: E402
from uniter_fast.tasks.retrieval import (  # noqa: E402
    HardNegativeWork,
    RetrievalSplit,
    mine_and_train,
    score_rows,
)

NAME = "retrieval"
REPO = Path(__file__).resolve().parent.parent
MODELS = {
    "tiny": "configs/model/uniter-tiny.json",
    "base": "configs/model/uniter-base.json",
    "large": "configs/model/uniter-large.json",
}
COCO_5K_PAIRS = 25_010 * 5_000


def make_split(images: int, seed: int) -> RetrievalSplit:
    vocab = BERT_BASE_CASED
    split = RetrievalSplit()
    for j, image in enumerate(generate_images(images, seed=seed)):
        split.img_ids.append(image.key)
        split.images.append((image.feat, image.loc))
        own = []
        for caption in image.captions:
            own.append(len(split.texts))
            split.txt_ids.append(f"{image.key}/{len(own)}")
            split.texts.append(np.array([vocab.cls_id, *caption, vocab.sep_id], dtype=np.int64))
            split.txt2img.append(j)
        split.img2txts.append(own)
    return split


def _sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def _autocast(cuda: bool):
    return torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()


def authors_rows(model, split, rows, eval_images: int, device) -> np.ndarray:
    """The reference's inference loop over `rows` texts: per text, padded mini-batches of images."""
    out = np.empty((len(rows), split.num_images), dtype=np.float32)
    for r, t in enumerate(rows):
        for a in range(0, split.num_images, eval_images):
            js = range(a, min(a + eval_images, split.num_images))
            batch = authors.collate([split.example(t, j) for j in js], "retrieval")
            scores = model(batch_to(batch, device), compute_loss=False)
            out[r, a : a + len(js)] = scores.squeeze(1).float().cpu().numpy()
    return out


def authors_hard_step(model, split, work: HardNegativeWork, device) -> torch.Tensor:
    """The reference's hard-negative forward for each group (padded), loss summed over both."""
    total = 0.0
    for g in work.groups:
        batch = batch_to(authors.collate([split.example(t, i) for t, i in g], "retrieval"), device)
        model.eval()
        with torch.no_grad():
            scores = model(batch, compute_loss=False).squeeze(-1)
        model.train()
        hard = scores[1:].topk(work.hard_neg_size, sorted=False)[1] + 1
        keep = [0, *hard.tolist()]
        # The reference cuts the hard batch out of the padded candidates (index_select); the
        # same rows, collated again, are what it then trains on.
        hard_batch = authors.collate(
            [split.example(*g[j]) | {"target": int(k == 0)} for k, j in enumerate(keep)],
            "retrieval",
        )
        hard_batch["sample_size"] = len(keep)
        total = total + model(batch_to(hard_batch, device), compute_loss=True).mean()
    return total


def _work(split, rng, negative_size: int, hard_neg_size: int, tokens: int) -> HardNegativeWork:
    t = int(rng.integers(split.num_texts))
    i = split.txt2img[t]
    imgs = [j for j in rng.permutation(split.num_images) if j != i][:negative_size]
    own = set(split.img2txts[i])
    txts = [u for u in rng.permutation(split.num_texts) if u not in own][:negative_size]
    pos = int(rng.choice(split.img2txts[i]))
    groups = [[(t, i)] + [(t, j) for j in imgs], [(pos, i)] + [(u, i) for u in txts]]
    return HardNegativeWork(split, groups, hard_neg_size, tokens)


class _Engine:
    """What `mine_and_train` calls: the model, eval/train switches (bf16 autocast on CUDA)."""

    def __init__(self, model, cuda):
        self.module, self.cuda = model, cuda

    def __call__(self, batch):
        with _autocast(self.cuda):
            return self.module(batch)

    def eval(self):
        self.module.eval()

    def train(self, mode=True):
        self.module.train(mode)


def bench(model_name: str, a, device) -> dict:
    cuda = device.type == "cuda"
    config = UniterConfig.from_json(REPO / MODELS[model_name])
    torch.manual_seed(0)
    ours = uf.UniterForRetrieval(config, img_dim=2048)
    theirs = authors.UniterForImageTextRetrieval(config, 2048)
    theirs.load_state_dict(uf.export_reference(ours), strict=True)
    split = make_split(a.images, a.seed)
    rows = range(0, min(a.eval_texts, split.num_texts))

    # Same scores before timing (fp32, eval).
    check = range(0, min(2, split.num_texts))
    ours.to(device).eval()
    theirs.to(device).eval()
    ours.set_attention("auto", device, "keep", dtype=None)
    with torch.no_grad():
        mine = score_rows(ours, split, check, tokens_per_batch=a.tokens_per_batch, device=device)
        ref = authors_rows(theirs, split, check, a.eval_images, device)
    rtol = 2e-2 if cuda else 1e-4
    if not np.allclose(mine, ref, rtol=rtol, atol=rtol):
        raise RuntimeError(f"the providers' scores disagree: {np.abs(mine - ref).max()}")
    if cuda:
        ours.set_attention("auto", device, "keep", dtype=torch.bfloat16)

    def eval_fast():
        with torch.no_grad(), _autocast(cuda):
            score_rows(ours, split, rows, tokens_per_batch=a.tokens_per_batch, device=device)

    def eval_authors():
        with torch.no_grad(), _autocast(cuda):
            authors_rows(theirs, split, rows, a.eval_images, device)

    rng = np.random.default_rng(a.seed)
    works = [
        _work(split, rng, a.negative_size, a.hard_neg_size, a.tokens_per_batch)
        for _ in range(a.steps)
    ]
    for w in works:
        w.to(device)

    def hard_fast():
        ours.train()
        engine = _Engine(ours, cuda)
        for w in works:
            out = mine_and_train(engine, w)
            out["loss"].backward()
            ours.zero_grad(set_to_none=True)

    def hard_authors():
        theirs.train()
        for w in works:
            with _autocast(cuda):
                loss = authors_hard_step(theirs, split, w, device)
            loss.backward()
            theirs.zero_grad(set_to_none=True)

    cases = {
        "eval": {"fast": eval_fast, "authors": eval_authors},
        "hard": {"fast": hard_fast, "authors": hard_authors},
    }
    for fns in cases.values():  # warm-up
        for fn in fns.values():
            fn()
    pairs = len(rows) * split.num_images
    rounds = {case: {p: [] for p in fns} for case, fns in cases.items()}
    for r in range(a.rounds):
        for case, fns in cases.items():
            names = list(fns)
            for name in names[r % 2 :] + names[: r % 2]:
                _sync(cuda)
                t0 = time.perf_counter()
                fns[name]()
                _sync(cuda)
                rounds[case][name].append(time.perf_counter() - t0)
    ev = {p: pairs / statistics.median(ts) for p, ts in rounds["eval"].items()}
    hard = {p: a.steps / statistics.median(ts) for p, ts in rounds["hard"].items()}
    return {
        "images": split.num_images,
        "texts_scored": len(rows),
        "mean_regions": float(np.mean([len(f) for f, _ in split.images])),
        "mean_text_tokens": float(np.mean([len(t) for t in split.texts])),
        "eval_pairs_per_s": ev,
        "eval_speedup": statistics.median(
            b / f for f, b in zip(rounds["eval"]["fast"], rounds["eval"]["authors"], strict=True)
        ),
        "coco5k_hours_one_device": {p: COCO_5K_PAIRS / v / 3600 for p, v in ev.items()},
        "hard_steps_per_s": hard,
        "hard_speedup": statistics.median(
            b / f for f, b in zip(rounds["hard"]["fast"], rounds["hard"]["authors"], strict=True)
        ),
        "negative_size": a.negative_size,
        "hard_neg_size": a.hard_neg_size,
        "rounds": rounds,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", nargs="+", choices=tuple(MODELS))
    p.add_argument("--images", type=int, help="images of the split (CUDA 400, CPU 40)")
    p.add_argument("--eval-texts", type=int, help="texts scored against all images (CUDA 16)")
    p.add_argument("--eval-images", type=int, default=400, help="the authors' mini-batch (400)")
    p.add_argument("--tokens-per-batch", type=int, default=8192)
    p.add_argument("--negative-size", type=int, help="hard-negative candidates (CUDA 399)")
    p.add_argument("--hard-neg-size", type=int, help="hard negatives kept (CUDA 31)")
    p.add_argument("--steps", type=int, default=2, help="hard-negative steps per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smoke run: tiny, few pairs, 1 round")
    p.add_argument("--out", type=Path, help="result file or folder (default: runs/bench/)")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available")
    cuda = device.type == "cuda"
    models = a.models or (["base", "large"] if cuda else ["tiny"])
    if a.quick:
        models, a.rounds, a.steps = a.models or ["tiny"], 1, 1
    a.images = a.images or (400 if cuda else (12 if a.quick else 40))
    a.eval_texts = a.eval_texts or (16 if cuda else (2 if a.quick else 8))
    a.negative_size = a.negative_size or (399 if cuda else (11 if a.quick else 39))
    a.hard_neg_size = a.hard_neg_size or (31 if cuda else 3)
    payload = {
        "benchmark": NAME,
        "command": command_line(),
        "environment": environment(device),
        "settings": {k: v for k, v in vars(a).items() if k != "out"} | {"models": models},
        "results": {},
    }
    for model in models:
        r = bench(model, a, device)
        payload["results"][model] = r
        ev, hard = r["eval_pairs_per_s"], r["hard_steps_per_s"]
        print(
            f"{model}: full evaluation {ev['fast']:,.0f} pairs/s (authors {ev['authors']:,.0f}, "
            f"{r['eval_speedup']:.2f}x; COCO 5k on one device "
            f"{r['coco5k_hours_one_device']['fast']:.1f} h vs "
            f"{r['coco5k_hours_one_device']['authors']:.1f} h); hard-negative step "
            f"({r['negative_size']} -> {r['hard_neg_size']}) {hard['fast']:.2f} steps/s "
            f"(authors {hard['authors']:.2f}, {r['hard_speedup']:.2f}x)"
        )
    print(f"bench_retrieval: wrote {save_result(NAME, payload, a.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
