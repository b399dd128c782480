"""Run logs on disk: `train.log`, `metrics.jsonl`, TensorBoard events, and the progress display."""

from __future__ import annotations

import importlib.metadata
import json
import logging
import math
import platform
import sys
import time
from pathlib import Path

import torch

log = logging.getLogger("uniter_fast")


def setup_logging(output_dir: Path, *, rank: int = 0) -> None:
    """Rank 0: INFO and above to the console and to `output_dir/train.log`. Other ranks: their
    warnings and errors to the console, prefixed with the rank (the launcher merges the streams).
    """
    root = logging.getLogger("uniter_fast")
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    root.propagate = False
    if rank == 0:
        fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
        root.setLevel(logging.INFO)
        file_handler = logging.FileHandler(output_dir / "train.log")
        file_handler.setFormatter(fmt)
        root.addHandler(file_handler)
    else:
        fmt = logging.Formatter(
            f"%(asctime)s %(levelname)s [rank {rank}] %(name)s: %(message)s", "%H:%M:%S"
        )
        root.setLevel(logging.WARNING)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(fmt)
    root.addHandler(console)


def environment_info(device: torch.device) -> dict:
    """Versions and hardware a result depends on (written to `env.json` at start)."""
    import numpy

    info = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "cuda": torch.version.cuda,
        "device": str(device),
        "cpu_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    # Versions from package metadata: importing deepspeed or flash-attn just to read a version
    # is slow and has side effects (accelerator probing, CUDA initialisation).
    for name in ("triton", "deepspeed", "webdataset", "flash-attn"):
        try:
            info[name.replace("-", "_")] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            info[name.replace("-", "_")] = None
    return info


class MetricsWriter:
    """Appends one JSON object per line to `metrics.jsonl` and mirrors scalars to TensorBoard."""

    def __init__(self, output_dir: Path, *, purge_step: int | None = None):
        """purge_step: a resumed run's first step; TensorBoard drops the events at and after it
        that the interrupted run wrote."""
        self.path = output_dir / "metrics.jsonl"
        self._file = self.path.open("a", buffering=1)
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(output_dir / "tensorboard"), purge_step=purge_step)

    def write(self, record: dict, *, prefix: str = "train") -> None:
        self._file.write(json.dumps(record, sort_keys=True) + "\n")
        step = record["step"]
        task = record.get("task")
        for key, value in record.items():
            if key in ("step", "task") or not isinstance(value, (int, float)):
                continue
            name = f"{prefix}/{task}/{key}" if task and key not in ("lr",) else f"{prefix}/{key}"
            self.tb.add_scalar(name, value, step)

    def close(self) -> None:
        self._file.close()
        self.tb.close()


class Progress:
    """Rank 0's display: a tqdm bar on a terminal (step, loss per task, tokens/s, samples/s, ETA),
    log lines elsewhere. Other ranks pass enabled=False and show nothing."""

    def __init__(self, total: int, *, initial: int = 0, enabled: bool = True):
        self.total = total
        self.start = time.perf_counter()
        self.initial = initial
        self.enabled = enabled
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

    def update(
        self,
        step: int,
        losses: dict[str, float],
        tokens_per_s: float,
        samples_per_s: float = 0.0,
        *,
        log_line: bool,
    ) -> None:
        """Advance to `step`; on a terminal refresh the bar, elsewhere log a line if `log_line`."""
        if not self.enabled:
            return
        parts = " ".join(f"{k}={v:.3f}" for k, v in sorted(losses.items()) if math.isfinite(v))
        rates = f"tok/s={tokens_per_s:,.0f} samples/s={samples_per_s:,.1f}"
        if self.bar is not None:
            self.bar.set_postfix_str(f"{parts} {rates}", refresh=False)
            self.bar.update(step - self.bar.n)
            return
        if not log_line:
            return
        elapsed = time.perf_counter() - self.start
        done = step - self.initial
        eta = elapsed / done * (self.total - step) if done else float("nan")
        log.info("step %d/%d %s %s eta=%.0fs", step, self.total, parts, rates, eta)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
