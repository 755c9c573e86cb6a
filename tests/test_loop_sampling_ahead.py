"""Rollouts sampled one step ahead (`rollout.async_steps=1`): the weights reach the engine in
the background, in order, once each, and an evaluation always scores the trainer's weights."""

from __future__ import annotations

import threading

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
