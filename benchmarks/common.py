"""Helpers shared by the benchmark scripts: the environment stamp, result files, timing.

Every result file records what the numbers depend on (`environment`), and is written once per
run as `<name>-<device class>-<UTC timestamp>.json` (`save_result`): into `runs/bench/` under the
working directory by default (ignored by git, as `runs/` of train.py is), or where `--out` says.
The figures the project keeps are written with `--out benchmarks/results/` and committed.

Timing (`measure`, `measure_interleaved`): `warmup` untimed calls, then `iters` timed calls of
`fn(i)`. On CUDA each call is bracketed by CUDA events and the host synchronises once at the end,
so a step that never waits for the host may queue the next call while the GPU runs, and one that
does wait pays for it inside its own bracket. On the CPU each call is timed with
`time.perf_counter`. Peak memory (`peak_memory`): `torch.cuda.max_memory_allocated` on CUDA; on
the CPU the process's peak RSS, which is process-wide and only grows, so it bounds a measurement
rather than isolating it (`saved_tensor_bytes` is the CPU-comparable activation measure).
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import os
import platform
import re
import resource
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
# Where a run's result goes without --out: relative to the working directory, like train.py's
# runs/<time>/, so that trying a benchmark leaves the repository clean. The figures the project
# keeps are written to benchmarks/results/ with --out and committed.
RESULTS_DIR = Path("runs") / "bench"

# Words of a GPU's marketing name that do not tell two device classes apart.
_GPU_NAME_NOISE = re.compile(r"^(nvidia|geforce|tesla|amd|radeon|pcie|sxm\d*|hbm\d*e?|nvl|\d+gb)$")


def _package_version(name: str) -> str | None:
    # Read the installed metadata rather than importing: importing triton or deepspeed is slow and
    # has side effects, and an absent optional package is a fact to record, not an error.
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO_ROOT), *args],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_class(device: torch.device | str) -> str:
    """The device class in result names: "cpu", or a slug of the GPU's name ("NVIDIA H100 80GB
    HBM3" -> "h100")."""
    device = torch.device(device)
    if device.type != "cuda":
        return device.type
    words = re.split(r"[^a-z0-9]+", torch.cuda.get_device_name(device).lower())
    kept = [w for w in words if w and not _GPU_NAME_NOISE.match(w)]
    return "-".join(kept) or "cuda"


def environment(device: torch.device | str) -> dict:
    """What a measurement on `device` depends on: hardware, versions, commit, threads, date."""
    device = torch.device(device)
    cpu_name = _cpu_name()
    env = {
        "device": str(device),
        "device_class": device_class(device),
        "device_name": cpu_name,
        "cpu_name": cpu_name,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _package_version("triton"),
        "flash_attn": _package_version("flash-attn"),
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "git_commit": _git("rev-parse", "HEAD"),
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    # Dirty means tracked files differ from the commit; untracked files (a new benchmark not yet
    # committed, say) are listed apart, since they do not change what the commit's code does.
    status = _git("status", "--porcelain", "--untracked-files=no")
    env["git_dirty"] = None if status is None else bool(status)
    untracked = _git("ls-files", "--others", "--exclude-standard")
    env["git_untracked"] = None if untracked is None else untracked.splitlines()[:20]
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["device_name"] = torch.cuda.get_device_name(device)
        env["gpu_memory_bytes"] = int(props.total_memory)
        env["gpu_capability"] = f"{props.major}.{props.minor}"
        env["cudnn"] = torch.backends.cudnn.version()
    return env


def command_line() -> str:
    """The command that started this process, as typed (shell-quoted), with the interpreter."""
    return shlex.join([sys.executable or "python", *sys.argv])


def save_result(name: str, payload: dict, path: str | os.PathLike | None = None) -> Path:
    """Write `payload` as JSON; returns the path.

    path: a file (a name with a suffix, `r1.json`); a folder (one that exists, or a name
    without a suffix: `--out benchmarks/results/`, whose slash argparse's Path drops), which
    gets the default name; None: the default name in `RESULTS_DIR` (runs/bench/). The default
    name is `<name>-<device class>-<UTC timestamp>.json`, the device class read from
    `payload["environment"]["device_class"]`. The file is written under a temporary name and
    renamed, so a result file is either complete or absent.
    """
    if not re.fullmatch(r"[a-z0-9_]+", name):
        raise ValueError(f"save_result: name must match [a-z0-9_]+, got {name!r}")
    folder = RESULTS_DIR
    if path is not None and (Path(path).is_dir() or not Path(path).suffix):
        folder, path = Path(path), None
    if path is None:
        try:
            cls = payload["environment"]["device_class"]
        except (KeyError, TypeError):
            raise ValueError(
                "save_result: payload lacks environment.device_class (use environment())"
            ) from None
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        path = folder / f"{name}-{cls}-{stamp}.json"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
    return path


# --- timing -------------------------------------------------------------------------------------


@dataclass
class Measurement:
    """Per-iteration times of one timed function, and the peak memory while it ran.

    times_ms: the `iters` timed calls, in order; memory: see `measure`.
    """

    times_ms: list[float]
    memory: dict = field(default_factory=dict)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)

    @property
    def min_ms(self) -> float:
        return min(self.times_ms)

    def to_dict(self) -> dict:
        return {
            "median_ms": self.median_ms,
            "min_ms": self.min_ms,
            "times_ms": self.times_ms,
            "memory": self.memory,
        }


def _peak_rss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss) if sys.platform == "darwin" else int(rss) * 1024  # Linux reports KiB


def measure(
    fn: Callable[[int], object],
    *,
    device: torch.device | str,
    warmup: int,
    iters: int,
    setup: Callable[[int], object] | None = None,
) -> Measurement:
    """Time `fn(i)` for i in range(iters) after `warmup` untimed calls.

    `setup(i)`, when given, runs before each call outside the timed bracket (zeroing gradients,
    say). The memory dict is `peak_memory`'s, over the timed calls.
    """
    return measure_interleaved(
        {"fn": fn},
        device=device,
        warmup=warmup,
        iters=iters,
        setups=None if setup is None else {"fn": setup},
    )["fn"]


def measure_interleaved(
    fns: Mapping[str, Callable[[int], object]],
    *,
    device: torch.device | str,
    warmup: int,
    iters: int,
    setups: Mapping[str, Callable[[int], object]] | None = None,
) -> dict[str, Measurement]:
    """Time several providers call by call: for each i, `fn(i)` of every provider in turn.

    Interleaving puts call i of every provider next to each other in time, so a slow spell of a
    shared machine (another job on the same cores) lands on all of them alike and per-call
    ratios stay meaningful. `setups[name](i)` runs before `fns[name](i)`, untimed. Memory: with
    one provider, `peak_memory`'s dict over its timed calls; with several, the calls share one
    peak, so each gets only a note (measure each alone with `peak_memory`).
    """
    if warmup < 0 or iters < 1:
        raise ValueError(f"measure: need warmup >= 0 and iters >= 1, got {warmup} and {iters}")
    if not fns:
        raise ValueError("measure_interleaved: no functions given")
    device = torch.device(device)
    setups = setups or {}
    cuda = device.type == "cuda"
    for i in range(warmup):
        for name, fn in fns.items():
            if name in setups:
                setups[name](i)
            fn(i)
    baseline = _memory_start(device)
    times: dict[str, list] = {name: [] for name in fns}
    for i in range(iters):
        for name, fn in fns.items():
            if name in setups:
                setups[name](i)
            if cuda:
                start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
                start.record()
                fn(i)
                end.record()
                times[name].append((start, end))
            else:
                t0 = time.perf_counter()
                fn(i)
                times[name].append((time.perf_counter() - t0) * 1e3)
    memory = _memory_end(device, baseline)  # synchronises on CUDA: every event has fired
    if len(fns) > 1:
        memory = {"note": "interleaved calls share one peak; see the provider's own measurement"}
    if cuda:
        times = {n: [s.elapsed_time(e) for s, e in pairs] for n, pairs in times.items()}
    return {name: Measurement(t, dict(memory)) for name, t in times.items()}


def peak_memory(fn: Callable[[], object], *, device: torch.device | str) -> dict:
    """Peak memory of one call of `fn()` on its own.

    CUDA: `peak_bytes` (max_memory_allocated during the call), `baseline_bytes` (allocated
    before it) and `peak_delta_bytes` (what the call itself needed). CPU: `peak_rss_bytes`,
    process-wide and monotonic (see the module docstring).
    """
    device = torch.device(device)
    baseline = _memory_start(device)
    fn()
    return _memory_end(device, baseline)


def _memory_start(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def cpu_peak_rss() -> dict:
    """The process's peak RSS so far, labelled for what it is."""
    return {
        "kind": "cpu_peak_rss",
        "peak_rss_bytes": _peak_rss_bytes(),
        "note": "process-wide peak RSS since the process started (getrusage ru_maxrss); it only "
        "grows, so it bounds this measurement and every one before it and does not isolate it",
    }


def _memory_end(device: torch.device, baseline: int) -> dict:
    if device.type != "cuda":
        return cpu_peak_rss()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    return {
        "kind": "cuda_max_memory_allocated",
        "peak_bytes": int(peak),
        "baseline_bytes": int(baseline),
        "peak_delta_bytes": int(peak - baseline),
    }


def saved_tensor_bytes(fn: Callable[[], object], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the distinct storages autograd saves for backward while `fn()` runs.

    A device-independent measure of a training step's activation memory (it is what a forward
    keeps alive until the backward), comparable between providers on the CPU where peak RSS is
    not. Storages of `exclude` (the parameters, typically) are not counted. `fn`'s result is
    dropped unused: its graph must not be backpropagated.
    """
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        # Detached: the graph keeps the storage alive as it would anyway, but returning `t`
        # itself would tie an output to its own grad_fn, a cycle that leaks the whole graph.
        return t.detach()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())
