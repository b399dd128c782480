"""Benchmark scripts still run and record what they claim (structure only: no timing asserts)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_packed_vs_padded_quick_run(tmp_path):
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [
            sys.executable,
            "benchmarks/bench_packed_vs_padded.py",
            *("--device", "cpu", "--quick", "--out", str(out)),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    env = result["environment"]
    assert env["device_class"] == "cpu" and env["torch"] and "git_commit" in env
    assert set(result["tasks"]) == {"mlm", "mrfr", "mrckl", "itm"}
    for task, entry in result["tasks"].items():
        # Both providers computed the same losses before anything was timed.
        assert all(
            part["ok"] for key, part in entry["agreement"].items() if isinstance(part, dict)
        ), task
        assert set(entry["providers"]) == {"packed", "authors"}
        speedups = entry["speedup_authors_time_over_packed"]
        assert set(speedups) == {"collate", "forward", "forward_backward"}
        assert all(v["median_of_call_ratios"] > 0 for v in speedups.values())
        for provider in entry["providers"].values():
            assert {"collate", "forward", "forward_backward", "saved_for_backward_bytes"} <= set(
                provider
            )
