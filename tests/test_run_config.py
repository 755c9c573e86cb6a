"""Run folders: config.json, the {hash} folder name, the resume check, Ctrl-C saves."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from jaxsd.metrics import read_metrics
from jaxsd.train import run_config
from tests.test_loop import REPO, load_config


def _cfg(tmp_path, **changes):
    cfg = load_config("sdpo", "smoke")
    cfg.run_dir = str(tmp_path / "run")
    for dotted, value in changes.items():
        node = cfg
        *parents, leaf = dotted.split("__")
        for name in parents:
            node = node[name]
        node[leaf] = value
    return cfg


def test_config_json_written_and_changed_config_refused_with_diff(tmp_path):
    cfg = run_config.prepare_run_dir(_cfg(tmp_path))
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["optim"]["lr"] == cfg.optim.lr and saved["seed"] == 0

    with pytest.raises(run_config.ConfigMismatchError) as err:
        run_config.prepare_run_dir(_cfg(tmp_path, seed=1, optim__lr=3e-5))
    assert "  optim.lr: 0.0005 -> 3e-05" in str(err.value)
    assert "  seed: 0 -> 1" in str(err.value)
    # Run-time keys may change; total_steps may grow but not shrink.
    run_config.prepare_run_dir(_cfg(tmp_path, total_steps=9, eval_every=1, keep_checkpoints=5))
    with pytest.raises(run_config.ConfigMismatchError, match="total_steps: 9 -> 2"):
        run_config.prepare_run_dir(_cfg(tmp_path, total_steps=2))
    # A refused resume leaves the folder's config.json as it was.
    assert json.loads((tmp_path / "run" / "config.json").read_text())["total_steps"] == 9


def test_default_run_dir_names_carry_the_config_hash(tmp_path):
    default = load_config("sc_sdpo", "")
    assert default.run_dir == "runs/sc_sdpo_default_{hash}"
    name = lambda cfg: run_config.resolve_run_dir(cfg).run_dir  # noqa: E731
    base = name(default)
    assert base.startswith("runs/sc_sdpo_default_") and len(base.rsplit("_", 1)[1]) == 8
    other = load_config("sc_sdpo", "")
    other.seed, other.optim.lr = 1, 3e-5  # the README's second-seed example
    assert name(other) != base
    longer = load_config("sc_sdpo", "")
    longer.total_steps, longer.eval_every = 200, 5  # run-time keys: the same run, continued
    assert name(longer) == base
    assert name(load_config("sc_sdpo", "")) == base  # stable across calls
    assert name(load_config("sdpo", "")) != base


def _wait_for_step(run_dir: pathlib.Path, proc: subprocess.Popen, step: int) -> None:
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        if (run_dir / "metrics.jsonl").is_file():
            if any(r.get("step", 0) >= step and "loss" in r for r in read_metrics(run_dir)):
                return
        time.sleep(0.2)
    raise AssertionError(f"no step {step} logged (rc={proc.poll()})")


def test_ctrl_c_saves_a_checkpoint_and_exits_without_traceback(tmp_path):
    run_dir = tmp_path / "run"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, str(REPO / "scripts" / "train.py"),
           f"--config={REPO / 'configs' / 'sdpo.py'}:smoke", f"--config.run_dir={run_dir}",
           "--config.total_steps=200", "--config.checkpoint_every=0",
           "--config.eval_every=0"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_step(run_dir, proc, 1)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert "[jaxsd] run folder: " in out and "(fresh start, 200 steps)" in out
    last = max(r["step"] for r in read_metrics(run_dir))
    assert 1 <= last < 200
    # checkpoint_every=0 saves only at the end: this one is Ctrl-C's, at the last logged step.
    assert sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir()) == [last]
    assert json.loads((run_dir / "config.json").read_text())["total_steps"] == 200
    assert read_metrics(run_dir)[-1]["mem/host_peak_bytes"] > 1e6

    # Resuming with another lr is refused before anything loads, with the diff, no traceback.
    bad = subprocess.run(cmd + ["--config.optim.lr=3e-5"], env=env, capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert bad.returncode == 2, bad.stderr[-3000:]
    assert "optim.lr: 0.0005 -> 3e-05" in bad.stderr and "Traceback" not in bad.stderr


def test_print_config_lists_every_key_with_overrides_and_the_resolved_folder():
    out = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "train.py"),
         f"--config={REPO / 'configs' / 'sdpo.py'}:smoke", "--config.seed=3", "--print_config"],
        capture_output=True, text=True, timeout=300, check=True,
    ).stdout  # fmt: skip
    lines = dict(line.split(" = ", 1) for line in out.splitlines())
    cfg = load_config("sdpo", "smoke")
    cfg.seed = 3
    assert lines["seed"] == "3" and lines["optim.lr"] == json.dumps(cfg.optim.lr)
    assert json.loads(lines["run_dir"]) == run_config.resolve_run_dir(cfg).run_dir
    assert set(lines) == set(run_config.flatten(run_config.config_dict(cfg)))


def test_compare_checks_the_metric_against_the_preset_before_training(tmp_path, monkeypatch):
    from jaxsd.train import compare as compare_lib
    from jaxsd.train import loop

    def no_training(cfg):
        raise AssertionError("trained before checking the metric")

    monkeypatch.setattr(loop, "train", no_training)
    # The smoke preset evaluates with eval_n=4: mean@16 would never be logged.
    with pytest.raises(ValueError, match=r"'eval/mean@16' is not logged by preset 'smoke'.*mean@4"):
        compare_lib.compare(["sdpo", "grpo"], [0], tmp_path / "cmp", preset="smoke")
    with pytest.raises(ValueError, match="'accuracy' is not a metric the loop logs"):
        compare_lib.compare(["sdpo"], [0], tmp_path / "cmp", preset="smoke", metric="accuracy")
    with pytest.raises(ValueError, match="needs evaluations but eval_every=0"):
        compare_lib.compare(["sdpo"], [0], tmp_path / "cmp", preset="smoke",
                            overrides={"eval_every": "0"}, metric="eval/mean@4")  # fmt: skip
    assert not (tmp_path / "cmp").exists()
    for ok in ("eval/mean@4", "eval/arithmetic/maj@4", "rollout/pass_rate", "loss/distill"):
        compare_lib.check_metric(ok, load_config("sdpo", "smoke"))


def test_sample_rows_take_one_rollout_per_question_with_its_teacher_context():
    from jaxsd import algorithms
    from jaxsd.train.observe import sample_rows

    def rollout(q, reward, feedback=None):
        return algorithms.Rollout(
            question_id=q, prompt=[{"role": "user", "content": f"{q}?"}], response=f"r{reward}",
            response_ids=[1], logprobs=np.zeros(1, np.float32), reward=reward, feedback=feedback,
        )  # fmt: skip

    groups = algorithms.group_rollouts(
        [rollout("a", 0.0, "wrong"), rollout("a", 1.0), rollout("b", 1.0), rollout("c", 0.0)]
    )
    reprompt = [{"role": "user", "content": "a?\nCorrect solution: r1.0"}]
    plans = [algorithms.RolloutPlan(teacher_messages=reprompt), algorithms.RolloutPlan(),
             algorithms.RolloutPlan(), algorithms.RolloutPlan()]  # fmt: skip
    rows = sample_rows(groups, plans, k=2)
    assert rows == [
        {"question_id": "a", "prompt": "a?", "response": "r0.0", "reward": 0.0,
         "feedback": "wrong", "teacher_context": "a?\nCorrect solution: r1.0"},
        {"question_id": "b", "prompt": "b?", "response": "r1.0", "reward": 1.0,
         "feedback": None, "teacher_context": None},
    ]  # fmt: skip
