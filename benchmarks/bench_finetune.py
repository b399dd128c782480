"""Fine-tuning and evaluation throughput for VQA and NLVR2: our packed step against the authors'.

    python benchmarks/bench_finetune.py                         # CUDA: base and large, vqa + nlvr2
    python benchmarks/bench_finetune.py --device cpu --quick    # a smoke run: tiny, few steps
    python benchmarks/bench_e2e.py --task vqa ...               # the same, from bench_e2e

Examples of realistic size (`workload.make_pairs`' images: 10..100 regions; VQA questions of 4
to 14 tokens with soft scores over 3129 answers; NLVR2 statements of 8..60 tokens over two
images, paired-attn), batched to each recipe's token budget (configs/finetune/*-base.yaml,
-large.yaml; tiny: 2048). Providers:

- `fast`: `UniterForVqa` / `UniterForNlvr2` on packed batches (the C++ packer, pinned on CUDA),
  attention `auto`, bf16 autocast on CUDA, fused AdamW (`TorchStep`).
- `authors`: the reference's padded models re-implemented (`uniter_fast.authors.downstream`):
  padded batches through `gather_index`, an additive mask and eager attention, the reference's
  per-parameter AdamW loops.

Both start from the same weights and, before anything is timed, must give the same loss on the
first batch in fp32 eval mode (rtol 1e-4 on the CPU, 2e-3 on CUDA). Reported per task, model
and provider: training examples/s and real tokens/s (interleaved rounds, as bench_e2e), and
evaluation examples/s (no_grad forward over every batch, eval mode); the speed-up of `fast`
over `authors` is the median of per-round ratios.
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

import bench_e2e as e2e  # noqa: E402
from common import command_line, environment, save_result  # noqa: E402
from workload import make_pairs  # noqa: E402

import uniter_fast as uf  # noqa: E402
from uniter_fast.authors import downstream as authors  # noqa: E402
from uniter_fast.config import OptimConfig, RunConfig, UniterConfig  # noqa: E402
from uniter_fast.data.schema import BERT_BASE_CASED  # noqa: E402
from uniter_fast.tasks.finetune import example_tokens, token_batches  # noqa: E402

NAME = "finetune"
TASKS = ("vqa", "nlvr2")
NUM_ANSWERS = 3129


def recipe(task: str, model: str) -> tuple[int, int]:
    """(real tokens per micro-batch, micro-batches per step) of the task's recipe."""
    if model == "tiny":
        return 2048, 1
    cfg = RunConfig.from_file(e2e.REPO_ROOT / f"configs/finetune/{task}-{model}.yaml")
    return cfg.data.tokens_per_batch, cfg.optim.grad_accum


def make_examples(task: str, tokens: int, count: int, seed: int) -> list[list[dict]]:
    """`count` batches of examples of `task`, each within `tokens` real tokens."""
    rng = np.random.default_rng(seed)
    pairs, _ = make_pairs((tokens + 400) * count * (2 if task == "nlvr2" else 1), 1, seed)
    vocab = BERT_BASE_CASED
    examples = []
    if task == "vqa":
        for caption, image in pairs:
            q = caption[: int(rng.integers(4, 15))]
            targets = np.zeros(NUM_ANSWERS, dtype=np.float32)
            hot = rng.choice(NUM_ANSWERS, size=int(rng.integers(1, 4)), replace=False)
            targets[hot] = rng.choice([0.3, 0.6, 0.9, 1.0], size=hot.size)
            ids = np.concatenate([[vocab.cls_id], q, [vocab.sep_id]]).astype(np.int64)
            examples.append(
                {"input_ids": ids, "img_feat": image.feat, "img_loc": image.loc, "targets": targets}
            )
    else:
        for (caption, left), (_, right) in zip(pairs[0::2], pairs[1::2], strict=False):
            ids = np.concatenate([[vocab.cls_id], caption, [vocab.sep_id]]).astype(np.int64)
            examples.append(
                {
                    "input_ids": ids,
                    "img_feat": (left.feat, right.feat),
                    "img_loc": (left.loc, right.loc),
                    "target": bool(rng.integers(2)),
                }
            )
    order = rng.permutation(len(examples))
    batches = token_batches(examples, order, tokens, "nlvr2" if task == "nlvr2" else "vqa")
    full = [b for b in batches if sum(example_tokens(examples[i], task) for i in b) > tokens * 0.8]
    return [[examples[i] for i in b] for b in full[:count]]


def _models(task: str, config: UniterConfig):
    torch.manual_seed(0)
    if task == "vqa":
        ours = uf.UniterForVqa(config, num_answers=NUM_ANSWERS)
        theirs = authors.UniterForVisualQuestionAnswering(config, 2048, NUM_ANSWERS)
    else:
        ours = uf.UniterForNlvr2(config, variant="paired-attn")
        theirs = authors.UniterForNlvr2PairedAttn(config, 2048)
        theirs.init_type_embedding()
    theirs.load_state_dict(uf.export_reference(ours), strict=True)
    return ours, theirs


def providers(task: str, config: UniterConfig, s, accum: int) -> dict:
    optim = OptimConfig(lr=5e-5, warmup_steps=10, grad_accum=accum)
    ours, theirs = _models(task, config)
    ours.to(s.device).train()
    dtype = torch.bfloat16 if s.cuda else None
    ours.set_attention("auto", s.device, s.varlen_dropout, dtype=dtype)
    theirs.to(s.device).train()

    def our_forward(m, batch, _task):
        return m(batch)

    def their_forward(m, batch, _task):
        return {"loss": authors.reduce_loss(task, m(batch), batch)}

    fast = e2e._torch_step(ours, optim, s, reference_loops=False, forward_fn=our_forward)
    slow = e2e._torch_step(theirs, optim, s, reference_loops=True, forward_fn=their_forward)
    return {
        "fast": {
            "step": fast,
            "collate": lambda ex: e2e._pin(uf.data.collate(ex, task=ours.task), s.cuda),
            "to_device": lambda b: b.to(s.device, non_blocking=True),
            "scores": lambda m, b: m(b)["scores"],
        },
        "authors": {
            "step": slow,
            "collate": lambda ex: e2e._pin(authors.collate(ex, task), s.cuda),
            "to_device": lambda b: authors_batch_to(b, s.device),
            "scores": lambda m, b: m(b, compute_loss=False),
        },
    }


def authors_batch_to(batch, device):
    from uniter_fast.authors.collate import batch_to

    return batch_to(batch, device)


def _loss(p, batch) -> float:
    step = p["step"]
    step.model.eval()
    with torch.no_grad():
        value = float(step.forward_fn(step.model, batch, None)["loss"])
    step.model.train()
    return value


def _train_block(p, host, plan, s) -> float:
    e2e._sync(s)
    t0 = time.perf_counter()
    for micro in plan:
        for k in micro:
            out = p["step"].forward(p["to_device"](host[k]), None)
            p["step"].backward(out["loss"])
        p["step"].step()
    e2e._sync(s)
    return time.perf_counter() - t0


def _eval_block(p, host, s) -> float:
    model = p["step"].model
    model.eval()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if s.cuda else contextlib.nullcontext()
    e2e._sync(s)
    t0 = time.perf_counter()
    with torch.no_grad(), autocast:
        for batch in host:
            p["scores"](model, p["to_device"](batch))
    e2e._sync(s)
    model.train()
    return time.perf_counter() - t0


def bench(task: str, model_name: str, s) -> dict:
    config = UniterConfig.from_json(e2e.REPO_ROOT / e2e.MODELS[model_name])
    tokens, accum = recipe(task, model_name)
    if s.tokens_per_batch:
        tokens = s.tokens_per_batch
    batches = make_examples(task, tokens, s.batches, s.seed)
    n_examples = [len(b) for b in batches]
    n_tokens = [sum(example_tokens(ex, task) for ex in b) for b in batches]
    ps = providers(task, config, s, accum)
    host = {name: [p["collate"](b) for b in batches] for name, p in ps.items()}
    # The same loss from both before anything is timed.
    rtol = 2e-3 if s.cuda else 1e-4
    losses = {name: _loss(p, p["to_device"](host[name][0])) for name, p in ps.items()}
    if abs(losses["fast"] - losses["authors"]) > 1e-6 + rtol * abs(losses["authors"]):
        raise RuntimeError(f"{task}: the providers' losses disagree: {losses}")
    plan = [[(i * accum + j) % len(batches) for j in range(accum)] for i in range(s.steps)]
    for p_name, p in ps.items():
        _train_block(p, host[p_name], plan[: max(s.warmup, 1)], s)
        _eval_block(p, host[p_name][:1], s)
    rounds = {name: [] for name in ps}
    names = list(ps)
    for r in range(s.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            train_s = _train_block(ps[name], host[name], plan, s)
            eval_s = _eval_block(ps[name], host[name], s)
            ex = sum(n_examples[k] for micro in plan for k in micro)
            tok = sum(n_tokens[k] for micro in plan for k in micro)
            rounds[name].append(
                {
                    "train_examples_per_s": ex / train_s,
                    "train_tokens_per_s": tok / train_s,
                    "eval_examples_per_s": sum(n_examples) / eval_s,
                }
            )
    out = {
        "tokens_per_batch": tokens,
        "grad_accum": accum,
        "examples_per_batch": statistics.mean(n_examples),
        "loss_check": losses,
        "providers": {},
    }
    for name, rs in rounds.items():
        out["providers"][name] = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        out["providers"][name]["rounds"] = rs
    out["speedup_over_authors"] = {
        k: statistics.median(
            a[k] / b[k] for a, b in zip(rounds["fast"], rounds["authors"], strict=True)
        )
        for k in rounds["fast"][0]
    }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    argv = list(sys.argv[1:] if argv is None else argv)
    a, rest = p.parse_known_args(argv)
    s = e2e.parse_args(rest)
    payload = {
        "benchmark": NAME,
        "command": command_line(),
        "environment": environment(s.device),
        "settings": {
            "steps": s.steps,
            "rounds": s.rounds,
            "batches": s.batches,
            "precision": s.precision,
            "quick": s.quick,
            "seed": s.seed,
        },
        "results": {},
    }
    for task in a.tasks:
        for model in s.models:
            r = bench(task, model, s)
            payload["results"][f"{task}/{model}"] = r
            f, au = r["providers"]["fast"], r["providers"]["authors"]
            up = r["speedup_over_authors"]
            print(
                f"{task} {model}: {r['tokens_per_batch']} tokens x {r['grad_accum']}, "
                f"{r['examples_per_batch']:.0f} examples per batch; train examples/s fast "
                f"{f['train_examples_per_s']:,.1f} authors {au['train_examples_per_s']:,.1f} "
                f"({up['train_examples_per_s']:.2f}x); eval examples/s fast "
                f"{f['eval_examples_per_s']:,.1f} authors {au['eval_examples_per_s']:,.1f} "
                f"({up['eval_examples_per_s']:.2f}x)"
            )
    print(f"bench_finetune: wrote {save_result(NAME, payload, s.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
