"""METHODS §5/§7 question weights against float64 numpy re-derivations."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from jaxsd.losses import (
    difficulty_weights,
    frontier_weights,
    hard_filter_weights,
    paced_weights,
    pass_rate_weights,
)

Q = 8


def np_sc_sdpo(p, a):
    p = np.float64(p)
    keep = (p > 0) & (p < 1)
    raw = np.where(keep, (p * (1 - p)) ** a, 0.0)
    return raw / raw[keep].mean() if keep.any() else np.zeros_like(p)


def _weights(p):
    gamma, medium = difficulty_weights(p)
    return {
        "half": pass_rate_weights(p),
        "one": pass_rate_weights(p, exponent=1.0),
        "paced": paced_weights(p),
        "hard": hard_filter_weights(p),
        "frontier": frontier_weights(p),
        "gamma": gamma,
        "medium": medium,
    }


weights = jax.jit(_weights)
P_MIXED = np.float32([0.0, 1 / 8, 2 / 8, 4 / 8, 6 / 8, 7 / 8, 1.0, 3 / 8])


def test_match_numpy():
    out = weights(P_MIXED)
    chex.assert_shape(list(out.values()), [(Q,)] * len(out))
    np.testing.assert_allclose(out["half"], np_sc_sdpo(P_MIXED, 0.5), rtol=1e-6)
    np.testing.assert_allclose(out["one"], np_sc_sdpo(P_MIXED, 1.0), rtol=1e-6)
    np.testing.assert_allclose(out["paced"], np_sc_sdpo(P_MIXED, 1.0), rtol=1e-6)
    np.testing.assert_array_equal(out["hard"], (P_MIXED > 0) & (P_MIXED < 1))
    np.testing.assert_allclose(out["frontier"], 4 * np.float64(P_MIXED) * (1 - P_MIXED), rtol=1e-6)
    np.testing.assert_array_equal(out["gamma"], np.where(P_MIXED > 0.8, 0.5, P_MIXED >= 0.2))
    np.testing.assert_array_equal(out["medium"], (P_MIXED >= 0.2) & (P_MIXED <= 0.8))
    np.testing.assert_allclose(frontier_weights(P_MIXED, scale=1.0), out["frontier"] / 4)


@pytest.mark.parametrize("p", [np.zeros(Q), np.ones(Q), np.float32([0, 1] * (Q // 2))])
def test_all_degenerate_groups_give_zero_weights(p):
    out = weights(np.float32(p))
    chex.assert_tree_all_finite(out)
    for key in ("half", "one", "paced", "hard", "frontier"):
        np.testing.assert_array_equal(out[key], 0.0)


def test_empty_batch_and_bad_rates():
    assert pass_rate_weights(np.zeros((0,), np.float32)).shape == (0,)
    with pytest.raises(ValueError, match="pass_rates must lie in \\[0, 1\\].*1.5"):
        pass_rate_weights(np.float32([0.5, 1.5]))
    with pytest.raises(ValueError, match="exponent"):
        pass_rate_weights(np.float32([0.5]), exponent=-1.0)


rates = hnp.arrays(np.float32, (Q,), elements=st.integers(0, 8).map(lambda c: c / 8))


@settings(max_examples=40, deadline=None)
@given(p=rates)
def test_invariants(p):
    out = {k: np.asarray(v, np.float64) for k, v in weights(p).items()}
    keep = (p > 0) & (p < 1)
    for key in ("half", "one", "paced"):
        assert np.all(out[key] >= 0) and np.all(out[key][~keep] == 0)
        if keep.any():
            np.testing.assert_allclose(out[key][keep].mean(), 1.0, rtol=1e-5)
    # symmetric in p <-> 1 - p
    flipped = {k: np.asarray(v) for k, v in weights(np.float32(1 - p)).items()}
    for key in ("half", "one", "paced", "hard", "frontier"):
        np.testing.assert_allclose(flipped[key], out[key], rtol=1e-5, atol=1e-7)
    # a question at p = 1/2 gets the largest weight of its batch
    if (p == 0.5).any():
        for key in ("half", "one", "frontier"):
            assert np.all(out[key][p == 0.5] >= out[key].max() * (1 - 1e-6))
        np.testing.assert_allclose(out["frontier"][p == 0.5], 1.0)
    # exponent 1 spreads weights more than exponent 1/2: ratios are the square
    if keep.sum() >= 2:
        i, j = np.flatnonzero(keep)[:2]
        np.testing.assert_allclose(
            out["one"][i] / out["one"][j], (out["half"][i] / out["half"][j]) ** 2, rtol=1e-4
        )


def test_vmap_over_batches():
    batches = np.stack([P_MIXED, P_MIXED[::-1], np.zeros(Q, np.float32)])
    got = jax.jit(jax.vmap(pass_rate_weights))(batches)
    want = np.stack([np_sc_sdpo(b, 0.5) for b in batches])
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_srpo_entropy_token_weights_match_numpy_and_are_detached():
    from jaxsd.losses import entropy_from_logits, entropy_token_weights

    rng = np.random.default_rng(5)
    logits = rng.normal(0, 2.0, (3, 5, 11))
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    h = -(p * np.log(p)).sum(-1)  # the teacher's entropy, nats
    for beta in (0.0, 1.0, 2.5):
        got = entropy_token_weights(entropy_from_logits(jnp.asarray(logits)), beta=beta)
        np.testing.assert_allclose(np.asarray(got), np.exp(-beta * h), rtol=1e-5)
    grad = jax.grad(lambda x: jnp.sum(entropy_token_weights(x)))(jnp.asarray(h))
    assert not np.any(np.asarray(grad))
    with pytest.raises(ValueError, match="beta"):
        entropy_token_weights(jnp.asarray(h), beta=-1.0)
