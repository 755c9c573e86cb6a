"""Chunked LM head: per-token statistics without `[tokens x vocab]` logits (DESIGN §2).

The hidden states at response positions `[B, R, H]` go through the LM head a few response
positions at a time (`lax.scan` over chunks of R, every sequence of the batch in each chunk, so
a batch split over devices stays split). Each chunk materialises `[B, Rc, V]` logits for the
student (and teacher), reduces them to per-token numbers, and drops them; `jax.checkpoint`
makes the backward pass recompute each chunk's logits instead of storing them. Peak memory is
O(B·Rc·V), independent of R.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jaxsd import losses

__all__ = ["HEAD_KEYS", "chunked_head", "head_on_logits"]

# Per-token outputs: always "logp" and "entropy"; with a teacher also "teacher_logp",
# "teacher_entropy", and on request "divergence" (METHODS §2) and "ssopd_kl" (§6).
HEAD_KEYS = ("logp", "entropy", "teacher_logp", "teacher_entropy", "divergence", "ssopd_kl")


# Small per-token values the backward pass keeps instead of recomputing: the student's top-k
# indices and every teacher statistic. The recomputed chunk then needs neither the teacher's
# matmul nor the top-k search (unless SSOPD needs the teacher's full distribution).
_SAVED = "jaxsd_head_saved"


def _saved(x: jax.Array) -> jax.Array:
    return checkpoint_name(x, _SAVED)


def _token_logp_and_entropy(
    logits_NxV: jax.Array, tokens_N: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """log_softmax, its value at the sampled token, and the entropy (fp32)."""
    logits_NxV = logits_NxV.astype(jnp.float32)
    logp_NxV = jax.nn.log_softmax(logits_NxV, axis=-1)
    token_logp_N = losses.gathered_logprobs(logits_NxV, tokens_N[..., None])[..., 0]
    return logp_NxV, token_logp_N, losses.entropy_from_logprobs(logp_NxV)


def head_on_logits(
    student_logits: jax.Array,
    tokens: jax.Array,
    teacher_logits: jax.Array | None = None,
    *,
    top_k: int | None = 100,
    alpha: float = 0.5,
    add_tail: bool = True,
    divergence: bool = True,
    ssopd_clip: float | None = None,
    topk_block: int | None = None,
) -> dict[str, jax.Array]:
    """Per-token head outputs from full logits `[..., V]` (one chunk's worth), METHODS §2/§6.

    Returns `{key: [...]}` for the keys of `HEAD_KEYS` that apply. The teacher is
    stop-gradient; the divergence uses the student's top-k (+ exact tail) via
    `losses.softmax_stats` (or `losses.topk_logprobs_and_tail` where SSOPD needs whole rows
    anyway) and `losses.topk_divergence_from_logprobs`.
    """
    if teacher_logits is not None:
        teacher_logits = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32))
    if ssopd_clip is None and not (divergence and top_k is None):
        return _head_from_stats(
            student_logits, tokens, teacher_logits, top_k=top_k, alpha=alpha,
            add_tail=add_tail, divergence=divergence, topk_block=topk_block,
        )  # fmt: skip
    # SSOPD and the full-vocabulary JSD need whole log-probability rows.
    s_logp_V, s_tok, s_ent = _token_logp_and_entropy(student_logits, tokens)
    out = {"logp": s_tok, "entropy": s_ent}
    if teacher_logits is None:
        return out
    t_logp_V, t_tok, t_ent = _token_logp_and_entropy(teacher_logits, tokens)
    out["teacher_logp"], out["teacher_entropy"] = _saved(t_tok), _saved(t_ent)
    if divergence and top_k is None:
        out["divergence"] = losses.generalized_jsd_from_logprobs(s_logp_V, t_logp_V, alpha=alpha)
    elif divergence:
        idx_K = _student_topk(student_logits, top_k, topk_block)
        s_topk, s_tail = losses.topk_logprobs_and_tail(student_logits, idx_K, tail=add_tail)
        t_topk, t_tail = losses.topk_logprobs_and_tail(teacher_logits, idx_K, tail=add_tail)
        t_tail = None if t_tail is None else _saved(t_tail)
        out["divergence"] = losses.topk_divergence_from_logprobs(
            s_topk, s_tail, _saved(t_topk), t_tail, alpha=alpha, add_tail=add_tail
        )
    if ssopd_clip is not None:
        out["ssopd_kl"] = losses.clipped_forward_kl_from_logprobs(
            s_logp_V, t_logp_V, clip=ssopd_clip
        )
    return out


def _student_topk(student_logits: jax.Array, top_k: int, topk_block: int | None) -> jax.Array:
    """The student's top-k indices K of the divergence (no gradient; kept for the backward)."""
    idx_K = losses.top_k_indices(jax.lax.stop_gradient(student_logits), top_k, block=topk_block)
    return _saved(idx_K)


def _head_from_stats(
    student_logits: jax.Array,
    tokens: jax.Array,
    teacher_logits: jax.Array | None,
    *,
    top_k: int | None,
    alpha: float,
    add_tail: bool,
    divergence: bool,
    topk_block: int | None,
) -> dict[str, jax.Array]:
    """`head_on_logits` through `losses.softmax_stats`: two passes over each logits row and a
    one-pass gradient, for every configuration that needs no whole log-probability row."""
    idx_K = None
    if teacher_logits is not None and divergence:
        idx_K = _student_topk(student_logits, top_k, topk_block)
    s = losses.softmax_stats(student_logits, tokens, idx_K, tail=add_tail)
    out = {"logp": s.token_logp, "entropy": s.entropy}
    if teacher_logits is None:
        return out
    t = losses.softmax_stats(teacher_logits, tokens, idx_K, tail=add_tail)
    out["teacher_logp"], out["teacher_entropy"] = _saved(t.token_logp), _saved(t.entropy)
    if divergence:
        t_tail = None if t.tail_logp is None else _saved(t.tail_logp)
        out["divergence"] = losses.topk_divergence_from_logprobs(
            s.topk_logp, s.tail_logp, _saved(t.topk_logp), t_tail, alpha=alpha, add_tail=add_tail
        )
    return out


@jax.custom_vjp
def _logits(h_BxCxH: jax.Array, w_HxV: jax.Array) -> jax.Array:
    # fp32 accumulation: bf16 logits lose whole nats in the softmax over 150k entries.
    return jnp.einsum("bch,hv->bcv", h_BxCxH, w_HxV, preferred_element_type=jnp.float32)


def _logits_fwd(h_BxCxH, w_HxV):
    return _logits(h_BxCxH, w_HxV), (h_BxCxH, w_HxV)


def _logits_bwd(res, g_BxCxV):
    # Autodiff would run both backward matmuls in fp32 (the fp32 logits' cotangent promotes
    # the bf16 operands; an H200 profile showed them as TF32 GEMMs, ~15 % of an 8B-layer
    # step). Mixed precision as usual: the cotangent in the operands' dtype, fp32 accumulation.
    h, w = res
    g = g_BxCxV.astype(jnp.promote_types(h.dtype, w.dtype))
    dh = jnp.einsum("bcv,hv->bch", g, w, preferred_element_type=jnp.float32)
    hidden, vocab = w.shape
    dw = _weight_grad(h.reshape(-1, hidden), g.reshape(-1, vocab))
    return dh.astype(h.dtype), dw.astype(w.dtype)


def _weight_grad(h_NxH: jax.Array, g_NxV: jax.Array) -> jax.Array:
    """dW = hᵀ g [H, V] in fp32: a short contraction (a chunk's tokens) into a vocab-wide output.

    XLA:CPU runs this GEMM with the transposed operand folded in well below its plain-GEMM
    speed at the vocab sizes of small models. Transposing h into its own [H, N] buffer first
    (the barrier keeps XLA from folding it back) makes it a plain GEMM; at Qwen3's vocab both
    forms run alike. GPUs and TPUs run the folded form at full speed, so they keep it.
    """

    def folded(h, g):
        return jnp.einsum("nh,nv->hv", h, g, preferred_element_type=jnp.float32)

    def transposed_first(h, g):
        return jnp.dot(jax.lax.optimization_barrier(h.T), g, preferred_element_type=jnp.float32)

    return jax.lax.platform_dependent(h_NxH, g_NxV, cpu=transposed_first, default=folded)


_logits.defvjp(_logits_fwd, _logits_bwd)


def chunked_head(
    student_h_BxRxH: jax.Array,
    student_w_HxV: jax.Array,
    tokens_BxR: jax.Array,
    teacher_h_BxRxH: jax.Array | None = None,
    teacher_w_HxV: jax.Array | None = None,
    *,
    chunk_size: int = 1024,
    top_k: int | None = 100,
    alpha: float = 0.5,
    add_tail: bool = True,
    divergence: bool = True,
    ssopd_clip: float | None = None,
    topk_block: int | None = None,
) -> dict[str, jax.Array]:
    """`head_on_logits` of `h @ W`, computed `chunk_size` tokens at a time (DESIGN §2).

    A chunk holds every sequence and `Rc = ceil(chunk_size / B)` response positions, so
    `[B, Rc, V]` is the largest array of the head, in the forward and (through
    `jax.checkpoint`) the backward pass. Returns `{key: [B, R]}`.
    """
    if (teacher_h_BxRxH is None) != (teacher_w_HxV is None):
        raise ValueError("pass both teacher_h_BxRxH and teacher_w_HxV, or neither")
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1 (tokens per head chunk)")
    b, r, _ = student_h_BxRxH.shape
    vocab = student_w_HxV.shape[-1]
    if top_k is not None and not 1 <= top_k <= vocab:
        raise ValueError(f"top_k={top_k} must be in [1, vocab size {vocab}] (or None for all)")
    rc = min(r, max(1, math.ceil(chunk_size / b)))
    n_chunks = math.ceil(r / rc)
    pad = n_chunks * rc - r
    has_teacher = teacher_h_BxRxH is not None

    def to_chunks(x_BxRx: jax.Array) -> jax.Array:
        # [B, R, ...] -> [n_chunks, B, Rc, ...]; the padded positions are sliced off below.
        x = jnp.pad(x_BxRx, [(0, 0), (0, pad)] + [(0, 0)] * (x_BxRx.ndim - 2))
        x = x.reshape(b, n_chunks, rc, *x_BxRx.shape[2:])
        return jnp.moveaxis(x, 1, 0)

    xs = {"s": to_chunks(student_h_BxRxH), "tok": to_chunks(tokens_BxR)}
    if has_teacher:
        xs["t"] = to_chunks(jax.lax.stop_gradient(teacher_h_BxRxH))
        teacher_w_HxV = jax.lax.stop_gradient(teacher_w_HxV)

    # Saved for the backward pass: the values named `_SAVED` and softmax_stats' per-row
    # residuals, so recomputing a chunk there is the student's logits matmul alone.
    policy = jax.checkpoint_policies.save_only_these_names(_SAVED, losses.SOFTMAX_STATS_RESIDUAL)

    @functools.partial(jax.checkpoint, policy=policy)
    def one_chunk(x: dict[str, jax.Array]) -> dict[str, jax.Array]:
        t_logits = _logits(x["t"], teacher_w_HxV) if has_teacher else None
        return head_on_logits(
            _logits(x["s"], student_w_HxV),
            x["tok"],
            t_logits,
            top_k=top_k,
            alpha=alpha,
            add_tail=add_tail,
            divergence=divergence,
            ssopd_clip=ssopd_clip,
            topk_block=topk_block,
        )

    _, ys = jax.lax.scan(lambda carry, x: (carry, one_chunk(x)), None, xs)
    # [n_chunks, B, Rc] -> [B, R]
    return {k: jnp.moveaxis(v, 0, 1).reshape(b, n_chunks * rc)[:, :r] for k, v in ys.items()}
