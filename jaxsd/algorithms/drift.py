"""DRIFT (METHODS §7): SDPO warm-up, then negatives -> SDPO and positives -> rhythm GRPO.

Host-side pieces: sib⁺ selection (warm-up "reward first, entropy second"; stage 2 "max
reward, ties -> shortest"), the per-question success buffer with its uniform fallback draw,
and EMA difficulty routing (γ_i, β_i). The rhythm gate itself runs in the train step.

Choices the paper leaves open (documented here, kept configurable where it matters):
- sib⁺ is always ANOTHER successful rollout (SDPO's dont_reprompt_on_self_success); DRIFT's
  teacher context is the solution only (no feedback): "no sib⁺ -> no loss".
- The buffer fallback (group without success, epoch ≥ buffer_warmup_epochs) is a stage-2
  rule; warm-up rollouts without a successful sibling get no loss.
- EMA pass rates are updated on every visit, warm-up included; routing uses the updated r.
- A positive rollout carries the sib⁺ teacher chat only when its rhythm gate is on
  (β_i = 1, medium question, a sibling success exists); otherwise β_i is 0 and no teacher.
  That teacher row only feeds the gate (sd_weight 0): the train step leaves it out of the
  SDPO branch's token mean, which counts distilled tokens only (Eq. 4).
- Successes of both stages enter the buffer after the step's plans are made.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from jaxsd.algorithms import base, common
from jaxsd.losses import weights as weights_lib


@dataclasses.dataclass(frozen=True)
class BufferEntry:
    """One success-buffer entry (METHODS §7): a successful response and its reward."""

    response: str
    reward: float


@dataclasses.dataclass(frozen=True)
class DriftState(base.HostState):
    """DRIFT's memory: `ema_pass_rates` (routing), `success_buffer`, `rng_state` (numpy PCG64
    state of the buffer draws) and `num_plans` (steps planned so far; the warm-up counter)."""

    ema_pass_rates: Mapping[str, float] = dataclasses.field(default_factory=dict)
    success_buffer: Mapping[str, tuple[BufferEntry, ...]] = dataclasses.field(default_factory=dict)
    rng_state: Mapping[str, Any] | None = None
    num_plans: int = 0

    def record(self) -> dict[str, Any]:
        """JSON values; the RNG state as integers."""
        return {
            "ema_pass_rates": dict(self.ema_pass_rates),
            "success_buffer": {
                q: [[e.response, e.reward] for e in entries]
                for q, entries in self.success_buffer.items()
            },
            "rng_state": self.rng_state,
            "num_plans": self.num_plans,
        }

    @classmethod
    def from_record(cls, raw: Mapping[str, Any]) -> DriftState:
        return cls(
            ema_pass_rates={str(q): float(v) for q, v in raw["ema_pass_rates"].items()},
            success_buffer={
                str(q): tuple(BufferEntry(str(resp), float(rew)) for resp, rew in entries)
                for q, entries in raw["success_buffer"].items()
            },
            rng_state=raw["rng_state"],
            num_plans=int(raw["num_plans"]),
        )


def ema_update(past: float | None, now: float, alpha: float) -> float:
    """`r ← α r_past + (1−α) r_now`; the first visit takes `r_now`, METHODS §7."""
    return now if past is None else alpha * past + (1.0 - alpha) * now


def buffer_add(
    entries: tuple[BufferEntry, ...], entry: BufferEntry, capacity: int
) -> tuple[BufferEntry, ...]:
    """Add when not full; when full replace the lowest reward only if strictly higher, §7."""
    if len(entries) < capacity:
        return (*entries, entry)
    lowest = min(range(len(entries)), key=lambda k: (entries[k].reward, k))
    if entry.reward > entries[lowest].reward:
        return (*entries[:lowest], entry, *entries[lowest + 1 :])
    return entries


def warmup_sibling(
    group: base.Group, index: int, *, threshold: float, delta: float
) -> base.Rollout | None:
    """Warm-up sib⁺: among other successes with reward in [r_max − δ, r_max], max entropy."""
    others = [
        r for j, r in enumerate(group.rollouts) if j != index and common.is_success(r, threshold)
    ]
    if not others:
        return None
    r_max = max(r.reward for r in others)
    window = [r for r in others if r.reward >= r_max - delta]
    missing = [r for r in window if r.entropy is None]
    if missing:
        raise ValueError(
            f"DRIFT warm-up needs each rollout's mean token entropy (question "
            f"{group.question_id!r} has a rollout with entropy=None); have the rollout engine "
            "report Rollout.entropy"
        )
    return max(window, key=lambda r: r.entropy)  # max() keeps the first of equal keys


def stage2_sibling(group: base.Group, index: int, *, threshold: float) -> base.Rollout | None:
    """Stage-2 sib⁺: the other success with max reward, ties -> shortest, then first."""
    return next((r for j, r in _ranked_successes(group, threshold) if j != index), None)


def _ranked_successes(group: base.Group, threshold: float) -> list[tuple[int, base.Rollout]]:
    """Successes ordered by (max reward, shortest, first); the head is everyone's sib⁺."""
    ok = [(j, r) for j, r in enumerate(group.rollouts) if common.is_success(r, threshold)]
    return sorted(ok, key=lambda jr: (-jr[1].reward, jr[1].length, jr[0]))


@dataclasses.dataclass(frozen=True)
class DRIFT:
    """DRIFT with our defaults (METHODS §7)."""

    warmup_steps: int = 10
    delta: float = 0.1  # δ, warm-up reward window
    theta_r: float = 0.5  # θ_r, negative iff reward < θ_r
    ema_alpha: float = 0.7
    easy_above: float = 0.8
    hard_below: float = 0.2
    easy_gamma: float = 0.5
    hard_gamma: float = 0.0
    medium_gamma: float = 1.0
    # False: the paper's "w/o difficulty routing" ablation, every question is routed as medium
    # (γ = medium_gamma, rhythm gate on), whatever its EMA pass rate.
    difficulty_routing: bool = True
    buffer_size: int = 3
    buffer_warmup_epochs: int = 1  # k: buffer fallback from epoch k on (epochs count from 0)
    normalize: bool = True
    eps: float = 1e-6
    success_threshold: float = 0.5
    # Rhythm gate (train step), METHODS §7 defaults.
    rhythm_mu: float = 0.1
    rhythm_tau: float = 1.0
    rhythm_b_max: float = 2.0
    rhythm_window: int = 8
    rhythm_alpha_anc: float = 2.0
    rhythm_lambda_struct: float = 1.0
    rhythm_m_min: float = 0.5
    rhythm_m_max: float = 2.0
    name: str = "drift"
    state_type: ClassVar[type[base.HostState]] = DriftState

    def __post_init__(self) -> None:
        checks = {
            "warmup_steps": self.warmup_steps >= 0,
            "delta": self.delta >= 0,
            "ema_alpha": 0.0 <= self.ema_alpha <= 1.0,
            "buffer_size": self.buffer_size >= 1,
            "buffer_warmup_epochs": self.buffer_warmup_epochs >= 0,
            "hard_below": 0.0 <= self.hard_below <= self.easy_above <= 1.0,
            "rhythm_m_max": self.rhythm_m_max > 1.0 and self.rhythm_m_min <= 1.0,
            "rhythm_window": self.rhythm_window >= 1,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(
                f"algorithm.{bad[0]}={getattr(self, bad[0])} is out of range for DRIFT (METHODS §7:"
                " warmup_steps, delta >= 0; ema_alpha in [0,1]; buffer_size >= 1; "
                "0 <= hard_below <= easy_above <= 1; m_min <= 1 < m_max; window >= 1)"
            )

    def init_state(self, seed: int) -> DriftState:
        """Empty EMA table and buffer; the buffer-draw RNG seeded from `seed`."""
        return DriftState(rng_state=np.random.PCG64(seed).state)

    def before_training(self, state: base.HostState, sample_all: base.SampleAll) -> base.HostState:
        """Nothing to prepare."""
        return state

    def step_switches(self) -> dict[str, Any]:
        """Distillation + rhythm-gated surrogate, EMA self-teacher, gate hyper-parameters."""
        return dict(
            use_distillation=True,
            use_surrogate=True,
            use_ssopd=False,
            use_rhythm=True,
            teacher_mode="ema",
            rhythm=dict(
                mu=self.rhythm_mu,
                tau=self.rhythm_tau,
                b_max=self.rhythm_b_max,
                window=self.rhythm_window,
                alpha_anc=self.rhythm_alpha_anc,
                lambda_struct=self.rhythm_lambda_struct,
                m_min=self.rhythm_m_min,
                m_max=self.rhythm_m_max,
            ),
        )

    def _routing(self, r: float) -> tuple[float, bool]:
        if not self.difficulty_routing:
            return float(self.medium_gamma), True
        gamma, medium = weights_lib.difficulty_weights(
            np.asarray([r]),
            easy_above=self.easy_above,
            hard_below=self.hard_below,
            easy_gamma=self.easy_gamma,
            hard_gamma=self.hard_gamma,
            medium_gamma=self.medium_gamma,
        )
        return float(gamma[0]), bool(medium[0])

    def _distill(self, rollout: base.Rollout, solution: str, source: str) -> base.RolloutPlan:
        return base.RolloutPlan(
            teacher_messages=common.solution_messages(rollout, solution),
            weights=base.LossWeights(sd_weight=1.0),
            route=base.ROUTE_SD,
            teacher_source=source,
        )

    def _positive(
        self,
        rollout: base.Rollout,
        sib: base.Rollout | None,
        advantage: float,
        routing: tuple[float, bool],
    ) -> base.RolloutPlan:
        """Rhythm-GRPO plan of a positive rollout; the sib⁺ teacher only feeds the gate."""
        gamma, medium = routing
        gate = medium and sib is not None
        return base.RolloutPlan(
            teacher_messages=common.solution_messages(rollout, sib.response) if gate else None,
            weights=base.LossWeights(
                advantage=advantage, pg_weight=gamma, rhythm_beta=1.0 if gate else 0.0
            ),
            route=base.ROUTE_PG if gamma > 0 else base.ROUTE_NONE,
            teacher_source=base.SOURCE_SOLUTION if gate else base.SOURCE_NONE,
        )

    def _warmup_plans(self, group: base.Group) -> list[base.RolloutPlan]:
        """Stage 1: SDPO on every rollout with a warm-up sib⁺, no loss for the others."""
        plans = []
        for j, rollout in enumerate(group.rollouts):
            sib = warmup_sibling(group, j, threshold=self.success_threshold, delta=self.delta)
            plans.append(
                self._distill(rollout, sib.response, base.SOURCE_SOLUTION)
                if sib is not None
                else base.RolloutPlan()
            )
        return plans

    def _stage2_plans(
        self,
        group: base.Group,
        routing: tuple[float, bool],
        buffered: tuple[BufferEntry, ...],
        rng: np.random.Generator,
        epoch: int,
    ) -> tuple[list[base.RolloutPlan], int]:
        """Stage 2: negatives -> SDPO (sib⁺, else a buffer draw), positives -> rhythm GRPO.
        Returns the plans and the number of buffer draws."""
        adv = common.group_advantages(group, normalize=self.normalize, eps=self.eps)
        has_success = any(common.is_success(x, self.success_threshold) for x in group.rollouts)
        use_buffer = not has_success and epoch >= self.buffer_warmup_epochs and bool(buffered)
        plans, hits = [], 0
        for j, rollout in enumerate(group.rollouts):
            sib = stage2_sibling(group, j, threshold=self.success_threshold)
            if rollout.reward >= self.theta_r:
                plans.append(self._positive(rollout, sib, float(adv[j]), routing))
            elif sib is not None:
                plans.append(self._distill(rollout, sib.response, base.SOURCE_SOLUTION))
            elif use_buffer:
                entry = buffered[int(rng.integers(len(buffered)))]
                hits += 1
                plans.append(self._distill(rollout, entry.response, base.SOURCE_BUFFER))
            else:
                plans.append(base.RolloutPlan())
        return plans, hits

    def _buffer_successes(
        self, groups: Sequence[base.Group], buffer: Mapping[str, tuple[BufferEntry, ...]]
    ) -> dict[str, tuple[BufferEntry, ...]]:
        """The success buffer after this step's successes entered it (§7)."""
        buffer = dict(buffer)
        for group in groups:
            for rollout in group.rollouts:
                if common.is_success(rollout, self.success_threshold):
                    entry = BufferEntry(rollout.response, float(rollout.reward))
                    buffer[group.question_id] = buffer_add(
                        buffer.get(group.question_id, ()), entry, self.buffer_size
                    )
        return buffer

    def plan(
        self, groups: Sequence[base.Group], state: DriftState, *, epoch: int
    ) -> tuple[list[base.RolloutPlan], DriftState, dict[str, float]]:
        """Plans of one step; returns the state with updated EMA, buffer, RNG and counter."""
        base.check_epoch(epoch)
        if not isinstance(state, DriftState) or state.rng_state is None:
            raise ValueError(
                f"DRIFT plans with a seeded DriftState, got a {type(state).__name__} without "
                "an RNG state; build it with DRIFT.init_state(seed)"
            )
        rng = np.random.Generator(np.random.PCG64())
        rng.bit_generator.state = dict(state.rng_state)
        warmup = state.num_plans < self.warmup_steps
        ema = dict(state.ema_pass_rates)
        plans: list[base.RolloutPlan] = []
        bins = {"easy": 0, "medium": 0, "hard": 0}
        hits = 0
        for group in groups:
            q = group.question_id
            r = ema_update(
                ema.get(q), common.pass_rate(group, self.success_threshold), self.ema_alpha
            )
            ema[q] = r
            routing = self._routing(r)
            medium = routing[1]
            bins["medium" if medium else ("easy" if r > self.easy_above else "hard")] += 1
            if warmup:
                plans.extend(self._warmup_plans(group))
                continue
            buffered = state.success_buffer.get(q, ())
            group_plans, group_hits = self._stage2_plans(group, routing, buffered, rng, epoch)
            plans.extend(group_plans)
            hits += group_hits
        buffer = self._buffer_successes(groups, state.success_buffer)
        new_state = dataclasses.replace(
            state,
            ema_pass_rates=ema,
            success_buffer=buffer,
            rng_state=rng.bit_generator.state,
            num_plans=state.num_plans + 1,
        )
        metrics = common.plan_metrics(plans, groups, self.success_threshold)
        n_groups = max(len(groups), 1)
        metrics.update(
            {
                "drift/warmup": float(warmup),
                "drift/frac_easy": bins["easy"] / n_groups,
                "drift/frac_medium": bins["medium"] / n_groups,
                "drift/frac_hard": bins["hard"] / n_groups,
                "drift/buffer_hits": float(hits),
                "drift/buffer_questions": float(len(buffer)),
                "drift/buffer_entries": float(sum(len(v) for v in buffer.values())),
            }
        )
        return plans, new_state, metrics
