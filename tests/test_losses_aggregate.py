"""METHODS §3 loss aggregation against a float64 numpy re-derivation."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from jaxsd.losses import AGG_MODES, aggregate

LEAD, T = (2, 3), 5


def np_aggregate(loss, mask, mode):
    """Straight from METHODS §3, one sequence at a time."""
    loss = np.where(mask > 0, np.float64(loss), 0.0).reshape(-1, loss.shape[-1])
    mask = np.float64(mask).reshape(-1, mask.shape[-1])
    seqs = [(l_, m_) for l_, m_ in zip(loss, mask, strict=True) if m_.sum() > 0]
    if mode == "seq-mean-token-sum-norm":
        return sum((l_ * m_).sum() for l_, m_ in seqs) / max(loss.shape[-1], 1)
    if not seqs:
        return 0.0
    if mode == "token-mean":
        return sum((l_ * m_).sum() for l_, m_ in seqs) / sum(m_.sum() for _, m_ in seqs)
    if mode == "seq-mean-token-sum":
        return np.mean([(l_ * m_).sum() for l_, m_ in seqs])
    return np.mean([(l_ * m_).sum() / m_.sum() for l_, m_ in seqs])


def _all_modes(loss, mask):
    out = {}
    for mode in AGG_MODES:
        value, grad = jax.value_and_grad(lambda x, m=mode: aggregate(x, mask, mode=m))(loss)
        out[mode], out[f"{mode}/grad"] = value, grad
    return out


all_modes = jax.jit(_all_modes)


def inputs(kind):
    rng = np.random.default_rng(0)
    loss = np.float32(rng.normal(size=(*LEAD, T)))
    mask = np.float32(rng.uniform(size=(*LEAD, T)) < 0.6)
    mask[0, 0] = 0.0  # a fully masked sequence, excluded from seq means
    mask[1, 2] = 1.0
    if kind == "all_masked":
        mask[:] = 0.0
    loss[mask == 0] = np.nan  # padding may hold garbage; it must not leak
    return loss, mask


@pytest.mark.parametrize("kind", ["mixed", "all_masked"])
@pytest.mark.parametrize("mode", AGG_MODES)
def test_matches_numpy(mode, kind):
    loss, mask = inputs(kind)
    out = all_modes(loss, mask)
    chex.assert_shape(out[mode], ())
    chex.assert_tree_all_finite(out)
    np.testing.assert_allclose(out[mode], np_aggregate(loss, mask, mode), rtol=1e-6, atol=1e-7)
    grad = np.asarray(out[f"{mode}/grad"])
    assert np.all(grad[mask == 0] == 0.0)  # padding gets no gradient


def test_token_mean_grad_is_mask_over_count_and_seq_mean_weights_short_sequences_up():
    loss, mask = inputs("mixed")
    out = all_modes(loss, mask)
    np.testing.assert_allclose(out["token-mean/grad"], mask / mask.sum(), rtol=1e-6)
    n_seq = (mask.sum(-1) > 0).sum()
    per_seq = mask / np.maximum(mask.sum(-1, keepdims=True), 1.0)
    np.testing.assert_allclose(out["seq-mean-token-mean/grad"], per_seq / n_seq, rtol=1e-6)
    np.testing.assert_allclose(out["seq-mean-token-sum/grad"], mask / n_seq, rtol=1e-6)
    np.testing.assert_allclose(out["seq-mean-token-sum-norm/grad"], mask / T, rtol=1e-6)


def test_empty_sequences_and_bool_masks():
    empty = jnp.zeros((*LEAD, 0))
    for mode in AGG_MODES:
        assert float(aggregate(empty, empty, mode=mode)) == 0.0
    loss, mask = inputs("mixed")
    np.testing.assert_allclose(aggregate(loss, mask > 0), all_modes(loss, mask)["token-mean"])
    np.testing.assert_allclose(
        aggregate(loss, mask, mode="seq-mean-token-sum-norm", norm_constant=2.0),
        np_aggregate(loss, mask, "seq-mean-token-sum-norm") * T / 2.0,
        rtol=1e-6,
    )


@settings(max_examples=30, deadline=None)
@given(
    loss=hnp.arrays(np.float32, (*LEAD, T), elements=st.floats(-100, 100, width=32)),
    mask=hnp.arrays(np.float32, (*LEAD, T), elements=st.sampled_from([0.0, 1.0])),
)
def test_invariants(loss, mask):
    out = all_modes(loss, mask)
    chex.assert_tree_all_finite(out)
    for mode in AGG_MODES:
        np.testing.assert_allclose(out[mode], np_aggregate(loss, mask, mode), rtol=1e-5, atol=1e-4)
    # a constant per-token loss c aggregates to c under both mean modes
    if mask.any():
        const = all_modes(np.full_like(loss, 3.0), mask)
        np.testing.assert_allclose(const["token-mean"], 3.0, rtol=1e-6)
        np.testing.assert_allclose(const["seq-mean-token-mean"], 3.0, rtol=1e-6)


def test_vmap_over_batches():
    loss, mask = inputs("mixed")
    fn = jax.jit(jax.vmap(functools.partial(aggregate, mode="seq-mean-token-mean")))
    got = fn(loss, mask)
    chex.assert_shape(got, LEAD[:1])
    want = [np_aggregate(loss[i], mask[i], "seq-mean-token-mean") for i in range(LEAD[0])]
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_bad_arguments_raise_clear_errors():
    x = jnp.zeros((2, 3))
    with pytest.raises(ValueError, match="mode='mean'"):
        aggregate(x, x, mode="mean")
    with pytest.raises(ValueError, match="mask shape"):
        aggregate(x, x[:, :2])
