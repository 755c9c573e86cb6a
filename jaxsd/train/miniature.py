"""The miniature comparison's report (docs/miniature.md): per-band tables and the paired tests
of the orderings the papers predict, from the run folders `scripts/compare.py --mode
miniature` trains.

Pairing is by seed: the same seed gives every method the same base model, question order and
evaluation seed, so a per-seed difference removes what the seeds share. The 95 % interval is
Student's t over the n per-seed differences (df = n - 1).
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

METHODS = ("grpo", "sdpo", "sc_sdpo", "paced", "hard_filter", "srpo", "ssopd", "drift")
SEEDS = (0, 1, 2, 3, 4)
BANDS = ("easy", "intermediate", "hard")
METRIC = "eval/mean@16"


@dataclasses.dataclass(frozen=True)
class Prediction:
    """`better` ends above `worse` on `metric` (end of training, held-out)."""

    better: str
    worse: str
    metric: str
    why: str


# Written down before any miniature run (docs/miniature.md has the reasoning).
PREDICTIONS = (
    Prediction("sdpo", "grpo", METRIC, "SDPO: a self-teacher gives dense per-token credit"),
    Prediction(
        "sc_sdpo", "sdpo", f"{METRIC}/band=intermediate",
        "SC-SDPO: weights move gradient from saturated to intermediate questions",
    ),
    Prediction("sc_sdpo", "sdpo", METRIC, "SC-SDPO: the same, on the whole held-out split"),
    Prediction("sc_sdpo", "paced", METRIC, "SC-SDPO: batch pass rates beat frozen offline ones"),
    Prediction("sc_sdpo", "hard_filter", METRIC, "SC-SDPO: the weight's shape, not only 0<p<1"),
    Prediction("srpo", "grpo", METRIC, "SRPO: wrong rollouts with a right sibling get a teacher"),
    Prediction("srpo", "sdpo", METRIC, "SRPO: GRPO on the rest keeps the reward signal"),
    Prediction("ssopd", "grpo", METRIC, "SSOPD: the shortest-correct witness adds a teacher"),
    Prediction(
        "drift", "sdpo", f"{METRIC}/band=hard",
        "DRIFT: routing + success buffer help hard questions",
    ),
    Prediction("drift", "grpo", f"{METRIC}/band=hard", "DRIFT: the same, against GRPO"),
)  # fmt: skip


def _t_pdf(x: np.ndarray, df: int) -> np.ndarray:
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    return np.exp(log_c - (df + 1) / 2 * np.log1p(x * x / df))


def t_quantile(p: float, df: int) -> float:
    """Student's t quantile for p in (0.5, 1): bisection on the CDF, the CDF by Simpson's rule
    on the density (no scipy in the dependencies)."""
    if not 0.5 < p < 1.0 or df < 1:
        raise ValueError(f"t_quantile needs 0.5 < p < 1 and df >= 1, got p={p}, df={df}")

    def cdf(x: float) -> float:
        grid = np.linspace(0.0, x, 4001)
        y = _t_pdf(grid, df)
        h = x / 4000
        return 0.5 + h / 3 * (y[0] + y[-1] + 4 * y[1:-1:2].sum() + 2 * y[2:-1:2].sum())

    lo, hi = 0.0, 1.0
    while cdf(hi) < p:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def paired_difference(a: Sequence[float], b: Sequence[float]) -> dict[str, float | int]:
    """Mean of a_s - b_s over seeds s with its 95 % t interval (needs >= 2 seeds)."""
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    if d.ndim != 1 or d.size < 2 or not np.all(np.isfinite(d)):
        raise ValueError(f"paired_difference needs >= 2 finite pairs, got {d.tolist()}")
    half = t_quantile(0.975, d.size - 1) * d.std(ddof=1) / math.sqrt(d.size)
    mean = float(d.mean())
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": int(d.size)}


def verdict(diff: Mapping[str, float]) -> str:
    """supported (interval above 0), contradicted (below 0) or inconclusive."""
    if diff["low"] > 0:
        return "supported"
    return "contradicted" if diff["high"] < 0 else "inconclusive"


def end_values(runs: Mapping[str, Mapping[str, Any]], method: str, metric: str) -> dict[int, float]:
    """{seed: last logged `metric`} of `method`'s runs (runs from jaxsd.train.compare)."""
    return {
        r["seed"]: r["ends"][metric]
        for r in runs.values()
        if r["method"] == method and r["ends"].get(metric) is not None
    }


def check_predictions(
    runs: Mapping[str, Mapping[str, Any]], predictions: Sequence[Prediction] = PREDICTIONS
) -> list[dict[str, Any]]:
    """Each prediction's paired difference over the seeds both methods finished."""
    out = []
    for pred in predictions:
        better, worse = (
            end_values(runs, pred.better, pred.metric),
            end_values(runs, pred.worse, pred.metric),
        )
        seeds = sorted(set(better) & set(worse))
        row = {**dataclasses.asdict(pred), "seeds": seeds}
        if len(seeds) >= 2:
            diff = paired_difference([better[s] for s in seeds], [worse[s] for s in seeds])
            row.update(diff=diff, verdict=verdict(diff))
        else:
            row.update(diff=None, verdict="not enough seeds")
        out.append(row)
    return out


def _pm(values: Sequence[float]) -> str:
    if not values:
        return "–"
    std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return f"{100 * np.mean(values):.1f} ± {100 * std:.1f}"


def markdown_table(
    runs: Mapping[str, Mapping[str, Any]], methods: Sequence[str], metrics: Sequence[str]
) -> str:
    """Methods x metrics, each cell the end value's mean ± std (sample std) over seeds, in %."""
    head = "| method | seeds | " + " | ".join(m.removeprefix("eval/") for m in metrics) + " |"
    lines = [head, "|---" * (len(metrics) + 2) + "|"]
    for method in methods:
        cells = [list(end_values(runs, method, m).values()) for m in metrics]
        n = max((len(c) for c in cells), default=0)
        lines.append(f"| {method} | {n} | " + " | ".join(_pm(c) for c in cells) + " |")
    return "\n".join(lines)


def predictions_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """One line per prediction: the paired difference (points) with its 95 % interval."""
    lines = [
        "| prediction | metric | seeds | difference (points) | 95 % interval | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        d = r["diff"]
        diff = "–" if d is None else f"{100 * d['mean']:+.1f}"
        ci = "–" if d is None else f"[{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]"
        metric = r["metric"].removeprefix("eval/")
        lines.append(
            f"| {r['better']} > {r['worse']} | {metric} | {len(r['seeds'])} | {diff} | {ci} "
            f"| {r['verdict']} |"
        )
    return "\n".join(lines)


def band_metrics(metric: str = METRIC, bands: Sequence[str] = BANDS) -> list[str]:
    """The overall metric followed by its per-band versions."""
    return [metric, *(f"{metric}/band={b}" for b in bands)]


def write_report(
    summary: Mapping[str, Any], out_dir: str | pathlib.Path, methods: Sequence[str]
) -> dict[str, Any]:
    """table.md (mean ± std per band, predictions) and one figure per band under out_dir."""
    from jaxsd.plots import plot_runs

    out_dir = pathlib.Path(out_dir)
    runs = summary["runs"]
    metrics = band_metrics(summary["metric"])
    rows = check_predictions(runs)
    text = (
        f"{markdown_table(runs, methods, metrics)}\n\n{predictions_table(rows)}\n"
        if runs
        else "no finished runs\n"
    )
    (out_dir / "table.md").write_text(text)
    dirs = [r["run_dir"] for r in runs.values()]
    groups = [r["method"] for r in runs.values()]
    figures = {}
    for metric in metrics:
        name = metric.removeprefix("eval/").replace("/", "_").replace("@", "")
        if dirs:
            figures[metric] = plot_runs(
                dirs, out_dir / f"{name}.png", metric, labels=list(runs), groups=groups
            )
    return {"predictions": rows, "figures": figures, "table": str(out_dir / "table.md")}
