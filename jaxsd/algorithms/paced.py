"""PACED baseline (METHODS §5): SDPO weighted by `[p⁰(1−p⁰)]^1` from frozen offline rates.

Before training, one offline rollout pass over the training questions gives `p⁰_i`
(`estimate_pass_rates`); `freeze_pass_rates` stores them in the host state, where they never
change again. Weights are normalised globally: mean 1 over the dataset's 0 < p⁰ < 1.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from jaxsd.algorithms import base, common, sdpo
from jaxsd.losses import weights as weights_lib


def estimate_pass_rates(
    groups: Sequence[base.Group], *, success_threshold: float = 0.5
) -> dict[str, float]:
    """Offline pass rates `p⁰_i`, pooling every rollout of a question across groups."""
    successes: dict[str, int] = {}
    totals: dict[str, int] = {}
    for group in groups:
        q = group.question_id
        successes[q] = successes.get(q, 0) + sum(
            common.is_success(r, success_threshold) for r in group.rollouts
        )
        totals[q] = totals.get(q, 0) + len(group)
    return {q: successes[q] / totals[q] for q in totals}


@dataclasses.dataclass(frozen=True)
class PacedState(base.HostState):
    """PACED's memory: the offline pass rates p⁰ of every training question, frozen (§5)."""

    frozen_pass_rates: Mapping[str, float] = dataclasses.field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        return {"frozen_pass_rates": dict(self.frozen_pass_rates)}

    @classmethod
    def from_record(cls, raw: Mapping[str, Any]) -> PacedState:
        return cls({str(q): float(v) for q, v in raw["frozen_pass_rates"].items()})


def freeze_pass_rates(state: PacedState, pass_rates: Mapping[str, float]) -> PacedState:
    """The state with PACED's frozen rates set (once, before the first step)."""
    if not isinstance(state, PacedState):
        raise TypeError(
            f"PACED keeps its rates in a PacedState (PACED.init_state), not a "
            f"{type(state).__name__}"
        )
    if not pass_rates:
        raise ValueError("PACED needs at least one offline pass rate; run estimate_pass_rates")
    for q, p in pass_rates.items():
        if not (math.isfinite(p) and 0.0 <= p <= 1.0):
            raise ValueError(f"frozen pass rate of question {q!r} is {p}; it must lie in [0, 1]")
    return dataclasses.replace(
        state, frozen_pass_rates={str(q): float(p) for q, p in pass_rates.items()}
    )


@dataclasses.dataclass(frozen=True)
class PACED(sdpo.SDPO):
    """SDPO with PACED's frozen, globally normalised question weights.

    `init_state` is an empty `PacedState`; `before_training` runs the offline pass and
    freezes its rates.
    """

    exponent: float = 1.0
    name: str = "paced"
    state_type: ClassVar[type[base.HostState]] = PacedState

    def before_training(self, state: PacedState, sample_all: base.SampleAll) -> PacedState:
        """METHODS §5: pass rates of every training question, estimated once, frozen."""
        rates = estimate_pass_rates(sample_all(), success_threshold=self.success_threshold)
        print(f"[jaxsd] PACED offline pass: {len(rates)} questions, mean pass rate "
              f"{np.mean(list(rates.values())):.3f}", flush=True)  # fmt: skip
        return freeze_pass_rates(state, rates)

    def question_weights(self, state: base.HostState) -> dict[str, float]:
        """`w_i` for every question of the dataset (global normalisation), METHODS §5."""
        if not isinstance(state, PacedState) or not state.frozen_pass_rates:
            raise ValueError(
                "PACED has no frozen pass rates; run the offline pass "
                "(paced.estimate_pass_rates) and paced.freeze_pass_rates before training"
            )
        ids = sorted(state.frozen_pass_rates)
        p0 = np.asarray([state.frozen_pass_rates[q] for q in ids], np.float64)
        w = np.asarray(weights_lib.paced_weights(p0, exponent=self.exponent), np.float64)
        return dict(zip(ids, w.tolist(), strict=True))

    def batch_weights(self, groups: Sequence[base.Group], state: base.HostState) -> np.ndarray:
        """This batch's rows of the frozen table; the state is never changed."""
        table = self.question_weights(state)
        missing = [g.question_id for g in groups if g.question_id not in table]
        if missing:
            raise ValueError(
                f"questions {missing[:5]} have no frozen PACED pass rate; the offline pass must "
                "cover every training question"
            )
        return np.asarray([table[g.question_id] for g in groups], np.float64)
