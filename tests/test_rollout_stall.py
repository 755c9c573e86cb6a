"""A stalled rollout worker is found by its missing heartbeats, not by a 10-minute deadline.

The worker here is the real server loop (`vllm_server.serve`: channel, heartbeat thread,
requests) with vLLM replaced by a stand-in whose generate takes `max_new_tokens / 100`
seconds, so a test can stop it (SIGSTOP) in the middle of a request in a second.
"""

from __future__ import annotations

import os
import signal
import sys
import time
import types

import pytest

from jaxsd.rollout import (
    RolloutTimeoutError,
    SamplingConfig,
    VllmEngine,
    VllmWorkerConfig,
    vllm_engine,
)
from jaxsd.train.rollout_worker import PublishedWeights, RolloutWorker, rollout_timeout_s

FAKE_WORKER = """
import sys, time
import numpy as np
from jaxsd.rollout import vllm_server

class FakeLLM:
    def __init__(self):
        self.llm_engine = self.engine_core = self

    def shutdown(self):
        pass

def generate(self, prompts, n, sampling, *, follow_latest):
    time.sleep(sampling.max_new_tokens / 100)
    count = len(prompts) * n
    return {"type": "result", "token_ids": [np.asarray([7, 8], np.int32)] * count,
            "logprobs": [np.asarray([-0.5, -0.25], np.float32)] * count,
            "finish_reasons": ["length"] * count,
            "prompt_index": [i for i in range(len(prompts)) for _ in range(n)],
            "weights_step": self.step}

vllm_server.build_llm = lambda model_dir, opts: FakeLLM()
vllm_server.RolloutServer.generate = generate
sys.exit(vllm_server.main(sys.argv[1:]))
"""

QUICK = SamplingConfig(max_new_tokens=10)  # 0.1 s
SLOW = SamplingConfig(max_new_tokens=500)  # 5 s: longer than the heartbeat timeout


@pytest.fixture
def engine(tiny_model_dir, tmp_path, monkeypatch):
    real_command = vllm_engine.worker_command
    monkeypatch.setattr(
        vllm_engine,
        "worker_command",
        lambda config, address: [
            sys.executable,
            "-c",
            FAKE_WORKER,
            *real_command(config, address)[2:],
        ],
    )
    config = VllmWorkerConfig(
        model_dir=str(tiny_model_dir),
        weights_dir=str(tmp_path / "weights"),
        name="fake",
        start_timeout_s=120,
        request_timeout_s=120,
        heartbeat_timeout_s=2.0,
    )
    eng = VllmEngine(config)
    yield eng
    eng.close()


def test_a_stopped_worker_is_reported_within_the_heartbeat_timeout(engine):
    # A busy worker (5 s request, 2 s heartbeat timeout) is not mistaken for a stalled one.
    assert len(engine.generate([[1, 2, 3]], 2, SLOW).token_ids) == 2
    pending = engine.submit([[1, 2, 3]], 2, SLOW)
    time.sleep(0.5)
    pid = engine.pid
    os.kill(pid, signal.SIGSTOP)
    t0 = time.monotonic()
    with pytest.raises(RolloutTimeoutError, match=r"'fake' \(pid \d+\) sent no answer and no "
                       r"heartbeat for 2\.\d s while generating"):  # fmt: skip
        pending.result()
    assert time.monotonic() - t0 < 10  # not the 120 s request deadline
    assert not engine.alive
    engine.restart()  # the run can go on with a fresh worker
    assert engine.generate([[4, 5]], 3, QUICK).prompt_index == [0, 0, 0]


def test_the_trainer_restarts_a_stalled_worker_once_when_asked(engine):
    # the engine settings as run_settings builds them from rollout.{timeout_s,restart_...}
    engine_settings = types.SimpleNamespace(timeout_s=0.0, restart_on_failure=True)
    run = RolloutWorker(engine=engine, weights=PublishedWeights(None, None, None), prompts=None,
                        task=None, stop_ids=(), rollout=None, engine_settings=engine_settings,
                        seed=0)  # fmt: skip
    run.generate([[1, 2]], 2, QUICK)
    assert 0.1 <= run.slowest_rollout_s < 5
    # auto timeout: 5x the slowest rollout with a 120 s floor; a set timeout_s wins
    assert rollout_timeout_s(0.0, run.slowest_rollout_s) == 120.0
    assert rollout_timeout_s(0.0, 60.0) == 300.0 and rollout_timeout_s(7.0, 60.0) == 7.0
    first_pid = engine.pid
    os.kill(first_pid, signal.SIGSTOP)
    result = run.generate([[1, 2]], 2, QUICK)  # restarted once, then served
    assert len(result.token_ids) == 2 and run.restarts == 1
    assert engine.pid != first_pid and engine.alive
    os.kill(engine.pid, signal.SIGSTOP)  # a second failure is reported, not retried forever
    with pytest.raises(RolloutTimeoutError, match="no heartbeat"):
        run.generate([[1, 2]], 2, QUICK)
