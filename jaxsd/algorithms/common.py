"""Pieces several algorithms share: pass rates, sibling selection, SDPO teacher contexts."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jaxsd.algorithms import base
from jaxsd.algorithms.reprompt import sdpo_reprompt_messages
from jaxsd.losses import policy as policy_lib


def is_success(rollout: base.Rollout, threshold: float) -> bool:
    """A rollout succeeds when its reward reaches τ_succ (METHODS: 0.5)."""
    return rollout.reward >= threshold


def pass_rate(group: base.Group, threshold: float) -> float:
    """Empirical pass rate `p̂_i = (1/G) Σ_j 1[r_ij ≥ τ_succ]`, METHODS preamble."""
    return sum(is_success(r, threshold) for r in group.rollouts) / len(group)


def pass_rates(groups: Sequence[base.Group], threshold: float) -> np.ndarray:
    """`[Q]` pass rates of the step's groups."""
    return np.asarray([pass_rate(g, threshold) for g in groups], dtype=np.float64)


def group_advantages(group: base.Group, *, normalize: bool, eps: float) -> np.ndarray:
    """GRPO advantages `[G]` over the whole group, METHODS §4 (losses.policy on host)."""
    return np.asarray(
        policy_lib.grpo_advantages(group.rewards, normalize=normalize, eps=eps), np.float64
    )


def first_other_success(
    group: base.Group, index: int, threshold: float, *, exclude_self: bool = True
) -> base.Rollout | None:
    """SDPO's solution: the first successful rollout other than `index` (METHODS §1).

    `exclude_self=False` lets a success be its own solution (SDPO's
    `dont_reprompt_on_self_success=False`).
    """
    for j, other in enumerate(group.rollouts):
        if (j != index or not exclude_self) and is_success(other, threshold):
            return other
    return None


def sdpo_context(
    group: base.Group,
    index: int,
    *,
    threshold: float,
    feedback_only_without_solution: bool = True,
    exclude_self: bool = True,
) -> tuple[list[base.Message] | None, str]:
    """SDPO teacher context of rollout `index`: (messages or None, source label), METHODS §1.

    Solution = first other success; feedback = this rollout's feedback text, used only when
    no solution exists (or always alongside it when `feedback_only_without_solution=False`).
    Neither -> (None, "none"), which means sd_mask 0.
    """
    rollout = group.rollouts[index]
    solution = first_other_success(group, index, threshold, exclude_self=exclude_self)
    feedback = rollout.feedback or None
    if solution is not None and feedback_only_without_solution:
        feedback = None
    if solution is None and feedback is None:
        return None, base.SOURCE_NONE
    messages = sdpo_reprompt_messages(
        rollout.prompt,
        solution=solution.response if solution is not None else None,
        feedback=feedback,
    )
    source = base.SOURCE_SOLUTION if solution is not None else base.SOURCE_FEEDBACK
    return messages, source


def plan_metrics(
    plans: Sequence[base.RolloutPlan], groups: Sequence[base.Group], threshold: float
) -> dict[str, float]:
    """Routing fractions, teacher sources and pass-rate statistics of one step."""
    n = max(len(plans), 1)
    p = pass_rates(groups, threshold)
    metrics: dict[str, float] = {
        "num_rollouts": float(len(plans)),
        "num_questions": float(len(groups)),
        "pass_rate/mean": float(p.mean()) if p.size else 0.0,
        "pass_rate/frac_zero": float(np.mean(p == 0.0)) if p.size else 0.0,
        "pass_rate/frac_one": float(np.mean(p == 1.0)) if p.size else 0.0,
        "pass_rate/frac_intermediate": float(np.mean((p > 0) & (p < 1))) if p.size else 0.0,
    }
    # Histogram over 5 equal bins of [0, 1] (the last bin closed) for the pass-rate panel.
    hist, _ = np.histogram(p, bins=5, range=(0.0, 1.0))
    for k, count in enumerate(hist):
        metrics[f"pass_rate/hist_{k}"] = float(count)
    for route in base.ROUTES:
        metrics[f"route/{route}"] = sum(pl.route == route for pl in plans) / n
    for source in base.SOURCES:
        metrics[f"teacher/{source}"] = sum(pl.teacher_source == source for pl in plans) / n
    for field in ("sd_weight", "pg_weight", "ssopd_weight"):
        values = np.asarray([getattr(pl, field) for pl in plans], dtype=np.float64)
        active = values[values != 0.0]
        metrics[f"{field}/mean"] = float(values.mean()) if values.size else 0.0
        metrics[f"{field}/max"] = float(values.max()) if values.size else 0.0
        metrics[f"{field}/frac_active"] = float(active.size / n)
    return metrics
