"""Question-level weights from group pass rates, METHODS §5 and §7 (difficulty routing).

All weights are stop-gradient scalars per question `[Q]`. Pass rates must lie in [0, 1];
when called eagerly (not under jit) an out-of-range value raises a ValueError.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "difficulty_weights",
    "frontier_weights",
    "hard_filter_weights",
    "paced_weights",
    "pass_rate_weights",
]


def _pass_rates(pass_rates: jax.Array, name: str) -> jax.Array:
    """Float copy of `pass_rates`, range-checked when its values are concrete."""
    if not isinstance(pass_rates, jax.core.Tracer):
        values = np.asarray(pass_rates, dtype=np.float64)
        if values.size and not (np.all(values >= 0.0) and np.all(values <= 1.0)):
            bad = values[~((values >= 0.0) & (values <= 1.0))][0]
            raise ValueError(f"{name} must lie in [0, 1] (fraction of correct rollouts), got {bad}")
    x = jnp.asarray(pass_rates)
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    return jax.lax.stop_gradient(x)


def _informative(p: jax.Array) -> jax.Array:
    """Q+ = {i : 0 < p_i < 1}: groups with both a success and a failure."""
    return (p > 0.0) & (p < 1.0)


def _variance_weights(p: jax.Array, exponent: float) -> jax.Array:
    """`[p(1-p)]^a` on Q+ normalised to mean 1 over Q+, 0 elsewhere (all 0 if Q+ is empty)."""
    if exponent < 0:
        raise ValueError(f"exponent={exponent} must be >= 0")
    keep = _informative(p)
    raw = jnp.where(keep, jnp.where(keep, p * (1.0 - p), 1.0) ** exponent, 0.0)
    n_keep = jnp.sum(keep)
    mean_raw = jnp.sum(raw) / jnp.maximum(n_keep, 1)
    return jnp.where(keep, raw / jnp.where(n_keep > 0, mean_raw, 1.0), 0.0)


def pass_rate_weights(pass_rates: jax.Array, *, exponent: float = 0.5) -> jax.Array:
    """SC-SDPO weight `[p(1-p)]^a` with batch-adaptive normalisation over Q+, METHODS §5.

    `pass_rates [Q]` -> `[Q]`, mean 1 over Q+ = {0 < p < 1}, 0 outside (all 0 if Q+ = ∅).
    """
    return _variance_weights(_pass_rates(pass_rates, "pass_rates"), exponent)


def paced_weights(frozen_pass_rates: jax.Array, exponent: float = 1.0) -> jax.Array:
    """PACED weight `[p0(1-p0)]^a` from pass rates frozen before training, METHODS §5.

    Pass the WHOLE dataset's frozen rates `[N]`: normalisation is global (mean 1 over the
    dataset's 0 < p0 < 1), then index the batch's questions from the result.
    """
    return _variance_weights(_pass_rates(frozen_pass_rates, "frozen_pass_rates"), exponent)


def hard_filter_weights(pass_rates: jax.Array) -> jax.Array:
    """Hard filter `1[0 < p < 1]`, METHODS §5: `[Q] -> [Q]` of 0/1 floats."""
    p = _pass_rates(pass_rates, "pass_rates")
    return _informative(p).astype(p.dtype)


def frontier_weights(pass_rates: jax.Array, *, scale: float = 4.0) -> jax.Array:
    """SSOPD frontier weight `lambda p(1-p)` (1 at p = 1/2 for lambda = 4), METHODS §5."""
    p = _pass_rates(pass_rates, "pass_rates")
    return scale * p * (1.0 - p)


def difficulty_weights(
    ema_pass_rates: jax.Array,
    *,
    easy_above: float = 0.8,
    hard_below: float = 0.2,
    easy_gamma: float = 0.5,
    hard_gamma: float = 0.0,
    medium_gamma: float = 1.0,
) -> tuple[jax.Array, jax.Array]:
    """DRIFT difficulty routing, METHODS §7: `[Q] -> (gamma [Q], medium [Q] bool)`.

    easy r > easy_above -> easy_gamma; hard r < hard_below -> hard_gamma; else medium.
    """
    if not hard_below <= easy_above:
        raise ValueError(f"hard_below={hard_below} must be <= easy_above={easy_above}")
    r = _pass_rates(ema_pass_rates, "ema_pass_rates")
    easy = r > easy_above
    hard = r < hard_below
    medium = ~easy & ~hard
    gamma = jnp.where(easy, easy_gamma, jnp.where(hard, hard_gamma, medium_gamma))
    return gamma.astype(r.dtype), medium
