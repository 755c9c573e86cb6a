"""jaxsd.algorithms: verified rollouts -> per-rollout plans of the train batch (host side).

`get_algorithm("drift", warmup_steps=5)` builds a method by name; every method follows the
`Algorithm` protocol of `base`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from jaxsd.algorithms.base import (
    Algorithm,
    Group,
    HostState,
    LossWeights,
    Rollout,
    RolloutPlan,
    flat_rollouts,
    group_rollouts,
    groups_from_json,
    groups_to_json,
)
from jaxsd.algorithms.drift import DRIFT, BufferEntry, DriftState
from jaxsd.algorithms.grpo import GRPO
from jaxsd.algorithms.hard_filter import HardFilter
from jaxsd.algorithms.paced import PACED, PacedState
from jaxsd.algorithms.sc_sdpo import SCSDPO
from jaxsd.algorithms.sdpo import SDPO
from jaxsd.algorithms.srpo import SRPO
from jaxsd.algorithms.ssopd import SSOPD

REGISTRY: dict[str, type] = {
    "sdpo": SDPO,
    "sc_sdpo": SCSDPO,
    "grpo": GRPO,
    "paced": PACED,
    "hard_filter": HardFilter,
    "srpo": SRPO,
    "ssopd": SSOPD,
    "drift": DRIFT,
}


def hparam_names(name: str) -> tuple[str, ...]:
    """The hyper-parameters `get_algorithm(name, ...)` accepts."""
    if name not in REGISTRY:
        raise ValueError(f"algorithm.name={name!r} is unknown; use one of {sorted(REGISTRY)}")
    return tuple(f.name for f in dataclasses.fields(REGISTRY[name]) if f.name != "name")


def get_algorithm(name: str, **hparams: Any) -> Algorithm:
    """Build the method `name` with its hyper-parameters (METHODS defaults for the rest)."""
    allowed = hparam_names(name)
    unknown = sorted(set(hparams) - set(allowed))
    if unknown:
        raise ValueError(
            f"algorithm.{unknown[0]} is not a hyper-parameter of {name!r}; it takes {allowed}"
        )
    return REGISTRY[name](**hparams)


def from_config(algorithm_cfg: Mapping[str, Any]) -> Algorithm:
    """`get_algorithm(cfg.algorithm.name, **rest of cfg.algorithm)`."""
    cfg = dict(algorithm_cfg)
    return get_algorithm(cfg.pop("name"), **cfg)


__all__ = [
    "Algorithm",
    "BufferEntry",
    "DriftState",
    "Group",
    "HostState",
    "LossWeights",
    "PacedState",
    "REGISTRY",
    "Rollout",
    "RolloutPlan",
    "flat_rollouts",
    "from_config",
    "get_algorithm",
    "group_rollouts",
    "groups_from_json",
    "groups_to_json",
    "hparam_names",
]
