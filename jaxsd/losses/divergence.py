"""Per-token distillation divergences (METHODS §2, §6) and entropy.

Two entry points compute the same math:
- from full-vocabulary logits `[..., V]` (`distillation_divergence`, `clipped_forward_kl`);
- from already-gathered top-k quantities (`topk_divergence_from_logprobs`), which is what the
  chunked train step uses so that `[tokens x vocab]` never leaves a chunk.
`distillation_divergence` is literally `topk_logprobs_and_tail` followed by
`topk_divergence_from_logprobs`.

All math runs in at least float32 (bf16 inputs are upcast); results have that dtype.
Zero-probability terms (log-prob -inf) contribute exactly 0, and their gradients are 0, not
NaN: every `exp(a) * (a - b)` is evaluated on a "safe" copy of its inputs and then selected
with `where` (the double-where trick), because `where` alone still back-propagates NaN.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

__all__ = [
    "clipped_forward_kl",
    "clipped_forward_kl_from_logprobs",
    "distillation_divergence",
    "entropy_from_logits",
    "entropy_from_logprobs",
    "gathered_logprobs",
    "generalized_jsd_from_logprobs",
    "top_k_indices",
    "topk_block_width",
    "topk_divergence_from_logprobs",
    "topk_logprobs_and_tail",
]


def _as_float(x: jax.Array) -> jax.Array:
    """Upcast to at least float32 (bf16/fp16 logits lose nats in softmax sums)."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _check_alpha(alpha: float) -> None:
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha={alpha} must lie in [0, 1] (0 = forward KL, 1 = reverse KL)")


def _plogp_ratio(log_a: jax.Array, log_b: jax.Array) -> jax.Array:
    """Elementwise `a * (log a - log b)` with a = exp(log_a); 0 where a = 0 (value and grad)."""
    present = log_a > -jnp.inf
    safe_a = jnp.where(present, log_a, 0.0)
    safe_b = jnp.where(present, log_b, 0.0)
    return jnp.where(present, jnp.exp(safe_a) * (safe_a - safe_b), 0.0)


def _kl(log_a: jax.Array, log_b: jax.Array) -> jax.Array:
    """KL(A || B) over the last axis from log-probabilities."""
    return jnp.sum(_plogp_ratio(log_a, log_b), axis=-1)


def _log_mixture(log_p: jax.Array, log_t: jax.Array, alpha: float) -> jax.Array:
    """log((1-alpha) P + alpha T), -inf where both are 0 (grad-safe)."""
    both_absent = (log_p == -jnp.inf) & (log_t == -jnp.inf)
    safe_p = jnp.where(both_absent, 0.0, log_p)
    safe_t = jnp.where(both_absent, 0.0, log_t)
    mix = jnp.logaddexp(safe_p + math.log1p(-alpha), safe_t + math.log(alpha))
    return jnp.where(both_absent, -jnp.inf, mix)


def generalized_jsd_from_logprobs(
    student_logp: jax.Array, teacher_logp: jax.Array, *, alpha: float = 0.5
) -> jax.Array:
    """Generalised JSD_alpha(P, T) over the last axis of normalised log-probs, METHODS §2.

    alpha = 0: KL(T || P); alpha = 1: KL(P || T); else (1-a) KL(P || M) + a KL(T || M) with
    M = (1-a) P + a T. The teacher is stop-gradient. Returns `[...]`.
    """
    _check_alpha(alpha)
    log_p = _as_float(student_logp)
    log_t = jax.lax.stop_gradient(_as_float(teacher_logp))
    alpha = float(alpha)
    if alpha == 0.0:
        return _kl(log_t, log_p)
    if alpha == 1.0:
        return _kl(log_p, log_t)
    log_m = _log_mixture(log_p, log_t, alpha)
    return (1.0 - alpha) * _kl(log_p, log_m) + alpha * _kl(log_t, log_m)


def topk_block_width(vocab: int, k: int) -> int | None:
    """The block width `top_k_indices` uses by default; None where one `lax.top_k` is cheaper.

    Pruning pays once the vocabulary is large against k (V >= 100·k: 0.6B/8B-sized vocabularies
    with k <= 1000); the width balances the two sorts it leaves, V/w block maxima and k·w
    candidates, so w ≈ sqrt(V/k), rounded to a power of two.
    """
    if vocab < 100 * k:
        return None
    return 2 ** round(math.log2(math.sqrt(vocab / k)))


def top_k_indices(logits: jax.Array, k: int, *, block: int | None = None) -> jax.Array:
    """Indices of the k largest logits per row, `[..., V] -> [..., K]`, exactly as `lax.top_k`.

    Splits V into blocks of `block` logits and keeps only the k blocks with the largest maxima:
    every top-k entry lies in one of them (a block holding one has a maximum >= the k-th
    value, and at most k blocks do), so the top-k of their k·block logits is the row's top-k.
    Ties resolve as in `lax.top_k` (equal values, lower index first): blocks tied on their
    maximum are taken lowest-index first and the candidates keep their vocabulary order. It
    replaces a sort of V-long rows (XLA's top-k on GPU is a multi-pass radix sort of the whole
    row; on CPU a partial sort) by a max-reduction and sorts of V/block- and k·block-long
    rows, several times faster at Qwen3's vocabulary on XLA:CPU. With the vocabulary
    sharded (tensor parallelism) only the block maxima are all-gathered, not the logits.
    `block=None` picks the width with `topk_block_width` (one `lax.top_k` for small
    vocabularies); a width with ceil(V / block) <= k (e.g. block >= V) is one `lax.top_k`.
    """
    vocab = logits.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"top_k={k} must be in [1, vocab size {vocab}]")
    if block is not None and block < 1:
        raise ValueError(f"top-k block={block} must be >= 1 (or None to choose from V and k)")
    if block is None:
        block = topk_block_width(vocab, k)
    n_blocks = 0 if block is None else -(-vocab // block)
    if n_blocks <= k:
        return jax.lax.top_k(logits, k)[1]
    pad = [(0, 0)] * (logits.ndim - 1) + [(0, n_blocks * block - vocab)]
    blocks = jnp.pad(logits, pad, constant_values=-jnp.inf)
    blocks = blocks.reshape(*logits.shape[:-1], n_blocks, block)
    _, chosen = jax.lax.top_k(blocks.max(axis=-1), k)
    chosen = jnp.sort(chosen, axis=-1)  # vocabulary order, so ties break as in lax.top_k
    candidates = jnp.take_along_axis(blocks, chosen[..., None], axis=-2)
    _, pick = jax.lax.top_k(candidates.reshape(*logits.shape[:-1], k * block), k)
    return jnp.take_along_axis(chosen, pick // block, axis=-1) * block + pick % block


def gathered_logprobs(logits: jax.Array, indices: jax.Array) -> jax.Array:
    """`log_softmax(logits)[..., indices]` for `indices [..., K]` (fp32), with a written-out
    gradient.

    Autodiff would scatter the `[..., K]` cotangent into a zero `[..., V]` array and reduce it
    again for the softmax term; the gradient `1[v = i] g - p_v Σ g` needs neither.
    """
    return _gathered_logprobs(_as_float(logits), indices)


@jax.custom_vjp
def _gathered_logprobs(logits: jax.Array, indices: jax.Array) -> jax.Array:
    return _gathered_logprobs_fwd(logits, indices)[0]


def _gathered_logprobs_fwd(logits: jax.Array, indices: jax.Array) -> tuple[jax.Array, tuple]:
    row_max = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    lse = row_max + jnp.log(jnp.sum(jnp.exp(logits - row_max), axis=-1, keepdims=True))
    return jnp.take_along_axis(logits, indices, axis=-1) - lse, (logits, indices, lse)


def _gathered_logprobs_bwd(res, g):
    logits, indices, lse = res
    grad_V = -jnp.exp(logits - lse) * jnp.sum(g, axis=-1, keepdims=True)
    return _add_at(grad_V, indices, g), None


def _add_at(x_V: jax.Array, indices: jax.Array, values: jax.Array) -> jax.Array:
    """`x_V [..., V]` plus `values [..., K]` at `indices [..., K]` per row (repeats add up)."""
    rows = math.prod(x_V.shape[:-1])
    flat = x_V.reshape(rows, x_V.shape[-1])
    flat = flat.at[jnp.arange(rows)[:, None], indices.reshape(rows, -1)].add(
        values.reshape(rows, -1)
    )
    return flat.reshape(x_V.shape)


_gathered_logprobs.defvjp(_gathered_logprobs_fwd, _gathered_logprobs_bwd)


def topk_logprobs_and_tail(
    logits: jax.Array, indices: jax.Array, *, tail: bool = True
) -> tuple[jax.Array, jax.Array | None]:
    """Top-k log-probs and the exact tail log-mass, METHODS §2.

    `logits [..., V]`, `indices [..., K]` (integer, distinct per row) ->
    `(topk_logp [..., K], tail_logp [...])` where `topk_logp = log_softmax(logits)[indices]`
    and `tail_logp = logsumexp_{v not in K} log_softmax(logits)_v`, computed over the
    complement (never as log(1 - sum), which is 0 in fp32 once the tail is below ~1e-7).
    An empty complement (K = V) gives -inf. `tail=False` (no tail bucket) skips the
    complement's reductions and returns `(topk_logp, None)`.
    """
    logits = _as_float(logits)
    vocab, k = logits.shape[-1], indices.shape[-1]
    if k > vocab:
        raise ValueError(f"top_k={k} exceeds vocab size {vocab}")
    topk_logp = gathered_logprobs(logits, indices)
    if not tail:
        return topk_logp, None
    if k == vocab:
        return topk_logp, jnp.full(logits.shape[:-1], -jnp.inf, logits.dtype)
    return topk_logp, _tail_logp(logits, indices)


def _in_topk(indices: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    return jnp.put_along_axis(jnp.zeros(shape, bool), indices, True, axis=-1, inplace=False)


# Below this complement mass (relative to the row's largest probability) the one-pass tail sum
# could miss terms that underflow fp32's exp (each < 1.2e-38, V of them < 2e-33 at V = 151,936):
# from 1e-25 up their share stays under 2e-8, below fp32's resolution.
_ONE_PASS_TAIL_MIN = 1e-25


@jax.custom_vjp
def _tail_logp(logits: jax.Array, indices: jax.Array) -> jax.Array:
    """Log of the softmax mass outside `indices`: `logsumexp(log_softmax(logits)[~K])`, exactly.

    The common case is one reduction, the sibling of the softmax normaliser's: the complement's
    exp(logit - row max) summed over the row, divided by the whole row's. Rows whose complement
    mass is below `_ONE_PASS_TAIL_MIN` (peaked distributions, or a complement with no mass at
    all, e.g. -inf-masked vocabulary padding) send the whole batch to the two-pass form, which
    shifts by the complement's own maximum; per row both give the same value up to rounding.
    The gradient is written out (`_tail_logp_bwd`): autodiff through the `cond` would keep both
    forms' `[..., V]` residuals, the unused one as zeros.
    """
    return _tail_logp_fwd(logits, indices)[0]


def _tail_logp_fwd(logits: jax.Array, indices: jax.Array) -> tuple[jax.Array, tuple]:
    row_max = jnp.max(logits, axis=-1, keepdims=True)
    exp_V = jnp.exp(logits - row_max)
    total = jnp.sum(exp_V, axis=-1)
    complement = jnp.sum(jnp.where(_in_topk(indices, logits.shape), 0.0, exp_V), axis=-1)
    tail_logp = _tail_from_complement(complement, jnp.log(total), logits, indices)
    return tail_logp, (logits, indices, row_max[..., 0] + jnp.log(total), tail_logp)


def _tail_from_complement(
    complement: jax.Array, log_total: jax.Array, logits: jax.Array, indices: jax.Array
) -> jax.Array:
    """The tail log-mass from the one-pass sums (Σ_{v∉K} e_v and log Σ_v e_v, e_v = exp(x_v -
    row max)), or, when some row's complement is below `_ONE_PASS_TAIL_MIN`, the two-pass form
    for the whole batch."""
    return jax.lax.cond(
        jnp.all(complement >= _ONE_PASS_TAIL_MIN),
        lambda: jnp.log(complement) - log_total,
        lambda: _tail_logp_two_pass(logits, indices),
    )


def _tail_logp_two_pass(logits: jax.Array, indices: jax.Array) -> jax.Array:
    tail_V = jnp.where(_in_topk(indices, logits.shape), -jnp.inf, jax.nn.log_softmax(logits))
    has_mass = jnp.any(tail_V > -jnp.inf, axis=-1)
    safe_tail_V = jnp.where(has_mass[..., None], tail_V, 0.0)
    return jnp.where(has_mass, jax.nn.logsumexp(safe_tail_V, axis=-1), -jnp.inf)


def _tail_logp_bwd(res, g):
    logits, indices, lse, tail_logp = res
    logp_V = logits - lse[..., None]
    return _tail_grad(logp_V, jnp.exp(logp_V), indices, tail_logp, g), None


def _tail_grad(
    logp_V: jax.Array, p_V: jax.Array, indices: jax.Array, tail_logp: jax.Array, g: jax.Array
) -> jax.Array:
    """g · d tail / d x_v = g (1[v ∉ K] p_v / p_tail - p_v); 0 for rows whose complement has
    no mass (tail = -inf), where the derivative does not exist (the two-pass form's choice)."""
    has_mass = (tail_logp > -jnp.inf)[..., None]
    safe_tail = jnp.where(has_mass, tail_logp[..., None], 0.0)
    in_tail_V = jnp.where(_in_topk(indices, logp_V.shape), 0.0, jnp.exp(logp_V - safe_tail))
    return jnp.where(has_mass, g[..., None] * (in_tail_V - p_V), 0.0)


_tail_logp.defvjp(_tail_logp_fwd, _tail_logp_bwd)


def topk_divergence_from_logprobs(
    student_topk_logp: jax.Array,
    student_tail_logp: jax.Array | None,
    teacher_topk_logp: jax.Array,
    teacher_tail_logp: jax.Array | None,
    *,
    alpha: float = 0.5,
    add_tail: bool = True,
) -> jax.Array:
    """Top-k (+ tail bucket) generalised JSD from gathered log-probs, METHODS §2.

    `*_topk_logp [..., K]` are full-vocabulary log-softmax values gathered at the student's
    top-k indices, `*_tail_logp [...]` the log-mass outside them. With `add_tail` the
    distributions live on K ∪ {tail}; without, each is renormalised over K and the tails are
    unused (None, as `topk_logprobs_and_tail(..., tail=False)` returns them). Returns `[...]`.
    """
    if student_topk_logp.shape != teacher_topk_logp.shape:
        raise ValueError(
            f"student top-k shape {student_topk_logp.shape} != teacher top-k shape "
            f"{teacher_topk_logp.shape}; gather both at the student's top-k indices"
        )
    log_p = _as_float(student_topk_logp)
    log_t = _as_float(teacher_topk_logp)
    if add_tail:
        if student_tail_logp is None or teacher_tail_logp is None:
            raise ValueError("add_tail=True needs both tail log-masses (topk_logprobs_and_tail)")
        log_p = jnp.concatenate([log_p, _as_float(student_tail_logp)[..., None]], axis=-1)
        log_t = jnp.concatenate([log_t, _as_float(teacher_tail_logp)[..., None]], axis=-1)
    else:
        log_p, log_t = _renormalise(log_p), _renormalise(log_t)
    return generalized_jsd_from_logprobs(log_p, log_t, alpha=alpha)


def _renormalise(log_x: jax.Array) -> jax.Array:
    """`log_x - logsumexp(log_x)` over the last axis; uniform where the row has no mass at all.

    A teacher whose logits are -inf on every one of the student's top-k (a masked vocabulary)
    has nothing to renormalise; uniform is the limit of equal, very negative logits (what
    -1e30 gives), and keeps value and gradient finite instead of -inf - (-inf) = NaN.
    """
    empty = jnp.all(log_x == -jnp.inf, axis=-1, keepdims=True)
    safe = jnp.where(empty, 0.0, log_x)
    normalised = safe - jax.nn.logsumexp(safe, axis=-1, keepdims=True)
    return jnp.where(empty, -math.log(log_x.shape[-1]), normalised)


def distillation_divergence(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    *,
    top_k: int | None = 100,
    alpha: float = 0.5,
    add_tail: bool = True,
) -> jax.Array:
    """Per-token top-k (+ tail) generalised JSD between student and teacher, METHODS §2.

    `student_logits, teacher_logits [..., V]` -> `[...]`. `top_k=None` uses the full
    vocabulary. K = the student's top-k indices. Gradient flows only through the student.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {student_logits.shape} and teacher logits "
            f"{teacher_logits.shape} must have the same shape [..., V]"
        )
    _check_alpha(alpha)
    teacher_logits = jax.lax.stop_gradient(teacher_logits)
    vocab = student_logits.shape[-1]
    if top_k is None:
        return generalized_jsd_from_logprobs(
            jax.nn.log_softmax(_as_float(student_logits), axis=-1),
            jax.nn.log_softmax(_as_float(teacher_logits), axis=-1),
            alpha=alpha,
        )
    if not 1 <= top_k <= vocab:
        raise ValueError(f"top_k={top_k} must be in [1, vocab size {vocab}] (or None for all)")
    _, indices = jax.lax.top_k(jax.lax.stop_gradient(student_logits), top_k)
    s_topk, s_tail = topk_logprobs_and_tail(student_logits, indices, tail=add_tail)
    t_topk, t_tail = topk_logprobs_and_tail(teacher_logits, indices, tail=add_tail)
    return topk_divergence_from_logprobs(
        s_topk, s_tail, t_topk, t_tail, alpha=alpha, add_tail=add_tail
    )


def clipped_forward_kl_from_logprobs(
    student_logp: jax.Array, teacher_logp: jax.Array, *, clip: float = 1.0
) -> jax.Array:
    """SSOPD pointwise-clipped forward KL `sum_v min(T (log T - log P), c)`, METHODS §6.

    Inputs are normalised log-probs `[..., N]`; the teacher is stop-gradient. Returns `[...]`.
    """
    log_p = _as_float(student_logp)
    log_t = jax.lax.stop_gradient(_as_float(teacher_logp))
    return jnp.sum(jnp.minimum(_plogp_ratio(log_t, log_p), clip), axis=-1)


def clipped_forward_kl(
    student_logits: jax.Array, teacher_logits: jax.Array, *, clip: float = 1.0
) -> jax.Array:
    """SSOPD pointwise-clipped forward KL over the full vocabulary, METHODS §6.

    `[..., V]` logits -> `[...]`; clip applied per vocabulary summand before the sum.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {student_logits.shape} and teacher logits "
            f"{teacher_logits.shape} must have the same shape [..., V]"
        )
    return clipped_forward_kl_from_logprobs(
        jax.nn.log_softmax(_as_float(student_logits), axis=-1),
        jax.nn.log_softmax(_as_float(jax.lax.stop_gradient(teacher_logits)), axis=-1),
        clip=clip,
    )


def entropy_from_logprobs(logp: jax.Array) -> jax.Array:
    """Shannon entropy `-sum p log p` over the last axis of normalised log-probs."""
    logp = _as_float(logp)
    present = logp > -jnp.inf
    safe = jnp.where(present, logp, 0.0)
    return -jnp.sum(jnp.where(present, jnp.exp(safe) * safe, 0.0), axis=-1)


def entropy_from_logits(logits: jax.Array) -> jax.Array:
    """Shannon entropy of softmax(logits) over the last axis: `[..., V] -> [...]`."""
    return entropy_from_logprobs(jax.nn.log_softmax(_as_float(logits), axis=-1))
