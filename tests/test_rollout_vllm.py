"""The vLLM rollout worker against the JAX model: weights exchange, parity, failure handling.

One worker serves the whole module (vLLM takes 20-45 s to start on CPU); the two tests that
stop it run last, with one restart between them.
"""

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from jaxsd.models import from_pretrained, load_hf_state_dict, to_hf_state_dict
from jaxsd.models.tiny import make_tiny_model
from jaxsd.rollout import (
    JaxEngine,
    RolloutTimeoutError,
    SamplingConfig,
    SyncConfig,
    VllmEngine,
    VllmWorkerConfig,
    WeightLoadError,
    WeightSync,
    WorkerCrashedError,
    WorkerStartupError,
    publish_weights,
)
from jaxsd.rollout.weights import step_path

pytestmark = pytest.mark.vllm

PROMPTS = [[5, 17, 42, 9, 100], [300, 7, 7]]
SAMPLED = SamplingConfig(temperature=1.0, max_new_tokens=10, seed=5)
GREEDY = SamplingConfig(temperature=0.0, max_new_tokens=12)
# Long enough (2 x 8 x 1500 tokens) that a test can act while the worker is busy.
LONG = SamplingConfig(temperature=1.0, max_new_tokens=1500, seed=1)


def reference_logprobs(model, prompt, tokens):
    """log_softmax of the JAX model's full forward at the response positions (float64 numpy)."""
    ids = np.asarray([list(prompt) + list(tokens)], np.int32)
    logits = np.asarray(model(ids), np.float64)[0]
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    pos = np.arange(len(prompt) - 1, len(ids[0]) - 1)
    return logits[pos, tokens] - logz[pos]


def max_logprob_error(model, result):
    return max(
        np.abs(lp - reference_logprobs(model, PROMPTS[i], tok)).max()
        for tok, lp, i in zip(result.token_ids, result.logprobs, result.prompt_index, strict=True)
    )


def perturbed(state, scale, seed):
    rng = np.random.default_rng(seed)
    return {k: v + scale * rng.standard_normal(v.shape).astype(v.dtype) for k, v in state.items()}


def process_gone(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # vLLM's CPU attention supports head_dim 32, 64, ... (not the default tiny model's 16).
    return make_tiny_model(tmp_path_factory.mktemp("tiny_vllm"), seed=0, head_dim=32)


@pytest.fixture(scope="module")
def jax_model(model_dir):
    model, config = from_pretrained(model_dir)
    return model, to_hf_state_dict(model, config)


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("run") / "weights"


@pytest.fixture(scope="module")
def states(jax_model):
    """Weights the trainer publishes: step 0 is the HF folder's, later steps differ clearly."""
    _, state0 = jax_model
    return {0: state0, 1: perturbed(state0, 0.3, 1), 3: perturbed(state0, 0.3, 3)}


@pytest.fixture(scope="module")
def engine(model_dir, weights_dir):
    eng = VllmEngine(
        VllmWorkerConfig(
            model_dir=str(model_dir),
            weights_dir=str(weights_dir),
            name="rollout-test",
            max_model_len=2048,
            start_timeout_s=600,
            request_timeout_s=300,
        )
    )
    yield eng
    eng.close()


def test_startup_timeout_stops_the_worker_with_a_clear_error(model_dir, tmp_path):
    config = VllmWorkerConfig(
        model_dir=str(model_dir), weights_dir=str(tmp_path), name="slow", start_timeout_s=1.5
    )
    t0 = time.monotonic()
    with pytest.raises(WorkerStartupError, match=r"'slow' \(pid \d+\).*start_timeout_s=1.5") as e:
        VllmEngine(config)
    assert time.monotonic() - t0 < 20
    pid = int(re.search(r"pid (\d+)", str(e.value)).group(1))
    assert process_gone(pid)


def test_worker_exits_when_its_trainer_dies(model_dir, tmp_path):
    trainer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys\nfrom jaxsd.rollout import VllmEngine, VllmWorkerConfig\n"
            "VllmEngine(VllmWorkerConfig(model_dir=sys.argv[1], weights_dir=sys.argv[2], "
            "name='orphan'))",
            str(model_dir),
            str(tmp_path / "weights"),
        ]
    )
    logs = tmp_path / "rollout_logs"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # kill the trainer once the worker is building vLLM
        if (logs / "orphan.log").exists() and "trainer connected" in (
            logs / "orphan.log"
        ).read_text():
            break
        time.sleep(0.1)
    worker_pid = json.loads((logs / "orphan.address.json").read_text())["pid"]
    trainer.kill()
    trainer.wait()
    deadline = time.monotonic() + 15
    while not process_gone(worker_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert process_gone(worker_pid)
    log = (logs / "orphan.log").read_text()
    assert f"trainer (pid {trainer.pid}) exited; stopping" in log


def test_a_worker_that_fails_to_start_reports_its_exit_status_and_log(model_dir, tmp_path):
    broken = tmp_path / "no_weights"
    broken.mkdir()
    (broken / "config.json").write_text((model_dir / "config.json").read_text())
    config = VllmWorkerConfig(model_dir=str(broken), weights_dir=str(tmp_path), name="broken")
    with pytest.raises(
        WorkerCrashedError,
        match=r"(?s)'broken' \(pid \d+\) exited while starting up: exit status 1\..*"
        r"no \*\.safetensors in",
    ):
        VllmEngine(config)


def test_published_step_logprobs_equal_the_jax_model(engine, jax_model, states, weights_dir):
    model, _ = jax_model
    load_hf_state_dict(model, states[0])
    r0 = engine.generate(PROMPTS, 2, SAMPLED)
    assert r0.weights_step == 0
    assert r0.prompt_index == [0, 0, 1, 1]
    assert all(len(t) == SAMPLED.max_new_tokens for t in r0.token_ids)
    assert max_logprob_error(model, r0) <= 1e-3

    publish_weights(states[1], weights_dir, 1)
    assert engine.load_weights(1) == 1
    assert engine.last_load["mode"] == "in_place"
    r1 = engine.generate(PROMPTS, 2, SAMPLED)
    assert r1.weights_step == 1
    # Under step 0 the JAX model disagrees with what the worker reports: the weights changed.
    assert max_logprob_error(model, r1) > 0.05
    load_hf_state_dict(model, states[1])
    assert max_logprob_error(model, r1) <= 1e-3


def test_greedy_continuation_matches_the_embedded_engine(engine, jax_model, states):
    model, _ = jax_model
    load_hf_state_dict(model, states[1])
    assert engine.weights_step == 1
    ours = JaxEngine(model, weights_step=1).generate(PROMPTS, 1, GREEDY)
    theirs = engine.generate(PROMPTS, 1, GREEDY)
    assert theirs.weights_step == ours.weights_step == 1
    for a, b in zip(ours.token_ids, theirs.token_ids, strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(ours.logprobs, theirs.logprobs, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-3)


def test_a_large_seeded_batch_samples_and_repeats_exactly(engine):
    # 40 prompts x 16 seeded samples: more prompt tokens than one scheduler step takes. With
    # chunked prefill on, vLLM's CPU backend crashed here ("CPU Generator does not use offset").
    prompts = [[1 + (i * 7 + j) % 900 for j in range(30)] for i in range(40)]
    sampling = SamplingConfig(temperature=0.6, top_p=0.95, max_new_tokens=6, seed=11)
    first = engine.generate(prompts, 16, sampling)
    again = engine.generate(prompts, 16, sampling)
    assert len(first.token_ids) == 40 * 16
    assert sorted(first.prompt_index) == sorted(i for i in range(40) for _ in range(16))
    assert [list(t) for t in first.token_ids] == [list(t) for t in again.token_ids]


def test_unloadable_steps_leave_the_worker_on_its_previous_step(
    engine, jax_model, states, weights_dir
):
    model, _ = jax_model
    assert engine.weights_step == 1
    publish_weights(perturbed(states[0], 0.3, 2), weights_dir, 2)
    for f in step_path(weights_dir, 2).rglob("*"):  # corrupt the tensor data, keep metadata
        if f.is_file() and not f.name.startswith("_") and f.name != "commit_success.txt":
            f.write_bytes(b"\x00garbage" * 7)
    with pytest.raises(
        WeightLoadError, match=r"'rollout-test' could not load weights step 2.*keeps serving step 1"
    ):
        engine.load_weights(2)
    with pytest.raises(WeightLoadError, match=r"step 9.*published steps: \[1, 2\]"):
        engine.load_weights(9)
    wrong = dict(states[1])
    wrong["model.norm.weight"] = wrong["model.norm.weight"][:-1]
    publish_weights(wrong, weights_dir, 4)
    with pytest.raises(WeightLoadError, match=r"shape mismatches \['model.norm.weight"):
        engine.load_weights(4)
    assert engine.weights_step == 1 and engine.ping() == 1
    result = engine.generate(PROMPTS, 2, SAMPLED)
    assert result.weights_step == 1
    load_hf_state_dict(model, states[1])
    assert max_logprob_error(model, result) <= 1e-3  # the step-1 weights are untouched
    assert "it keeps serving step 1" in engine.log_path.read_text()


def test_follow_latest_and_weight_sync_keep_the_worker_on_the_newest_step(
    engine, jax_model, states, weights_dir
):
    model, _ = jax_model
    publish_weights(states[3], weights_dir, 5)
    engine.config = dataclasses.replace(engine.config, follow_latest=True)
    try:
        followed = engine.generate(PROMPTS, 2, SAMPLED)  # no load request: the worker looks
    finally:
        engine.config = dataclasses.replace(engine.config, follow_latest=False)
    assert followed.weights_step == engine.weights_step == 5
    load_hf_state_dict(model, states[3])
    assert max_logprob_error(model, followed) <= 1e-3

    sync = WeightSync(engine, SyncConfig(weights_dir, publish_every=1, max_staleness=0))
    sync.after_step(6, lambda: states[1])  # on-policy: returns once the worker serves step 6
    assert engine.weights_step == 6
    result = engine.generate(PROMPTS, 2, SAMPLED)
    assert sync.check(result, trainer_step=6) == 0
    load_hf_state_dict(model, states[1])
    assert max_logprob_error(model, result) <= 1e-3


def test_restart_fallback_serves_the_step_from_an_exported_hf_folder(
    engine, jax_model, states, weights_dir
):
    model, _ = jax_model
    publish_weights(states[3], weights_dir, 7)
    assert engine.load_weights(7, in_place=False) == 7
    assert engine.last_load["mode"] == "restart"
    result = engine.generate(PROMPTS, 2, SAMPLED)
    assert result.weights_step == 7
    load_hf_state_dict(model, states[3])
    assert max_logprob_error(model, result) <= 1e-3
    assert "restarting the engine from" in engine.log_path.read_text()


def test_request_timeout_stops_the_worker_instead_of_hanging(engine):
    pid = engine.pid
    t0 = time.monotonic()
    with pytest.raises(RolloutTimeoutError, match=r"'rollout-test' did not finish generating"):
        engine.generate(PROMPTS, 8, LONG, timeout_s=2.0)
    assert time.monotonic() - t0 < 20
    assert not engine.alive and process_gone(pid)


def test_killing_the_worker_mid_request_names_it_and_its_exit_status(engine):
    engine.restart()
    assert engine.ping() == 0  # a fresh worker serves the HF folder's weights again
    pending = engine.submit(PROMPTS, 8, LONG, timeout_s=120)
    time.sleep(1.0)
    t0 = time.monotonic()
    os.kill(engine.pid, signal.SIGKILL)
    with pytest.raises(
        WorkerCrashedError,
        match=r"'rollout-test' \(pid \d+\) exited while generating .*killed by SIGKILL",
    ):
        pending.result()
    assert time.monotonic() - t0 < 20
