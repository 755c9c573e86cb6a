"""Loss aggregation over a masked `[..., T]` token matrix, METHODS §3."""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["AGG_MODES", "aggregate"]

AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def _safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
    """num / den, and 0 (with a 0 gradient) where den == 0."""
    nonzero = den != 0
    return jnp.where(nonzero, num / jnp.where(nonzero, den, 1.0), 0.0)


def aggregate(
    loss: jax.Array,
    mask: jax.Array,
    *,
    mode: str = "token-mean",
    norm_constant: float | None = None,
) -> jax.Array:
    """Reduce per-token `loss [..., T]` under `mask [..., T]` to a scalar, METHODS §3.

    Modes: `token-mean` Σ loss·mask / Σ mask; `seq-mean-token-sum` mean over sequences of
    Σ_t loss·mask; `seq-mean-token-mean` mean over sequences of the per-sequence token mean;
    `seq-mean-token-sum-norm` Σ loss·mask / norm_constant (Dr. GRPO; default T, as verl).
    Every leading axis counts as a sequence axis; sequences with Σ_t mask = 0 are excluded;
    an all-masked or empty batch gives 0. Masked positions may hold NaN/inf: they are dropped.
    """
    if loss.shape != mask.shape:
        raise ValueError(f"loss shape {loss.shape} != mask shape {mask.shape}")
    if loss.ndim == 0:
        raise ValueError("aggregate needs a [..., T] token axis, got a scalar loss")
    loss = jnp.asarray(loss)
    loss = loss.astype(jnp.promote_types(loss.dtype, jnp.float32))
    mask = jnp.asarray(mask).astype(loss.dtype)
    # where, not loss * mask: padding may carry inf/NaN (e.g. log-probs of pad tokens).
    masked = jnp.where(mask != 0, loss * mask, 0.0)
    tok_sum = jnp.sum(masked, axis=-1)  # [...]
    tok_cnt = jnp.sum(mask, axis=-1)  # [...]
    n_seq = jnp.sum(tok_cnt > 0)
    if mode == "token-mean":
        return _safe_div(jnp.sum(tok_sum), jnp.sum(tok_cnt))
    if mode == "seq-mean-token-sum":
        return _safe_div(jnp.sum(tok_sum), n_seq.astype(loss.dtype))
    if mode == "seq-mean-token-mean":
        return _safe_div(jnp.sum(_safe_div(tok_sum, tok_cnt)), n_seq.astype(loss.dtype))
    if mode == "seq-mean-token-sum-norm":
        # max(T, 1): a batch of empty sequences (T = 0) sums to 0 and must not divide by 0.
        constant = max(loss.shape[-1], 1) if norm_constant is None else norm_constant
        if constant <= 0:
            raise ValueError(f"norm_constant={constant} must be > 0")
        return jnp.sum(tok_sum) / constant
    raise ValueError(f"mode={mode!r} is not an aggregation mode; use one of {AGG_MODES}")
