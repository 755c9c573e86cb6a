"""METHODS §2/§4 policy-gradient pieces against float64 numpy re-derivations."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from jaxsd.losses import (
    clip_indicators,
    clipped_surrogate,
    grpo_advantages,
    importance_weight,
    kl_penalty,
)

B, T = 4, 6
EPS_LOW, EPS_HIGH, DUAL = 0.2, 0.28, 3.0


# ---------------------------------------------------------------- numpy reference (float64)
def np_ratio(logp, old):
    return np.exp(np.clip(np.float64(logp) - np.float64(old), -20, 20))


def np_surrogate(logp, old, adv):
    r = np_ratio(logp, old)
    loss = np.maximum(-adv * r, -adv * np.clip(r, 1 - EPS_LOW, 1 + EPS_HIGH))
    return np.where(adv < 0, np.minimum(loss, -adv * DUAL), loss)


def np_kl(logp, ref, kind):
    k1 = np.float64(logp) - np.float64(ref)
    if kind == "k1":
        return k1
    if kind == "k2":
        return 0.5 * k1**2
    k1 = np.clip(k1, -20, 20)
    return np.clip(np.exp(-k1) - 1 + k1, -10, 10)


# ---------------------------------------------------------------- one compiled computation
def _policy_quantities(logp, old, adv_B1, ref):
    surr = lambda lp: jnp.sum(clipped_surrogate(lp, old, adv_B1))
    out = {
        "surrogate": clipped_surrogate(logp, old, adv_B1),
        "surrogate_grad": jax.grad(surr)(logp),
    }
    out["no_dual"] = clipped_surrogate(logp, old, adv_B1, dual_clip=None)
    out.update(clip_indicators(logp, old, adv_B1))
    for kind in ("k1", "k2", "k3"):
        out[kind] = kl_penalty(logp, ref, kind=kind)
        out[f"{kind}_grad"] = jax.grad(lambda lp, k=kind: jnp.sum(kl_penalty(lp, ref, kind=k)))(
            logp
        )
    out["is"] = importance_weight(logp, old)
    out["is_grad"] = jax.grad(lambda lp: jnp.sum(importance_weight(lp, old)))(logp)
    return out


policy_quantities = jax.jit(_policy_quantities)


@functools.cache
def computed(kind):
    rng = np.random.default_rng(0)
    old = rng.normal(size=(B, T)) - 2.0
    scale = 0.3 if kind == "normal" else 40.0  # extreme: log-ratios far past the ±20 clamp
    logp = old + rng.normal(size=(B, T)) * scale
    ref = old + rng.normal(size=(B, T)) * scale
    adv = rng.normal(size=(B, 1))
    args = [np.float32(x) for x in (logp, old, adv, ref)]
    return policy_quantities(*args), [np.float64(x) for x in args]


@pytest.mark.parametrize("kind", ["normal", "extreme"])
def test_surrogate_matches_numpy(kind):
    out, (logp, old, adv, _) = computed(kind)
    chex.assert_shape(out["surrogate"], (B, T))
    chex.assert_tree_all_finite(out)
    np.testing.assert_allclose(out["surrogate"], np_surrogate(logp, old, adv), rtol=1e-5)
    r = np_ratio(logp, old)
    no_dual = np.maximum(-adv * r, -adv * np.clip(r, 1 - EPS_LOW, 1 + EPS_HIGH))
    np.testing.assert_allclose(out["no_dual"], no_dual, rtol=1e-5)


@pytest.mark.parametrize("kind", ["normal", "extreme"])
def test_surrogate_grad_is_minus_a_rho_on_unclipped_tokens_else_zero(kind):
    out, (logp, old, adv, _) = computed(kind)
    r = np_ratio(logp, old)
    raw = np.clip(logp - old, -20, 20) == logp - old  # the ±20 clamp also stops the gradient
    active = (np.isclose(np_surrogate(logp, old, adv), -adv * r, rtol=1e-12)) & raw
    want = np.where(active, -adv * r, 0.0)
    np.testing.assert_allclose(out["surrogate_grad"], want, rtol=1e-5, atol=1e-6)
    assert active.any() and (~active).any()


def test_clip_indicators_mark_exactly_the_clipped_tokens():
    out, (logp, old, adv, _) = computed("normal")
    r = np_ratio(logp, old)
    adv = np.broadcast_to(adv, r.shape)
    np.testing.assert_array_equal(out["clip_high"], (adv > 0) & (r > 1 + EPS_HIGH))
    np.testing.assert_array_equal(out["clip_low"], (adv < 0) & (r < 1 - EPS_LOW))
    np.testing.assert_array_equal(out["dual_clip"], (adv < 0) & (r > DUAL))
    # clipped tokens get no gradient
    clipped = np.asarray(out["clip_high"] + out["clip_low"] + out["dual_clip"]) > 0
    assert np.all(np.asarray(out["surrogate_grad"])[clipped] == 0.0)
    ext, (logp, old, adv, _) = computed("extreme")
    assert np.asarray(ext["dual_clip"]).any()  # the extreme case exercises the dual clip


@pytest.mark.parametrize("kind", ["normal", "extreme"])
def test_kl_estimators_match_numpy_and_are_finite(kind):
    out, (logp, _, _, ref) = computed(kind)
    for k in ("k1", "k2", "k3"):
        np.testing.assert_allclose(out[k], np_kl(logp, ref, k), rtol=1e-5, atol=1e-5)
        chex.assert_tree_all_finite(out[f"{k}_grad"])
    assert np.all(np.asarray(out["k2"]) >= 0) and np.all(np.asarray(out["k3"]) >= 0)
    # closed-form gradients: k1 -> 1, k2 -> k1, k3 -> 1 - e^{-k1} where unclamped
    k1 = logp - ref
    np.testing.assert_allclose(out["k1_grad"], 1.0)
    np.testing.assert_allclose(out["k2_grad"], k1, rtol=1e-5, atol=1e-5)
    inside = (np.abs(k1) < 20) & (np_kl(logp, ref, "k3") < 10)
    want_k3 = np.where(inside, 1 - np.exp(-np.clip(k1, -20, 20)), 0.0)
    np.testing.assert_allclose(out["k3_grad"], want_k3, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["normal", "extreme"])
def test_importance_weight_is_capped_and_detached(kind):
    out, (logp, old, _, _) = computed(kind)
    np.testing.assert_allclose(out["is"], np.minimum(np_ratio(logp, old), 2.0), rtol=1e-5)
    assert np.all(np.asarray(out["is_grad"]) == 0.0)


# ---------------------------------------------------------------- GRPO advantages
@functools.cache
def _adv_fn(normalize):
    return jax.jit(functools.partial(grpo_advantages, normalize=normalize))


def np_advantages(r, normalize):
    centred = r - r.mean(-1, keepdims=True)
    if not normalize:
        return centred
    return centred / (r.std(-1, ddof=1, keepdims=True) + 1e-6)  # torch.std (verl, TRL)


def test_grpo_advantages_match_numpy_and_degenerate_groups_are_zero():
    rng = np.random.default_rng(1)
    r = np.float32(rng.integers(0, 2, size=(5, 8)))
    r[0], r[1] = 1.0, 0.0  # all-correct and all-wrong groups
    r[2] = rng.uniform(size=8)  # [0, 1] rewards
    for normalize in (True, False):
        got = _adv_fn(normalize)(r)
        chex.assert_shape(got, (5, 8))
        np.testing.assert_allclose(
            got, np_advantages(np.float64(r), normalize), rtol=1e-5, atol=1e-6
        )
        np.testing.assert_array_equal(np.asarray(got)[:2], 0.0)
    # a single rollout per question (G = 1): advantage 0, not NaN
    np.testing.assert_array_equal(grpo_advantages(jnp.ones((3, 1))), 0.0)


@settings(max_examples=30, deadline=None)
@given(r=hnp.arrays(np.float32, (3, 8), elements=st.floats(0, 1, width=32)))
def test_grpo_advantages_invariants(r):
    a = np.asarray(_adv_fn(True)(r), np.float64)
    chex.assert_tree_all_finite(a)
    np.testing.assert_allclose(a.sum(-1), 0.0, atol=1e-4)  # zero-mean within every group
    spread = r.max(-1) - r.min(-1) > 1e-3
    # normalised groups have unbiased std std_r / (std_r + eps): ~1 unless std_r is near eps
    std_r = np.float64(r).std(-1, ddof=1)
    np.testing.assert_allclose(
        a[spread].std(-1, ddof=1), (std_r / (std_r + 1e-6))[spread], rtol=1e-3
    )
    # Shift invariant where the spread is far above fp32's spacing near 1.25 (1.2e-7): adding
    # 0.25 to rewards 2e-8 apart rounds them onto the same or the next float, a different group.
    shifted = np.asarray(_adv_fn(True)(r + 0.25), np.float64)
    np.testing.assert_allclose(shifted[spread], a[spread], atol=1e-3)


# ---------------------------------------------------------------- invariants, jit, vmap
@settings(max_examples=30, deadline=None)
@given(
    d=hnp.arrays(np.float32, (B, T), elements=st.floats(-25, 25, width=32)),
    adv=hnp.arrays(np.float32, (B, 1), elements=st.floats(-5, 5, width=32)),
)
def test_surrogate_invariants(d, adv):
    old = np.zeros((B, T), np.float32) - 1.0
    out = policy_quantities(old + d, old, adv, old)
    loss, r = np.asarray(out["surrogate"], np.float64), np_ratio(old + d, old)
    a = np.broadcast_to(np.float64(adv), r.shape)
    assert np.all(np.isfinite(loss))
    # never below the unclipped objective unless the dual clip caps it at -A c
    tol = 1e-5 * (1 + np.abs(a * r))
    assert np.all((loss >= -a * r - tol) | ((a < 0) & (r > DUAL)))
    assert np.all(loss[a < 0] <= (-a * DUAL)[a < 0] + 1e-5)
    inside = (r >= 1 - EPS_LOW) & (r <= 1 + EPS_HIGH)
    np.testing.assert_allclose(loss[inside], (-a * r)[inside], rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(out["k3"]) >= 0) and np.all(np.asarray(out["is"]) <= 2.0)


def test_vmap_matches_batched():
    out, (logp, old, adv, _) = computed("normal")
    mapped = jax.jit(jax.vmap(clipped_surrogate))(*(np.float32(x) for x in (logp, old, adv)))
    np.testing.assert_allclose(mapped, out["surrogate"], rtol=1e-6)


def test_bad_arguments_raise_clear_errors():
    x = jnp.zeros((2, 3))
    with pytest.raises(ValueError, match="kind='k4'"):
        kl_penalty(x, x, kind="k4")
    with pytest.raises(ValueError, match="dual_clip"):
        clipped_surrogate(x, x, x, dual_clip=0.5)
    with pytest.raises(ValueError, match="clip_low"):
        clipped_surrogate(x, x, x, clip_low=1.5)
    with pytest.raises(ValueError, match="is_clip"):
        importance_weight(x, x, is_clip=0.0)


# ---------------------------------------------------------------- clip bounds (issue: ½ grads)
@pytest.mark.parametrize(
    "clip_low,clip_high,adv",
    [(0.0, 0.28, -1.3), (0.2, 0.0, 0.7), (0.0, 0.0, -0.4), (0.0, 0.0, 2.1)],
    ids=["low0-neg", "high0-pos", "both0-neg", "both0-pos"],
)
def test_gradient_at_a_clip_bound_is_the_unclipped_one(clip_low, clip_high, adv):
    # On-policy data: rho = 1 exactly, a clip bound whenever clip_low or clip_high is 0.
    # Closed form of the unclipped branch: d(-A rho)/d logp = -A rho = -A.
    logp = jnp.asarray([-1.7, -0.3, -2.2])
    grad = jax.grad(
        lambda lp: jnp.sum(clipped_surrogate(lp, logp, adv, clip_low=clip_low, clip_high=clip_high))
    )(logp)
    np.testing.assert_allclose(np.asarray(grad), -adv * np.ones(3), rtol=1e-6)


def test_gradient_at_the_dual_clip_bound_is_the_unclipped_one():
    old = jnp.zeros(2)
    logp = jnp.full(2, np.log(DUAL, dtype=np.float32))  # rho = c exactly
    adv = -0.9
    grad = jax.grad(lambda lp: jnp.sum(clipped_surrogate(lp, old, adv, dual_clip=DUAL)))(logp)
    rho = np.exp(np.float32(np.log(DUAL, dtype=np.float32)))
    np.testing.assert_allclose(np.asarray(grad), -adv * rho * np.ones(2), rtol=1e-6)


# ---------------------------------------------------------------- GSPO and CISPO
def _np_gspo(logp, old, adv_B, mask, lo, hi):
    """GSPO (arXiv 2507.18071): s_i = exp(mean_t log rho); loss_i = max(-A s, -A clip(s))."""
    d = np.clip(np.float64(logp) - np.float64(old), -20, 20) * mask
    s = np.exp(d.sum(-1) / np.maximum(mask.sum(-1), 1))
    clipped = np.clip(s, 1 - lo, 1 + hi)
    loss = np.maximum(-adv_B * s, -adv_B * clipped)
    # d loss_i / d logp_{i,t} = -A s / |y_i| on unclipped sequences, 0 on clipped ones.
    active = ~(((adv_B > 0) & (s > 1 + hi)) | ((adv_B < 0) & (s < 1 - lo)))
    grad = (active * -adv_B * s / np.maximum(mask.sum(-1), 1))[:, None] * mask
    return loss, grad


def test_gspo_sequence_loss_and_gradient_match_numpy():
    from jaxsd.losses import aggregate, gspo_surrogate

    rng = np.random.default_rng(3)
    logp = rng.normal(-2.0, 0.5, (B, T)).astype(np.float32)
    old = logp + rng.normal(0, 0.05, (B, T)).astype(np.float32)
    mask = (np.arange(T)[None] < np.asarray([6, 4, 2, 5])[:, None]).astype(np.float32)
    adv = np.asarray([1.2, -0.8, 0.5, -1.5], np.float32)
    lo, hi = 0.01, 0.02  # tight ranges (paper: 3e-4 / 4e-4) so some sequences clip

    def seq_loss(lp):
        tok = gspo_surrogate(lp, old, adv[:, None], mask, clip_low=lo, clip_high=hi)
        return aggregate(tok, mask, mode="seq-mean-token-mean"), tok

    (value, tok), grad = jax.value_and_grad(seq_loss, has_aux=True)(jnp.asarray(logp))
    ref_loss, ref_grad = _np_gspo(logp, old, adv, mask, lo, hi)
    clipped = ref_grad.sum(-1) == 0
    assert clipped.any() and not clipped.all()  # both branches exercised
    # every token of sequence i carries the sequence's loss
    np.testing.assert_allclose(np.asarray(tok), ref_loss[:, None] * np.ones((B, T)), rtol=1e-5)
    np.testing.assert_allclose(float(value), ref_loss.mean(), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grad), ref_grad / B, rtol=1e-4, atol=1e-7)


def test_cispo_keeps_a_gradient_on_every_token_with_a_clipped_detached_weight():
    from jaxsd.losses import cispo_surrogate

    rng = np.random.default_rng(4)
    logp = rng.normal(-2.0, 0.5, (B, T)).astype(np.float32)
    old = logp + rng.normal(0, 0.4, (B, T)).astype(np.float32)
    adv = rng.normal(size=(B, 1)).astype(np.float32)
    lo, hi = 1.0, 0.28  # MiniMax-M1: no lower bound
    tok, grad = jax.vmap(jax.value_and_grad(lambda lp, o, a: jnp.sum(
        cispo_surrogate(lp, o, a, clip_low=lo, clip_high=hi))))(logp, old, adv)  # fmt: skip
    w = np.clip(np.exp(np.float64(logp) - old), 1 - lo, 1 + hi)
    np.testing.assert_allclose(np.asarray(tok), (-w * adv * logp).sum(-1), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grad), -w * adv, rtol=1e-5)
    # tokens PPO would zero (A > 0, rho > 1 + eps_high) keep the truncated gradient here
    rho = np.exp(np.float64(logp) - old)
    assert np.any((adv > 0) & (rho > 1 + hi))
    with pytest.raises(ValueError, match="clip_low"):
        cispo_surrogate(logp, old, adv, clip_low=1.5)
