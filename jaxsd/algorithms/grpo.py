"""GRPO (METHODS §4): clipped surrogate on every rollout with the group advantage."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar

from jaxsd.algorithms import base, common

SURROGATE_SWITCHES = dict(
    use_distillation=False,
    use_surrogate=True,
    use_ssopd=False,
    use_rhythm=False,
    teacher_mode="none",
)


def grpo_plans(
    groups: Sequence[base.Group], *, normalize: bool, eps: float
) -> list[base.RolloutPlan]:
    """`pg_weight = 1`, `advantage = A_ij` over the whole group for every rollout."""
    plans = []
    for group in groups:
        adv = common.group_advantages(group, normalize=normalize, eps=eps)
        plans.extend(
            base.RolloutPlan(
                weights=base.LossWeights(advantage=float(a), pg_weight=1.0), route=base.ROUTE_PG
            )
            for a in adv
        )
    return plans


@dataclasses.dataclass(frozen=True)
class GRPO:
    """GRPO; `normalize=False` is "GRPO w/o Norm" (`A = r − mean r`)."""

    normalize: bool = True
    eps: float = 1e-6
    success_threshold: float = 0.5  # only for pass-rate metrics
    name: str = "grpo"
    state_type: ClassVar[type[base.HostState]] = base.HostState  # stateless

    def init_state(self, seed: int) -> base.HostState:
        """Stateless."""
        return base.HostState()

    def before_training(self, state: base.HostState, sample_all: base.SampleAll) -> base.HostState:
        """Nothing to prepare."""
        return state

    def step_switches(self) -> dict[str, Any]:
        """Surrogate only; no teacher forward."""
        return dict(SURROGATE_SWITCHES)

    def plan(
        self, groups: Sequence[base.Group], state: base.HostState, *, epoch: int
    ) -> tuple[list[base.RolloutPlan], base.HostState, dict[str, float]]:
        """One surrogate plan per rollout, METHODS §4."""
        base.check_epoch(epoch)
        plans = grpo_plans(groups, normalize=self.normalize, eps=self.eps)
        return plans, state, common.plan_metrics(plans, groups, self.success_threshold)
