"""SDPO (METHODS §1): distil every rollout towards the self-teacher on its reprompt.

The question-weighted variants (SC-SDPO, PACED, hard filter) subclass `SDPO` and override
its per-question weight.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

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
                    weights=base.LossWeights(sd_weight=sd_weight),
                    route=base.ROUTE_SD if sd_weight > 0 else base.ROUTE_NONE,
                    teacher_source=source,
                )
            )
    return plans


@dataclasses.dataclass(frozen=True)
class SDPO:
    """Plain SDPO: weight 1 on every rollout that has a solution or feedback.

    Also the shell of the question-weighted variants (SC-SDPO, PACED, hard filter): a
    subclass adds its hyper-parameters and overrides `batch_weights` only.
    """

    success_threshold: float = 0.5
    feedback_only_without_solution: bool = True
    dont_reprompt_on_self_success: bool = True
    name: str = "sdpo"
    state_type: ClassVar[type[base.HostState]] = base.HostState  # stateless

    def init_state(self, seed: int) -> base.HostState:
        """Stateless: the weights come from this batch (PACED: from its frozen table)."""
        return self.state_type()

    def before_training(self, state: base.HostState, sample_all: base.SampleAll) -> base.HostState:
        """Nothing to prepare."""
        return state

    def step_switches(self) -> dict[str, Any]:
        """Distillation only, EMA self-teacher."""
        return dict(DISTILL_SWITCHES)

    def batch_weights(self, groups: Sequence[base.Group], state: base.HostState) -> np.ndarray:
        """`w_i` per group (question) of this batch; plain SDPO: 1."""
        return np.ones(len(groups))

    def plan(
        self, groups: Sequence[base.Group], state: base.HostState, *, epoch: int
    ) -> tuple[list[base.RolloutPlan], base.HostState, dict[str, float]]:
        """One plan per rollout with `sd_weight = w_i · sd_mask`, METHODS §1/§5; the host
        state is returned unchanged."""
        base.check_epoch(epoch)
        w = np.asarray(self.batch_weights(groups, state), np.float64)
        plans = weighted_sdpo_plans(
            groups,
            w.tolist(),
            success_threshold=self.success_threshold,
            feedback_only_without_solution=self.feedback_only_without_solution,
            dont_reprompt_on_self_success=self.dont_reprompt_on_self_success,
        )
        metrics = common.plan_metrics(plans, groups, self.success_threshold)
        metrics["question_weight/mean"] = float(w.mean()) if w.size else 0.0
        metrics["question_weight/max"] = float(w.max()) if w.size else 0.0
        return plans, state, metrics
