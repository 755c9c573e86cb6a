"""Continuous batching (`generate(slots=S)`) and the bf16 KV cache, against the padded sampler
(itself checked against a full forward and transformers in test_models_sampler.py),
transformers' generate, and an fp32 cache.

All calls share one shape (batch bucket 8, prompt bucket 32, 8 new tokens) so each slot count
compiles once.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from jaxsd.models import continuous, sampler
from jaxsd.models.io import from_pretrained

M = 8
KW = dict(max_new_tokens=M, batch_buckets=(8,), length_buckets=(32,))


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return from_pretrained(tiny_model_dir)[0]


@pytest.fixture(scope="module")
def prompts(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    texts = ["What is 2+3?", "Hi", "Weather today, briefly?"]
    ids = [tok.encode(t) for t in texts]
    assert len({len(i) for i in ids}) == 3  # ragged prompts
    return ids


def _stops(model, prompts, temperature=0.0):
    """Stop ids that end some rows early and leave others running (varied lengths)."""
    if temperature > 0:
        return list(range(0, model.config.vocab_size, 8))  # ~1/8 of the draws stop a row
    greedy = sampler.generate(model, prompts, n=2, temperature=0.0, **KW)
    return [greedy.token_ids[0][2], greedy.token_ids[2][5]]


@pytest.mark.parametrize("temperature, slots", [(0.0, 3), (1.0, 2)])
def test_slots_return_the_padded_samplers_rows(model, prompts, temperature, slots):
    stops = _stops(model, prompts, temperature)
    kw = dict(n=2, temperature=temperature, seed=11, stop_token_ids=stops, **KW)
    padded = sampler.generate(model, prompts, **kw)
    refilled = sampler.generate(model, prompts, slots=slots, **kw)
    lengths = [len(t) for t in padded.token_ids]
    assert min(lengths) < M and "length" in padded.finish_reasons  # slots really get refilled
    assert refilled.token_ids == padded.token_ids
    assert refilled.finish_reasons == padded.finish_reasons
    assert refilled.prompt_index == padded.prompt_index
    for name in ("logprobs", "sampling_logprobs"):
        for a, b in zip(getattr(refilled, name), getattr(padded, name), strict=True):
            np.testing.assert_allclose(a, b, atol=1e-5)


def test_greedy_slots_equal_transformers_generate(tiny_model_dir, model, prompts):
    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    stops = _stops(model, prompts)
    ours = sampler.generate(model, prompts, temperature=0.0, stop_token_ids=stops, slots=2, **KW)
    for r, prompt in enumerate(prompts):
        with torch.no_grad():
            ref = hf.generate(
                torch.tensor([prompt]), do_sample=False, max_new_tokens=M, eos_token_id=stops,
                pad_token_id=hf.generation_config.pad_token_id,
            )[0, len(prompt) :].tolist()  # fmt: skip
        stop_at = next((i for i, t in enumerate(ref) if t in stops), None)
        assert ours.token_ids[r] == (ref if stop_at is None else ref[: stop_at + 1])


def test_a_rows_samples_depend_on_seed_and_row_not_on_slots_or_batch_mates(model, prompts):
    kw = dict(n=2, temperature=1.0, **KW)
    a = sampler.generate(model, [prompts[0], prompts[1]], seed=4, slots=2, **kw)
    b = sampler.generate(model, [prompts[0], prompts[2]], seed=4, slots=3, **kw)
    again = sampler.generate(model, [prompts[0], prompts[1]], seed=4, slots=2, **kw)
    other = sampler.generate(model, [prompts[0], prompts[1]], seed=5, slots=2, **kw)
    assert a.token_ids == again.token_ids
    assert a.token_ids[:2] == b.token_ids[:2]  # prompt 0's rows, other mates and slot count
    assert a.token_ids[:2] != other.token_ids[:2]


def test_sample_step_with_per_row_steps_draws_each_rows_own_step():
    keys = jax.random.split(jax.random.key(3), 4)
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(4, 50)), jnp.float32)
    steps = jnp.asarray([0, 5, 2, 9])
    args = (jnp.float32(1.0), jnp.int32(0), jnp.float32(1.0))
    per_row, _, _ = sampler.sample_step(keys, steps, logits, *args)
    for i in range(4):
        alone, _, _ = sampler.sample_step(keys[i : i + 1], steps[i], logits[i : i + 1], *args)
        assert int(per_row[i]) == int(alone[0])
    scalar, _, _ = sampler.sample_step(keys, jnp.int32(5), logits, *args)
    assert int(scalar[1]) == int(per_row[1])


def test_bf16_kv_cache_halves_memory_and_keeps_logits_close(model, prompts):
    kw = dict(temperature=0.0, **KW)
    fp32 = sampler.generate(model, prompts, **kw)
    bf16 = sampler.generate(model, prompts, kv_dtype="bfloat16", **kw)
    bf16_slots = sampler.generate(model, prompts, kv_dtype="bfloat16", slots=2, **kw)
    assert bf16_slots.token_ids == bf16.token_ids
    for a, b in zip(fp32.logprobs, bf16.logprobs, strict=True):
        # bf16 keeps 8 mantissa bits of K and V: errors of ~1e-3 relative in the scores
        np.testing.assert_allclose(a, b, atol=2e-2)
    cache = model.init_cache(2, 16, jnp.bfloat16)
    assert cache["k"][0].dtype == jnp.bfloat16
    assert continuous.kv_bytes_per_row(model.config, 16, "bfloat16") * 2 == (
        continuous.kv_bytes_per_row(model.config, 16, "float32")
    )
    c = model.config
    assert continuous.kv_bytes_per_row(c, 16, "float32") == 2 * c.num_layers * 16 * (
        c.num_kv_heads * c.head_dim * 4
    )


def test_bad_slots_and_kv_dtype_are_named(model, prompts):
    with pytest.raises(ValueError, match="slots=0"):
        sampler.generate(model, prompts, slots=0, **KW)
    with pytest.raises(ValueError, match="kv_dtype='float33'"):
        sampler.generate(model, prompts, kv_dtype="float33", **KW)


def test_slots_refuse_a_sliding_window_model():
    from flax import nnx

    from jaxsd.models import ModelConfig, Transformer

    cfg = ModelConfig(
        vocab_size=71, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=8, rope_theta=1e4, sliding_window=4,
        layer_types=("sliding_attention", "full_attention"),
    )  # fmt: skip
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"layers \[0\] use a sliding window of 4"):
        sampler.generate(model, [[1, 2, 3]], slots=1, max_new_tokens=2)
