"""Checkpoints that are never half-written, saved and loaded by every rank together.

    checkpoints/
      latest                 the name of the newest complete checkpoint (moved last)
      step-000400/
        engine/              DeepSpeed: model, optimizer (ZeRO partitions), scheduler, loss scaler
        rank-00000.pt        per rank: RNG states, the data loader's position, the open log window
        rank-00001.pt
        state.json           step, world size, ZeRO stage, precision, the recipe, the model config
        COMPLETE             written last: a folder without it is ignored

A save is collective: every rank enters it (one entering alone would hang the others in
DeepSpeed's collectives, so the trainer calls it at the same step on all ranks). Rank 0 makes
`.step-000400.tmp/`, every rank writes its part into it, and after a barrier rank 0 writes
`state.json` and the marker, renames the folder into place and moves `latest`. A run killed at any
point leaves either the new checkpoint complete or the previous one as the newest complete one;
the leftover temporary folder is removed by the next run. The output folder must be on a file
system every rank sees (as DeepSpeed's own checkpoints require).
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from .engine import Engine, barrier

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
LATEST = "latest"
STATE = "state.json"


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.pt"


def _step_of(path: Path) -> int:
    try:
        return int(path.name.split("-", 1)[1])
    except (IndexError, ValueError):
        return -1


def complete_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoint folders under `root`, oldest first (by step)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if _step_of(p) >= 0 and (p / COMPLETE).is_file()]
    return sorted(found, key=_step_of)


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint. Found by listing, not from the `latest` pointer: the
    pointer moves after the rename, so a run killed in between leaves it one behind."""
    found = complete_checkpoints(root)
    return found[-1] if found else None


def incomplete_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Leftovers of saves that did not finish (temporary folders, folders without the marker)."""
    root = Path(root)
    if not root.is_dir():
        return []
    tmp = list(root.glob(".step-*.tmp*"))
    unmarked = [p for p in root.glob("step-*") if p.is_dir() and not (p / COMPLETE).is_file()]
    return sorted(tmp + unmarked)


def read_state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / STATE).read_text())


# --------------------------------------------------------------------------------------------
# RNG states: every generator the run draws from on this rank


def rng_state() -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(keys.copy()), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy(), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------
# Save and load


def save_checkpoint(
    root: str | os.PathLike,
    step: int,
    engine: Engine,
    *,
    rank_state: dict,
    state: dict,
    keep: int = 0,
    before_commit: Callable[[], None] | None = None,
) -> Path:
    """Collective save of checkpoint `step`; returns its folder (on every rank).

    rank_state: this rank's part (torch.save-able; loaded back with weights_only=True).
    state: rank 0's JSON (the run's step, config, ...).
    keep: complete checkpoints to keep (older ones removed after the new one is in place; 0 keeps
    all). before_commit: called on rank 0 after every part is written, before the marker (the
    fault tests kill the process there).
    """
    root = Path(root)
    rank = engine.rank
    final = root / checkpoint_name(step)
    tmp = root / f".{final.name}.tmp"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier()
    engine.save(tmp)
    part = tmp / rank_file(rank)
    torch.save(rank_state, part.with_suffix(".partial"))
    os.replace(part.with_suffix(".partial"), part)
    barrier()
    if rank == 0:
        (tmp / STATE).write_text(json.dumps(state, indent=2, sort_keys=True, default=str) + "\n")
        if before_commit is not None:
            before_commit()
        _fsync_tree(tmp)
        (tmp / COMPLETE).write_text("")
        if final.exists():  # re-saving a step (a resumed run): move the old one aside first
            old = root / f".{final.name}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        pointer = root / f".{LATEST}.tmp"
        pointer.write_text(final.name + "\n")
        os.replace(pointer, root / LATEST)
        if keep > 0:
            for old in complete_checkpoints(root)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def _fsync_tree(folder: Path) -> None:
    """Flush the files before the marker says they are there (a crash must not reorder them)."""
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def load_rank_state(checkpoint: Path, rank: int) -> dict:
    path = checkpoint / rank_file(rank)
    if not path.is_file():
        raise FileNotFoundError(f"{checkpoint} has no {path.name} (saved by fewer ranks?)")
    return torch.load(path, map_location="cpu", weights_only=True)


def remove_incomplete(root: str | os.PathLike) -> list[Path]:
    """Rank 0, before anything else: clear what killed saves left behind."""
    removed = incomplete_checkpoints(root)
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


__all__ = [
    "COMPLETE",
    "LATEST",
    "checkpoint_name",
    "complete_checkpoints",
    "incomplete_checkpoints",
    "latest_checkpoint",
    "load_rank_state",
    "read_state",
    "remove_incomplete",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
]
