"""Group-relative policy-gradient pieces: advantages, clipped surrogate, KL, IS, METHODS §2/§4.

Per-token arrays share a leading shape `[..., T]`; per-rollout advantages are broadcast by
ordinary numpy broadcasting, so pass them as `[B, 1]` against `[B, T]` log-probs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = [
    "clip_indicators",
    "clipped_surrogate",
    "grpo_advantages",
    "importance_weight",
    "kl_penalty",
    "log_ratio",
]

# exp(20) ≈ 4.9e8: large enough never to bind in healthy training, small enough that the
# ratio (and anything multiplied by it) stays finite in fp32.
LOG_RATIO_CLAMP = 20.0
K3_CLAMP = 10.0


def _as_float(x: jax.Array) -> jax.Array:
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def log_ratio(logp: jax.Array, old_logp: jax.Array) -> jax.Array:
    """`clamp(log pi_theta - log pi_old, -20, 20)`, METHODS §4; old_logp is stop-gradient."""
    diff = _as_float(logp) - jax.lax.stop_gradient(_as_float(old_logp))
    return jnp.clip(diff, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def grpo_advantages(
    rewards: jax.Array, *, normalize: bool = True, eps: float = 1e-6, ddof: int = 1
) -> jax.Array:
    """GRPO advantage `(r - mean_j r) / (std_j r + eps)` per group, METHODS §4.

    `rewards [Q, G]` (or any `[..., G]`) -> same shape. `normalize=False` is "GRPO w/o Norm"
    (`r - mean_j r`). `ddof=1` (unbiased std) matches verl and TRL, which use `torch.std`;
    a group of one rollout has advantage 0.
    """
    rewards = _as_float(rewards)
    group = rewards.shape[-1]
    # Shift by the first reward before averaging: a zero-variance group then centres to
    # exactly 0 (a plain fp32 mean of 8 equal values can be off by an ulp, and ulp/(ulp+eps)
    # would be a spurious advantage of ~0.05).
    shifted = rewards - rewards[..., :1]
    centred = shifted - jnp.mean(shifted, axis=-1, keepdims=True)
    if not normalize:
        return centred
    if group - ddof <= 0:
        # std is undefined (G = 1 with the unbiased estimator) and the centred reward is 0.
        return jnp.zeros_like(rewards)
    std = jnp.sqrt(jnp.sum(centred**2, axis=-1, keepdims=True) / (group - ddof))
    return centred / (std + eps)


def _check_clip(clip_low: float, clip_high: float, dual_clip: float | None) -> None:
    if not 0.0 <= clip_low < 1.0:
        raise ValueError(f"clip_low={clip_low} must be in [0, 1)")
    if clip_high < 0.0:
        raise ValueError(f"clip_high={clip_high} must be >= 0")
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip={dual_clip} must be > 1 (or None to disable)")


def clipped_surrogate(
    logp: jax.Array,
    old_logp: jax.Array,
    advantages: jax.Array,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    dual_clip: float | None = 3.0,
) -> jax.Array:
    """Per-token PPO/DAPO clipped surrogate with dual clip, METHODS §4 (to minimise).

    `L = max(-A rho, -A clip(rho, 1-eps_low, 1+eps_high))`; for A < 0 also `min(L, -A c)`.
    `dual_clip=None` disables the dual clip. Returns the broadcast shape of the inputs.
    """
    _check_clip(clip_low, clip_high, dual_clip)
    adv = jax.lax.stop_gradient(_as_float(advantages))
    ratio = jnp.exp(log_ratio(logp, old_logp))
    loss = jnp.maximum(-adv * ratio, -adv * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high))
    if dual_clip is not None:
        loss = jnp.where(adv < 0, jnp.minimum(loss, -adv * dual_clip), loss)
    return loss


def clip_indicators(
    logp: jax.Array,
    old_logp: jax.Array,
    advantages: jax.Array,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    dual_clip: float | None = 3.0,
) -> dict[str, jax.Array]:
    """Per-token 0/1 float indicators of which clip of `clipped_surrogate` is active, §4.

    `clip_high`: A > 0 and rho > 1+eps_high; `clip_low`: A < 0 and rho < 1-eps_low (the
    clipped branch wins, gradient 0); `dual_clip`: A < 0 and -A rho > -A c. Aggregate with
    `aggregate(..., mode="token-mean")` to get clip fractions.
    """
    _check_clip(clip_low, clip_high, dual_clip)
    adv = _as_float(advantages)
    ratio = jax.lax.stop_gradient(jnp.exp(log_ratio(logp, old_logp)))
    adv, ratio = jnp.broadcast_arrays(adv, ratio)
    high = (adv > 0) & (ratio > 1.0 + clip_high)
    low = (adv < 0) & (ratio < 1.0 - clip_low)
    dual = (adv < 0) & (ratio > dual_clip) if dual_clip is not None else jnp.zeros_like(high)
    return {
        k: v.astype(ratio.dtype)
        for k, v in (("clip_high", high), ("clip_low", low), ("dual_clip", dual))
    }


def kl_penalty(logp: jax.Array, ref_logp: jax.Array, *, kind: str = "k3") -> jax.Array:
    """Per-token KL estimator to a reference policy (k1, k2, k3), METHODS §4.

    k1 = log pi - log pi_ref; k2 = k1^2 / 2; k3 = exp(-k1) - 1 + k1, clamped to [-10, 10]
    (the log-ratio is clamped to ±20 first so exp stays finite). ref_logp is stop-gradient.
    """
    k1 = _as_float(logp) - jax.lax.stop_gradient(_as_float(ref_logp))
    if kind == "k1":
        return k1
    if kind == "k2":
        return 0.5 * k1**2
    if kind == "k3":
        k1 = jnp.clip(k1, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        return jnp.clip(jnp.exp(-k1) - 1.0 + k1, -K3_CLAMP, K3_CLAMP)
    raise ValueError(f"kind={kind!r} is not a KL estimator; use 'k1', 'k2' or 'k3'")


def importance_weight(
    logp: jax.Array, old_logp: jax.Array, *, is_clip: float | None = 2.0
) -> jax.Array:
    """Detached per-token IS weight `min(exp(clamp(logp - old, -20, 20)), is_clip)`, §2.

    Also serves as the truncated-IS rollout correction (trainer vs engine log-probs).
    `is_clip=None` leaves the ratio uncapped.
    """
    if is_clip is not None and is_clip <= 0:
        raise ValueError(f"is_clip={is_clip} must be > 0 (or None for no cap)")
    ratio = jnp.exp(log_ratio(logp, old_logp))
    if is_clip is not None:
        ratio = jnp.minimum(ratio, is_clip)
    return jax.lax.stop_gradient(ratio)
