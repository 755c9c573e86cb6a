"""Which questions each step trains on: a pure function of (seed, step), so resume is exact.

Questions are drawn without replacement in epochs; each epoch is a fresh permutation of the
training split seeded by (seed, epoch). The data position is therefore just the step number:
no iterator state has to be checkpointed, and step s of a resumed run sees the same questions
as step s of an uninterrupted one.
"""

from __future__ import annotations

import numpy as np


def epoch_order(num_records: int, *, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """Permutation `[num_records]` of the training split for one epoch."""
    if num_records < 1:
        raise ValueError("the training split is empty; check task.name / task.kwargs / data_dir")
    if not shuffle:
        return np.arange(num_records)
    return np.random.default_rng([seed, epoch]).permutation(num_records)


def questions_for_step(
    step: int, *, questions_per_step: int, num_records: int, seed: int, shuffle: bool = True
) -> tuple[list[int], int]:
    """Record indices of step `step` (0-based) and the epoch of its first question."""
    if questions_per_step < 1:
        raise ValueError(f"task.questions_per_step={questions_per_step} must be >= 1")
    start = step * questions_per_step
    indices = []
    for pos in range(start, start + questions_per_step):
        epoch, offset = divmod(pos, num_records)
        indices.append(
            int(epoch_order(num_records, seed=seed, epoch=epoch, shuffle=shuffle)[offset])
        )
    return indices, start // num_records


def sampling_seed(seed: int, step: int, *, purpose: int = 0) -> int:
    """A distinct, reproducible 31-bit sampler seed per (run seed, step, purpose)."""
    return int(np.random.default_rng([seed, step, purpose]).integers(0, 2**31 - 1))
