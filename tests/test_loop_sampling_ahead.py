"""Rollouts sampled one step ahead (`rollout.async_steps=1`): the weights reach the engine in
the background, in order, once each, and an evaluation always scores the trainer's weights."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from jaxsd.train import rollout_worker
from jaxsd.train.loop import train
from tests.test_loop import load_config

STEPS = 5


def _record_calls(monkeypatch) -> list[tuple]:
    """(event, weights step, thread name) for every weights copy, hand-over, training rollout
    and evaluation; the step is the one served at the call for the last two."""
    log: list[tuple] = []

    def wrap(cls, name, event, step_of):
        original = getattr(cls, name)

        def recorded(self, *args, **kwargs):
            log.append((event, step_of(self, args), threading.current_thread().name))
            return original(self, *args, **kwargs)

        monkeypatch.setattr(cls, name, recorded)

    weights = rollout_worker.EmbeddedWeights
    wrap(weights, "snapshot", "snapshot", lambda self, args: args[1])
    wrap(weights, "serve", "serve", lambda self, args: args[1])
    served = lambda worker, args: worker.engine.weights_step  # noqa: E731
    wrap(rollout_worker.RolloutWorker, "collect", "collect", served)
    wrap(rollout_worker.RolloutWorker, "evaluate", "evaluate", served)
    return log


@pytest.mark.parametrize("async_steps", [0, 1])
def test_weights_reach_the_engine_once_each_and_evaluations_see_the_trainers(
    tmp_path, monkeypatch, async_steps
):
    log = _record_calls(monkeypatch)
    cfg = load_config("sc_sdpo")
    cfg.run_dir, cfg.total_steps, cfg.eval_every = str(tmp_path / "run"), STEPS, 2
    cfg.rollout.async_steps = async_steps
    train(cfg)

    served = [(step, thread) for event, step, thread in log if event == "serve"]
    copied = [(step, thread) for event, step, thread in log if event == "snapshot"]
    assert [s for s, _ in served] == list(range(STEPS + 1))  # each weights step once, in order
    assert [s for s, _ in copied] == list(range(STEPS + 1))
    assert {thread for _, thread in copied} == {"MainThread"}  # before the state is donated
    # Evaluations (before step 1, after steps 2, 4 and 5) score the trainer's newest weights.
    assert [s for event, s, _ in log if event == "evaluate"] == [0, 2, 4, STEPS]
    # Training rollouts: on-policy, or one weights step behind from step 2 on, sampled in the
    # background beside the previous train step.
    rollouts = [(step, thread) for event, step, thread in log if event == "collect"]
    if not async_steps:
        assert [s for s, _ in rollouts] == list(range(STEPS))
        assert {thread for _, thread in served + rollouts} == {"MainThread"}
        return
    assert [s for s, _ in rollouts] == [0] + list(range(STEPS - 1))
    assert all(thread.startswith("jaxsd-rollout") for _, thread in rollouts[1:])
    # Weights 1 and 3 are saved and handed over beside a train step; 0, the evaluated 2 and 4,
    # and the last (no next step to sample for) in front.
    assert {s for s, thread in served if thread.startswith("jaxsd-rollout")} == {1, 3}


@pytest.mark.parametrize("async_steps", [0, 1])
def test_the_loop_trains_with_the_vllm_worker(tmp_path, async_steps):
    """The trainer with a vLLM (CPU) worker, end to end: weights reach it through the published
    folder (the run folder here, to look inside), on-policy or one step behind, and the
    worker's log-probs of its own samples match the trainer's model of those weights."""
    from jaxsd.metrics import read_metrics
    from jaxsd.rollout.weights import published_steps

    cfg = load_config("sc_sdpo")
    cfg.run_dir, cfg.total_steps, cfg.eval_every = str(tmp_path / "run"), 3, 3
    cfg.rollout.engine, cfg.rollout.weights_dir = "vllm", "run"
    cfg.rollout.async_steps = async_steps
    summary = train(cfg)

    rows = [r for r in read_metrics(cfg.run_dir) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r["rollout/staleness"] for r in rows] == [0.0] + [float(async_steps)] * 2
    assert all(np.isfinite(r["loss"]) and r["rollout/response_len"] > 0 for r in rows)
    # The trainer's last weights went to the worker for the final evaluation.
    assert published_steps(tmp_path / "run" / "weights")[-1] == 3
    assert any(k.startswith("eval/mean@") for k in summary["eval_end"])
    # IS_t = pi_trainer / pi_behaviour on the distilled tokens (loss.rollout_is off: the
    # behaviour log-probs are the worker's): 1 when the worker served the trainer's weights.
    is_weight = rows[2]["distill/is_weight"]
    if not async_steps:
        assert is_weight == pytest.approx(1.0, abs=1e-3)
    else:  # sampled with weights 1, trained from weights 2; its hand-over ran in the background
        assert 0.5 < is_weight < 2.0 and abs(is_weight - 1.0) > 1e-4
        assert rows[2]["time/publish_save_s"] > 0
