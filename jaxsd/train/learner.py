"""The learner: the sharded train state, the jitted step and the checkpoints.

`learn(groups, plans, step)` turns one step's verified groups and the algorithm's plans into
the fixed-shape batch (batch contract, jaxsd.train.batch), runs the jitted train step and
refuses a non-finite result before anything of it is published or saved.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from jaxsd import algorithms
from jaxsd import metrics as metrics_lib
from jaxsd.train.batch import (
    LENGTH_BUCKETS,
    TrainBatch,
    TrainSample,
    build_batch,
    global_batch,
    process_rows,
)
from jaxsd.train.checkpoint import Checkpointer
from jaxsd.train.rollout_worker import ChatPrompts
from jaxsd.train.step import STATE_FINITE_PREFIX, StepConfig

# Which config keys most likely make each part of the new state non-finite.
_LIKELY_KEYS = {
    "opt_state": "optim.eps (> 0), optim.b1 / optim.b2 (in [0, 1))",
    "params": "optim.lr, optim.eps, optim.weight_decay",
    "teacher": "loss.teacher_ema",
}


def plans_to_samples(
    prompts: ChatPrompts, groups: Sequence[algorithms.Group], plans: Sequence
) -> list[TrainSample]:
    """Tokenise each plan's teacher chat and attach its loss weights (batch contract)."""
    samples = []
    rollouts = algorithms.flat_rollouts(groups)
    group_size = {g.question_id: len(g) for g in groups}
    prompt_cache: dict[str, list[int]] = {}
    for rollout, plan in zip(rollouts, plans, strict=True):
        if rollout.question_id not in prompt_cache:
            prompt_cache[rollout.question_id] = prompts.student(rollout.prompt)
        teacher_ids = None
        if plan.teacher_messages is not None:
            teacher_ids = prompts.teacher(plan.teacher_messages)
        samples.append(
            TrainSample(
                prompt_ids=prompt_cache[rollout.question_id],
                response_ids=list(rollout.response_ids),
                old_logp=np.asarray(rollout.logprobs, np.float32),
                teacher_prompt_ids=teacher_ids,
                weights=plan.weights,
                group_size=group_size[rollout.question_id],
            )
        )
    return samples


@dataclasses.dataclass
class Learner:
    """Owns the train state; `learn` is one optimizer step, `save`/`restore` its checkpoints."""

    state: Any
    graphdef: Any
    state_shardings: Any
    batch_shardings: TrainBatch
    train_step: Callable
    step_cfg: StepConfig
    mesh: jax.sharding.Mesh
    prompts: ChatPrompts
    pad_id: int
    vocab_size: int  # the model's; build_batch rejects token ids outside it
    teacher_forward: Callable | None = None  # profile_teacher_forward: a lone teacher forward

    def learn(self, groups: Sequence, plans: Sequence, step: int) -> dict[str, Any]:
        """Optimizer step `step` + 1 on these plans; returns its metrics."""
        samples, lengths = process_rows(plans_to_samples(self.prompts, groups, plans))
        local = build_batch(
            samples, pad_id=self.pad_id, length_buckets=LENGTH_BUCKETS,
            vocab_size=self.vocab_size, lengths=lengths,
        )  # fmt: skip
        batch = global_batch(local, self.batch_shardings)
        stats: dict[str, Any] = {}
        if self.teacher_forward is not None:
            stats["time/teacher_forward_s"] = self._time_teacher_forward(batch)
        t_train = time.perf_counter()
        self.state, step_metrics = self.train_step(self.state, batch)
        reduced = metrics_lib.reduce_metric_pairs(jax.device_get(step_metrics))
        train_s = time.perf_counter() - t_train
        state_flags = _pop_state_flags(reduced)
        check_finite(step + 1, reduced)
        check_state_finite(step + 1, state_flags, reduced)
        response_tokens = int(np.sum(local.response_mask))
        stats.update(reduced)
        stats["time/train_s"] = train_s
        stats[metrics_lib.TOKENS_PER_S] = response_tokens / max(train_s, 1e-9)
        stats["perf/batch_shape"] = list(local.student_tokens.shape) + [
            local.response_tokens.shape[1]
        ]
        return stats

    def _time_teacher_forward(self, batch: Any) -> float:
        """Seconds of the teacher's forward alone on this step's batch (an extra pass; the train
        step's own copy of it is fused and cannot be timed apart)."""
        state = self.state
        teacher = state.params if state.teacher is None else state.teacher
        t0 = time.perf_counter()
        jax.block_until_ready(self.teacher_forward(teacher, state.frozen, batch))
        return time.perf_counter() - t0

    def restore(self, checkpointer: Checkpointer, step: int | None) -> tuple[int, dict]:
        """Load checkpoint `step` (None: the latest intact one); returns it and its host state."""
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), self.state
        )
        self.state, host, restored = checkpointer.restore(step, abstract_train_state=abstract)
        if host.get("step") != restored:
            raise ValueError(
                f"checkpoint {restored} says step {host.get('step')}; it is inconsistent"
            )
        return restored, host


def check_finite(step: int, reduced: dict[str, float]) -> None:
    """Stop before a step with non-finite metrics is published or saved."""
    bad = {k: v for k, v in reduced.items() if not math.isfinite(v)}
    if bad:
        finite = {k: v for k, v in reduced.items() if math.isfinite(v)}
        raise FloatingPointError(
            f"non-finite metrics at step {step}: {bad}; finite ones: {finite}. Nothing of "
            f"step {step} was published or saved: the last checkpoint holds the last good "
            "state. Lower optim.lr or check the data, then rerun with --config.resume=True "
            "(or --config.resume_step=N for an earlier checkpoint)."
        )


def _pop_state_flags(reduced: dict[str, float]) -> dict[str, float]:
    """Take the step's `state_finite/<part>` flags out of the metrics (they are not logged)."""
    keys = [k for k in reduced if k.startswith(STATE_FINITE_PREFIX)]
    return {k.removeprefix(STATE_FINITE_PREFIX): reduced.pop(k) for k in keys}


def check_state_finite(step: int, flags: dict[str, float], reduced: dict[str, float]) -> None:
    """Stop before a state with NaN/inf params or optimizer moments is published or saved."""
    bad = [part for part, ok in flags.items() if ok != 1.0]
    if bad:
        keys = "; ".join(_LIKELY_KEYS[p] for p in bad)
        raise FloatingPointError(
            f"the update of step {step} made {', '.join(bad)} non-finite although the loss "
            f"({reduced.get('loss')}) and gradients (grad_norm {reduced.get('grad_norm')}) "
            f"were finite; nothing of step {step} was published or saved. Likely keys: {keys}. "
            "Fix them and rerun with --config.resume=True (the last checkpoint is good), or "
            "--config.resume_step=N to go back further."
        )
