"""The train step's batch: host-side assembly (numpy) and the global sharded batch.

One `TrainSample` is one rollout as the step sees it; `build_batch` pads a list of them to
fixed, bucketed shapes (so the jitted step compiles once per bucket). Layout, per sequence b
and response token r:

- student row   = prompt ⊕ response,          right-padded to Ts
- teacher row   = teacher_prompt ⊕ response,  right-padded to Tt (prompt ⊕ response without one)
- `student_index[b, r]` = the student position whose next-token logits predict response
  token r (= len(prompt) + r - 1); `teacher_index` likewise in the teacher row.

Every process of a multi-host run builds only its own rows; `global_batch` turns those
process-local numpy arrays into one global `jax.Array` per field.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Sequence
from typing import NamedTuple

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from jaxsd.algorithms.base import NO_LOSS, LossWeights
from jaxsd.models.sharding import DEFAULT_RULES, Rules
from jaxsd.train.mesh import batch_sharding

# The padded lengths of train batches and of the embedded sampler: 16 ... 32768 tokens. Powers
# of two, so a `length` sharding rule splits them evenly when it splits 16.
LENGTH_BUCKETS = tuple(2**i for i in range(4, 16))

__all__ = [
    "TrainBatch",
    "TrainSample",
    "batch_lengths",
    "batch_shardings",
    "build_batch",
    "global_batch",
    "global_batch_lengths",
    "pick_bucket",
]


@dataclasses.dataclass(frozen=True)
class TrainSample:
    """One rollout with the loss weights its algorithm's plan set (batch contract)."""

    prompt_ids: Sequence[int]
    response_ids: Sequence[int]
    old_logp: np.ndarray  # [len(response_ids)] rollout engine's sampled-token log-probs
    teacher_prompt_ids: Sequence[int] | None = None  # reprompt; None -> sd_mask 0
    weights: LossWeights = NO_LOSS  # the plan's advantage and per-term weights
    group_size: int = 1  # G of the rollout's question: the batch holds Σ 1/G = Q prompts


class TrainBatch(NamedTuple):
    """Fixed-shape arrays of one step (numpy on the host, jax.Array on device)."""

    student_tokens: np.ndarray  # [B, Ts] int32
    student_positions: np.ndarray  # [B, Ts] int32
    student_mask: np.ndarray  # [B, Ts] int32, 1 = real token
    teacher_tokens: np.ndarray  # [B, Tt] int32
    teacher_positions: np.ndarray  # [B, Tt] int32
    teacher_mask: np.ndarray  # [B, Tt] int32
    student_index: np.ndarray  # [B, R] int32
    teacher_index: np.ndarray  # [B, R] int32
    response_tokens: np.ndarray  # [B, R] int32
    response_mask: np.ndarray  # [B, R] float32
    old_logp: np.ndarray  # [B, R] float32
    ssopd_mask: np.ndarray  # [B, R] float32
    advantage: np.ndarray  # [B] float32
    pg_weight: np.ndarray  # [B] float32
    sd_weight: np.ndarray  # [B] float32
    sd_mask: np.ndarray  # [B] float32
    ssopd_weight: np.ndarray  # [B] float32
    rhythm_beta: np.ndarray  # [B] float32
    prompt_share: np.ndarray  # [B] float32, 1/G of the row's question (0 = padding row)


_PER_SEQUENCE = (
    "advantage",
    "pg_weight",
    "sd_weight",
    "sd_mask",
    "ssopd_weight",
    "rhythm_beta",
    "prompt_share",
)


def pick_bucket(length: int, buckets: Sequence[int], *, what: str) -> int:
    """Smallest bucket >= length; a clear error when none is long enough."""
    ordered = sorted(buckets)
    i = bisect.bisect_left(ordered, length)
    if i == len(ordered):
        raise ValueError(
            f"{what} length {length} exceeds the largest length bucket {ordered[-1]}; "
            f"add a larger bucket to length_buckets={tuple(ordered)} or truncate the rollout"
        )
    return ordered[i]


def _check_token_ids(ids: Sequence[int], what: str, i: int, vocab_size: int | None) -> None:
    """Ids >= V embed as NaN (jnp.take fills), negative ones wrap to the vocabulary's end:
    either poisons the step without an error, so the batch refuses them."""
    arr = np.asarray(ids)
    if arr.size == 0:
        return
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"sample {i}: {what} must be integer token ids, got dtype {arr.dtype}")
    low, high = int(arr.min()), int(arr.max())
    if low < 0 or (vocab_size is not None and high >= vocab_size):
        bad = low if low < 0 else high
        limit = "" if vocab_size is None else f", the model's vocabulary is [0, {vocab_size})"
        raise ValueError(
            f"sample {i}: {what} holds token id {bad}{limit}; the tokenizer (or rollout "
            "engine) and the model disagree: use the model's own tokenizer, or resize the "
            "model's embedding to the tokenizer"
        )


def _validate(sample: TrainSample, i: int, vocab_size: int | None = None) -> None:
    for what in ("prompt_ids", "response_ids", "teacher_prompt_ids"):
        ids = getattr(sample, what)
        if ids is not None:
            _check_token_ids(ids, what, i, vocab_size)
    if len(sample.prompt_ids) < 1:
        raise ValueError(f"sample {i}: empty prompt_ids; the first response token needs a context")
    if sample.teacher_prompt_ids is not None and len(sample.teacher_prompt_ids) < 1:
        raise ValueError(f"sample {i}: empty teacher_prompt_ids; pass None for no teacher row")
    old = np.asarray(sample.old_logp)
    if old.shape != (len(sample.response_ids),):
        raise ValueError(
            f"sample {i}: old_logp shape {old.shape} != (len(response_ids),) = "
            f"({len(sample.response_ids)},)"
        )
    if not np.all(np.isfinite(old)):
        raise ValueError(f"sample {i}: old_logp holds NaN/inf; the rollout engine's logprobs")
    numbers = ("advantage", "pg_weight", "sd_weight", "ssopd_weight", "rhythm_beta")
    for name in numbers:
        if not np.isfinite(getattr(sample.weights, name)):
            raise ValueError(f"sample {i}: {name}={getattr(sample.weights, name)} is not finite")
    if sample.weights.ssopd_len < 0:
        raise ValueError(f"sample {i}: ssopd_len={sample.weights.ssopd_len} must be >= 0")
    if not (isinstance(sample.group_size, int | np.integer) and sample.group_size >= 1):
        raise ValueError(
            f"sample {i}: group_size={sample.group_size!r} must be an integer >= 1 (the number "
            "of rollouts of its question in this batch)"
        )


def _teacher_prompt(sample: TrainSample) -> Sequence[int]:
    if sample.teacher_prompt_ids is None:
        return sample.prompt_ids
    return sample.teacher_prompt_ids


def batch_lengths(samples: Sequence[TrainSample]) -> tuple[int, int, int]:
    """Unpadded (student, teacher, response) maxima of the samples."""
    ts = max((len(s.prompt_ids) + len(s.response_ids) for s in samples), default=1)
    tt = max((len(_teacher_prompt(s)) + len(s.response_ids) for s in samples), default=1)
    r = max((len(s.response_ids) for s in samples), default=1)
    return ts, tt, max(r, 1)


def global_batch_lengths(samples: Sequence[TrainSample]) -> tuple[int, int, int]:
    """`batch_lengths` maximised over all processes, so every host picks the same buckets."""
    local = np.asarray(batch_lengths(samples), np.int64)
    if jax.process_count() == 1:
        return tuple(int(x) for x in local)
    gathered = multihost_utils.process_allgather(local)  # [P, 3]
    return tuple(int(x) for x in np.max(gathered, axis=0))


def process_rows(
    samples: Sequence[TrainSample],
) -> tuple[Sequence[TrainSample], tuple[int, int, int] | None]:
    """This process's share of a batch every process built whole, and the whole batch's
    lengths (so all hosts pad alike); (samples, None) on one process.

    Multi-host runs sample the same rollouts on every process (same seed, same weights);
    a digest of the token ids is compared across processes so that a divergence (e.g. a
    non-deterministic engine) stops the run instead of training on mismatched rows.
    """
    n_proc = jax.process_count()
    if n_proc == 1:
        return samples, None
    if len(samples) % n_proc:
        raise ValueError(
            f"{len(samples)} rollouts do not split over {n_proc} processes; make "
            "task.questions_per_step × rollout.n a multiple of the process count"
        )
    digest = np.zeros(2, np.int64)
    for i, s in enumerate(samples):
        ids = np.asarray(list(s.prompt_ids) + list(s.response_ids), np.int64)
        digest += (i + 1, int(np.sum(ids * (np.arange(len(ids)) % 9973 + 1)) % (1 << 40)))
    multihost_utils.assert_equal(
        digest, "processes sampled different rollouts; multi-host runs need a deterministic "
        "rollout engine (rollout.engine='jax') with the same seed on every process"
    )  # fmt: skip
    per = len(samples) // n_proc
    start = jax.process_index() * per
    return samples[start : start + per], batch_lengths(samples)


def build_batch(
    samples: Sequence[TrainSample],
    *,
    pad_id: int,
    length_buckets: Sequence[int],
    batch_size: int | None = None,
    lengths: tuple[int, int, int] | None = None,
    vocab_size: int | None = None,
) -> TrainBatch:
    """Pad rollouts into one fixed-shape `TrainBatch` (batch contract, host side).

    Ts, Tt and R are each the smallest bucket that holds the longest row (or the longest of
    `lengths`, e.g. from `global_batch_lengths`, so all hosts agree). Rows beyond the samples
    (up to `batch_size`) are padding with every mask 0. Token ids must be >= 0, and below
    `vocab_size` when it is given (a ValueError names the sample and the id).
    """
    if not length_buckets:
        raise ValueError("length_buckets is empty; give at least one padded length")
    if pad_id < 0 or (vocab_size is not None and pad_id >= vocab_size):
        allowed = ">= 0" if vocab_size is None else f"in the model's vocabulary [0, {vocab_size})"
        raise ValueError(
            f"pad_id={pad_id} must be {allowed}: padded positions are embedded too, and an "
            "id >= V embeds as NaN; pick a pad id the model knows"
        )
    for i, sample in enumerate(samples):
        _validate(sample, i, vocab_size)
    b = len(samples) if batch_size is None else batch_size
    if b < len(samples) or b < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1 and >= {len(samples)} samples")
    need = batch_lengths(samples) if lengths is None else lengths
    ts = pick_bucket(need[0], length_buckets, what="student sequence")
    tt = pick_bucket(need[1], length_buckets, what="teacher sequence")
    r = pick_bucket(need[2], length_buckets, what="response")

    def zeros(shape, dtype=np.int32):
        return np.zeros(shape, dtype)

    out = {
        "student_tokens": np.full((b, ts), pad_id, np.int32),
        "student_positions": zeros((b, ts)),
        "student_mask": zeros((b, ts)),
        "teacher_tokens": np.full((b, tt), pad_id, np.int32),
        "teacher_positions": zeros((b, tt)),
        "teacher_mask": zeros((b, tt)),
        "student_index": zeros((b, r)),
        "teacher_index": zeros((b, r)),
        "response_tokens": np.full((b, r), pad_id, np.int32),
        "response_mask": zeros((b, r), np.float32),
        "old_logp": zeros((b, r), np.float32),
        "ssopd_mask": zeros((b, r), np.float32),
    }
    for name in _PER_SEQUENCE:
        out[name] = zeros((b,), np.float32)

    for i, s in enumerate(samples):
        resp = np.asarray(s.response_ids, np.int32)
        n = len(resp)
        for side, prompt in (("student", s.prompt_ids), ("teacher", _teacher_prompt(s))):
            row = np.concatenate([np.asarray(prompt, np.int32), resp])
            out[f"{side}_tokens"][i, : len(row)] = row
            out[f"{side}_positions"][i, : len(row)] = np.arange(len(row))
            out[f"{side}_mask"][i, : len(row)] = 1
            # logits at position p predict token p + 1
            out[f"{side}_index"][i, :n] = len(prompt) - 1 + np.arange(n)
        out["response_tokens"][i, :n] = resp
        out["response_mask"][i, :n] = 1.0
        out["old_logp"][i, :n] = np.asarray(s.old_logp, np.float32)
        out["ssopd_mask"][i, : min(s.weights.ssopd_len, n)] = 1.0
        out["advantage"][i] = s.weights.advantage
        out["pg_weight"][i] = s.weights.pg_weight
        out["sd_weight"][i] = s.weights.sd_weight
        out["sd_mask"][i] = float(s.teacher_prompt_ids is not None)
        out["ssopd_weight"][i] = s.weights.ssopd_weight
        out["rhythm_beta"][i] = s.weights.rhythm_beta
        out["prompt_share"][i] = 1.0 / s.group_size
    return TrainBatch(**out)


def batch_shardings(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> TrainBatch:
    """One sharding per field, from the `batch` (and, for [B, T] fields, `length`) rules."""
    ndims = {name: 1 for name in _PER_SEQUENCE}
    return TrainBatch(*(batch_sharding(mesh, ndims.get(f, 2), rules) for f in TrainBatch._fields))


def global_batch(local: TrainBatch, shardings: TrainBatch) -> TrainBatch:
    """Process-local rows -> one global `jax.Array` per field (multi-host feeding).

    Every process passes only its own rows (its `B / process_count` sequences, identical
    Ts/Tt/R on all hosts); `shardings` holds one `jax.sharding.Sharding` per field whose
    leading axis splits the batch. On one process this is a plain sharded `device_put`.
    """
    n_proc = jax.process_count()

    def one(x: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
        global_shape = (x.shape[0] * n_proc, *x.shape[1:])
        return jax.make_array_from_process_local_data(sharding, x, global_shape)

    return TrainBatch(*(one(x, s) for x, s in zip(local, shardings, strict=True)))
