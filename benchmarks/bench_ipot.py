"""How fast is the fused cosine-cost + IPOT WRA kernel, against our reference and the authors' loop?

    python benchmarks/bench_ipot.py                       # CUDA if present, else CPU
    python benchmarks/bench_ipot.py --dtype fp32 --batch-sizes 64 256
    python benchmarks/bench_ipot.py --device cpu --quick  # a smoke run, tiny sizes
    TRITON_INTERPRET=1 python benchmarks/bench_ipot.py --device cpu --quick   # + the kernel
    python benchmarks/plot_ipot.py benchmarks/results/ipot-*.json

Providers, on the same states (one batch per case, 50 IPOT iterations, beta 0.5):

- `triton`: `uniter_fast.ops.wra_distance_packed(..., backend="triton")`, the fused kernel
  reading the packed encoder output (kernels/ipot.py). On the CPU it runs only in Triton's
  interpreter (TRITON_INTERPRET=1 set before the script starts) and is skipped otherwise, which
  the result file says;
- `reference`: the same call with `backend="reference"`: our PyTorch reference (a gather into
  padded blocks, the cost, 50 iterations of batched tensor ops, the distance);
- `authors`: the authors' step re-implemented (`uniter_fast.authors`): their padded sequence
  output scattered into a padded copy through `ot_scatter`, widened to fp32, then their unfused
  `ipot` loop and `trace` (`optimal_transport_dist`), the distance cast back.

Cases: every batch size of `--batch-sizes` at every hidden size of `--hidden-sizes`, lengths
drawn uniformly (text `--txt-range`, regions `--img-range`; defaults 10..62 and 10..100, the
UNITER maxima), plus the target case (256 pairs, text 40, regions 60, hidden 1024) unless
`--no-target`. Per case: an agreement check first (distances and gradients of all providers
against the reference; the run stops if they disagree), then forward (autograd recording, as in
training) and forward+backward (of `sum(distance * upstream)`), the providers' calls interleaved,
ms per call, peak memory (each provider alone on CUDA), the bytes each saves for the backward,
and the floor:

- bytes: reading the states once and writing their gradients once (`2 * sum(m + n) * H *
  element size` for forward+backward, half that for the forward), timed as a copy of the packed
  states on the same device (`floor` in the output: its time is the floor, its bytes/s the
  device's copy bandwidth);
- FLOPs: the cost matrix (`2 m n H` per pair, norms `2 (m + n) H`) and the IPOT iterations
  (`7 m n` per iteration: `A*T`, two scaled reductions, the plan update), and for the backward
  the two products of the plan with the states (`4 m n H`), real lengths only.

Reported per provider: ms, achieved bandwidth over the floor's bytes, the fraction of the floor
achieved (floor ms / provider ms), FLOP/s. Results go to
`runs/bench/ipot-<device>-<UTC time>.json`;
`--out benchmarks/results/` for the figures the project commits.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
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

from uniter_fast.authors import collate as authors_collate
from uniter_fast.authors import model as authors_model
from uniter_fast.kernels import triton_runs_on
from uniter_fast.ops import ot as wra

NAME = "ipot"
QUESTION = (
    "How fast is the fused cosine-cost + IPOT WRA kernel against our PyTorch reference and the "
    "authors' unfused loop, forward and forward+backward, and how close to its floor?"
)
PROVIDERS = ("triton", "reference", "authors")
BETA, IPOT_ITERATIONS = 0.5, 50
TARGET = {"batch": 256, "txt_len": 40, "img_len": 60, "hidden": 1024}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Agreement before timing: distances and gradients against the reference in the same dtype.
# The kernel and the reference both compute in fp32; low-precision gradients differ by a
# rounding step of the dtype at most.
AGREEMENT = {"fp32": (1e-4, 1e-5), "bf16": (2e-2, 1e-3), "fp16": (4e-3, 1e-4)}
IPOT_FLOPS_PER_ELEMENT = 7


@dataclass
class Settings:
    device: torch.device
    dtype: str
    batch_sizes: tuple[int, ...]
    hidden_sizes: tuple[int, ...]
    txt_range: tuple[int, int]
    img_range: tuple[int, int]
    target: bool
    providers: tuple[str, ...]
    iters: int
    warmup: int
    torch_threads: int | None
    seed: int
    quick: bool
    out: Path | None


def parse_args(argv: list[str] | None = None) -> Settings:
    p = argparse.ArgumentParser(description=QUESTION)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--dtype", choices=tuple(DTYPES), help="states' dtype; default bf16 on CUDA, fp32 on CPU"
    )
    p.add_argument("--batch-sizes", type=int, nargs="+", help="default 32 64 128 256 512")
    p.add_argument("--hidden-sizes", type=int, nargs="+", help="default 768 1024")
    p.add_argument("--txt-range", type=int, nargs=2, default=(10, 62), metavar=("MIN", "MAX"))
    p.add_argument("--img-range", type=int, nargs=2, default=(10, 100), metavar=("MIN", "MAX"))
    p.add_argument(
        "--no-target", action="store_true", help="leave out the target case (256 x 40 x 60, 1024)"
    )
    p.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS))
    p.add_argument("--iters", type=int, help="timed calls; default 20 on CUDA, 5 on CPU")
    p.add_argument("--warmup", type=int, help="untimed calls first; default 5 on CUDA, 1 on CPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--torch-threads",
        type=int,
        help="CPU threads for torch; default 1 on the CPU (two threads on a shared 2-core machine "
        "stalled for seconds at a time when another job took a core), torch's default on CUDA",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 8 pairs, hidden 64, no target case, 2 timed calls after 1 warm-up "
        "(explicit flags still win)",
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

    for name, (lo, hi) in (("--txt-range", a.txt_range), ("--img-range", a.img_range)):
        if not 1 <= lo <= hi:
            p.error(f"{name}: need 1 <= MIN <= MAX, got {lo} {hi}")
    sizes = pick(a.batch_sizes, [8], [32, 64, 128, 256, 512], [32, 64, 128, 256, 512])
    hidden = pick(a.hidden_sizes, [64], [768, 1024], [768, 1024])
    if min(sizes) < 1 or min(hidden) < 1:
        p.error("batch and hidden sizes must be positive")
    return Settings(
        device=device,
        dtype=pick(a.dtype, "bf16" if cuda else "fp32", "bf16", "fp32"),
        batch_sizes=tuple(sizes),
        hidden_sizes=tuple(hidden),
        txt_range=tuple(a.txt_range),
        img_range=tuple(a.img_range),
        target=not (a.no_target or a.quick),
        providers=tuple(dict.fromkeys(a.providers)),
        iters=pick(a.iters, 2, 20, 5),
        warmup=pick(a.warmup, 1, 5, 1),
        torch_threads=a.torch_threads if a.torch_threads or cuda else 1,
        seed=a.seed,
        quick=a.quick,
        out=a.out,
    )


# --- cases --------------------------------------------------------------------------------------


@dataclass
class Case:
    """One batch of pairs in both layouts.

    hidden (N, H): packed states, text then regions per pair; padded (B, L, H): the authors'
    encoder output for the same pairs (L = max(m + n), each row text then regions then zeros),
    with their OT inputs (`ot_scatter`, `txt_pad`, `img_pad`).
    """

    name: str
    txt_len: list[int]
    img_len: list[int]
    hidden_size: int
    hidden: torch.Tensor
    cu_seqlens: torch.Tensor
    txt_len_t: torch.Tensor
    img_len_t: torch.Tensor
    padded: torch.Tensor
    ot_inputs: dict
    upstream: torch.Tensor

    @property
    def batch(self) -> int:
        return len(self.txt_len)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "batch": self.batch,
            "hidden": self.hidden_size,
            "txt_len_mean": statistics.mean(self.txt_len),
            "img_len_mean": statistics.mean(self.img_len),
            "max_txt_len": max(self.txt_len),
            "max_img_len": max(self.img_len),
            "rows": int(self.hidden.shape[0]),
        }


def make_case(name, txt_len, img_len, hidden_size, dtype, device, rng) -> Case:
    b = len(txt_len)
    lengths = [t + i for t, i in zip(txt_len, img_len, strict=True)]
    rows = sum(lengths)
    states = torch.tensor(rng.standard_normal((rows, hidden_size)), dtype=torch.float32)
    # A shared direction, as encoder states have: cosines spread over a realistic range.
    states += 0.5 * torch.tensor(rng.standard_normal(hidden_size), dtype=torch.float32)
    cu = np.zeros(b + 1, dtype=np.int32)
    cu[1:] = np.cumsum(lengths)
    padded = torch.zeros(b, max(lengths), hidden_size, dtype=torch.float32)
    for k, n in enumerate(lengths):
        padded[k, :n] = states[cu[k] : cu[k + 1]]
    max_tl = max(txt_len)
    ot_scatter = authors_collate._compute_ot_scatter(txt_len, max_tl, padded.shape[1])
    ot_inputs = {
        "ot_scatter": ot_scatter.to(device),
        "scatter_max": int(ot_scatter.max()),  # on the host, as the authors' collate computes it
        "txt_pad": authors_collate._compute_pad(txt_len, max_tl).to(device),
        "img_pad": authors_collate._compute_pad(img_len, max(img_len)).to(device),
    }
    return Case(
        name=name,
        txt_len=list(txt_len),
        img_len=list(img_len),
        hidden_size=hidden_size,
        hidden=states.to(device=device, dtype=dtype),
        cu_seqlens=torch.from_numpy(cu).to(device),
        txt_len_t=torch.tensor(txt_len, device=device),
        img_len_t=torch.tensor(img_len, device=device),
        padded=padded.to(device=device, dtype=dtype),
        ot_inputs=ot_inputs,
        upstream=torch.tensor(rng.standard_normal(b), dtype=torch.float32, device=device),
    )


def make_cases(s: Settings) -> list[Case]:
    rng = np.random.default_rng(s.seed)
    dtype = DTYPES[s.dtype]
    cases = []
    for hidden in s.hidden_sizes:
        for b in s.batch_sizes:
            txt = rng.integers(s.txt_range[0], s.txt_range[1] + 1, b).tolist()
            img = rng.integers(s.img_range[0], s.img_range[1] + 1, b).tolist()
            cases.append(
                make_case(f"ragged-b{b}-h{hidden}", txt, img, hidden, dtype, s.device, rng)
            )
    if s.target:
        t = TARGET
        cases.append(
            make_case(
                "target",
                [t["txt_len"]] * t["batch"],
                [t["img_len"]] * t["batch"],
                t["hidden"],
                dtype,
                s.device,
                rng,
            )
        )
    return cases


# --- providers ----------------------------------------------------------------------------------


def authors_distance(padded: torch.Tensor, ot_inputs: dict, max_tl: int, max_il: int):
    """The authors' WRA step from their padded encoder output (`forward_itm`, OT part)."""
    b = padded.size(0)
    max_l = max(ot_inputs["scatter_max"] + 1, max_tl + max_il)
    ot_scatter = ot_inputs["ot_scatter"].unsqueeze(-1).expand_as(padded)
    ctx_emb = torch.zeros(
        b, max_l, padded.size(-1), dtype=padded.dtype, device=padded.device
    ).scatter_(dim=1, index=ot_scatter, src=padded)
    txt_emb = ctx_emb[:, :max_tl, :]
    img_emb = ctx_emb[:, max_tl : max_tl + max_il, :]
    return authors_model.optimal_transport_dist(
        txt_emb.float(), img_emb.float(), ot_inputs["txt_pad"], ot_inputs["img_pad"]
    ).to(txt_emb)


class Provider:
    """One provider's calls on one case: its leaf tensor, forward, forward+backward."""

    def __init__(self, name: str, case: Case):
        self.name = name
        self.case = case
        source = case.padded if name == "authors" else case.hidden
        self.leaf = source.detach().clone().requires_grad_(True)

    def distance(self) -> torch.Tensor:
        c = self.case
        if self.name == "authors":
            return authors_distance(self.leaf, c.ot_inputs, max(c.txt_len), max(c.img_len))
        return wra.wra_distance_packed(
            self.leaf,
            c.cu_seqlens,
            c.txt_len_t,
            c.img_len_t,
            max(c.txt_len),
            max(c.img_len),
            beta=BETA,
            iterations=IPOT_ITERATIONS,
            backend=self.name,
        )

    def forward(self, i: int = 0) -> None:
        self.distance()

    def forward_backward(self, i: int = 0) -> None:
        (self.distance().float() * self.case.upstream).sum().backward()

    def zero_grad(self, i: int = 0) -> None:
        self.leaf.grad = None

    def packed_grad(self) -> torch.Tensor:
        """The gradient in the packed layout (the authors' is taken from their padded rows)."""
        if self.name != "authors":
            return self.leaf.grad
        c = self.case
        return torch.cat([self.leaf.grad[k, : t + i] for k, (t, i) in enumerate(_pairs(c))])


def _pairs(c: Case):
    return list(zip(c.txt_len, c.img_len, strict=True))


def check_agreement(providers: dict[str, Provider], s: Settings) -> dict:
    """Distances and gradients of every provider against the reference; raises on disagreement."""
    rtol, atol = AGREEMENT[s.dtype]
    results = {}
    for p in providers.values():
        p.zero_grad()
        p.forward_backward()
        results[p.name] = (p.distance().detach().float(), p.packed_grad().float())
        p.zero_grad()
    want_d, want_g = results["reference"]
    report, bad = {"rtol": rtol, "atol": atol, "against": "reference", "dtype": s.dtype}, []
    for name, (d, g) in results.items():
        if name == "reference":
            continue
        entry = {}
        for part, got, want in (("distance", d, want_d), ("grad", g, want_g)):
            diff = (got - want).abs()
            ok = bool(torch.isfinite(got).all()) and bool(
                (diff <= atol * want.abs().max() + rtol * want.abs()).all()
            )
            entry[part] = {
                "max_abs_diff": float(diff.max()),
                "max_rel_diff": float((diff / want.abs().clamp_min(1e-12)).max()),
                "ok": ok,
            }
            if not ok:
                bad.append(f"{name} {part}: max abs diff {float(diff.max()):.3g}")
        report[name] = entry
    if bad:
        raise RuntimeError(f"providers disagree with the reference ({s.dtype}): " + "; ".join(bad))
    return report


# --- floor --------------------------------------------------------------------------------------


def floor_of(case: Case, element_size: int) -> dict:
    """Bytes and FLOPs the work cannot go below (real lengths; see the module docstring)."""
    state_bytes = sum(t + i for t, i in _pairs(case)) * case.hidden_size * element_size
    h = case.hidden_size
    cost = sum(2 * t * i * h + 2 * (t + i) * h for t, i in _pairs(case))
    ipot = sum(IPOT_FLOPS_PER_ELEMENT * IPOT_ITERATIONS * t * i for t, i in _pairs(case))
    backward = sum(4 * t * i * h for t, i in _pairs(case))
    return {
        "bytes_forward": state_bytes,
        "bytes_forward_backward": 2 * state_bytes,
        "flops_forward": cost + ipot,
        "flops_cost": cost,
        "flops_ipot": ipot,
        "flops_forward_backward": cost + ipot + backward,
    }


def time_floor(case: Case, s: Settings) -> dict:
    """A copy of the packed states on the device: it reads the states once and writes a tensor
    of the gradients' size once, the forward+backward floor's traffic."""
    dst = torch.empty_like(case.hidden)
    m = measure_interleaved(
        {"copy": lambda i: dst.copy_(case.hidden)},
        device=s.device,
        warmup=s.warmup,
        iters=max(s.iters, 5),
    )["copy"]
    nbytes = 2 * case.hidden.numel() * case.hidden.element_size()
    return {
        "copy_median_ms": m.median_ms,
        "copy_min_ms": m.min_ms,
        "copy_bytes": nbytes,
        "copy_gb_per_s": nbytes / (m.min_ms * 1e-3) / 1e9,
    }


# --- timing -------------------------------------------------------------------------------------


def bench_case(case: Case, s: Settings, names: tuple[str, ...]) -> dict:
    providers = {name: Provider(name, case) for name in names}
    agreement = check_agreement(providers, s)
    floor = floor_of(case, case.hidden.element_size())
    floor.update(time_floor(case, s))
    bandwidth = floor["copy_gb_per_s"] * 1e9  # bytes/s
    results = {name: {} for name in providers}
    for name, p in providers.items():
        results[name]["saved_for_backward_bytes"] = saved_tensor_bytes(
            lambda p=p: p.distance(), exclude=[p.leaf]
        )
    timings = {
        "forward": measure_interleaved(
            {n: p.forward for n, p in providers.items()},
            device=s.device,
            warmup=s.warmup,
            iters=s.iters,
        ),
        "forward_backward": measure_interleaved(
            {n: p.forward_backward for n, p in providers.items()},
            device=s.device,
            warmup=s.warmup,
            iters=s.iters,
            setups={n: p.zero_grad for n, p in providers.items()},
        ),
    }
    for kind, measured in timings.items():
        floor_bytes = floor[f"bytes_{kind}"]
        floor_ms = floor_bytes / bandwidth * 1e3
        for name, m in measured.items():
            entry = m.to_dict()
            entry["floor_ms"] = floor_ms
            entry["fraction_of_floor"] = floor_ms / m.median_ms
            entry["achieved_gb_per_s"] = floor_bytes / (m.median_ms * 1e-3) / 1e9
            entry["achieved_gflop_per_s"] = floor[f"flops_{kind}"] / (m.median_ms * 1e-3) / 1e9
            if s.device.type == "cuda":
                p = providers[name]
                p.zero_grad()
                entry["memory"] = peak_memory(getattr(p, kind), device=s.device)
            else:
                entry["memory"] = cpu_peak_rss()
            results[name][kind] = entry
    speedups = {}
    if "triton" in results:
        for other in ("reference", "authors"):
            if other not in results:
                continue
            speedups[f"{other}_over_triton"] = {
                kind: statistics.median(
                    o / t
                    for o, t in zip(
                        timings[kind][other].times_ms, timings[kind]["triton"].times_ms, strict=True
                    )
                )
                for kind in timings
            }
    return {
        **case.to_dict(),
        "floor": floor,
        "agreement": agreement,
        "providers": results,
        "speedup": speedups,
    }


# --- report -------------------------------------------------------------------------------------


def print_case(r: dict) -> None:
    f = r["floor"]
    print(
        f"\n{r['name']}: {r['batch']} pairs, hidden {r['hidden']}, text {r['txt_len_mean']:.1f} "
        f"(max {r['max_txt_len']}), regions {r['img_len_mean']:.1f} (max {r['max_img_len']})"
    )
    print(
        f"  floor: fwd {f['bytes_forward'] / 1e6:.2f} MB, "
        f"fwd+bwd {f['bytes_forward_backward'] / 1e6:.2f} MB (copy {f['copy_gb_per_s']:.1f} GB/s); "
        f"FLOPs fwd {f['flops_forward'] / 1e9:.3f} G "
        f"(cost {f['flops_cost'] / 1e9:.3f}, IPOT {f['flops_ipot'] / 1e9:.3f}), "
        f"fwd+bwd {f['flops_forward_backward'] / 1e9:.3f} G"
    )
    print(
        f"  {'provider':9s} {'fwd ms':>9s} {'f+b ms':>9s} {'f+b floor':>9s} {'f+b GB/s':>9s} "
        f"{'f+b GFLOP/s':>11s} {'saved MiB':>9s}"
    )
    for name, p in r["providers"].items():
        fb = p["forward_backward"]
        print(
            f"  {name:9s} {p['forward']['median_ms']:9.3f} {fb['median_ms']:9.3f} "
            f"{fb['fraction_of_floor']:9.4f} {fb['achieved_gb_per_s']:9.2f} "
            f"{fb['achieved_gflop_per_s']:11.2f} {p['saved_for_backward_bytes'] / 2**20:9.2f}"
        )
    for key, v in r["speedup"].items():
        print(
            f"  {key}: forward {v['forward']:.2f}x, forward+backward {v['forward_backward']:.2f}x"
        )


def main(argv: list[str] | None = None) -> int:
    s = parse_args(argv)
    if s.torch_threads is not None:
        torch.set_num_threads(s.torch_threads)
    torch.manual_seed(s.seed)
    skipped = {}
    names = list(s.providers)
    if "reference" not in names:
        names.insert(0, "reference")  # the agreement check needs it
    if "triton" in names and not triton_runs_on(s.device.type):
        names.remove("triton")
        skipped["triton"] = (
            "Triton kernels run on the CPU only in Triton's interpreter: start the script with "
            "TRITON_INTERPRET=1 (slow; meant for checking the script)"
            if s.device.type == "cpu"
            else "triton is not installed"
        )
    interpreted = s.device.type == "cpu" and "triton" in names
    print(
        f"{NAME}: device {s.device}, {s.dtype}, providers {', '.join(names)}"
        + (f" (skipped: {', '.join(skipped)})" if skipped else "")
        + (" [triton in the interpreter]" if interpreted else "")
        + f", {s.warmup} warm-up + {s.iters} timed calls"
    )
    cases = make_cases(s)
    payload = {
        "benchmark": NAME,
        "question": QUESTION,
        "command": command_line(),
        "environment": environment(s.device),
        "settings": {
            "dtype": s.dtype,
            "batch_sizes": list(s.batch_sizes),
            "hidden_sizes": list(s.hidden_sizes),
            "txt_range": list(s.txt_range),
            "img_range": list(s.img_range),
            "target": TARGET if s.target else None,
            "beta": BETA,
            "ipot_iterations": IPOT_ITERATIONS,
            "iters": s.iters,
            "warmup": s.warmup,
            "seed": s.seed,
            "torch_threads": torch.get_num_threads(),
            "quick": s.quick,
            "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
            "modes": {
                "forward": "the distance with autograd recording (states require grad), as in "
                "training; no backward",
                "forward_backward": "the same plus backward of sum(distance * upstream); "
                "gradients set to None before each call, untimed",
                "floor": "bytes: read the states once (+ write their gradients once for "
                "forward+backward), timed as a device copy of the packed states; FLOPs: real "
                "lengths, cost matrix + 7 per element per IPOT iteration (+ 4mnH backward)",
                "memory": "CUDA: each provider alone, one call, max_memory_allocated above the "
                "allocation before it; CPU: process-wide peak RSS (not per provider)",
                "speedup": "median over calls of (other provider's time / triton's time), the "
                "calls interleaved on the same inputs",
            },
        },
        "providers": names,
        "providers_skipped": skipped,
        "cases": [],
    }
    for case in cases:
        result = bench_case(case, s, tuple(names))
        payload["cases"].append(result)
        print_case(result)
    path = save_result(NAME, payload, s.out)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
