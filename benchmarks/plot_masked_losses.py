"""Time against masked rows for `bench_masked_losses.py` results: one panel per loss and mode.

    python benchmarks/plot_masked_losses.py benchmarks/results/masked_losses-*.json

Writes one PNG next to each JSON (same name, `.png`): a row of panels per mode (forward,
forward + backward), a panel per loss; median ms against masked rows on log-log axes, one line
per provider and hidden size (solid 768, dashed 1024, ...), the bare-GEMM time of the same
shapes in grey (the practical floor). Skipped providers have no line; interpreted Triton times
(CPU) are drawn dotted and labelled, since they say nothing about speed. Needs matplotlib, which
is not a project dependency (`pip install matplotlib`).
"""

from __future__ import annotations

import sys
from pathlib import Path

from plotting import plot_main

PROVIDERS = ("triton", "reference", "authors")
COLORS = {"triton": "#2ca02c", "reference": "#1f77b4", "authors": "#ff7f0e", "gemm": "#7f7f7f"}
DASHES = ("-", "--", "-.", ":")
KINDS = (("forward", "forward"), ("forward_backward", "forward + backward"))


def title(result: dict) -> str:
    env, s = result["environment"], result["settings"]
    return (
        f"{env['device_name']} ({env['device']}), {s['dtype']}; torch {env['torch']}, "
        f"triton {env['triton']}, commit {(env['git_commit'] or 'unknown')[:8]}"
    )


def series(cases: list[dict], hidden: int, provider: str, kind: str):
    """(rows, median ms, interpreted) of one provider at one hidden size, sorted by rows."""
    points, interpreted = [], False
    for case in cases:
        if case["hidden"] != hidden:
            continue
        if provider == "gemm":
            points.append((case["rows"], case["gemm_ms"][kind]))
            continue
        entry = case["providers"].get(provider, {})
        if "skipped" in entry or kind not in entry:
            continue
        points.append((case["rows"], entry[kind]["median_ms"]))
        interpreted = interpreted or entry.get("interpreted", False)
    points.sort()
    return [p[0] for p in points], [p[1] for p in points], interpreted


def plot(result: dict, out: Path, plt) -> None:
    losses = list(result["losses"])
    fig, axes = plt.subplots(
        len(KINDS), len(losses), figsize=(3.6 * len(losses), 3.4 * len(KINDS)), squeeze=False
    )
    for row, (kind, kind_label) in enumerate(KINDS):
        for col, loss in enumerate(losses):
            ax = axes[row][col]
            cases = result["losses"][loss]["cases"]
            hiddens = sorted({c["hidden"] for c in cases})
            for h_i, hidden in enumerate(hiddens):
                dash = DASHES[h_i % len(DASHES)]
                for provider in (*PROVIDERS, "gemm"):
                    xs, ys, interpreted = series(cases, hidden, provider, kind)
                    if not xs:
                        continue
                    label = f"{provider} H{hidden}" + (" (interpreted)" if interpreted else "")
                    ax.plot(
                        xs,
                        ys,
                        linestyle=":" if interpreted else dash,
                        marker="o",
                        markersize=3,
                        color=COLORS[provider],
                        label=label,
                    )
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{loss}: {kind_label}", fontsize=9)
            ax.set_xlabel("masked rows")
            ax.set_ylabel("ms (median)")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=6, loc="best")
    fig.suptitle(title(result), fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    return plot_main("plot_masked_losses", __doc__, "masked_losses", "losses", plot, argv)


if __name__ == "__main__":
    sys.exit(main())
