"""A tiny random-init Qwen3 Hugging Face folder with a real, offline-trained tokenizer.

Tests, CI and the laptop preset use it instead of a hub checkpoint. The weights come from
transformers' own `Qwen3ForCausalLM` init (not from jaxsd), so parity tests compare jaxsd
against an independent producer; the tokenizer is a byte-level BPE trained with the
`tokenizers` library on a small built-in corpus, saved with a Qwen-style chat template.
"""

from __future__ import annotations

import json
import os
import pathlib
import random
from collections.abc import Iterable, Sequence

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    trainers,
)

# Qwen2/3's pre-tokenizer split: single digits, words with an optional leading non-letter,
# punctuation runs, newlines. Single-digit numbers keep arithmetic tokenization regular.
_QWEN_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)  # never split, skipped by decode(skip_special)
EXTRA_TOKENS = (THINK_OPEN, THINK_CLOSE)  # atomic but kept in decoded text, as in Qwen3

# Qwen3's template, reduced to what the tiny model needs: plain turns, generation prompt,
# and `enable_thinking=False` (an empty think block), which Qwen3 users rely on.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)

_WORDS = (
    "the a an of to and in is it that for on with as was be by this are or at from his her "
    "their what which when where who why how not all can will one two three four five six seven "
    "eight nine ten hundred thousand number numbers sum total answer question step first then "
    "next finally therefore so because if else true false yes no correct wrong city weather "
    "temperature today tomorrow rain sunny cloudy cold warm hot wind search find get set list "
    "value result call tool function user assistant system think reasoning solve problem "
    "equation add subtract multiply divide equals plus minus times over half double apples "
    "oranges books cars students teacher school price cost money dollars hours minutes days "
    "weeks years people water energy cell protein gene atom molecule force mass velocity light "
    "the quick brown fox jumps over lazy dog please thanks hello world model train data"
).split()
_CITIES = ("Paris", "London", "Tokyo", "Berlin", "Madrid", "Rome", "Cairo", "Lima", "Oslo")
_TOOLS = ("getWeather", "searchWeb", "getTime", "calculate", "lookupStock", "sendEmail")
_OPS = {"+": float.__add__, "-": float.__sub__, "*": float.__mul__, "/": float.__truediv__}


def builtin_corpus(num_lines: int = 3000, seed: int = 0) -> list[str]:
    """Deterministic text covering digits, arithmetic, English, JSON tool calls and tags."""
    rng = random.Random(seed)
    lines = []
    for i in range(num_lines):
        kind = i % 6
        a, b = rng.randint(0, 999), rng.randint(1, 999)
        words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 14)))
        if kind == 0:
            op = rng.choice(sorted(_OPS))
            lines.append(f"What is {a} {op} {b}? {a} {op} {b} = {_OPS[op](float(a), float(b)):.6g}")
        elif kind == 1:
            lines.append(words.capitalize() + rng.choice((".", "?", "!", ",")))
        elif kind == 2:
            city, tool = rng.choice(_CITIES), rng.choice(_TOOLS)
            lines.append(
                f"Thought: I need the {rng.choice(_WORDS)} for {city}.\nAction: {tool}\n"
                f'Action Input: {{"city": "{city}", "days": {a % 7}}}'
            )
        elif kind == 3:
            lines.append(
                f"<reasoning>\nFirst {words}. {a} + {b} = {a + b}.\n</reasoning>\n"
                f"<answer>\n{a + b}\n</answer>"
            )
        elif kind == 4:
            lines.append(
                f"{THINK_OPEN}\n{words}\n{THINK_CLOSE}\n\nThe answer is \\boxed{{{a * b}}}."
            )
        else:
            record = {"name": rng.choice(_TOOLS), "arguments": {"query": words, "limit": a}}
            lines.append(json.dumps(record) + f"\n[{a}, {b}, {a - b}] {{'ok': true}}")
    return lines


def train_tokenizer(vocab_size: int, corpus: Iterable[str] | None = None):
    """Byte-level BPE (Qwen pre-tokenization) with Qwen's special tokens appended after it."""
    num_added = len(SPECIAL_TOKENS) + len(EXTRA_TOKENS)
    if vocab_size < 256 + num_added:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: byte-level BPE needs 256 byte tokens plus "
            f"{num_added} special tokens; use vocab_size >= {256 + num_added}"
        )
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - num_added,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = builtin_corpus() if corpus is None else list(corpus)
    if not lines:
        raise ValueError("corpus is empty; pass text lines or None for the built-in corpus")
    tok.train_from_iterator(lines, trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in EXTRA_TOKENS])
    return tok


def make_tokenizer(vocab_size: int, corpus: Iterable[str] | None = None):
    """The trained tokenizer wrapped as a transformers fast tokenizer with the chat template."""
    # torch/transformers are imported lazily: importing this module (conftest does) stays cheap.
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=train_tokenizer(vocab_size, corpus),
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        chat_template=CHAT_TEMPLATE,
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
    )


def make_tiny_model(
    path: str | os.PathLike,
    *,
    seed: int = 0,
    vocab_size: int = 1024,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 16,
    intermediate_size: int = 128,
    tie_word_embeddings: bool = False,
    rope_theta: float = 1e6,
    max_position_embeddings: int = 4096,
    corpus: Sequence[str] | None = None,
) -> pathlib.Path:
    """Write a random-init Qwen3 HF folder (config, safetensors, tokenizer, generation config).

    The tokenizer has at most `vocab_size` tokens (BPE may stop early on a small corpus);
    the model's vocab is exactly `vocab_size`, so it is padded past `len(tokenizer)` the way
    Qwen's checkpoints are. Same arguments -> byte-identical files.
    """
    import torch
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    if num_heads % num_kv_heads:
        raise ValueError(
            f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads} (GQA)"
        )
    out = pathlib.Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(vocab_size, corpus)
    if len(tokenizer) > vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens > vocab_size={vocab_size}")
    pad_id, eos_id = tokenizer.convert_tokens_to_ids([ENDOFTEXT, IM_END])
    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=pad_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        architectures=["Qwen3ForCausalLM"],
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config).to(torch.float32).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=pad_id, eos_token_id=[eos_id, pad_id], pad_token_id=pad_id
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
