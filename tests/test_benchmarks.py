"""Benchmark scripts still run and record what they claim (structure only: no timing asserts)."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest

from uniter_fast.data.static import StaticShape

REPO = Path(__file__).resolve().parent.parent


def run_benchmark(script: str, *args: str, out: Path, timeout: int = 300) -> dict:
    """Run benchmarks/<script> with `--out out`; return its result JSON (CPU, stamped)."""
    proc = subprocess.run(
        [sys.executable, f"benchmarks/{script}", *args, "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    env = result["environment"]
    assert env["device_class"] == "cpu" and env["torch"] and "git_commit" in env
    return result


def check_plot(script: str, result: Path) -> None:
    """The plot script draws the result, or says plainly that matplotlib is missing."""
    proc = subprocess.run(
        [sys.executable, f"benchmarks/{script}", str(result)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert proc.returncode == 1 and "matplotlib is not installed" in proc.stderr
    else:
        assert proc.returncode == 0, proc.stderr
        assert result.with_suffix(".png").stat().st_size > 0


def test_packed_vs_padded_quick_run(tmp_path):
    result = run_benchmark(
        "bench_packed_vs_padded.py", "--device", "cpu", "--quick", out=tmp_path / "result.json"
    )
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


def test_collate_quick_run(tmp_path):
    from uniter_fast.data import extension_error, extension_loaded

    if not extension_loaded():
        pytest.skip(f"uniter_fast._C is not built ({extension_error()})")
    result = run_benchmark(
        "bench_collate.py",
        *("--quick", "--batch-sizes", "2", "--tasks", "mlm", "mrckl", "--bucket-lengths", "64"),
        out=tmp_path / "collate.json",
        timeout=120,
    )
    assert set(result["tasks"]) == {"mlm", "mrckl"}
    for task, sizes in result["tasks"].items():
        case = sizes["2"]
        assert case["pairs"] == 2 and case["output_bytes_mean"] > 0, task
        assert set(case["providers"]) == set("cpp cpp_into cpp_shared numpy authors floor".split())
        assert all(p["median_ms"] > 0 for p in case["providers"].values())
        assert all(v > 0 for v in case["speedup_authors_time_over"].values())
    assert set(result["bucketing"]["modes"]) == {"padded", "packed"}


def test_loader_quick_run(tmp_path):
    result = run_benchmark("bench_loader.py", "--quick", out=tmp_path / "loader.json")
    runs = {(r["workers"], r["handover"]): r for r in result["loader"]}
    assert set(runs) == {(0, "in process"), (1, "ring"), (1, "fresh")}
    assert all(r["pairs_per_s"] > 0 and r["mb_per_s"] > 0 for r in result["loader"])
    assert runs[(1, "ring")]["one_off_buffers"] == 0
    assert {"read_decode_validate", "pack_mlm", "build_itm"} <= set(result["stages"])


def test_masked_losses_quick_run(tmp_path):
    out = tmp_path / "masked_losses.json"
    # One timed call and no warm-up: the interpreted Triton provider dominates the run.
    result = run_benchmark(
        "bench_masked_losses.py",
        *("--device", "cpu", "--quick", "--rows", "32", "--iters", "1", "--warmup", "0"),
        out=out,
    )
    assert set(result["losses"]) == {"mlm", "mrfr", "mrc", "mrckl"}
    for loss, entry in result["losses"].items():
        (case,) = entry["cases"]
        assert case["rows"] == 32 and case["hidden"] == 768, loss
        assert case["floor"]["flops_forward_backward"] == 3 * case["floor"]["flops_forward"]
        assert all(v > 0 for v in case["gemm_ms"].values())
        for name in ("reference", "authors"):
            provider = case["providers"][name]
            for kind in ("forward", "forward_backward"):
                assert provider[kind]["median_ms"] > 0 and provider[kind]["fraction_of_gemm"] > 0
        # The test process sets TRITON_INTERPRET=1 (conftest) and the script inherits it: the
        # Triton provider runs interpreted, flagged as such; without it, it is recorded skipped.
        triton = case["providers"]["triton"]
        if "skipped" in triton:
            assert "TRITON_INTERPRET" in triton["skipped"]
        else:
            assert triton["interpreted"] and triton["forward_backward"]["median_ms"] > 0
    check_plot("plot_masked_losses.py", out)


def _gate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "benchmarks/check_regression.py", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_e2e_quick_run_records_every_provider(tmp_path):
    out = tmp_path / "e2e.json"
    providers = ["fast", "fast_deepspeed", "plain", "authors", "visualbert"]
    result = run_benchmark(
        "bench_e2e.py", "--device", "cpu", "--quick", "--providers", *providers, out=out
    )
    (model,) = result["models"].values()
    assert result["peak"]["tflops"] > 0
    # fast and plain computed the authors' losses, part by part, before anything was timed.
    checks = [v for k, v in model["agreement"].items() if k.startswith("fp32/")]
    assert len(checks) == 4 and all(
        part["ok"] for entry in checks for part in entry.values() if isinstance(part, dict)
    )
    try:
        import transformers  # noqa: F401
    except ImportError:
        assert "transformers does not import" in model["skipped"]["visualbert"]
        providers.remove("visualbert")
    assert list(model["providers"]) == providers
    for name, p in model["providers"].items():
        assert min(p["tokens_per_s"], p["pairs_per_s"], p["mfu"], p["mfu_6n"]) > 0, name
        assert set(p["split_ms_per_step"]) == {"data", "forward", "backward", "optimizer", "other"}
        assert p["split_ms_per_step"]["forward"] > 0 and p["memory"]["state_bytes"] > 0
    assert set(model["speedup_tokens_per_s"]["authors"]) == set(providers) - {"authors"}
    # Useful FLOPs per real token: at least the encoder's 6 x matmul weights.
    assert all(
        v >= 6 * model["encoder_matmul_params"]
        for v in model["useful_flops_per_real_token"].values()
    )
    check_plot("plot_e2e.py", out)


def test_e2e_gate_passes_the_cpu_baseline_and_fails_a_higher_one(tmp_path):
    """What CI gates on: the --gate run's speed-ups against benchmarks/baselines/cpu.json."""
    out = tmp_path / "gate.json"
    run_benchmark("bench_e2e.py", "--gate", out=out)
    passed = _gate(str(out))
    assert passed.returncode == 0, passed.stdout + passed.stderr
    assert "within tolerance" in passed.stdout

    baseline = json.loads((REPO / "benchmarks/baselines/cpu.json").read_text())
    assert baseline["mode"] == "ratios" and baseline["figures"]
    missed = copy.deepcopy(baseline)
    for figure in missed["figures"].values():
        figure["value"] *= 2  # figures the current code cannot reach
    (tmp_path / "missed.json").write_text(json.dumps(missed))
    failed = _gate(str(out), "--baseline", str(tmp_path / "missed.json"))
    assert failed.returncode == 1 and "REGRESSION" in failed.stdout, failed.stdout

    other = {**baseline, "device_class": "h100"}
    (tmp_path / "h100.json").write_text(json.dumps(other))
    refused = _gate(str(out), "--baseline", str(tmp_path / "h100.json"))
    assert refused.returncode == 2 and "measured on 'cpu', the baseline on 'h100'" in refused.stderr


def test_allreduce_and_scaling_on_paper(tmp_path):
    """bench_allreduce under the deepspeed launcher (two ranks, gloo), then scaling.py from it
    and a measured step; the ZeRO stages order as the model says they must."""
    ar = tmp_path / "ar.json"
    launcher = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2"]
    proc = subprocess.run(
        [
            *launcher,
            "benchmarks/bench_allreduce.py",
            "--device",
            "cpu",
            "--quick",
            "--out",
            str(ar),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    measured = json.loads(ar.read_text())
    assert measured["environment"]["world_size"] == 2
    for sizes in measured["sizes"].values():
        assert sizes["all_reduce"]["busbw_gbps"] > 0
    step = {
        "environment": {"device_name": "test"},
        "settings": {"steps": 2, "rounds": 1},
        "models": {
            "large": {
                "grad_accum": 4,
                "parameters": 340_524_935,
                "providers": {"fast": {"step_ms": 100.0, "rounds": [{"tokens": 49152}]}},
            }
        },
    }
    (tmp_path / "e2e.json").write_text(json.dumps(step))
    out = tmp_path / "scaling.json"
    proc = subprocess.run(
        [
            sys.executable,
            "benchmarks/scaling.py",
            "--e2e",
            str(tmp_path / "e2e.json"),
            "--allreduce",
            str(ar),
            "--allreduce-inter",
            str(ar),
            "--out",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())["models"]["large"]["rows"]
    assert [(r["gpus"], r["zero"]) for r in rows] == [
        (n, z) for n in (8, 64, 512) for z in (1, 2, 3)
    ]
    for n in (8, 64, 512):
        comm = [r["comm_ms"] for r in rows if r["gpus"] == n]
        assert comm[0] < comm[1] < comm[2]  # accumulation 4: ZeRO-2 and -3 move more per step
    for r in rows:
        assert r["network"].startswith("measured") and r["overlapped_ms"] <= r["serial_ms"]
        assert r["tokens_per_s_overlapped"] <= r["gpus"] * 49152 / 2 / 0.1 + 1e-6


def test_results_go_outside_the_repository_by_default(tmp_path, monkeypatch):
    """Trying a benchmark leaves no untracked files: results go to runs/bench/ under the working
    directory (ignored by git) unless --out names a file or a folder."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from common import save_result

    payload = {"environment": {"device_class": "cpu"}, "x": 1}
    monkeypatch.chdir(tmp_path)
    default = save_result("probe", payload)
    assert default.parent == Path("runs/bench") and default.name.startswith("probe-cpu-")
    assert json.loads((tmp_path / default).read_text()) == payload
    named = save_result("probe", payload, tmp_path / "kept.json")
    assert named == tmp_path / "kept.json"
    (tmp_path / "dir.d").mkdir()
    inside = save_result("probe", payload, tmp_path / "dir.d")  # a folder that exists
    assert inside.parent == tmp_path / "dir.d" and inside.name.startswith("probe-cpu-")
    new = save_result("probe", payload, Path(f"{tmp_path}/new/"))  # no suffix: a new folder
    assert new.parent == tmp_path / "new" and new.name.startswith("probe-cpu-")
    assert "runs/" in (REPO / ".gitignore").read_text().split()


def test_host_overhead_counts_kernels_and_times_the_host(tmp_path):
    """The host-bound measurement: kernels per step from a dispatch counter over the real fast
    step (Triton launches included), the host's time per step, the predicted GPU time."""
    result = run_benchmark(
        "host_overhead.py", "--quick", "--models", "base", "--steps", "1", out=tmp_path / "h.json"
    )
    (row,) = result["models"]
    assert row["layers"] == 2 and row["tiny_hidden"] == 4 * 12
    assert row["kernels_per_step"] == row["aten_kernels_per_step"] + row["triton_launches_per_step"]
    # Each ITM micro-batch launches the IPOT forward and backward, each MLM one the
    # cross-entropy per chunk: the counter sees the kernels, not only ATen.
    assert row["triton_launches_per_step"] >= 1
    assert row["aten_kernels_per_step"] > 100
    assert row["host_ms_per_step"] > 0 and row["predicted_gpu_ms_per_step"] > 0
    assert row["host_bound"] == (row["host_ms_per_step"] > row["predicted_gpu_ms_per_step"] / 2)
    # With CUDA graphs the host issues the copies in and out and the optimizer, a small fraction
    # of the eager step's kernels.
    graphed = row["graphed"]
    assert graphed["replays_per_step"] == row["grad_accum"]
    assert graphed["kernels_per_step"] == (
        graphed["copies_per_step"] + graphed["optimizer_ops_per_step"]
    )
    assert 0 < graphed["kernels_per_step"] < row["kernels_per_step"] / 4
    assert 0 < graphed["host_ms_per_step"]


def test_bench_static_measures_the_padding(tmp_path):
    """Padded rows per real token and the host's time to pad, on bench_e2e's batches."""
    result = run_benchmark(
        "bench_static.py", "--quick", "--models", "base", out=tmp_path / "s.json"
    )
    (row,) = result["models"]
    assert row["batches"] == 2 * 4  # two per task of the mix
    assert 1 < row["covering_rows_per_real_token"] < 1.5
    assert row["budget_fits"] == row["batches"]
    shape = StaticShape(**row["covering_shape"])
    assert row["covering_rows"] == shape.rows > shape.tokens
    assert row["pad_ms_median"] > 0


def test_bench_finetune_times_ours_and_the_authors(tmp_path):
    """Fine-tuning and evaluation throughput of VQA and NLVR2, through bench_e2e's --task; the
    two providers' losses are checked equal before anything is timed."""
    result = run_benchmark(
        "bench_e2e.py", "--task", "nlvr2", "--device", "cpu", "--quick", out=tmp_path / "f.json"
    )
    (entry,) = result["results"].values()
    assert set(entry["providers"]) == {"fast", "authors"}
    for p in entry["providers"].values():
        assert p["train_examples_per_s"] > 0 and p["eval_examples_per_s"] > 0
    losses = entry["loss_check"]
    assert abs(losses["fast"] - losses["authors"]) <= 1e-4 * abs(losses["authors"]) + 1e-6
