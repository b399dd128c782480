"""The benchmarks' arithmetic: the FLOP count behind MFU (workload.py) and the regression gate's
comparisons (check_regression.py), on hand-made inputs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import check_regression as gate  # noqa: E402
from workload import BatchShape, encoder_matmul_params, train_flops  # noqa: E402

from uniter_fast.config import UniterConfig  # noqa: E402

CONFIG = UniterConfig(
    vocab_size=100, hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16
)


def test_flops_count_the_matmuls_of_real_positions_by_hand():
    shape = BatchShape(txt_len=(3, 5), img_len=(4, 2), masked_tokens=2)
    h, f, layers = 8, 16, 2
    weights = layers * (4 * h * h + 2 * h * f)
    assert encoder_matmul_params(CONFIG) == weights == 1024
    encoder = 2 * weights * (7 + 7) + 4 * layers * h * (7 * 7 + 7 * 7)
    regions = 2 * 2048 * h * 6
    assert shape.forward_flops(CONFIG, padded=False) == encoder + regions
    # The authors' padded step computes on B x max_len positions and B x max(img_len) regions.
    padded = 2 * weights * 2 * 7 + 4 * layers * h * 2 * 7 * 7 + 2 * 2048 * h * 2 * 4
    assert shape.forward_flops(CONFIG, padded=True) == padded
    mlm_head = 2 * (2 * h * h + 2 * h * 100)
    assert train_flops(CONFIG, shape, "mlm") == 3 * (encoder + regions + mlm_head)
    itm = BatchShape(txt_len=(3, 5), img_len=(4, 2))
    itm_head = 2 * (2 * h * h + 2 * h * 2) + 2 * h * (3 * 4 + 5 * 2)
    assert train_flops(CONFIG, itm, "itm") == 3 * (encoder + regions + itm_head)
    assert train_flops(CONFIG, itm, "itm", wra=False) == 3 * (
        encoder + regions + itm_head - 2 * h * 22
    )


def _result(device_class="cpu", fast=1.5, peak=100):
    return {
        "benchmark": "e2e",
        "environment": {"device_class": device_class},
        "models": {
            "base": {
                "speedup_tokens_per_s": {
                    "authors": {"fast": fast, "plain": 1.2},
                    "plain": {"fast": fast / 1.2, "authors": 1 / 1.2},
                },
                "providers": {
                    "fast": {
                        "tokens_per_s": 1000.0 * fast,
                        "mfu": 0.5,
                        "memory": {"peak_allocated_bytes": peak},
                    }
                },
            }
        },
    }


def test_a_baseline_is_the_median_and_gates_only_our_speedups(tmp_path):
    results = [_result(fast=v) for v in (1.4, 1.8, 1.5)]
    baseline = gate.write_baseline(
        results, [Path(f"r{i}.json") for i in range(3)], tmp_path / "b.json", None
    )
    assert baseline["mode"] == "ratios" and baseline["tolerance"] == 0.25
    # Ours over the authors' and the kernels over plain; never a ratio with ours below the line.
    assert set(baseline["figures"]) == {
        "models.base.speedup_tokens_per_s.authors.fast",
        "models.base.speedup_tokens_per_s.authors.plain",
        "models.base.speedup_tokens_per_s.plain.fast",
    }
    assert baseline["figures"]["models.base.speedup_tokens_per_s.authors.fast"]["value"] == 1.5
    rows = gate.compare(_result(fast=1.2), baseline)  # 1.2 >= 1.5 x 0.75
    assert all(r["ok"] for r in rows)
    rows = {r["figure"]: r for r in gate.compare(_result(fast=1.1), baseline)}
    assert not rows["models.base.speedup_tokens_per_s.authors.fast"]["ok"]
    assert rows["models.base.speedup_tokens_per_s.authors.plain"]["ok"]


def test_absolute_baselines_gate_memory_from_above_and_missing_figures():
    baseline = {
        "benchmark": "e2e",
        "device_class": "h100",
        "mode": "absolute",
        "tolerance": 0.05,
        "figures": gate.figures_of(_result("h100"), "absolute"),
    }
    memory = "models.base.providers.fast.memory.peak_allocated_bytes"
    assert baseline["figures"][memory] == {"value": 100, "better": "lower"}
    rows = {r["figure"]: r for r in gate.compare(_result("h100", peak=104), baseline)}
    assert rows[memory]["ok"]
    rows = {r["figure"]: r for r in gate.compare(_result("h100", peak=106), baseline)}
    assert not rows[memory]["ok"]
    gone = _result("h100")
    del gone["models"]["base"]["providers"]["fast"]["mfu"]
    rows = {r["figure"]: r for r in gate.compare(gone, baseline)}
    assert rows["models.base.providers.fast.mfu"]["current"] is None
    assert not rows["models.base.providers.fast.mfu"]["ok"]


def test_results_of_another_device_class_or_benchmark_are_refused():
    baseline = {"benchmark": "e2e", "device_class": "h100", "tolerance": 0.05, "figures": {}}
    with pytest.raises(gate.GateError, match="measured on 'cpu', the baseline on 'h100'"):
        gate.compare(_result("cpu"), baseline)
    with pytest.raises(gate.GateError, match="'ipot' benchmark"):
        gate.compare({**_result("h100"), "benchmark": "ipot"}, baseline)
    with pytest.raises(gate.GateError, match="several device classes"):
        gate.write_baseline(
            [_result("cpu"), _result("h100")], [Path("a"), Path("b")], Path("x"), None
        )


def test_results_of_another_kind_of_run_are_refused(tmp_path):
    """A --quick smoke result is not held to (or taken for) the --gate baseline."""
    gate_run, quick_run = _result(), _result()
    gate_run["settings"] = {"gate": True, "quick": False}
    quick_run["settings"] = {"gate": False, "quick": True}
    baseline = gate.write_baseline([gate_run], [Path("g.json")], tmp_path / "b.json", None)
    assert baseline["run"] == "gate"
    assert all(r["ok"] for r in gate.compare(gate_run, baseline))
    with pytest.raises(gate.GateError, match="'quick' run of bench_e2e.py.*made from 'gate' runs"):
        gate.compare(quick_run, baseline)
    with pytest.raises(gate.GateError, match="several kinds of run"):
        gate.write_baseline([gate_run, quick_run], [Path("a"), Path("b")], Path("x"), None)
    # The committed CPU baseline was made from --gate runs and says so.
    committed = gate._read(gate.BASELINES / "cpu.json", "baseline")
    assert committed["run"] == "gate"
