"""Attention of the decoder: rotary embedding, causal/sliding-window masks, grouped-query
attention with a memory-lean custom backward, and the choice of kernel (ours, XLA, cuDNN).

Shape letters as in `qwen3.py`: B batch, T query tokens, S key slots, N query heads,
K kv heads, G = N / K, D head_dim; X = G*T (head-major query rows).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxsd.models.rope import RopeScaling

# Finite stand-in for -inf: a fully masked row (a left-padding query) then gets uniform
# weights instead of NaN; its output is never read.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def apply_rope(
    x_BxTxNxD: jax.Array,
    positions_BxT: jax.Array,
    theta: float,
    scaling: RopeScaling | None = None,
) -> jax.Array:
    """Rotary embedding, HF rotate-half convention: x cos + rotate_half(x) sin.

    With `scaling` (YaRN, Llama 3), its inverse frequencies and its scale on cos and sin
    (transformers' order: scale in fp32, then cast)."""
    d = x_BxTxNxD.shape[-1]
    if scaling is None:
        inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    else:
        inv_freq = jnp.asarray(scaling.inv_freq(d, theta))
    freqs_BxTxD2 = positions_BxT.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs_BxTxD2, freqs_BxTxD2], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(emb), jnp.sin(emb)
    if scaling is not None and scaling.attention_scale() != 1.0:
        cos, sin = cos * scaling.attention_scale(), sin * scaling.attention_scale()
    cos, sin = cos.astype(x_BxTxNxD.dtype), sin.astype(x_BxTxNxD.dtype)
    x1, x2 = jnp.split(x_BxTxNxD, 2, axis=-1)
    return x_BxTxNxD * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


def attention_mask(
    query_slots_T: jax.Array, key_valid_BxS: jax.Array, window: int | None
) -> jax.Array:
    """[B, T, S] bool: key slot s is visible to query slot q iff s <= q, valid, within window."""
    s_S = jnp.arange(key_valid_BxS.shape[1])
    mask_TxS = s_S[None, :] <= query_slots_T[:, None]
    if window is not None:
        # HF sliding window: q - s < window, counted in slots (cache positions).
        mask_TxS &= query_slots_T[:, None] - s_S[None, :] < window
    return mask_TxS[None] & key_valid_BxS[:, None, :].astype(bool)


def attend(
    q_BxTxNxD: jax.Array, k_BxSxKxD: jax.Array, v_BxSxKxD: jax.Array, mask_BxTxS: jax.Array
) -> jax.Array:
    """softmax(q k^T / sqrt(D) + mask) v with grouped kv heads (head n uses kv head n // G)."""
    b, t, n, d = q_BxTxNxD.shape
    k = k_BxSxKxD.shape[2]
    g = n // k
    # Queries head-major, [B, K, G*T, D]: every kv head is then one plain [G*T, D] x [D, S]
    # matmul. Contracting the [B, T, K, G, D] layout directly is ~4x slower on XLA:CPU.
    q_BxKxXxD = q_BxTxNxD.reshape(b, t, k, g, d).transpose(0, 2, 3, 1, 4).reshape(b, k, g * t, d)
    out_BxKxXxD = _attend_grouped(q_BxKxXxD, k_BxSxKxD, v_BxSxKxD, mask_BxTxS)
    return out_BxKxXxD.reshape(b, k, g, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, n, d)


def attend_with(
    impl: str,
    q_BxTxNxD: jax.Array,
    k_BxSxKxD: jax.Array,
    v_BxSxKxD: jax.Array,
    mask_BxTxS: jax.Array,
    causal: bool = False,
) -> jax.Array:
    """`attend` by implementation: "jaxsd" (ours) or jax.nn.dot_product_attention's "xla" /
    "cudnn" (the mask becomes an additive bias). `causal`: query t is key slot t (T == S),
    so the kernel may skip the upper triangle; the mask must already say the same."""
    if impl == "jaxsd":
        return attend(q_BxTxNxD, k_BxSxKxD, v_BxSxKxD, mask_BxTxS)
    return jax.nn.dot_product_attention(
        q_BxTxNxD,
        k_BxSxKxD,
        v_BxSxKxD,
        mask=mask_BxTxS[:, None],
        is_causal=causal,
        implementation=impl,
    )


def _probs(q_BxKxXxD: jax.Array, k_BxSxKxD: jax.Array, mask_BxTxS: jax.Array) -> jax.Array:
    """fp32 attention weights [B, K, G*T, S] of head-major queries."""
    b, kh, x, d = q_BxKxXxD.shape
    t, s = mask_BxTxS.shape[1:]
    scores = jnp.einsum("bkxd,bskd->bkxs", q_BxKxXxD, k_BxSxKxD, preferred_element_type=jnp.float32)
    scores_BxKxGxTxS = scores.reshape(b, kh, x // t, t, s) * d**-0.5
    scores_BxKxGxTxS = jnp.where(mask_BxTxS[:, None, None], scores_BxKxGxTxS, _MASK_VALUE)
    return jax.nn.softmax(scores_BxKxGxTxS, axis=-1).reshape(b, kh, x, s)


@jax.custom_vjp
def _attend_grouped(q_BxKxXxD, k_BxSxKxD, v_BxSxKxD, mask_BxTxS):
    probs = _probs(q_BxKxXxD, k_BxSxKxD, mask_BxTxS).astype(v_BxSxKxD.dtype)
    return jnp.einsum("bkxs,bskd->bkxd", probs, v_BxSxKxD)


def _attend_fwd(q_BxKxXxD, k_BxSxKxD, v_BxSxKxD, mask_BxTxS):
    p_BxKxXxS = _probs(q_BxKxXxD, k_BxSxKxD, mask_BxTxS)
    out = jnp.einsum("bkxs,bskd->bkxd", p_BxKxXxS.astype(v_BxSxKxD.dtype), v_BxSxKxD)
    return out, (q_BxKxXxD, k_BxSxKxD, v_BxSxKxD, mask_BxTxS, p_BxKxXxS, out)


def _attend_bwd(res, do_BxKxXxD):
    # The softmax backward ds = p * (dp - sum_s p dp) with sum_s p_s dp_s = do . o (o = p v):
    # a sum over D instead of another pass over the [..., S] weights. Masked scores were
    # replaced by a constant, so their gradient is 0 (p is already 0 there except on fully
    # masked rows, whose weights are uniform).
    q, k, v, mask, p, out = res
    b, kh, x, d = q.shape
    t, s = mask.shape[1:]
    do32 = do_BxKxXxD.astype(jnp.float32)
    dp = jnp.einsum("bkxd,bskd->bkxs", do_BxKxXxD, v, preferred_element_type=jnp.float32)
    delta = jnp.sum(do32 * out.astype(jnp.float32), axis=-1, keepdims=True)
    ds = (p * (dp - delta)).reshape(b, kh, x // t, t, s)
    ds = jnp.where(mask[:, None, None], ds, 0.0).reshape(b, kh, x, s).astype(q.dtype)
    # The 1/sqrt(D) of the scores goes on the [..., D] results: a scalar inside the [..., S]
    # fusion above is materialised as a full broadcast on XLA:CPU.
    dq = jnp.einsum("bkxs,bskd->bkxd", ds, k, preferred_element_type=jnp.float32) * d**-0.5
    dk = jnp.einsum("bkxs,bkxd->bskd", ds, q, preferred_element_type=jnp.float32) * d**-0.5
    dv = jnp.einsum(
        "bkxs,bkxd->bskd", p.astype(v.dtype), do_BxKxXxD, preferred_element_type=jnp.float32
    )
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_attend_grouped.defvjp(_attend_fwd, _attend_bwd)
