"""Do the fused masked-loss kernels beat the eager losses at UNITER's sizes, in time and memory?

    python benchmarks/bench_masked_losses.py                      # CUDA if present, else CPU
    python benchmarks/bench_masked_losses.py --losses mlm --hidden 768 --rows 256 2048
    python benchmarks/bench_masked_losses.py --quick              # a smoke run, small sizes
    python benchmarks/plot_masked_losses.py benchmarks/results/masked_losses-*.json

Providers, per loss, on the same inputs: the hidden states of a batch (N, H) fp32 with autograd
on, N = rows / 0.15 (about the masking rate of MLM and MRM), fp32 parameters as in training, the
matmuls in bf16 under autocast with `--dtype bf16` (the default on CUDA, training's setting):

- `triton`: the collator's index (`index_select`), then the fused kernels of
  `uniter_fast.kernels.masked_losses` (`uniter_fast.ops.*_loss(..., backend="triton")`);
- `reference`: the same index gather, then `uniter_fast.ops.*_loss_reference`, the eager path
  (what the model runs on the CPU, and on CUDA where `AUTO_BACKEND` says "reference");
- `authors`: `hidden[mask]` (a boolean-mask gather: a host sync) and the authors' head and loss
  as `uniter_fast/authors/model.py` has them (decoder then `+ bias`; `reduction='none'` then
  `.mean()`; the MRC label recomputed from the soft labels in the step; fp32 targets, as their
  collate widens them).

Per loss, the part after the head's transform is timed: the gather, the last linear layer
(MLM: the tied decoder, V = 28996; MRFR: the tied regression, D = 2048; MRC, MRC-kl: the
classifier, C = 1601) and the loss, forward (autograd recording, no backward) and
forward+backward (gradients set to None before each call, untimed). The providers' calls are
interleaved (call i of each, one after the other). Note that the fused MLM path makes its
gradients in the forward (the backward only scales them), so its "forward" holds most of the
backward's work.

Floors, per case: FLOPs of the matmuls (forward 2 rows H K, forward+backward 3x that, K = V,
D or C) and the compulsory bytes (W, x and the targets; forward+backward adds reading W again
and writing the weight's fp32 gradient and x's gradient); `floor_ms` is the larger of FLOPs at
the GPU's peak and bytes at its bandwidth (known for H100/H200; none elsewhere), and `gemm_ms`
the measured time of the bare matmuls of the same shapes on this device (the practical floor).
Reported per provider: median ms, achieved TFLOP/s, the fractions floor/time and gemm/time, and
memory: on CUDA `max_memory_allocated` of one call alone above the allocation before it; on the
CPU the bytes autograd saves for the backward (peak RSS is process-wide there).

On the CPU the `triton` provider runs only in Triton's interpreter (TRITON_INTERPRET=1 set
before triton is imported) and only up to `--interpret-max-rows` rows: interpreted times say
nothing about speed (they are flagged `interpreted`), the run checks that the path works. Else it
is recorded as skipped, with the reason. Results go to
`runs/bench/masked_losses-<device>-<UTC time>.json`;
`--out benchmarks/results/` for the figures the project commits.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from common import (
    command_line,
    environment,
    measure,
    measure_interleaved,
    peak_memory,
    save_result,
    saved_tensor_bytes,
)

from uniter_fast import ops
from uniter_fast.data.schema import IMG_DIM, IMG_LABEL_DIM
from uniter_fast.kernels import triton_runs_on
from uniter_fast.ops import losses

NAME = "masked_losses"
QUESTION = (
    "Do the fused masked-loss kernels beat the eager losses at UNITER's sizes, in time and peak "
    "memory, forward and forward+backward?"
)
LOSSES = ("mlm", "mrfr", "mrc", "mrckl")
PROVIDERS = ("triton", "reference", "authors")
VOCAB = 28996  # bert-base-cased, the MLM decoder's rows
MASK_FRACTION = 0.15  # masked rows per hidden row: MLM's and MRM's masking probability
# Output width of each loss's last linear layer.
OUT_DIM = {"mlm": VOCAB, "mrfr": IMG_DIM, "mrc": IMG_LABEL_DIM, "mrckl": IMG_LABEL_DIM}
# Dense bf16 tensor-core FLOP/s, fp32 (no TF32) FLOP/s and memory bandwidth, from the vendors'
# data sheets (SXM parts: a PCIe H100 has about 0.76x the FLOPs and 0.6x the bandwidth).
PEAKS = {
    "h100": {"bf16_flops": 989e12, "fp32_flops": 67e12, "bytes_per_s": 3.35e12},
    "h200": {"bf16_flops": 989e12, "fp32_flops": 67e12, "bytes_per_s": 4.8e12},
}
AGREE_RTOL = {"fp32": 1e-4, "bf16": 2e-2}


# --- settings -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """The resolved command line.

    device: where everything runs. dtype: "fp32", or "bf16" (autocast over fp32 parameters).
    losses, hidden, rows: the cases (every loss at every hidden size and row count).
    iters, warmup: timed and untimed calls per measurement. interpret_max_rows: largest case
    the interpreted `triton` provider runs on the CPU. mlm_chunk_rows: the fused MLM path's
    chunk (None: its default, `mlm_chunk_rows`). torch_threads: torch's intra-op threads (None:
    torch's default). seed: seeds the inputs.
    """

    device: torch.device
    dtype: str
    losses: tuple[str, ...]
    hidden: tuple[int, ...]
    rows: tuple[int, ...]
    iters: int
    warmup: int
    interpret_max_rows: int
    mlm_chunk_rows: int | None
    torch_threads: int | None
    seed: int
    quick: bool
    out: Path | None

    def __post_init__(self) -> None:
        if self.mlm_chunk_rows is not None and self.mlm_chunk_rows < 1:
            raise ValueError(f"--mlm-chunk-rows must be at least 1, got {self.mlm_chunk_rows}")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ValueError(f"--torch-threads must be at least 1, got {self.torch_threads}")
        if self.iters < 1 or self.warmup < 0:
            raise ValueError(
                f"--iters must be >= 1 and --warmup >= 0, got {self.iters}, {self.warmup}"
            )
        if not self.rows or min(self.rows) < 1 or not self.hidden or min(self.hidden) < 1:
            raise ValueError(
                f"--rows and --hidden must be positive, got {self.rows}, {self.hidden}"
            )


def parse_args(argv: list[str] | None = None) -> Settings:
    p = argparse.ArgumentParser(description=QUESTION)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16"), help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--losses", nargs="+", choices=LOSSES, default=list(LOSSES))
    p.add_argument("--hidden", nargs="+", type=int, help="default 768 1024 (CPU: 768)")
    p.add_argument(
        "--rows", nargs="+", type=int, help="masked rows; default 64..2048 (CPU: 64 256)"
    )
    p.add_argument("--iters", type=int, help="timed calls; default 20 on CUDA, 5 on CPU")
    p.add_argument("--warmup", type=int, help="untimed calls first; default 5 on CUDA, 1 on CPU")
    p.add_argument("--interpret-max-rows", type=int, default=64)
    p.add_argument(
        "--mlm-chunk-rows", type=int, help="the fused MLM chunk (default: the kernel's rule, H)"
    )
    p.add_argument(
        "--torch-threads",
        type=int,
        help="torch intra-op threads (default: torch's; 1 keeps a shared CPU from oversubscribing)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: hidden 768, 64 rows, 2 calls after 1 warm-up (explicit flags still win)",
    )
    p.add_argument("--out", type=Path, help="result file or folder (default: runs/bench/)")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available")
    cuda = device.type == "cuda"

    def pick(given, quick, on_cuda, on_cpu):
        if given is not None:
            return given
        if a.quick:
            return quick
        return on_cuda if cuda else on_cpu

    try:
        return Settings(
            device=device,
            dtype=a.dtype or ("bf16" if cuda else "fp32"),
            losses=tuple(dict.fromkeys(a.losses)),
            hidden=tuple(pick(a.hidden, [768], [768, 1024], [768])),
            rows=tuple(pick(a.rows, [64], [64, 128, 256, 512, 1024, 2048], [64, 256])),
            iters=pick(a.iters, 2, 20, 5),
            warmup=pick(a.warmup, 1, 5, 1),
            interpret_max_rows=a.interpret_max_rows,
            mlm_chunk_rows=a.mlm_chunk_rows,
            torch_threads=a.torch_threads,
            seed=a.seed,
            quick=a.quick,
            out=a.out,
        )
    except ValueError as e:
        p.error(str(e))


# --- inputs and providers -----------------------------------------------------------------------


@dataclass
class Case:
    """One loss at one size: the batch's hidden states, the masked rows, parameters, targets.

    hidden: (N, H) fp32, autograd on; index: (rows,) int64 masked rows; mask: (N,) bool, the
    same rows; weight, bias: the last linear layer (MLM (V, H), MRFR (H, D), MRC (C, H)); labels
    (rows,) int64 (MLM ids, MRC classes); target: (rows, D) fp16 features or (rows, C) fp16 soft
    labels; authors_target: the same in fp32, as the authors' collate hands it over.
    """

    loss: str
    rows: int
    hidden_size: int
    hidden: torch.Tensor
    index: torch.Tensor
    mask: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    labels: torch.Tensor | None
    target: torch.Tensor | None
    authors_target: torch.Tensor | None

    @property
    def params(self) -> list[torch.Tensor]:
        return [self.weight, self.bias]

    def zero_grad(self, i: int = 0) -> None:
        for t in (self.hidden, self.weight, self.bias):
            t.grad = None


def make_case(loss: str, rows: int, hidden_size: int, device, seed: int) -> Case:
    rng = np.random.default_rng([seed, rows, hidden_size, LOSSES.index(loss)])
    n = max(rows, math.ceil(rows / MASK_FRACTION))
    index = np.sort(rng.choice(n, rows, replace=False))
    mask = np.zeros(n, dtype=bool)
    mask[index] = True
    k = OUT_DIM[loss]

    def tensor(shape, scale=1.0, dtype=torch.float32, grad=False):
        t = torch.tensor(rng.standard_normal(shape) * scale, dtype=dtype, device=device)
        return t.requires_grad_(grad)

    hidden = tensor((n, hidden_size), grad=True)
    # Weight scale so the logits and predictions are O(1), as after pretraining's init.
    shape = (hidden_size, k) if loss == "mrfr" else (k, hidden_size)
    weight = tensor(shape, hidden_size**-0.5, grad=True)
    bias = tensor((k,), 0.1, grad=True)
    labels = target = None
    if loss == "mlm":
        labels = torch.tensor(rng.integers(999, VOCAB, rows), device=device)
    elif loss == "mrfr":
        target = tensor((rows, k), dtype=torch.float16)
    else:
        soft = rng.dirichlet(np.full(k, 0.05), rows)
        target = torch.tensor(soft, dtype=torch.float16, device=device)
        labels = 1 + target[:, 1:].float().argmax(1)
    return Case(
        loss,
        rows,
        hidden_size,
        hidden,
        torch.tensor(index, device=device),
        torch.tensor(mask, device=device),
        weight,
        bias,
        labels,
        target,
        None if target is None else target.float(),
    )


def provider_loss(provider: str, c: Case, mlm_chunk_rows: int | None = None) -> torch.Tensor:
    """One provider's loss on one case: gather, last linear layer, loss."""
    if provider == "authors":
        return _authors_loss(c)
    backend = provider
    x = ops.gather_rows(c.hidden, c.index)
    if c.loss == "mlm" and provider == "triton" and mlm_chunk_rows is not None:
        from uniter_fast.kernels import masked_losses  # needs triton: imported when it runs

        return masked_losses.mlm_loss(x, c.weight, c.bias, c.labels, chunk_rows=mlm_chunk_rows)
    if c.loss == "mlm":
        return losses.mlm_loss(x, c.weight, c.bias, c.labels, backend=backend)
    if c.loss == "mrfr":
        return losses.mrfr_loss(x, c.weight, c.bias, c.target, backend=backend)
    logits = F.linear(x, c.weight, c.bias)
    if c.loss == "mrc":
        return losses.mrc_loss(logits, c.labels, backend=backend)
    return losses.mrckl_loss(logits, c.target, backend=backend)


def _authors_loss(c: Case) -> torch.Tensor:
    """As uniter_fast/authors/model.py: boolean-mask gather, full outputs, unreduced loss, mean."""
    h = c.hidden
    x = h[c.mask.unsqueeze(-1).expand_as(h)].contiguous().view(-1, h.size(-1))
    if c.loss == "mlm":
        scores = F.linear(x, c.weight) + c.bias
        return F.cross_entropy(scores, c.labels, reduction="none").mean()
    if c.loss == "mrfr":
        pred = F.linear(x, c.weight.t(), c.bias)
        return F.mse_loss(pred, c.authors_target, reduction="none").mean()
    logits = F.linear(x, c.weight, c.bias)
    soft = c.authors_target
    if c.loss == "mrckl":
        return F.kl_div(F.log_softmax(logits, dim=-1), soft, reduction="none").mean()
    label = torch.max(soft[:, 1:], dim=-1)[1] + 1
    return F.cross_entropy(logits, label, ignore_index=0, reduction="none").mean()


def _autocast(s: Settings):
    if s.dtype == "bf16":
        return torch.autocast(device_type=s.device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class _Calls:
    """A provider's timed work on a case: `forward(i)` and `forward_backward(i)`."""

    def __init__(self, provider: str, case: Case, s: Settings):
        self.provider, self.case, self.s = provider, case, s

    def loss(self) -> torch.Tensor:
        with _autocast(self.s):
            return provider_loss(self.provider, self.case, self.s.mlm_chunk_rows)

    def forward(self, i: int = 0) -> None:
        self.loss()

    def forward_backward(self, i: int = 0) -> None:
        self.loss().backward()


# --- floors -------------------------------------------------------------------------------------


def floor(c: Case, s: Settings, peaks: dict | None) -> dict:
    """FLOPs and compulsory bytes of one case, and the floor times they give (module doc)."""
    k = OUT_DIM[c.loss]
    m, h = c.rows, c.hidden_size
    w_bytes = 2 if s.dtype == "bf16" else 4  # W as the matmuls read it
    target_bytes = {"mlm": 8 * m, "mrc": 8 * m}.get(c.loss, 2 * m * k)  # ids, or fp16 rows
    flops_f = 2 * m * h * k
    bytes_f = k * h * w_bytes + m * h * 4 + target_bytes
    # The backward reads W again and writes the weight's fp32 gradient and x's.
    bytes_fb = bytes_f + k * h * w_bytes + k * h * 4 + m * h * 4
    out = {
        "out_dim": k,
        "flops_forward": flops_f,
        "flops_forward_backward": 3 * flops_f,
        "bytes_forward": bytes_f,
        "bytes_forward_backward": bytes_fb,
        "floor_ms_forward": None,
        "floor_ms_forward_backward": None,
    }
    if peaks:
        flops_per_s = peaks["bf16_flops" if s.dtype == "bf16" else "fp32_flops"]
        for kind, fl, by in (
            ("forward", flops_f, bytes_f),
            ("forward_backward", 3 * flops_f, bytes_fb),
        ):
            out[f"floor_ms_{kind}"] = 1e3 * max(fl / flops_per_s, by / peaks["bytes_per_s"])
    return out


def gemm_times(c: Case, s: Settings) -> dict:
    """Measured ms of the bare matmuls of the case's shapes in the compute dtype: forward
    x @ W^T; forward+backward that plus dlogits @ W and dlogits^T @ x."""
    dt = torch.bfloat16 if s.dtype == "bf16" else torch.float32
    k = OUT_DIM[c.loss]
    x = torch.randn(c.rows, c.hidden_size, dtype=dt, device=s.device)
    w = torch.randn(k, c.hidden_size, dtype=dt, device=s.device)
    dl = torch.randn(c.rows, k, dtype=dt, device=s.device)

    def fwd(i):
        x @ w.t()

    def fwd_bwd(i):
        x @ w.t()
        dl @ w
        dl.t() @ x

    return {
        kind: measure(fn, device=s.device, warmup=s.warmup, iters=s.iters).median_ms
        for kind, fn in (("forward", fwd), ("forward_backward", fwd_bwd))
    }


# --- one case -----------------------------------------------------------------------------------


def triton_skip_reason(c: Case, s: Settings) -> str | None:
    if s.device.type == "cuda":
        return None if triton_runs_on("cuda") else "triton is not installed"
    if not triton_runs_on(s.device.type):
        return "the CPU runs Triton kernels only in the interpreter: set TRITON_INTERPRET=1"
    if c.rows > s.interpret_max_rows:
        return f"interpreted runs only up to --interpret-max-rows {s.interpret_max_rows}"
    return None


def check_agreement(calls: dict[str, _Calls], s: Settings) -> dict:
    """Every provider's loss on the case, against the reference's; raises if one disagrees."""
    with torch.no_grad():
        values = {name: float(call.loss()) for name, call in calls.items()}
    rtol = AGREE_RTOL[s.dtype]
    want = values["reference"]
    bad = {n: v for n, v in values.items() if not abs(v - want) <= rtol * abs(want)}
    if bad:
        raise RuntimeError(f"providers disagree with the reference {want!r} (rtol {rtol}): {bad}")
    return {"rtol": rtol, "losses": values}


def bench_case(c: Case, s: Settings, peaks: dict | None) -> dict:
    skipped = {}
    reason = triton_skip_reason(c, s)
    if reason:
        skipped["triton"] = reason
    calls = {p: _Calls(p, c, s) for p in PROVIDERS if p not in skipped}
    result = {
        "rows": c.rows,
        "hidden": c.hidden_size,
        "hidden_rows": int(c.hidden.shape[0]),
        "agreement": check_agreement(calls, s),
        "floor": floor(c, s, peaks),
        "gemm_ms": gemm_times(c, s),
        "providers": {name: {"skipped": why} for name, why in skipped.items()},
    }
    timed = {
        "forward": measure_interleaved(
            {n: call.forward for n, call in calls.items()},
            device=s.device,
            warmup=s.warmup,
            iters=s.iters,
        ),
        "forward_backward": measure_interleaved(
            {n: call.forward_backward for n, call in calls.items()},
            device=s.device,
            warmup=s.warmup,
            iters=s.iters,
            setups={n: c.zero_grad for n in calls},
        ),
    }
    fl = result["floor"]
    for name, call in calls.items():
        entry = {"interpreted": name == "triton" and s.device.type == "cpu"}
        for kind in ("forward", "forward_backward"):
            m = timed[kind][name]
            d = m.to_dict()
            ms = m.median_ms
            d["tflops"] = fl[f"flops_{kind}"] / (ms * 1e-3) / 1e12
            floor_ms = fl[f"floor_ms_{kind}"]
            d["fraction_of_floor"] = None if floor_ms is None else floor_ms / ms
            d["fraction_of_gemm"] = result["gemm_ms"][kind] / ms
            if s.device.type == "cuda":
                c.zero_grad()
                d["memory"] = peak_memory(
                    lambda call=call, kind=kind: getattr(call, kind)(), device=s.device
                )
            entry[kind] = d
        c.zero_grad()
        entry["saved_for_backward_bytes"] = saved_tensor_bytes(call.loss, exclude=c.params)
        result["providers"][name] = entry
    c.zero_grad()
    result["speedup_over_triton"] = {
        other: {
            kind: statistics.median(
                o / t
                for o, t in zip(
                    result["providers"][other][kind]["times_ms"],
                    result["providers"]["triton"][kind]["times_ms"],
                    strict=True,
                )
            )
            for kind in ("forward", "forward_backward")
        }
        for other in ("reference", "authors")
        if "triton" in calls
    }
    return result


# --- report -------------------------------------------------------------------------------------


def print_case(loss: str, r: dict, cuda: bool) -> None:
    fl = r["floor"]
    floor_txt = (
        f", floor {fl['floor_ms_forward_backward']:.3f} ms f+b"
        if fl["floor_ms_forward_backward"] is not None
        else ""
    )
    print(
        f"\n{loss} rows {r['rows']} hidden {r['hidden']} (K {fl['out_dim']}): "
        f"{fl['flops_forward_backward'] / 1e9:.2f} GFLOP f+b, "
        f"{fl['bytes_forward_backward'] / 2**20:.1f} MiB f+b, gemm {r['gemm_ms']['forward']:.3f} / "
        f"{r['gemm_ms']['forward_backward']:.3f} ms{floor_txt}"
    )
    mem = "peak f+b MiB" if cuda else "saved MiB"
    print(
        f"  {'provider':9s} {'fwd ms':>9s} {'f+b ms':>9s} {'f+b TFLOP/s':>11s} "
        f"{'gemm/f+b':>8s} {mem:>12s}"
    )
    for name in PROVIDERS:
        p = r["providers"].get(name)
        if p is None or "skipped" in p:
            print(f"  {name:9s} skipped: {p['skipped'] if p else 'not run'}")
            continue
        fb = p["forward_backward"]
        memory = (
            fb["memory"]["peak_delta_bytes"] if cuda else p["saved_for_backward_bytes"]
        ) / 2**20
        flag = "  (interpreted)" if p["interpreted"] else ""
        print(
            f"  {name:9s} {p['forward']['median_ms']:9.3f} {fb['median_ms']:9.3f} "
            f"{fb['tflops']:11.3f} {fb['fraction_of_gemm']:8.2f} {memory:12.2f}{flag}"
        )


def main(argv: list[str] | None = None) -> int:
    s = parse_args(argv)
    if s.torch_threads is not None:
        torch.set_num_threads(s.torch_threads)
    torch.manual_seed(s.seed)
    env = environment(s.device)
    peaks = PEAKS.get(env["device_class"])
    print(
        f"{NAME}: device {s.device} ({env['device_name']}), {s.dtype}, losses {s.losses}, "
        f"hidden {s.hidden}, rows {s.rows}, {s.warmup} warm-up + {s.iters} timed calls"
    )
    payload = {
        "benchmark": NAME,
        "question": QUESTION,
        "command": command_line(),
        "environment": env,
        "settings": {
            "dtype": s.dtype,
            "losses": list(s.losses),
            "hidden": list(s.hidden),
            "rows": list(s.rows),
            "iters": s.iters,
            "warmup": s.warmup,
            "interpret_max_rows": s.interpret_max_rows,
            "mlm_chunk_rows": s.mlm_chunk_rows,
            "seed": s.seed,
            "quick": s.quick,
            "vocab": VOCAB,
            "img_dim": IMG_DIM,
            "img_label_dim": IMG_LABEL_DIM,
            "mask_fraction": MASK_FRACTION,
            "auto_backend": dict(losses.AUTO_BACKEND),
            "peaks": peaks,
            "modes": {
                "forward": "autograd recording, no backward (the fused MLM path makes its "
                "gradients here)",
                "forward_backward": "the same plus loss.backward(); gradients set to None "
                "before each call, untimed",
                "memory": "CUDA: one call alone, max_memory_allocated above the allocation "
                "before it; CPU: saved_for_backward_bytes only",
                "speedup_over_triton": "median over calls of the other provider's time over "
                "triton's, calls interleaved",
            },
        },
        "losses": {},
    }
    for loss in s.losses:
        cases = []
        for hidden_size in s.hidden:
            for rows in s.rows:
                c = make_case(loss, rows, hidden_size, s.device, s.seed)
                r = bench_case(c, s, peaks)
                print_case(loss, r, s.device.type == "cuda")
                cases.append(r)
                del c
        payload["losses"][loss] = {"cases": cases}
    path = save_result(NAME, payload, s.out)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
