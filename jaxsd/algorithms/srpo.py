"""SRPO (METHODS §8): route each rollout to SDPO or GRPO; entropy-aware SDPO token weights.

SRPO (Li et al. 2026, arXiv 2604.02288): failed rollouts with a correct sibling are distilled,
every other rollout gets the GRPO surrogate, and each distilled token is weighted by
`exp(-β H^T_t)`, the self-teacher's confidence (`jaxsd.losses.entropy_token_weights`, run in
the train step). `entropy_weighting=False` is the routing-only ablation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar

from jaxsd.algorithms import base, common


@dataclasses.dataclass(frozen=True)
class SRPO:
    """Incorrect rollouts with a correct sibling -> SDPO; every other rollout -> GRPO.

    The GRPO advantage of a GRPO-routed rollout is computed over its whole group. With
    `entropy_weighting` (paper default) the SDPO tokens carry `exp(-entropy_beta · H^T_t)`.
    """

    entropy_weighting: bool = True
    entropy_beta: float = 1.0  # β of exp(-β H^T); the paper's default is 1
    normalize: bool = True
    eps: float = 1e-6
    success_threshold: float = 0.5
    name: str = "srpo"
    state_type: ClassVar[type[base.HostState]] = base.HostState  # stateless

    def __post_init__(self) -> None:
        if not (isinstance(self.entropy_weighting, bool) and self.entropy_beta >= 0):
            raise ValueError(
                f"algorithm.entropy_weighting={self.entropy_weighting!r} must be True/False and "
                f"algorithm.entropy_beta={self.entropy_beta} >= 0 (SRPO: True, 1.0)"
            )

    def init_state(self, seed: int) -> base.HostState:
        """Stateless."""
        return base.HostState()

    def before_training(self, state: base.HostState, sample_all: base.SampleAll) -> base.HostState:
        """Nothing to prepare."""
        return state

    def step_switches(self) -> dict[str, Any]:
        """Both branches live in one step; EMA self-teacher for the SDPO branch."""
        return dict(
            use_distillation=True,
            use_surrogate=True,
            use_ssopd=False,
            use_rhythm=False,
            teacher_mode="ema",
            sd_entropy_beta=float(self.entropy_beta) if self.entropy_weighting else None,
        )

    def plan(
        self, groups: Sequence[base.Group], state: base.HostState, *, epoch: int
    ) -> tuple[list[base.RolloutPlan], base.HostState, dict[str, float]]:
        """Sample routing, METHODS §8."""
        base.check_epoch(epoch)
        plans = []
        for group in groups:
            adv = common.group_advantages(group, normalize=self.normalize, eps=self.eps)
            for j, rollout in enumerate(group.rollouts):
                messages, source = None, base.SOURCE_NONE
                if not common.is_success(rollout, self.success_threshold):
                    # Solution only: a wrong rollout without a correct sibling goes to GRPO.
                    messages, source = common.sdpo_context(
                        group, j, threshold=self.success_threshold
                    )
                if source == base.SOURCE_SOLUTION:
                    plans.append(
                        base.RolloutPlan(
                            teacher_messages=messages,
                            weights=base.LossWeights(sd_weight=1.0),
                            route=base.ROUTE_SD,
                            teacher_source=source,
                        )
                    )
                else:
                    plans.append(
                        base.RolloutPlan(
                            weights=base.LossWeights(advantage=float(adv[j]), pg_weight=1.0),
                            route=base.ROUTE_PG,
                        )
                    )
        return plans, state, common.plan_metrics(plans, groups, self.success_threshold)
