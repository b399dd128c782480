"""Errors a run raises on purpose: a problem with its inputs, not a bug.

`train.py` ends the run on any of them with its one-line message and a non-zero exit, no
traceback; anything else (a `TypeError`, say) is a bug and keeps its traceback.
"""

from __future__ import annotations


class RunError(Exception):
    """A problem with the run's inputs (recipe, files, device, data): reported in one line."""


__all__ = ["RunError"]
