"""Hard-filter baseline (METHODS §5): SDPO only on questions with 0 < p̂ < 1."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from jaxsd.algorithms import base, common, sdpo
from jaxsd.losses import weights as weights_lib


@dataclasses.dataclass(frozen=True)
class HardFilter(sdpo.SDPO):
    """`w_i = 1[0 < p̂_i < 1]` times SDPO's sd_mask."""

    name: str = "hard_filter"

    def batch_weights(self, groups: Sequence[base.Group], state: base.HostState) -> np.ndarray:
        """The 0/1 filter of this batch's pass rates, METHODS §5."""
        p = common.pass_rates(groups, self.success_threshold)
        return np.asarray(weights_lib.hard_filter_weights(p), np.float64)
