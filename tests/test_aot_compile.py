"""Every Triton kernel compiles for Hopper ahead of time, without spills (aot_compile.py).

The script runs the real launchers on `meta` tensors under a stand-in driver, so what compiles is
what a GPU would launch; it needs triton's bundled ptxas, not a GPU. It runs in a subprocess
without TRITON_INTERPRET (which conftest sets for the CPU tests, and which replaces every kernel
by Python at import).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

pytest.importorskip("triton")

VOCAB = 28996


def test_ptx_access_widths_are_read_off_the_instruction():
    from aot_compile import widest_accesses

    ptx = """
    @%p1 ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];
    ld.global.L1::evict_last.b16 { %rs1 }, [ %rd2 + 0 ];
    @%p2 st.global.v2.b32 [ %rd3 + 0 ], { %r5, %r6 };
    st.global.b16 [ %rd4 + 0 ], { %rs2 };
    ld.shared.v4.b32 { %r7, %r8, %r9, %r10 }, [ %r11 + 0 ];
    """
    assert widest_accesses(ptx) == {"load_bytes": 16, "store_bytes": 8}
    assert widest_accesses("st.global.b16 [ %rd4 + 0 ], { %rs2 };") == {
        "load_bytes": 0,
        "store_bytes": 2,
    }


def test_ptxas_report_and_the_checks():
    from aot_compile import approximate_ops, check_variant, ptxas_report

    log = (
        "ptxas info    : Function properties for _k\n"
        "    232 bytes stack frame, 224 bytes spill stores, 228 bytes spill loads\n"
        "ptxas info    : Used 255 registers, used 1 barriers\n"
    )
    report = ptxas_report(log)
    assert report == {"registers": 255, "stack": 232, "spill_stores": 224, "spill_loads": 228}
    report.update(num_warps=8, shared=1024)
    assert check_variant(report, 90) == ["spills (224 B stored, 228 B loaded, 232 B stack)"]
    clean = {
        "registers": 200,
        "stack": 0,
        "spill_stores": 0,
        "spill_loads": 0,
        "num_warps": 16,
        "shared": 240_000,
    }
    assert check_variant(clean, 90) == [
        "200 registers x 512 threads > 64K",
        "shared memory 240000 B > 232448 B",
    ]
    with pytest.raises(ValueError, match="no ptxas"):
        ptxas_report("")
    ops = approximate_ops("div.full.f32 %f1, %f2, %f3;\nex2.approx.ftz.f32 %f4, %f5;\ndiv.rn.f32")
    assert ops == {"div.full": 1, "ex2.approx": 1}


def test_variants_come_from_the_launchers_selection(monkeypatch):
    """A block configuration the launcher starts choosing is compiled without editing the
    script: the cases are derived from `_launch_config` / `_row_config`."""
    import aot_compile

    from uniter_fast.kernels import ipot

    def configs(cases):
        return {ipot._launch_config(m, n, h)["BLOCK_M"] for m, n, h in (c.shape for c in cases)}

    before = list(aot_compile.ipot_cases())
    assert configs(before) == {16, 32, 64, 128}
    original = ipot._launch_config

    def with_extra_warps(m, n, h, *args, **kw):
        config = original(m, n, h, *args, **kw)
        if config["BLOCK_M"] == 16 and config["BLOCK_N"] == 16:
            config["num_warps"] = 1 if m <= 8 else config["num_warps"]
        return config

    monkeypatch.setattr(ipot, "_launch_config", with_extra_warps)
    after = list(aot_compile.ipot_cases())
    assert len(after) > len(before)


@pytest.mark.slow
def test_every_kernel_compiles_for_sm90_without_spills(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "benchmarks/aot_compile.py", "--arch", "90", "--out", str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.returncode == 0, (proc.stdout[-4000:], proc.stderr[-4000:])
    (path,) = tmp_path.glob("aot-sm90-triton*.json")
    result = json.loads(path.read_text())
    records = result["records"]
    assert result["failed"] == 0 and records
    assert {r["family"] for r in records} == {"ipot", "mlm", "mrfr", "mrc", "mrckl"}
    kernels = {r["kernel"] for r in records}
    assert {
        "_ipot_fwd_kernel",
        "_ipot_bwd_kernel",
        "_ce_fwd_kernel",
        "_ce_bwd_kernel",
        "_kl_fwd_kernel",
        "_kl_bwd_kernel",
        "_sq_err_fwd_kernel",
        "_sq_err_bwd_kernel",
    } <= kernels
    for r in records:
        assert r["spill_stores"] == r["spill_loads"] == r["stack"] == 0, r
    # Every dtype, layout and forward mode of IPOT, and the backward.
    ipot = [r for r in records if r["family"] == "ipot"]
    assert {(r["dtype"], r["layout"], r["mode"]) for r in ipot} == {
        (d, layout, m)
        for d in ("fp32", "bf16", "fp16")
        for layout in ("padded", "packed")
        for m in ("distance", "plan", "train")
    }
    # Item 1: the fp32 IPOT forward divides and takes roots exactly (no div.full, sqrt.approx,
    # rcp.approx); its exp is libdevice's (range-reduced) form.
    for r in ipot:
        assert not {"div.full", "sqrt.approx", "rcp.approx", "div.approx"} & set(r["approx_ops"])
    # Item 4: the vocabulary-row cross-entropy reads and writes 16 bytes at a time.
    mlm = [r for r in records if r["family"] == "mlm" and r["shape"][1] == VOCAB]
    assert mlm and all(r["load_bytes"] == 16 for r in mlm)
    assert all(r["store_bytes"] == 16 for r in mlm if r["mode"] == "train")
