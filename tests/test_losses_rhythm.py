"""METHODS §7 DRIFT rhythm gate against a per-position float64 numpy re-derivation."""

import chex
import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from jaxsd.losses import entropy_drop, rhythm_gate

B, T = 4, 12
DEFAULTS = dict(
    mu=0.1, tau=1.0, b_max=2.0, window=8, alpha_anc=2.0, lambda_struct=1.0, m_min=0.5, m_max=2.0
)
VARIANT = dict(DEFAULTS, window=2, tau=3.0, b_max=3.0, m_max=1.5)


def np_drop(h, valid, w):
    out = np.zeros(len(h))
    for t in range(len(h)):
        past = [h[u] for u in range(max(t - w, 0), t) if valid[u]]
        fut = [h[u] for u in range(t + 1, min(t + w + 1, len(h))) if valid[u]]
        if past and fut:
            out[t] = max(np.mean(past) - np.mean(fut), 0.0)
    return out


def np_rhythm(ls, lt, hs, ht, mask, medium, p):
    """Steps 1-6 of METHODS §7, one sequence at a time."""
    ls, lt, hs, ht = (np.float64(x) for x in (ls, lt, hs, ht))
    out = np.ones(ls.shape)
    for b in range(ls.shape[0]):
        valid = mask[b] > 0
        if not valid.any():
            continue
        rebound = (
            np.minimum(np.exp(p["tau"] * np.maximum(ls[b] - lt[b] - p["mu"], 0)), p["b_max"]) - 1
        )
        anchor = np.maximum(
            np_drop(ht[b], valid, p["window"]) - np_drop(hs[b], valid, p["window"]), 0
        )
        anchor *= np.maximum(hs[b] - ht[b], 0)
        x = anchor[valid]
        z = np.zeros(T)
        if x.std() > 1e-6 * np.abs(x).max():
            z[valid] = (x - x.mean()) / x.std()
        g_anc = 2 * np.maximum(1 / (1 + np.exp(-p["alpha_anc"] * z)) - 0.5, 0)
        m = 1 + p["lambda_struct"] * g_anc
        m_clip = np.clip(m / m[valid].mean(), p["m_min"], p["m_max"])
        g = np.clip((m_clip - 1) / (p["m_max"] - 1), 0, 1)
        out[b] = np.where(valid, 1 + float(medium[b]) * g * rebound, 1.0)
    return out


def _gates(ls, lt, hs, ht, mask, medium):
    return {
        "default": rhythm_gate(ls, lt, hs, ht, mask, medium),
        "variant": rhythm_gate(ls, lt, hs, ht, mask, medium, **VARIANT),
        "drop": entropy_drop(ht, mask, window=3),
        "grad": jax.grad(lambda x: rhythm_gate(x, lt, hs, ht, mask, medium).sum())(ls),
    }


gates = jax.jit(_gates)


def random_inputs(seed=0):
    rng = np.random.default_rng(seed)
    ls = -np.abs(rng.normal(size=(B, T)))
    lt = ls - np.abs(rng.normal(size=(B, T))) * 0.5 - 0.3  # Δ > 0 ...
    lt[:, ::5] = ls[:, ::5] + 0.2  # ... except every 5th token
    hs, ht = np.abs(rng.normal(size=(2, B, T))) * 2
    mask = np.arange(T) < np.asarray([T, 7, 0, 3])[:, None]  # incl. an empty sequence
    medium = np.asarray([True, True, True, False])
    return [np.float32(x) for x in (ls, lt, hs, ht)] + [mask, medium]


@pytest.mark.parametrize("which,params", [("default", DEFAULTS), ("variant", VARIANT)])
def test_matches_numpy(which, params):
    args = random_inputs()
    out = gates(*args)
    chex.assert_shape(out[which], (B, T))
    chex.assert_tree_all_finite(out)
    np.testing.assert_allclose(out[which], np_rhythm(*args, params), rtol=1e-5, atol=1e-6)
    assert np.asarray(out[which]).max() > 1.05  # the gate really opens somewhere


def test_entropy_drop_matches_numpy():
    ls, lt, hs, ht, mask, medium = random_inputs(1)
    got = gates(ls, lt, hs, ht, mask, medium)["drop"]
    want = np.stack([np_drop(np.float64(ht[b]), mask[b], 3) for b in range(B)])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_gate_is_one_off_medium_off_mask_and_where_delta_nonpositive():
    ls, lt, hs, ht, mask, medium = args = random_inputs(2)
    out = gates(*args)
    gate = np.asarray(out["default"])
    assert np.all(gate >= 1.0) and np.all(gate <= DEFAULTS["b_max"])
    assert np.all(gate[~medium] == 1.0) and np.all(gate[~mask] == 1.0)
    assert np.all(gate[ls - lt - DEFAULTS["mu"] <= 0] == 1.0)
    assert np.all(np.asarray(out["grad"]) == 0.0)  # stop-gradient multiplier


def test_anchor_where_teacher_entropy_drops_gets_the_largest_gate():
    # the teacher's entropy falls from 3 to 0.2 at t = 6; the student's stays at 2
    ls, lt = np.full((B, T), -0.5, np.float32), np.full((B, T), -1.5, np.float32)  # Δ = 0.9
    hs = np.full((B, T), 2.0, np.float32)
    ht = np.where(np.arange(T) < 6, 3.0, 0.2).astype(np.float32) + np.zeros((B, 1), np.float32)
    mask, medium = np.ones((B, T), bool), np.ones(B, bool)
    gate = np.asarray(gates(ls, lt, hs, ht, mask, medium)["default"])
    assert np.all(np.argmax(gate, -1) == 6)
    np.testing.assert_allclose(gate, np_rhythm(ls, lt, hs, ht, mask, medium, DEFAULTS), rtol=1e-5)


@settings(max_examples=30, deadline=None)
@given(
    x=hnp.arrays(np.float32, (4, B, T), elements=st.floats(-5, 5, width=32)),
    mask=hnp.arrays(bool, (B, T)),
    medium=hnp.arrays(bool, (B,)),
)
def test_invariants(x, mask, medium):
    ls, lt = -np.abs(x[0]), -np.abs(x[1])
    hs, ht = np.abs(x[2]), np.abs(x[3])
    out = gates(ls, lt, hs, ht, mask, medium)
    gate = np.asarray(out["default"])
    chex.assert_tree_all_finite(out)
    assert np.all(gate >= 1.0) and np.all(gate <= DEFAULTS["b_max"] * (1 + 1e-6))
    assert np.all(gate[~medium] == 1.0) and np.all(gate[~mask] == 1.0)
    assert np.all(gate[ls - lt - DEFAULTS["mu"] <= 0] == 1.0)
    assert np.all(np.asarray(out["variant"]) <= VARIANT["b_max"] * (1 + 1e-6))


def test_vmap_matches_batched():
    args = random_inputs()
    got = jax.jit(jax.vmap(rhythm_gate))(*args)
    np.testing.assert_allclose(got, gates(*args)["default"], rtol=1e-6)


def test_bad_arguments_raise_clear_errors():
    args = random_inputs()
    with pytest.raises(ValueError, match="m_max"):
        rhythm_gate(*args, m_max=1.0)
    with pytest.raises(ValueError, match="b_max"):
        rhythm_gate(*args, b_max=0.5)
    with pytest.raises(ValueError, match="medium shape"):
        rhythm_gate(*args[:5], args[5][:2])
    with pytest.raises(ValueError, match="window"):
        entropy_drop(args[2], args[4], window=0)
