"""What every plot script shares: read a result JSON, find matplotlib, draw one PNG per result.

    from plotting import plot_main
    def plot(result: dict, out: Path, plt) -> None: ...
    if __name__ == "__main__":
        sys.exit(plot_main("plot_ipot", __doc__, "ipot", "cases", plot))

matplotlib is not a project dependency: without it a plot script says so and exits 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path


def load_result(path: Path, benchmark: str, key: str) -> dict:
    """The result JSON at `path`; ValueError unless it is a `benchmark` result holding `key`."""
    try:
        result = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read a result JSON ({e})") from None
    if result.get("benchmark") != benchmark or not result.get(key):
        raise ValueError(f"{path}: not a {benchmark} result with {key}")
    return result


def plot_main(
    name: str,
    doc: str,
    benchmark: str,
    key: str,
    plot: Callable[[dict, Path, object], None],
    argv: list[str] | None = None,
) -> int:
    """The command line of a plot script: `plot(result, out_png, plt)` for each result given."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path, help="result JSON files")
    args = parser.parse_args(argv)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(
            f"{name}: matplotlib is not installed (it is not a project dependency); "
            "pip install matplotlib",
            file=sys.stderr,
        )
        return 1
    for path in args.results:
        out = path.with_suffix(".png")
        try:
            plot(load_result(path, benchmark, key), out, plt)
        except ValueError as e:
            print(f"{name}: {e}", file=sys.stderr)
            return 1
        print(f"wrote {out}")
    return 0
