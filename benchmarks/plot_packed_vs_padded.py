"""Bar charts of `bench_packed_vs_padded.py` results: real tokens/s per task, packed vs authors.

    python benchmarks/plot_packed_vs_padded.py benchmarks/results/packed_vs_padded-*.json

Writes one PNG next to each JSON (same name, `.png`): forward on the left, forward+backward on
the right, one pair of bars per task, the speed-up and the authors' padding fraction above each
pair. Needs matplotlib, which is not a project dependency (`pip install matplotlib`).
"""

from __future__ import annotations

import sys
from pathlib import Path

from plotting import plot_main

PROVIDERS = ("packed", "authors")
COLORS = {"packed": "#1f77b4", "authors": "#ff7f0e"}
KINDS = (("forward", "forward"), ("forward_backward", "forward + backward"))


def title(result: dict) -> str:
    env, s = result["environment"], result["settings"]
    return (
        f"{env['device_name']} ({env['device']}), {Path(s['model_config']).stem}, {s['dtype']}, "
        f"{s['tokens_per_batch']} real tokens/batch, {s['order']} order; "
        f"torch {env['torch']}, commit {(env['git_commit'] or 'unknown')[:8]}"
    )


def plot(result: dict, out: Path, plt) -> None:
    tasks = list(result["tasks"])
    fig, axes = plt.subplots(1, 2, figsize=(4 + 1.6 * len(tasks), 4.2), squeeze=False)
    width = 0.38
    for ax, (kind, label) in zip(axes[0], KINDS, strict=True):
        for j, provider in enumerate(PROVIDERS):
            rates = [result["tasks"][t]["providers"][provider][kind]["tokens_per_s"] for t in tasks]
            xs = [i + (j - 0.5) * width for i in range(len(tasks))]
            ax.bar(xs, rates, width, label=provider, color=COLORS[provider])
        top = max(
            result["tasks"][t]["providers"][p][kind]["tokens_per_s"]
            for t in tasks
            for p in PROVIDERS
        )
        for i, t in enumerate(tasks):
            task = result["tasks"][t]
            speedup = task["speedup_authors_time_over_packed"][kind]["median_of_call_ratios"]
            ax.text(
                i,
                top * 1.04,
                f"{speedup:.2f}x\npad {task['batches']['padding_fraction']:.0%}",
                ha="center",
                va="bottom",
                fontsize=8,
            )
        ax.set_ylim(0, top * 1.25)
        ax.set_xticks(range(len(tasks)), tasks)
        ax.set_title(label)
        ax.set_ylabel("real tokens/s (median)")
        ax.legend(loc="lower right", fontsize=8)
    fig.suptitle(title(result), fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    return plot_main("plot_packed_vs_padded", __doc__, "packed_vs_padded", "tasks", plot, argv)


if __name__ == "__main__":
    sys.exit(main())
