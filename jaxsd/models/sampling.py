"""The embedded sampler's sampling math: logits filters, the Gumbel-max draw, per-row keys.

`sample_step` is the one sampling point of both decode loops (`sampler`'s padded batch and
`continuous`'s refilled slots): it draws token `step` of each row with
fold_in(row key, step), filters the logits the way HF and vLLM do (temperature, top-k, top-p,
min-p), and returns the token with its raw and its sampling log-prob. Everything here is a
pure function of arrays, traced inside the samplers' `jax.jit`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _ordered_key(x: jax.Array) -> jax.Array:
    """uint32 keys that order like the float32 values (-inf lowest, +inf highest)."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x80000000))


def _smallest_key_where(pred, lo: jax.Array, hi: jax.Array) -> jax.Array:
    """Per row, the smallest uint32 x in [lo, hi] with pred(x); pred is monotone (False, then
    True) and holds at hi. 32 halvings cover the whole uint32 range."""

    def halve(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        ok = pred(mid)
        return jnp.where(ok, lo, mid + 1), jnp.where(ok, mid, hi)

    return jax.lax.fori_loop(0, 32, halve, (lo, hi))[1]


def filter_logits(logits_BxV: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Top-k, then nucleus top-p (Holtzman et al. 2020) on the top-k renormalised; -inf = out.

    Keeps the k largest logits (top_k=0: all; tokens tied with the k-th count as in the top
    k), then the smallest prefix of those, by decreasing probability, whose mass reaches
    top_p; tokens tied with the last kept logit are kept too.

    No sort: both cut-offs are logit values found by bisection on the float bits, 32 masked
    reductions over the vocab each (a vocab sort per step is far slower on CPU). The
    nucleus cut-off is the smallest logit c whose strictly larger logits hold < top_p of the
    mass: exactly the last token a sorted prefix keeps.
    """
    key_BxV = _ordered_key(logits_BxV)
    lo_Bx1 = key_BxV.min(axis=-1, keepdims=True)
    hi_Bx1 = key_BxV.max(axis=-1, keepdims=True)
    kth_Bx1 = jax.lax.cond(
        top_k > 0,
        lambda: _smallest_key_where(
            lambda x: jnp.sum(key_BxV > x, axis=-1, keepdims=True) < top_k, lo_Bx1, hi_Bx1
        ),
        lambda: lo_Bx1,
    )
    probs_BxV = jax.nn.softmax(jnp.where(key_BxV >= kth_Bx1, logits_BxV, -jnp.inf), axis=-1)

    def mass_above_below_top_p(x: jax.Array) -> jax.Array:
        return jnp.sum(jnp.where(key_BxV > x, probs_BxV, 0.0), axis=-1, keepdims=True) < top_p

    cutoff_Bx1 = jax.lax.cond(
        top_p < 1.0,  # at 1 the whole top-k is the nucleus (no rounding can drop its last)
        lambda: _smallest_key_where(mass_above_below_top_p, kth_Bx1, hi_Bx1),
        lambda: kth_Bx1,
    )
    return jnp.where(key_BxV >= cutoff_Bx1, logits_BxV, -jnp.inf)


def min_p_filter(logits_BxV: jax.Array, min_p: jax.Array) -> jax.Array:
    """Min-p (Nguyen et al. 2024; HF `MinPLogitsWarper`, vLLM `min_p`): keep the tokens whose
    probability is at least min_p times the most likely one's; -inf = out. min_p 0 keeps all.

    p_v >= min_p · p_max  <=>  logit_v >= max logit + log(min_p): no softmax needed, and the
    cut does not depend on a renormalisation by earlier filters (they never drop the max).
    """
    cutoff_Bx1 = jnp.max(logits_BxV, axis=-1, keepdims=True) + jnp.log(min_p)
    return jnp.where(logits_BxV >= cutoff_Bx1, logits_BxV, -jnp.inf)


def sampling_logits(
    logits_BxV: jax.Array,
    temperature: jax.Array,
    top_k: jax.Array,
    top_p: jax.Array,
    min_p: jax.Array | float = 0.0,
) -> jax.Array:
    """logits / temperature, then top-k, top-p, min-p (the HF / vLLM order); -inf = excluded."""
    scaled = logits_BxV / jnp.where(temperature > 0, temperature, 1.0)
    # The filter's bisections are the costly part; skip them when no filter is on.
    filtered = jax.lax.cond(
        (top_k > 0) | (top_p < 1.0),
        lambda x: filter_logits(x, top_k, top_p),
        lambda x: x,
        scaled,
    )
    return min_p_filter(filtered, jnp.asarray(min_p, filtered.dtype))


def gumbel_max_sample(keys_B: jax.Array, logits_BxV: jax.Array) -> jax.Array:
    """One token per row from softmax(logits): `jax.random.categorical`'s Gumbel noise and
    samples, with its argmax written as max + first index of the max.

    XLA:CPU fuses the noise into the variadic argmax reduce, which runs several times slower
    than a max and a min. Rows with a NaN pick index V-1 (argmax would pick the NaN);
    `generate` rejects non-finite log-probs anyway.
    """
    v = logits_BxV.shape[-1]
    noisy_BxV = jax.vmap(lambda k, x: jax.random.gumbel(k, (v,), x.dtype) + x)(keys_B, logits_BxV)
    best_Bx1 = jnp.max(noisy_BxV, axis=-1, keepdims=True)
    first_B = jnp.min(jnp.where(noisy_BxV == best_Bx1, jnp.arange(v), v), axis=-1)
    return jnp.minimum(first_B, v - 1)


def sample_token(
    keys_B: jax.Array,
    logits_BxV: jax.Array,
    temperature: jax.Array,
    top_k: jax.Array,
    top_p: jax.Array,
    min_p: jax.Array | float = 0.0,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The one sampling point: filter, draw with `keys_B`, and score.

    -> (tokens [B], raw logprobs [B], sampling logprobs [B]). Every logits filter goes
    through `sampling_logits`; both the padded and the slot sampler call this.
    """
    logits_BxV = logits_BxV.astype(jnp.float32)
    filtered_BxV = sampling_logits(logits_BxV, temperature, top_k, top_p, min_p)
    sampled_B = gumbel_max_sample(keys_B, filtered_BxV)
    greedy_B = jnp.argmax(logits_BxV, axis=-1)
    tokens_B = jnp.where(temperature > 0, sampled_B, greedy_B).astype(jnp.int32)
    raw_logp_B = _gather(jax.nn.log_softmax(logits_BxV, axis=-1), tokens_B)
    samp_logp_B = jnp.where(
        temperature > 0, _gather(jax.nn.log_softmax(filtered_BxV, axis=-1), tokens_B), 0.0
    )
    return tokens_B, raw_logp_B, samp_logp_B


def sample_step(
    row_keys_B: jax.Array,
    step: jax.Array,
    logits_BxV: jax.Array,
    temperature: jax.Array,
    top_k: jax.Array,
    top_p: jax.Array,
    min_p: jax.Array | float = 0.0,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Token `step` ([] or per row [B]) of each row: its draws use fold_in(row key, step), so
    a row's samples depend only on (seed, row, step), never on which batch slot runs it."""
    steps_B = jnp.broadcast_to(step, row_keys_B.shape)
    keys_B = jax.vmap(jax.random.fold_in)(row_keys_B, steps_B)
    return sample_token(keys_B, logits_BxV, temperature, top_k, top_p, min_p)


def _gather(x_BxV: jax.Array, idx_B: jax.Array) -> jax.Array:
    return jnp.take_along_axis(x_BxV, idx_B[:, None], axis=-1)[:, 0]
