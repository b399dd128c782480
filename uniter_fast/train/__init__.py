"""Training: the run (trainer), the optimisation engine, the schedule, checkpoints and logs."""

from .trainer import Run, RunError, evaluate, prepare, train

__all__ = ["Run", "RunError", "evaluate", "prepare", "train"]
