"""The prepared GPU run (benchmarks/gpu_suite.sh) in its CPU dry run: same phases, tiny sizes.

GPUs are lent rarely and briefly; the script must work the first time one comes. The dry run
goes through every phase (setup check, tests, kernel benchmarks, sweep, end to end, token
budget, convergence) and the summary, so that a renamed flag or a broken script shows here.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_dry_run_goes_through_every_phase(tmp_path):
    out = tmp_path / "suite"
    env = {**os.environ, "PYTHON": sys.executable, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        ["bash", "benchmarks/gpu_suite.sh", str(out), "--dry-run"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with (out / "phases.tsv").open() as f:
        phases = {row["phase"]: row for row in csv.DictReader(f, delimiter="\t")}
    assert list(phases) == [
        "setup",
        "tests",
        "kernels",
        "sweep",
        "e2e-base",
        "e2e-large",
        "budget",
        "convergence",
        "finetune",
        "retrieval",
    ]
    failed = {
        name: (out / f"{name}.log").read_text()[-2000:]
        for name, row in phases.items()
        if row["exit"] != "0"
    }
    assert not failed, failed
    names = {p.name for p in out.iterdir()}
    for prefix in (
        "ipot-",
        "masked_losses-",
        "sweep-",
        "e2e-",
        "budget-512",
        "convergence-",
        "finetune-",
        "retrieval-",
    ):
        assert any(n.startswith(prefix) and n.endswith(".json") for n in names), prefix
    summary = (out / "SUMMARY.md").read_text()
    assert "| phase convergence within 240 s | ok" in summary
    assert "convergence: every task's loss within 1%" in summary
    assert "IPOT tiny: launcher's choice vs best variant" in summary
    assert "vqa/tiny: fine-tuning examples/s, fast over authors" in summary
    assert "retrieval tiny: full-evaluation pairs/s, fast over authors" in summary
