"""SSOPD (METHODS §5–§6): GRPO plus a frontier-weighted clipped forward KL on one pair.

Per group with both correct (C) and wrong (W) rollouts: the wrong rollout y⁻ is distilled on
its first `L = min(|y⁻|, L_max)` tokens towards a FIXED teacher that sees the correct
rollout y⁺ as privileged context, weighted by `ω_i = λ p̂_i (1 − p̂_i)`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from jaxsd.algorithms import base, common, grpo
from jaxsd.losses import weights as weights_lib
from jaxsd.tasks import reprompt

CORRECT_SELECTORS = reprompt.CORRECT_SIDES  # shortest, longest, max-logp, min-logp
WRONG_SELECTORS = reprompt.WRONG_SIDES  # longest, shortest, min-logp
WEIGHTINGS = ("frontier", "fixed")


@dataclasses.dataclass(frozen=True)
class SSOPD:
    """GRPO + SSOPD auxiliary term; defaults y⁺ = shortest correct, y⁻ = longest wrong."""

    frontier_scale: float = 4.0  # λ
    # "frontier": ω_i = λ p̂_i (1 − p̂_i); "fixed": ω_i = fixed_weight for every pair (the
    # paper's fixed-coefficient ablation).
    weighting: str = "frontier"
    fixed_weight: float = 1.0
    max_len: int = 256  # L_max
    kl_clip: float = 1.0  # c, applied in the train step (switch `ssopd_clip`)
    correct_selector: str = "shortest"
    wrong_selector: str = "longest"
    normalize: bool = True
    eps: float = 1e-6
    success_threshold: float = 0.5
    # Keep y⁺'s <think> reasoning in the privileged context (on with model.enable_thinking).
    keep_thinking: bool = False
    name: str = "ssopd"
    state_type: ClassVar[type[base.HostState]] = base.HostState  # stateless

    def __post_init__(self) -> None:
        if self.correct_selector not in CORRECT_SELECTORS:
            raise ValueError(
                f"algorithm.correct_selector={self.correct_selector!r} is unknown; "
                f"use one of {CORRECT_SELECTORS}"
            )
        if self.wrong_selector not in WRONG_SELECTORS:
            raise ValueError(
                f"algorithm.wrong_selector={self.wrong_selector!r} is unknown; "
                f"use one of {WRONG_SELECTORS}"
            )
        if self.weighting not in WEIGHTINGS:
            raise ValueError(
                f"algorithm.weighting={self.weighting!r} is unknown; use one of {WEIGHTINGS}"
            )
        if self.fixed_weight < 0:
            raise ValueError(f"algorithm.fixed_weight={self.fixed_weight} must be >= 0")
        if self.max_len < 1:
            raise ValueError(f"algorithm.max_len={self.max_len} must be >= 1 (L_max, default 256)")
        if self.frontier_scale < 0 or self.kl_clip <= 0:
            raise ValueError(
                f"algorithm.frontier_scale={self.frontier_scale} must be >= 0 and "
                f"algorithm.kl_clip={self.kl_clip} > 0"
            )

    def init_state(self, seed: int) -> base.HostState:
        """Stateless."""
        return base.HostState()

    def before_training(self, state: base.HostState, sample_all: base.SampleAll) -> base.HostState:
        """Nothing to prepare."""
        return state

    def step_switches(self) -> dict[str, Any]:
        """Surrogate + SSOPD term against the fixed initial teacher."""
        return dict(
            use_distillation=False,
            use_surrogate=True,
            use_ssopd=True,
            use_rhythm=False,
            teacher_mode="fixed",
            ssopd_clip=self.kl_clip,
        )

    def pair(self, group: base.Group) -> tuple[int, int] | None:
        """(index of y⁺, index of y⁻) or None when C or W is empty, METHODS §6.

        "logp" selectors rank by the MEAN sampled-token log-prob (length-normalised, so they
        do not duplicate the length selectors); ties go to the earliest rollout.
        """
        rollouts = group.rollouts
        return reprompt.select_ssopd_pair(
            [r.reward for r in rollouts],
            [r.length for r in rollouts],
            [r.mean_logprob for r in rollouts],
            correct_side=self.correct_selector,
            wrong_side=self.wrong_selector,
            success_threshold=self.success_threshold,
        )

    def pair_weights(self, pass_rates: np.ndarray) -> np.ndarray:
        """ω_i per group: frontier weights λ p̂ (1 − p̂), or the fixed coefficient (ablation)."""
        if self.weighting == "fixed":
            return np.full(len(pass_rates), float(self.fixed_weight))
        return np.asarray(
            weights_lib.frontier_weights(pass_rates, scale=self.frontier_scale), np.float64
        )

    def plan(
        self, groups: Sequence[base.Group], state: base.HostState, *, epoch: int
    ) -> tuple[list[base.RolloutPlan], base.HostState, dict[str, float]]:
        """GRPO on every rollout; y⁻ also carries ω_i, L and the privileged teacher chat."""
        base.check_epoch(epoch)
        plans = grpo.grpo_plans(groups, normalize=self.normalize, eps=self.eps)
        p = common.pass_rates(groups, self.success_threshold)
        omega = self.pair_weights(p)
        offset, lengths = 0, []
        for i, group in enumerate(groups):
            pair = self.pair(group)
            if pair is not None:
                pos, neg = pair
                y_neg = group.rollouts[neg]
                length = min(y_neg.length, self.max_len)
                lengths.append(length)
                plan = plans[offset + neg]
                plans[offset + neg] = dataclasses.replace(
                    plan,
                    teacher_messages=reprompt.build_privileged_context(
                        y_neg.prompt,
                        group.rollouts[pos].response,
                        keep_thinking=self.keep_thinking,
                    ),
                    weights=dataclasses.replace(
                        plan.weights, ssopd_weight=float(omega[i]), ssopd_len=length
                    ),
                    route=base.ROUTE_PG_SSOPD,
                    teacher_source=base.SOURCE_PRIVILEGED,
                )
            offset += len(group)
        metrics = common.plan_metrics(plans, groups, self.success_threshold)
        metrics["ssopd/num_pairs"] = float(len(lengths))
        metrics["ssopd/mean_len"] = float(np.mean(lengths)) if lengths else 0.0
        return plans, state, metrics
