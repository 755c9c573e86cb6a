"""Logits parity of jaxsd.models with transformers' PyTorch models, HF I/O round trips, errors."""

from __future__ import annotations

import dataclasses
import json
import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file

from jaxsd.models import (
    LoraConfig,
    ModelConfig,
    Transformer,
    from_pretrained,
    lora_disabled,
    merge_lora,
    read_config,
    save_pretrained,
    set_lora_enabled,
    to_hf_state_dict,
)
from jaxsd.models.attention import _MASK_VALUE, attend, attention_mask

TOL = 1e-4
B, T = 3, 9


def _random_model(config: ModelConfig, lora: LoraConfig | None = None, seed: int = 0):
    """A Transformer with every parameter random (norms near 1, adapters' B non-zero).

    Built shape-only and filled from numpy: eager jax init would compile once per shape.
    """
    model = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(seed), lora=lora))
    rng = np.random.RandomState(seed)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        noise = 0.1 * rng.standard_normal(var.shape).astype(np.float32)
        value = 1.0 + noise if "norm" in "".join(map(str, path)) else noise
        var.set_value(jnp.asarray(value, var.dtype))
    return model


@nnx.jit
def _forward(model, ids, mask):
    return model(ids, mask)


@nnx.jit
def _hidden_and_head(model, ids, mask):
    return model.hidden_states(ids, mask), model.lm_head_weight()


def _randomise_(model: torch.nn.Module, seed: int) -> None:
    """Give every weight (norm scales included, which HF initialises to 1) a random value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.1
            p.copy_(1.0 + noise if "norm" in name else noise)


def _batch(vocab: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """ids [B, T] and a mask with one unpadded, one right-padded and one left-padded row."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(0, vocab, (B, T))
    mask = np.ones((B, T), np.int64)
    mask[1, T - 3 :] = 0  # right padding
    mask[2, :4] = 0  # left padding
    return ids, mask


def _hf_logits(hf_model, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    # HF defaults positions to 0..T-1 even with left padding; the contract (and sampling)
    # counts real tokens, so pass the same positions to both.
    pos = np.maximum(mask.cumsum(-1) - 1, 0)
    with torch.no_grad():
        out = hf_model(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            position_ids=torch.tensor(pos),
        )
    return out.logits.float().numpy()


def _max_diff(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    return float(np.abs(a - b)[mask.astype(bool)].max())


def _make_hf(tmp_path, cls, cfg, seed: int):
    torch.manual_seed(seed)
    hf = cls(cfg).eval()
    _randomise_(hf, seed)
    hf.save_pretrained(tmp_path)
    return hf


QWEN3_CASES = {
    # name: (hidden, heads, kv_heads, head_dim, layers, tied, theta)
    "mha_untied": (48, 4, 4, 12, 2, False, 1e6),
    "gqa2_tied": (64, 4, 2, 16, 2, True, 1e4),
    "gqa4_untied_wide_heads": (32, 8, 2, 8, 3, False, 5e5),
}


@pytest.mark.parametrize("case", sorted(QWEN3_CASES))
def test_qwen3_logits_match_transformers(tmp_path, case):
    hidden, heads, kv, hd, layers, tied, theta = QWEN3_CASES[case]
    cfg = transformers.Qwen3Config(
        vocab_size=101,
        hidden_size=hidden,
        intermediate_size=2 * hidden + 8,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=hd,
        tie_word_embeddings=tied,
        rope_theta=theta,
        rms_norm_eps=1e-6,
    )
    hf = _make_hf(tmp_path, transformers.Qwen3ForCausalLM, cfg, seed=len(case))
    model, config = from_pretrained(tmp_path)
    assert (config.num_kv_heads, config.tie_word_embeddings, config.rope_theta) == (kv, tied, theta)
    assert (model.lm_head is None) == tied
    ids, mask = _batch(cfg.vocab_size, seed=1)
    logits = np.asarray(_forward(model, ids, mask))
    chex.assert_shape(logits, (B, T, cfg.vocab_size))
    assert _max_diff(logits, _hf_logits(hf, ids, mask), mask) <= TOL
    # hidden_states @ lm_head_weight is the same LM head the train step applies in chunks.
    h, w = _hidden_and_head(model, ids, mask)
    chex.assert_shape(h, (B, T, hidden))
    chunked = np.asarray(h) @ np.asarray(w)
    np.testing.assert_allclose(chunked, logits, atol=1e-5)
    # Without a mask every position is real and positions are 0..T-1.
    full = np.asarray(_forward(model, ids, None))
    ones = np.ones_like(mask)
    assert _max_diff(full, _hf_logits(hf, ids, ones), ones) <= TOL


# Two shapes the family cases share: 4 heads of 8 and 6 heads of 8, both with 2 kv heads.
NARROW = dict(vocab_size=89, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
WIDE = NARROW | dict(hidden_size=48, intermediate_size=64, num_attention_heads=6)
OLMO3_SLIDING = dict(sliding_window=3, pad_token_id=0)
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4}
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}  # fmt: skip
FAMILY_CASES = {
    "llama": (
        transformers.LlamaForCausalLM,
        lambda: transformers.LlamaConfig(**WIDE, rope_theta=1e4, tie_word_embeddings=False),
    ),
    "qwen2_bias": (
        transformers.Qwen2ForCausalLM,
        lambda: transformers.Qwen2Config(**NARROW, tie_word_embeddings=True),
    ),
    "olmo3_post_norm_sliding": (
        transformers.Olmo3ForCausalLM,
        lambda: transformers.Olmo3Config(
            **NARROW, **OLMO3_SLIDING, layer_types=["sliding_attention", "full_attention"]
        ),
    ),
    # YaRN with a tiny original context so that the interpolated and the ramped frequencies
    # and the attention scale all act within the test's positions.
    "qwen3_yarn": (
        transformers.Qwen3ForCausalLM,
        lambda: transformers.Qwen3Config(
            **WIDE | dict(num_attention_heads=4, head_dim=16),
            max_position_embeddings=32,
            rope_parameters=YARN | {"rope_theta": 1e4},
        ),
    ),
    # Llama 3.1's scaling; with head_dim 8 and theta 1e4 the wavelengths (6, 63, 628, 6283)
    # fall in the blended band (4..16) and in the stretched one.
    "llama3_rope_scaling": (
        transformers.LlamaForCausalLM,
        lambda: transformers.LlamaConfig(
            **WIDE, max_position_embeddings=128, rope_parameters=LLAMA3 | {"rope_theta": 1e4}
        ),
    ),
    # OLMo-3 (its released checkpoints extend 8K -> 65K with YaRN): a flat rope_scaling acts
    # on the full-attention layers only; the sliding layer keeps default RoPE, another theta.
    "olmo3_yarn_full_layers": (
        transformers.Olmo3ForCausalLM,
        lambda: transformers.Olmo3Config(
            **NARROW | dict(num_hidden_layers=3),
            **OLMO3_SLIDING,
            layer_types=["sliding_attention", "full_attention", "full_attention"],
            max_position_embeddings=32,
            rope_scaling=YARN | {"attention_factor": 1.3, "beta_fast": 16.0},
            rope_theta=1e4,
        ),
    ),
}


@pytest.mark.parametrize("family", sorted(FAMILY_CASES))
def test_family_switch_logits_match_transformers(tmp_path, family):
    cls, make_cfg = FAMILY_CASES[family]
    cfg = make_cfg()
    hf = _make_hf(tmp_path, cls, cfg, seed=7)
    model, config = from_pretrained(tmp_path)
    assert config.model_type == cfg.model_type
    ids, mask = _batch(cfg.vocab_size, seed=2)
    if family.startswith("olmo3"):
        # Sliding windows count slots (HF cache positions); with padding inside the window HF
        # and we agree, but keep this case unpadded so the window is the thing under test.
        mask = np.ones_like(mask)
    logits = np.asarray(_forward(model, ids, mask))
    assert _max_diff(logits, _hf_logits(hf, ids, mask), mask) <= TOL
    if "yarn" in family or "rope_scaling" in family:
        assert config.rope_scaling is not None
        # The scaling matters at these positions: the same weights without it differ.
        plain = dataclasses.replace(config, rope_scaling=None, sliding_rope=None)
        unscaled = Transformer(plain, rngs=nnx.Rngs(0))
        nnx.update(unscaled, nnx.state(model, nnx.Param))
        assert _max_diff(np.asarray(_forward(unscaled, ids, mask)), logits, mask) > 100 * TOL
        # save_pretrained writes the scaling back: transformers reads the same model.
        save_pretrained(model, config, tmp_path / "saved")
        assert read_config(tmp_path / "saved") == config
        again = cls.from_pretrained(tmp_path / "saved").eval()
        assert _max_diff(logits, _hf_logits(again, ids, mask), mask) <= TOL


def test_unsupported_rope_scaling_is_named(tmp_path):
    cfg = transformers.LlamaConfig(
        **NARROW, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}
    )
    _make_hf(tmp_path, transformers.LlamaForCausalLM, cfg, seed=0)
    with pytest.raises(ValueError, match="rope scaling 'linear' is not supported"):
        from_pretrained(tmp_path)


TINY = ModelConfig(
    vocab_size=83,
    hidden_size=32,
    intermediate_size=40,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    rope_theta=1e4,
)


def test_save_pretrained_loads_in_transformers_with_same_logits(tmp_path):
    model = _random_model(TINY)
    save_pretrained(model, TINY, tmp_path)
    hf_cfg = json.loads((tmp_path / "config.json").read_text())
    assert hf_cfg["architectures"] == ["Qwen3ForCausalLM"]
    assert (hf_cfg["model_type"], hf_cfg["torch_dtype"]) == ("qwen3", "float32")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(hf, transformers.Qwen3ForCausalLM)
    ids, mask = _batch(TINY.vocab_size, seed=3)
    logits = np.asarray(_forward(model, ids, mask))
    assert _max_diff(logits, _hf_logits(hf, ids, mask), mask) <= TOL
    # And back into JAX: identical parameters.
    again, _ = from_pretrained(tmp_path)
    chex.assert_trees_all_equal(to_hf_state_dict(again, TINY), to_hf_state_dict(model, TINY))


def test_sharded_checkpoint_round_trip(tmp_path):
    cfg = ModelConfig(**{**TINY.__dict__, "tie_word_embeddings": True})
    model = _random_model(cfg, seed=4)
    save_pretrained(model, cfg, tmp_path, max_shard_bytes=20_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert "lm_head.weight" not in index["weight_map"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    again, _ = from_pretrained(tmp_path)
    ids, mask = _batch(cfg.vocab_size, seed=5)
    ours = np.asarray(_forward(again, ids, mask))
    assert _max_diff(ours, _hf_logits(hf, ids, mask), mask) <= TOL


def test_lora_merge_round_trip_and_disable(tmp_path):
    lora = LoraConfig(rank=4, alpha=8.0, targets=("q", "v", "o", "up", "down"))
    model = _random_model(TINY, lora=lora, seed=6)
    ids, mask = _batch(TINY.vocab_size, seed=6)
    x, m = jnp.asarray(ids), jnp.asarray(mask)
    with_adapters = np.asarray(_forward(model, x, m))
    # Reference base model: the same base weights, no adapters, built independently.
    base = nnx.eval_shape(lambda: Transformer(TINY, rngs=nnx.Rngs(0)))
    nnx.update(base, nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))))
    base_logits = np.asarray(_forward(base, x, m))
    assert _max_diff(with_adapters, base_logits, mask) > 1e-2  # the adapters matter
    # Merged model == adapter model; saved and re-read by transformers, still equal.
    merged = merge_lora(model)
    assert not nnx.state(merged, nnx.LoRAParam)
    assert _max_diff(np.asarray(_forward(merged, x, m)), with_adapters, mask) <= TOL
    save_pretrained(model, TINY, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert _max_diff(_hf_logits(hf, ids, mask), with_adapters, mask) <= TOL
    # Disabled adapters give the base model (fixed SSOPD teacher), functionally or by flag.
    graphdef, state = nnx.split(model)
    teacher = nnx.merge(graphdef, lora_disabled(state))
    assert _max_diff(np.asarray(_forward(teacher, x, m)), base_logits, mask) <= 1e-5
    set_lora_enabled(model, False)
    assert _max_diff(np.asarray(_forward(model, x, m)), base_logits, mask) <= 1e-5


def test_bf16_params_track_fp32(tmp_path):
    model = _random_model(TINY, seed=8)
    save_pretrained(model, TINY, tmp_path)
    bf, cfg = from_pretrained(tmp_path, dtype=jnp.bfloat16)
    assert cfg.param_dtype == cfg.compute_dtype == "bfloat16"
    assert bf.layers[0].self_attn.q_proj.kernel[...].dtype == jnp.bfloat16
    ids, mask = _batch(TINY.vocab_size, seed=8)
    ref = np.asarray(_forward(model, ids, mask))
    out = np.asarray(_forward(bf, ids, mask))
    assert np.isfinite(out).all()
    scale = np.abs(ref).max()
    assert _max_diff(out, ref, mask) <= 0.05 * scale
    # bf16 save writes bf16 tensors and says so in config.json.
    save_pretrained(bf, cfg, tmp_path / "bf")
    assert json.loads((tmp_path / "bf" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert load_file(tmp_path / "bf" / "model.safetensors")["model.norm.weight"].dtype.name == (
        "bfloat16"
    )


# ---------------------------------------------------------------- bad inputs


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    save_pretrained(_random_model(TINY, seed=9), TINY, path)
    return path


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_files_are_named(saved_tiny, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        from_pretrained(tmp_path / "nope")
    no_cfg = _copy(saved_tiny, tmp_path / "no_cfg")
    (no_cfg / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        from_pretrained(no_cfg)
    no_w = _copy(saved_tiny, tmp_path / "no_w")
    (no_w / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        from_pretrained(no_w)


def test_unknown_architecture_is_named(saved_tiny, tmp_path):
    d = _copy(saved_tiny, tmp_path / "gpt2")
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="gpt2.*supported model types"):
        from_pretrained(d)


def test_shape_mismatch_names_tensor_and_file(saved_tiny, tmp_path):
    d = _copy(saved_tiny, tmp_path / "bad")
    tensors = load_file(d / "model.safetensors")
    name = "model.layers.1.self_attn.k_proj.weight"
    tensors[name] = np.zeros((5, TINY.hidden_size), np.float32)
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"{name} in .*model.safetensors has shape \(5, 32\)"):
        from_pretrained(d)
    del tensors[name]
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"{name} is missing"):
        from_pretrained(d)


def test_unreachable_hub_name_says_pass_a_local_path(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="local folder"):
        from_pretrained("Qwen/Qwen3-0.6B-not-cached")


def _torch_attention(q, k, v, mask):
    """Plain GQA attention in torch (kv heads repeated), masked scores set to _MASK_VALUE."""
    g = q.shape[2] // k.shape[2]
    k, v = (x.repeat_interleave(g, dim=2) for x in (k, v))
    scores = torch.einsum("btnd,bsnd->bnts", q, k) * q.shape[-1] ** -0.5
    scores = scores.masked_fill(~mask[:, None], _MASK_VALUE)
    return torch.einsum("bnts,bsnd->btnd", torch.softmax(scores, dim=-1), v)


def test_attention_value_and_gradients_match_torch_autograd():
    """`attend`'s hand-written backward vs torch autograd of the textbook formula, GQA with
    causal, right-padded and fully masked (left-padding) query rows, non-zero cotangents."""
    rng = np.random.RandomState(0)
    b, t, n, k, d = 3, 7, 6, 2, 8
    q, kk, v, cot = (rng.standard_normal(s).astype(np.float32) for s in
                     [(b, t, n, d), (b, t, k, d), (b, t, k, d), (b, t, n, d)])  # fmt: skip
    valid = np.ones((b, t), bool)
    valid[1, 5:] = False  # right padding
    valid[2, :3] = False  # left padding: query rows 0-2 see no valid key at all
    mask = np.asarray(attention_mask(jnp.arange(t), jnp.asarray(valid), None))
    assert (~mask[2, :3]).all()  # the fully masked rows are under test

    def ours(q, kk, v):
        return jnp.sum(attend(q, kk, v, jnp.asarray(mask)) * cot)

    value, grads = jax.jit(jax.value_and_grad(ours, argnums=(0, 1, 2)))(q, kk, v)
    tq, tk, tv = (torch.tensor(x, requires_grad=True) for x in (q, kk, v))
    ref = torch.sum(_torch_attention(tq, tk, tv, torch.tensor(mask)) * torch.tensor(cot))
    ref.backward()
    np.testing.assert_allclose(float(value), ref.item(), rtol=1e-5, atol=1e-5)
    for ours_g, ref_t in zip(grads, (tq, tk, tv), strict=True):
        np.testing.assert_allclose(np.asarray(ours_g), ref_t.grad.numpy(), rtol=1e-4, atol=1e-5)


OUTPUT_INDEX_CASES = {
    "qwen3": TINY,
    "olmo3_sliding": dataclasses.replace(
        TINY,
        model_type="olmo3",
        qk_norm_scope="full",
        norm_placement="post",
        sliding_window=3,
        layer_types=("sliding_attention", "full_attention"),
    ),
}


@pytest.mark.parametrize("case", sorted(OUTPUT_INDEX_CASES))
def test_hidden_states_at_output_index_equal_indexed_full_forward(case):
    """`output_index` (the last layer on R rows only) == indexing the full hidden states, in
    value and in the parameter gradient of a weighted sum."""
    model = _random_model(OUTPUT_INDEX_CASES[case])
    ids, mask = _batch(TINY.vocab_size, seed=3)
    index = np.array([[8, 2, 5, 6], [0, 1, 4, 5], [4, 6, 7, 8]])  # unsorted, repeats allowed
    weight = np.random.RandomState(1).standard_normal((B, 4, TINY.hidden_size))
    graphdef, params = nnx.split(model)

    def loss(params, rows):
        m = nnx.merge(graphdef, params)
        if rows:
            h = m.hidden_states(ids, mask, output_index=index)
        else:
            h = jnp.take_along_axis(m.hidden_states(ids, mask), index[..., None], axis=1)
        return jnp.sum(h * weight), h

    (_, h_rows), g_rows = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)(
        params, True
    )
    (_, h_full), g_full = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)(
        params, False
    )
    assert h_rows.shape == (B, 4, TINY.hidden_size)
    np.testing.assert_allclose(np.asarray(h_rows), np.asarray(h_full), rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(g_rows, g_full, rtol=1e-4, atol=1e-5)
