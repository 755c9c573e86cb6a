"""The miniature comparison's statistics and report: Student's t interval against printed
tables and a hand computation, verdicts, and a resumable compare() with per-band outputs
(training replaced by a writer of metrics.jsonl rows)."""

import json
import math

import pytest

from jaxsd.train import compare as compare_lib
from jaxsd.train import loop
from jaxsd.train import miniature as M


@pytest.mark.parametrize("df, table", [(1, 12.7062), (4, 2.7764), (9, 2.2622), (30, 2.0423)])
def test_t_quantile_matches_printed_tables(df, table):
    assert M.t_quantile(0.975, df) == pytest.approx(table, abs=1e-4)


def test_paired_difference_by_hand():
    a = [0.50, 0.60, 0.70, 0.40, 0.55]
    b = [0.40, 0.45, 0.60, 0.35, 0.50]
    # d = .10 .15 .10 .05 .05: mean .09, squared deviations sum to .007, sample var .00175
    half = 2.776445 * math.sqrt(0.00175 / 5)
    d = M.paired_difference(a, b)
    assert d["n"] == 5 and d["mean"] == pytest.approx(0.09)
    assert (d["low"], d["high"]) == pytest.approx((0.09 - half, 0.09 + half), abs=1e-6)
    assert M.verdict(d) == "supported"
    assert M.verdict(M.paired_difference(b, a)) == "contradicted"
    assert M.verdict(M.paired_difference([0.1, 0.3], [0.2, 0.1])) == "inconclusive"
    with pytest.raises(ValueError, match=">= 2 finite pairs"):
        M.paired_difference([0.1], [0.2])


def _fake_train(calls):
    """Stands in for loop.train: a run's metrics.jsonl with a start and an end evaluation
    whose values depend on the method (SDPO +10 points over GRPO on every band) and seed."""

    def train(cfg):
        calls.append(cfg.run_dir)
        gain = {"grpo": 0.0, "sdpo": 0.1}[cfg.algorithm.name] + 0.01 * cfg.seed
        rows = []
        for step, bonus in ((0, 0.0), (cfg.total_steps, gain)):
            evals = {"eval/mean@16": 0.4 + bonus, "eval/mean@16/band=easy": 0.9 + bonus / 10,
                     "eval/mean@16/band=intermediate": 0.4 + bonus,
                     "eval/mean@16/band=hard": 0.02 + bonus / 2}  # fmt: skip
            rows.append({"step": step, "rollout/pass_rate": 0.4 + bonus, **evals})
        import pathlib

        pathlib.Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
        text = "".join(json.dumps(r) + "\n" for r in rows)
        (pathlib.Path(cfg.run_dir) / "metrics.jsonl").write_text(text)

    return train


def test_miniature_compare_resumes_and_reports_per_band(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(loop, "train", _fake_train(calls))
    out = tmp_path / "mini"
    summary = compare_lib.compare(["grpo", "sdpo"], [0, 1, 2], out, preset="miniature")
    assert len(calls) == 6 and "[6/6] sdpo_s2 (5 trained" in capsys.readouterr().out
    again = compare_lib.compare(["grpo", "sdpo"], [0, 1, 2], out, preset="miniature")
    assert len(calls) == 6  # every run finished: nothing trains again
    assert again["runs"] == summary["runs"]
    assert summary["runs"]["sdpo_s1"]["ends"]["eval/mean@16/band=hard"] == pytest.approx(0.075)
    report = M.write_report(summary, out, ["grpo", "sdpo"])
    rows = {(r["better"], r["worse"], r["metric"]): r for r in report["predictions"]}
    sdpo_grpo = rows[("sdpo", "grpo", "eval/mean@16")]
    assert sdpo_grpo["seeds"] == [0, 1, 2] and sdpo_grpo["verdict"] == "supported"
    assert sdpo_grpo["diff"]["mean"] == pytest.approx(0.1)  # the seed terms cancel: paired
    assert rows[("sc_sdpo", "sdpo", "eval/mean@16")]["verdict"] == "not enough seeds"
    table = (out / "table.md").read_text()
    # sdpo ends at .50 .51 .52 overall, .91 .911 .912 easy, .07 .075 .08 hard (sample std)
    assert "| sdpo | 3 | 51.0 ± 1.0 | 91.1 ± 0.1 | 51.0 ± 1.0 | 7.5 ± 0.5 |" in table
    assert "| sdpo > grpo | mean@16 | 3 | +10.0 | [+10.0, +10.0] | supported |" in table
    assert sorted(p.name for p in out.glob("mean16*.png")) == [
        "mean16.png", "mean16_band=easy.png", "mean16_band=hard.png",
        "mean16_band=intermediate.png",
    ]  # fmt: skip


def test_band_metrics_pass_the_metric_check():
    cfg = compare_lib.load_config("sdpo", "miniature")
    compare_lib.check_metric("eval/mean@16/band=hard", cfg)
    with pytest.raises(ValueError, match="is not logged"):
        compare_lib.check_metric("eval/mean@4/band=hard", cfg)
