"""Errors a run raises on purpose: a problem with its inputs, not a bug.

`train.py` ends the run on any of them with its one-line message and a non-zero exit, no
traceback; anything else (a `TypeError`, say) is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import sys


class RunError(Exception):
    """A problem with the run's inputs (recipe, files, device, data): reported in one line."""


def report(error: BaseException, prog: str = "train.py") -> None:
    """Print `error` as the one line a run ends with, naming the rank under a launcher; once
    (a rank that stops the others prints it before telling them, see train/abort.py)."""
    if getattr(error, "_reported", False):
        return
    print(f"{prog}: error: {rank_prefix()}{error}", file=sys.stderr, flush=True)
    error._reported = True


def rank_prefix() -> str:
    """'[rank N] ' in a process of a launched group of several, else ''."""
    return f"[rank {os.environ['RANK']}] " if int(os.environ.get("WORLD_SIZE", 1)) > 1 else ""


__all__ = ["RunError", "rank_prefix", "report"]
