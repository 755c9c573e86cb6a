"""bench/async_rollouts.py (tests of a bench script, not of jaxsd): the command it runs per mode
and the figures it reads back from a run's metrics."""

import json
import pathlib

import pytest


def test_modes_differ_only_in_async_steps(repo_module):
    bench = repo_module("bench/async_rollouts.py")
    args = bench.argparse.Namespace(steps=5, seed=1, engine="vllm", set=["rollout.n=4"])
    sync = bench.train_command("configs/sdpo.py", pathlib.Path("/r"), 0, args)
    ahead = bench.train_command("configs/sdpo.py", pathlib.Path("/r"), 1, args)
    assert [a for a, b in zip(sync, ahead, strict=True) if a != b] == [
        "--config.rollout.async_steps=0"
    ]
    assert "--config=configs/sdpo.py:total_steps=5,eval_every=5,seed=1" in sync
    assert sync[-2:] == ["--config.rollout.async_steps=0", "--config.rollout.n=4"]


def test_figures_leave_out_step_one_and_take_the_last_evaluation(tmp_path, repo_module):
    rows = [
        {"step": 0, "eval/mean@16": 0.1},
        {"step": 1, "time/step_s": 50.0, "time/rollout_s": 9.0, "time/train_s": 40.0,
         "rollout/staleness": 0.0},
        {"step": 2, "time/step_s": 2.0, "time/rollout_s": 0.5, "time/train_s": 1.0,
         "time/rollout_wait_s": 0.25, "rollout/staleness": 1.0},
        {"step": 3, "time/step_s": 4.0, "time/rollout_s": 1.5, "time/train_s": 3.0,
         "time/rollout_wait_s": 0.75, "rollout/staleness": 1.0, "eval/mean@16": 0.4},
    ]  # fmt: skip
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    figures = repo_module("bench/async_rollouts.py").run_figures(tmp_path)
    assert figures["step_s_median"] == pytest.approx(3.0)
    assert figures["steps_s_total"] == pytest.approx(6.0)
    assert figures["rollout_s_median"] == pytest.approx(1.0)
    assert figures["train_s_median"] == pytest.approx(2.0)
    assert figures["rollout_wait_s_median"] == pytest.approx(0.5)
    assert figures["staleness_max"] == 1.0
    assert figures["eval_end"] == {"eval/mean@16": 0.4}
