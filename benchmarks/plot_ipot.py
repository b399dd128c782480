"""Time vs batch size from `bench_ipot.py` results: one line per provider, and the floor.

    python benchmarks/plot_ipot.py benchmarks/results/ipot-*.json

Writes one PNG next to each JSON (same name, `.png`): a row per hidden size, forward on the left
and forward+backward on the right, ms per call (median) against pairs per batch on log-log axes,
the bandwidth floor dashed. The ragged cases make the lines; the target case is left out (it has
fixed lengths). Needs matplotlib, which is not a project dependency (`pip install matplotlib`).
"""

from __future__ import annotations

import sys
from pathlib import Path

from plotting import plot_main

COLORS = {"triton": "#1f77b4", "reference": "#2ca02c", "authors": "#ff7f0e", "floor": "#7f7f7f"}
KINDS = (("forward", "forward"), ("forward_backward", "forward + backward"))


def title(result: dict) -> str:
    env, s = result["environment"], result["settings"]
    skipped = ", ".join(f"{k} skipped" for k in result.get("providers_skipped", {}))
    interp = " (triton interpreted)" if s.get("triton_interpret") else ""
    return (
        f"{env['device_name']} ({env['device']}), {s['dtype']}, {s['ipot_iterations']} IPOT "
        f"iterations{interp}{'; ' + skipped if skipped else ''}; torch {env['torch']}, "
        f"triton {env['triton']}, commit {(env['git_commit'] or 'unknown')[:8]}"
    )


def plot(result: dict, out: Path, plt) -> None:
    cases = [c for c in result["cases"] if c["name"] != "target"]
    if not cases:
        raise ValueError("no ragged cases to plot (only the target case)")
    hidden_sizes = sorted({c["hidden"] for c in cases})
    providers = result["providers"]
    fig, axes = plt.subplots(
        len(hidden_sizes), 2, figsize=(10, 3.6 * len(hidden_sizes)), squeeze=False
    )
    for row, hidden in zip(axes, hidden_sizes, strict=True):
        chosen = sorted((c for c in cases if c["hidden"] == hidden), key=lambda c: c["batch"])
        batches = [c["batch"] for c in chosen]
        for ax, (kind, label) in zip(row, KINDS, strict=True):
            for name in providers:
                ms = [c["providers"][name][kind]["median_ms"] for c in chosen]
                ax.plot(batches, ms, "o-", label=name, color=COLORS.get(name))
            floor = [c["providers"][providers[0]][kind]["floor_ms"] for c in chosen]
            ax.plot(batches, floor, "--", label="bandwidth floor", color=COLORS["floor"])
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks(batches, [str(b) for b in batches])
            ax.set_xlabel("pairs per batch")
            ax.set_ylabel("ms per call (median)")
            ax.set_title(f"{label}, hidden {hidden}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(title(result), fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    return plot_main("plot_ipot", __doc__, "ipot", "cases", plot, argv)


if __name__ == "__main__":
    sys.exit(main())
