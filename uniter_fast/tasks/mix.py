"""Which (dataset, task) the next mini-batch comes from: a draw proportional to mix ratios.

The reference's all-data recipe, for (itm, mlm, mrfr, mrckl): COCO 6:8:4:4, VG 9:12:6:6,
CC 9:12:6:6, SBU 6:8:4:4:

    mixer = TaskMixer.from_recipe({"coco": {"itm": 6, "mlm": 8, "mrfr": 4, "mrckl": 4}}, seed=0)
    dataset, task = mixer.sample()

The draws come from the mixer's own generator, whose state goes into checkpoints
(`state_dict`), so that a resumed run continues the same sequence of tasks.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from numbers import Real

import numpy as np

from ..data.schema import TASKS

__all__ = ["TaskMixer"]


class TaskMixer:
    """Draw (dataset, task) pairs with probability proportional to their ratios.

    ratios: `{(dataset, task): ratio}` or `[(dataset, task, ratio), ...]`; tasks from
        `schema.TASKS`, ratios finite and > 0, each pair at most once.
    seed: seed of the mixer's numpy Generator.
    """

    def __init__(
        self,
        ratios: Mapping[tuple[str, str], float] | Sequence[tuple[str, str, float]],
        seed: int,
    ) -> None:
        if isinstance(ratios, Mapping):
            items = [
                (*pair, ratio) if isinstance(pair, tuple) else (pair, ratio)
                for pair, ratio in ratios.items()
            ]
        elif isinstance(ratios, Sequence) and not isinstance(ratios, str):
            items = list(ratios)
        else:
            raise TypeError(
                f"ratios must be a mapping or a sequence of (dataset, task, ratio), got "
                f"{type(ratios).__name__}"
            )
        if not items:
            raise ValueError("TaskMixer needs at least one (dataset, task, ratio) entry")
        entries: list[tuple[str, str]] = []
        weights: list[float] = []
        for item in items:
            if not isinstance(item, (tuple, list)) or len(item) != 3:
                raise ValueError(f"TaskMixer entry {item!r} is not (dataset, task, ratio)")
            dataset, task, ratio = item
            if not isinstance(dataset, str) or not dataset:
                raise ValueError(f"TaskMixer entry {item!r}: dataset must be a non-empty string")
            if task not in TASKS:
                raise ValueError(
                    f"TaskMixer entry {item!r}: unknown task {task!r}; expected one of "
                    f"{', '.join(TASKS)}"
                )
            if (
                isinstance(ratio, bool)
                or not isinstance(ratio, Real)
                or not math.isfinite(ratio)
                or ratio <= 0
            ):
                raise ValueError(f"TaskMixer entry {item!r}: ratio must be finite and > 0")
            if (dataset, task) in entries:
                raise ValueError(f"TaskMixer entry {item!r}: ({dataset!r}, {task!r}) given twice")
            entries.append((dataset, task))
            weights.append(float(ratio))
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"TaskMixer seed must be a non-negative integer, got {seed!r}")
        self.entries: tuple[tuple[str, str], ...] = tuple(entries)
        self.ratios: tuple[float, ...] = tuple(weights)
        total = math.fsum(weights)
        self.probabilities: tuple[float, ...] = tuple(w / total for w in weights)
        self._cumulative = np.cumsum(weights) / total
        self._rng = np.random.default_rng(seed)

    @classmethod
    def from_recipe(cls, datasets: Mapping[str, Mapping[str, float]], seed: int) -> TaskMixer:
        """From `{"coco": {"itm": 6, "mlm": 8, ...}, ...}` (entries in the mapping's order)."""
        if not isinstance(datasets, Mapping):
            raise TypeError(f"datasets must be a mapping, got {type(datasets).__name__}")
        items = []
        for dataset, tasks in datasets.items():
            if not isinstance(tasks, Mapping):
                raise ValueError(
                    f"recipe entry {dataset!r} must map task -> ratio, got {type(tasks).__name__}"
                )
            items.extend((dataset, task, ratio) for task, ratio in tasks.items())
        return cls(items, seed)

    def sample(self) -> tuple[str, str]:
        """The (dataset, task) of the next mini-batch."""
        index = int(np.searchsorted(self._cumulative, self._rng.random(), side="right"))
        # Rounding can leave the last cumulative value a hair below 1.
        return self.entries[min(index, len(self.entries) - 1)]

    def state_dict(self) -> dict:
        """The generator's `bit_generator.state` (plain dicts, strs and ints; checkpoint-safe)."""
        return copy.deepcopy(self._rng.bit_generator.state)

    def load_state_dict(self, state: Mapping) -> None:
        """Continue from a `state_dict()`: the next draws repeat those that followed it."""
        expected = type(self._rng.bit_generator).__name__
        if not isinstance(state, Mapping) or state.get("bit_generator") != expected:
            got = state.get("bit_generator") if isinstance(state, Mapping) else type(state).__name__
            raise ValueError(f"TaskMixer state is not a {expected} generator state (got {got!r})")
        self._rng.bit_generator.state = copy.deepcopy(dict(state))

    def __repr__(self) -> str:
        mix = ", ".join(
            f"{d}/{t}:{p:.3f}" for (d, t), p in zip(self.entries, self.probabilities, strict=True)
        )
        return f"TaskMixer({mix})"
