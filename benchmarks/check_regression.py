"""The throughput regression gate: a bench_e2e result against a committed baseline.

    python benchmarks/bench_e2e.py --gate --out /tmp/e2e.json          # CPU: tiny, ratios
    python benchmarks/check_regression.py /tmp/e2e.json                # vs baselines/cpu.json

    python benchmarks/bench_e2e.py --out /tmp/e2e.json                 # on the GPU
    python benchmarks/check_regression.py /tmp/e2e.json                # vs baselines/h100.json
    python benchmarks/check_regression.py /tmp/e2e.json --write-baseline baselines/h100.json

A baseline (`benchmarks/baselines/<device class>.json`) names figures of a result by their path
in its JSON (`models.base.providers.fast.tokens_per_s`), each with the value it had, whether
higher or lower is better, and the fraction it may get worse by (the baseline's `tolerance`,
unless the figure sets its own). The check fails when any figure got worse by more than that,
or when a figure is missing from the result; it refuses a result of another device class, or of
another kind of run (`--quick`, `--gate` or full) than the baseline was made from.

Two kinds of baseline, written by `--write-baseline` from one result or several (each figure
then the median over them, which is what a baseline of a noisy machine should hold):
- "ratios" (CPU results, what CI runs): only the speed-ups of each provider over the others
  measured in the same run (`speedup_tokens_per_s`), which a noisy shared 2-core machine keeps
  far better than absolute times (the gate run interleaves the providers over five rounds and
  takes the median ratio). Default tolerance 0.25.
- "absolute" (GPU results): every provider's tokens/s and MFU, the speed-ups, and peak memory
  (lower is better). Default tolerance 0.05; a GPU is not shared, so its figures repeat closely.

Exit status: 0 every figure within tolerance; 1 a regression (or a figure missing); 2 the inputs
cannot be compared (unreadable file, another benchmark, another device class or kind of run).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

BASELINES = Path(__file__).resolve().parent / "baselines"
DEFAULT_TOLERANCE = {"ratios": 0.25, "absolute": 0.05}
# Speed-ups (base, provider) that say something about this project: ours over the reference's
# approach and VisualBERT, and the fused kernels + varlen attention over the same model without
# them. Ratios with ours in the denominator would "regress" when ours got faster.
OURS = ("fast", "fast_deepspeed", "plain")
GATED_SPEEDUPS = frozenset(
    [(base, name) for base in ("authors", "visualbert") for name in OURS]
    + [("plain", "fast"), ("plain", "fast_deepspeed")]
)


class GateError(Exception):
    """The result and the baseline cannot be compared (exit status 2)."""


def _read(path: Path, what: str) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise GateError(f"{what} not found: {path}") from None
    except (OSError, json.JSONDecodeError) as e:
        raise GateError(f"{what} {path}: cannot read it as JSON ({e})") from None
    if not isinstance(data, dict):
        raise GateError(f"{what} {path}: expected a JSON object")
    return data


def lookup(result: dict, path: str):
    """The value at a dotted path of the result, or None where any part is missing."""
    node = result
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def run_kind(result: dict) -> str:
    """Which bench_e2e run made a result: "quick" (a smoke run), "gate" (the CPU gate's run) or
    "full". Figures of different kinds measure different things (a quick run's single step says
    nothing about a gate's five interleaved rounds), so they are never compared."""
    settings = result.get("settings", {})
    return "quick" if settings.get("quick") else "gate" if settings.get("gate") else "full"


def figures_of(result: dict, mode: str) -> dict[str, dict]:
    """The figures a baseline of `mode` records from a bench_e2e result."""
    figures = {}
    for model, entry in result.get("models", {}).items():
        for base, ups in entry.get("speedup_tokens_per_s", {}).items():
            for name, value in ups.items():
                if (base, name) not in GATED_SPEEDUPS:
                    continue
                path = f"models.{model}.speedup_tokens_per_s.{base}.{name}"
                figures[path] = {"value": value, "better": "higher"}
        if mode == "ratios":
            continue
        for name, provider in entry.get("providers", {}).items():
            prefix = f"models.{model}.providers.{name}"
            figures[f"{prefix}.tokens_per_s"] = {
                "value": provider["tokens_per_s"],
                "better": "higher",
            }
            figures[f"{prefix}.mfu"] = {"value": provider["mfu"], "better": "higher"}
            peak = provider.get("memory", {}).get("peak_allocated_bytes")
            if peak:
                figures[f"{prefix}.memory.peak_allocated_bytes"] = {
                    "value": peak,
                    "better": "lower",
                }
    return figures


def write_baseline(
    results: list[dict], paths: list[Path], out: Path, tolerance: float | None
) -> dict:
    """A baseline from one or more results of one device class: each figure's median."""
    classes = {r["environment"]["device_class"] for r in results}
    if len(classes) != 1:
        raise GateError(f"the results come from several device classes: {sorted(classes)}")
    kinds = {run_kind(r) for r in results}
    if len(kinds) != 1:
        raise GateError(f"the results come from several kinds of run: {sorted(kinds)}")
    env = results[0]["environment"]
    mode = "ratios" if env["device_class"] == "cpu" else "absolute"
    per_result = [figures_of(r, mode) for r in results]
    common = set(per_result[0]).intersection(*per_result[1:])
    if not common:
        raise GateError(f"{paths[0]}: no figures to record (not a bench_e2e result?)")
    figures = {
        path: {
            "value": statistics.median(f[path]["value"] for f in per_result),
            "better": per_result[0][path]["better"],
        }
        for path in sorted(common)
    }
    baseline = {
        "benchmark": results[0]["benchmark"],
        "device_class": env["device_class"],
        "run": kinds.pop(),
        "mode": mode,
        "tolerance": DEFAULT_TOLERANCE[mode] if tolerance is None else tolerance,
        "source": [
            {
                "result": path.name,
                "command": r.get("command"),
                "device_name": r["environment"].get("device_name"),
                "torch": r["environment"].get("torch"),
                "git_commit": r["environment"].get("git_commit"),
                "date_utc": r["environment"].get("date_utc"),
            }
            for r, path in zip(results, paths, strict=True)
        ],
        "figures": figures,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(baseline, indent=2) + "\n")
    os.replace(tmp, out)
    return baseline


def compare(result: dict, baseline: dict, tolerance: float | None = None) -> list[dict]:
    """One row per baseline figure: its values, the limit, and whether it passed."""
    if result.get("benchmark") != baseline.get("benchmark"):
        raise GateError(
            f"the result is a {result.get('benchmark')!r} benchmark, the baseline "
            f"{baseline.get('benchmark')!r}'s"
        )
    got_class = result.get("environment", {}).get("device_class")
    if got_class != baseline.get("device_class"):
        raise GateError(
            f"the result was measured on {got_class!r}, the baseline on "
            f"{baseline.get('device_class')!r}: compare figures of one device class (write a "
            "baseline for this one with --write-baseline)"
        )
    want_kind, got_kind = baseline.get("run"), run_kind(result)
    if want_kind is not None and got_kind != want_kind:
        flags = {"quick": "--quick", "gate": "--gate", "full": "neither --quick nor --gate"}
        raise GateError(
            f"the result is a {got_kind!r} run of bench_e2e.py, the baseline was made from "
            f"{want_kind!r} runs: compare a run made with {flags[want_kind]}, or write a "
            "baseline for this kind with --write-baseline"
        )
    rows = []
    for path, spec in baseline["figures"].items():
        allowed = (
            tolerance if tolerance is not None else spec.get("tolerance", baseline["tolerance"])
        )
        want, better = spec["value"], spec["better"]
        got = lookup(result, path)
        if better == "higher":
            limit = want * (1 - allowed)
            ok = got is not None and got >= limit
        else:
            limit = want * (1 + allowed)
            ok = got is not None and got <= limit
        rows.append(
            {
                "figure": path,
                "baseline": want,
                "current": got,
                "change": None if got is None or not want else got / want - 1,
                "limit": limit,
                "better": better,
                "ok": ok,
            }
        )
    return rows


def _fmt(v) -> str:
    if v is None:
        return "missing"
    return f"{v:,.4g}" if abs(v) < 1e4 else f"{v:,.0f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "results", nargs="+", type=Path, help="a bench_e2e result JSON (several: --write-baseline)"
    )
    p.add_argument("--baseline", type=Path, help="default: benchmarks/baselines/<class>.json")
    p.add_argument("--tolerance", type=float, help="override every figure's tolerance")
    p.add_argument("--write-baseline", type=Path, metavar="PATH", help="record a baseline")
    a = p.parse_args(argv)
    if a.tolerance is not None and not 0 <= a.tolerance < 1:
        p.error(f"--tolerance must lie in [0, 1), got {a.tolerance}")
    if len(a.results) > 1 and not a.write_baseline:
        p.error("compare one result at a time (several results make a baseline)")
    try:
        results = []
        for path in a.results:
            result = _read(path, "result")
            if "environment" not in result or "models" not in result:
                raise GateError(f"result {path}: not a bench_e2e result (no environment/models)")
            results.append(result)
        if a.write_baseline:
            baseline = write_baseline(results, a.results, a.write_baseline, a.tolerance)
            print(
                f"wrote {a.write_baseline}: {len(baseline['figures'])} figures, mode "
                f"{baseline['mode']}, tolerance {baseline['tolerance']}"
            )
            return 0
        result = results[0]
        cls = result["environment"]["device_class"]
        baseline_path = a.baseline or BASELINES / f"{cls}.json"
        baseline = _read(baseline_path, "baseline")
        rows = compare(result, baseline, a.tolerance)
    except GateError as e:
        print(f"check_regression: {e}", file=sys.stderr)
        return 2
    print(f"check_regression: {a.results[0]} against {baseline_path} ({baseline['mode']})")
    width = max(len(r["figure"]) for r in rows)
    for r in rows:
        change = "" if r["change"] is None else f"{r['change']:+.1%}"
        sign = ">=" if r["better"] == "higher" else "<="
        verdict = "ok" if r["ok"] else "MISSING" if r["current"] is None else "REGRESSION"
        print(
            f"  {r['figure']:{width}s}  {_fmt(r['current']):>10s}  (baseline "
            f"{_fmt(r['baseline'])}, {change or 'n/a'}; needs {sign} {_fmt(r['limit'])})  {verdict}"
        )
    failed = [r for r in rows if not r["ok"]]
    if failed:
        print(
            f"check_regression: {len(failed)} of {len(rows)} figures regressed or are missing",
            file=sys.stderr,
        )
        return 1
    print(f"check_regression: all {len(rows)} figures within tolerance")
    return 0


if __name__ == "__main__":
    sys.exit(main())
