"""DRIFT rhythm gate on positive rollouts, METHODS §7 steps 1–6.

Inputs are per-token `[..., T]` (log-prob of the sampled token, entropy) plus the response
mask and a per-sequence `medium [...]` flag (beta_i). The gate is stop-gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["entropy_drop", "rhythm_gate"]

# z-scores of a sequence whose D^anc is constant up to rounding would be pure noise;
# METHODS says "std 0 -> z = 0", and we read 0 as 0 relative to the values' scale.
_REL_STD_FLOOR = 1e-6


def _float(x: jax.Array) -> jax.Array:
    x = jnp.asarray(x)
    return jax.lax.stop_gradient(x.astype(jnp.promote_types(x.dtype, jnp.float32)))


def _masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean over the last axis of the positions where mask is 1; 0 for an empty row."""
    cnt = jnp.sum(mask, axis=-1)
    return jnp.sum(x * mask, axis=-1) / jnp.maximum(cnt, 1.0)


def entropy_drop(entropy: jax.Array, mask: jax.Array, *, window: int = 8) -> jax.Array:
    """`Drop(t) = max(mean H[t-W, t-1] - mean H[t+1, t+W], 0)`, METHODS §7 step 2.

    Means run over the valid (mask = 1) tokens in each window, truncated at the sequence
    edges; where either window holds no valid token the drop is 0. `[..., T] -> [..., T]`.
    """
    if window < 1:
        raise ValueError(f"window={window} must be >= 1")
    h = _float(entropy)
    m = jnp.asarray(mask).astype(h.dtype)
    T = h.shape[-1]
    zero = jnp.zeros((*h.shape[:-1], 1), h.dtype)
    # prefix[i] = sum of the first i entries, so a window [a, b) sums to prefix[b] - prefix[a].
    h_prefix = jnp.concatenate([zero, jnp.cumsum(h * m, axis=-1)], axis=-1)
    m_prefix = jnp.concatenate([zero, jnp.cumsum(m, axis=-1)], axis=-1)
    t = np.arange(T)
    past_lo, past_hi = np.maximum(t - window, 0), t
    fut_lo, fut_hi = np.minimum(t + 1, T), np.minimum(t + window + 1, T)

    def window_mean(lo: np.ndarray, hi: np.ndarray) -> tuple[jax.Array, jax.Array]:
        s = h_prefix[..., hi] - h_prefix[..., lo]
        c = m_prefix[..., hi] - m_prefix[..., lo]
        return s / jnp.maximum(c, 1.0), c > 0

    past, has_past = window_mean(past_lo, past_hi)
    future, has_future = window_mean(fut_lo, fut_hi)
    return jnp.where(has_past & has_future, jnp.maximum(past - future, 0.0), 0.0)


def _masked_zscore(x: jax.Array, mask: jax.Array) -> jax.Array:
    """z-score within each sequence over valid tokens (population std); 0 where std ~ 0."""
    mean = _masked_mean(x, mask)[..., None]
    centred = (x - mean) * mask
    std = jnp.sqrt(_masked_mean(centred**2, mask))[..., None]
    scale = jnp.max(jnp.abs(x) * mask, axis=-1, keepdims=True)
    flat = std <= _REL_STD_FLOOR * scale
    return jnp.where(flat, 0.0, centred / jnp.where(flat, 1.0, std))


def rhythm_gate(
    student_logp: jax.Array,
    teacher_logp: jax.Array,
    student_entropy: jax.Array,
    teacher_entropy: jax.Array,
    mask: jax.Array,
    medium: jax.Array,
    *,
    mu: float = 0.1,
    tau: float = 1.0,
    b_max: float = 2.0,
    window: int = 8,
    alpha_anc: float = 2.0,
    lambda_struct: float = 1.0,
    m_min: float = 0.5,
    m_max: float = 2.0,
) -> jax.Array:
    """DRIFT per-token multiplier `M = 1 + beta g^rhythm b^reb` in [1, b_max], METHODS §7.

    `*_logp`, `*_entropy`, `mask`: `[..., T]`; `medium`: `[...]` (beta_i). Padding and
    non-medium sequences get exactly 1. Stop-gradient.
    """
    if b_max < 1.0:
        raise ValueError(f"b_max={b_max} must be >= 1")
    if not m_min <= 1.0 < m_max:
        raise ValueError(f"need m_min <= 1 < m_max, got m_min={m_min}, m_max={m_max}")
    ls, lt = _float(student_logp), _float(teacher_logp)
    hs, ht = _float(student_entropy), _float(teacher_entropy)
    m = jnp.asarray(mask).astype(ls.dtype)
    beta = jnp.asarray(medium).astype(ls.dtype)[..., None]
    if beta.shape[:-1] != ls.shape[:-1]:
        raise ValueError(f"medium shape {beta.shape[:-1]} must equal {ls.shape[:-1]}")

    # Step 1: rebound bonus; clamp the exponent at log(b_max) so exp never overflows.
    delta_pos = jnp.maximum(ls - lt - mu, 0.0)
    rebound = jnp.exp(jnp.minimum(tau * delta_pos, np.log(b_max))) - 1.0
    # Steps 2-3: anchor score where the teacher's entropy drops more than the student's.
    drop_s = entropy_drop(hs, m, window=window)
    drop_t = entropy_drop(ht, m, window=window)
    anchor = jnp.maximum(drop_t - drop_s, 0.0) * jnp.maximum(hs - ht, 0.0)
    # Step 4: within-sequence z-score -> one-sided sigmoid gate in [0, 1).
    z = _masked_zscore(anchor * m, m)
    g_anc = 2.0 * jnp.maximum(jax.nn.sigmoid(alpha_anc * z) - 0.5, 0.0)
    # Step 5: structural multiplier, renormalised to mean 1 per sequence, then clipped.
    mult = 1.0 + lambda_struct * g_anc
    mult_norm = mult / jnp.maximum(_masked_mean(mult, m), 1e-12)[..., None]
    g_rhythm = jnp.clip((jnp.clip(mult_norm, m_min, m_max) - 1.0) / (m_max - 1.0), 0.0, 1.0)
    # Step 6.
    gate = 1.0 + beta * g_rhythm * rebound
    return jax.lax.stop_gradient(jnp.where(m > 0, gate, 1.0))
