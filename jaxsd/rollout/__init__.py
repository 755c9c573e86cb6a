"""Rollout engines (embedded JAX sampler, vLLM worker process) and the Orbax weight exchange.

`JaxEngine` is imported lazily: the vLLM worker process imports this package for its weight
loader and should not pay for the JAX model code.
"""

from jaxsd.rollout.engine import (
    RolloutEngine,
    RolloutResult,
    RolloutTimeoutError,
    RolloutWorkerError,
    SamplingConfig,
    StaleWeightsError,
    WeightLoadError,
    WorkerCrashedError,
    WorkerStartupError,
    check_weights_step,
)
from jaxsd.rollout.sync import SyncConfig, WeightSync
from jaxsd.rollout.vllm_engine import PendingRollout, VllmEngine, VllmWorkerConfig
from jaxsd.rollout.weights import (
    CheckpointRestoreError,
    latest_step,
    publish_weights,
    published_steps,
    restore_weights,
)

__all__ = [
    "CheckpointRestoreError",
    "JaxEngine",
    "PendingRollout",
    "RolloutEngine",
    "RolloutResult",
    "RolloutTimeoutError",
    "RolloutWorkerError",
    "SamplingConfig",
    "StaleWeightsError",
    "SyncConfig",
    "VllmEngine",
    "VllmWorkerConfig",
    "WeightLoadError",
    "WeightSync",
    "WorkerCrashedError",
    "WorkerStartupError",
    "check_weights_step",
    "latest_step",
    "publish_weights",
    "published_steps",
    "restore_weights",
]


def __getattr__(name: str):
    if name == "JaxEngine":
        from jaxsd.rollout.jax_engine import JaxEngine

        return JaxEngine
    raise AttributeError(f"module 'jaxsd.rollout' has no attribute {name!r}")
