"""The tiny model maker writes an HF folder that transformers loads, with a working tokenizer."""

import hashlib
import importlib.util
import json
import pathlib

import hypothesis
import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from jaxsd.models.tiny import make_tiny_model

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _digests(folder: pathlib.Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _load_cli():
    spec = importlib.util.spec_from_file_location(
        "make_tiny_cli", ROOT / "scripts/make_tiny_model.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_transformers_loads_model_with_requested_shapes(tiny_model_dir, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    cfg = model.config
    assert (cfg.model_type, cfg.architectures) == ("qwen3", ["Qwen3ForCausalLM"])
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size) == (64, 2, 128)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (4, 2, 16)
    assert cfg.vocab_size >= len(tokenizer)
    assert cfg.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert cfg.pad_token_id == tokenizer.pad_token_id
    ids = torch.tensor([tokenizer.encode("What is 12 + 30?")])
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], cfg.vocab_size)
    assert torch.isfinite(logits).all()
    gen = json.loads((tiny_model_dir / "generation_config.json").read_text())
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in gen["eos_token_id"]


def test_tied_embeddings_share_one_tensor(tmp_path):
    folder = make_tiny_model(tmp_path, tie_word_embeddings=True, hidden_size=32, head_dim=8)
    tensors = load_file(folder / "model.safetensors")
    assert "lm_head.weight" not in tensors
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert tensors["model.embed_tokens.weight"].shape == (1024, 32)


def test_chat_template_renders_qwen_format(tokenizer):
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is 2+3?"},
    ]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+3?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    no_think = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False, enable_thinking=False
    )
    assert no_think == text + "<think>\n\n</think>\n\n"
    without_prompt = tokenizer.apply_chat_template(messages, tokenize=False)
    assert without_prompt == text.removesuffix("<|im_start|>assistant\n")


def test_chat_template_tokens_keep_special_tokens_atomic(tokenizer):
    messages = [{"role": "user", "content": "Hi"}]
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out
    specials = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>")}
    assert ids.count(specials["<|im_start|>"]) == 2
    assert ids.count(specials["<|im_end|>"]) == 1
    assert tokenizer.decode(ids) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_special_tokens_are_single_ids_and_think_tags_survive_decode(tokenizer):
    for token in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"):
        ids = tokenizer.encode(token, add_special_tokens=False)
        assert len(ids) == 1 and ids[0] < len(tokenizer), token
    text = "<think>\n2 + 2 = 4\n</think>\n\nThe answer is \\boxed{4}.<|im_end|>"
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids, skip_special_tokens=True) == text.removesuffix("<|im_end|>")


@pytest.mark.parametrize(
    "text",
    [
        'Thought: I need the weather.\nAction: getWeather\nAction Input: {"city": "Paris"}',
        "<reasoning>\n123 * 45 = 5535\n</reasoning>\n<answer>\n5535\n</answer>",
        "  leading spaces, tabs\tand\n\nnewlines  ",
    ],
)
def test_tokenizer_round_trips_corpus_like_text(tokenizer, text):
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert len(ids) < len(text.encode())  # BPE merged something: the training took effect


def test_digits_are_split_one_per_token(tokenizer):
    ids = tokenizer.encode("9876543210")
    assert tokenizer.convert_ids_to_tokens(ids) == list("9876543210")


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=80))
def test_tokenizer_round_trips_any_printable_ascii(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_same_seed_is_byte_identical_via_cli(tiny_model_dir, tmp_path):
    out = _load_cli().main(["--out", str(tmp_path / "again"), "--seed", "0"])
    assert _digests(out) == _digests(tiny_model_dir)


def test_other_seed_changes_weights_not_tokenizer(tiny_model_dir, tmp_path):
    other = make_tiny_model(tmp_path, seed=1)
    assert (other / "tokenizer.json").read_bytes() == (
        tiny_model_dir / "tokenizer.json"
    ).read_bytes()
    w0 = load_file(tiny_model_dir / "model.safetensors")["model.embed_tokens.weight"]
    w1 = load_file(other / "model.safetensors")["model.embed_tokens.weight"]
    assert not np.allclose(w0, w1)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_heads": 4, "num_kv_heads": 3}, "num_kv_heads=3"),
        ({"vocab_size": 100}, "vocab_size=100"),
        ({"corpus": []}, "corpus is empty"),
    ],
)
def test_bad_arguments_raise_clear_errors(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_tiny_model(tmp_path, **kwargs)
