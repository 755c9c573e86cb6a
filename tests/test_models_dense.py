"""`lora.dense`: the projection matmul with a hand-written backward pass.

Its gradients must be the closed form (dx = g Wᵀ, dW = xᵀ g over every token) in both
operand orders, keep the operands' dtypes, and its weight-gradient GEMM must take the operand
with fewer features as the transposed one (the reason it exists: XLA:CPU's transposes of the
cotangent cost ~7 % of a `small` step).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsd.models.lora import dense

# (in features, out features): x narrower, the cotangent narrower, a tie.
SHAPES = [(3, 8), (8, 3), (5, 5)]


def _operands(i: int, o: int, dtype=jnp.float32):
    kx, kw, kc = jax.random.split(jax.random.key(i * 10 + o), 3)
    x = jax.random.normal(kx, (2, 7, i), dtype)
    w = jax.random.normal(kw, (i, o), dtype)
    cot = jax.random.normal(kc, (2, 7, o), dtype)
    return x, w, cot


@pytest.mark.parametrize("shape", SHAPES)
def test_dense_gradients_are_the_closed_form(shape):
    x, w, cot = _operands(*shape)
    y, vjp = jax.vjp(dense, x, w)
    dx, dw = vjp(cot)
    xn, wn, gn = (np.asarray(a, np.float64) for a in (x, w, cot))
    np.testing.assert_allclose(y, xn @ wn, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, gn @ wn.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        dw, xn.reshape(-1, shape[0]).T @ gn.reshape(-1, shape[1]), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("shape", SHAPES)
def test_dense_keeps_the_compute_dtype_in_both_directions(shape):
    x, w, cot = _operands(*shape, dtype=jnp.bfloat16)
    y, vjp = jax.vjp(dense, x, w)
    dx, dw = vjp(cot)
    chex.assert_type([y, dx, dw], jnp.bfloat16)
    chex.assert_shape([dx, dw], [x.shape, w.shape])


def test_dense_with_mixed_dtypes_matches_autodiff():
    x, w, cot = _operands(3, 8)
    w = w.astype(jnp.bfloat16)
    (dx, dw), (ref_dx, ref_dw) = (jax.vjp(f, x, w)[1](cot) for f in (dense, jnp.matmul))
    chex.assert_type([dx, dw], [jnp.float32, jnp.bfloat16])
    chex.assert_trees_all_close((dx, dw), (ref_dx, ref_dw), rtol=1e-2, atol=1e-2)


def _weight_grad_dot(i: int, o: int) -> jax.core.JaxprEqn:
    x, w, cot = _operands(i, o)
    jaxpr = jax.make_jaxpr(lambda w: jax.vjp(dense, x, w)[1](cot)[1])(w)
    dots = [e for e in jaxpr.eqns if e.primitive.name == "dot_general"]
    # The weight gradient is the dot that contracts both token axes (batch and sequence).
    (wgrad,) = [e for e in dots if e.params["dimension_numbers"][0][0] == (0, 1)]
    return wgrad


@pytest.mark.parametrize("shape", SHAPES)
def test_dense_weight_gradient_transposes_the_narrower_operand(shape):
    i, o = shape
    lhs = _weight_grad_dot(i, o).invars[0].aval
    assert lhs.shape[-1] == (o if o < i else i), (shape, lhs.shape)
