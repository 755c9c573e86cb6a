"""losses.softmax_stats (every per-row statistic of log_softmax in two passes, one-pass
gradient) against float64 numpy re-derivations and closed-form gradients."""

import importlib
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsd.losses import softmax_stats, topk_logprobs_and_tail

divergence_module = importlib.import_module("jaxsd.losses.divergence")
LEAD, V, K = (2, 3), 40, 6


def logits_of(kind: str) -> jax.Array:
    rng = np.random.default_rng({"normal": 0, "padded": 1, "extreme": 2, "peaked": 3}[kind])
    x = rng.normal(size=(*LEAD, V)) * 2.0
    if kind == "padded":  # vocabulary padding masked to -inf (never a token or a top-k entry)
        x[..., V - 5 :] = -np.inf
    if kind == "extreme":
        x *= 4000.0
    if kind == "peaked":  # complement masses ~1e-30: the batch takes the two-pass tail
        x[..., :K] += 80.0
    return jnp.asarray(x, jnp.float32)


def np_stats_and_grad(x, tok, idx, cot):
    """float64: (token_logp, entropy, topk_logp, tail_logp) and d(Σ cot · stats)/dx."""
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    ls = x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))
    p = np.exp(ls)
    finite_ls = np.where(p > 0, ls, 0.0)
    ent = -(p * finite_ls).sum(-1)
    tok_lp = np.take_along_axis(ls, tok[..., None], -1)[..., 0]
    topk_lp = np.take_along_axis(ls, idx, -1)
    in_k = np.zeros(x.shape, bool)
    np.put_along_axis(in_k, idx, True, axis=-1)
    out_mass = np.where(in_k, 0.0, p).sum(-1)
    with np.errstate(divide="ignore"):
        tail = np.log(out_mass)
    # float64 itself underflows for the peaked rows' tail: shift by the complement's maximum
    comp = np.where(in_k, -np.inf, ls)
    cm = comp.max(-1, keepdims=True)
    shifted_tail = (cm + np.log(np.exp(comp - cm).sum(-1, keepdims=True)))[..., 0]
    tail = np.where(out_mass > 1e-300, tail, shifted_tail)
    c_tok, c_ent, c_topk, c_tail = (np.asarray(c, np.float64) for c in cot)
    grad = -p * (c_tok + c_topk.sum(-1))[..., None]
    np.add.at(grad, (*np.indices(tok.shape), tok), c_tok)
    np.add.at(grad, (*np.indices(idx.shape)[:-1], idx), c_topk)
    grad += -p * (finite_ls + ent[..., None]) * c_ent[..., None]
    with np.errstate(over="ignore"):  # exp(ls - tail) of top-k entries, discarded by the where
        grad += c_tail[..., None] * (np.where(in_k, 0.0, np.exp(ls - tail[..., None])) - p)
    return (tok_lp, ent, topk_lp, tail), grad


def cotangents(seed=5):
    rng = np.random.default_rng(seed)
    shapes = [LEAD, LEAD, (*LEAD, K), LEAD]
    return [jnp.asarray(rng.normal(size=s), jnp.float32) for s in shapes]


def stats_and_grad(x, tok, idx, cot, *, tail=True):
    def weighted(y):
        s = softmax_stats(y, tok, idx, tail=tail)
        parts = [s.token_logp, s.entropy, s.topk_logp] + ([s.tail_logp] if tail else [])
        return sum(jnp.sum(c * v) for c, v in zip(cot, parts, strict=True))

    return jax.jit(lambda y: softmax_stats(y, tok, idx, tail=tail))(x), jax.jit(jax.grad(weighted))(
        x
    )


def tokens_and_topk(x):
    tok = jnp.asarray(np.random.default_rng(9).integers(0, V - 5, size=LEAD))
    return tok, jax.lax.top_k(x, K)[1]


@pytest.mark.parametrize("kind", ["normal", "padded", "extreme", "peaked"])
def test_values_and_gradient_match_float64(kind):
    x = logits_of(kind)
    tok, idx = tokens_and_topk(x)
    cot = cotangents()
    stats, grad = stats_and_grad(x, tok, idx, cot)
    want, want_grad = np_stats_and_grad(x, np.asarray(tok), np.asarray(idx), cot)
    chex.assert_shape([stats.token_logp, stats.entropy, stats.tail_logp], LEAD)
    chex.assert_shape(stats.topk_logp, (*LEAD, K))
    scale = 4000.0 if kind == "extreme" else 1.0  # fp32 logits of size 1e4 carry ~1e-3 abs error
    for got, ref in zip(stats, want, strict=True):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=2e-5 * scale)
    if kind == "peaked":
        assert want[3].max() < math.log(1e-25)  # the two-pass form was exercised
    # fp32 log-probs of size-1e4 logits are off by ~1e-3 nats, so p by ~1e-3 relative
    np.testing.assert_allclose(grad, want_grad, atol=2e-5, rtol=2e-3 if kind == "extreme" else 0)
    assert bool(jnp.all(jnp.isfinite(grad)))


@pytest.mark.parametrize("threshold", [0.0, np.inf])
def test_both_tail_forms_agree_with_float64(monkeypatch, threshold):
    """The one-pass tail (threshold 0) and the two-pass one (inf) on ordinary rows."""
    monkeypatch.setattr(divergence_module, "_ONE_PASS_TAIL_MIN", threshold)
    x = logits_of("normal")
    tok, idx = tokens_and_topk(x)
    cot = cotangents(6)
    stats, grad = stats_and_grad(x, tok, idx, cot)
    want, want_grad = np_stats_and_grad(x, np.asarray(tok), np.asarray(idx), cot)
    np.testing.assert_allclose(stats.tail_logp, want[3], rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(grad, want_grad, atol=2e-5)


def test_agrees_with_the_one_by_one_functions_and_their_autodiff():
    x = logits_of("normal")
    tok, idx = tokens_and_topk(x)
    cot = cotangents(7)

    def one_by_one(y):
        lp = jax.nn.log_softmax(y)
        topk, tail = topk_logprobs_and_tail(y, idx)
        tok_lp = jnp.take_along_axis(lp, tok[..., None], -1)[..., 0]
        return tok_lp, -jnp.sum(jnp.exp(lp) * lp, -1), topk, tail

    stats, grad = stats_and_grad(x, tok, idx, cot)
    chex.assert_trees_all_close(tuple(stats), one_by_one(x), atol=2e-5)
    auto = jax.grad(lambda y: sum(jnp.sum(c * v) for c, v in zip(cot, one_by_one(y), strict=True)))(
        x
    )
    np.testing.assert_allclose(grad, auto, atol=2e-5)


def test_without_tail_or_indices():
    x = logits_of("normal")
    tok, idx = tokens_and_topk(x)
    cot = cotangents(8)
    full, _ = stats_and_grad(x, tok, idx, cot)
    no_tail, grad = stats_and_grad(x, tok, idx, cot[:3], tail=False)
    assert no_tail.tail_logp is None
    chex.assert_trees_all_close(tuple(no_tail)[:3], tuple(full)[:3])
    _, want_grad = np_stats_and_grad(
        x, np.asarray(tok), np.asarray(idx), cot[:3] + [jnp.zeros(LEAD)]
    )
    np.testing.assert_allclose(grad, want_grad, atol=2e-5)
    bare = softmax_stats(x, tok)  # no top-k: token log-prob and entropy only
    assert bare.tail_logp is None and bare.topk_logp.shape == (*LEAD, 0)
    chex.assert_trees_all_close((bare.token_logp, bare.entropy), tuple(full)[:2])


def test_top_k_equal_vocab_gives_an_empty_tail_and_finite_gradient():
    x = logits_of("normal")
    tok = tokens_and_topk(x)[0]
    idx = jax.lax.top_k(x, V)[1]
    s = softmax_stats(x, tok, idx)
    assert bool(jnp.all(s.tail_logp == -jnp.inf))
    grad = jax.grad(lambda y: jnp.sum(softmax_stats(y, tok, idx).topk_logp[..., 0]))(x)
    assert bool(jnp.all(jnp.isfinite(grad)))


def test_bf16_logits_get_fp32_stats_and_a_bf16_gradient_and_vmap_agrees():
    x = logits_of("normal")
    tok, idx = tokens_and_topk(x)
    s16 = softmax_stats(x.astype(jnp.bfloat16), tok, idx)
    chex.assert_type(list(s16), jnp.float32)
    g16 = jax.grad(lambda y: jnp.sum(softmax_stats(y, tok, idx).entropy))(x.astype(jnp.bfloat16))
    chex.assert_type(g16, jnp.bfloat16)
    mapped = jax.vmap(lambda a, b, c: softmax_stats(a, b, c))(x, tok, idx)
    chex.assert_trees_all_close(tuple(mapped), tuple(softmax_stats(x, tok, idx)), atol=1e-6)


def test_bad_shapes_raise_clear_errors():
    x = logits_of("normal")
    tok, idx = tokens_and_topk(x)
    with pytest.raises(ValueError, match="tokens"):
        softmax_stats(x, tok[0], idx)
    with pytest.raises(ValueError, match="indices"):
        softmax_stats(x, tok, idx[0])
    with pytest.raises(ValueError, match="K <= vocab size"):
        softmax_stats(x, tok, jnp.zeros((*LEAD, V + 1), jnp.int32))


def test_the_accelerator_row_sums_equal_the_cpu_ones():
    """GPU/TPU sum the row in one variadic reduction (`_variadic_row_sums`), CPU in separate
    ones; CI has no accelerator, so the variadic form is checked here against plain sums."""
    module = importlib.import_module("jaxsd.losses.softmax_stats")
    x = logits_of("padded")
    e = jnp.exp(x - jnp.max(x, -1, keepdims=True))
    summands = [e, jnp.where(e > 0, e * x, 0.0), jnp.where(x > 0, e, 0.0)]
    got = jax.jit(module._variadic_row_sums)(*summands)
    chex.assert_trees_all_close(got, [jnp.sum(s, -1) for s in summands], rtol=1e-6)
