"""The rollout engine protocol: token ids in, sampled tokens + behaviour log-probs out.

Two engines implement it: `JaxEngine` (the embedded JAX sampler, in-process) and
`VllmEngine` (a separate vLLM worker process). Both return the same `RolloutResult`, with
samples prompt-major (the n samples of prompt 0 first) and the weights step that produced
them, so the trainer can check on-policyness (how stale the weights that sampled it are).

Log-probs are the behaviour log-probs the train step's `old_logp` needs (METHODS §4):
log_softmax(raw model logits)[token] at temperature 1, before top-k/top-p filtering.
vLLM's default `logprobs_mode="raw_logprobs"` and the JAX sampler both return exactly this.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np

FINISH_REASONS = ("stop", "length")


class RolloutWorkerError(RuntimeError):
    """A rollout worker process failed; the message names the worker and the fix."""


class WorkerStartupError(RolloutWorkerError):
    """The worker did not become ready within its start-up timeout."""


class WorkerCrashedError(RolloutWorkerError):
    """The worker process exited; the message holds its exit status and last log lines."""


class RolloutTimeoutError(RolloutWorkerError):
    """A request got no answer within its timeout; the worker was stopped."""


class WeightLoadError(RolloutWorkerError):
    """Loading a published weights step failed; the engine still serves its previous step."""


class StaleWeightsError(RuntimeError):
    """A rollout was generated with weights older than the configured staleness allows."""


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to sample. temperature 0 = greedy; top_k 0, top_p 1 and min_p 0 = no filtering.

    Generation stops at `max_new_tokens` or right after a token in `stop_token_ids` (that
    token is kept as the last one). The model's EOS is *not* implied: pass it here.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    max_new_tokens: int = 256
    stop_token_ids: tuple[int, ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        if not self.temperature >= 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1] (1 = off)")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0 (0 = off)")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p={self.min_p} must be in [0, 1] (0 = off)")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 1")
        if any(t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids={self.stop_token_ids} must be token ids >= 0")


@dataclasses.dataclass(frozen=True)
class RolloutResult:
    """Samples of one `generate` call, prompt-major; sample s answers prompt `prompt_index[s]`.

    token_ids[s]: int32 [L_s] generated tokens (a stop token, when hit, is the last one).
    logprobs[s]: float32 [L_s] behaviour log-probs of those tokens (see module docstring).
    finish_reasons[s]: "stop" | "length".
    weights_step: the published trainer step whose weights produced every sample.
    """

    token_ids: list[np.ndarray]
    logprobs: list[np.ndarray]
    finish_reasons: list[str]
    prompt_index: list[int]
    weights_step: int

    def __post_init__(self) -> None:
        sizes = {len(self.token_ids), len(self.logprobs), len(self.finish_reasons)}
        if sizes != {len(self.prompt_index)}:
            raise ValueError(
                f"RolloutResult fields disagree on the number of samples: token_ids "
                f"{len(self.token_ids)}, logprobs {len(self.logprobs)}, finish_reasons "
                f"{len(self.finish_reasons)}, prompt_index {len(self.prompt_index)}"
            )
        for s, (tok, lp) in enumerate(zip(self.token_ids, self.logprobs, strict=True)):
            if tok.shape != lp.shape:
                raise ValueError(f"sample {s}: token_ids {tok.shape} != logprobs {lp.shape}")
        bad = sorted(set(self.finish_reasons) - set(FINISH_REASONS))
        if bad:
            raise ValueError(f"unknown finish reasons {bad}; expected one of {FINISH_REASONS}")


@runtime_checkable
class RolloutEngine(Protocol):
    """What the trainer needs from a rollout engine."""

    @property
    def weights_step(self) -> int:
        """The published trainer step whose weights the engine serves now."""
        ...

    @property
    def follow_latest(self) -> bool:
        """Whether the engine loads newer published steps by itself (else the trainer asks)."""
        ...

    def generate(
        self, prompt_token_ids: Sequence[Sequence[int]], n: int, sampling: SamplingConfig
    ) -> RolloutResult:
        """n samples for each prompt, prompt-major."""
        ...

    def load_weights(self, step: int) -> int:
        """Serve the weights published at `step`; returns the step now served."""
        ...

    def close(self) -> None:
        """Release the engine's resources (a worker process, device memory)."""
        ...


def validate_prompts(prompt_token_ids: Sequence[Sequence[int]], n: int) -> list[list[int]]:
    """Prompts as plain int lists; errors name the bad prompt."""
    if n < 1:
        raise ValueError(f"n={n} must be >= 1 (samples per prompt)")
    if len(prompt_token_ids) == 0:
        raise ValueError("prompt_token_ids is empty; pass at least one prompt (token id list)")
    prompts = []
    for i, prompt in enumerate(prompt_token_ids):
        ids = [int(t) for t in prompt]
        if not ids:
            raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
        if min(ids) < 0:
            raise ValueError(f"prompt {i} has negative token ids {[t for t in ids if t < 0][:5]}")
        prompts.append(ids)
    return prompts


def check_weights_step(result: RolloutResult, *, trainer_step: int, max_staleness: int) -> int:
    """Staleness = trainer_step - result.weights_step; raises when outside [0, max_staleness]."""
    staleness = trainer_step - result.weights_step
    if staleness < 0:
        raise StaleWeightsError(
            f"rollout used weights step {result.weights_step}, newer than the trainer's step "
            f"{trainer_step}; the weights folder holds steps from another run - use a fresh "
            "weights_dir per run"
        )
    if staleness > max_staleness:
        raise StaleWeightsError(
            f"rollout used weights step {result.weights_step} at trainer step {trainer_step} "
            f"(staleness {staleness} > max_staleness {max_staleness}); publish more often or "
            "wait for the engine to acknowledge the new step before the next rollout"
        )
    return staleness
