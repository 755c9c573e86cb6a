"""Embedded sampler vs independent references: a full forward, transformers' generate, numpy.

Every `generate` call below uses the same shapes (batch bucket 4, prompt bucket 32,
max_new_tokens 8) so the module compiles the sampler once, plus once for the bucket test.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM, AutoTokenizer

from jaxsd.models import sampler
from jaxsd.models.io import from_pretrained

M = 8  # max_new_tokens for every call
REF_LEN = 64  # padded length of the reference forward
KW = dict(max_new_tokens=M, batch_buckets=(4,), length_buckets=(32, 64))


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return from_pretrained(tiny_model_dir)[0]


@pytest.fixture(scope="module")
def prompts(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    chats = [
        [{"role": "user", "content": "What is 2+3?"}],
        [{"role": "user", "content": "Hi"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather?"}],
    ]
    out = [tok.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in chats]
    ids = [tok.encode(text) for text in out]
    assert len({len(i) for i in ids}) == 3 and max(map(len, ids)) <= 32  # ragged, one bucket
    return ids


@pytest.fixture(scope="module")
def greedy(model, prompts):
    return sampler.generate(model, prompts, temperature=0.0, **KW)


@pytest.fixture(scope="module")
def full_logits(model):
    """Logits [len(tokens), V] of one full (no-cache) forward predicting each generated token."""
    graphdef, state = nnx.split(model)
    # Causal attention: right-padding to one fixed length changes nothing before the pad
    # and keeps the reference to a single compile.
    forward = jax.jit(lambda state, ids: nnx.merge(graphdef, state)(ids))

    def logits_of(prompt, tokens):
        ids = list(prompt) + list(tokens)
        logits = forward(state, jnp.asarray([ids + [0] * (REF_LEN - len(ids))]))[0]
        return np.asarray(logits[len(prompt) - 1 : len(ids) - 1], np.float64)

    return logits_of


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _nucleus_np(logits, top_k, top_p):
    """Reference from the definition: top-k set, then the smallest top-p prefix of it."""
    order = np.argsort(-logits, kind="stable")
    if top_k > 0:
        order = order[:top_k]
    probs = np.exp(_log_softmax(logits[order]))
    size = int(np.searchsorted(np.cumsum(probs), top_p) + 1)  # first index with cum >= p
    return set(order[: min(size, len(order))].tolist())


def test_greedy_equals_argmax_of_full_forward(full_logits, prompts, greedy):
    assert greedy.prompt_index == [0, 1, 2]
    for r, prompt in enumerate(prompts):
        tokens = greedy.token_ids[r]
        assert len(tokens) == M and greedy.finish_reasons[r] == "length"
        logits = full_logits(prompt, tokens)
        assert logits.argmax(-1).tolist() == tokens
        np.testing.assert_allclose(
            greedy.logprobs[r], _log_softmax(logits)[np.arange(M), tokens], atol=1e-4
        )
        np.testing.assert_array_equal(greedy.sampling_logprobs[r], 0.0)


def test_greedy_with_stop_ids_equals_transformers_generate(tiny_model_dir, model, prompts):
    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    stops = [hf.generation_config.eos_token_id[0], 0, 1, 2, 3, 4, 5, 6]  # make early stops likely
    ours = sampler.generate(model, prompts, temperature=0.0, stop_token_ids=stops, **KW)
    for r, prompt in enumerate(prompts):
        with torch.no_grad():
            ref = hf.generate(
                torch.tensor([prompt]),
                do_sample=False,
                max_new_tokens=M,
                eos_token_id=stops,
                pad_token_id=hf.generation_config.pad_token_id,
            )[0, len(prompt) :].tolist()
        stop_at = next((i for i, t in enumerate(ref) if t in stops), None)
        expected = ref if stop_at is None else ref[: stop_at + 1]
        assert ours.token_ids[r] == expected
        assert ours.finish_reasons[r] == ("length" if stop_at is None else "stop")


def test_stop_token_ends_sequence_at_first_occurrence(model, prompts, greedy):
    stop = greedy.token_ids[0][3]
    out = sampler.generate(model, prompts, temperature=0.0, stop_token_ids=[stop], **KW)
    for r in range(len(prompts)):
        full = greedy.token_ids[r]
        if stop in full:
            assert out.token_ids[r] == full[: full.index(stop) + 1]
            assert out.finish_reasons[r] == "stop"
        else:
            assert out.token_ids[r] == full and out.finish_reasons[r] == "length"
        assert len(out.logprobs[r]) == len(out.token_ids[r])
    assert out.finish_reasons[0] == "stop" and len(out.token_ids[0]) <= 4


def test_sampled_logprobs_equal_full_forward(model, full_logits, prompts):
    temperature, top_k, top_p = 0.8, 50, 0.9
    out = sampler.generate(
        model, prompts[:2], n=2, temperature=temperature, top_k=top_k, top_p=top_p, seed=3, **KW
    )
    assert out.prompt_index == [0, 0, 1, 1]
    assert out.token_ids[0] != out.token_ids[1]  # n samples of a prompt are distinct draws
    for r, tokens in enumerate(out.token_ids):
        logits = full_logits(prompts[out.prompt_index[r]], tokens)
        steps = np.arange(len(tokens))
        np.testing.assert_allclose(out.logprobs[r], _log_softmax(logits)[steps, tokens], atol=1e-4)
        for t, token in enumerate(tokens):
            kept = sorted(_nucleus_np(logits[t] / temperature, top_k, top_p))
            assert token in kept
            ref = _log_softmax(logits[t][kept] / temperature)[kept.index(token)]
            assert abs(out.sampling_logprobs[r][t] - ref) <= 1e-4


def test_prefill_equals_model_decode_at_the_last_column(model, prompts):
    b, p, s = len(prompts), 32, 40
    prompt_BxP = np.zeros((b, p), np.int32)
    mask_BxS = np.zeros((b, s), np.int32)
    for r, prompt in enumerate(prompts):
        prompt_BxP[r, p - len(prompt) :] = prompt
        mask_BxS[r, p - len(prompt) : p] = 1
    positions_BxP = np.maximum(np.cumsum(mask_BxS[:, :p], axis=1) - 1, 0)
    graphdef, state = nnx.split(model)

    @jax.jit
    def both(state):
        m = nnx.merge(graphdef, state)
        args = (jnp.asarray(prompt_BxP), jnp.asarray(positions_BxP))
        ref_logits, ref_cache = m.decode(*args, m.init_cache(b, s), jnp.asarray(mask_BxS))
        logits, cache = sampler.prefill(m, *args, m.init_cache(b, s), jnp.asarray(mask_BxS))
        return ref_logits[:, -1], ref_cache, logits, cache

    ref_logits, ref_cache, logits, cache = both(state)
    np.testing.assert_allclose(logits, ref_logits, atol=1e-6)
    jax.tree.map(np.testing.assert_array_equal, cache, ref_cache)
    assert int(cache["index"]) == p


def test_temperature_zero_ignores_seed(model, prompts, greedy):
    again = sampler.generate(model, prompts, temperature=0.0, seed=123, top_p=0.5, **KW)
    assert again.token_ids == greedy.token_ids
    np.testing.assert_array_equal(np.stack(again.logprobs), np.stack(greedy.logprobs))


@pytest.mark.parametrize("n, temperature", [(3, 1.0), (2, 0.0), (4, 0.7)])
def test_n_samples_share_one_prefill_and_equal_the_prompt_repeated_n_times(
    model, prompts, n, temperature
):
    kw = dict(temperature=temperature, top_p=0.9, seed=5, max_new_tokens=M)
    shared = sampler.generate(model, prompts[:2], n=n, **kw)
    repeated = [p for p in prompts[:2] for _ in range(n)]
    alone = sampler.generate(model, repeated, n=1, **kw)
    assert shared.prompt_index == [i for i in range(2) for _ in range(n)]
    assert shared.token_ids == alone.token_ids  # same row keys, same prefill per prompt
    for a, b in zip(shared.logprobs, alone.logprobs, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_prefill_runs_once_per_prompt_not_once_per_sample(model, prompts, monkeypatch):
    prefilled_rows = []

    def recording_prefill(m, prompt_BxP, *args):
        prefilled_rows.append(prompt_BxP.shape[0])
        return real_prefill(m, prompt_BxP, *args)

    real_prefill = sampler.prefill
    monkeypatch.setattr(sampler, "prefill", recording_prefill)
    # a max_new_tokens no other test uses, so the sampler is traced here
    out = sampler.generate(model, prompts[:2], n=3, temperature=1.0, max_new_tokens=M + 3)
    assert len(out.token_ids) == 6
    assert prefilled_rows == [3]  # 6 rows pad to 8 = 3 prompt slots x 3 samples (2 real)


def test_fixed_seed_reproduces_and_rows_do_not_depend_on_batch_mates(model, prompts):
    a = sampler.generate(model, [prompts[0], prompts[1]], temperature=1.0, seed=7, **KW)
    b = sampler.generate(model, [prompts[0], prompts[2]], temperature=1.0, seed=7, **KW)
    c = sampler.generate(model, [prompts[0]], temperature=1.0, seed=8, **KW)
    assert a.token_ids[0] == b.token_ids[0]
    np.testing.assert_array_equal(a.logprobs[0], b.logprobs[0])
    assert c.token_ids[0] != a.token_ids[0]


def test_compiles_once_per_bucket(model, prompts, greedy):
    before = sampler.compile_count()
    for length, rows, temperature in [(1, 1, 1.0), (5, 3, 0.0), (32, 4, 0.7), (11, 2, 1.3)]:
        ids = (prompts[0] * 4)[:length]
        out = sampler.generate(
            model, [ids] * rows, temperature=temperature, top_k=rows, stop_token_ids=[rows], **KW
        )
        assert len(out.token_ids) == rows
    assert sampler.compile_count() == before
    sampler.generate(model, [prompts[0] * 4], temperature=0.0, **KW)  # 33+ tokens: bucket 64
    assert sampler.compile_count() == before + 1


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("top_k, top_p", [(0, 0.3), (0, 0.9), (5, 1.0), (7, 0.6), (0, 1.0)])
def test_filter_logits_matches_numpy_nucleus(seed, top_k, top_p):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(3, 40)) * rng.uniform(0.3, 4.0)
    out = np.asarray(sampler.filter_logits(jnp.asarray(logits, jnp.float32), top_k, top_p))
    for row in range(3):
        kept = set(np.flatnonzero(np.isfinite(out[row])).tolist())
        assert kept == _nucleus_np(logits[row], top_k, top_p)
        np.testing.assert_allclose(out[row][sorted(kept)], logits[row][sorted(kept)], rtol=1e-6)


def _filter_with_ties_np(logits, top_k, top_p):
    """Value-based reference: the top k counts every token tied with the k-th largest; the
    nucleus is the sorted prefix whose mass before each token is < top_p, widened to every
    token tied with its last. Returns (kept set, the masses compared with top_p)."""
    finite = logits[np.isfinite(logits)]
    kth = np.sort(logits)[::-1][top_k - 1] if top_k > 0 else -np.inf
    in_k = logits >= kth
    p = np.where(in_k, np.exp(logits - finite.max()), 0.0)
    p = p / p.sum()
    values = np.unique(logits[in_k])[::-1]  # distinct kept values, descending
    mass_above = np.array([p[logits > v].sum() for v in values])
    cutoff = values[mass_above < top_p].min() if top_p < 1 else kth
    return set(np.flatnonzero(logits >= cutoff).tolist()), mass_above


@settings(max_examples=150, deadline=None)
@given(
    values=st.lists(st.sampled_from([-3.0, -1.5, 0.0, 0.25, 1.0, 2.0, -np.inf]), min_size=2,
                    max_size=24),
    top_k=st.integers(0, 6),
    top_p=st.sampled_from([0.1, 0.35, 0.5, 0.7, 0.9, 0.99, 1.0]),
)  # fmt: skip
def test_filter_logits_keeps_ties_and_never_keeps_masked_tokens(values, top_k, top_p):
    logits = np.array(values, np.float32)
    assume(np.isfinite(logits).sum() >= max(top_k, 1))
    kept, mass_above = _filter_with_ties_np(logits.astype(np.float64), top_k, top_p)
    assume(np.all(np.abs(mass_above - top_p) > 1e-5))  # float32 sums may round either way
    # -inf padding to one width: one compile for every example, and more masked tokens
    padded = np.full((1, 24), -np.inf, np.float32)
    padded[0, : len(logits)] = logits
    out = np.asarray(_filter_jit(jnp.asarray(padded), jnp.int32(top_k), jnp.float32(top_p)))[0]
    assert set(np.flatnonzero(np.isfinite(out)).tolist()) == kept
    assert all(np.isfinite(logits[i]) for i in kept)


_filter_jit = jax.jit(sampler.filter_logits)


@pytest.mark.parametrize("with_minus_inf", [False, True])
def test_gumbel_max_sample_draws_what_jax_random_categorical_draws(with_minus_inf):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(64, 300)).astype(np.float32) * 3
    if with_minus_inf:
        logits[rng.random(logits.shape) < 0.7] = -np.inf
    keys = jax.random.split(jax.random.key(3), 64)
    ours = sampler.gumbel_max_sample(keys, jnp.asarray(logits))
    ref = jax.vmap(jax.random.categorical)(keys, jnp.asarray(logits))
    np.testing.assert_array_equal(ours, ref)
    assert np.isfinite(logits[np.arange(64), np.asarray(ours)]).all()


def test_generate_rejects_a_model_with_non_finite_logits(tiny_model_dir, prompts):
    broken, _ = from_pretrained(tiny_model_dir)
    params = nnx.state(broken, nnx.Param)
    nnx.update(broken, jax.tree.map(lambda x: x * jnp.nan, params))
    with pytest.raises(FloatingPointError, match="logits are not finite"):
        sampler.generate(broken, prompts[:1], temperature=1.0, **KW)


def test_sampling_frequencies_follow_the_renormalised_nucleus():
    logits_V = np.log(np.array([0.4, 0.25, 0.15, 0.1, 0.06, 0.04]))
    rows, temperature, top_p = 6000, 1.5, 0.7
    tempered = _log_softmax(logits_V / temperature)
    nucleus = sorted(_nucleus_np(logits_V / temperature, 0, top_p))
    expected = np.zeros(6)
    expected[nucleus] = np.exp(_log_softmax(tempered[nucleus]))
    keys = jax.random.split(jax.random.key(0), rows)
    step = jax.jit(sampler.sample_step)
    tokens, raw_logp, samp_logp = step(
        keys,
        jnp.int32(0),
        jnp.asarray(np.tile(logits_V, (rows, 1)), jnp.float32),
        jnp.float32(temperature),
        jnp.int32(0),
        jnp.float32(top_p),
    )
    tokens = np.asarray(tokens)
    freq = np.bincount(tokens, minlength=6) / rows
    assert set(np.unique(tokens)) <= set(nucleus)
    sigma = np.sqrt(expected * (1 - expected) / rows)
    assert np.all(np.abs(freq - expected) <= 5 * sigma + 1e-12), (freq, expected)
    np.testing.assert_allclose(raw_logp, _log_softmax(logits_V)[tokens], atol=1e-5)
    np.testing.assert_allclose(samp_logp, np.log(expected[tokens]), atol=1e-5)


@pytest.mark.parametrize(
    "prompt_ids, kwargs, message",
    [
        ([[]], {}, "prompt 0 is empty"),
        ([[1, 5000]], {}, "outside"),
        ([[1]], {"top_k": 5000}, "top_k=5000"),
        ([[1]], {"top_p": 0.0}, "top_p=0.0"),
        ([[1]], {"temperature": -1.0}, "temperature=-1.0"),
        ([[1]], {"n": 0}, "n=0"),
        ([[1] * 70], {}, "prompt length=70 exceeds"),
        ([[1]] * 5, {}, "batch size .* exceeds"),
        ([[1] * 10], {"max_new_tokens": 5000}, "max_position_embeddings=4096"),
    ],
)
def test_bad_input_raises_before_compiling(model, prompt_ids, kwargs, message):
    before = sampler.compile_count()
    with pytest.raises(ValueError, match=message):
        sampler.generate(model, prompt_ids, **{**KW, **kwargs})
    assert sampler.compile_count() == before
