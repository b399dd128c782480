"""Write SUMMARY.md for a folder that `gpu_suite.sh` filled: each target, the figure, pass/fail.

    python benchmarks/gpu_summary.py OUT_DIR

Reads `phases.tsv` (each phase's box, seconds and exit status), the JUnit XML of the GPU tests
and every result JSON in the folder, draws the plots where matplotlib is installed, and writes
OUT_DIR/SUMMARY.md. A target whose figure is missing (its phase failed or ran out of time) is
listed as missing, never as passed. The targets are those benchmarks/NOTES.md predicts.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).resolve().parent
PLOTS = {"ipot": "plot_ipot.py", "masked_losses": "plot_masked_losses.py", "e2e": "plot_e2e.py"}


def _load(folder: Path) -> dict[str, list[tuple[Path, dict]]]:
    found: dict[str, list] = {}
    for path in sorted(folder.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and "benchmark" in data:
            found.setdefault(data["benchmark"], []).append((path, data))
    return found


def _row(target: str, figure, passed: bool | None, note: str = "") -> dict:
    return {"target": target, "figure": figure, "passed": passed, "note": note}


def phase_rows(folder: Path) -> list[dict]:
    rows = []
    path = folder / "phases.tsv"
    if not path.exists():
        return [_row("phases ran", "phases.tsv missing", False)]
    with path.open() as f:
        for p in csv.DictReader(f, delimiter="\t"):
            rc = int(p["exit"])
            state = "ok" if rc == 0 else "out of time" if rc in (124, 137) else f"exit {rc}"
            rows.append(
                _row(
                    f"phase {p['phase']} within {p['box_s']} s",
                    f"{state}, {p['seconds']} s",
                    rc == 0,
                    f"log: {p['phase']}.log",
                )
            )
    return rows


def test_rows(folder: Path) -> list[dict]:
    path = folder / "gpu-tests.xml"
    if not path.exists():
        return [_row("GPU tests pass", "missing (no gpu-tests.xml)", None)]
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    total = sum(int(s.get("tests", 0)) for s in suites)
    bad = sum(int(s.get("failures", 0)) + int(s.get("errors", 0)) for s in suites)
    skipped = sum(int(s.get("skipped", 0)) for s in suites)
    figure = f"{total - bad - skipped} passed, {bad} failed, {skipped} skipped"
    return [
        _row(
            "GPU tests pass (compiled kernels, no host sync, attention, hand-over)",
            figure,
            bad == 0 and total > 0,
        )
    ]


def ipot_rows(results) -> list[dict]:
    rows = []
    for _, data in results:
        for case in data.get("cases", []):
            if case.get("name") != "target":
                continue
            prov = case.get("providers", {})
            fb = prov.get("triton", {}).get("forward_backward", {})
            if "median_ms" not in fb:
                rows.append(
                    _row("IPOT target case within 3x of its bandwidth floor", "missing", None)
                )
                continue
            frac = fb.get("fraction_of_floor")
            rows.append(
                _row(
                    "IPOT target case (256 x 40 x 60, H 1024) f+b within 3x of the floor",
                    f"{fb['median_ms'] * 1000:.0f} us, {frac:.2f} of the floor"
                    if frac
                    else f"{fb['median_ms'] * 1000:.0f} us",
                    bool(frac and frac >= 1 / 3),
                )
            )
            authors = prov.get("authors", {}).get("forward_backward", {}).get("median_ms")
            if authors:
                speedup = authors / fb["median_ms"]
                rows.append(
                    _row(
                        "IPOT target case >= 30x the authors' loop (f+b)",
                        f"{speedup:.1f}x",
                        speedup >= 30,
                    )
                )
    return rows or [_row("IPOT target case", "missing", None)]


def losses_rows(results) -> list[dict]:
    rows = []
    for _, data in results:
        for loss, entry in data.get("losses", {}).items():
            cases = entry.get("cases", [])
            if not cases:
                continue
            case = max(cases, key=lambda c: (c.get("rows", 0), c.get("hidden", 0)))
            prov = case.get("providers", {})
            ours = prov.get("triton", {}).get("forward_backward", {}).get("median_ms")
            eager = prov.get("reference", {}).get("forward_backward", {}).get("median_ms")
            size = f"{case.get('rows')} rows, H {case.get('hidden')}"
            name = f"{loss} fused f+b faster than eager ({size})"
            if ours and eager:
                rows.append(_row(name, f"{eager / ours:.2f}x ({ours:.3f} ms)", eager / ours > 1))
            else:
                rows.append(_row(name, "missing", None))
    return rows or [_row("masked losses", "missing", None)]


def e2e_rows(results, budget_results) -> list[dict]:
    rows = []
    for _, data in results:
        for model, entry in data.get("models", {}).items():
            prov = entry.get("providers", {})
            fast = prov.get("fast", {})
            if "tokens_per_s" in fast:
                mfu = fast.get("mfu")
                rows.append(
                    _row(
                        f"{model}: fast tokens/s and MFU (predicted 35-50% MFU)",
                        f"{fast['tokens_per_s']:,.0f} tok/s, MFU {mfu:.1%}"
                        if mfu is not None
                        else f"{fast['tokens_per_s']:,.0f} tok/s",
                        None,
                    )
                )
            vs = entry.get("speedup_tokens_per_s", {}).get("authors", {}).get("fast")
            if vs is not None:
                rows.append(
                    _row(f"{model}: fast >= 3x the authors' tokens/s", f"{vs:.2f}x", vs >= 3)
                )
            graphs = entry.get("speedup_tokens_per_s", {}).get("fast", {}).get("fast_graphs")
            if graphs is not None:
                rows.append(
                    _row(
                        f"{model}: fast_graphs >= fast (static shapes + CUDA graphs; predicted "
                        "faster where the step is host-bound)",
                        f"{graphs:.2f}x",
                        graphs >= 1,
                    )
                )
            for other in ("plain", "fast_deepspeed", "visualbert"):
                ratio = entry.get("speedup_tokens_per_s", {}).get(other, {}).get("fast")
                if ratio is not None:
                    rows.append(_row(f"{model}: fast / {other}", f"{ratio:.2f}x", None))
    for path, data in budget_results:
        for model, entry in data.get("models", {}).items():
            fast = entry.get("providers", {}).get("fast", {})
            if "tokens_per_s" in fast:
                rows.append(
                    _row(
                        f"{model} at {entry.get('tokens_per_batch')} tokens per batch",
                        f"{fast['tokens_per_s']:,.0f} tok/s",
                        None,
                        path.name,
                    )
                )
    return rows or [_row("end to end", "missing", None)]


def finetune_rows(results) -> list[dict]:
    rows = []
    for _, data in results:
        for name, entry in data.get("results", {}).items():
            up = entry.get("speedup_over_authors", {})
            train, ev = up.get("train_examples_per_s"), up.get("eval_examples_per_s")
            if train is not None:
                rows.append(
                    _row(
                        f"{name}: fine-tuning examples/s, fast over authors (predicted 2-3x)",
                        f"{train:.2f}x",
                        train >= 1,
                    )
                )
            if ev is not None:
                rows.append(
                    _row(
                        f"{name}: evaluation examples/s, fast over authors (predicted 1.8-2.5x)",
                        f"{ev:.2f}x",
                        ev >= 1,
                    )
                )
    return rows or [_row("fine-tuning", "missing", None)]


def retrieval_rows(results) -> list[dict]:
    rows = []
    for _, data in results:
        for name, entry in data.get("results", {}).items():
            ev, hard = entry.get("eval_speedup"), entry.get("hard_speedup")
            hours = entry.get("coco5k_hours_one_device", {}).get("fast")
            if ev is not None:
                rows.append(
                    _row(
                        f"retrieval {name}: full-evaluation pairs/s, fast over authors "
                        f"(predicted 2-3.5x; COCO 5k on one GPU {hours:.1f} h)",
                        f"{ev:.2f}x",
                        ev >= 1,
                    )
                )
            if hard is not None:
                rows.append(
                    _row(
                        f"retrieval {name}: hard-negative step, fast over authors "
                        "(predicted 1.5-3x)",
                        f"{hard:.2f}x",
                        hard >= 1,
                    )
                )
    return rows or [_row("retrieval", "missing", None)]


def convergence_rows(results) -> list[dict]:
    rows = []
    for _, data in results:
        worst = max(
            (c["relative_difference"] for c in data.get("losses", {}).values()), default=None
        )
        rows.append(
            _row(
                f"convergence: every task's loss within {data.get('tolerance', 0.01):.0%} "
                f"after {data.get('steps')} steps ({data.get('model')})",
                "missing" if worst is None else f"worst {worst:.2%}",
                data.get("ok"),
            )
        )
    return rows or [_row("convergence", "missing", None)]


def sweep_rows(results) -> list[dict]:
    rows = []
    for _, data in results:
        by_case: dict = {}
        for r in data.get("rows", []):
            if r.get("kernel") == "ipot" and "ms" in r:
                by_case.setdefault(r["case"], []).append(r)
        for case, variants in by_case.items():
            default = next((v for v in variants if v["default"]), None)
            best = min(variants, key=lambda v: v["ms"])
            if default:
                rows.append(
                    _row(
                        f"IPOT {case}: launcher's choice vs best variant",
                        f"{default['ms']:.3f} ms vs {best['ms']:.3f} ms "
                        f"(warps {best['config']['num_warps']}, "
                        f"BLOCK_H {best['config']['BLOCK_H']})",
                        None,
                    )
                )
        waves = [r for r in data.get("rows", []) if r.get("kernel") == "ipot_forward_waves"]
        if waves:
            rows.append(
                _row(
                    "IPOT forward per pair at "
                    + ", ".join(str(w["pairs"]) for w in waves)
                    + " pairs",
                    ", ".join(f"{w['us_per_pair']:.2f} us" for w in waves),
                    None,
                )
            )
        ce = [r for r in data.get("rows", []) if r.get("kernel") == "mlm_ce" and "ms" in r]
        if ce:
            best = min(ce, key=lambda r: r["ms"])
            default = next((r for r in ce if r["default"]), None)
            figure = (
                f"best BLOCK {best['BLOCK']} x {best['num_warps']} warps "
                f"{best['GB_per_s']:.0f} GB/s"
            )
            if default:
                figure += f"; launcher's {default['GB_per_s']:.0f} GB/s"
            rows.append(_row("MLM cross-entropy kernel bandwidth", figure, None))
    return rows or [_row("sweep", "missing", None)]


def draw_plots(folder: Path, found) -> list[str]:
    drawn = []
    for name, script in PLOTS.items():
        for path, _ in found.get(name, []):
            proc = subprocess.run(
                [sys.executable, str(HERE / script), str(path)], capture_output=True, text=True
            )
            if proc.returncode == 0 and path.with_suffix(".png").exists():
                drawn.append(path.with_suffix(".png").name)
    return drawn


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: gpu_summary.py OUT_DIR", file=sys.stderr)
        return 2
    folder = Path(args[0])
    found = _load(folder)
    e2e = [(p, d) for p, d in found.get("e2e", []) if not p.name.startswith("budget-")]
    budget = [(p, d) for p, d in found.get("e2e", []) if p.name.startswith("budget-")]
    rows = (
        phase_rows(folder)
        + test_rows(folder)
        + ipot_rows(found.get("ipot", []))
        + losses_rows(found.get("masked_losses", []))
        + sweep_rows(found.get("sweep_kernels", []))
        + e2e_rows(e2e, budget)
        + convergence_rows(found.get("convergence", []))
        + finetune_rows(found.get("finetune", []))
        + retrieval_rows(found.get("retrieval", []))
    )
    plots = draw_plots(folder, found)
    env = next((d["environment"] for ds in found.values() for _, d in ds if "environment" in d), {})
    lines = [
        "# GPU suite summary",
        "",
        f"Device: {env.get('device_name', '?')}; torch {env.get('torch', '?')}, triton "
        f"{env.get('triton', '?')}; commit {env.get('git_commit', '?')}"
        + (" (dirty)" if env.get("git_dirty") else "")
        + f"; {env.get('date_utc', '?')}.",
        "",
        "| target | figure | result |",
        "| --- | --- | --- |",
    ]
    for r in rows:
        result = {True: "pass", False: "FAIL", None: "-"}[r["passed"]]
        if r["figure"] == "missing" or str(r["figure"]).startswith("missing"):
            result = "missing"
        note = f" ({r['note']})" if r["note"] else ""
        lines.append(f"| {r['target']} | {r['figure']}{note} | {result} |")
    lines += ["", "Files: " + ", ".join(sorted(p.name for p in folder.iterdir() if p.is_file()))]
    if plots:
        lines += ["", "Plots: " + ", ".join(plots)]
    (folder / "SUMMARY.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
