"""PNG curves from run folders' metrics.jsonl: one run's dashboard, or one metric across runs."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from jaxsd.metrics import FRAC_INTERMEDIATE, GRAD_NORM, LOSS, PASS_RATE, read_metrics  # noqa: E402

_EVAL_AVG = re.compile(r"^eval/(mean|maj)@\d+$")
RESPONSE_LEN = "rollout/response_len"
ENTROPY = "entropy"
LEARNING_RATE = "lr"
# Divergences the step logs: distillation (METHODS §2), student-teacher KL, PPO's KL to the
# rollout policy, SSOPD's frontier KL (§6).
DIVERGENCES = ("distill/divergence", "kl/student_teacher", "pg/approx_kl_old", "ssopd/kl")
# Series of one panel differ by line style and marker as well as colour, so two equal curves
# (e.g. maj@k == mean@k) stay distinguishable where they overlap.
_STYLES = (("-", None), ("--", "o"), (":", "s"), ("-.", "^"), ((0, (5, 1, 1, 1)), "x"))


def smooth_values(values: np.ndarray, weight: float) -> np.ndarray:
    """TensorBoard-style debiased EMA: s_t = w s_{t-1} + (1 - w) x_t, divided by 1 - w^t."""
    if not 0.0 <= weight < 1.0:
        raise ValueError(f"smoothing weight={weight} must lie in [0, 1)")
    out = np.empty(len(values))
    acc = 0.0
    for t, x in enumerate(values, start=1):
        acc = weight * acc + (1.0 - weight) * float(x)
        out[t - 1] = acc / (1.0 - weight**t)
    return out


def series(rows: Sequence[dict[str, Any]], metric: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of `metric` over the rows that have a finite value for it."""
    pts = [
        (r["step"], float(r[metric]))
        for r in rows
        if isinstance(r.get(metric), int | float) and not isinstance(r.get(metric), bool)
    ]
    if not pts:
        return np.zeros(0, np.int64), np.zeros(0)
    steps, values = zip(*sorted(pts), strict=True)
    return np.asarray(steps), np.asarray(values)


def _panels(rows: Sequence[dict[str, Any]]) -> list[tuple[str, list[str]]]:
    """(title, metric names) of every dashboard panel that has data, in a fixed order."""
    keys = sorted({k for r in rows for k in r})
    loss_terms = [k for k in keys if k == LOSS or k.startswith(LOSS + "/")]
    candidates = [
        ("pass rate", [PASS_RATE]),
        ("eval (test split)", [k for k in keys if _EVAL_AVG.match(k)]),
        ("grad norm", [GRAD_NORM]),
        ("fraction of questions with 0<p<1", [FRAC_INTERMEDIATE]),
        ("loss terms", loss_terms),
        ("KL / distillation divergence", [k for k in DIVERGENCES if k in keys]),
        ("response length (tokens)", [RESPONSE_LEN]),
        ("entropy (nats / token)", [ENTROPY]),
        ("learning rate", [LEARNING_RATE]),
    ]
    return [
        (title, [m for m in names if series(rows, m)[0].size])
        for title, names in candidates
        if any(series(rows, m)[0].size for m in names)
    ]


def _plot_series(ax: Any, steps: np.ndarray, values: np.ndarray, k: int, label: str,
                 smooth: float) -> None:  # fmt: skip
    """Series k of a panel: its own colour, line style and marker; with `smooth`, the raw
    values faded and their EMA on top."""
    linestyle, marker = _STYLES[k % len(_STYLES)]
    few = steps.size < 30
    marker = marker or ("." if few else None)
    if smooth:
        ax.plot(steps, values, color=f"C{k}", alpha=0.25, linewidth=1, label=f"_{label} (raw)")
        values = smooth_values(values, smooth)
    ax.plot(steps, values, color=f"C{k}", linestyle=linestyle, marker=marker,
            markevery=None if few else 0.1, markersize=4, label=label)  # fmt: skip


def make_run_figure(
    rows: Sequence[dict[str, Any]], *, title: str = "", smooth: float = 0.0
) -> Figure:
    """Dashboard of one run: pass rate, mean@k/maj@k, grad norm, 0<p<1 fraction, loss terms,
    divergences, response length, entropy, learning rate; `smooth` = EMA weight (0 = raw)."""
    panels = _panels(rows)
    if not panels:
        raise ValueError(
            f"no plottable metric among {sorted({k for r in rows for k in r})}; expected some "
            f"of {PASS_RATE}, eval/mean@k, {GRAD_NORM}, {FRAC_INTERMEDIATE}, {LOSS}"
        )
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.6 * len(panels)), squeeze=False)
    for ax, (panel_title, names) in zip(axes[:, 0], panels, strict=True):
        for k, name in enumerate(names):
            _plot_series(ax, *series(rows, name), k, name, smooth)
        ax.set_title(panel_title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(names) > 1:
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def _save(fig: Figure, out_png: str | os.PathLike) -> str:
    out = os.fspath(out_png)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_run(
    run_dir: str | os.PathLike, out_png: str | os.PathLike | None = None, *, smooth: float = 0.0
) -> str:
    """Write the dashboard of `run_dir` (default `<run_dir>/plots/curves.png`); return the path."""
    rows = read_metrics(run_dir)
    out = out_png or os.path.join(os.fspath(run_dir), "plots", "curves.png")
    title = os.path.basename(os.path.normpath(run_dir))
    return _save(make_run_figure(rows, title=title, smooth=smooth), out)


def mean_curve(
    curves: Sequence[tuple[np.ndarray, np.ndarray]],
) -> tuple[np.ndarray, np.ndarray]:
    """(steps, mean values) over the steps every curve has."""
    common = curves[0][0]
    for steps, _ in curves[1:]:
        common = np.intersect1d(common, steps)
    stacked = [values[np.searchsorted(steps, common)] for steps, values in curves]
    return common, np.mean(stacked, axis=0)


def plot_runs(
    run_dirs: Sequence[str | os.PathLike],
    out_png: str | os.PathLike,
    metric: str,
    *,
    labels: Sequence[str] | None = None,
    groups: Sequence[str] | None = None,
    smooth: float = 0.0,
) -> str:
    """One curve of `metric` per run (methods compared on one axis); return the PNG path.

    With `groups` (e.g. each run's method), runs of a group share a colour as thin lines and
    the group's mean over its runs (at the steps all of them logged) is drawn thick.
    """
    if not run_dirs:
        raise ValueError("plot_runs needs at least one run folder")
    labels = (
        list(labels)
        if labels is not None
        else [os.path.basename(os.path.normpath(d)) for d in run_dirs]
    )
    if len(labels) != len(run_dirs):
        raise ValueError(f"{len(labels)} labels for {len(run_dirs)} run folders")
    if groups is not None and len(groups) != len(run_dirs):
        raise ValueError(f"{len(groups)} groups for {len(run_dirs)} run folders")
    fig, ax = plt.subplots(figsize=(7, 4))
    curves = []
    for run_dir in run_dirs:
        rows = read_metrics(run_dir)
        steps, values = series(rows, metric)
        if steps.size == 0:
            plt.close(fig)
            available = sorted({k for r in rows for k in r} - {"step", "time"})
            raise ValueError(f"{run_dir} has no values of {metric!r}; it has {available}")
        curves.append((steps, values))
    if groups is None:
        for k, ((steps, values), label) in enumerate(zip(curves, labels, strict=True)):
            _plot_series(ax, steps, values, k, label, smooth)
    else:
        for k, group in enumerate(dict.fromkeys(groups)):
            members = [c for c, g in zip(curves, groups, strict=True) if g == group]
            for steps, values in members:
                ax.plot(steps, values, color=f"C{k}", alpha=0.3, linewidth=1)
            steps, mean = mean_curve(members)
            if smooth:
                mean = smooth_values(mean, smooth)
            linestyle, _ = _STYLES[k % len(_STYLES)]
            ax.plot(steps, mean, color=f"C{k}", linestyle=linestyle, linewidth=2.5,
                    label=f"{group} (mean of {len(members)})")  # fmt: skip
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return _save(fig, out_png)
