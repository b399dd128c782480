"""Do the fast paths train to the same losses as the reference paths? Two short runs, one compare.

    python benchmarks/convergence.py                       # CUDA: base, 200 steps each
    python benchmarks/convergence.py --device cpu --quick  # a smoke run: tiny model, 16 steps

Both runs are `train.py` on the same synthetic shards (the run writes them from the seed), the same
seed and the same data order; they differ only in the paths: `fast` is the training default (bf16
autocast, the fused Triton kernels, varlen/flash attention), `reference` is fp32, the PyTorch
reference losses and eager attention. Reported per task: the mean training loss over the last
tenth of the steps that drew the task, and the held-out validation loss at the end; the check
is that each of the fast run's losses lies within `--tolerance` (1%) of the reference run's.
A step differs by rounding between the two (bf16 against fp32), so the runs drift apart a
little from the first step on; what must not happen is a systematic gap (a wrong gradient, a
kernel that trains a different function).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import yaml  # noqa: E402
from common import REPO_ROOT, command_line, environment, save_result  # noqa: E402

PATHS = {
    "fast": {"precision": "bf16", "kernels": "auto", "attention": "auto"},
    "reference": {"precision": "fp32", "kernels": "reference", "attention": "eager"},
}
TASK_LOSSES = ("mlm", "mrfr", "mrckl", "itm")


def recipe(args, device: str) -> dict:
    """The quick start's recipe at the chosen model size, steps and budget."""
    cfg = yaml.safe_load((REPO_ROOT / "configs" / "pretrain" / "tiny-cpu.yaml").read_text())
    cfg.update(
        model_config=str(REPO_ROOT / "configs" / "model" / f"uniter-{args.model}.json"),
        max_steps=args.steps,
        seed=args.seed,
        device=device,
        log_every=1,
        save_every=0,
        val_every=0,
        keep_checkpoints=1,
    )
    cfg["data"].update(tokens_per_batch=args.tokens_per_batch, num_workers=0)
    if args.quick:
        cfg["data"].update(synthetic_images=120, synthetic_val_images=40)
    cfg["optim"].update(lr=args.lr, warmup_steps=max(1, args.steps // 10))
    return cfg


def end_losses(run_dir: Path) -> dict:
    """Per task: mean training loss over the last tenth of its steps; validation loss."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r.get("split") != "val" and "task" in r]
    out = {}
    for task in TASK_LOSSES:
        values = [r[task] for r in rows if r["task"] == task and task in r]
        if values:
            tail = values[-max(1, len(values) // 10) :]
            out[f"{task}_train"] = sum(tail) / len(tail)
    summary = json.loads((run_dir / "summary.json").read_text())
    for key, value in (summary.get("validation") or {}).items():
        if key.endswith("_loss"):
            out[f"{key[:-5]}_val"] = value
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda or cpu (default cuda)")
    parser.add_argument("--model", default="base", choices=["tiny", "base", "large"])
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps per run")
    parser.add_argument("--tokens-per-batch", type=int, default=2048)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--tolerance", type=float, default=0.01, help="relative (default 1%%)")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny, 16 steps, CPU ok")
    parser.add_argument("--work", type=Path, help="run folders (default: a temporary folder)")
    parser.add_argument("--out", type=Path, help="result file or folder (default: runs/bench/)")
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.steps, args.tokens_per_batch, args.lr = "tiny", 16, 1024, 1e-3
    work = args.work or Path(tempfile.mkdtemp(prefix="uniter-convergence-"))
    results, seconds = {}, {}
    for name, paths in PATHS.items():
        cfg = recipe(args, args.device)
        if args.device == "cpu":
            # The CPU has neither bf16 kernels nor Triton outside the interpreter: the smoke run
            # checks the plumbing with the paths the CPU can take.
            paths = {**paths, "precision": "fp32", "kernels": "reference"}
        cfg.update(paths)
        run_dir = work / name
        run_dir.mkdir(parents=True, exist_ok=True)
        recipe_path = run_dir / "recipe.yaml"
        recipe_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        started = time.perf_counter()
        cmd = [
            sys.executable,
            str(REPO_ROOT / "train.py"),
            "--config",
            str(recipe_path),
            "--output-dir",
            str(run_dir / "run"),
            "--no-resume",
        ]
        print(f"convergence: {name}: {' '.join(f'{k}={v}' for k, v in paths.items())}", flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
        seconds[name] = round(time.perf_counter() - started, 1)
        (run_dir / "train.out").write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            print(f"convergence: the {name} run failed (exit {proc.returncode})", file=sys.stderr)
            return 1
        results[name] = end_losses(run_dir / "run")
    fast, ref = results["fast"], results["reference"]
    compared = {}
    for key in sorted(set(fast) & set(ref)):
        rel = abs(fast[key] - ref[key]) / max(abs(ref[key]), 1e-12)
        compared[key] = {
            "fast": fast[key],
            "reference": ref[key],
            "relative_difference": rel,
            "ok": rel <= args.tolerance,
        }
    print(f"{'loss':12s} {'fast':>10s} {'reference':>10s} {'rel. diff':>9s}")
    for key, c in compared.items():
        print(
            f"{key:12s} {c['fast']:10.4f} {c['reference']:10.4f} {c['relative_difference']:9.2%}"
            f"  {'ok' if c['ok'] else 'OVER'}"
        )
    ok = bool(compared) and all(c["ok"] for c in compared.values())
    payload = {
        "benchmark": "convergence",
        "command": command_line(),
        "environment": environment(args.device if args.device != "cuda" else "cuda"),
        "model": args.model,
        "steps": args.steps,
        "tokens_per_batch": args.tokens_per_batch,
        "seed": args.seed,
        "tolerance": args.tolerance,
        "paths": PATHS,
        "seconds": seconds,
        "losses": compared,
        "ok": ok,
    }
    path = save_result("convergence", payload, args.out)
    print(f"convergence: {'within' if ok else 'NOT within'} {args.tolerance:.0%}; wrote {path}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
