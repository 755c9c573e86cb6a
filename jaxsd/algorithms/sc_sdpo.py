"""SC-SDPO (METHODS §5): SDPO with batch-adaptive question weights `[p̂(1−p̂)]^a`."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from jaxsd.algorithms import base, common, sdpo
from jaxsd.losses import weights as weights_lib


@dataclasses.dataclass(frozen=True)
class SCSDPO(sdpo.SDPO):
    """Self-calibrated SDPO; `exponent` 0.5 (default) or 1 (variance weighting)."""

    exponent: float = 0.5
    name: str = "sc_sdpo"

    def __post_init__(self) -> None:
        if self.exponent < 0:
            raise ValueError(f"algorithm.exponent={self.exponent} must be >= 0 (paper: 0.5 or 1)")

    def batch_weights(self, groups: Sequence[base.Group], state: base.HostState) -> np.ndarray:
        """`[p̂(1−p̂)]^a` normalised to mean 1 over this batch's 0 < p̂ < 1, §5.

        The train step's distillation normaliser counts only rows with a weight ≠ 0, so the
        unit mean over Q⁺ sets the loss scale whatever the share of p̂ ∈ {0, 1} questions
        (docs/METHODS.md §5).
        """
        p = common.pass_rates(groups, self.success_threshold)
        return np.asarray(weights_lib.pass_rate_weights(p, exponent=self.exponent), np.float64)
