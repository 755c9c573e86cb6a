"""Every per-token statistic the LM head needs from a logits row, in two passes over it.

`softmax_stats(logits, tokens, indices)` returns the sampled token's log-prob, the entropy, the
log-probs at the top-k `indices` and the exact tail log-mass outside them (METHODS §2) — what
`gathered_logprobs`, `entropy_from_logprobs` and `topk_logprobs_and_tail` give one by one — from
one pass for the row maximum and one for every sum beside the softmax normaliser:

    Z = Σ_v e_v,  M = Σ_v e_v (x_v - m),  C = Σ_{v∉K} e_v,   e_v = exp(x_v - m), m = max_v x_v
    log-sum-exp = m + log Z,  entropy = log Z - M / Z,  tail = log C - log Z.

Its gradient is one elementwise pass plus one small scatter (`_softmax_stats_bwd`), for any mix
of output cotangents. Separately, autodiff of the one-by-one functions re-reduces the row for
the entropy and keeps each function's `[..., V]` intermediates. The chunked head (DESIGN §2)
remats its logits: the per-row residuals are tagged `SOFTMAX_STATS_RESIDUAL` so its checkpoint
policy keeps them and the recomputation in the backward pass is the logits matmul alone.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jaxsd.losses.divergence import _add_at, _as_float, _in_topk, _tail_from_complement, _tail_grad

__all__ = ["SOFTMAX_STATS_RESIDUAL", "SoftmaxStats", "softmax_stats"]

# checkpoint_name of the per-row residuals (log-sum-exp, entropy, tail): a remat policy that
# saves this name recomputes no reduction over the vocabulary in the backward pass.
SOFTMAX_STATS_RESIDUAL = "jaxsd_softmax_stats_residual"


class SoftmaxStats(NamedTuple):
    """Per-row statistics of `log_softmax(logits)`; `[...]` unless noted."""

    token_logp: jax.Array  # at the sampled token
    entropy: jax.Array
    topk_logp: jax.Array  # [..., K] at `indices`
    tail_logp: jax.Array | None  # log of the mass outside `indices`; None without the tail


def softmax_stats(
    logits: jax.Array, tokens: jax.Array, indices: jax.Array | None = None, *, tail: bool = True
) -> SoftmaxStats:
    """Token log-prob, entropy, top-k log-probs and tail log-mass of `log_softmax(logits)`.

    `logits [..., V]` (upcast to at least fp32), `tokens [...]`, `indices [..., K]` (distinct per
    row; None = no top-k: `topk_logp` is `[..., 0]` and there is no tail). `tail=False` skips the
    complement's sum (`tail_logp` None). The tail is exact as in `topk_logprobs_and_tail`: one
    pass, or for the whole batch the two-pass form when some row's complement mass is below
    `_ONE_PASS_TAIL_MIN` (divergence.py) of its largest probability; an empty complement (K = V)
    gives -inf.
    """
    logits = _as_float(logits)
    if tokens.shape != logits.shape[:-1]:
        raise ValueError(
            f"tokens {tokens.shape} must be logits' {logits.shape} without the last axis"
        )
    if indices is None:
        indices = jnp.zeros((*logits.shape[:-1], 0), jnp.int32)
        tail = False
    if indices.shape[:-1] != logits.shape[:-1] or indices.shape[-1] > logits.shape[-1]:
        raise ValueError(
            f"indices {indices.shape} must be [..., K] with logits' leading axes "
            f"{logits.shape[:-1]} and K <= vocab size {logits.shape[-1]}"
        )
    return _softmax_stats(logits, tokens, indices, tail)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _softmax_stats(logits, tokens, indices, tail):
    return _softmax_stats_fwd(logits, tokens, indices, tail)[0]


def _softmax_stats_fwd(logits, tokens, indices, tail):
    row_max = jnp.max(logits, axis=-1, keepdims=True)
    shifted_V = logits - row_max
    exp_V = jnp.exp(shifted_V)
    # e (x - m) is 0 where e is (x = -inf: masked vocabulary), not 0 * -inf.
    summands = [exp_V, jnp.where(exp_V > 0, exp_V * shifted_V, 0.0)]
    if tail:
        summands.append(jnp.where(_in_topk(indices, logits.shape), 0.0, exp_V))
    total, moment, *complement = _row_sums(summands)
    log_total = jnp.log(total)
    lse = checkpoint_name(row_max[..., 0] + log_total, SOFTMAX_STATS_RESIDUAL)
    entropy = checkpoint_name(log_total - moment / total, SOFTMAX_STATS_RESIDUAL)
    tail_logp = None
    if tail:
        tail_logp = _tail_from_complement(complement[0], log_total, logits, indices)
        tail_logp = checkpoint_name(tail_logp, SOFTMAX_STATS_RESIDUAL)
    token_logp = jnp.take_along_axis(logits, tokens[..., None], axis=-1)[..., 0] - lse
    topk_logp = jnp.take_along_axis(logits, indices, axis=-1) - lse[..., None]
    stats = SoftmaxStats(token_logp, entropy, topk_logp, tail_logp)
    return stats, (logits, tokens, indices, lse, entropy, tail_logp)


def _variadic_row_sums(*xs: jax.Array) -> list[jax.Array]:
    """Σ over the last axis of each of `xs` as one variadic reduction (one loop over the row)."""
    zeros = [jnp.zeros((), x.dtype) for x in xs]
    add = lambda a, b: [x + y for x, y in zip(a, b, strict=True)]  # noqa: E731
    return jax.lax.reduce(list(xs), zeros, add, (xs[0].ndim - 1,))


def _row_sums(summands: list[jax.Array]) -> list[jax.Array]:
    """Σ over the last axis of each summand (elementwise functions of one logits row).

    GPU/TPU: one variadic reduction, so exp(x - m) is computed in the reduction's loop and
    never stored. XLA:CPU runs a variadic reduction through a generic loop ~3x slower than its
    vectorised single reductions (head value+grad at V 151,936: 7.3 vs 5.0 s), so there the
    sums are separate and share one stored exp(x - m) (a [.., V] buffer more).
    """

    def separate(*xs):
        return [jnp.sum(x, axis=-1) for x in xs]

    return list(jax.lax.platform_dependent(*summands, cpu=separate, default=_variadic_row_sums))


def _softmax_stats_bwd(tail, res, g):
    # d token_logp / dx_v = 1[v = token] - p_v; d topk_logp_k / dx_v = 1[v = i_k] - p_v;
    # d entropy / dx_v = -p_v (log p_v + H); the tail's term as in `_tail_logp_bwd`.
    logits, tokens, indices, lse, entropy, tail_logp = res
    logp_V = logits - lse[..., None]
    p_V = jnp.exp(logp_V)
    finite_logp_V = jnp.where(p_V > 0, logp_V, 0.0)
    per_row = g.token_logp + jnp.sum(g.topk_logp, axis=-1)
    grad_V = -p_V * (
        per_row[..., None] + g.entropy[..., None] * (finite_logp_V + entropy[..., None])
    )
    if tail:
        grad_V = grad_V + _tail_grad(logp_V, p_V, indices, tail_logp, g.tail_logp)
    # The sampled token's and the top-k's one-hot terms in one scatter (repeats add up).
    at_K1 = jnp.concatenate([tokens[..., None], indices.astype(tokens.dtype)], axis=-1)
    g_K1 = jnp.concatenate([g.token_logp[..., None], g.topk_logp], axis=-1)
    return _add_at(grad_V, at_K1, g_K1), None, None


_softmax_stats.defvjp(_softmax_stats_fwd, _softmax_stats_bwd)
