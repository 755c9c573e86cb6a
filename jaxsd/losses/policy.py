"""Group-relative policy-gradient pieces: advantages, clipped surrogates (PPO, GSPO, CISPO),
KL, IS, METHODS §2/§4.

Per-token arrays share a leading shape `[..., T]`; per-rollout advantages are broadcast by
ordinary numpy broadcasting, so pass them as `[B, 1]` against `[B, T]` log-probs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = [
    "cispo_surrogate",
    "clip_indicators",
    "clipped_surrogate",
    "gspo_surrogate",
    "grpo_advantages",
    "importance_weight",
    "kl_penalty",
    "log_ratio",
    "sequence_log_ratio",
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


def _clip_branch(
    ratio: jax.Array, adv: jax.Array, clip_low: float, clip_high: float, dual_clip: float | None
) -> jax.Array:
    """Per-token PPO loss `max(-A rho, -A clip(rho))` (+ dual clip), branches picked strictly.

    The clipped branch is taken only where it is strictly larger (A > 0 and rho > 1+eps_high,
    or A < 0 and rho < 1-eps_low), the dual clip only where -A rho > -A c. At a bound the two
    branches have equal values; selecting with strict inequalities keeps the unclipped
    gradient there (`jnp.clip` and a `maximum` tie would each halve it: on-policy data sits at
    rho = 1, a bound whenever clip_low or clip_high is 0).
    """
    clip_hi = (adv > 0) & (ratio > 1.0 + clip_high)
    clip_lo = (adv < 0) & (ratio < 1.0 - clip_low)
    bound = jnp.where(adv > 0, 1.0 + clip_high, 1.0 - clip_low)  # a constant: zero gradient
    loss = jnp.where(clip_hi | clip_lo, -adv * bound, -adv * ratio)
    if dual_clip is not None:
        dual = (adv < 0) & (ratio > dual_clip)
        loss = jnp.where(dual, -adv * dual_clip, loss)
    return loss


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
    At a clip bound the gradient is the unclipped one, `-A rho ∇log pi` (`_clip_branch`).
    """
    _check_clip(clip_low, clip_high, dual_clip)
    adv = jax.lax.stop_gradient(_as_float(advantages))
    ratio = jnp.exp(log_ratio(logp, old_logp))
    adv, ratio = jnp.broadcast_arrays(adv, ratio)
    return _clip_branch(ratio, adv, clip_low, clip_high, dual_clip)


def sequence_log_ratio(logp: jax.Array, old_logp: jax.Array, mask: jax.Array) -> jax.Array:
    """GSPO's length-normalised sequence log-ratio `(1/|y|) Σ_t (log pi_theta - log pi_old)`.

    `[..., T] -> [..., 1]` over the tokens where `mask` is 1 (0 for an empty sequence); the
    per-token differences are clamped to ±20 first, as in `log_ratio`.
    """
    m = _as_float(mask)
    diff = jnp.where(m != 0, log_ratio(logp, old_logp) * m, 0.0)
    count = jnp.sum(m, axis=-1, keepdims=True)
    return jnp.sum(diff, axis=-1, keepdims=True) / jnp.maximum(count, 1.0)


def gspo_surrogate(
    logp: jax.Array,
    old_logp: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    clip_low: float = 3e-4,
    clip_high: float = 4e-4,
) -> jax.Array:
    """Per-token GSPO loss (Zheng et al. 2025, arXiv 2507.18071).

    GSPO clips one importance ratio per sequence,
        s_i = (pi_theta(y_i|x) / pi_old(y_i|x))^(1/|y_i|) = exp((1/|y_i|) Σ_t log rho_{i,t}),
        J_GSPO = (1/G) Σ_i min(s_i A_i, clip(s_i, 1-eps_low, 1+eps_high) A_i).
    Written per token as GSPO-token, `s_{i,t} = sg[s_i] · pi_theta(y_{i,t}) / sg[pi_theta(y_{i,t})]`
    (value s_i, gradient s_i ∇log pi_theta(y_{i,t})), each token carries the sequence's loss
    `max(-A s_{i,t}, -A clip(s_{i,t}))`; aggregated with `seq-mean-token-mean` this is exactly
    -J_GSPO and its gradient (a token-mean aggregation weights sequences by their length).
    `logp`, `old_logp`, `mask`: `[..., T]`; `advantages` broadcastable (`[..., 1]`). No dual
    clip (the paper has none). The paper's ranges: eps_low = 3e-4, eps_high = 4e-4.
    """
    _check_clip(clip_low, clip_high, None)
    adv = jax.lax.stop_gradient(_as_float(advantages))
    logp = _as_float(logp)
    seq = jax.lax.stop_gradient(sequence_log_ratio(logp, old_logp, mask))
    # log s_{i,t} = sg[log s_i] + log pi - sg[log pi]: the value of s_i, a per-token gradient.
    ratio = jnp.exp(seq + logp - jax.lax.stop_gradient(logp))
    adv, ratio = jnp.broadcast_arrays(adv, ratio)
    return _clip_branch(ratio, adv, clip_low, clip_high, None)


def cispo_surrogate(
    logp: jax.Array,
    old_logp: jax.Array,
    advantages: jax.Array,
    *,
    clip_low: float = 1.0,
    clip_high: float = 0.28,
) -> jax.Array:
    """Per-token CISPO loss (MiniMax-M1 report, arXiv 2506.13585), to minimise.

        J_CISPO = (1 / Σ_i |o_i|) Σ_i Σ_t sg[r̂_{i,t}] A_{i,t} log pi_theta(o_{i,t}),
        r̂_{i,t} = clip(rho_{i,t}, 1 - eps_low^IS, 1 + eps_high^IS).
    The importance weight is clipped and detached instead of the update: every token keeps
    a gradient `-sg[r̂] A ∇log pi_theta`, also where PPO's clipped branch would zero it.
    Per token: `-sg[r̂] A log pi_theta`; the paper aggregates with `token-mean`. The paper
    leaves the lower bound off (eps_low^IS large: clip_low = 1 gives a lower bound of 0).
    """
    if not 0.0 <= clip_low <= 1.0:
        raise ValueError(f"clip_low={clip_low} must be in [0, 1] for CISPO (1 = no lower bound)")
    if clip_high < 0.0:
        raise ValueError(f"clip_high={clip_high} must be >= 0")
    adv = jax.lax.stop_gradient(_as_float(advantages))
    ratio = jax.lax.stop_gradient(jnp.exp(log_ratio(logp, old_logp)))
    weight = jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
    return -weight * adv * _as_float(logp)


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
