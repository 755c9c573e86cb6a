"""Engine protocol pieces, the embedded JaxEngine and the trainer-side WeightSync (no vLLM)."""

import hypothesis.strategies as st
import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import given, settings

from jaxsd.models import from_pretrained, to_hf_state_dict
from jaxsd.rollout import (
    JaxEngine,
    RolloutEngine,
    RolloutResult,
    SamplingConfig,
    StaleWeightsError,
    SyncConfig,
    WeightLoadError,
    WeightSync,
    check_weights_step,
    publish_weights,
)
from jaxsd.rollout.engine import validate_prompts
from jaxsd.rollout.vllm_engine import describe_exit
from jaxsd.rollout.vllm_server import export_hf_folder, hf_tensor_shapes
from jaxsd.rollout.vllm_worker import check_state_dict, numpy_to_torch
from jaxsd.rollout.weights import step_path

PROMPTS = [[5, 17, 42, 9], [300, 7]]
SAMPLING = SamplingConfig(temperature=1.0, max_new_tokens=6, seed=11)


def reference_logprobs(model, prompt, tokens):
    """log_softmax of a full (no-cache) forward at the response positions, in float64 numpy."""
    ids = np.asarray([list(prompt) + list(tokens)], np.int32)
    logits = np.asarray(model(ids), np.float64)[0]
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    pos = np.arange(len(prompt) - 1, len(ids[0]) - 1)
    return logits[pos, tokens] - logz[pos]


def perturbed(state, scale, seed):
    rng = np.random.default_rng(seed)
    return {k: v + scale * rng.standard_normal(v.shape).astype(v.dtype) for k, v in state.items()}


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    model, config = from_pretrained(tiny_model_dir)
    return model, config, to_hf_state_dict(model, config)


# -- protocol pieces ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"temperature": -0.5}, "temperature=-0.5"),
        ({"top_p": 0.0}, "top_p=0.0"),
        ({"top_k": -1}, "top_k=-1"),
        ({"max_new_tokens": 0}, "max_new_tokens=0"),
        ({"stop_token_ids": [3, -2]}, "stop_token_ids"),
    ],
)
def test_sampling_config_rejects_out_of_range_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingConfig(**kwargs)


def test_rollout_result_checks_its_fields_agree():
    tok, lp = np.zeros(3, np.int32), np.zeros(3, np.float32)
    with pytest.raises(ValueError, match="disagree"):
        RolloutResult([tok], [lp], ["stop", "stop"], [0], 0)
    with pytest.raises(ValueError, match=r"sample 0: token_ids \(3,\) != logprobs \(2,\)"):
        RolloutResult([tok], [lp[:2]], ["stop"], [0], 0)
    with pytest.raises(ValueError, match="abort"):
        RolloutResult([tok], [lp], ["abort"], [0], 0)


def test_validate_prompts_names_the_bad_prompt():
    assert validate_prompts([(1, 2), np.array([3])], 2) == [[1, 2], [3]]
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        validate_prompts([[1], []], 1)
    with pytest.raises(ValueError, match="prompt 0 has negative"):
        validate_prompts([[1, -4]], 1)
    with pytest.raises(ValueError, match="n=0"):
        validate_prompts([[1]], 0)


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 100), st.integers(0, 100), st.integers(0, 5))
def test_staleness_is_trainer_step_minus_weights_step_within_bounds(trainer, weights, max_s):
    result = RolloutResult([], [], [], [], weights_step=weights)
    if 0 <= trainer - weights <= max_s:
        assert check_weights_step(result, trainer_step=trainer, max_staleness=max_s) == (
            trainer - weights
        )
    else:
        with pytest.raises(StaleWeightsError, match=f"step {weights}"):
            check_weights_step(result, trainer_step=trainer, max_staleness=max_s)


def test_describe_exit_names_signals():
    assert describe_exit(3) == "exit status 3"
    assert describe_exit(-9) == "killed by SIGKILL (exit status -9)"


def test_bfloat16_numpy_becomes_the_same_torch_bfloat16():
    arr = (np.random.default_rng(0).standard_normal((3, 5)) * 10).astype(ml_dtypes.bfloat16)
    got = numpy_to_torch(arr)
    want = torch.tensor(arr.astype(np.float32)).to(torch.bfloat16)  # exact: values are bf16
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, want)


def test_check_state_dict_lists_missing_unexpected_and_misshaped():
    expected = {"a": (2, 3), "b": (4,), "c": (1,)}
    check_state_dict({"a": np.zeros((2, 3)), "b": np.zeros(4), "c": np.zeros(1)}, expected)
    with pytest.raises(
        Exception, match=r"missing \['c'\].*unexpected \['d'\].*b: \(5,\) != \(4,\)"
    ):
        check_state_dict({"a": np.zeros((2, 3)), "b": np.zeros(5), "d": np.zeros(1)}, expected)


def test_exported_hf_folder_loads_in_transformers_with_the_given_weights(
    tiny, tiny_model_dir, tmp_path
):
    from transformers import AutoModelForCausalLM

    _, _, state = tiny
    new = perturbed(state, 0.1, seed=1)
    folder = export_hf_folder(new, tiny_model_dir, tmp_path / "export" / "7")
    assert hf_tensor_shapes(folder) == {k: v.shape for k, v in state.items()}
    loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    got = {k: v.numpy() for k, v in loaded.state_dict().items()}
    for name, arr in new.items():
        np.testing.assert_array_equal(got[name], arr, err_msg=name)
    assert (folder / "tokenizer.json").is_file()  # non-weight files come along


# -- the embedded engine ---------------------------------------------------------------------
def test_jax_engine_samples_are_prompt_major_with_reference_logprobs(tiny):
    model, _, _ = tiny
    engine = JaxEngine(model, weights_step=4, batch_buckets=(8,))
    assert isinstance(engine, RolloutEngine)
    result = engine.generate(PROMPTS, 3, SAMPLING)
    assert result.prompt_index == [0, 0, 0, 1, 1, 1]
    assert result.weights_step == 4
    assert set(result.finish_reasons) <= {"stop", "length"}
    for s, (tokens, lp) in enumerate(zip(result.token_ids, result.logprobs, strict=True)):
        assert tokens.dtype == np.int32 and lp.dtype == np.float32
        assert len(tokens) == SAMPLING.max_new_tokens  # no stop ids given
        want = reference_logprobs(model, PROMPTS[result.prompt_index[s]], tokens)
        np.testing.assert_allclose(lp, want, atol=1e-4)
    assert len({tuple(t) for t in result.token_ids[:3]}) > 1  # n samples differ


def test_jax_engine_loads_published_steps_and_keeps_its_params_on_a_bad_one(tiny, tmp_path):
    model, config, state = tiny
    engine = JaxEngine(model, weights_dir=tmp_path, batch_buckets=(8,))
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=6)
    new = perturbed(state, 0.2, seed=2)
    publish_weights(new, tmp_path, 1)
    try:
        assert engine.load_weights(1) == 1
        served = to_hf_state_dict(model, config)
        for name, arr in new.items():
            np.testing.assert_allclose(served[name], arr, rtol=0, atol=0, err_msg=name)
        before = engine.generate(PROMPTS[:1], 1, greedy)
        bad = dict(new)
        bad.pop("model.norm.weight")  # the tensor load_hf_state_dict needs last
        publish_weights(bad, tmp_path, 2)
        with pytest.raises(
            WeightLoadError, match="step 2.*model.norm.weight.*keeps serving step 1"
        ):
            engine.load_weights(2)
        assert engine.weights_step == 1
        after = engine.generate(PROMPTS[:1], 1, greedy)
        np.testing.assert_array_equal(after.token_ids[0], before.token_ids[0])
        np.testing.assert_array_equal(after.logprobs[0], before.logprobs[0])
        assert after.weights_step == 1
    finally:
        engine.set_params(None, 0)
        from jaxsd.models import load_hf_state_dict

        load_hf_state_dict(model, state)  # the module-scoped model goes back to its weights


def test_weight_sync_publishes_every_k_and_engine_serves_each_publish(tiny, tmp_path):
    model, config, state = tiny
    engine = JaxEngine(model, weights_dir=tmp_path, batch_buckets=(8,))
    sync = WeightSync(engine, SyncConfig(tmp_path, publish_every=2, max_staleness=1, keep=2))
    built = []

    def state_fn():
        built.append(1)
        return to_hf_state_dict(model, config)

    assert sync.after_step(1, state_fn) is None and built == []  # not a publish step
    timing = sync.after_step(2, state_fn)
    assert set(timing) == {"save_s", "ack_s"} and built == [1]
    assert engine.weights_step == 2 and step_path(tmp_path, 2).is_dir()
    result = engine.generate(PROMPTS[:1], 1, SAMPLING)
    assert sync.check(result, trainer_step=3) == 1
    with pytest.raises(StaleWeightsError, match="staleness 2 > max_staleness 1"):
        sync.check(result, trainer_step=4)
    assert sync.staleness == [1]
    with pytest.raises(ValueError, match="max_staleness=0 < publish_every - 1 = 2"):
        SyncConfig(tmp_path, publish_every=3, max_staleness=0)
