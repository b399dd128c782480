"""bench_ipot.py still runs and records what it claims (structure only: no timing asserts)."""

from __future__ import annotations

import os

from test_benchmarks import run_benchmark


def test_ipot_quick_run(tmp_path):
    # conftest sets TRITON_INTERPRET=1 on machines without CUDA, and the script inherits it, so
    # the kernel runs in the interpreter here: two pairs, hidden 16, one timed call.
    result = run_benchmark(
        "bench_ipot.py",
        *("--device", "cpu", "--quick", "--batch-sizes", "2", "--hidden-sizes", "16"),
        *("--iters", "1", "--warmup", "0"),
        out=tmp_path / "ipot.json",
        timeout=120,
    )
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    expected = {"triton", "reference", "authors"} if interpreted else {"reference", "authors"}
    assert set(result["providers"]) == expected
    assert ("triton" in result["providers_skipped"]) != interpreted
    assert result["settings"]["triton_interpret"] == interpreted
    (case,) = result["cases"]
    assert case["batch"] == 2 and case["hidden"] == 16
    floor = case["floor"]
    assert floor["bytes_forward_backward"] == 2 * floor["bytes_forward"] > 0
    assert floor["flops_forward_backward"] > floor["flops_forward"] > floor["flops_ipot"] > 0
    for name in expected - {"reference"}:
        assert all(part["ok"] for part in case["agreement"][name].values()), name
    for name, provider in case["providers"].items():
        for kind in ("forward", "forward_backward"):
            entry = provider[kind]
            assert entry["median_ms"] > 0 and 0 < entry["fraction_of_floor"], (name, kind)
        assert provider["saved_for_backward_bytes"] > 0
    if interpreted:
        assert set(case["speedup"]) == {"reference_over_triton", "authors_over_triton"}
