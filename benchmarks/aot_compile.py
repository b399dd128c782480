"""Compile every Triton kernel for a GPU that is not here, and check what ptxas made of it.

    python benchmarks/aot_compile.py --arch 90            # H100/H200; exits 1 on any failure
    python benchmarks/aot_compile.py --arch 90 --arch 80  # and A100
    python benchmarks/aot_compile.py --list               # the variants, compiled nothing

No GPU is needed: Triton's wheel carries `ptxas`. The real host launchers (`ipot_forward_*`,
`ipot_backward_*`, `mlm_forward`, `mrfr_*`, `mrc_*`, `mrckl_*`) are called on `meta` tensors under
a stand-in driver that reports the chosen GPU target, and every launch becomes a compile
(`warmup=True`): what is compiled is exactly what the launchers would launch, arguments,
specialisation (alignment, ints equal to 1) and launch configuration included. Nothing here
lists block sizes: the variants come from the launchers' own selection code (`kernel_fits` and
`_launch_config` over every pair of lengths for IPOT, `_row_config` over every row width for the
losses), so a configuration a launcher can choose is compiled without editing this file.

Each compiled variant is checked for:
- a compile error (Triton or ptxas);
- a register spill (ptxas's `spill stores`/`spill loads`, or a stack frame), or more registers
  than the block's threads can hold;
- more shared memory than one block may use on the target (227 KiB on sm_90, 163 KiB on sm_80).

The result JSON (`benchmarks/results/aot-sm<arch>-triton<version>-<time>.json` by default)
holds, per variant: the kernel, the case (dtype, layout, mode, lengths), the constexprs and
warps, registers, spills, stack, shared memory, and the widest global load and store in bytes
(read off the PTX: 16 bytes means `ld.global.v4.b32`). One line per kernel family gives the
worst registers and spills. `benchmarks/NOTES.md` ("Compiled ahead of time") has the figures and
how to repeat the run under another triton (the GPU machine's 3.6.0).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as _dt
import io
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

# The interpreter replaces every kernel by a Python function when triton is imported: this
# script needs the compiler, so run as a script it restarts without the variable. (Imported, by
# the tests, it only lends its parsers and case lists, which need no compiler.)
if __name__ == "__main__" and os.environ.pop("TRITON_INTERPRET", None) is not None:
    os.execv(sys.executable, [sys.executable, *sys.argv])

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import triton  # noqa: E402
from common import REPO_ROOT, command_line, environment, save_result  # noqa: E402

# Most dynamic shared memory one block may opt into (CUDA's sharedMemPerBlockOptin).
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
REGISTERS_PER_SM = 65536
# Per SM: shared memory (bytes, 1 KiB of it reserved per resident block), warps, blocks; SMs.
SM_SHARED = {80: 167936, 86: 102400, 89: 102400, 90: 233472}
SM_WARPS = {80: 64, 86: 48, 89: 48, 90: 64}
SM_BLOCKS = {80: 32, 86: 16, 89: 24, 90: 32}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# UNITER's sizes: hidden (base, large), vocabulary, detector classes, feature width.
HIDDEN_SIZES = (768, 1024)
VOCAB, LABEL_DIM, IMG_DIM = 28996, 1601, 2048


# --- what to compile ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    """One call of a launcher: `family` names the launcher group, the rest its arguments."""

    family: str
    dtype: str
    mode: str
    shape: tuple = ()
    layout: str = ""

    def label(self) -> str:
        parts = [self.family, self.dtype, self.mode]
        if self.layout:
            parts.append(self.layout)
        return " ".join(parts) + " " + "x".join(str(s) for s in self.shape)


def _representatives(values, config_of: Callable, *, aligned: bool = False) -> dict:
    """Group `values` by the configuration the launcher chooses for them; keep one per group:
    the largest whose every part is (`aligned`) or is not a multiple of 16, else the largest.

    Lengths take the unaligned one: real batches have arbitrary max lengths, and Triton's
    16-byte specialisation only widens a few accesses. Hidden sizes take the aligned one: every
    real model's is a multiple of 16 (768, 1024; the quick start's 128), and an unaligned hidden
    (toy sizes in the unit tests) masks each element of every state tile, which at 128-long
    blocks in the fp32 backward costs all 255 registers and a few bytes of spill (benchmarks/
    NOTES.md, "Compiled ahead of time")."""
    groups: dict = {}
    for v in values:
        groups.setdefault(config_of(v), []).append(v)
    chosen = {}
    for config, members in groups.items():
        wanted = [v for v in members if all((x % 16 == 0) == aligned for x in _as_tuple(v))]
        chosen[config] = max(wanted or members)
    return chosen


def _as_tuple(v) -> tuple:
    return v if isinstance(v, tuple) else (v,)


def ipot_cases() -> Iterator[Case]:
    """Every launch configuration `_launch_config` gives (forward and backward) for lengths
    that `kernel_fits`, for every dtype, both layouts, the three forwards (distance only, plan,
    training) and the backward."""
    from uniter_fast.kernels import ipot

    def configs(m, n, hidden, dtype):
        return tuple(
            tuple(sorted(ipot._launch_config(m, n, hidden, dtype, backward=bwd).items()))
            for bwd in (False, True)
        )

    lengths = [
        (m, n)
        for m in range(1, ipot.MAX_BLOCK + 1)
        for n in range(1, ipot.MAX_BLOCK + 1)
        if ipot.kernel_fits(m, n)
    ]
    for dtype_name, dtype in DTYPES.items():
        # One hidden size per distinct choice of hidden chunk: UNITER's where it is one. Sizes
        # are multiples of 16 from 32 (see `_representatives`; below 32, toy sizes of the unit
        # tests, ptxas spills a few bytes at some small blocks whatever the warps).
        by_hidden = _representatives(
            range(32, 1025, 16), lambda h, dtype=dtype: configs(16, 16, h, dtype), aligned=True
        )
        key_768 = configs(16, 16, HIDDEN_SIZES[0], dtype)
        hiddens = [HIDDEN_SIZES[0] if key == key_768 else h for key, h in by_hidden.items()]
        for hidden in hiddens:
            picks = _representatives(
                lengths, lambda mn, h=hidden, dtype=dtype: configs(*mn, h, dtype)
            )
            for m, n in picks.values():
                for layout in ("padded", "packed"):
                    for mode in ("distance", "plan", "train"):
                        yield Case("ipot", dtype_name, mode, (m, n, hidden), layout)


def loss_cases() -> Iterator[Case]:
    """Every (BLOCK, num_warps) `_row_config` gives for a row width, for each loss launcher and
    dtype, at the width UNITER uses for that loss and at the smallest width of each config."""
    from uniter_fast.kernels import masked_losses as ml

    widths = sorted({2**k for k in range(0, 18)} | {VOCAB, LABEL_DIM, IMG_DIM})
    configs = _representatives(widths, lambda w: ml._row_config(w, None))
    real = {"mlm": VOCAB, "mrc": LABEL_DIM, "mrckl": LABEL_DIM, "mrfr": IMG_DIM}
    for family, width in real.items():
        picks = {width, *configs.values()}
        for dtype in DTYPES:
            for w in sorted(picks):
                modes = ("eval", "train") if family == "mlm" else ("train",)
                for mode in modes:
                    yield Case(family, dtype, mode, (64, w))


def all_cases() -> list[Case]:
    return [*ipot_cases(), *loss_cases()]


# --- running the launchers on meta tensors ------------------------------------------------------


def _meta(*shape, dtype) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device="meta")


def run_case(case: Case) -> None:
    """Call the case's launchers on meta tensors; each launch compiles (see `compile_mode`)."""
    dtype = DTYPES[case.dtype]
    if case.family == "ipot":
        from uniter_fast.kernels import ipot

        m, n, hidden = case.shape
        batch = 3
        lengths = _meta(batch, dtype=torch.int32)
        kwargs = {
            "return_plan": case.mode == "plan",
            "save_for_backward": case.mode == "train",
        }
        if case.layout == "padded":
            txt, img = _meta(batch, m, hidden, dtype=dtype), _meta(batch, n, hidden, dtype=dtype)
            out = ipot.ipot_forward_padded(txt, img, lengths, lengths, **kwargs)
            if case.mode == "train":
                ipot.ipot_backward_padded(out.distance, txt, img, lengths, lengths, out)
        else:
            hidden_rows = _meta(batch * (m + n) + 5, hidden, dtype=dtype)
            cu = _meta(batch + 1, dtype=torch.int32)
            out = ipot.ipot_forward_packed(hidden_rows, cu, lengths, lengths, m, n, **kwargs)
            if case.mode == "train":
                ipot.ipot_backward_packed(out.distance, hidden_rows, cu, lengths, lengths, out)
        return
    from uniter_fast.kernels import masked_losses as ml

    rows, width = case.shape
    labels = _meta(rows, dtype=torch.int64)
    if case.family == "mlm":
        hidden = HIDDEN_SIZES[0]
        grads = (True, True, True) if case.mode == "train" else (False, False, False)
        ml.mlm_forward(
            _meta(rows, hidden, dtype=dtype),
            _meta(width, hidden, dtype=dtype),
            _meta(width, dtype=dtype),
            labels,
            compute_dtype=dtype,
            need_grads=grads,
        )
    elif case.family == "mrfr":
        hidden = HIDDEN_SIZES[0]
        x, w = _meta(rows, hidden, dtype=dtype), _meta(hidden, width, dtype=dtype)
        bias, target = _meta(width, dtype=dtype), _meta(rows, width, dtype=torch.float16)
        loss, pred = ml.mrfr_forward(x, w, bias, target, compute_dtype=dtype)
        ml.mrfr_backward(
            _meta((), dtype=torch.float32),
            x,
            w,
            bias,
            target,
            pred,
            compute_dtype=dtype,
            need_grads=(True, True, True),
        )
    elif case.family == "mrc":
        logits = _meta(rows, width, dtype=dtype)
        loss, lse = ml.mrc_forward(logits, labels)
        ml.mrc_backward(_meta((), dtype=torch.float32), logits, labels, lse)
    elif case.family == "mrckl":
        logits, target = _meta(rows, width, dtype=dtype), _meta(rows, width, dtype=torch.float16)
        loss, lse, total = ml.mrckl_forward(logits, target)
        ml.mrckl_backward(_meta((), dtype=torch.float32), logits, target, lse, total)
    else:
        raise ValueError(f"unknown kernel family {case.family!r}")


class _StandInDriver:
    """What Triton's JIT asks of a driver to compile (not to launch): the device, a stream and the
    target. Launches never happen: `compile_mode` turns each into a warm-up."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        return torch.device("meta")


@contextlib.contextmanager
def compile_mode(arch: int, compiled: list):
    """Within: a kernel launch compiles for sm_<arch> and appends (name, kernel, launch kwargs,
    ptxas log) to `compiled`; nothing runs."""
    from triton import knobs
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    original_run = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        log = io.StringIO()
        with contextlib.redirect_stdout(log):  # ptxas's -v report, printed by Triton
            kernel = original_run(self, *args, grid=grid, warmup=True, **kwargs)
        compiled.append((self.fn.__name__, kernel, kwargs, log.getvalue()))
        return kernel

    previous = driver._active  # not `driver.active`: with no GPU, asking for the default raises
    driver.set_active(_StandInDriver(arch))
    JITFunction.run = run
    old_log = knobs.nvidia.dump_ptxas_log
    knobs.nvidia.dump_ptxas_log = True
    try:
        yield
    finally:
        JITFunction.run = original_run
        knobs.nvidia.dump_ptxas_log = old_log
        driver._active = previous


# --- reading a compiled kernel ------------------------------------------------------------------

_PTX_ACCESS = re.compile(r"\b(ld|st)\.global((?:\.[\w:]+)*)")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_FRAME = re.compile(
    r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads"
)


def widest_accesses(ptx: str) -> dict:
    """Widest global load and store in bytes, from PTX (`ld.global.v4.b32` -> 16)."""
    widest = {"ld": 0, "st": 0}
    for op, suffix in _PTX_ACCESS.findall(ptx):
        lanes, bits = 1, 0
        for part in suffix.split(".")[1:]:
            if re.fullmatch(r"v\d+", part):
                lanes = int(part[1:])
            elif m := re.fullmatch(r"[bufs](\d+)", part):
                bits = int(m.group(1))
        widest[op] = max(widest[op], lanes * bits // 8)
    return {"load_bytes": widest["ld"], "store_bytes": widest["st"]}


_PTX_APPROX = re.compile(r"\b((?:ex2|lg2|sqrt|rcp|div|sin|cos)\.(?:approx|full))\b")


def approximate_ops(ptx: str) -> dict:
    """How many approximate maths instructions the PTX holds, by kind (`div.full`, `ex2.approx`,
    ...): where the exact forms were asked for (`div_rn`, `sqrt_rn`), none of those kinds."""
    counts: dict = {}
    for op in _PTX_APPROX.findall(ptx):
        counts[op] = counts.get(op, 0) + 1
    return counts


def ptxas_report(log: str) -> dict:
    """Registers, stack frame and spill bytes from ptxas's -v report."""
    regs = _PTXAS_REGS.search(log)
    frame = _PTXAS_FRAME.search(log)
    if not regs or not frame:
        raise ValueError(f"no ptxas -v report in the compile's output: {log[-300:]!r}")
    stack, stores, loads = (int(x) for x in frame.groups())
    return {
        "registers": int(regs.group(1)),
        "stack": stack,
        "spill_stores": stores,
        "spill_loads": loads,
    }


def resident_per_sm(report: dict, arch: int) -> int:
    """Programs (thread blocks) of this variant one SM holds at once: the least of what its
    registers (allocated per warp in steps of 256), warps, shared memory and the block limit
    allow. With one program per pair, pairs beyond SMs x this start a second wave."""
    warps = report["num_warps"]
    per_warp = -(-report["registers"] * 32 // 256) * 256
    by_regs = REGISTERS_PER_SM // max(1, per_warp * warps)
    by_warps = SM_WARPS.get(arch, 64) // warps
    shared = report["shared"]
    by_shared = SM_SHARED.get(arch, SM_SHARED[80]) // (shared + 1024) if shared else 10**6
    return max(0, min(by_regs, by_warps, by_shared, SM_BLOCKS.get(arch, 32)))


def check_variant(report: dict, arch: int) -> list[str]:
    """The reasons a compiled variant fails, empty when it passes."""
    problems = []
    if report["spill_stores"] or report["spill_loads"] or report["stack"]:
        problems.append(
            f"spills ({report['spill_stores']} B stored, {report['spill_loads']} B loaded, "
            f"{report['stack']} B stack)"
        )
    threads = 32 * report["num_warps"]
    if report["registers"] * threads > REGISTERS_PER_SM:
        problems.append(f"{report['registers']} registers x {threads} threads > 64K")
    limit = SHARED_LIMIT.get(arch, SHARED_LIMIT[80])
    if report["shared"] > limit:
        problems.append(f"shared memory {report['shared']} B > {limit} B")
    return problems


_LAUNCH_KEYS = ("debug", "instrumentation_mode", "fpsan_homomorphic_casts")


def compile_case(case: Case, arch: int) -> list[dict]:
    """Compile everything `case` launches for sm_<arch>; one record per kernel launched."""
    compiled: list = []
    error = None
    with compile_mode(arch, compiled):
        try:
            run_case(case)
        except Exception as exc:  # a compile error fails the variant, not the whole run
            error = f"{type(exc).__name__}: {str(exc).strip()[-2000:]}"
    records = []
    for name, kernel, kwargs, log in compiled:
        record = {
            "case": case.label(),
            "family": case.family,
            "kernel": name,
            "dtype": case.dtype,
            "mode": case.mode,
            "layout": case.layout or None,
            "shape": list(case.shape),
            "constexprs": {
                k: v
                for k, v in kwargs.items()
                if k not in _LAUNCH_KEYS and k != "num_warps" and not isinstance(v, torch.Tensor)
            },
            "num_warps": kernel.metadata.num_warps,
            "shared": kernel.metadata.shared,
        }
        record.update(ptxas_report(log) if log else _cached_report(kernel))
        record.update(widest_accesses(kernel.asm["ptx"]))
        record["approx_ops"] = approximate_ops(kernel.asm["ptx"])
        record["resident_per_sm"] = resident_per_sm(record, arch)
        record["problems"] = check_variant(record, arch)
        records.append(record)
    if error is not None:
        records.append(
            {"case": case.label(), "family": case.family, "kernel": None, "problems": [error]}
        )
    return records


def _cached_report(kernel) -> dict:
    """The report of a kernel whose cubin came from Triton's cache (no ptxas log): read the
    cubin's resource usage with cuobjdump (spill bytes are not in it; the stack frame is)."""
    from triton import knobs

    cuobjdump = knobs.nvidia.cuobjdump.path
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        out = subprocess.run(
            [cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True
        ).stdout
    regs = re.search(r"REG:(\d+)", out)
    stack = re.search(r"STACK:(\d+)", out)
    local = re.search(r"LOCAL:(\d+)", out)
    if not regs or not stack:
        raise ValueError(f"cuobjdump gave no resource usage: {out[-300:]!r}")
    spill = int(stack.group(1)) + (int(local.group(1)) if local else 0)
    return {
        "registers": int(regs.group(1)),
        "stack": int(stack.group(1)),
        "spill_stores": spill,
        "spill_loads": spill,
    }


def _ptxas_version() -> str | None:
    from triton import knobs

    try:
        out = subprocess.run([knobs.nvidia.ptxas.path, "--version"], capture_output=True, text=True)
    except (OSError, AttributeError):
        return None
    found = re.search(r"release ([\d.]+)", out.stdout)
    return found.group(1) if found else None


# --- the run ------------------------------------------------------------------------------------


def _init_worker(cache_dir: str) -> None:
    # Every process compiles from scratch into a private cache, so that ptxas runs (and prints
    # its report) for every variant, and no earlier run's cubin is taken for this one's.
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    import warnings

    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")


def _compile_one(job: tuple[Case, int]) -> list[dict]:
    case, arch = job
    return compile_case(case, arch)


def summarise(records: list[dict]) -> list[dict]:
    """One row per (arch, kernel family): variants, failures, worst registers and spills, and
    the range of widest accesses (bytes) over the variants."""
    rows: dict = {}
    widths: dict = {}
    for r in records:
        key = (r["arch"], r["family"], r.get("kernel") or "(compile error)")
        row = rows.setdefault(
            key,
            {
                "arch": key[0],
                "family": key[1],
                "kernel": key[2],
                "variants": 0,
                "failed": 0,
                "max_registers": 0,
                "max_spill_bytes": 0,
                "max_shared": 0,
            },
        )
        row["variants"] += 1
        row["failed"] += bool(r["problems"])
        if r.get("kernel"):
            row["max_registers"] = max(row["max_registers"], r["registers"])
            row["max_spill_bytes"] = max(row["max_spill_bytes"], r["spill_stores"])
            row["max_shared"] = max(row["max_shared"], r["shared"])
            for kind in ("load", "store"):
                if r[f"{kind}_bytes"]:
                    widths.setdefault((key, kind), set()).add(r[f"{kind}_bytes"])
    for key, row in rows.items():
        for kind in ("load", "store"):
            seen = sorted(widths.get((key, kind), {0}))
            row[f"{kind}_bytes"] = f"{seen[0]}-{seen[-1]}" if len(seen) > 1 else str(seen[0])
    return list(rows.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--arch",
        type=int,
        action="append",
        choices=sorted(SHARED_LIMIT),
        help="compute capability as one number (90: H100/H200); repeatable; default 90",
    )
    parser.add_argument(
        "--family",
        action="append",
        choices=["ipot", "mlm", "mrfr", "mrc", "mrckl"],
        help="compile only these kernel families (default all)",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=os.cpu_count() or 1,
        help="compiler processes (default: one per core)",
    )
    parser.add_argument("--list", action="store_true", help="print the variants and stop")
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO_ROOT / "benchmarks" / "results",
        help="result file or folder (default benchmarks/results/)",
    )
    args = parser.parse_args(argv)
    arches = args.arch or [90]
    cases = [c for c in all_cases() if not args.family or c.family in args.family]
    if args.list:
        for case in cases:
            print(case.label())
        print(f"{len(cases)} cases")
        return 0

    started = time.perf_counter()
    jobs = [(case, arch) for arch in arches for case in cases]
    print(
        f"aot_compile: {len(jobs)} launcher calls for sm_{', sm_'.join(map(str, arches))} on "
        f"{args.jobs} processes, triton {triton.__version__}",
        flush=True,
    )
    records: list[dict] = []
    done = 0
    # One pool per target: Triton's JIT keeps one binder and kernel cache per device for the
    # life of a process, keyed without the target, so a process compiles for one target only.
    for arch in arches:
        arch_jobs = [(case, arch) for case in cases]
        with tempfile.TemporaryDirectory(prefix="uniter-aot-") as cache:
            ctx = multiprocessing.get_context("fork")
            with ctx.Pool(args.jobs, initializer=_init_worker, initargs=(cache,)) as pool:
                for found in pool.imap(_compile_one, arch_jobs):
                    for record in found:
                        record["arch"] = arch
                        records.append(record)
                        if record["problems"]:
                            print(
                                f"  FAIL sm_{arch} {record['case']} {record.get('kernel')}: "
                                f"{'; '.join(record['problems'])}",
                                flush=True,
                            )
                    done += 1
                    if sys.stderr.isatty():
                        print(f"\r  {done}/{len(jobs)}", end="", file=sys.stderr, flush=True)
    if sys.stderr.isatty():
        print(file=sys.stderr)
    seconds = time.perf_counter() - started
    summary = summarise(records)
    for row in summary:
        print(
            f"sm_{row['arch']} {row['family']:6s} {row['kernel']:20s} {row['variants']:4d} variants"
            f"  max {row['max_registers']:3d} registers, {row['max_spill_bytes']} B spilled, "
            f"{row['max_shared'] // 1024} KiB shared; widest loads {row['load_bytes']} B, "
            f"stores {row['store_bytes']} B; "
            + ("ok" if not row["failed"] else f"{row['failed']} FAILED")
        )
    failed = sum(bool(r["problems"]) for r in records)
    env = environment("cpu")
    env["ptxas"] = _ptxas_version()
    payload = {
        "benchmark": "aot_compile",
        "command": command_line(),
        "environment": env,
        "arches": arches,
        "triton": triton.__version__,
        "seconds": round(seconds, 1),
        "variants": len(records),
        "failed": failed,
        "summary": summary,
        "records": records,
    }
    out = args.out
    if out.is_dir() or not out.suffix:
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        arch_tag = "-".join(f"sm{a}" for a in arches)
        out = out / f"aot-{arch_tag}-triton{triton.__version__}-{stamp}.json"
    path = save_result("aot", payload, out)
    print(f"aot_compile: {len(records)} variants in {seconds:.0f} s, {failed} failed; wrote {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
