"""Pieces several algorithms share: pass rates, sibling selection, SDPO teacher contexts."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jaxsd.algorithms import base
from jaxsd.losses import policy as policy_lib
from jaxsd.tasks import reprompt


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


def sdpo_context(
    group: base.Group,
    index: int,
    *,
    threshold: float,
    feedback_only_without_solution: bool = True,
    exclude_self: bool = True,
) -> tuple[list[base.Message] | None, str]:
    """SDPO teacher context of rollout `index`: (messages or None, source label), METHODS §1.

    Solution = first other success (think-stripped); feedback = this rollout's feedback,
    only when no solution exists. Neither -> (None, "none"), i.e. sd_mask 0. The template
    lives in jaxsd.tasks.reprompt.
    """
    rollouts = group.rollouts
    solution = reprompt.select_solution(
        index,
        [r.response for r in rollouts],
        [r.reward for r in rollouts],
        success_threshold=threshold,
        dont_reprompt_on_self_success=exclude_self,
    )
    teacher = reprompt.build_reprompt(
        rollouts[index].prompt,
        solution=solution,
        feedback=rollouts[index].feedback,
        feedback_only_without_solution=feedback_only_without_solution,
    )
    if not teacher.sd_mask:
        return None, base.SOURCE_NONE
    source = base.SOURCE_SOLUTION if teacher.used_solution else base.SOURCE_FEEDBACK
    return teacher.messages, source


def solution_messages(rollout: base.Rollout, solution: str) -> list[base.Message]:
    """Reprompt of `rollout` with `solution` and no feedback (DRIFT's sib⁺ context, §1/§7)."""
    return reprompt.build_reprompt(rollout.prompt, solution=solution, feedback=None).messages


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
        values = np.asarray([getattr(pl.weights, field) for pl in plans], dtype=np.float64)
        active = values[values != 0.0]
        metrics[f"{field}/mean"] = float(values.mean()) if values.size else 0.0
        metrics[f"{field}/max"] = float(values.max()) if values.size else 0.0
        metrics[f"{field}/frac_active"] = float(active.size / n)
    return metrics
