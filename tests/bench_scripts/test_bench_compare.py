"""bench/compare_peers.py's round logic: alternating order and the median-over-rounds ratios."""

from __future__ import annotations

import argparse
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


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


def test_summary_table_lists_every_ratio_and_marks_the_fastest_peer(compare):
    rounds = [_round("sdpo", **{"trl/a": 1.0, "trl/b": 2.0}), _round("sdpo", **{"trl/a": 1.4})]
    single = compare.ratios(
        {"algorithm": "grpo", "response_tokens_per_s": 300.0},
        [
            {
                "peer": "tunix",
                "variants": {"g": {"algorithm": "grpo", "response_tokens_per_s": 200.0}},
            }
        ],
    )
    table = compare.summary_table(
        {"sdpo": compare.median_ratios(rounds), "grpo": single, "gkd": {"note": "no peer ran"}}
    )
    assert table.splitlines()[2:] == [
        "| sdpo | **trl/a** (fastest) | 1.20× | [1.00, 1.40] |",
        "| sdpo | trl/b | 2.00× | [2.00, 2.00] |",
        "| grpo | **tunix/g** (fastest) | 1.50× | one round |",
        "| gkd | – | – | no peer ran |",
    ]


def test_rounds_alternate_which_side_runs_first(compare, monkeypatch):
    calls = []
    monkeypatch.setattr(compare, "run_ours", lambda args, a: calls.append(f"ours:{a}") or {})
    monkeypatch.setattr(compare, "run_peer", lambda n, args: calls.append(f"peer:{n}") or {})
    args = argparse.Namespace(no_ours=False)
    compare.one_round(args, ["sdpo", "grpo"], ["trl"], peers_first=False)
    compare.one_round(args, ["sdpo", "grpo"], ["trl"], peers_first=True)
    assert calls == ["ours:sdpo", "ours:grpo", "peer:trl", "peer:trl", "ours:sdpo", "ours:grpo"]


def _fake_pip(monkeypatch, venvs):
    """Record the commands `ensure` runs; `python -m venv DIR` makes DIR/bin/python."""
    commands = []

    def run(cmd, **_):
        commands.append(cmd)
        if cmd[1:3] == ["-m", "venv"]:
            (pathlib.Path(cmd[3]) / "bin").mkdir(parents=True, exist_ok=True)
            (pathlib.Path(cmd[3]) / "bin" / "python").touch()
        return argparse.Namespace(returncode=0)

    monkeypatch.setattr(venvs.subprocess, "run", run)
    return commands


def test_peer_venvs_hold_the_pinned_versions_and_latest_ones_apart(compare, monkeypatch, tmp_path):
    venvs = compare.venvs
    for name, reqs in venvs.PINNED.items():
        assert reqs and all("==" in r for r in reqs), f"{name}: every peer package pinned"
    commands = _fake_pip(monkeypatch, venvs)
    pinned = venvs.ensure("trl", tmp_path)
    latest = venvs.ensure("trl", tmp_path, latest=True)
    assert pinned["python"] == str(tmp_path / "trl" / "bin" / "python")
    assert latest["python"] == str(tmp_path / "trl-latest" / "bin" / "python")
    installs = [c[4:] for c in commands if c[1:4] == ["-m", "pip", "install"]]
    assert installs == [venvs.PINNED["trl"], venvs.LATEST["trl"]]
    # Reused while the recorded requirements match; a venv built before the pins is updated.
    assert venvs.ensure("trl", tmp_path)["installed"] == "reused"
    (tmp_path / "trl" / "jaxsd-peer.json").write_text('{"requirements": ["trl"]}')
    assert venvs.ensure("trl", tmp_path)["installed"].startswith("fresh")
    assert commands[-1][4:] == venvs.PINNED["trl"]
    with pytest.raises(ValueError, match="unknown peer"):
        venvs.ensure("verl", tmp_path)
