"""The embedded rollout engine: the JAX sampler on an in-process model (CPU default, tests).

The trainer hands it the current params directly (`set_params`); no checkpoint round trip.
`load_weights(step)` reads a published Orbax step instead, so the same `WeightSync` code
drives both engines.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx

from jaxsd.models import load_hf_state_dict
from jaxsd.models.sampler import DEFAULT_LENGTH_BUCKETS, generate
from jaxsd.rollout.engine import RolloutResult, SamplingConfig, WeightLoadError, validate_prompts
from jaxsd.rollout.weights import CheckpointRestoreError, restore_weights


class JaxEngine:
    """RolloutEngine on `jaxsd.models.sampler.generate`; serves `model`'s current params."""

    def __init__(
        self,
        model: nnx.Module,
        *,
        weights_step: int = 0,
        weights_dir: str | os.PathLike | None = None,
        length_buckets: Sequence[int] | None = DEFAULT_LENGTH_BUCKETS,
        batch_buckets: Sequence[int] | None = None,
        slots: int | None = None,
        kv_dtype: str | None = None,
    ):
        self.model = model
        self.weights_dir = weights_dir
        self._step = weights_step
        self._length_buckets = length_buckets
        self._batch_buckets = batch_buckets
        self._slots = slots  # see sampler.generate: continuous batching, KV-cache dtype
        self._kv_dtype = kv_dtype

    @property
    def weights_step(self) -> int:
        return self._step

    @property
    def follow_latest(self) -> bool:
        """Never: the trainer hands every step over (`set_params` / `load_weights`)."""
        return False

    def set_params(self, params: nnx.State | None, step: int) -> None:
        """Serve `params` (a state of the model's variables) as weights step `step`.

        params=None: the model object is shared with the trainer and already current.
        """
        if params is not None:
            nnx.update(self.model, params)
        self._step = int(step)

    def load_weights(self, step: int) -> int:
        """Serve published step `step` from `weights_dir`; on failure keep the current params."""
        if self.weights_dir is None:
            raise WeightLoadError(
                "JaxEngine has no weights_dir; pass weights_dir=... or use set_params()"
            )
        before = jax.tree.map(lambda x: x, nnx.state(self.model, nnx.Param))
        try:
            load_hf_state_dict(self.model, restore_weights(self.weights_dir, step))
        except (CheckpointRestoreError, ValueError) as e:
            nnx.update(self.model, before)  # load_hf_state_dict may have filled some tensors
            raise WeightLoadError(
                f"embedded engine could not load weights step {step}: {e}; "
                f"it keeps serving step {self._step}"
            ) from e
        self._step = int(step)
        return self._step

    def generate(
        self, prompt_token_ids: Sequence[Sequence[int]], n: int, sampling: SamplingConfig
    ) -> RolloutResult:
        """n samples per prompt, prompt-major, with the model's current params."""
        prompts = validate_prompts(prompt_token_ids, n)
        out = generate(
            self.model,
            prompts,
            n=n,
            max_new_tokens=sampling.max_new_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            min_p=sampling.min_p,
            stop_token_ids=sampling.stop_token_ids,
            seed=sampling.seed,
            length_buckets=self._length_buckets,
            batch_buckets=self._batch_buckets,
            slots=self._slots,
            kv_dtype=self._kv_dtype,
        )
        return RolloutResult(
            token_ids=[np.asarray(t, np.int32) for t in out.token_ids],
            logprobs=[np.asarray(lp, np.float32) for lp in out.logprobs],
            finish_reasons=list(out.finish_reasons),
            prompt_index=list(out.prompt_index),
            weights_step=self._step,
        )

    def close(self) -> None:
        """Nothing to release: the model belongs to the caller."""
