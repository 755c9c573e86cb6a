"""SDPO (METHODS §1): distil every rollout towards the self-teacher on its reprompt.

The question-weighted variants (SC-SDPO, PACED, hard filter) reuse `weighted_sdpo_plans`
with their own per-question weight.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from jaxsd.algorithms import base, common

DISTILL_SWITCHES = dict(
    use_distillation=True,
    use_surrogate=False,
    use_ssopd=False,
    use_rhythm=False,
    teacher_mode="ema",
)


def weighted_sdpo_plans(
    groups: Sequence[base.Group],
    question_weights: Sequence[float],
    *,
    success_threshold: float,
    feedback_only_without_solution: bool = True,
    dont_reprompt_on_self_success: bool = True,
) -> list[base.RolloutPlan]:
    """SDPO plans with `sd_weight = w_i · sd_mask` for every rollout of question i (§1, §5)."""
    if len(question_weights) != len(groups):
        raise ValueError(
            f"{len(question_weights)} question weights for {len(groups)} groups; pass one each"
        )
    plans = []
    for group, weight in zip(groups, question_weights, strict=True):
        for j in range(len(group)):
            messages, source = common.sdpo_context(
                group,
                j,
                threshold=success_threshold,
                feedback_only_without_solution=feedback_only_without_solution,
                exclude_self=dont_reprompt_on_self_success,
            )
            sd_weight = float(weight) if messages is not None else 0.0
            plans.append(
                base.RolloutPlan(
                    teacher_messages=messages,
                    sd_weight=sd_weight,
                    route=base.ROUTE_SD if sd_weight > 0 else base.ROUTE_NONE,
                    teacher_source=source,
                )
            )
    return plans


@dataclasses.dataclass(frozen=True)
class SDPO:
    """Plain SDPO: weight 1 on every rollout that has a solution or feedback."""

    success_threshold: float = 0.5
    feedback_only_without_solution: bool = True
    dont_reprompt_on_self_success: bool = True
    name: str = "sdpo"

    def init_state(self, seed: int) -> base.HostState:
        """SDPO is stateless."""
        return base.HostState()

    def step_switches(self) -> dict[str, Any]:
        """Distillation only, EMA self-teacher."""
        return dict(DISTILL_SWITCHES)

    def plan(
        self, groups: Sequence[base.Group], state: base.HostState, *, epoch: int
    ) -> tuple[list[base.RolloutPlan], base.HostState, dict[str, float]]:
        """One plan per rollout, METHODS §1."""
        base.check_epoch(epoch)
        plans = weighted_sdpo_plans(
            groups,
            [1.0] * len(groups),
            success_threshold=self.success_threshold,
            feedback_only_without_solution=self.feedback_only_without_solution,
            dont_reprompt_on_self_success=self.dont_reprompt_on_self_success,
        )
        return plans, state, common.plan_metrics(plans, groups, self.success_threshold)
