"""Per-token weights of the distillation term: SRPO's entropy-aware dynamic weighting.

SRPO (Li et al. 2026, "Unifying Group-Relative and Self-Distillation Policy Optimization via
Sample Routing", arXiv 2604.02288) routes failed rollouts to self-distillation and weights
each of their tokens by the self-teacher's confidence, so that high-entropy (unreliable)
distillation targets are suppressed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["entropy_token_weights"]


def entropy_token_weights(teacher_entropy: jax.Array, *, beta: float = 1.0) -> jax.Array:
    """SRPO's entropy-aware weight of one distilled token, `w_t = exp(-beta · H_t^T)`.

    `H_t^T = -Σ_v pi_T(v | x, f, y_<t) log pi_T(v | x, f, y_<t)` is the self-teacher's entropy
    (nats) at response position t; beta >= 0 (paper default 1; 0 gives weight 1, plain SDPO).
    The weight lies in (0, 1], is stop-gradient and multiplies the token's distillation loss;
    the aggregation's normaliser is unchanged (the weights are not renormalised: the sources
    reachable here state `w = exp(-beta H)` and no renormalisation). `[...] -> [...]`.
    """
    if not beta >= 0.0:
        raise ValueError(f"beta={beta} must be >= 0 (SRPO: 1; 0 turns the weighting off)")
    h = jnp.asarray(teacher_entropy)
    h = h.astype(jnp.promote_types(h.dtype, jnp.float32))
    return jax.lax.stop_gradient(jnp.exp(-beta * h))
