"""Checkpoints that are never half-written.

A checkpoint is a folder `checkpoints/step-000400/` holding `model.pt` (this project's layout),
`optimizer.pt`, `state.json` (step, config, RNG seeds) and, last, a `COMPLETE` marker. It is
written under a temporary name and renamed into place whole; then the `latest` pointer file is
replaced. A reader trusts only folders with the marker, so a run killed mid-save leaves the
previous checkpoint as the newest complete one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

COMPLETE = "COMPLETE"
LATEST = "latest"


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def save_checkpoint(root: str | os.PathLike, step: int, files: dict, state: dict) -> Path:
    """Write `files` (name -> object for torch.save) and `state` (JSON) as checkpoint `step`."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(step)
    tmp = root / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for name, obj in files.items():
            torch.save(obj, tmp / name)
        (tmp / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True, default=str))
        (tmp / COMPLETE).write_text("")
        if final.exists():  # re-saving the same step (a resumed run): replace it whole
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    pointer = root / f".{LATEST}.tmp-{os.getpid()}"
    pointer.write_text(final.name + "\n")
    os.replace(pointer, root / LATEST)
    return final


def complete_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoint folders under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if (p / COMPLETE).is_file())


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1] if found else None
