"""Hard-filter baseline (METHODS §5): SDPO only on questions with 0 < p̂ < 1."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxsd.algorithms import base, common, sdpo
from jaxsd.losses import weights as weights_lib


@dataclasses.dataclass(frozen=True)
class HardFilter:
    """`w_i = 1[0 < p̂_i < 1]` times SDPO's sd_mask."""

    success_threshold: float = 0.5
    feedback_only_without_solution: bool = True
    dont_reprompt_on_self_success: bool = True
    name: str = "hard_filter"

    def init_state(self, seed: int) -> base.HostState:
        """Stateless."""
        return base.HostState()

    def step_switches(self) -> dict[str, Any]:
        """Distillation only, EMA self-teacher."""
        return dict(sdpo.DISTILL_SWITCHES)

    def plan(
        self, groups: Sequence[base.Group], state: base.HostState, *, epoch: int
    ) -> tuple[list[base.RolloutPlan], base.HostState, dict[str, float]]:
        """SDPO plans with the 0/1 filter weight, METHODS §5."""
        base.check_epoch(epoch)
        p = common.pass_rates(groups, self.success_threshold)
        w = np.asarray(weights_lib.hard_filter_weights(p), np.float64)
        plans = sdpo.weighted_sdpo_plans(
            groups,
            w.tolist(),
            success_threshold=self.success_threshold,
            feedback_only_without_solution=self.feedback_only_without_solution,
            dont_reprompt_on_self_success=self.dont_reprompt_on_self_success,
        )
        return plans, state, common.plan_metrics(plans, groups, self.success_threshold)
