"""Which warps and block sizes should the fused kernels launch with? A short timed sweep.

    python benchmarks/sweep_kernels.py                      # CUDA: the cases below, ~30 s
    python benchmarks/sweep_kernels.py --device cpu --quick # the interpreter, tiny: a smoke run

The launchers choose their configuration from the compiler's register report (no spill:
`benchmarks/aot_compile.py`), never from a timing; this sweep times the alternatives on a GPU so
that the choice can be revisited with figures. Each variant is timed against the launcher's own
choice in the same run:

- IPOT forward+backward (`_launch_config` replaced by each variant): warps {4, 8, 16} x hidden
  chunk {16, 32, 64}, at the bench's target case (256 pairs of 40 x 60, hidden 1024: 64 x 64
  blocks) and at the common pretraining shape (captions up to 32 tokens, up to 100 regions:
  32 x 128 blocks, hidden 768); bf16 states, as in training.
- IPOT waves: one program per pair, so 132 pairs fill an H100/H200's 132 SMs once and 133 need a
  second wave; time per pair at 132, 133 and 264 pairs (32 x 128 blocks).
- The vocabulary-row cross-entropy (`_ce_fwd_kernel` with its in-place gradient, 2048 rows of
  28996 bf16 logits): BLOCK {4096, 8192, 16384} x warps {4, 8, 16}.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if "--device" in sys.argv and sys.argv[sys.argv.index("--device") + 1] == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import command_line, environment, measure, save_result  # noqa: E402

from uniter_fast.kernels import ipot  # noqa: E402
from uniter_fast.kernels import masked_losses as ml  # noqa: E402


def _time(fn, device: torch.device, iters: int, warmup: int) -> float:
    return measure(lambda i: fn(), device=device, iters=iters, warmup=warmup).median_ms


def _pairs(batch, m, n, hidden, device, gen):
    txt_len = torch.randint(max(1, m // 2), m + 1, (batch,), generator=gen)
    img_len = torch.randint(max(1, n // 2), n + 1, (batch,), generator=gen)
    txt_len[0], img_len[0] = m, n
    cu = torch.zeros(batch + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(txt_len + img_len, 0)
    hidden_rows = torch.randn(int(cu[-1]), hidden, generator=gen).to(torch.bfloat16)
    return (
        hidden_rows.to(device).requires_grad_(True),
        cu.to(device),
        txt_len.to(torch.int32).to(device),
        img_len.to(torch.int32).to(device),
        m,
        n,
    )


def ipot_sweep(cases, warps, chunks, device, iters, warmup, gen) -> list[dict]:
    rows = []
    original = ipot._launch_config
    for name, (batch, m, n, hidden) in cases.items():
        args = _pairs(batch, m, n, hidden, device, gen)

        def step(args=args):
            ipot.wra_distance_packed_triton(*args).sum().backward()

        chosen = original(m, n, hidden)
        base_ms = _time(step, device, iters, warmup)
        rows.append(
            {"kernel": "ipot", "case": name, "config": chosen, "default": True, "ms": base_ms}
        )
        for w in warps:
            for bh in chunks:
                config = {**chosen, "num_warps": w, "BLOCK_H": bh}
                if config == chosen:
                    continue
                ipot._launch_config = lambda *a, config=config, **k: dict(config)
                try:
                    ms = _time(step, device, iters, warmup)
                    rows.append(
                        {
                            "kernel": "ipot",
                            "case": name,
                            "config": config,
                            "default": False,
                            "ms": ms,
                        }
                    )
                except Exception as exc:  # e.g. out of shared memory: a variant, not the sweep
                    rows.append(
                        {
                            "kernel": "ipot",
                            "case": name,
                            "config": config,
                            "default": False,
                            "error": str(exc)[:300],
                        }
                    )
                finally:
                    ipot._launch_config = original
    return rows


def wave_sweep(pair_counts, m, n, hidden, device, iters, warmup, gen) -> list[dict]:
    rows = []
    for batch in pair_counts:
        args = _pairs(batch, m, n, hidden, device, gen)
        hidden_rows = args[0].detach()

        def forward(args=args, hidden_rows=hidden_rows):
            ipot.ipot_forward_packed(hidden_rows, *args[1:])

        ms = _time(forward, device, iters, warmup)
        rows.append(
            {
                "kernel": "ipot_forward_waves",
                "pairs": batch,
                "ms": ms,
                "us_per_pair": 1000 * ms / batch,
            }
        )
    return rows


def ce_sweep(rows_n, vocab, blocks, warps, device, iters, warmup, gen) -> list[dict]:
    out = []
    vocab_mem = -(-vocab // ml.MLM_ROW_ALIGN) * ml.MLM_ROW_ALIGN
    buf = torch.randn(rows_n, vocab_mem, generator=gen).to(torch.bfloat16).to(device)
    logits = buf[:, :vocab]
    labels = torch.randint(0, vocab, (rows_n,), generator=gen).to(device)
    loss = torch.empty(rows_n, device=device)
    scale = torch.full((1,), 1.0 / rows_n, device=device)
    default_block, default_warps = ml._row_config(vocab, None)
    for block in blocks:
        for w in warps:

            def run(block=block, w=w):
                ml._ce_fwd_kernel[(rows_n,)](
                    logits,
                    labels,
                    loss,
                    loss,
                    logits,
                    scale,
                    logits.stride(0),
                    logits.stride(0),
                    vocab,
                    vocab_mem,
                    IGNORE_INDEX=ml.MLM_IGNORE_INDEX,
                    STORE_LSE=False,
                    WRITE_GRAD=True,
                    RNE_BF16=ml._rne_by_hand(logits),
                    BLOCK=block,
                    num_warps=w,
                )

            try:
                ms = _time(run, device, iters, warmup)
                gbps = 3 * logits.numel() * 2 / (ms * 1e-3) / 1e9  # two reads, one write
                out.append(
                    {
                        "kernel": "mlm_ce",
                        "BLOCK": block,
                        "num_warps": w,
                        "ms": ms,
                        "GB_per_s": gbps,
                        "default": (block, w) == (default_block, default_warps),
                    }
                )
            except Exception as exc:
                out.append(
                    {"kernel": "mlm_ce", "BLOCK": block, "num_warps": w, "error": str(exc)[:300]}
                )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--iters", type=int, default=None, help="timed calls (default 20; quick 2)")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, few variants")
    p.add_argument("--out", type=Path, help="result file or folder (default: runs/bench/)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    iters = args.iters or (2 if args.quick else 20)
    warmup = 1 if args.quick else 3
    gen = torch.Generator().manual_seed(0)
    if args.quick:
        cases = {"tiny": (4, 12, 20, 32)}
        warps, chunks = (4,), (16, 32)
        pair_counts, wave_shape = (3, 4), (12, 20, 32)
        ce = (4, 300, (64, 128), (4,))
    else:
        cases = {"target_64x64": (256, 40, 60, 1024), "common_32x128": (256, 32, 100, 768)}
        warps, chunks = (4, 8, 16), (16, 32, 64)
        pair_counts, wave_shape = (132, 133, 264), (32, 100, 768)
        ce = (2048, 28996, (4096, 8192, 16384), (4, 8, 16))
    rows = ipot_sweep(cases, warps, chunks, device, iters, warmup, gen)
    rows += wave_sweep(pair_counts, *wave_shape, device, iters, warmup, gen)
    rows += ce_sweep(*ce, device, iters, warmup, gen)
    for r in rows:
        what = {k: v for k, v in r.items() if k not in ("kernel", "ms", "error")}
        figure = f"{r['ms']:.3f} ms" if "ms" in r else f"error: {r['error'][:80]}"
        print(f"{r['kernel']:20s} {figure:>12s}  {what}")
    payload = {
        "benchmark": "sweep_kernels",
        "command": command_line(),
        "environment": environment(device),
        "quick": args.quick,
        "iters": iters,
        "rows": rows,
    }
    path = save_result("sweep", payload, args.out)
    print(f"sweep_kernels: {len(rows)} timings; wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
