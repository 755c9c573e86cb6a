"""Runtime switches of the model: attention implementation and per-layer rematerialisation.

Each alternative must give the same numbers as the default path (ours, no remat) on every
real (unpadded) position, forward and backward, and the trainer must honour the config keys.
"""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxsd.models.attention import attend, attend_with
from jaxsd.models.config import ModelConfig
from jaxsd.models.qwen3 import Transformer

CFG = ModelConfig(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
    num_kv_heads=2, head_dim=8,
)  # fmt: skip
B, T = 3, 10


def _batch():
    ids = jax.random.randint(jax.random.key(1), (B, T), 0, CFG.vocab_size)
    # Left padding of different lengths (row 0 none), as the rollout batches have.
    pad = np.array([0, 3, 6])
    valid = jnp.asarray(np.arange(T)[None, :] >= pad[:, None])
    return ids, valid


def _model(config: ModelConfig) -> Transformer:
    return Transformer(config, rngs=nnx.Rngs(0))


def _loss_and_grads(config: ModelConfig, output_index=None):
    """Masked mean log-likelihood of the next token over real positions, and its gradient."""
    ids, valid = _batch()
    graphdef, params = nnx.split(_model(config))

    def loss(p):
        model = nnx.merge(graphdef, p)
        h = model.hidden_states(ids, valid, output_index=output_index)
        logp = jax.nn.log_softmax(model.logits(h).astype(jnp.float32), axis=-1)
        rows = ids if output_index is None else jnp.take_along_axis(ids, output_index, 1)
        tok = jnp.take_along_axis(logp, jnp.roll(rows, -1, axis=1)[..., None], -1)[..., 0]
        w = valid if output_index is None else jnp.take_along_axis(valid, output_index, 1)
        return jnp.sum(tok * w) / jnp.sum(w), h

    (value, h), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return value, h, grads


def test_attend_with_xla_matches_ours_on_rows_that_see_a_key():
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(kq, (2, 5, 4, 8))
    k = jax.random.normal(kk, (2, 7, 2, 8))
    v = jax.random.normal(kv, (2, 7, 2, 8))
    mask = jax.random.bernoulli(jax.random.key(3), 0.6, (2, 5, 7)).at[:, :, 0].set(True)
    ours = jax.jit(attend)(q, k, v, mask)
    with_impl = jax.jit(attend_with, static_argnums=0)
    chex.assert_trees_all_close(with_impl("xla", q, k, v, mask), ours, atol=1e-5)
    chex.assert_trees_all_close(with_impl("jaxsd", q, k, v, mask), ours, atol=0)


@pytest.mark.parametrize("output_index", [None, "last_rows"])
def test_xla_attention_matches_ours_forward_and_backward(output_index):
    index = None if output_index is None else jnp.tile(jnp.arange(T - 4, T), (B, 1))
    ref_loss, ref_h, ref_g = _loss_and_grads(CFG, index)
    loss, h, g = _loss_and_grads(dataclasses.replace(CFG, attention="xla"), index)
    _, valid = _batch()
    rows = valid if index is None else jnp.take_along_axis(valid, index, 1)
    np.testing.assert_allclose(np.asarray(h)[rows], np.asarray(ref_h)[rows], atol=2e-5)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    chex.assert_trees_all_close(g, ref_g, atol=2e-5, rtol=1e-4)
    assert np.all(np.isfinite(np.asarray(h)))  # padding rows see themselves: no NaN


def test_remat_gives_the_same_loss_and_gradient():
    ref_loss, _, ref_g = _loss_and_grads(CFG)
    loss, _, g = _loss_and_grads(dataclasses.replace(CFG, remat=True))
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    chex.assert_trees_all_close(g, ref_g, atol=1e-6, rtol=1e-5)


def test_remat_recomputes_in_the_backward_pass():
    """With remat the jitted gradient holds a checkpoint (remat) region per layer."""
    ids, valid = _batch()

    def grad_jaxpr(config):
        graphdef, params = nnx.split(_model(config))
        f = lambda p: jnp.sum(nnx.merge(graphdef, p).hidden_states(ids, valid))  # noqa: E731
        return str(jax.make_jaxpr(jax.grad(f))(params))

    assert grad_jaxpr(dataclasses.replace(CFG, remat=True)).count("remat") >= CFG.num_layers
    assert "remat" not in grad_jaxpr(CFG)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(attention="flash"), "attention='flash'"),
        (dict(attention="cudnn"), "compute_dtype 'bfloat16'"),
    ],
)
def test_bad_runtime_switches_are_rejected(change, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(CFG, **change)


def test_cudnn_with_bf16_compute_is_accepted():
    config = dataclasses.replace(CFG, attention="cudnn", compute_dtype="bfloat16")
    assert config.attention == "cudnn"
