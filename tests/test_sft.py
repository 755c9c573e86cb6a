"""SFT: the loss mask is exactly the assistant turn of the tokenizer's own chat template,
the masked NLL equals transformers' cross-entropy, and a few steps drive the loss down."""

import hypothesis
import hypothesis.strategies as st
import jax
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from jaxsd.models import from_pretrained
from jaxsd.tasks import build_reprompt, get_task
from jaxsd.train.sft import (
    SFTConfig,
    batch_order,
    encode_example,
    pad_batch,
    response_nll,
    train_sft,
)

IM_END = "<|im_end|>"


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def records():
    return get_task("arithmetic", digits=2, train_size=8, test_size=2).load("train")


def _chat_and_response(records):
    task = get_task("arithmetic", digits=2, train_size=8, test_size=2)
    out = []
    for k, r in enumerate(records):
        messages = task.messages(r)
        response = f"<answer>{r['answer']}</answer>"
        if k % 2:  # the teacher's reprompt format
            messages = build_reprompt(messages, solution=response, feedback=None).messages
        out.append((messages, response))
    return out


def _assistant_positions(tokenizer, messages, response):
    """Token positions inside the assistant turn's `response<|im_end|>` characters, found
    with offsets in the template's own rendering of the whole conversation."""
    text = tokenizer.apply_chat_template(
        [*messages, {"role": "assistant", "content": response}], tokenize=False
    )
    start = text.rindex("<|im_start|>assistant\n") + len("<|im_start|>assistant\n")
    end = start + len(response) + len(IM_END)
    assert text[start:end] == response + IM_END
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    inside = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if a >= start and b <= end]
    return enc["input_ids"], inside


_FIRST = st.sampled_from(list("<abcXYZ0123456789{[-"))
_REST = st.text(alphabet=list("<>/abc XYZ 0123456789{}[]:-\n\"'"), max_size=30)


@hypothesis.settings(max_examples=40, deadline=None)
@hypothesis.given(first=_FIRST, rest=_REST, question=st.text("0123456789+-=? ", min_size=1))
def test_loss_mask_is_exactly_the_assistant_turn(tokenizer, first, rest, question):
    # Responses start with a non-space: a leading newline would merge with the template's
    # "assistant\n" in a joint tokenisation (rollouts are tokenised apart, as here).
    response = first + rest
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": question}]
    ex = encode_example(tokenizer, messages, response)
    full_ids, inside = _assistant_positions(tokenizer, messages, response)
    assert ex.input_ids == full_ids[: len(ex.input_ids)]
    assert [i for i, m in enumerate(ex.loss_mask) if m] == inside
    assert tokenizer.decode([ex.input_ids[i] for i in inside]) == response + IM_END


def test_loss_mask_on_task_and_reprompt_examples(tokenizer, records):
    for messages, response in _chat_and_response(records):
        ex = encode_example(tokenizer, messages, response)
        full_ids, inside = _assistant_positions(tokenizer, messages, response)
        assert ex.input_ids == full_ids[: len(ex.input_ids)]
        assert [i for i, m in enumerate(ex.loss_mask) if m] == inside


def test_pad_batch_right_pads_to_a_multiple(tokenizer, records):
    examples = [encode_example(tokenizer, m, r) for m, r in _chat_and_response(records)]
    batch = pad_batch(examples, pad_id=tokenizer.pad_token_id, pad_multiple=16)
    longest = max(len(e.input_ids) for e in examples)
    b, t = batch["input_ids"].shape
    assert (b, t) == (len(examples), -(-longest // 16) * 16)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        np.testing.assert_array_equal(batch["input_ids"][i, :n], e.input_ids)
        assert np.all(batch["input_ids"][i, n:] == tokenizer.pad_token_id)
        np.testing.assert_array_equal(batch["attention_mask"][i], np.arange(t) < n)
        np.testing.assert_array_equal(batch["loss_mask"][i, :n], e.loss_mask)
        assert not batch["loss_mask"][i, n:].any()


def test_response_nll_matches_transformers_cross_entropy(tiny_model_dir, tokenizer, records):
    examples = [encode_example(tokenizer, m, r) for m, r in _chat_and_response(records)]
    batch = pad_batch(examples, pad_id=tokenizer.pad_token_id)
    model, _ = from_pretrained(tiny_model_dir)
    nll_sum, count = jax.jit(response_nll)(model, batch)

    ref = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    ref_sum, ref_count = 0.0, 0
    for e in examples:  # unpadded, one at a time: padding cannot leak into the reference
        ids = torch.tensor([e.input_ids])
        with torch.no_grad():
            logits = ref(ids).logits[0, :-1]
        labels = torch.tensor(e.input_ids[1:])
        labels[torch.tensor(e.loss_mask[1:]) == 0] = -100
        ref_sum += torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        ref_count += int(sum(e.loss_mask))
    assert float(count) == ref_count
    np.testing.assert_allclose(float(nll_sum), ref_sum, rtol=1e-4)


def test_a_few_steps_lower_the_response_loss(tiny_model_dir, tokenizer, records):
    # Plain prompts only: one padded shape, so the step compiles once.
    examples = [encode_example(tokenizer, m, r) for m, r in _chat_and_response(records)[::2]]
    batch = pad_batch(examples, pad_id=tokenizer.pad_token_id)
    model, _ = from_pretrained(tiny_model_dir)
    nll = jax.jit(response_nll)
    mean_nll = lambda m, b: float(nll(m, b)[0] / nll(m, b)[1])
    before = mean_nll(model, batch)
    cfg = SFTConfig(steps=40, batch_size=4, lr=3e-3, warmup_steps=3, seed=0)
    seen = []

    def callback(step, m, recent):
        seen.append(step)
        return step >= 30  # stop early

    trained, losses = train_sft(
        model, examples, cfg, pad_id=tokenizer.pad_token_id, callback=callback, callback_every=10
    )
    assert seen == [10, 20, 30] and len(losses) == 30
    lengths = [len(e.input_ids) for e in examples]
    first = [examples[j] for j in batch_order(lengths, cfg.steps, cfg.batch_size, cfg.seed)[0]]
    # step 1 reports its batch's loss before the update
    assert losses[0] == pytest.approx(mean_nll(model, pad_batch(first, tokenizer.pad_token_id)))
    after = mean_nll(trained, batch)
    assert after < 0.3 * before, (before, after)
    # the input model is not consumed by the donated train step
    assert mean_nll(model, batch) == pytest.approx(before)


@hypothesis.settings(max_examples=30, deadline=None)
@hypothesis.given(
    lengths=st.lists(st.integers(1, 5), min_size=1, max_size=20),
    steps=st.integers(1, 10),
    bs=st.integers(1, 7),
)
def test_batch_order_is_balanced_deterministic_and_length_grouped(lengths, steps, bs):
    order = batch_order(lengths, steps, bs, seed=3, group=4)
    assert order.shape == (steps, bs)
    counts = np.bincount(order.reshape(-1), minlength=len(lengths))
    assert counts.max() - counts.min() <= 1  # epochs of seeded shuffles
    np.testing.assert_array_equal(order, batch_order(lengths, steps, bs, seed=3, group=4))
    # Inside a window of 4 batches, batches hold length-sorted runs: ranges do not interleave.
    lens = np.asarray(lengths)[order]
    for w in range(0, steps, 4):
        spans = sorted((b.min(), b.max()) for b in lens[w : w + 4])
        assert all(hi <= lo for (_, hi), (lo, _) in zip(spans, spans[1:], strict=False))


def test_bad_inputs_raise_clear_errors(tokenizer):
    messages = [{"role": "user", "content": "1+1=?"}]
    with pytest.raises(ValueError, match="max_len"):
        encode_example(tokenizer, messages, "<answer>2</answer>", max_len=5)
    with pytest.raises(ValueError, match="warmup_steps"):
        SFTConfig(steps=5, warmup_steps=5)
    with pytest.raises(ValueError, match="lr"):
        SFTConfig(lr=0.0)
    with pytest.raises(ValueError, match="no examples"):
        pad_batch([], pad_id=0)
    with pytest.raises(ValueError, match="no training examples"):
        batch_order([], 1, 1, seed=0)
