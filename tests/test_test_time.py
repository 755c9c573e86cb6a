"""Test-time SDPO: pass@k and discovery@k against brute force, the round logic (stop at the
first success, one SDPO update per failed round, none after the last), config errors, and the
smoke preset end to end with the embedded engine."""

from __future__ import annotations

import itertools
import pathlib
from types import SimpleNamespace

import numpy as np
import pytest

from jaxsd import test_time as tt_lib


@pytest.fixture(scope="module")
def load(repo_module):
    """`load(preset)`: configs/test_time_sdpo.py's config, loaded by path."""
    return repo_module("configs/test_time_sdpo.py").get_config


@pytest.mark.parametrize("n,c", [(6, 0), (6, 1), (6, 3), (6, 6), (5, 2)])
def test_pass_at_k_is_the_subset_average(n, c):
    outcomes = [1] * c + [0] * (n - c)
    for k in range(1, n + 1):
        subsets = list(itertools.combinations(outcomes, k))
        brute = np.mean([max(s) for s in subsets])
        assert tt_lib.pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12)
    with pytest.raises(ValueError, match="pass_at_k"):
        tt_lib.pass_at_k(4, 5, 1)


def test_discovery_curve_and_first_success():
    assert tt_lib.discovery_curve([1, 3, None, 4], 4) == [0.25, 0.25, 0.5, 0.75]
    assert tt_lib.first_success([0.0, 0.2, 1.0, 1.0], 0.5) == 3
    assert tt_lib.first_success([0.0, 0.0], 0.5) is None


def _fake_round_machinery(monkeypatch, rounds_rewards):
    """Replace sampling/updating with scripted rewards; record what the rounds did."""
    calls = {"collect": [], "update": [], "publish": []}

    def collect(records, step, *, n, purpose):
        calls["collect"].append((step, n, purpose))
        group = SimpleNamespace(rewards=np.asarray(rounds_rewards[step], np.float64))
        return [group], {}

    monkeypatch.setattr(tt_lib.loop, "learn_on_groups",
                        lambda run, groups, step, epoch: calls["update"].append(step))  # fmt: skip
    worker = SimpleNamespace(
        collect=collect, update_weights=lambda state, step: calls["publish"].append(step)
    )
    run = SimpleNamespace(
        cfg=SimpleNamespace(seed=0, test_time=SimpleNamespace(k=2, budget=6)),
        algorithm=SimpleNamespace(init_state=lambda seed: "fresh"),
        learner=SimpleNamespace(state=None),
        worker=worker,
    )
    return run, calls


def test_rounds_stop_at_the_first_success_after_one_update_per_failed_round(monkeypatch):
    run, calls = _fake_round_machinery(monkeypatch, [[0, 0], [0, 0], [0, 1]])
    initial = {"w": np.ones(3)}
    out = tt_lib._solve(run, {"id": "q"}, 5, initial, 0.5)
    assert out["first_success"] == 6 and out["rounds"] == 3  # 2 + 2 + the 2nd of round 3
    assert calls["update"] == [0, 1]
    assert [c[0] for c in calls["collect"]] == [0, 1, 2]
    assert {c[1] for c in calls["collect"]} == {2} and calls["collect"][0][2] == 1005
    assert calls["publish"] == [0]  # reset to the initial weights first
    assert run.host_state == "fresh"
    np.testing.assert_array_equal(run.learner.state["w"], initial["w"])


def test_a_question_never_solved_gets_no_update_after_its_last_round(monkeypatch):
    run, calls = _fake_round_machinery(monkeypatch, [[0, 0]] * 3)
    out = tt_lib._solve(run, {"id": "q"}, 0, {}, 0.5)
    assert (out["first_success"], out["rounds"]) == (None, 3)
    assert calls["update"] == [0, 1]


def test_summary_curves():
    per_question = [
        {"id": "a", "first_success": 2, "rounds": 1, "base_correct": 0},
        {"id": "b", "first_success": None, "rounds": 2, "base_correct": 1},
    ]
    s = tt_lib.summarize(per_question, budget=4, k=2)
    assert s["discovery_at_k"]["test_time_sdpo"] == [0.0, 0.5, 0.5, 0.5]
    assert s["discovery_at_k"]["base_best_of_k"] == pytest.approx([0.125, 0.25, 0.375, 0.5])
    assert (s["solved_by_test_time_sdpo"], s["fraction_solved_by_test_time_sdpo"]) == (1, 0.5)


def test_bad_test_time_config_fails_naming_the_key(load):
    cfg = load("smoke")
    cfg.test_time.budget = 5
    with pytest.raises(ValueError, match="test_time.budget=5"):
        tt_lib.run_test_time(cfg)
    cfg = load("smoke")
    cfg.rollout.n = 4
    with pytest.raises(ValueError, match="rollout.n=test_time.k"):
        tt_lib.run_test_time(cfg)


def test_smoke_runs_end_to_end(load, tmp_path):
    cfg = load("smoke")
    cfg.run_dir = str(tmp_path)
    s = tt_lib.run_test_time(cfg)
    assert s["questions"] == 2 and len(s["per_question"]) == 2
    for p in s["per_question"]:
        first, rounds = p["first_success"], p["rounds"]
        assert rounds == (2 if first is None else -(-first // 2))
        # One SDPO update per failed round but the last; each moved the weights (loss > 0).
        assert len(p["losses"]) == (1 if first is None else rounds - 1)
        assert all(np.isfinite(loss) and loss > 0 for loss in p["losses"])
        assert 0 <= p["base_correct"] <= 4
    curve = s["discovery_at_k"]["test_time_sdpo"]
    assert len(curve) == 4 and curve == sorted(curve)
    base = [p["base_correct"] > 0 for p in s["per_question"]]
    assert s["discovery_at_k"]["base_best_of_k"][-1] == pytest.approx(np.mean(base))
    assert (tmp_path / "test_time.json").is_file()
    assert pathlib.Path(s["plot"]).stat().st_size > 0


@pytest.mark.parametrize("preset", [None, "smoke", "qwen3_8b"])
def test_presets_validate(load, preset):
    from jaxsd.train.validate import validate_config

    cfg = load(preset)
    devices, vocab = (8, 151936) if preset == "qwen3_8b" else (1, 1024)
    cfg.mesh.update(data=1, fsdp=1, tensor=1)  # one question × k rollouts per update
    validate_config(cfg, vocab_size=vocab, num_devices=1)
    assert cfg.rollout.n == cfg.test_time.k and cfg.task.questions_per_step == 1
    assert cfg.test_time.budget % cfg.test_time.k == 0
    if preset is None:
        assert (cfg.task.name, cfg.task.kwargs.digits, cfg.test_time.budget) == (
            "arithmetic",
            2,
            64,
        )
