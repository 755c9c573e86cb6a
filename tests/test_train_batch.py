"""Host-side batch assembly: layout re-derived per row, buckets, padding rows, bad input."""

from __future__ import annotations

import chex
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxsd.algorithms import LossWeights
from jaxsd.train.batch import TrainBatch, TrainSample, build_batch, pick_bucket

BUCKETS = (8, 16, 32)


def _sample(prompt, response, teacher=None, **kw):
    old = -np.arange(1, len(response) + 1, dtype=np.float32)
    return TrainSample(prompt, response, old, teacher, LossWeights(**kw))


def test_layout_of_two_rows_and_a_padding_row():
    a = _sample(
        [5, 6],
        [7, 8, 9],
        [1, 2, 3, 4],
        advantage=0.5,
        pg_weight=1.0,
        sd_weight=2.0,
        ssopd_weight=0.3,
        ssopd_len=2,
        rhythm_beta=1.0,
    )
    b = _sample([3], [4], None)
    batch = build_batch([a, b], pad_id=0, length_buckets=BUCKETS, batch_size=3)
    chex.assert_shape([batch.student_tokens, batch.teacher_tokens], (3, 8))
    chex.assert_shape([batch.response_tokens, batch.student_index], (3, 8))
    np.testing.assert_array_equal(batch.student_tokens[0], [5, 6, 7, 8, 9, 0, 0, 0])
    np.testing.assert_array_equal(batch.student_mask[0], [1, 1, 1, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(batch.student_positions[0, :5], [0, 1, 2, 3, 4])
    np.testing.assert_array_equal(batch.teacher_tokens[0], [1, 2, 3, 4, 7, 8, 9, 0])
    # logits at position p predict token p+1: response token 7 is predicted at position 1
    np.testing.assert_array_equal(batch.student_index[0, :3], [1, 2, 3])
    np.testing.assert_array_equal(batch.teacher_index[0, :3], [3, 4, 5])
    np.testing.assert_array_equal(batch.response_mask[0], [1, 1, 1, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(batch.ssopd_mask[0], [1, 1, 0, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(batch.old_logp[0, :3], [-1, -2, -3])
    # no teacher prompt: teacher row = student row, sd_mask 0
    np.testing.assert_array_equal(batch.teacher_tokens[1], batch.student_tokens[1])
    np.testing.assert_array_equal(batch.sd_mask, [1, 0, 0])
    np.testing.assert_allclose(batch.advantage, [0.5, 0, 0])
    np.testing.assert_allclose(batch.sd_weight, [2.0, 0, 0])
    np.testing.assert_allclose(batch.rhythm_beta, [1.0, 0, 0])
    for name in ("student_mask", "teacher_mask", "response_mask", "ssopd_mask"):
        assert not np.any(getattr(batch, name)[2]), name


@st.composite
def _samples(draw):
    n = draw(st.integers(1, 5))
    out = []
    for _ in range(n):
        p = draw(st.lists(st.integers(1, 99), min_size=1, max_size=6))
        r = draw(st.lists(st.integers(1, 99), min_size=0, max_size=9))
        t = draw(st.none() | st.lists(st.integers(1, 99), min_size=1, max_size=10))
        out.append(_sample(p, r, t, ssopd_len=draw(st.integers(0, 12))))
    return out


@settings(max_examples=40, deadline=None)
@given(_samples())
def test_index_maps_point_at_the_response_in_both_rows(samples):
    batch = build_batch(samples, pad_id=0, length_buckets=BUCKETS)
    assert batch.student_tokens.shape[1] in BUCKETS and batch.response_tokens.shape[1] in BUCKETS
    for i, s in enumerate(samples):
        n = len(s.response_ids)
        assert batch.response_mask[i].sum() == n
        assert batch.ssopd_mask[i].sum() == min(n, s.weights.ssopd_len)
        for side in ("student", "teacher"):
            idx = getattr(batch, f"{side}_index")[i, :n]
            toks = getattr(batch, f"{side}_tokens")[i]
            np.testing.assert_array_equal(toks[idx + 1], s.response_ids)
            # the predicting position is a real (unmasked) token of the row
            assert np.all(getattr(batch, f"{side}_mask")[i, idx] == 1)
    assert isinstance(batch, TrainBatch)


def test_bucket_choice_and_errors():
    assert pick_bucket(8, BUCKETS, what="x") == 8
    assert pick_bucket(9, BUCKETS, what="x") == 16
    with pytest.raises(ValueError, match="response length 40 exceeds the largest length bucket"):
        pick_bucket(40, BUCKETS, what="response")
    long = _sample(list(range(1, 20)), list(range(1, 20)))
    with pytest.raises(ValueError, match="student sequence length 38"):
        build_batch([long], pad_id=0, length_buckets=BUCKETS)


def test_forced_lengths_give_the_same_shapes_on_every_host():
    short = [_sample([1, 2], [3])]
    batch = build_batch(short, pad_id=0, length_buckets=BUCKETS, lengths=(20, 9, 12))
    assert batch.student_tokens.shape == (1, 32)
    assert batch.teacher_tokens.shape == (1, 16)
    assert batch.response_tokens.shape == (1, 16)


@pytest.mark.parametrize(
    "sample,match",
    [
        (TrainSample([], [1], np.zeros(1)), "empty prompt_ids"),
        (TrainSample([1], [1, 2], np.zeros(3)), "old_logp shape"),
        (TrainSample([1], [1], np.array([np.nan])), "NaN"),
        (_sample([1], [1], [], sd_weight=1.0), "empty teacher_prompt_ids"),
        (_sample([1], [1], advantage=float("inf")), "advantage"),
        (_sample([1], [1], ssopd_len=-1), "ssopd_len"),
    ],
)
def test_bad_samples_are_named(sample, match):
    with pytest.raises(ValueError, match=match):
        build_batch([sample], pad_id=0, length_buckets=BUCKETS)


def test_batch_size_smaller_than_samples_is_rejected():
    with pytest.raises(ValueError, match="batch_size=1"):
        build_batch(
            [_sample([1], [2]), _sample([1], [2])], pad_id=0, length_buckets=BUCKETS, batch_size=1
        )


@pytest.mark.parametrize(
    "sample,match",
    [
        (_sample([1], [3, 16]), r"sample 0: response_ids holds token id 16, .*\[0, 16\)"),
        (_sample([-1, 2], [3]), r"sample 0: prompt_ids holds token id -1"),
        (_sample([1], [3], [2, 99]), r"sample 0: teacher_prompt_ids holds token id 99"),
        (_sample([1], np.array([3.0, 4.0])), r"response_ids must be integer token ids"),
    ],
)
def test_token_ids_outside_the_vocabulary_are_named(sample, match):
    """jnp.take embeds an id >= V as NaN and wraps a negative one: refused, the id named."""
    with pytest.raises(ValueError, match=match):
        build_batch([sample], pad_id=0, length_buckets=BUCKETS, vocab_size=16)


def test_ids_at_the_vocabulary_edge_pass_and_a_bad_pad_id_is_refused():
    batch = build_batch(
        [_sample([0], [15], [15])], pad_id=15, length_buckets=BUCKETS, vocab_size=16
    )
    np.testing.assert_array_equal(batch.student_tokens[0, :3], [0, 15, 15])
    for pad in (16, -1):
        with pytest.raises(ValueError, match=f"pad_id={pad} must be in the model.s vocabulary"):
            build_batch([_sample([1], [2])], pad_id=pad, length_buckets=BUCKETS, vocab_size=16)
    # Without a vocabulary size only negative ids are known to be wrong.
    build_batch([_sample([1], [10_000])], pad_id=0, length_buckets=BUCKETS)
    with pytest.raises(ValueError, match="token id -3"):
        build_batch([_sample([1], [-3])], pad_id=0, length_buckets=BUCKETS)
