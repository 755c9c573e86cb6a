"""bench/compare_peers.py's round logic: alternating order and the median-over-rounds ratios."""

from __future__ import annotations

import argparse
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def compare(repo_module):
    return repo_module("bench/compare_peers.py")


def _round(algorithm, **ratios):
    return {"algorithm": algorithm, "ours_over_peer_tokens_per_s": ratios}


def test_median_ratios_take_each_peers_median_spread_and_the_fastest(compare):
    rounds = [
        _round("sdpo", **{"trl/a": 1.0, "trl/b": 2.0}),
        _round("sdpo", **{"trl/a": 1.4}),  # b failed in this round
        _round("sdpo", **{"trl/a": 1.2, "trl/b": 1.8}),
        {"note": "need our sdpo number and a peer sdpo number for ratios"},
    ]
    out = compare.median_ratios(rounds)
    assert out["ours_over_peer_tokens_per_s"] == pytest.approx({"trl/a": 1.2, "trl/b": 1.9})
    assert out["spread"] == {"trl/a": [1.0, 1.4], "trl/b": [1.8, 2.0]}
    assert out["rounds_with_ratio"] == {"trl/a": 3, "trl/b": 2}
    # The fastest peer is the one we beat by the least.
    assert out["fastest_peer"] == "trl/a"
    assert out["ours_over_fastest_peer"] == pytest.approx(1.2)


def test_median_ratios_without_any_ratio_say_so(compare):
    out = compare.median_ratios([{"note": "x"}, {"note": "y"}])
    assert "ours_over_fastest_peer" not in out and out["rounds"] == 2


def test_rounds_alternate_which_side_runs_first(compare, monkeypatch):
    calls = []
    monkeypatch.setattr(compare, "run_ours", lambda args, a: calls.append(f"ours:{a}") or {})
    monkeypatch.setattr(compare, "run_peer", lambda n, args: calls.append(f"peer:{n}") or {})
    args = argparse.Namespace(no_ours=False)
    compare.one_round(args, ["sdpo", "grpo"], ["trl"], peers_first=False)
    compare.one_round(args, ["sdpo", "grpo"], ["trl"], peers_first=True)
    assert calls == ["ours:sdpo", "ours:grpo", "peer:trl", "peer:trl", "ours:sdpo", "ours:grpo"]
