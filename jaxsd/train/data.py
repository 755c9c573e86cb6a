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


OVERLONG_MODES = ("filter", "error")


def drop_overlong(
    records: list[dict],
    lengths: list[int],
    *,
    max_len: int,
    mode: str,
    what: str,
) -> tuple[list[dict], dict[str, float]]:
    """Records whose prompt fits `max_len` tokens, and counts for the log and metrics.

    A longer prompt would lose its tail (the question's end and the assistant header) to the
    right-truncation, so it is dropped at load time (`mode="filter"`, verl's
    filter_overlong_prompts) or the run stops with the count (`mode="error"`); never cut.
    `what` names the split in messages and metric keys ("train", "test").
    """
    if mode not in OVERLONG_MODES:
        raise ValueError(f"config task.overlong_prompts={mode!r}; use one of {OVERLONG_MODES}")
    if len(lengths) != len(records):
        raise ValueError(f"{len(lengths)} prompt lengths for {len(records)} records")
    kept = [r for r, n in zip(records, lengths, strict=True) if n <= max_len]
    dropped = len(records) - len(kept)
    stats = {f"data/{what}_prompts": float(len(kept)), f"data/{what}_overlong": float(dropped)}
    if dropped == 0:
        return kept, stats
    message = (
        f"{dropped} of {len(records)} {what} prompts are longer than task.max_prompt_len="
        f"{max_len} tokens (longest {max(lengths)})"
    )
    if mode == "error" or not kept:
        raise ValueError(
            f"{message}; raise task.max_prompt_len"
            + (" or set task.overlong_prompts='filter' to drop them" if mode == "error" else "")
        )
    print(f"[jaxsd] {message}: dropped; raise task.max_prompt_len to keep them", flush=True)
    return kept, stats
