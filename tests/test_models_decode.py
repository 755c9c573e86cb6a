"""KV-cache decode: prefill + token-by-token logits equal the full forward's at every position."""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxsd.models import ModelConfig, Transformer
from jaxsd.models.config import Rope, YarnRope

TOL = 1e-4
# One sliding layer (window 4 slots) and one full layer, q/k-norm on, GQA 2.
CFG = ModelConfig(
    vocab_size=71, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
    num_kv_heads=2, head_dim=8, rope_theta=1e4, sliding_window=4,
    layer_types=("sliding_attention", "full_attention"),
)  # fmt: skip
# The same with YaRN on the full layer and another RoPE on the sliding one (OLMo-3's layout):
# decode must rotate each cached key as the full forward does.
CFG_YARN = dataclasses.replace(
    CFG,
    rope_scaling=YarnRope(factor=4.0, original_max_position_embeddings=4),
    sliding_rope=Rope(theta=5e5),
)
P, N = 6, 5  # padded prompt length, continuation length


@pytest.fixture(scope="module", params=[CFG, CFG_YARN], ids=["default_rope", "yarn_rope"])
def model_fns(request):
    model = nnx.eval_shape(lambda: Transformer(request.param, rngs=nnx.Rngs(0)))
    rng = np.random.RandomState(1)  # numpy init: eager jax init compiles once per shape
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        noise = 0.2 * rng.standard_normal(var.shape).astype(np.float32)
        var.set_value(jnp.asarray(1.0 + noise if "norm" in "".join(map(str, path)) else noise))
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, ids, mask):
        return nnx.merge(graphdef, state)(ids, mask)

    @jax.jit
    def decode(state, ids, pos, cache, cache_mask):
        return nnx.merge(graphdef, state).decode(ids, pos, cache, cache_mask)

    return model, state, forward, decode


def test_prefill_then_token_steps_match_full_forward(model_fns):
    model, state, forward, decode = model_fns
    rng = np.random.RandomState(0)
    prompt_lens = np.array([6, 3, 1])  # left-padded to P
    b = len(prompt_lens)
    prompt_mask = (np.arange(P)[None] >= P - prompt_lens[:, None]).astype(np.int32)
    prompt = rng.randint(0, CFG.vocab_size, (b, P)) * prompt_mask
    cont = rng.randint(0, CFG.vocab_size, (b, N))
    full_ids = np.concatenate([prompt, cont], axis=1)
    full_mask = np.concatenate([prompt_mask, np.ones((b, N), np.int32)], axis=1)
    ref = np.asarray(forward(state, jnp.asarray(full_ids), jnp.asarray(full_mask)))

    cache = model.init_cache(b, P + N)
    chex.assert_shape(cache["k"][0], (b, P + N, CFG.num_kv_heads, CFG.head_dim))
    cache_mask = np.zeros((b, P + N), np.int32)
    cache_mask[:, :P] = prompt_mask
    pos = np.maximum(prompt_mask.cumsum(-1) - 1, 0)
    logits, cache = decode(state, jnp.asarray(prompt), jnp.asarray(pos), cache, cache_mask)
    chex.assert_shape(logits, (b, P, CFG.vocab_size))
    real = prompt_mask.astype(bool)
    assert np.abs(np.asarray(logits) - ref[:, :P])[real].max() <= TOL
    assert int(cache["index"]) == P

    next_pos = prompt_lens.copy()  # position of the first generated token
    for i in range(N):
        cache_mask[:, P + i] = 1
        ids = jnp.asarray(cont[:, i : i + 1])
        step_pos = jnp.asarray(next_pos[:, None] + i)
        logits, cache = decode(state, ids, step_pos, cache, jnp.asarray(cache_mask))
        chex.assert_shape(logits, (b, 1, CFG.vocab_size))
        np.testing.assert_allclose(np.asarray(logits)[:, 0], ref[:, P + i], atol=TOL, rtol=0)
    assert int(cache["index"]) == P + N


def test_slots_outside_cache_mask_are_ignored(model_fns):
    """A token written into a slot that cache_mask excludes has no effect on later steps."""
    model, state, _, decode = model_fns
    b = 3  # same shapes as the test above, so the compiled prefill/step are reused
    rng = np.random.RandomState(3)
    prompt_mask = np.zeros((b, P), np.int32)
    prompt_mask[:, P - 2 :] = 1  # two real prompt tokens, left-padded
    prompt = jnp.asarray(rng.randint(0, CFG.vocab_size, (b, P)) * prompt_mask)
    x = jnp.asarray(rng.randint(0, CFG.vocab_size, (b, 1)))
    garbage = jnp.asarray(rng.randint(0, CFG.vocab_size, (b, 1)))
    mask = np.zeros((b, P + N), np.int32)
    mask[:, :P] = prompt_mask
    pos = jnp.asarray(np.maximum(prompt_mask.cumsum(-1) - 1, 0))
    _, c = decode(state, prompt, pos, model.init_cache(b, P + N), mask)
    at2 = jnp.full((b, 1), 2)
    mask[:, P] = 1
    clean, _ = decode(state, x, at2, c, mask)  # x in slot P, position 2
    # Garbage goes to slot P; x goes to slot P+1 with slot P masked out. The window (4 slots)
    # still covers both real prompt tokens, so both runs see the same tokens at the same
    # positions.
    _, c2 = decode(state, garbage, at2, c, mask)
    skip = mask.copy()
    skip[:, P], skip[:, P + 1] = 0, 1
    dirty, _ = decode(state, x, at2, c2, skip)
    np.testing.assert_allclose(np.asarray(dirty), np.asarray(clean), atol=1e-5, rtol=0)
    seen = skip.copy()
    seen[:, P] = 1  # the same step attending to the garbage slot does change the logits
    polluted, _ = decode(state, x, at2, c2, seen)
    assert np.abs(np.asarray(polluted) - np.asarray(clean)).max() > 1e-3
