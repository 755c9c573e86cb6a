"""configs/sdpo_code.py: every preset validates, qwen3_8b carries SDPO's LiveCodeBench run
settings, and the smoke preset trains end to end on MBPP with the embedded engine."""

from __future__ import annotations

import numpy as np
import pytest

from jaxsd.metrics import read_metrics
from jaxsd.tasks import get_task
from jaxsd.train.validate import validate_config


@pytest.fixture(scope="module")
def load(repo_module):
    """`load(preset)`: configs/sdpo_code.py's config, loaded by path as config_flags does."""
    return repo_module("configs/sdpo_code.py").get_config


@pytest.mark.parametrize("preset", [None, "smoke", "qwen3_8b"])
def test_presets_validate_and_build_their_task(load, preset):
    cfg = load(preset)
    devices, vocab = (8, 151936) if preset == "qwen3_8b" else (1, 1024)
    validate_config(cfg, vocab_size=vocab, num_devices=devices)
    assert cfg.run_dir == f"runs/sdpo_code_{preset or 'default'}_{{hash}}"
    task = get_task(cfg.task.name, **dict(cfg.task.kwargs))
    assert task.limits.timeout_s == cfg.task.kwargs.sandbox.timeout_s


def test_qwen3_8b_is_sdpos_livecodebench_run(load):
    c = load("qwen3_8b")
    assert (c.task.name, c.model.path, c.rollout.engine) == ("livecodebench", "Qwen/Qwen3-8B",
                                                             "vllm")  # fmt: skip
    assert (c.task.questions_per_step, c.rollout.n, c.rollout.eval_n) == (32, 8, 4)
    assert (c.optim.lr, c.optim.warmup_steps) == (1e-6, 0)
    assert (c.loss.alpha, c.loss.top_k, c.loss.teacher_ema) == (1.0, 20, 0.01)
    assert c.algorithm.name == "sdpo" and c.algorithm.dont_reprompt_on_self_success


def test_smoke_trains_end_to_end_on_mbpp(load, tmp_path):
    from jaxsd.train.loop import train

    cfg = load("smoke")
    cfg.run_dir = str(tmp_path / "run")
    summary = train(cfg)
    rows = [r for r in read_metrics(cfg.run_dir) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for row in rows:
        assert np.isfinite(row["loss"]) and np.isfinite(row["grad_norm"])
    # The tiny model writes no code block: every rollout fails with feedback, so SDPO
    # distils every rollout from the feedback reprompt.
    assert "loss/distill" in rows[0]
    assert summary["end_step"] == 3 and "eval_end" in summary
