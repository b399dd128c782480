"""End to end: real tokens/s, MFU and the step's time split of UNITER pretraining, per provider.

    python benchmarks/bench_e2e.py                         # CUDA: base and large, every provider
    python benchmarks/bench_e2e.py --models large --providers fast authors
    python benchmarks/bench_e2e.py --device cpu --quick    # a smoke run: tiny model, few steps
    python benchmarks/bench_e2e.py --task vqa              # fine-tuning: see bench_finetune.py
    python benchmarks/bench_e2e.py --gate                  # the CPU regression gate's run (CI)
    python benchmarks/plot_e2e.py runs/bench/e2e-*.json
    python benchmarks/check_regression.py runs/bench/e2e-....json

Every provider trains on the same micro-batches in the same order: the reference's task mix
(COCO's itm:mlm:mrfr:mrckl = 6:8:4:4, drawn once by `TaskMixer`), `--batches` distinct batches
per task of realistic pairs (captions 8..60 tokens, 10..100 regions; `workload.py`), each within
the model's real-token budget, gradients accumulated over the recipe's micro-batches per step.
Providers:

- `fast`: this project's step. `UniterForPretraining` on packed batches (C++ collate), the fused
  kernels (`kernels=auto`), attention `auto` (flash-attn varlen > torch varlen > padded SDPA;
  `--varlen-dropout`), bf16 autocast, fused AdamW and foreach clipping (`TorchStep`: nothing in
  the step waits for the host; tests/test_step.py holds it to that).
- `fast_deepspeed`: the same model through the trainer's engine (DeepSpeed ZeRO-1 on one rank,
  bf16 weights with fp32 master copies): what `train.py` runs. Present when deepspeed imports.
- `fast_graphs`: `fast` with static shapes: every batch padded to one `StaticShape` covering
  the run's batches (`uniter_fast.data.static`), and each task's forward and backward captured
  once in a CUDA graph and replayed (`TorchStep(graphs="capture")`); on the CPU the same step
  without capture (`graphs="eager"`). Its forward phase holds the backward too (one graph).
  The remedy for a host-bound step (NOTES, "Is the fast step host-bound?").
- `plain`: the same model and step with the fused kernels off (`kernels=reference`) and attention
  on the padded SDPA view: what the kernels and varlen attention buy.
- `authors`: the reference's approach, re-implemented (`uniter_fast.authors`): padded batches, an
  additive mask and eager attention, boolean-mask target selection, the WRA scatter and the
  unfused 50-iteration IPOT loop, per-parameter AdamW and clipping loops (the reference's
  Python AdamW), eager. bf16 autocast where the others use bf16 (the reference used apex fp16).
- `visualbert`: HuggingFace transformers' `VisualBertForPreTraining` at the same size (an
  outside peer; `pip install transformers`), its own objective (MLM over every position plus
  sentence-image matching) on padded batches of the same pairs (the MLM batches' masks).

Timing: `--warmup` untimed steps per provider, then `--rounds` rounds; in each, every provider
runs the same `--steps` optimizer steps in turn (the order rotates from round to round), so a slow
spell of a shared machine lands on all of them alike. Reported per model and provider: real
tokens/s and pairs/s over the timed steps (wall clock, synchronised at the ends), the mean
step split (data: issuing the host-to-device copies of pre-collated pinned batches; forward,
backward, optimizer: CUDA event spans; other: the rest of the wall time, where the GPU waited
for the host), peak memory, and MFU: useful FLOPs over time over the peak FLOP/s measured in the
same run with a large matrix product. Useful FLOPs count the
matrix products of the real positions only (`workload.train_flops`: encoder, region embedder,
the task's head), the same for every provider, so padding and recomputation earn nothing. The
6N count (6 x parameters x real tokens, the usual rule of thumb) is recorded beside it. Collation
runs in loader workers during training; its cost per batch is measured apart (`collate_ms`).

Before anything is timed, `fast`, `plain` and `authors` compute every task's losses on one batch
in fp32 (eval mode) and must agree (rtol 1e-4 on the CPU, 2e-3 on CUDA where the kernels' fp32
dot products run in TF32), and under bf16 autocast on CUDA within 5e-2; the run stops if not.
Results: `runs/bench/e2e-<device class>-<UTC time>.json`; `--out benchmarks/results/` for the
figures the project commits.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from common import REPO_ROOT, command_line, device_class, environment, save_result
from workload import (
    BUCKET_PAIRS,
    MAX_EXAMPLE_TOKENS,
    BatchShape,
    encoder_matmul_params,
    fill_task_batches,
    make_pairs,
    pairs_needed,
    shape_summary,
    train_flops,
)

import uniter_fast as uf
from uniter_fast.authors import collate as authors_collate
from uniter_fast.authors import model as authors_model
from uniter_fast.config import DEFAULT_MIX, OptimConfig, RunConfig, UniterConfig
from uniter_fast.data.static import StaticShape, pad_static
from uniter_fast.ops import describe_kernels
from uniter_fast.tasks import TaskMixer
from uniter_fast.train.step import TorchStep

NAME = "e2e"
QUESTION = (
    "How many real tokens/s does UNITER pretraining reach end to end (MFU, step split, memory), "
    "against the reference's approach and VisualBERT, on the same batches?"
)
PROVIDERS = ("fast", "fast_graphs", "fast_deepspeed", "plain", "authors", "visualbert")
MODELS = {
    "tiny": "configs/model/uniter-tiny.json",
    "base": "configs/model/uniter-base.json",
    "large": "configs/model/uniter-large.json",
}
# The recipe's real-token budget and accumulation per model (configs/pretrain/*.yaml).
RECIPES = {
    "base": "configs/pretrain/uniter-base.yaml",
    "large": "configs/pretrain/uniter-large.yaml",
}
TINY_BUDGET = (2048, 2)  # the CPU runs: tokens per micro-batch, micro-batches per step
CHECKED = ("fast", "fast_graphs", "plain", "authors")  # the providers whose losses must agree
# The published peak dense bf16 tensor FLOP/s of the GPUs we expect (no sparsity), for context
# beside the measured peak; MFU is taken against the measured one.
SPEC_PEAK_BF16_TFLOPS = {"h100": 989.4, "h200": 989.4, "a100": 312.0}


# --- settings -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """The resolved command line (see --help)."""

    device: torch.device
    models: tuple[str, ...]
    providers: tuple[str, ...]
    tokens_per_batch: int | None
    grad_accum: int | None
    steps: int
    warmup: int
    rounds: int
    batches: int
    order: str
    varlen_dropout: str
    compile: bool
    seed: int
    quick: bool
    gate: bool
    out: Path | None

    def __post_init__(self) -> None:
        for name in ("steps", "rounds", "batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ValueError(f"--warmup must be non-negative, got {self.warmup}")
        if self.tokens_per_batch is not None and self.tokens_per_batch < MAX_EXAMPLE_TOKENS:
            raise ValueError(
                f"--tokens-per-batch must be at least {MAX_EXAMPLE_TOKENS} (the longest "
                f"example), got {self.tokens_per_batch}"
            )
        if self.grad_accum is not None and self.grad_accum < 1:
            raise ValueError(f"--grad-accum must be at least 1, got {self.grad_accum}")

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def precision(self) -> str:
        return "bf16" if self.cuda else "fp32"


def parse_args(argv: list[str] | None = None) -> Settings:
    p = argparse.ArgumentParser(description=QUESTION)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--models", nargs="+", choices=tuple(MODELS), help="default: base large (CUDA), tiny (CPU)"
    )
    p.add_argument("--providers", nargs="+", choices=PROVIDERS, help="default: all that can run")
    p.add_argument(
        "--tokens-per-batch",
        type=int,
        help="real tokens per micro-batch; default: the recipe's (base 10240, large 6144; "
        f"tiny {TINY_BUDGET[0]})",
    )
    p.add_argument(
        "--grad-accum", type=int, help="micro-batches per step; default: the recipe's (6, 4; 2)"
    )
    p.add_argument("--steps", type=int, help="timed optimizer steps per round (default 10; CPU 2)")
    p.add_argument("--warmup", type=int, help="untimed steps first (default 3; CPU 1)")
    p.add_argument("--rounds", type=int, help="rounds of interleaved providers (default 1; CPU 3)")
    p.add_argument("--batches", type=int, default=4, help="distinct batches per task (default 4)")
    p.add_argument(
        "--order",
        choices=("bucketed", "random"),
        help="batch order: bucketed (the authors' sampler, the default) or random (the default of "
        "--quick and --gate: no pool of 8192 pairs to generate)",
    )
    p.add_argument("--varlen-dropout", choices=("keep", "drop"), default="keep")
    p.add_argument("--compile", action="store_true", help="torch.compile the fast model's layers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--quick", action="store_true", help="smoke run: 1 step, 1 round, 1 batch, random order"
    )
    p.add_argument(
        "--gate",
        action="store_true",
        help="the CPU regression gate's run: tiny, random order, fast/plain/authors, 5 rounds "
        "(check_regression.py compares its ratios with benchmarks/baselines/cpu.json)",
    )
    p.add_argument("--out", type=Path, help="result file or folder (default: runs/bench/)")
    a = p.parse_args(argv)

    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available")
    cuda = device.type == "cuda"
    order = a.order or ("random" if a.quick or a.gate else "bucketed")
    if a.gate:
        if cuda:
            p.error("--gate is the CPU gate's run; on a GPU run the benchmark as it is")
        models, providers, order = ("tiny",), ("fast", "plain", "authors"), "random"
    else:
        models = tuple(a.models or (("base", "large") if cuda else ("tiny",)))
        providers = tuple(a.providers or PROVIDERS)

    def pick(given, quick, gate, on_cuda, on_cpu):
        if given is not None:
            return given
        if a.quick:
            return quick
        if a.gate:
            return gate
        return on_cuda if cuda else on_cpu

    try:
        return Settings(
            device=device,
            models=models,
            providers=tuple(dict.fromkeys(providers)),
            tokens_per_batch=a.tokens_per_batch,
            grad_accum=a.grad_accum,
            steps=pick(a.steps, 1, 2, 10, 2),
            warmup=pick(a.warmup, 1, 1, 3, 1),
            rounds=pick(a.rounds, 1, 5, 1, 3),
            batches=1 if a.quick else a.batches,
            order=order,
            varlen_dropout=a.varlen_dropout,
            compile=a.compile,
            seed=a.seed,
            quick=a.quick,
            gate=a.gate,
            out=a.out,
        )
    except ValueError as e:
        p.error(str(e))


def recipe_budget(model: str, s: Settings) -> tuple[int, int]:
    """(real tokens per micro-batch, micro-batches per step) for `model`."""
    if model in RECIPES:
        run = RunConfig.from_file(REPO_ROOT / RECIPES[model])
        tokens, accum = run.data.tokens_per_batch, run.optim.grad_accum
    else:
        tokens, accum = TINY_BUDGET
    return s.tokens_per_batch or tokens, s.grad_accum or accum


# --- providers ----------------------------------------------------------------------------------


@dataclass
class Provider:
    """One way of training: its host batches, its device copy, its step in three phases."""

    name: str
    model: torch.nn.Module
    collate: Callable[[list[dict], str], object]
    to_device: Callable[[object], object]
    forward: Callable[[object, str], dict]
    backward: Callable[[torch.Tensor], None]
    step: Callable[[], None]
    state_bytes: Callable[[], int]
    describe: dict = field(default_factory=dict)
    losses: Callable[[object, str], dict] | None = None  # fp32 eval losses, for the check
    # Turns the provider's collated host batches {task: [batch, ...]} into what it runs (once,
    # before anything is timed); fast_graphs pads them to one static shape here.
    finalize: Callable[[dict], dict] | None = None
    stats: Callable[[], dict] | None = None  # counters for the result (fast_graphs: graphs)


def _pin(batch, cuda: bool):
    if not cuda:
        return batch
    if isinstance(batch, uf.Batch):
        return batch.pin_memory()
    return {
        k: _pin(v, cuda) if isinstance(v, dict) else v.pin_memory() if torch.is_tensor(v) else v
        for k, v in batch.items()
    }


def _torch_step(model, optim, s: Settings, *, reference_loops: bool, forward_fn=None):
    kwargs = {"fused": False, "foreach": False} if reference_loops else {}
    return TorchStep(
        model,
        optim,
        total_steps=10**6,
        device=s.device,
        precision=s.precision,
        forward_fn=forward_fn,
        **kwargs,
    )


def _from_step(name, step: TorchStep, collate, to_device, describe, losses) -> Provider:
    return Provider(
        name=name,
        model=step.model,
        collate=collate,
        to_device=to_device,
        forward=step.forward,
        backward=step.backward,
        step=step.step,
        state_bytes=step.state_bytes,
        describe={"precision": step.precision, "fused_adamw": step.fused, **describe},
        losses=losses,
    )


def _ours(config: UniterConfig, s: Settings, weights, *, kernels: str, attention: str):
    """Our model with the shared initial weights, on the device, attention resolved for bf16."""
    model = uf.UniterForPretraining(config, kernels=kernels, attention=attention)
    model.load_state_dict(weights)
    model.to(s.device).train()
    dtype = torch.bfloat16 if s.cuda else None
    model.set_attention(attention, s.device, s.varlen_dropout, dtype=dtype)
    return model


def _our_io(s: Settings) -> tuple[Callable, Callable]:
    """Our providers' collate (the C++ packer, pinned on CUDA) and device copy."""
    return (
        lambda ex, task: _pin(uf.data.collate(ex, task), s.cuda),
        lambda b: b.to(s.device, non_blocking=True),
    )


def _compile_layers(model: uf.UniterForPretraining) -> None:
    """torch.compile the element-wise-heavy blocks of every layer (dense + GELU; dense, dropout,
    residual and LayerNorm), dynamic in the number of packed rows. Attention stays eager: its
    backends take Python-side lengths that would recompile per batch."""
    for layer in model.uniter.encoder.layer:
        for block in (layer.attention.output, layer.intermediate, layer.output):
            block.compile(dynamic=True)


def _make_ours(name: str, kernels: str, attention: str):
    """fast (kernels auto, attention auto, --compile) or plain (reference ops, padded SDPA):
    one model, one TorchStep; the model itself gives the fp32 losses of the check."""

    def make(config, optim, s: Settings, weights) -> Provider:
        model = _ours(config, s, weights, kernels=kernels, attention=attention)
        compiled = s.compile and name == "fast"
        if compiled:
            _compile_layers(model)
        step = _torch_step(model, optim, s, reference_loops=False)
        choice = model.attention_choice
        describe = {
            "attention": choice.describe() if choice else None,
            "kernels": describe_kernels(kernels, s.device),
            "compiled_layers": compiled,
        }
        return _from_step(name, step, *_our_io(s), describe, model)

    return make


def make_fast_graphs(config, optim, s: Settings, weights) -> Provider:
    """`fast` on static shapes, its micro-steps captured in CUDA graphs (module docstring)."""
    model = _ours(config, s, weights, kernels="auto", attention="auto")
    graphs = "capture" if s.cuda else "eager"
    step = TorchStep(
        model, optim, total_steps=10**6, device=s.device, precision=s.precision, graphs=graphs
    )
    choice = model.attention_choice
    describe = {
        "attention": choice.describe() if choice else None,
        "kernels": describe_kernels("auto", s.device),
        "graphs": graphs,
    }

    def finalize(host: dict) -> dict:
        shape = StaticShape.covering(b for batches in host.values() for b in batches)
        padded = {t: [_pin(pad_static(b, shape), s.cuda) for b in bs] for t, bs in host.items()}
        rows = sum(b.num_rows for bs in padded.values() for b in bs)
        tokens = sum(b.num_tokens for bs in padded.values() for b in bs)
        provider.describe["static_shape"] = dataclasses.asdict(shape)
        provider.describe["padded_rows_per_real_token"] = rows / tokens
        # Every task's graph captured now, so that no timed step pays for a capture.
        for task, batches in padded.items():
            step.graphs.prepare(batches[0], task)
        return padded

    provider = _from_step("fast_graphs", step, _our_io(s)[0], lambda b: b, describe, model)
    provider.forward = step.micro
    provider.backward = lambda loss: None
    provider.finalize = finalize
    provider.stats = step.graphs.describe
    return provider


def make_authors(config, optim, s: Settings, weights) -> Provider:
    ours = uf.UniterForPretraining(config)
    ours.load_state_dict(weights)
    model = authors_model.UniterForPretraining(config)
    model.load_state_dict(uf.export_reference(ours), strict=True)
    model.to(s.device).train()

    def forward_fn(m, batch, task):
        return authors_model.reduce_losses(task, m(batch, task))

    step = _torch_step(model, optim, s, reference_loops=True, forward_fn=forward_fn)
    return _from_step(
        "authors",
        step,
        lambda ex, task: _pin(authors_collate.collate(ex, task), s.cuda),
        lambda b: authors_collate.batch_to(b, s.device),
        {"attention": "eager, additive -10000 mask, padded", "kernels": "none (eager)"},
        lambda batch, task: forward_fn(model, batch, task),
    )


def make_fast_deepspeed(config, optim, s: Settings, weights) -> Provider:
    from uniter_fast.train.engine import Engine, build_deepspeed_config, init_distributed

    init_distributed(s.device)
    model = _ours(config, s, weights, kernels="auto", attention="auto")
    ds_config, _ = build_deepspeed_config(
        {"zero_optimization": {"stage": 1}},
        optim=optim,
        precision="bf16" if s.cuda else "fp32",
        device=s.device,
    )
    engine = Engine(model, optim, total_steps=10**6, deepspeed_config=ds_config, device=s.device)
    counter = {"step": 0}

    def backward(loss):
        engine.backward(loss)
        if not engine.ds.is_gradient_accumulation_boundary():
            engine.step(counter["step"] + 1)  # DeepSpeed's bookkeeping between micro-batches

    def step():
        counter["step"] += 1
        engine.step(counter["step"])

    def state_bytes():
        tensors = [p for p in engine.module.parameters()]
        for state in engine.optimizer.state.values():
            tensors += [t for t in state.values() if torch.is_tensor(t)]
        flat = getattr(engine.optimizer, "single_partition_of_fp32_groups", [])
        tensors += list(flat)
        return sum(t.numel() * t.element_size() for t in tensors)

    return Provider(
        name="fast_deepspeed",
        model=engine.module,
        collate=_our_io(s)[0],
        to_device=_our_io(s)[1],
        forward=lambda batch, task: engine(batch, task),
        backward=backward,
        step=step,
        state_bytes=state_bytes,
        describe={"engine": engine.describe(), "precision": engine.precision},
    )


def make_visualbert(config, optim, s: Settings, weights) -> Provider:
    from transformers import VisualBertConfig, VisualBertForPreTraining

    hf_config = VisualBertConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        intermediate_size=config.intermediate_size,
        hidden_dropout_prob=config.hidden_dropout_prob,
        attention_probs_dropout_prob=config.attention_probs_dropout_prob,
        max_position_embeddings=config.max_position_embeddings,
        type_vocab_size=config.type_vocab_size,
        visual_embedding_dim=2048,
    )
    model = VisualBertForPreTraining(hf_config).to(s.device).train()

    def forward_fn(m, batch, task):
        out = m(**batch)
        return {"loss": out.loss}

    step = _torch_step(model, optim, s, reference_loops=False, forward_fn=forward_fn)
    return _from_step(
        "visualbert",
        step,
        lambda ex, task: _pin(visualbert_collate(ex), s.cuda),
        lambda b: {k: v.to(s.device, non_blocking=True) for k, v in b.items()},
        {
            "model": "transformers.VisualBertForPreTraining",
            "objective": "MLM over all positions + sentence-image matching, every batch "
            "(the MLM batches' masks; VisualBERT takes no box features)",
            "attention": getattr(hf_config, "_attn_implementation", None) or "default",
        },
        None,
    )


def visualbert_collate(examples: list[dict]) -> dict[str, torch.Tensor]:
    """Padded VisualBERT inputs from UNITER examples (MLM masks): text ids, region features."""
    b = len(examples)
    lt = max(len(ex["input_ids"]) for ex in examples)
    li = max(len(ex["img_feat"]) for ex in examples)
    ids = torch.zeros(b, lt, dtype=torch.long)
    txt_mask = torch.zeros(b, lt, dtype=torch.long)
    feats = torch.zeros(b, li, examples[0]["img_feat"].shape[1])
    img_mask = torch.zeros(b, li, dtype=torch.long)
    labels = torch.full((b, lt + li), -100, dtype=torch.long)
    for k, ex in enumerate(examples):
        n, r = len(ex["input_ids"]), len(ex["img_feat"])
        ids[k, :n] = torch.as_tensor(ex["input_ids"])
        txt_mask[k, :n] = 1
        feats[k, :r] = torch.as_tensor(np.asarray(ex["img_feat"], dtype=np.float32))
        img_mask[k, :r] = 1
        target = torch.as_tensor(np.asarray(ex["txt_labels"], dtype=np.int64))
        labels[k, :n] = torch.where(target >= 0, target, torch.full_like(target, -100))
    return {
        "input_ids": ids,
        "attention_mask": txt_mask,
        "token_type_ids": torch.zeros_like(ids),
        "visual_embeds": feats,
        "visual_attention_mask": img_mask,
        "visual_token_type_ids": torch.ones_like(img_mask),
        "labels": labels,
        "sentence_image_labels": torch.ones(b, dtype=torch.long),
    }


MAKERS = {
    "fast": _make_ours("fast", kernels="auto", attention="auto"),
    "fast_graphs": make_fast_graphs,
    "fast_deepspeed": make_fast_deepspeed,
    "plain": _make_ours("plain", kernels="reference", attention="sdpa"),
    "authors": make_authors,
    "visualbert": make_visualbert,
}


def unavailable(name: str) -> str | None:
    """Why provider `name` cannot run here, or None."""
    module = {"fast_deepspeed": "deepspeed", "visualbert": "transformers"}.get(name)
    if module is None:
        return None
    try:
        __import__(module)
    except Exception as e:  # ImportError, or a broken install failing at import
        return f"{module} does not import ({type(e).__name__}: {e})"
    return None


# --- the loss check -----------------------------------------------------------------------------


def check_agreement(providers, host, tasks, s: Settings) -> dict:
    """Every task's loss parts, fp32 eval mode (and bf16 autocast on CUDA), `fast` and `plain`
    against `authors` on the first batch; raises RuntimeError if any disagree."""
    names = [n for n in CHECKED if n in providers]
    if "authors" not in names or len(names) < 2:
        return {"skipped": "needs authors and at least one of fast, plain"}
    modes = [("fp32", 1e-4 if not s.cuda else 2e-3)]
    if s.cuda:
        modes.append(("bf16", 5e-2))
    report, bad = {}, []
    for mode, rtol in modes:
        autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16)
            if mode == "bf16"
            else contextlib.nullcontext()
        )
        for task in tasks:
            values = {}
            for name in names:
                p = providers[name]
                p.model.eval()
                with torch.no_grad(), autocast:
                    out = p.losses(p.to_device(host[name][task][0]), task)
                values[name] = {k: float(v) for k, v in out.items() if torch.is_tensor(v)}
                p.model.train()
            want = values["authors"]
            entry = {}
            for key, ref in want.items():
                # wra is a difference of sums and may sit near zero: scale by its parts.
                scale = max(abs(want.get("wra_pos", 0)), abs(want.get("wra_neg", 0)), abs(ref))
                scale = scale if key == "wra" else abs(ref)
                for name in names:
                    if name == "authors":
                        continue
                    got = values[name][key]
                    ok = math.isfinite(got) and abs(got - ref) <= 1e-6 + rtol * scale
                    entry[f"{name}/{key}"] = {"got": got, "authors": ref, "ok": ok}
                    if not ok:
                        bad.append(f"{mode} {task} {key}: {name} {got!r} vs authors {ref!r}")
            report[f"{mode}/{task}"] = {"rtol": rtol, **entry}
    if bad:
        raise RuntimeError("the providers' losses disagree: " + "; ".join(bad))
    return report


# --- timing -------------------------------------------------------------------------------------


def peak_matmul_flops(s: Settings) -> dict:
    """FLOP/s of a large matrix product in the training dtype, measured now (the MFU peak)."""
    n, dtype = (8192, torch.bfloat16) if s.cuda else (1024, torch.float32)
    a = torch.randn(n, n, device=s.device, dtype=dtype)
    b = torch.randn(n, n, device=s.device, dtype=dtype)
    iters = 20 if s.cuda else 5
    for _ in range(3):
        a @ b
    best = math.inf
    for _ in range(3):
        _sync(s)
        t0 = time.perf_counter()
        for _ in range(iters):
            a @ b
        _sync(s)
        best = min(best, (time.perf_counter() - t0) / iters)
    tflops = 2 * n**3 / best / 1e12
    return {
        "shape": [n, n, n],
        "dtype": str(dtype).replace("torch.", ""),
        "iters": iters,
        "best_of": 3,
        "tflops": tflops,
        "spec_bf16_tflops": SPEC_PEAK_BF16_TFLOPS.get(device_class(s.device)),
    }


def _sync(s: Settings) -> None:
    if s.cuda:
        torch.cuda.synchronize(s.device)


class Phases:
    """Per-phase times of one provider: CUDA events on the GPU, perf_counter on the CPU."""

    def __init__(self, s: Settings):
        self.s = s
        self.spans: dict[str, list] = {"data": [], "forward": [], "backward": [], "optimizer": []}

    def mark(self):
        if self.s.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def add(self, phase: str, start, end) -> None:
        self.spans[phase].append((start, end))

    def totals_ms(self) -> dict[str, float]:
        out = {}
        for phase, spans in self.spans.items():
            if phase == "data" or not self.s.cuda:
                out[phase] = sum((b - a) * 1e3 for a, b in spans)
            else:
                out[phase] = sum(a.elapsed_time(b) for a, b in spans)
        return out


def run_steps(p: Provider, plan, host, phases: Phases | None) -> None:
    """Optimizer steps over `plan` (a list of steps, each a list of (task, batch index)) on the
    provider's pre-collated host batches `host[p.name][task][k]`."""
    for micro in plan:
        for task, k in micro:
            t0 = time.perf_counter()
            batch = p.to_device(host[p.name][task][k])
            t1 = time.perf_counter()
            e0 = phases.mark() if phases else None
            out = p.forward(batch, task)
            e1 = phases.mark() if phases else None
            p.backward(out["loss"])
            e2 = phases.mark() if phases else None
            if phases:
                phases.add("data", t0, t1)
                phases.add("forward", e0, e1)
                phases.add("backward", e1, e2)
        o0 = phases.mark() if phases else None
        p.step()
        if phases:
            phases.add("optimizer", o0, phases.mark())


def time_provider(p: Provider, plan, host, s: Settings) -> dict:
    """One timed block of `plan` for provider `p`: wall time, phase totals, peak memory."""

    gc.collect()
    baseline = 0
    if s.cuda:
        _sync(s)
        torch.cuda.reset_peak_memory_stats(s.device)
        baseline = torch.cuda.memory_allocated(s.device)
    phases = Phases(s)
    _sync(s)
    t0 = time.perf_counter()
    run_steps(p, plan, host, phases)
    _sync(s)
    wall = time.perf_counter() - t0
    memory = {}
    if s.cuda:
        memory = {
            "peak_allocated_bytes": int(torch.cuda.max_memory_allocated(s.device)),
            "baseline_allocated_bytes": int(baseline),
        }
    return {"wall_s": wall, "phases_ms": phases.totals_ms(), "memory": memory}


def build_plan(tasks_seq: list[str], steps: int, accum: int, batches: int, start: int):
    """Steps of micro-batches: (task, batch index), the task sequence read from `start`."""
    plan, i = [], start
    for _ in range(steps):
        micro = []
        for _ in range(accum):
            task = tasks_seq[i % len(tasks_seq)]
            micro.append((task, i % batches))
            i += 1
        plan.append(micro)
    return plan, i


# --- one model ----------------------------------------------------------------------------------


def bench_model(model_name: str, s: Settings, peak: dict) -> dict:
    config = UniterConfig.from_json(REPO_ROOT / MODELS[model_name])
    tokens_per_batch, accum = recipe_budget(model_name, s)
    optim = OptimConfig(lr=5e-5, warmup_steps=10, grad_accum=accum)
    tasks = tuple(DEFAULT_MIX)
    # Bucketed batches need a whole pool of the authors' size to sort, as their sampler has.
    min_pairs = BUCKET_PAIRS if s.order == "bucketed" else 1
    pairs, negatives = make_pairs(pairs_needed(s.batches, tokens_per_batch), min_pairs, s.seed)
    examples = {
        task: fill_task_batches(
            task,
            pairs,
            negatives,
            count=s.batches,
            tokens_per_batch=tokens_per_batch,
            order=s.order,
            seed=s.seed,
        )
        for task in tasks
    }
    shapes = {task: [BatchShape.of(b, task) for b in batches] for task, batches in examples.items()}
    flops = {task: [train_flops(config, sh, task) for sh in shapes[task]] for task in tasks}
    mixer = TaskMixer.from_recipe({"coco": DEFAULT_MIX}, seed=s.seed)
    total_micro = (s.warmup + s.steps * s.rounds) * accum
    task_seq = [mixer.sample()[1] for _ in range(total_micro)]
    print(
        f"\n{model_name}: {tokens_per_batch} real tokens per micro-batch, {accum} per step, "
        f"{s.order} order; {sum(len(b) for b in examples['mlm']) / s.batches:.1f} pairs per batch"
    )

    torch.manual_seed(s.seed)
    initial = uf.UniterForPretraining(config)
    weights = initial.state_dict()
    n_params = sum(p.numel() for p in initial.parameters())  # tied weights once
    del initial
    providers, skipped = {}, {}
    for name in s.providers:
        why = unavailable(name)
        if why is None and name == "fast_deepspeed" and s.compile:
            why = "not with --compile"
        if why:
            skipped[name] = why
            print(f"  {name}: skipped ({why})")
            continue
        providers[name] = MAKERS[name](config, optim, s, weights)

    # Host batches: collated once (pinned on CUDA); collation cost measured apart.
    host, collate_ms = {}, {}
    for name, p in providers.items():
        source = {t: examples["mlm"] for t in tasks} if name == "visualbert" else examples
        host[name], times = {}, []
        for task in tasks:
            host[name][task] = []
            for ex in source[task]:
                t0 = time.perf_counter()
                host[name][task].append(p.collate(ex, task))
                times.append((time.perf_counter() - t0) * 1e3)
        collate_ms[name] = statistics.median(times)
        if p.finalize is not None:
            host[name] = p.finalize(host[name])

    agreement = check_agreement(providers, host, tasks, s)

    plan_warm, cursor = build_plan(task_seq, s.warmup, accum, s.batches, 0)
    for p in providers.values():
        run_steps(p, plan_warm, host, None)
    _sync(s)
    blocks = {name: [] for name in providers}
    plans = []
    names = list(providers)
    for r in range(s.rounds):
        plan, cursor = build_plan(task_seq, s.steps, accum, s.batches, cursor)
        plans.append(plan)
        # Each round starts with another provider, so no one always runs first (or after the
        # most memory-hungry one).
        for name in names[r % len(names) :] + names[: r % len(names)]:
            blocks[name].append(time_provider(providers[name], plan, host, s))

    # Tokens, pairs and FLOPs of the timed micro-batches (visualbert: the MLM batches it ran).
    def counted(name: str, plan) -> dict:
        out = {"tokens": 0, "pairs": 0, "flops": 0, "flops_6n": 0, "micro_batches": 0}
        for micro in plan:
            for task, k in micro:
                t = "mlm" if name == "visualbert" else task
                out["tokens"] += shapes[t][k].real_tokens
                out["pairs"] += shapes[t][k].pairs
                out["flops"] += flops[t][k]
                out["flops_6n"] += 6 * n_params * shapes[t][k].real_tokens
                out["micro_batches"] += 1
        return out

    peak_flops = peak["tflops"] * 1e12
    results = {}
    for name, p in providers.items():
        per_round = []
        for block, plan in zip(blocks[name], plans, strict=True):
            c = counted(name, plan)
            per_round.append({**c, **block, "tokens_per_s": c["tokens"] / block["wall_s"]})
        wall = sum(r["wall_s"] for r in per_round)
        tokens = sum(r["tokens"] for r in per_round)
        steps = s.steps * s.rounds
        phases = {
            k: sum(r["phases_ms"][k] for r in per_round) / steps for k in per_round[0]["phases_ms"]
        }
        step_ms = wall * 1e3 / steps
        phases["other"] = max(0.0, step_ms - sum(phases.values()))
        flops_total = sum(r["flops"] for r in per_round)
        memory = {}
        if s.cuda:
            peak_bytes = max(r["memory"]["peak_allocated_bytes"] for r in per_round)
            memory = {
                "peak_allocated_bytes": peak_bytes,
                "peak_above_baseline_bytes": peak_bytes
                - min(r["memory"]["baseline_allocated_bytes"] for r in per_round),
                "note": "max_memory_allocated during the provider's timed blocks; the baseline "
                "holds every provider's weights and optimizer state (all stay on the device)",
            }
        memory["state_bytes"] = p.state_bytes()
        if p.stats is not None:
            p.describe["graph_stats"] = p.stats()
        results[name] = {
            "tokens_per_s": tokens / wall,
            "pairs_per_s": sum(r["pairs"] for r in per_round) / wall,
            "step_ms": step_ms,
            "split_ms_per_step": phases,
            "mfu": flops_total / wall / peak_flops,
            "mfu_6n": sum(r["flops_6n"] for r in per_round) / wall / peak_flops,
            "useful_tflops_per_s": flops_total / wall / 1e12,
            "collate_ms_per_batch": collate_ms[name],
            "memory": memory,
            "describe": p.describe,
            "rounds": [
                {k: r[k] for k in ("wall_s", "tokens", "pairs", "flops", "tokens_per_s")}
                for r in per_round
            ],
        }
        if name == "visualbert":
            results[name]["note"] = "tokens, pairs and useful FLOPs are those of the MLM batches"

    # Speed-ups: the median over rounds of the per-round tokens/s ratios (rounds interleave the
    # providers, so a slow spell of a shared machine lands on all of them alike).
    speedups = {}
    for base in ("authors", "visualbert", "plain", "fast"):
        if base not in results:
            continue
        speedups[base] = {
            name: statistics.median(
                r["tokens_per_s"] / b["tokens_per_s"]
                for r, b in zip(results[name]["rounds"], results[base]["rounds"], strict=True)
            )
            for name in results
            if name != base
        }
    del providers
    gc.collect()
    if s.cuda:
        torch.cuda.empty_cache()
    return {
        "model_config": MODELS[model_name],
        "model": config.to_dict(),
        "parameters": n_params,
        "encoder_matmul_params": encoder_matmul_params(config),
        "tokens_per_batch": tokens_per_batch,
        "grad_accum": accum,
        "task_counts_timed": {
            t: sum(1 for plan in plans for micro in plan for task, _ in micro if task == t)
            for t in tasks
        },
        "batches": {task: shape_summary(shapes[task], config) for task in tasks},
        "useful_flops_per_real_token": {
            task: sum(flops[task]) / sum(sh.real_tokens for sh in shapes[task]) for task in tasks
        },
        "agreement": agreement,
        "skipped": skipped,
        "providers": results,
        "speedup_tokens_per_s": speedups,
    }


# --- report -------------------------------------------------------------------------------------


def print_model(name: str, r: dict) -> None:
    print(
        f"  {'provider':15s} {'tokens/s':>11s} {'pairs/s':>9s} {'step ms':>9s} "
        f"{'data':>7s} {'fwd':>8s} {'bwd':>8s} {'optim':>7s} {'other':>7s} {'MFU':>6s} "
        f"{'peak GiB':>8s}"
    )
    for provider, x in r["providers"].items():
        sp = x["split_ms_per_step"]
        peak = x["memory"].get("peak_allocated_bytes")
        peak = f"{peak / 2**30:8.2f}" if peak else f"{'-':>8s}"
        print(
            f"  {provider:15s} {x['tokens_per_s']:11,.0f} {x['pairs_per_s']:9,.1f} "
            f"{x['step_ms']:9.1f} {sp['data']:7.1f} {sp['forward']:8.1f} {sp['backward']:8.1f} "
            f"{sp['optimizer']:7.1f} {sp['other']:7.1f} {x['mfu']:6.1%} {peak}"
        )
    for base, ups in r["speedup_tokens_per_s"].items():
        text = ", ".join(f"{n} {v:.2f}x" for n, v in ups.items())
        print(f"  tokens/s over {base}: {text}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--task", choices=("pretrain", "vqa", "nlvr2"), default="pretrain")
    known, rest = pre.parse_known_args(argv)
    if known.task != "pretrain":
        # Fine-tuning steps and evaluation, ours against the authors': bench_finetune.py.
        import bench_finetune

        return bench_finetune.main(["--tasks", known.task, *rest])
    s = parse_args(rest)
    if s.cuda:
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 stays fp32 (the loss check)
    peak = peak_matmul_flops(s)
    print(
        f"{NAME}: device {s.device}, providers {', '.join(s.providers)}, models "
        f"{', '.join(s.models)}; {s.warmup} warm-up + {s.rounds} x {s.steps} timed steps; peak "
        f"{peak['dtype']} matmul {peak['tflops']:.2f} TFLOP/s (measured)"
    )
    payload = {
        "benchmark": NAME,
        "question": QUESTION,
        "command": command_line(),
        "environment": environment(s.device),
        "settings": {
            "providers": list(s.providers),
            "models": list(s.models),
            "steps": s.steps,
            "warmup": s.warmup,
            "rounds": s.rounds,
            "batches": s.batches,
            "order": s.order,
            "precision": s.precision,
            "varlen_dropout": s.varlen_dropout,
            "compile": s.compile,
            "seed": s.seed,
            "quick": s.quick,
            "gate": s.gate,
            "mix": dict(DEFAULT_MIX),
            "definitions": {
                "tokens_per_s": "real tokens (text + regions) of the timed micro-batches over "
                "the wall time of the timed steps (synchronised at both ends), summed over rounds",
                "mfu": "useful FLOPs (workload.train_flops: matmuls of the real positions, "
                "encoder + region embedder + the task's head, forward x 3) over the wall time, "
                "over peak.tflops measured in this run",
                "mfu_6n": "6 x parameters x real tokens over the wall time, over peak.tflops",
                "split_ms_per_step": "data: host time issuing the copies of pre-collated pinned "
                "batches; forward/backward/optimizer: CUDA event spans (CPU: perf_counter); "
                "other: step time minus the rest (the GPU waiting for the host)",
                "speedup_tokens_per_s": "median over rounds of per-round tokens/s ratios",
            },
        },
        "peak": peak,
        "models": {},
    }
    for model_name in s.models:
        result = bench_model(model_name, s, peak)
        payload["models"][model_name] = result
        print_model(model_name, result)
    path = save_result(NAME, payload, s.out)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
