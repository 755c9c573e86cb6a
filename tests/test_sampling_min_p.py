"""Min-p sampling (evaluation sampling's `rollout.eval_min_p`): the embedded sampler keeps
exactly the tokens with p >= min_p * p_max of the tempered distribution (HF's
MinPLogitsWarper, vLLM's min_p), and the vLLM worker gets the same knob."""

import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsd.models import sampler
from jaxsd.rollout.engine import SamplingConfig


class Recorder(types.SimpleNamespace):
    pass


def kept_np(logits, temperature, min_p):
    p = np.exp(logits / temperature - np.max(logits / temperature))
    p /= p.sum()
    return set(np.flatnonzero(p >= min_p * p.max()))


@pytest.mark.parametrize("min_p", [0.0, 0.05, 0.3, 1.0])
def test_min_p_keeps_the_tokens_hf_keeps(min_p):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 50)).astype(np.float32) * 3
    out = sampler.sampling_logits(
        jnp.asarray(logits), jnp.float32(0.7), jnp.int32(0), jnp.float32(1.0), jnp.float32(min_p)
    )
    for row in range(6):
        assert set(np.flatnonzero(np.isfinite(np.asarray(out[row])))) == kept_np(
            logits[row], 0.7, min_p
        )


def test_min_p_after_top_k_and_sampled_tokens_stay_inside():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(256, 40)).astype(np.float32) * 2
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.key(0), jnp.arange(256))
    tokens, _, slogp = sampler.sample_step(
        keys, jnp.int32(0), jnp.asarray(logits), jnp.float32(1.0), jnp.int32(20),
        jnp.float32(1.0), jnp.float32(0.2),
    )  # fmt: skip
    for row, tok in enumerate(np.asarray(tokens)):
        top20 = set(np.argsort(-logits[row])[:20])
        assert tok in top20 and tok in kept_np(logits[row], 1.0, 0.2)
    assert np.all(np.isfinite(np.asarray(slogp)))


def test_sampling_config_checks_min_p_and_the_vllm_params_carry_it(monkeypatch):
    with pytest.raises(ValueError, match="min_p"):
        SamplingConfig(min_p=1.5)
    from jaxsd.rollout.vllm_server import sampling_params

    # vLLM's SamplingParams takes these as keywords; a stand-in records them (importing vllm
    # here would cost ~30 s of test time)
    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(SamplingParams=Recorder))
    params = sampling_params(SamplingConfig(top_k=20, min_p=0.05, top_p=0.95), n=2, prompt_index=0)
    assert (params.top_k, params.min_p, params.top_p) == (20, 0.05, 0.95)
