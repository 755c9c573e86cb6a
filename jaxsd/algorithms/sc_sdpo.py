"""SC-SDPO (METHODS §5): SDPO with batch-adaptive question weights `[p̂(1−p̂)]^a`."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxsd.algorithms import base, common, sdpo
from jaxsd.losses import weights as weights_lib


@dataclasses.dataclass(frozen=True)
class SCSDPO:
    """Self-calibrated SDPO; `exponent` 0.5 (default) or 1 (variance weighting)."""

    exponent: float = 0.5
    success_threshold: float = 0.5
    feedback_only_without_solution: bool = True
    dont_reprompt_on_self_success: bool = True
    name: str = "sc_sdpo"

    def __post_init__(self) -> None:
        if self.exponent < 0:
            raise ValueError(f"algorithm.exponent={self.exponent} must be >= 0 (paper: 0.5 or 1)")

    def init_state(self, seed: int) -> base.HostState:
        """SC-SDPO is stateless: the weights come from this batch's pass rates."""
        return base.HostState()

    def step_switches(self) -> dict[str, Any]:
        """Distillation only, EMA self-teacher."""
        return dict(sdpo.DISTILL_SWITCHES)

    def plan(
        self, groups: Sequence[base.Group], state: base.HostState, *, epoch: int
    ) -> tuple[list[base.RolloutPlan], base.HostState, dict[str, float]]:
        """`sd_weight = w_i · sd_mask` with `w` normalised to mean 1 over 0 < p̂ < 1, §5."""
        base.check_epoch(epoch)
        p = common.pass_rates(groups, self.success_threshold)
        w = np.asarray(weights_lib.pass_rate_weights(p, exponent=self.exponent), np.float64)
        plans = sdpo.weighted_sdpo_plans(
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
