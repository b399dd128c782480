"""Charts of `bench_e2e.py` results: real tokens/s with MFU, and the split of a step, per provider.

    python benchmarks/plot_e2e.py runs/bench/e2e-*.json

Writes one PNG next to each JSON (same name, `.png`): one row per model, tokens/s bars on the left
(MFU and the speed-up over the authors' step above each bar), the mean step split in ms on the
right (data, forward, backward, optimizer, other stacked). Needs matplotlib, which is not a
project dependency (`pip install matplotlib`).
"""

from __future__ import annotations

import sys
from pathlib import Path

from plotting import plot_main

PHASES = ("data", "forward", "backward", "optimizer", "other")
PHASE_COLORS = ("#9467bd", "#1f77b4", "#ff7f0e", "#2ca02c", "#7f7f7f")


def title(result: dict) -> str:
    env, s = result["environment"], result["settings"]
    return (
        f"{env['device_name']} ({env['device']}), {s['precision']}, {s['order']} order, "
        f"{s['rounds']} x {s['steps']} timed steps; peak {result['peak']['tflops']:.1f} TFLOP/s "
        f"measured; torch {env['torch']}, commit {(env['git_commit'] or 'unknown')[:8]}"
    )


def plot(result: dict, out: Path, plt) -> None:
    models = list(result["models"])
    fig, axes = plt.subplots(len(models), 2, figsize=(11, 3.6 * len(models)), squeeze=False)
    for row, model in zip(axes, models, strict=True):
        entry = result["models"][model]
        names = list(entry["providers"])
        providers = [entry["providers"][n] for n in names]
        rates = [p["tokens_per_s"] for p in providers]
        ax = row[0]
        ax.bar(range(len(names)), rates, color="#1f77b4")
        over = entry["speedup_tokens_per_s"].get("authors", {})
        for i, (name, p) in enumerate(zip(names, providers, strict=True)):
            label = f"MFU {p['mfu']:.0%}"
            if name in over:
                label += f"\n{over[name]:.2f}x authors"
            ax.text(i, rates[i] * 1.02, label, ha="center", va="bottom", fontsize=8)
        ax.set_ylim(0, max(rates) * 1.3)
        ax.set_xticks(range(len(names)), names, fontsize=8)
        ax.set_ylabel("real tokens/s")
        ax.set_title(
            f"{model}: {entry['tokens_per_batch']} real tokens x {entry['grad_accum']} "
            "micro-batches per step",
            fontsize=9,
        )
        ax = row[1]
        bottom = [0.0] * len(names)
        for phase, color in zip(PHASES, PHASE_COLORS, strict=True):
            values = [p["split_ms_per_step"][phase] for p in providers]
            ax.bar(range(len(names)), values, bottom=bottom, color=color, label=phase)
            bottom = [b + v for b, v in zip(bottom, values, strict=True)]
        ax.set_xticks(range(len(names)), names, fontsize=8)
        ax.set_ylabel("ms per optimizer step")
        ax.set_title(f"{model}: where a step's time goes", fontsize=9)
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(title(result), fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    return plot_main("plot_e2e", __doc__, "e2e", "models", plot, argv)


if __name__ == "__main__":
    sys.exit(main())
