"""The reference's learning-rate schedule: linear warm-up, then linear decay to zero."""

from __future__ import annotations

MIN_LR = 1e-8  # the reference never sets a zero learning rate


def warmup_linear(step: int, warmup_steps: int, total_steps: int) -> float:
    """Multiplier for optimizer step `step` (1-based, as the reference counts)."""
    if step < warmup_steps:
        return step / warmup_steps
    if total_steps <= warmup_steps:
        return 1.0 if step <= total_steps else 0.0
    return max(0.0, (total_steps - step) / (total_steps - warmup_steps))


def learning_rate(step: int, base_lr: float, warmup_steps: int, total_steps: int) -> float:
    return max(base_lr * warmup_linear(step, warmup_steps, total_steps), MIN_LR)
